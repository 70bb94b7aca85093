"""A frozen, parametric description of a dot-product / GEMM datapath ("matrix unit").

The parameters are those of the block-FMA model of Khattak & Mikaitis, "Accurate Models of
NVIDIA Tensor Cores" (arXiv 2512.07004) and Fasi, Higham, Mikaitis & Pranesh, "Numerical
behavior of NVIDIA tensor cores" (PeerJ CS 2021), summarised in docs/arithmetic.md section 4. One
description covers every unit there without special-casing a GPU, and the simpler accumulator
models of the same section are presets of it (see :func:`kulisch`, :func:`sequential_fma`,
:func:`per_add_rounding`, :func:`chunked`).

Semantics of ``d = sum_i a_i * b_i + c`` under a unit (implemented exactly by
:mod:`precisim.emulation.reference`, and bit-identically by :mod:`precisim.emulation.matmul`):

1. Inputs are values of ``a_format`` / ``b_format`` (subnormals read as zero when
   ``flush_input_subnormals``). Products are exact, or rounded to ``product_format`` with
   ``product_rounding`` (a product beyond that format's range saturates to its max).
2. K is split into blocks of ``block_size`` (k) products; a K that is not a multiple of k is
   padded with zero products (zero products take no part in the alignment, so padding does
   not change any result). The output of block j is the accumulator c of block j+1.
3. Alignment (docs/arithmetic.md 4.2-4.3): the nonzero products of a block, and the incoming
   accumulator when ``c_mode`` is ``JOINT``, are aligned to E = the largest of their
   exponents. A product's exponent is the UNNORMALISED ``e_a + e_b`` with
   ``e_x = max(floor(log2|x|), emin(format of x))`` (``Alignment.UNNORMALISED``; its
   significand lies in [1, 4)), or ``floor(log2|a*b|)`` (``Alignment.NORMALISED``); c's
   exponent is ``max(floor(log2|c|), emin(acc_format))``. E is raised to ``alignment_floor``
   when set (the fp16-output modes). Each term keeps ``alignment_bits`` (F = 23 + neab)
   fraction bits below 2^E; the dropped bits are discarded as ``drop`` says. With
   ``alignment_bits=None`` nothing is dropped (exact block sums).
4. The aligned terms are summed exactly; with ``c_mode=AFTER`` c is then added exactly.
5. The block sum is rounded once to ``acc_format`` with ``acc_rounding`` (to a precision of
   ``block_result_bits`` fraction bits when that is set: H100 FP8 keeps 13), overflowing as
   ``acc_overflow`` says (``INF`` for floats: overflow gives inf even under round-toward-zero,
   docs/arithmetic.md section 4; ``WRAP`` / ``SATURATE`` for fixed-point accumulators).
6. Promotion (DeepSeek-V3 / DeepGEMM): with ``promotion_interval`` N the block chain restarts
   from zero every N products and each partial sum is added to a ``promotion_format``
   register: ``acc = round(acc + s_a*s_b*partial)`` with ``promotion_rounding`` (one rounding,
   as an FMA; the scales default to 1). The caller's c initialises that register.
7. The final accumulator is rounded to ``output_format`` (if set) with ``output_rounding``.

Special values follow the model assumption of docs/arithmetic.md section 4 (unverified there): any
NaN among the products or c, or +inf together with -inf, gives NaN; otherwise an inf among
them gives that inf; a finite overflow gives inf (and then stays inf).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from functools import cache

from precisim.formats import FloatFormat, FormatError, IntFormat, Overflow, Rounding, get_format
from precisim.formats.quantize import is_subset

FormatLike = FloatFormat | IntFormat | str

FP32 = get_format("fp32")


class CMode(enum.Enum):
    """How the incoming accumulator c meets a block's products."""

    JOINT = "joint"  #: c is aligned together with the block's products (NVIDIA tensor cores)
    AFTER = "after"  #: products are aligned and summed alone; c is added to that sum exactly


class Alignment(enum.Enum):
    """Which exponent of a product is the alignment reference."""

    UNNORMALISED = "unnormalised"  #: e_a + e_b (significand product in [1, 4))
    NORMALISED = "normalised"  #: floor(log2 |a*b|)


class Drop(enum.Enum):
    """What happens to the bits of an aligned term below 2^(E - F)."""

    TRUNCATE = "truncate"  #: cut the magnitude toward zero (sign-magnitude; the NVIDIA model)
    FLOOR = "floor"  #: two's-complement truncation: toward -infinity
    NEAREST = "nearest"  #: round each term to nearest, ties to even, at 2^(E-F)
    STICKY = "sticky"  #: truncate, plus one sticky bit at 2^(E-F-1) set if anything was dropped


