"""Rounding and overflow modes, and the one rounding decision table (docs/arithmetic.md section 3).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Rounding(enum.Enum):
    """How a value between two representable neighbours is resolved.

    ``STOCHASTIC`` with r random bits: the exact fraction f in [0, 1) of an ulp is truncated to r
    bits, t = floor(f * 2^r), and the magnitude rounds up iff ``t + R >= 2^r`` for R uniform in
    [0, 2^r). It is exactly unbiased when at most r bits are dropped; otherwise it is biased
    toward zero by less than 2^-r ulp (Fitzgibbon & Felix, ARITH 2025).
    """

    NEAREST_EVEN = "rne"  #: round to nearest, ties to even (IEEE 754 default)
    TOWARD_ZERO = "rtz"  #: truncate the magnitude
    UP = "ru"  #: toward +infinity
    DOWN = "rd"  #: toward -infinity
    NEAREST_AWAY = "rna"  #: round to nearest, ties away from zero (microxcaling's default)
    ODD = "rto"  #: round to odd (truncate, then set the last bit if inexact)
    STOCHASTIC = "sr"  #: stochastic rounding with a set number of random bits

    @classmethod
    def parse(cls, value: Rounding | str) -> Rounding:
        if isinstance(value, Rounding):
            return value
        key = str(value).strip().lower().replace("-", "_")
        for member in cls:
            if key in (member.value, member.name.lower()) or key in _ALIASES.get(member, ()):
                return member
        accepted = sorted({m.value for m in cls} | {m.name.lower() for m in cls})
        raise ValueError(f"unknown rounding {value!r}: accepted {', '.join(accepted)}")

    @property
    def deterministic(self) -> bool:
        return self is not Rounding.STOCHASTIC


_ALIASES = {
    Rounding.NEAREST_EVEN: ("nearest", "rn", "round_nearest_even", "ties_even"),
    Rounding.TOWARD_ZERO: ("trunc", "truncate", "rz", "zero"),
    Rounding.UP: ("ceil", "toward_positive", "rp"),
    Rounding.DOWN: ("floor", "toward_negative", "rm"),
    Rounding.NEAREST_AWAY: ("ties_away", "round_half_away", "away"),
    Rounding.ODD: ("round_to_odd", "odd"),
    Rounding.STOCHASTIC: ("stochastic",),
}


class Overflow(enum.Enum):
    """What a value beyond the largest finite magnitude becomes.

    ``SATURATE`` clamps to +-max (also +-inf inputs: CUDA's SATFINITE); ``INF`` gives +-inf
    (formats with inf only), whatever the rounding mode; ``NAN`` gives NaN (formats with NaN
    only); ``WRAP`` keeps the low bits of the two's-complement code (integer formats only).
    """

    SATURATE = "saturate"
    INF = "inf"
    NAN = "nan"
    WRAP = "wrap"

    @classmethod
    def parse(cls, value: Overflow | str) -> Overflow:
        if isinstance(value, Overflow):
            return value
        key = str(value).strip().lower()
        for member in cls:
            names = (member.value, member.name.lower())
            if key in names or (key == "sat" and member is cls.SATURATE):
                return member
        raise ValueError(
            f"unknown overflow {value!r}: accepted {', '.join(m.value for m in cls)}"
        )


# ---------------------------------------------------------------------------------------------
# the rounding decision table (docs/arithmetic.md section 3)
#
# Every place that rounds a magnitude - the exact reference (Python integers and fractions),
# the kernels on float32 bit patterns (int32), the matrix-unit kernels (int64 significands,
# float64 values) and the compiled block chain (int32) - splits it into the kept part ``q`` (an
# integer number of ulps) and the dropped remainder, describes the remainder with the
# predicates of a *remainder* object below, and asks :func:`round_up` whether ``q`` moves one
# ulp away from zero. The decision itself is written once, in :data:`ROUNDING_RULES`; a new
# rounding mode is one entry there (plus its member of :class:`Rounding` and its tests). Fast
# paths that round by adding a bias to bit patterns (round-to-nearest-even and truncation in
# ``formats.kernels`` and the matrix-unit kernels) are specialisations of two entries, tested
# bit for bit against the table-driven paths.

class ExactRemainder:
    """The remainder of an exact magnitude ``lo + frac`` (``lo`` integer ulps, ``0 <= frac <
    1`` a ``Fraction``) of a value of sign ``negative``; ``sr_rand`` / ``sr_bits``: the random
    integer and its width for stochastic rounding."""

    def __init__(self, lo: int, frac: object, negative: bool, sr_rand: int | None = None,
                 sr_bits: int = 0) -> None:
        self.lo, self.frac, self.negative = lo, frac, negative
        self.sr_rand, self.sr_bits = sr_rand, sr_bits

    @property
    def inexact(self) -> bool:
        return self.frac != 0

    @property
    def above_half(self) -> bool:
        return self.frac * 2 > 1  # type: ignore[operator]

    @property
    def at_half(self) -> bool:
        return self.frac * 2 == 1  # type: ignore[operator]

    @property
    def odd(self) -> bool:
        return self.lo % 2 == 1

    @property
    def even(self) -> bool:
        return self.lo % 2 == 0

    @property
    def positive(self) -> bool:
        return not self.negative

    @property
    def sr_up(self) -> bool:
        if self.sr_rand is None:
            raise ValueError("stochastic rounding needs the random integer")
        t = int(self.frac * (1 << self.sr_bits))  # type: ignore[operator]  # floor: frac >= 0
        return t + self.sr_rand >= (1 << self.sr_bits)


class BitsRemainder:
    """The remainder of integer magnitudes held in integer tensors (int32 or int64): ``q`` the
    kept ulps, ``rem`` the dropped value and ``half`` half an ulp, both in units of the dropped
    bits (a ``half`` larger than any ``rem`` where half an ulp is not representable, e.g. after
    a shift beyond the word); ``negative`` a bool tensor. Stochastic rounding: ``sr_t`` the
    dropped fraction of an ulp truncated to ``sr_bits`` bits, ``rand`` the random integers."""

    def __init__(self, q: Any, rem: Any, half: Any, negative: Any, sr_t: Any = None,
                 rand: Any = None, sr_bits: int = 0) -> None:
        self.q, self.rem, self.half, self.negative = q, rem, half, negative
        self.sr_t, self.rand, self.sr_bits = sr_t, rand, sr_bits

    @property
    def inexact(self) -> Any:
        return self.rem != 0

    @property
    def above_half(self) -> Any:
        return self.rem > self.half

    @property
    def at_half(self) -> Any:
        return (self.rem == self.half) & (self.rem != 0)

    @property
    def odd(self) -> Any:
        return (self.q & 1) == 1

    @property
    def even(self) -> Any:
        return (self.q & 1) == 0

    @property
    def positive(self) -> Any:
        return ~self.negative

    @property
    def sr_up(self) -> Any:
        if self.rand is None or self.sr_t is None:
            raise ValueError("stochastic rounding needs the random integers")
        return (self.sr_t + self.rand) >= (1 << self.sr_bits)


class FloatRemainder:
    """The remainder of non-negative float tensors ``v`` scaled so that one ulp is 1 (exact
    values: ``trunc(v)`` and ``v - trunc(v)`` are then exact); ``negative``: the sign."""

    def __init__(self, v: Any, negative: Any) -> None:
        self.q = v.trunc()
        self.frac = v - self.q
        self.negative = negative

    @property
    def inexact(self) -> Any:
        return self.frac != 0

    @property
    def above_half(self) -> Any:
        return self.frac > 0.5

    @property
    def at_half(self) -> Any:
        return self.frac == 0.5

    @property
    def odd(self) -> Any:
        # q is a non-negative integer value: halving it is exact and leaves a fraction of 0
        # (even) or 1/2 (odd); nan and inf give nan there, neither odd nor even, as q % 2 did
        # (a floor and a subtraction: the float modulo is a slow scalar loop once compiled)
        h = self.q * 0.5
        return (h - h.floor()) == 0.5

    @property
    def even(self) -> Any:
        h = self.q * 0.5
        return (h - h.floor()) == 0

    @property
    def positive(self) -> Any:
        return ~self.negative

    @property
    def sr_up(self) -> Any:
        raise ValueError("stochastic rounding of float values is not supported: use the "
                         "integer kernels")


@dataclass(frozen=True)
class RoundingRule:
    """One row of the decision table: ``up(rem)`` says where the magnitude moves one ulp away
    from zero (None: never); ``bias``: the direction of the mean error of one rounding (``""``
    for the unbiased modes, ``"zero"``, ``"down"`` or ``"up"``), used by the fast matrix-unit
    model to correct for the systematic loss of directed roundings."""

    up: Callable[[Any], Any] | None
    bias: str = ""


#: the one rounding decision table (docs/arithmetic.md section 3)
ROUNDING_RULES: dict[Rounding, RoundingRule] = {
    Rounding.NEAREST_EVEN: RoundingRule(lambda r: r.above_half | (r.at_half & r.odd)),
    Rounding.TOWARD_ZERO: RoundingRule(None, "zero"),
    Rounding.UP: RoundingRule(lambda r: r.inexact & r.positive, "up"),
    Rounding.DOWN: RoundingRule(lambda r: r.inexact & r.negative, "down"),
    Rounding.NEAREST_AWAY: RoundingRule(lambda r: r.above_half | r.at_half),
    Rounding.ODD: RoundingRule(lambda r: r.inexact & r.even),
    Rounding.STOCHASTIC: RoundingRule(lambda r: r.sr_up),
}


def round_up(rounding: Rounding, rem: Any) -> Any:
    """Whether a magnitude with remainder ``rem`` (an :class:`ExactRemainder`,
    :class:`BitsRemainder` or :class:`FloatRemainder`) rounds up one ulp under ``rounding``:
    a bool / bool tensor, or None where the mode never rounds up (truncation)."""
    try:
        rule = ROUNDING_RULES[rounding]
    except KeyError:  # pragma: no cover - every member has a row (tests/test_rounding_table.py)
        raise ValueError(f"rounding {rounding!r} has no row in ROUNDING_RULES") from None
    return None if rule.up is None else rule.up(rem)
