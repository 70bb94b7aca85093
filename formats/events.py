"""Quantization events: what one quantization did to the values (docs/arithmetic.md section 3.6).

For a quantization of ``x`` to ``q``:

* ``flushed``: finite non-zero elements that became zero (underflow, also relative to a block
  scale);
* ``nonfinite``: finite elements that became inf or NaN;
* ``saturated``: finite elements beyond the format's overflow threshold. For an element
  format that is the largest magnitude plus half an ulp (:func:`overflow_threshold`); for a
  block-scaled format it is relative to the block: the element is at the element format's
  largest magnitude and the input exceeds it by more than half an ulp of the scaled grid
  (:func:`overflow_ratio`);
* ``scale_clamped`` (block-scaled formats with 8-bit scales): blocks holding a non-zero
  element whose scale hit the scale format's limit (E8M0 2^-127 or NaN; an E4M3 scale at
  448 or at zero);
* ``blocks``: the number of scales.

The element-wise tests are plain torch functions (:func:`element_events`,
:func:`plain_events`) so that the block-scaling kernels can trace them into the same compiled
kernel as the quantization itself (one pass over the operand:
``quantize_scaled(..., events=...)``); :mod:`precisim.emulation.telemetry` sums them per
module and keeps the eager definition they are tested against.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from .descriptor import FloatFormat, IntFormat

__all__ = ["ELEMENT_EVENTS", "beyond_bound", "count", "element_events", "overflow_ratio",
           "overflow_threshold", "plain_events"]

#: the order of :func:`element_events` / :func:`plain_events` results
ELEMENT_EVENTS = ("flushed", "nonfinite", "saturated")


def overflow_threshold(fmt: FloatFormat | IntFormat) -> tuple[float, bool]:
    """``(t, tie)``: under RNE, magnitudes above ``t`` (the largest magnitude plus half an
    ulp) overflow, and ``t`` itself overflows iff ``tie`` (the largest magnitude is odd, so
    the tie goes to the next, unrepresentable, even value)."""
    if isinstance(fmt, IntFormat):
        return fmt.qmax + 0.5, fmt.qmax % 2 == 1
    top = float(fmt.max)
    ulp_exp = math.floor(math.log2(top)) - fmt.man_bits
    odd = int(top / 2.0 ** ulp_exp) % 2 == 1
    return top + 2.0 ** (ulp_exp - 1), odd


def overflow_ratio(fmt: FloatFormat | IntFormat) -> float:
    """Overflow threshold / largest magnitude (relative to a block's scaled maximum)."""
    t, _ = overflow_threshold(fmt)
    return t / float(fmt.qmax if isinstance(fmt, IntFormat) else fmt.max)


def count(cond: torch.Tensor) -> torch.Tensor:
    """The number of true elements of ``cond`` (int64 0-d), exactly.

    Compiled CPU code reduces float vectors with SIMD but integer vectors lane by lane
    (:mod:`precisim.formats.kernels`), so rows shorter than 2^24 are counted as float32 row
    sums added in float64, and a vector of fewer than 2^24 elements as one float32 sum
    (exact: every partial sum is an integer below 2^24, every total below 2^53); other shapes
    are summed as integers. (Rows, not one sum, where there are rows: a whole-tensor sum
    traced into a block-scaling kernel made the NVFP4 forward with telemetry 1.44x the
    unpatched one instead of 1.17x, bench_model.py.)"""
    if cond.dim() >= 2 and cond.shape[-1] < 2**24:
        return cond.float().sum(dim=-1).double().sum().to(torch.int64)
    if cond.numel() < 2**24:
        return cond.float().sum().to(torch.int64)
    return cond.sum()


def element_events(xf: torch.Tensor, qf: torch.Tensor, at_max: torch.Tensor,
                   ratio: float | torch.Tensor) -> torch.Tensor:
    """``[flushed, nonfinite, saturated]`` (int64) of a block-scaled quantization of the
    float32 ``xf`` to ``qf``; ``at_max``: which elements are at the element format's largest
    magnitude; ``ratio``: :func:`overflow_ratio` of the element format."""
    finite = torch.isfinite(xf)
    flushed = count((xf != 0) & (qf == 0) & finite)
    nonfinite = count(finite & ~torch.isfinite(qf))
    aq = qf.abs()
    sat = count(finite & at_max & (xf.abs() > aq * ratio) & (aq > 0))
    return torch.stack([flushed, nonfinite, sat])


@cache
def beyond_bound(fmt: FloatFormat | IntFormat, dtype: torch.dtype) -> float:
    """The smallest magnitude ``c`` of ``dtype`` (float32 or float64) such that a magnitude
    of ``dtype`` overflows ``fmt`` under RNE iff it is ``>= c`` (:func:`overflow_threshold`:
    beyond ``t``, or at ``t`` when ``tie``); ``inf`` when no finite magnitude of ``dtype`` does.
    Comparing with one bound of the operand's own type keeps :func:`plain_events` in float32
    for float32 operands."""
    import numpy as np

    t, tie = overflow_threshold(fmt)
    ty = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype)
    if ty is None:
        raise ValueError(f"beyond_bound: dtype {dtype} is not accepted; accepted: "
                         "torch.float32, torch.float64")
    with np.errstate(over="ignore"):
        c = ty(t)  # round to nearest; then step up to the first value that overflows
    if float(c) < t or (float(c) == t and not tie):
        c = np.nextafter(c, ty(np.inf))
    return float(c)


def plain_events(xf: torch.Tensor, qf: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``[flushed, nonfinite, saturated]`` (int64) of an element-format quantization of
    ``xf`` (float32, or float64 for an exact value that float32 cannot hold) to ``qf``;
    ``bound``: a one-element tensor of ``xf``'s dtype holding :func:`beyond_bound` (a
    tensor, so one compiled kernel serves every format)."""
    finite = torch.isfinite(xf)
    flushed = count((xf != 0) & (qf == 0) & finite)
    nonfinite = count(finite & ~torch.isfinite(qf))
    sat = count(finite & (xf.abs() >= bound[0]))
    return torch.stack([flushed, nonfinite, sat])
