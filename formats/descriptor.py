"""Frozen descriptors of element formats: binary floating point and integers.

Every limit (max, smallest normal/subnormal, eps, emax/emin, value table) is *derived* from the
descriptor fields, in the style of graphcore-research/gfloat's ``FormatInfo``; nothing is typed
in twice. The special-value conventions cover the formats of docs/arithmetic.md section 1:

* IEEE 754 style (``inf=IEEE, nan=IEEE``): the all-ones exponent field is reserved
  (mantissa 0 = inf, otherwise NaN) -- fp32, fp16, bf16, tf32, OCP E5M2.
* ``fn`` (finite): no inf; NaN only at the all-ones magnitude code (``nan=TOP``) -- OCP E4M3,
  or no NaN at all (``nan=NONE``) -- FP6 E2M3/E3M2, FP4 E2M1.
* ``fnuz`` (finite, unsigned zero): no inf, no -0; the -0 code (0x80) is the single NaN
  (``nan=NEG_ZERO``) -- AMD's E4M3FNUZ/E5M2FNUZ and IEEE P3109 signed *finite* formats.
* IEEE P3109 signed *extended*: NaN at 0x80, +/-inf at the largest magnitude codes
  (``nan=NEG_ZERO, inf=TOP``); unsigned P3109: NaN at the all-ones code, extended +inf just
  below it (``nan=TOP, inf=TOP``).
* E8M0 (``subnormals=False``, unsigned, ``nan=TOP``): the exponent field 0 is an ordinary
  binade (2^-127), so there is no zero and no subnormal (OCP MX v1.0 section 5.4).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property


class Nan(enum.Enum):
    """Where a format keeps its NaN encoding(s)."""

    NONE = "none"  #: no NaN code (FP4/FP6)
    IEEE = "ieee"  #: exponent field all ones with a non-zero mantissa
    TOP = "top"  #: the largest magnitude code only (per sign if signed): OCP E4M3, E8M0
    NEG_ZERO = "neg_zero"  #: the sign-only code (0x80): fnuz, IEEE P3109 signed


class Inf(enum.Enum):
    """Where a format keeps its infinities."""

    NONE = "none"
    IEEE = "ieee"  #: exponent field all ones, mantissa zero
    TOP = "top"  #: the largest magnitude code not taken by NaN (IEEE P3109 extended)


class FormatError(ValueError):
    """An invalid format descriptor or an unknown format name."""


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format ``eXmY`` with explicit special-value conventions.

    Value of a finite code with sign s, exponent field E and mantissa field M:
    ``(-1)^s * 2^(E - bias) * (1 + M / 2^m)`` for ``E >= 1`` (or for every E when
    ``subnormals=False``) and ``(-1)^s * 2^(1 - bias) * (M / 2^m)`` for ``E == 0``.
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    signed: bool = True
    nan: Nan = Nan.IEEE
    inf: Inf = Inf.IEEE
    subnormals: bool = True
    aliases: tuple[str, ...] = field(default=(), compare=False, hash=False)
    description: str = field(default="", compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.exp_bits, int) or not 1 <= self.exp_bits <= 8:
            raise FormatError(
                f"exp_bits={self.exp_bits!r} is not supported: accepted 1..8 (the values must "
                "be exactly representable in float32)"
            )
        if not isinstance(self.man_bits, int) or not 0 <= self.man_bits <= 23:
            raise FormatError(f"man_bits={self.man_bits!r} is not supported: accepted 0..23")
        if self.inf is Inf.IEEE and self.nan is not Nan.IEEE:
            raise FormatError(f"{self.name}: inf=IEEE requires nan=IEEE (reserved exponent field)")
        if self.nan is Nan.IEEE and self.man_bits == 0:
            raise FormatError(f"{self.name}: nan=IEEE needs at least one mantissa bit")
        if self.nan is Nan.NEG_ZERO and not self.signed:
            raise FormatError(f"{self.name}: nan=NEG_ZERO needs a signed format")
        if not self.subnormals and self.exp_bits < 2 and self.man_bits == 0:
            raise FormatError(f"{self.name}: a format needs at least two finite values")
        if self.max_code_magnitude < self.min_positive_code:
            raise FormatError(f"{self.name}: the special values leave no finite positive value")
        # the bias range is checked on integers before any value is derived: a huge bias would
        # otherwise build Fractions with 2^bias in them (unbounded time and memory)
        if isinstance(self.bias, bool) or not isinstance(self.bias, int):
            raise FormatError(f"{self.name}: bias={self.bias!r} is not valid: accepted an integer")
        lo_b, hi_b = self.bias_range()
        if not lo_b <= self.bias <= hi_b:
            top = (self.max_code_magnitude >> self.man_bits) - self.bias
            low = self.emin - (self.man_bits if self.subnormals else 0)
            raise FormatError(
                f"{self.name}: bias={self.bias} puts values outside float32 (largest value "
                f"about 2^{top}, smallest 2^{low}; float32 holds 2^-149..2^127); accepted bias "
                f"{lo_b}..{hi_b} for {self.exp_bits} exponent and {self.man_bits} mantissa bits "
                "(every value must be an exact float32 for the fake-quantization to return it)"
            )
        lo, hi = self.min_subnormal, self.max
        if hi > Fraction(2**128 - 2**104) or lo < Fraction(1, 2**149):  # pragma: no cover
            raise FormatError(  # (bias_range() excludes these; kept as the exact statement)
                f"{self.name}: bias={self.bias} puts values outside float32 "
                f"(max {float(hi):g}, smallest {float(lo):g})"
            )

    def bias_range(self) -> tuple[int, int]:
        """The biases that keep every value of this structure (exponent and mantissa bits,
        special values) an exact float32: the largest finite value's exponent at most 127 and
        the smallest step (the smallest subnormal, or 2^(emin - m)) at least 2^-149."""
        top_field = self.max_code_magnitude >> self.man_bits
        lo = top_field - 127 if (top_field >= 1 or not self.subnormals) else -126
        hi = 149 + int(self.subnormals) - self.man_bits
        return lo, hi

    # -- basic geometry ---------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Total storage bits."""
        return int(self.signed) + self.exp_bits + self.man_bits

    @property
    def precision(self) -> int:
        """Significand precision P including the hidden bit."""
        return self.man_bits + 1

    @cached_property
    def emax(self) -> int:
        """Exponent of the largest finite value."""
        return floor_log2(self.max)

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value (1 - bias; -bias without subnormals)."""
        return (1 if self.subnormals else 0) - self.bias

    @property
    def has_inf(self) -> bool:
        return self.inf is not Inf.NONE

    @property
    def has_nan(self) -> bool:
        return self.nan is not Nan.NONE

    @property
    def has_negative_zero(self) -> bool:
        return self.signed and self.has_zero and self.nan is not Nan.NEG_ZERO

    @property
    def has_zero(self) -> bool:
        return self.subnormals

    @property
    def _top_magnitude_code(self) -> int:
        return (1 << (self.exp_bits + self.man_bits)) - 1

    def _is_reserved(self, mag: int) -> bool:
        """True for a magnitude code (sign stripped) that is not a finite number."""
        if self.nan is Nan.IEEE and (mag >> self.man_bits) == (1 << self.exp_bits) - 1:
            return True
        if self.nan is Nan.TOP and mag == self._top_magnitude_code:
            return True
        return self.inf is Inf.TOP and mag == self.inf_magnitude_code

    @cached_property
    def max_code_magnitude(self) -> int:
        """Largest magnitude code that is a finite number."""
        if self.nan is Nan.IEEE:  # the whole top exponent field is reserved
            return self._top_magnitude_code - (1 << self.man_bits)
        return (self._top_magnitude_code - int(self.nan is Nan.TOP)
                - int(self.inf is Inf.TOP))

    @property
    def min_positive_code(self) -> int:
        return 1 if self.subnormals else 0

    @property
    def inf_magnitude_code(self) -> int | None:
        if self.inf is Inf.IEEE:
            return self._top_magnitude_code - (1 << self.man_bits) + 1
        if self.inf is Inf.TOP:
            return self._top_magnitude_code - (1 if self.nan is Nan.TOP else 0)
        return None

    @property
    def nan_code(self) -> int | None:
        """The canonical NaN code (positive sign where there is one)."""
        if self.nan is Nan.NONE:
            return None
        if self.nan is Nan.NEG_ZERO:
            return 1 << (self.bits - 1)
        return self._top_magnitude_code

    # -- values of codes ----------------------------------------------------------------------
    def magnitude_value(self, mag_code: int) -> Fraction:
        """Exact value of a finite magnitude code (sign bit stripped)."""
        e_field = mag_code >> self.man_bits
        m_field = mag_code & ((1 << self.man_bits) - 1)
        if e_field == 0 and self.subnormals:
            return Fraction(m_field, 1 << self.man_bits) * _pow2(1 - self.bias)
        return (1 + Fraction(m_field, 1 << self.man_bits)) * _pow2(e_field - self.bias)

    def decode_exact(self, code: int) -> Fraction | float:
        """Exact value of a code: a Fraction, or ``float('nan')`` / ``+-inf`` for specials."""
        if not 0 <= code < (1 << self.bits):
            raise FormatError(f"{self.name}: code {code} is outside 0..{(1 << self.bits) - 1}")
        negative = self.signed and bool(code >> (self.bits - 1))
        mag = code & self._top_magnitude_code
        if self.nan is Nan.NEG_ZERO and negative and mag == 0:
            return float("nan")
        if mag == self.inf_magnitude_code:
            return float("-inf") if negative else float("inf")
        if self._is_reserved(mag):
            return float("nan")
        value = self.magnitude_value(mag)
        return -value if negative else value

    @cached_property
    def max(self) -> Fraction:
        """Largest finite value."""
        return self.magnitude_value(self.max_code_magnitude)

    @cached_property
    def min_normal(self) -> Fraction:
        """Smallest positive normal value 2^emin."""
        return _pow2(self.emin)

    @cached_property
    def min_subnormal(self) -> Fraction:
        """Smallest positive value (the smallest normal when there are no subnormals)."""
        return self.magnitude_value(self.min_positive_code) if self.subnormals and self.man_bits \
            else self.min_normal

    @property
    def eps(self) -> Fraction:
        """Distance from 1 to the next larger value, 2^-m."""
        return Fraction(1, 1 << self.man_bits)

    def value_table(self) -> list[tuple[int, Fraction | float]]:
        """Every code with its exact value (formats of at most 8 bits)."""
        if self.bits > 8:
            raise FormatError(f"{self.name} has {self.bits} bits; value tables are for <= 8 bits")
        return [(c, self.decode_exact(c)) for c in range(1 << self.bits)]

    def properties(self) -> dict[str, object]:
        """The derived limits, for display."""
        return {
            "name": self.name,
            "bits": self.bits,
            "exp_bits": self.exp_bits,
            "man_bits": self.man_bits,
            "bias": self.bias,
            "signed": self.signed,
            "inf": self.inf.value,
            "nan": self.nan.value,
            "neg_zero": self.has_negative_zero,
            "subnormals": self.subnormals,
            "max": float(self.max),
            "min_normal": float(self.min_normal),
            "min_subnormal": float(self.min_subnormal),
            "eps": float(self.eps),
            "emax": self.emax,
            "emin": self.emin,
        }

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class IntFormat:
    """A two's-complement (or unsigned) integer with an implicit power-of-two scale.

    Values are ``k * 2^-frac_bits`` for integer codes k in ``[qmin, qmax]``. ``symmetric=True``
    drops the most negative code (qmin = -qmax), as many quantizers do. MXINT8 elements are
    ``IntFormat(8, frac_bits=6)`` (OCP MX v1.0 section 5.3.3: implicit scale 2^-6).
    """

    name: str
    bits: int
    signed: bool = True
    frac_bits: int = 0
    symmetric: bool = False
    aliases: tuple[str, ...] = field(default=(), compare=False, hash=False)
    description: str = field(default="", compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 24:
            raise FormatError(f"{self.name}: bits={self.bits!r} is not supported: accepted 1..24")
        if self.signed and self.bits < 2:
            raise FormatError(f"{self.name}: a signed integer needs at least 2 bits")
        if not -100 <= self.frac_bits <= 100:
            raise FormatError(f"{self.name}: frac_bits={self.frac_bits!r} outside -100..100")
        if self.symmetric and not self.signed:
            raise FormatError(f"{self.name}: symmetric=True needs a signed integer")

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -self.qmax if self.symmetric else -(1 << (self.bits - 1))

    @property
    def ulp(self) -> Fraction:
        return _pow2(-self.frac_bits)

    @cached_property
    def max(self) -> Fraction:
        return self.qmax * self.ulp

    @property
    def min(self) -> Fraction:
        return self.qmin * self.ulp

    @cached_property
    def emax(self) -> int:
        """Exponent of the largest value (OCP MX: 0 for MXINT8)."""
        return floor_log2(self.max)

    has_inf = False
    has_nan = False
    has_negative_zero = False

    def decode_exact(self, code: int) -> Fraction:
        """Value of a stored code (two's complement bit pattern for signed formats)."""
        if not 0 <= code < (1 << self.bits):
            raise FormatError(f"{self.name}: code {code} is outside 0..{(1 << self.bits) - 1}")
        k = code - (1 << self.bits) if self.signed and code >> (self.bits - 1) else code
        if k < self.qmin:
            raise FormatError(f"{self.name}: code {code} is unused (symmetric format)")
        return k * self.ulp

    def value_table(self) -> list[tuple[int, Fraction | float]]:
        if self.bits > 8:
            raise FormatError(f"{self.name} has {self.bits} bits; value tables are for <= 8 bits")
        out: list[tuple[int, Fraction | float]] = []
        for c in range(1 << self.bits):
            try:
                out.append((c, self.decode_exact(c)))
            except FormatError:
                out.append((c, float("nan")))
        return out

    def properties(self) -> dict[str, object]:
        return {
            "name": self.name,
            "bits": self.bits,
            "signed": self.signed,
            "frac_bits": self.frac_bits,
            "symmetric": self.symmetric,
            "max": float(self.max),
            "min": float(self.min),
            "ulp": float(self.ulp),
            "emax": self.emax,
        }

    def __str__(self) -> str:
        return self.name


ElementFormat = FloatFormat | IntFormat


def _pow2(e: int) -> Fraction:
    return Fraction(2) ** e


def floor_log2(v: Fraction) -> int:
    """floor(log2(v)) of a positive Fraction, exactly."""
    if v <= 0:
        raise ValueError("log2 of a non-positive value")
    e = v.numerator.bit_length() - v.denominator.bit_length()
    if _pow2(e) > v:
        e -= 1
    elif _pow2(e + 1) <= v:
        e += 1
    return e
