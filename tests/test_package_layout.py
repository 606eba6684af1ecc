"""The package's map holds: tools -> integrations -> core, and no import cycles.

Read from the source (every ``import`` statement, also those inside functions), so a lazy
import cannot hide a cycle or a core module reaching up into a tool.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ringattn"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The ringattn modules that ``path`` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ringattn"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("ringattn"):
                continue
            # `from . import x` names a module; `from .m import f` names m.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    found.discard(name)
    return {m for m in found if _exists(m)}


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> str:
    if module.startswith("ringattn.cli") or module == "ringattn.__main__":
        return "cli"
    if module.startswith("ringattn.integrations"):
        return "integrations"
    return "core"


def test_the_map_finds_the_package() -> None:
    assert {"ringattn.ring", "ringattn.checks", "ringattn.cli.bench"} <= GRAPH.keys()
    assert "ringattn.ring" in GRAPH["ringattn.api"] or "ringattn.ring" in GRAPH["ringattn.checks"]


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "ringattn"))
def test_imports_run_one_way(module: str) -> None:
    # The package's __init__ is the public facade and may re-export from anywhere.
    order = {"core": 0, "integrations": 1, "cli": 2}
    upward = {
        m for m in GRAPH[module] if m != "ringattn" and order[_layer(m)] > order[_layer(module)]
    }
    assert not upward, f"{module} ({_layer(module)}) imports {sorted(upward)}"


def test_no_import_cycles() -> None:
    graph = {m: {d for d in deps if d != "ringattn"} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = path[path.index(d) :] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