def _parse_enum(cls: type[enum.Enum], value: object, what: str) -> enum.Enum:
    if isinstance(value, cls):
        return value
    parse = getattr(cls, "parse", None)
    if parse is not None:
        try:
            return parse(value)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
    key = str(value).strip().lower()
    for m in cls:
        if key in (m.value, m.name.lower()):
            return m
    accepted = ", ".join(repr(m.value) for m in cls)
    raise ValueError(f"{what}={value!r} is not valid: accepted {accepted}")


def _fmt(value: object, what: str) -> FloatFormat | IntFormat:
    try:
        f = get_format(value)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from None
    return f


def _check_int(value: object, what: str, lo: int, hi: int, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        extra = " or None" if none_ok else ""
        raise ValueError(f"{what}={value!r} is not valid: accepted an integer {lo}..{hi}{extra}")


MAX_ALIGNMENT_BITS = 200


@dataclass(frozen=True)
class MatrixUnit:
    """A dot-product / GEMM datapath; see the module docstring for the exact semantics.

    Strings are accepted for every format (``"fp16"``, ``"e4m3"``...) and enum field and are
    resolved in ``__post_init__``; every field is validated with an error naming the bad value.
    """

    name: str
    a_format: FormatLike = "fp16"
    b_format: FormatLike | None = None  #: None: same as a_format
    block_size: int = 1  #: k, the number of products of one block FMA
    product_format: FormatLike | None = None  #: None: products are exact
    product_rounding: Rounding | str = Rounding.NEAREST_EVEN
    c_mode: CMode | str = CMode.JOINT
    alignment: Alignment | str = Alignment.UNNORMALISED
    alignment_bits: int | None = None  #: F = 23 + neab; None: exact block sums
    drop: Drop | str = Drop.TRUNCATE
    alignment_floor: int | None = None  #: lowest alignment exponent E (fp16-output modes)
    acc_format: FormatLike = "fp32"
    acc_rounding: Rounding | str = Rounding.NEAREST_EVEN
    acc_overflow: Overflow | str | None = None  #: None: INF if the format has inf, else SATURATE
    acc_sr_bits: int | None = None  #: random bits for acc_rounding="sr"
    block_result_bits: int | None = None  #: fraction bits kept of each block result (H100 FP8: 13)
    flush_input_subnormals: bool = False
    flush_output_subnormals: bool = False  #: flush subnormal accumulator / output values
    output_format: FormatLike | None = None  #: None: the accumulator format
    output_rounding: Rounding | str = Rounding.NEAREST_EVEN
    output_overflow: Overflow | str | None = None
    promotion_interval: int | None = None  #: N products per partial sum (DeepSeek-V3: 128)
    promotion_format: FormatLike = "fp32"
    promotion_rounding: Rounding | str = Rounding.NEAREST_EVEN
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        s = object.__setattr__
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name={self.name!r} is not valid: accepted a non-empty string")
        s(self, "a_format", _fmt(self.a_format, "a_format"))
        s(self, "b_format", self.a_format if self.b_format is None
          else _fmt(self.b_format, "b_format"))
        for what in ("a_format", "b_format"):
            f = getattr(self, what)
            if not is_subset(f, FP32):
                raise FormatError(f"{what}={f.name!r} is not supported: its values must all be "
                                  "float32 values (inputs are passed as float32 tensors)")
        _check_int(self.block_size, "block_size", 1, 1 << 24)
        if self.product_format is not None:
            s(self, "product_format", _fmt(self.product_format, "product_format"))
            if not isinstance(self.product_format, FloatFormat):
                raise FormatError(f"product_format={self.product_format.name!r} is not valid: "
                                  "accepted a floating-point format or None (exact products)")
        s(self, "product_rounding", _parse_enum(Rounding, self.product_rounding,
                                                "product_rounding"))
        s(self, "c_mode", _parse_enum(CMode, self.c_mode, "c_mode"))
        s(self, "alignment", _parse_enum(Alignment, self.alignment, "alignment"))
        _check_int(self.alignment_bits, "alignment_bits", 0, MAX_ALIGNMENT_BITS, none_ok=True)
        s(self, "drop", _parse_enum(Drop, self.drop, "drop"))
        _check_int(self.alignment_floor, "alignment_floor", -1100, 1100, none_ok=True)
        if self.alignment_floor is not None and self.alignment_bits is None:
            raise ValueError("alignment_floor needs alignment_bits (with exact block sums "
                             "nothing is aligned)")
        s(self, "acc_format", _fmt(self.acc_format, "acc_format"))
        acc = self.acc_format
        if isinstance(acc, FloatFormat) and (not is_subset(acc, FP32) or not acc.signed):
            raise FormatError(f"acc_format={acc.name!r} is not supported: a floating-point "
                              "accumulator must be signed and fit in float32")
        s(self, "acc_rounding", _parse_enum(Rounding, self.acc_rounding, "acc_rounding"))
        s(self, "acc_overflow", self._overflow(self.acc_overflow, acc, "acc_overflow"))
        if self.acc_rounding is Rounding.STOCHASTIC:
            _check_int(self.acc_sr_bits, "acc_sr_bits", 1, 30)
        elif self.acc_sr_bits is not None:
            raise ValueError(f"acc_sr_bits={self.acc_sr_bits!r} is only meaningful with "
                             "acc_rounding='sr'")
        if self.block_result_bits is not None:
            if not isinstance(acc, FloatFormat):
                raise ValueError("block_result_bits needs a floating-point acc_format, not "
                                 f"{acc.name!r}")
            _check_int(self.block_result_bits, "block_result_bits", 0, acc.man_bits)
        for what in ("flush_input_subnormals", "flush_output_subnormals"):
            if not isinstance(getattr(self, what), bool):
                raise ValueError(f"{what}={getattr(self, what)!r} is not valid: accepted a bool")
        if self.output_format is not None:
            s(self, "output_format", _fmt(self.output_format, "output_format"))
            out = self.output_format
            if isinstance(out, FloatFormat) and (not is_subset(out, FP32) or not out.signed):
                raise FormatError(f"output_format={out.name!r} is not supported: it must be "
                                  "signed and fit in float32")
        s(self, "output_rounding", _parse_enum(Rounding, self.output_rounding,
                                               "output_rounding"))
        if self.output_rounding is Rounding.STOCHASTIC or (
            self.product_rounding is Rounding.STOCHASTIC
        ):
            raise ValueError("stochastic rounding is supported for acc_rounding only")
        s(self, "output_overflow", self._overflow(self.output_overflow, self.out_format,
                                                  "output_overflow"))
        _check_int(self.promotion_interval, "promotion_interval", 1, 1 << 30, none_ok=True)
        if self.promotion_interval is not None and self.promotion_interval % self.block_size:
            raise ValueError(f"promotion_interval={self.promotion_interval} is not valid: it "
                             f"must be a multiple of block_size={self.block_size}")
        s(self, "promotion_format", _fmt(self.promotion_format, "promotion_format"))
        if not isinstance(self.promotion_format, FloatFormat) or not is_subset(
            self.promotion_format, FP32
        ):
            raise FormatError(f"promotion_format={self.promotion_format.name!r} is not valid: "
                              "accepted a floating-point format that fits in float32")
        s(self, "promotion_rounding", _parse_enum(Rounding, self.promotion_rounding,
                                                  "promotion_rounding"))
        if self.promotion_rounding is Rounding.STOCHASTIC:
            raise ValueError("promotion_rounding='sr' is not supported")

    @staticmethod
    def _overflow(value: object, fmt: FloatFormat | IntFormat, what: str) -> Overflow:
        if value is None:
            return Overflow.INF if fmt.has_inf else Overflow.SATURATE
        ovf = _parse_enum(Overflow, value, what)
        if isinstance(fmt, IntFormat):
            if ovf not in (Overflow.SATURATE, Overflow.WRAP):
                raise ValueError(f"{what}={ovf.value!r} is not valid for the integer format "
                                 f"{fmt.name}: accepted 'saturate' or 'wrap'")
        elif ovf is Overflow.WRAP or (ovf is Overflow.INF and not fmt.has_inf) or (
            ovf is Overflow.NAN and not fmt.has_nan
        ):
            raise ValueError(f"{what}={ovf.value!r} is not possible for {fmt.name}")
        return ovf

    # -- derived ----------------------------------------------------------------------------
    @property
    def out_format(self) -> FloatFormat | IntFormat:
        """The format of the results (output_format, or the accumulator format)."""
        return self.acc_format if self.output_format is None else self.output_format

    @property
    def block_format(self) -> FloatFormat | IntFormat:
        """The accumulator format with ``block_result_bits`` fraction bits."""
        return _reduced(self.acc_format, self.block_result_bits)

    def with_(self, **changes: object) -> MatrixUnit:
        """A copy with some fields changed (validated again).

        Fields whose default is derived from another field are derived again when that field
        changes and they are not given, unless this unit set them to something else:
        ``b_format`` (default: ``a_format``), ``acc_overflow`` (from ``acc_format``) and
        ``output_overflow`` (from the output format). So ``h100.with_(acc_format="int16")``
        gets int16's default overflow, not the fp32 accumulator's ``inf``."""
        derived = (("b_format", ("a_format",), lambda u: u.a_format),
                   ("acc_overflow", ("acc_format",),
                    lambda u: self._overflow(None, u.acc_format, "acc_overflow")),
                   ("output_overflow", ("acc_format", "output_format"),
                    lambda u: self._overflow(None, u.out_format, "output_overflow")))
        for name, deps, default in derived:
            if name not in changes and any(d in changes for d in deps) \
                    and getattr(self, name) == default(self):
                changes[name] = None
        return replace(self, **changes)

    def summary(self) -> str:
        """A one-line human-readable description."""
        f = "exact" if self.alignment_bits is None else f"F={self.alignment_bits}"
        parts = [f"{self.a_format.name}x{self.b_format.name}", f"k={self.block_size}",
                 f"c {self.c_mode.value}", f, self.drop.value if self.alignment_bits else "",
                 f"acc {self.acc_format.name} {self.acc_rounding.value}"]
        if self.block_result_bits is not None:
            parts.append(f"block result {self.block_result_bits} bits")
        if self.alignment_floor is not None:
            parts.append(f"E >= {self.alignment_floor}")
        if self.promotion_interval:
            parts.append(f"promote every {self.promotion_interval} to "
                         f"{self.promotion_format.name}")
        if self.output_format is not None:
            parts.append(f"out {self.out_format.name} {self.output_rounding.value}")
        return f"{self.name}: " + ", ".join(p for p in parts if p)


@cache
def _reduced(acc: FloatFormat | IntFormat, bits: int | None) -> FloatFormat | IntFormat:
    if bits is None or not isinstance(acc, FloatFormat):
        return acc
    return FloatFormat(f"{acc.name}_m{bits}", acc.exp_bits, bits, acc.bias, acc.signed,
                       acc.nan, acc.inf, acc.subnormals)


# -- simple models as presets of the same description ----------------------------------------

def kulisch(in_format: FormatLike = "fp16", acc_format: FormatLike = "fp32",
            rounding: Rounding | str = "rne", name: str | None = None,
            **kw: object) -> MatrixUnit:
    """Exact sum of all products and c, rounded once (a Kulisch accumulator)."""
    return MatrixUnit(name or f"exact-{get_format(in_format).name}-{get_format(acc_format).name}",
                      in_format, block_size=1 << 24, alignment_bits=None, acc_format=acc_format,
                      acc_rounding=rounding, **kw)


def sequential_fma(in_format: FormatLike = "fp16", acc_format: FormatLike = "fp32",
                   rounding: Rounding | str = "rne", name: str | None = None,
                   **kw: object) -> MatrixUnit:
    """One fused multiply-add per product: c = round(a_i*b_i + c), i = 1..K."""
    return MatrixUnit(name or f"fma-{get_format(in_format).name}-{get_format(acc_format).name}",
                      in_format, block_size=1, alignment_bits=None, acc_format=acc_format,
                      acc_rounding=rounding, **kw)


def per_add_rounding(in_format: FormatLike = "fp16", acc_format: FormatLike = "fp32",
                     rounding: Rounding | str = "rne", name: str | None = None,
                     **kw: object) -> MatrixUnit:
    """Products rounded to the accumulator format, then c = round(c + p_i): two roundings."""
    acc = get_format(acc_format)
    return MatrixUnit(name or f"mul-add-{get_format(in_format).name}-{acc.name}", in_format,
                      block_size=1, product_format=acc, product_rounding=rounding,
                      alignment_bits=None, acc_format=acc, acc_rounding=rounding, **kw)


def chunked(base: MatrixUnit, interval: int = 128, name: str | None = None) -> MatrixUnit:
    """``base`` with its partial sums promoted to an fp32 RNE register every ``interval``."""
    return base.with_(name=name or f"{base.name}-promote{interval}",
                      promotion_interval=interval)
