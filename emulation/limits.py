"""Cheap, cached limits of element formats for the emulation code.

``FloatFormat.max`` in :mod:`precisim.formats` walks the reserved codes one by one, which
costs about a second for fp32 (2^23 NaN codes); the matrix-unit code needs the limits in hot
loops, so it derives them here in O(1) from the descriptor fields (same definitions).
"""

from __future__ import annotations

from fractions import Fraction
from functools import cache

from precisim.formats import FloatFormat, Inf, IntFormat, Nan


@cache
def max_code(fmt: FloatFormat) -> int:
    """Largest magnitude code that is a finite number."""
    top = (1 << (fmt.exp_bits + fmt.man_bits)) - 1
    if fmt.nan is Nan.IEEE:  # the whole top exponent field is inf / NaN
        return top - (1 << fmt.man_bits)
    return top - int(fmt.nan is Nan.TOP) - int(fmt.inf is Inf.TOP)


@cache
def fmax(fmt: FloatFormat | IntFormat) -> Fraction:
    """Largest finite value."""
    if isinstance(fmt, IntFormat):
        return Fraction(fmt.qmax) * fmt.ulp
    return fmt.magnitude_value(max_code(fmt))


def emax(fmt: FloatFormat) -> int:
    """Exponent of the largest finite value."""
    return (max_code(fmt) >> fmt.man_bits) - fmt.bias


def lsb_exp(fmt: FloatFormat | IntFormat) -> int:
    """Exponent of the smallest positive value's unit: emin - man_bits (or -frac_bits)."""
    if isinstance(fmt, IntFormat):
        return -fmt.frac_bits
    return fmt.emin - fmt.man_bits


def is_subset(fmt: FloatFormat | IntFormat, container: FloatFormat) -> bool:
    """True when every value of ``fmt`` is a value of ``container`` (a float format)."""
    cmax = fmax(container)
    if isinstance(fmt, IntFormat):
        bits = max(abs(fmt.qmin), fmt.qmax).bit_length()
        return bits <= container.precision and fmax(fmt) <= cmax and (
            lsb_exp(fmt) >= lsb_exp(container))
    return (fmt.man_bits <= container.man_bits and fmax(fmt) <= cmax
            and lsb_exp(fmt) >= lsb_exp(container)
            and (not fmt.has_inf or container.has_inf))
