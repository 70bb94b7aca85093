"""Rounding and overflow modes (docs/arithmetic.md section 3)."""

from __future__ import annotations

import enum


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
