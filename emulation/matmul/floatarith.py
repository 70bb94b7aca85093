"""Exact arithmetic with float32 / float64 tensors for the matrix-unit kernels.

Powers of two built from their bits, exponents read from the bits, the rounding of exact
float64 values to a float format (:func:`round_float`: every deterministic mode, through the
decision table of :mod:`precisim.formats.rounding`; round-to-nearest-even and truncation in
the normal range also by a bias-and-mask on the bits, bit-identical), and the correctly rounded
fp32 sum of two float64 values (:func:`sum_to_f32`).
"""

from __future__ import annotations

import torch
from precisim.formats import Overflow, Rounding
from precisim.formats.rounding import FloatRemainder, round_up

from .intarith import RoundSpec

__all__ = ["all_finite", "any_true", "fexp32", "fexp64", "pow2_32", "pow2_64", "round_fast",
           "round_float", "round_scaled", "sum_to_f32", "truncate_bits32"]

#: the roundings :func:`round_float` and :func:`round_fast` also do with a bias and a mask on
#: the float64 bits (tested bit for bit against the table path, :func:`round_scaled`)
MASK_ROUNDINGS = (Rounding.NEAREST_EVEN, Rounding.TOWARD_ZERO)


def any_true(mask: torch.Tensor) -> bool:
    """``mask.any()`` for a bool tensor (a max over its bytes: many times faster on CPU)."""
    if mask.numel() == 0:
        return False
    return bool(mask.view(torch.uint8).max())


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of a float32 tensor is finite (from the bits)."""
    if x.numel() == 0:
        return True
    return int((x.view(torch.int32) & 0x7FFFFFFF).max()) < 0x7F800000


def pow2_32(n: torch.Tensor) -> torch.Tensor:
    """2.0**n in float32, exactly, for integer n in [-126, 127]."""
    return ((n.to(torch.int32) + 127) << 23).view(torch.float32)


def pow2_64(n: torch.Tensor) -> torch.Tensor:
    """2.0**n in float64, exactly, for integer n in [-1022, 1023]."""
    return ((n.to(torch.int64) + 1023) << 52).view(torch.float64)


def fexp64(x: torch.Tensor) -> torch.Tensor:
    """floor(log2|x|) of nonzero normal float64 values."""
    return ((x.view(torch.int64) >> 52) & 0x7FF) - 1023


def fexp32(x: torch.Tensor) -> torch.Tensor:
    """floor(log2|x|) of nonzero normal float32 values."""
    return ((x.view(torch.int32) >> 23) & 0xFF) - 127


def _mask_round_bits(bits: torch.Tensor, sh: int, rounding: Rounding) -> torch.Tensor:
    """Round the non-negative float64 bit patterns ``bits`` to 52 - ``sh`` fraction bits
    (normal range): truncation clears the low ``sh`` bits; round-to-nearest-even first adds
    half an ulp minus one plus the kept last bit (a carry bumps the exponent by itself)."""
    if rounding is Rounding.NEAREST_EVEN:
        bits = bits + (((1 << (sh - 1)) - 1) + ((bits >> sh) & 1))
    return bits & ~((1 << sh) - 1)


def round_float(x: torch.Tensor, sp: RoundSpec):
    """Round exact float64 values x to the float format of ``sp`` (deterministic modes).

    Where the result is normal in the target format, round-toward-zero and
    round-to-nearest-even work on the float64 bits (:data:`MASK_ROUNDINGS`). Otherwise (and for
    the other modes) :func:`round_scaled`. Returns (result, overflow mask).
    """
    ax = x.abs()
    neg = torch.signbit(x)
    tiny = ax < 2.0 ** sp.emin
    if sp.rounding in MASK_ROUNDINGS:
        res = _mask_round_bits(ax.view(torch.int64), 52 - sp.m, sp.rounding).view(torch.float64)
        if any_true(tiny):
            res = torch.where(tiny, round_scaled(ax, neg, sp), res)
    else:
        res = round_scaled(ax, neg, sp)
    mx = sp.max_value
    ovf = res > mx
    if sp.overflow is Overflow.SATURATE:
        res = torch.where(ovf, mx, res)
        ovf = torch.zeros_like(ovf)
    if sp.flush:
        res = torch.where(res < 2.0 ** sp.emin, 0.0, res)
    return torch.where(neg, -res, res), ovf


def round_scaled(ax: torch.Tensor, neg: torch.Tensor, sp: RoundSpec) -> torch.Tensor:
    """|x| (float64, exact) rounded to the format of ``sp``: scaled by 2^(m - e), which is
    exact, so that one ulp is 1; the decision table says which values round up."""
    e = torch.clamp(fexp64(ax), min=sp.emin)
    v = ax * pow2_64(sp.m - e)
    rem = FloatRemainder(v, neg)
    up = round_up(sp.rounding, rem)
    q = rem.q if up is None else rem.q + up.to(v.dtype)
    return q * pow2_64(e - sp.m)


def sum_to_f32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """RNE_fp32(x + y) of exact float64 values, correctly rounded (one rounding).

    The float64 sum is made round-to-odd with the exact error of TwoSum (the last bit is set
    toward the exact value when the sum was inexact); rounding a round-to-odd value with
    53 >= 24 + 2 bits to float32 is then the correct rounding of the exact sum.
    """
    s = x + y
    bb = s - x
    err = (x - (s - bb)) + (y - bb)
    bits = s.view(torch.int64)
    fix = (err != 0) & ((bits & 1) == 0)
    if any_true(fix):
        step = torch.where((err > 0) == (s > 0), 1, -1)
        bits = torch.where(fix, bits + step, bits)
    return bits.view(torch.float64).to(torch.float32)


def round_fast(x: torch.Tensor, sp: RoundSpec) -> torch.Tensor:
    """``x`` (a float64 tensor this function may overwrite) rounded to the format of ``sp``
    for the fast fidelity: the :data:`MASK_ROUNDINGS` on the float64 bits in place (the sign
    bit is untouched: sign-magnitude), at the precision of normal numbers; formats with a
    normal range narrower than float32's and the other roundings use the exact
    :func:`round_float`. Overflow is left to the caller."""
    if sp.rounding not in MASK_ROUNDINGS or sp.flush or sp.emin > -126:
        return round_float(x, sp)[0]
    sh = 52 - sp.m
    bits = x.view(torch.int64)
    if sp.rounding is Rounding.NEAREST_EVEN:
        bits.add_(((bits >> sh) & 1) + ((1 << (sh - 1)) - 1))
    bits.bitwise_and_(~((1 << sh) - 1))
    return x


def truncate_bits32(t: torch.Tensor, m: int) -> torch.Tensor:
    """Round-toward-zero of a float32 tensor to m fraction bits, in place on its bits."""
    if m < 23:
        t.view(torch.int32).bitwise_and_(~((1 << (23 - m)) - 1))
    return t
