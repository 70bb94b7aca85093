"""Exact IEEE-style arithmetic on the values of the reference side (docs/arithmetic.md
section 7.3): Fractions for finite non-zero-sign values, Python floats for nan, +-inf and
-0.0. Every operand is a value of a format whose values are float32 values, so converting one
to a float is exact."""

from __future__ import annotations

import math
from fractions import Fraction

from .core import Value

__all__ = ["add", "div", "is_neg", "mul", "neg", "value", "vmax"]


def is_neg(a: Value) -> bool:
    """The sign bit (True for -0.0 and negative values)."""
    return math.copysign(1.0, a) < 0 if isinstance(a, float) else a < 0


def _special(a: Value, b: Value) -> bool:
    return isinstance(a, float) or isinstance(b, float)


def _back(r: float) -> Value:
    """A float result of an operation on specials: nan, inf and zeros stay floats (-0.0; +0
    becomes Fraction 0), other values are exact Fractions."""
    if math.isnan(r) or math.isinf(r):
        return r
    if r == 0:
        return -0.0 if math.copysign(1.0, r) < 0 else Fraction(0)
    return Fraction(r)


def neg(a: Value) -> Value:
    if isinstance(a, float):
        return -a
    return -0.0 if a == 0 else -a


def add(a: Value, b: Value) -> Value:
    """``a + b`` exactly; an exact zero sum is +0 unless both addends are -0 (as IEEE 754
    round-to-nearest; precisim uses this rule under every rounding mode)."""
    if _special(a, b):
        return _back(float(a) + float(b))
    return a + b


def mul(a: Value, b: Value) -> Value:
    if _special(a, b):
        return _back(float(a) * float(b))
    r = a * b
    if r == 0 and is_neg(a) != is_neg(b):
        return -0.0
    return r


def div(a: Value, b: Value) -> Value:
    """``a / b`` exactly, with IEEE 754's special cases (x/0 = +-inf, 0/0 = nan)."""
    if b == 0:
        if (isinstance(a, float) and math.isnan(a)) or a == 0:
            return math.nan
        return -math.inf if is_neg(a) != is_neg(b) else math.inf
    if _special(a, b):
        return _back(float(a) / float(b))
    r = a / b
    if r == 0 and is_neg(a) != is_neg(b):
        return -0.0
    return r


def vmax(a: Value, b: Value) -> Value:
    """``max(a, b)`` with NaN propagation (as torch.amax); a zero maximum is +0."""
    if isinstance(a, float) and math.isnan(a) or isinstance(b, float) and math.isnan(b):
        return math.nan
    r = b if float(b) > float(a) else a
    return Fraction(0) if r == 0 else r


def value(v: Value | float) -> Value:
    """A Python float or an exact value as a reference-side Value."""
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v) or (v == 0 and math.copysign(1.0, v) < 0):
            return v
        return Fraction(v)
    return v
