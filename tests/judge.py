"""One rule for every comparison of an attention result against float64 attention.

A result under test (an output or a gradient, in float64, bfloat16, float16 or float32) is
judged by its error against the float64 reference, *relative to what one-process SDPA in the
same dtype achieves on the same rounded inputs against the same reference*. Two error
measures, both relative to the reference's own size (entries where the reference is not
finite are left out: NaN and inf are checked separately):

- ``rms``: ``||got - want|| / ||want||``. Systematic errors (a wrong scale, a missing block, a
  gradient off by a factor) show here at their full size, and no single rounding dominates.
- ``max``: ``max |got - want| / max |want|``. An error confined to a few rows (a mask off by
  one at one boundary) shows here even when the rms barely moves.

The result passes when

    rms <= max(1.5 x SDPA's rms, RMS_FLOOR[dtype], L x eps(float32))   and
    max <= max(2.0 x SDPA's max, MAX_FLOOR[dtype], L x eps(float32))

The factors are the precision contract of docs/design.md: the ring rounds N block results
where one-process SDPA rounds one, which costs up to ~1.25x SDPA's rms error and up to ~2.7x
its max error (fused CUDA kernels, bf16/fp16), so the max rule leans on its floor there.
The floors cover inputs on which SDPA happens to be nearly exact (tiny shapes): for
bfloat16 and float16 one machine epsilon (rms) and two (max) of the dtype (bf16 2^-7,
fp16 2^-10); for float32 1e-5 (~84 eps; results summed in another block order differ from
SDPA's by up to ~10x its own float32 error on small shapes); for float64 1e-10, summation
order only. On large shapes (GPU tests) SDPA's bf16/fp16 rms error is ~eps/3, so there the
rms floor, not the factor, is what binds. ``L`` is the largest |logit| (scale x q.k) of
the inputs, for callers that pass it: every log-sum-exp the ring merges carries a rounding
of about L x eps(float32), which SDPA's single softmax does not (with unit inputs L x eps
is ~1e-6, below every floor). All of this is far below every deliberate bug in
tests/test_mutations.py (a 3% scale, a 5% gradient, a dropped block, ...), and that test
fails if the rule ever lets one through.

A gradient that cancels to almost nothing (dq and dk under near one-hot attention) has no
meaningful size of its own: callers may pass the largest term it sums (``terms``), and its
errors are then measured against at least ``CANCELLED x terms``.

The rule never computes attention itself: callers pass the reference (``want``, float64)
and one-process SDPA's result in the dtype under test (``same``) for the same inputs and the
same mask, so masked variants (documents, windows) reuse it with their own dense-mask
reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

RMS_FACTOR = 1.5
MAX_FACTOR = 2.0
_EPS = {
    "bfloat16": torch.finfo(torch.bfloat16).eps,
    "float16": torch.finfo(torch.float16).eps,
    "float32": torch.finfo(torch.float32).eps,
}
RMS_FLOOR = {"float64": 1e-10, "float32": 1e-5, **{k: _EPS[k] for k in ("bfloat16", "float16")}}
MAX_FLOOR = {"float64": 1e-10, "float32": 1e-5, **{k: _EPS[k] * 2 for k in ("bfloat16", "float16")}}
# A reference that is a sum of terms which cancel (gradients under near one-hot attention)
# is judged relative to this fraction of the terms' size rather than to its own (~0) size.
CANCELLED = 1e-3


def dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def errors(got: torch.Tensor, want: torch.Tensor, terms: float = 0.0) -> tuple[float, float]:
    """``(rms, max)`` error of ``got`` against ``want`` over the entries where ``want`` is
    finite, each relative to ``want``'s size there (rms: its norm; max: its largest entry),
    or to ``CANCELLED x terms`` where that is larger. ``terms``: the largest term the
    reference sums, for results that may cancel (0: none). NaN where ``got`` is not finite."""
    want = want.detach().double()
    finite = torch.isfinite(want)
    if not finite.any():
        return 0.0, 0.0
    diff = (got.detach().double() - want)[finite]
    ref = want[finite]
    least = CANCELLED * terms
    rms_size = max(float(ref.norm()), least * ref.numel() ** 0.5, 1e-300)
    max_size = max(float(ref.abs().max()), least, 1e-300)
    return float(diff.norm()) / rms_size, float(diff.abs().max()) / max_size


@dataclass(frozen=True)
class Verdict:
    """One field's errors, one-process SDPA's, what the rule allows, and the outcome."""

    name: str
    dtype: str
    rms: float
    max: float
    sdpa_rms: float
    sdpa_max: float
    allowed_rms: float
    allowed_max: float

    @property
    def ok(self) -> bool:
        # Written so that NaN fails.
        return self.rms <= self.allowed_rms and self.max <= self.allowed_max

    @property
    def score(self) -> float:
        """How far past the rule the worse measure is (> 1 fails)."""
        scores = (self.rms / self.allowed_rms, self.max / self.allowed_max)
        return math.inf if any(s != s for s in scores) else max(scores)

    def __str__(self) -> str:
        return (
            f"{self.name} ({self.dtype}): rms {self.rms:.2e} (allowed {self.allowed_rms:.2e}, "
            f"SDPA {self.sdpa_rms:.2e}), max {self.max:.2e} (allowed {self.allowed_max:.2e}, "
            f"SDPA {self.sdpa_max:.2e})"
        )


def allowed(
    dtype: torch.dtype | str, sdpa_rms: float, sdpa_max: float, logit: float = 0.0
) -> tuple[float, float]:
    """``(allowed rms, allowed max)`` for a result in ``dtype`` given SDPA's own errors and
    the inputs' largest |logit| (0: not given).

    A NaN SDPA error (SDPA has no finite value where the reference does) allows the floor.
    """
    name = dtype_name(dtype)
    lse = logit * (_EPS["float32"] if name != "float64" else torch.finfo(torch.float64).eps)
    rms = RMS_FACTOR * sdpa_rms if sdpa_rms == sdpa_rms else 0.0
    worst = MAX_FACTOR * sdpa_max if sdpa_max == sdpa_max else 0.0
    return max(rms, RMS_FLOOR[name], lse), max(worst, MAX_FLOOR[name], lse)


def verdict(
    name: str,
    dtype: torch.dtype | str,
    errs: tuple[float, float],
    sdpa_errs: tuple[float, float],
    logit: float = 0.0,
) -> Verdict:
    """The rule applied to measured errors (``errors(got, want)``, ``errors(same, want)``)."""
    ok_rms, ok_max = allowed(dtype, *sdpa_errs, logit)
    return Verdict(name, dtype_name(dtype), *errs, *sdpa_errs, ok_rms, ok_max)


def judge(
    got: Mapping[str, torch.Tensor],
    want: Mapping[str, torch.Tensor],
    same: Mapping[str, torch.Tensor],
    dtype: torch.dtype | str,
) -> list[Verdict]:
    """Each field of ``got`` (e.g. out, dq, dk, dv) against ``want`` (float64), next to
    ``same`` (one-process SDPA in ``dtype`` on the same inputs and mask)."""
    return [
        verdict(name, dtype, errors(got[name], want[name]), errors(same[name], want[name]))
        for name in got
    ]


def failed(verdicts: list[Verdict]) -> list[str]:
    """The verdicts that fail, as text for an assertion message."""
    return [str(v) for v in verdicts if not v.ok]
