"""The ``ringattn`` command-line tools: demo, bench, plan and calibrate.

They import the library (``ringattn.api``, ``strategies``, ``planner``, ...) and are never
imported by it; their optional dependencies (``rich``, ``matplotlib``) load only here.
"""

from .commands import main

__all__ = ["main"]
