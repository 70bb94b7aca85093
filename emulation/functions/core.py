"""Shared machinery of the non-GEMM units (docs/arithmetic.md section 7): one rounding step
``Rq`` with its exact and fast forms, exact float64 arithmetic helpers, and correctly rounded
evaluation of the scalar functions (exact: mpmath with a Ziv loop; fast: float64 torch with a
certified error bound and an exact fallback for the few values it cannot decide).

Every rounding goes through the one decision table (:mod:`precisim.formats.rounding`): the
exact side calls :func:`precisim.formats.reference.round_to_float_format`, the fast side
rounds exact (or round-to-odd) float64 values with
:func:`precisim.emulation.matmul.floatarith.round_scaled` (the table's ``FloatRemainder``
representation). A float64 value that is round-to-odd at 53 bits rounds to any format of at
most 51 significant bits exactly as the exact value does, under every deterministic mode
(Boldo & Melquiond; docs/arithmetic.md section 3.1), so sums and quotients are made
round-to-odd (:func:`add_ro`, :func:`div_ro`) before they are rounded.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any

import torch
from precisim.formats import FloatFormat, FormatError, Overflow, Rounding, get_format
from precisim.formats.quantize import is_subset
from precisim.formats.reference import round_to_float_format
from precisim.formats.rounding import ExactRemainder, FloatRemainder, round_up

from ..matmul.floatarith import pow2_64, round_scaled
from ..matmul.intarith import RoundSpec
from . import approx64

__all__ = ["Fn", "Rq", "Value", "add_ro", "add_rne32", "check_format", "cr_exact", "cr_fast",
           "div_ro", "exact_fn", "grid_exact", "grid_fast", "grid_magic", "grid_rne", "inf_values",
           "parse_enum", "rq", "signed_zero"]

Value = Fraction | float  # float only for nan, +-inf and -0.0

FP32 = get_format("fp32")
NAN = float("nan")
INF = float("inf")


class Fn(enum.Enum):
    """The scalar functions the units compute."""

    EXP = "exp"
    EXP2 = "exp2"
    RCP = "rcp"  #: 1 / x
    RSQRT = "rsqrt"  #: 1 / sqrt(x)
    SIGMOID = "sigmoid"  #: 1 / (1 + exp(-x))
    TANH = "tanh"
    ERF = "erf"
    SILU = "silu"  #: x * sigmoid(x)
    GELU = "gelu"  #: x * Phi(x) = x / 2 * (1 + erf(x / sqrt(2)))  (the erf form)
    GELU_TANH = "gelu_tanh"  #: x / 2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    GELU_SIGMOID = "gelu_sigmoid"  #: x * sigmoid(1.702 x)

    @property
    def bounded(self) -> bool:
        """True for the functions approximated on an interval (with asymptotes outside)."""
        return self not in (Fn.EXP, Fn.EXP2, Fn.RCP, Fn.RSQRT)

    @property
    def activation(self) -> bool:
        return self in ACTIVATIONS


ACTIVATIONS = (Fn.SILU, Fn.GELU, Fn.GELU_TANH, Fn.GELU_SIGMOID)

#: the exact constants of the GELU forms
GELU_TANH_C = Fraction(44715, 10**6)
GELU_SIGMOID_C = Fraction(1702, 1000)


def parse_enum(cls: type[enum.Enum], value: object, what: str) -> Any:
    """``value`` as a member of ``cls`` (by value or name), else ValueError naming it."""
    if isinstance(value, cls):
        return value
    key = str(value).strip().lower().replace("-", "_")
    for m in cls:
        if key in (str(m.value).replace("-", "_"), m.name.lower()):
            return m
    accepted = ", ".join(repr(m.value) for m in cls)
    raise ValueError(f"{what}={value!r} is not valid: accepted {accepted}")


def check_format(value: object, what: str) -> FloatFormat:
    """A format field: a signed floating-point format with zero and subnormals whose values
    are float32 values (the units' datapaths); ValueError naming the field otherwise."""
    try:
        f = get_format(value)
    except FormatError as e:
        raise ValueError(f"{what}: {e}") from None
    if not isinstance(f, FloatFormat) or not f.signed or not f.subnormals \
            or not is_subset(f, FP32):
        raise ValueError(f"{what}={getattr(f, 'name', value)!r} is not valid: accepted a "
                         "signed floating-point format with zero and subnormals whose values "
                         "are float32 values (fp32, tf32, bf16, fp16, e4m3, e5m2, eXmY...)")
    return f


def default_overflow(fmt: FloatFormat) -> Overflow:
    """INF where the format has infinities, else SATURATE (as the matrix units)."""
    return Overflow.INF if fmt.has_inf else Overflow.SATURATE


@dataclass(frozen=True)
class Rq:
    """One rounding step: a format, a rounding mode, an overflow policy and flush-to-zero of
    results below the smallest normal. ``exact(v)`` rounds an exact value (docs/arithmetic.md
    section 3, through :func:`~precisim.formats.reference.round_to_float_format`); ``fast(v)``
    rounds a float64 tensor of exact or round-to-odd values bit-identically."""

    fmt: FloatFormat
    rounding: Rounding = Rounding.NEAREST_EVEN
    overflow: Overflow = Overflow.SATURATE
    flush: bool = False

    def __post_init__(self) -> None:
        if not self.rounding.deterministic:
            raise ValueError("stochastic rounding is not available in the function units: "
                             "accepted rne, rna, rtz, ru, rd, rto")
        if self.overflow is Overflow.INF and not self.fmt.has_inf:
            raise ValueError(f"overflow='inf' is not possible: {self.fmt.name} has no "
                             "infinity; accepted 'saturate'" + (" or 'nan'" if self.fmt.has_nan
                                                                 else ""))
        if self.overflow is Overflow.NAN and not self.fmt.has_nan:
            raise ValueError(f"overflow='nan' is not possible: {self.fmt.name} has no NaN")
        if self.overflow is Overflow.WRAP:
            raise ValueError("overflow='wrap' is for integer formats")
        # plain numbers for the compiled kernels (read as attributes, never computed while
        # tracing: Fraction arithmetic would be traced into symbolic integers)
        object.__setattr__(self, "_sp", RoundSpec.of(self.fmt, self.rounding, self.overflow,
                                                     self.flush))
        object.__setattr__(self, "_max", float(self.fmt.max))
        object.__setattr__(self, "_min_normal", float(self.fmt.min_normal))
        # fp32, RNE, overflow to inf, no flush: the rounding is IEEE 754's float64 -> float32
        # conversion (correctly rounded, subnormals and overflow included), one cast
        object.__setattr__(self, "_is_f32", self.fmt == FP32 and self.overflow is Overflow.INF
                           and self.rounding is Rounding.NEAREST_EVEN and not self.flush)
        # the same with flush-to-zero of results below the smallest normal: the cast, then
        # the flush of the rounded value (as :meth:`fast` flushes ``round_scaled``'s result)
        object.__setattr__(self, "_is_f32_ftz", self.fmt == FP32 and self.flush
                           and self.overflow is Overflow.INF
                           and self.rounding is Rounding.NEAREST_EVEN)

    def describe(self) -> str:
        parts = [self.fmt.name]
        if self.rounding is not Rounding.NEAREST_EVEN:
            parts.append(self.rounding.value)
        if self.overflow is not default_overflow(self.fmt):
            parts.append(f"ovf={self.overflow.value}")
        if self.flush:
            parts.append("ftz")
        return " ".join(parts)

    # -- exact -------------------------------------------------------------------------
    def exact(self, v: Value) -> Value:
        return round_to_float_format(v, self.fmt, self.rounding, self.overflow,
                                     flush_output=self.flush)

    # -- fast --------------------------------------------------------------------------
    @property
    def spec(self) -> RoundSpec:
        return self._sp  # type: ignore[attr-defined]

    @property
    def is_f32(self) -> bool:
        """True when the rounding is the float64 -> float32 conversion (fp32, RNE, overflow
        to inf, no flush): :meth:`fast32` is then one cast."""
        return self._is_f32  # type: ignore[attr-defined]

    @property
    def is_f32_ftz(self) -> bool:
        """True for fp32, RNE, overflow to inf, with flush: the cast, then :meth:`flush32`."""
        return self._is_f32_ftz  # type: ignore[attr-defined]

    def flush32(self, f: torch.Tensor) -> torch.Tensor:
        """Float32 results below the smallest normal in magnitude made zero of their sign
        (the flush of :meth:`fast`, on float32 values; NaN and inf kept)."""
        return torch.where(f.abs() < self._min_normal, f * 0.0, f)  # type: ignore[attr-defined]

    def fast32(self, v: torch.Tensor) -> torch.Tensor:
        """:meth:`fast` with a float32 result (for formats whose values are float32 values)."""
        return v.float() if self._is_f32 else self.fast(v).float()  # type: ignore[attr-defined]

    def fast(self, v: torch.Tensor) -> torch.Tensor:
        """Round float64 ``v`` (exact or round-to-odd values) to the format; float64 result.
        Branch-free (torch.compile'd as part of a unit's kernel)."""
        if self._is_f32:  # type: ignore[attr-defined]
            return v.float().double()
        if self._is_f32_ftz:  # type: ignore[attr-defined]
            return self.flush32(v.float()).double()
        sp = self.spec
        ax = v.abs()
        neg = torch.signbit(v)
        res = round_scaled(ax, neg, sp)
        is_inf = ax == math.inf
        mx = self._max  # type: ignore[attr-defined]
        ovf = (res > mx) | is_inf
        if self.overflow is Overflow.SATURATE:
            res = torch.where(ovf, mx, res)
        elif self.overflow is Overflow.INF:
            res = torch.where(ovf, math.inf, res)
        else:  # NAN: an infinite input stays infinite where the format has inf
            res = torch.where(ovf, math.nan, res)
            if self.fmt.has_inf:
                res = torch.where(is_inf, math.inf, res)
        if self.flush:
            res = torch.where(res < self._min_normal, 0.0, res)  # type: ignore[attr-defined]
        res = torch.where(neg, -res, res)
        return torch.where(torch.isnan(v), math.nan, res)


def rq(fmt: object, rounding: object = "rne", overflow: object = None, flush: bool = False,
       what: str = "format") -> Rq:
    """An :class:`Rq` from names (``overflow=None``: inf where the format has it)."""
    f = fmt if isinstance(fmt, FloatFormat) else check_format(fmt, what)
    r = parse_enum(Rounding, rounding, f"{what} rounding") if not isinstance(
        rounding, Rounding) else rounding
    o = default_overflow(f) if overflow is None else (
        overflow if isinstance(overflow, Overflow) else parse_enum(Overflow, overflow,
                                                                     f"{what} overflow"))
    return Rq(f, r, o, bool(flush))


# ---------------------------------------------------------------------------------------------
# exact float64 arithmetic (fast side)

def add_ro(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` of float64 values of at most 53 bits, round-to-odd at 53 bits: the float64
    sum, with its last bit moved toward the exact sum when the sum was inexact and that bit
    is even (the error comes from TwoSum, exactly). An exact zero sum is +0 unless both
    addends are -0 (IEEE 754 round-to-nearest)."""
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    bits = s.view(torch.int64)
    # (err.abs() < inf is isfinite as a comparison: vectorised when compiled)
    fix = (err != 0) & ((bits & 1) == 0) & (err.abs() < math.inf)
    step = torch.where((err > 0) == (s > 0), 1, -1)
    return (bits + torch.where(fix, step, 0)).view(torch.float64)


#: the float32 overflow midpoint 2^128 - 2^103 and float32's largest value
_T32 = 2.0**128 - 2.0**103
_MAX32 = 2.0**128 - 2.0**104


def add_rne32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` of float64 values rounded once to float32 (RNE, overflow to inf), as a float64
    tensor: the same bits as ``float32(add_ro(a, b))`` (docs/arithmetic.md section 7.1), with
    float operations only (no int64 bit view, no combined masks: compiled, both cost lane
    conversions).

    The float64 sum ``s`` and its error ``err`` (TwoSum, exact) are taken as for
    :func:`add_ro`; ``r = float32(s)``. Rounding ``s`` instead of the exact ``s + err`` can
    only go wrong where ``s`` is a float32 midpoint (every float32 midpoint is a float64 value
    and no float64 value lies strictly between ``s`` and ``s + err``): with ``d = s - r``
    (exact) and ``o = r + 2d``, ``s`` is a midpoint exactly when ``d != 0`` and ``o`` is a
    float32 value, the other neighbour; the exact sum then lies on ``o``'s side when ``err``
    has ``d``'s sign. At the overflow midpoint ``2^128 - 2^103`` (``r`` infinite) an exact
    sum below it in magnitude rounds to float32's largest value."""
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    r = s.float().double()
    d = s - r
    o = r + 2.0 * d
    # (err scaled so the product's sign survives: |err| >= 2^-1074, |d| >= 2^-150 at a
    # midpoint; an infinite product keeps its sign, NaN compares false)
    w = torch.where(o.float().double() == o, (err * 2.0**500) * d, 0.0)
    y = torch.where(w > 0, o, r)
    edge = torch.where(s.abs() == _T32, err * s, 0.0)
    return torch.where(edge < 0, torch.copysign(torch.full_like(s, _MAX32), s), y)


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, fused: bool) -> torch.Tensor:
    """``a * b + c`` of float32 tensors rounded once to float32 (RNE, overflow to inf): the
    fused multiply-add of IEEE 754 binary32 (docs/arithmetic.md section 7.1).

    Eager, and compiled where ``fused`` is False: the product is exact in float64 (24 + 24
    significant bits) and the sum is rounded once by :func:`add_rne32`. Compiled with
    ``fused`` (:func:`fused_fma32_compiles` found the compiled ``prims.fma`` fused on this
    machine): ``prims.fma``, which inductor's CPU code emits as the vector FMA instruction
    (``at::vec::fmadd``) and ``std::fma`` in the tail, one rounding each; eager ``prims.fma``
    rounds twice, so it is never called eagerly."""
    if fused and torch.compiler.is_compiling():
        return torch.ops.prims.fma(a, b, c)
    return add_rne32(a.double() * b.double(), c.double()).float()


def _fma_probe_args() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~.approx64.fma_probe_args` in float32, with the tie 1 + 2^-11 + 2^-24 of
    (1 + 2^-12)^2 - 1 and products that overflow or underflow."""
    return approx64.fma_probe_args(torch.float32, 32, (
        [1 + 2.0**-12, 2.0**100, 2.0**-100, 3.0], [1 + 2.0**-12, 2.0**40, 2.0**-60, 1 / 3],
        [-1.0, -1.0, 2.0**-149, -1.0]))


@lru_cache(maxsize=1)
def fused_fma32_compiles() -> bool:
    """Whether ``torch.compile`` of ``prims.fma`` on float32 CPU tensors rounds once on this
    machine: its result on :func:`_fma_probe_args` equals :func:`fma32`'s exact emulation bit
    for bit (inductor emits the vector FMA instruction where the CPU has one; a generic vector
    type would multiply and add). Checked once per process (one small compile, about 2 s),
    whatever the backend, so that a unit's kernel and tables are chosen alike for the whole
    process; False where compiling fails."""
    a, b, c = _fma_probe_args()
    res = approx64.compiled_fma(a, b, c)
    if res is None:  # pragma: no cover - depends on the machine's compiler
        return False
    got = res[1]
    want = fma32(a, b, c, fused=False)
    return bool(torch.equal(got.view(torch.int32), want.view(torch.int32)))


_SPLIT = float(2**27 + 1)


def div_ro(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` of float32-range values with at most 24 significant bits, round-to-odd at 53
    bits: the float64 quotient q, whose last bit is moved toward the exact quotient when the
    remainder ``a - q*b`` (exact: q split in two 26-bit halves, Veltkamp) is not zero and the
    bit is even. Special values as IEEE 754 division."""
    q = a / b
    c = q * _SPLIT
    qh = c - (c - q)
    ql = q - qh
    r = (a - qh * b) - ql * b  # a - qh*b is exact (Sterbenz); the sign of r is exact
    bits = q.view(torch.int64)
    fix = (r != 0) & ((bits & 1) == 0) & torch.isfinite(q) & (q != 0)
    step = torch.where((r > 0) == (b > 0), 1, -1) * torch.where(q > 0, 1, -1)
    return torch.where(fix, bits + step, bits).view(torch.float64)


def grid_rne(t: torch.Tensor, frac_bits: int | float) -> torch.Tensor:
    """:func:`grid_fast` (ties to even on the grid of multiples of 2^-frac_bits) for float64
    ``t`` with ``|t| < 2^(51 - frac_bits)``, by the magic-constant trick: ``M = 1.5 *
    2^(52 - frac_bits)`` has ulp 2^-frac_bits and an even significand, and ``t + M`` stays in
    M's binade, so IEEE 754's RNE addition rounds t to the grid; ``- M`` is exact. Float
    operations only (vectorised when compiled). A zero result is +0 (grid_fast keeps the
    sign of a negative t rounded to zero; no unit reads that sign). ``frac_bits`` may be
    given as the float ``grid_magic(frac_bits)`` computed before tracing (a captured int is
    a symbolic size when compiled, and 2^(52 - F) then a pow call in every iteration)."""
    m = frac_bits if isinstance(frac_bits, float) else grid_magic(frac_bits)
    return (t + m) - m


def grid_rne32(t: torch.Tensor, m: float) -> torch.Tensor:
    """:func:`grid_rne` on float32 ``t`` (finite): ``t`` rounded to a multiple of ``2^-F``,
    ties to even, given ``m = 2^(23 - F)`` (``F <= 149``, computed before tracing). Where
    ``|t| < m``, ``t +- m`` (the sign of t) lies in [m, 2m], whose float32 step is 2^-F, and m
    is an even multiple of it, so float32's RNE addition rounds t to the grid and ``-+ m`` is
    exact; elsewhere t's own step is at least 2^-F: t is on the grid. A zero result is +0."""
    # (m enters only through arithmetic and a comparison: compiled, a captured float that
    # is also a where() or full_like() scalar was specialised there but read as a graph input
    # elsewhere, and inductor's graph cache then served one m's kernel for another)
    ms = torch.where(t < 0, -1.0, 1.0) * m
    return torch.where(t.abs() < m, (t + ms) - ms, t)


def grid_magic(frac_bits: int) -> float:
    """The constant of :func:`grid_rne`."""
    return 1.5 * 2.0 ** (52 - frac_bits)


def grid_fast(t: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """``t`` (float64, finite) rounded to a multiple of ``2^-frac_bits``, ties to even (the
    fixed-point reduced argument of a unit), through the decision table."""
    v = t * float(2.0 ** frac_bits)
    rem = FloatRemainder(v.abs(), torch.signbit(v))
    up = round_up(Rounding.NEAREST_EVEN, rem)
    q = rem.q + up.to(v.dtype)
    return torch.where(torch.signbit(v), -q, q) * float(2.0 ** -frac_bits)


def grid_exact(t: Fraction, frac_bits: int) -> Fraction:
    """The exact twin of :func:`grid_fast`."""
    v = abs(t) * (1 << frac_bits)
    lo = math.floor(v)
    up = int(bool(round_up(Rounding.NEAREST_EVEN, ExactRemainder(lo, v - lo, t < 0))))
    q = Fraction(lo + up, 1 << frac_bits)
    return -q if t < 0 else q


# ---------------------------------------------------------------------------------------------
# the scalar functions, exactly and in float64

@dataclass(frozen=True)
class _FnDef:
    mp: Callable[[Any, Any], Any]  # (mpmath context, mpf x) -> mpf
    fast: Callable[[torch.Tensor], torch.Tensor]  # float64 approximation
    guard: Callable[[torch.Tensor], torch.Tensor]  # its relative error bound at x
    # beyond these the value is rounding-equivalent to a representative (see _representative)
    lo: float
    hi: float


def _sig64(x: torch.Tensor) -> torch.Tensor:
    """sigmoid in float64 for x >= -700 (beyond 700, exp(-700) < 2^-1000 leaves 1 + e = 1):
    exp within 45u (:func:`~.approx64.exp64`), then two roundings, inside the 2^-47 guard."""
    return 1.0 / (1.0 + approx64.exp64(-x.clamp(max=700.0)))


_C_TANH = math.sqrt(2.0 / math.pi)
_E = 2.0 ** -47


def _g(eps: float = _E) -> Callable[[torch.Tensor], torch.Tensor]:
    """A constant guard: the float64 evaluation's error relative to the value is below
    ``eps`` (2^-47 unless given; a constant costs no operations in a kernel)."""
    return lambda x: eps


def _gelu_sigmoid_guard(x: torch.Tensor) -> torch.Tensor:
    """The error bound of ``x sigmoid(1.702 x)`` in float64 at float32 values x: ``1.702 x``
    (a constant within u, one rounding) within ``2u |1.702 x|`` of the exact argument, which
    moves ``exp`` by as much relatively; exp64's 45u and three roundings: ``u (48 + 3.5
    |x|)``, inside ``2^-47 (1 + |x| / 16)`` (|x| clamped at 450: beyond, for x > 0, ``e <
    e^-700`` leaves the value x)."""
    return _E * (1.0 + 0.0625 * x.abs().clamp(max=450.0))


def _tanh64(x: torch.Tensor) -> torch.Tensor:
    """tanh in float64 for |x| <= 40 as ``t / (t + 2)``, ``t = expm1(2x)`` (2x exact): with
    expm1 within 1 ulp (Sleef's vectorised u10 form, the C library's elsewhere), ``t + 2``
    has no cancellation (t > -1), so the relative error stays below 2^-50, inside the 2^-47
    guard; -0 stays -0 and +-40 give +-1.0 exactly. Measured 42 ms against 64 ms for
    ``torch.tanh`` per 2^24 elements, compiled, one thread."""
    t = torch.expm1(2.0 * x)
    return t / (t + 2.0)


def _gelu_tanh64(x: torch.Tensor) -> torch.Tensor:
    y = (-2.0 * _C_TANH) * (x + 0.044715 * (x * x * x))
    return x / (1.0 + approx64.exp64(y.clamp(min=-700.0)))


def _gelu_tanh_guard(x: torch.Tensor) -> torch.Tensor:
    """The error bound of :func:`_gelu_tanh64` at float32 values x (u = 2^-53): ``x x`` is
    exact, ``x^3``, the product by 0.044715 (a constant within u), the sum of two terms of
    one sign and the product by ``-2 sqrt(2 / pi)`` (within 2.5u) put ``y`` within ``8u |y|``
    of the exact argument, ``|y| <= 1.6 a (1 + 0.045 a^2)``; that moves ``exp(y)`` by as
    much relatively, exp64 adds 45u, ``1 + e`` carries at most ``e / (1 + e) <= 1`` of it
    and the quotient adds u: ``u (47 + 12.8 a (1 + 0.045 a^2))``, inside ``2^-47 (1 + 0.25 a
    (1 + 0.045 a^2))``. (|x| is clamped at 20: beyond, for x > 0, ``e < e^-600`` leaves the
    value x.)"""
    a = x.abs().clamp(max=20.0)
    return _E * (1.0 + 0.25 * a * (1.0 + 0.045 * a * a))


#: per function: mpmath form (numerically stable: no cancellation), float64 form, its error
#: guard, and the clamp of x (output-invariant: beyond it the value is below every format's
#: smallest step, beyond every format's range, or within 2^-100 of an asymptote)
FN_DEFS: dict[Fn, _FnDef] = {
    Fn.EXP: _FnDef(lambda m, x: m.exp(x), approx64.exp64, _g(), -700.0, 90.0),
    Fn.EXP2: _FnDef(lambda m, x: m.power(2, x), torch.exp2, _g(), -1000.0, 130.0),
    Fn.RCP: _FnDef(lambda m, x: 1 / x, lambda x: 1.0 / x, _g(), -math.inf, math.inf),
    Fn.RSQRT: _FnDef(lambda m, x: 1 / m.sqrt(x), torch.rsqrt, _g(), -math.inf, math.inf),
    Fn.SIGMOID: _FnDef(lambda m, x: 1 / (1 + m.exp(-x)), _sig64, _g(), -700.0, 700.0),
    Fn.TANH: _FnDef(lambda m, x: m.tanh(x), _tanh64, _g(), -40.0, 40.0),
    Fn.ERF: _FnDef(lambda m, x: m.erf(x), torch.erf, _g(), -700.0, 700.0),
    Fn.SILU: _FnDef(lambda m, x: x / (1 + m.exp(-x)), lambda x: x * _sig64(x), _g(),
                    -700.0, math.inf),
    Fn.GELU: _FnDef(lambda m, x: x / 2 * m.erfc(-x / m.sqrt(2)), approx64.gelu64,
                    _g(approx64.GELU_GUARD), -approx64.T, math.inf),
    Fn.GELU_TANH: _FnDef(
        lambda m, x: x / (1 + m.exp(-2 * m.sqrt(2 / m.pi) * (x + m.mpf(44715) / 10**6 * x**3))),
        _gelu_tanh64, _gelu_tanh_guard, -15.0, math.inf),
    Fn.GELU_SIGMOID: _FnDef(lambda m, x: x / (1 + m.exp(-m.mpf(1702) / 1000 * x)),
                            lambda x: x * _sig64(1.702 * x), _gelu_sigmoid_guard, -400.0,
                            math.inf),
}


def exact_fn(fn: Fn, x: Fraction) -> Fraction | None:
    """The exact value of ``fn(x)`` where it is rational (x = 0, exp2 of an integer,
    reciprocals, reciprocal square roots of ratios of squares), else None."""
    if fn is Fn.RCP:
        return 1 / x
    if fn is Fn.RSQRT:
        p, q = x.numerator, x.denominator
        rp, rq_ = math.isqrt(p), math.isqrt(q)
        return Fraction(rq_, rp) if rp * rp == p and rq_ * rq_ == q else None
    if fn is Fn.EXP2 and x.denominator == 1:
        return Fraction(2) ** int(x)
    if x == 0:
        return Fraction(1) if fn in (Fn.EXP, Fn.EXP2) else (
            Fraction(1, 2) if fn is Fn.SIGMOID else Fraction(0))
    return None


_TINY = Fraction(1, 2**300)  # below a quarter of every supported format's smallest value
_ALMOST_ONE = 1 - Fraction(1, 2**200)


def _representative(fn: Fn, x: Fraction) -> Fraction | None:
    """A value that every supported rounding maps where it maps ``fn(x)``, for arguments so
    large that the function is within 2^-100 (relative) of an asymptote or beyond every
    format's range: saves the exact evaluation of exp(-10^30) and keeps 1 - e^-x away from 1
    without thousands of bits."""
    if fn is Fn.EXP and (x < -210 or x > 90):
        return _TINY if x < 0 else Fraction(2) ** 130
    if fn is Fn.EXP2 and (x < -300 or x > 130):
        return _TINY if x < 0 else Fraction(2) ** 131
    if fn in (Fn.SIGMOID, Fn.TANH, Fn.ERF) and abs(x) > 150:
        if fn is Fn.SIGMOID:
            return _ALMOST_ONE if x > 0 else _TINY
        return _ALMOST_ONE if x > 0 else -_ALMOST_ONE
    if fn.activation and abs(x) > 150:
        return x * _ALMOST_ONE if x > 0 else -_TINY
    return None


def cr_exact(fn: Fn, x: Value, r: Rq) -> Value:
    """``fn(x)`` rounded correctly by ``r`` (the exact value, or a 2^-p-accurate mpmath value
    whose whole error interval rounds one way: Ziv's strategy, p doubling from 96 bits).
    x is an exact value (Fraction) or nan / +-inf / -0.0."""
    # the cache key tells -0.0 from 0 (equal, with equal hashes, for a plain lru_cache)
    return _cr_exact(fn, x, r, isinstance(x, float))


@lru_cache(maxsize=1 << 18)
def _cr_exact(fn: Fn, x: Value, r: Rq, is_float: bool) -> Value:
    if isinstance(x, float):
        if math.isnan(x):
            return NAN
        if x == 0:  # -0.0
            x = Fraction(0)
            if fn in (Fn.RCP, Fn.RSQRT):
                return r.exact(-INF)
            if fn in (Fn.TANH, Fn.ERF, *ACTIVATIONS):
                return r.exact(-0.0)
        else:
            return r.exact(_at_inf(fn, x > 0))
    if fn is Fn.RSQRT and x < 0:
        return NAN
    if fn in (Fn.RCP, Fn.RSQRT) and x == 0:
        return r.exact(INF)
    v = _representative(fn, x)
    if v is None:
        v = exact_fn(fn, x)
    if v is not None:
        return r.exact(v)
    import mpmath

    p = 96
    while p <= 4096:
        with mpmath.workprec(p):
            y = FN_DEFS[fn].mp(mpmath.mp, mpmath.mpf(x.numerator) / x.denominator)
            man, exp = (int(y.man), int(y.exp)) if y != 0 else (0, 0)
            if y < 0:
                man = -man
        yf = Fraction(man << exp) if exp >= 0 else Fraction(man, 1 << -exp)
        err = abs(yf) / (1 << (p - 24))  # mpmath's error (a few ulps at p bits), generously
        a, b = r.exact(yf - err), r.exact(yf + err)
        if _same(a, b):
            return a
        p *= 2
    raise ArithmeticError(f"{fn.value}({x}) could not be rounded (Ziv loop)")  # pragma: no cover


def _same(a: Value, b: Value) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (isinstance(a, float) and isinstance(b, float)
                and (math.isnan(a) and math.isnan(b) or a == b
                     and math.copysign(1, a) == math.copysign(1, b)))
    return a == b


def _at_inf(fn: Fn, positive: bool) -> Value:
    """``fn(+-inf)``."""
    if fn in (Fn.EXP, Fn.EXP2):
        return INF if positive else Fraction(0)
    if fn is Fn.RCP:
        return 0.0 if positive else -0.0
    if fn is Fn.RSQRT:
        return 0.0 if positive else NAN
    if fn is Fn.SIGMOID:
        return Fraction(1) if positive else Fraction(0)
    if fn in (Fn.TANH, Fn.ERF):
        return Fraction(1) if positive else Fraction(-1)
    return INF if positive else -0.0  # the activations: x or -0


def cr_fast(fn: Fn, x: torch.Tensor, r: Rq, infs: tuple[Any, Any]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(x)`` correctly rounded by ``r`` for float64 ``x`` (exact values): the float64
    approximation rounded, and a mask of the elements whose certified error interval (the
    :data:`FN_DEFS` guard) straddles a rounding boundary, to be recomputed exactly by
    :func:`cr_exact`. ``infs``: :func:`inf_values` of ``(fn, r)``, looked up by the caller
    before tracing. Branch-free (compiled with the unit's kernel)."""
    if fn is Fn.RCP:  # a division: round-to-odd quotient, no hard cases
        return r.fast(div_ro(torch.ones_like(x), x)), torch.zeros_like(x, dtype=torch.bool)
    d = FN_DEFS[fn]
    xc = x.clamp(d.lo, d.hi)
    v = d.fast(xc)
    if r.is_f32:
        return _cr_fast32(v, d.guard(xc))
    if r.is_f32_ftz:  # the flush boundary is a float32 value: decided by the same test
        y, hard = _cr_fast32(v, d.guard(xc))
        return r.flush32(y), hard
    exact = xc == 0
    if fn is Fn.EXP2:  # 2^n for integers n, exactly (from the bits)
        n = xc.round()
        exact = xc == n
        v = torch.where(exact, pow2_64(n.clamp(-1000, 130)), v)
    elif fn is Fn.EXP:
        v = torch.where(exact, 1.0, v)
    elif fn is Fn.RSQRT:
        exact = torch.zeros_like(exact)  # (powers of 4: decided exactly by the fallback)
    out = r.fast(v)
    eps = d.guard(xc)
    hard = r.fast(v * (1.0 - eps)) != r.fast(v * (1.0 + eps))
    hard = hard & ~exact & torch.isfinite(x)
    if fn is Fn.RSQRT:
        hard = hard & (x > 0)
    at_pinf, at_ninf = infs
    out = torch.where(x == math.inf, signed_zero(at_pinf, x), out)
    out = torch.where(x == -math.inf, signed_zero(at_ninf, x), out)
    return out, hard


def _cr_fast32(v: torch.Tensor, eps: torch.Tensor | float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cr_fast` for fp32 RNE output with overflow to inf (:attr:`Rq.is_f32`), from the
    float64 value ``v`` and its relative guard ``eps``, with a float32 result: the rounding
    is the float64 -> float32 conversion, and the hard cases are found as float32
    comparisons. Fewer operations than the general form (measured: exp-exact
    6.7 -> 4.6 ns per element compiled, 1 thread): the boundaries of RNE are the midpoints
    between float32 values, so an exact float32 value of the function (exp(0), 2^n) is never
    a hard case (no ``exact`` mask), and the clamped evaluation at +-inf converts to
    ``fn(+-inf)`` itself (exp, exp2: inf and +0; sigmoid, tanh, erf: the asymptotes; the
    activations: inf and -0 from the clamp's tiny negative value; rsqrt: +0 and NaN), so no
    replacement at +-inf; the exact references agree at every special input
    (tests/test_functions.py). NaN inputs and rsqrt's non-positive ones are never hard: their
    ``v`` is NaN or +-inf, whose two float32 values differ by NaN (the test is ``|hi - lo| >
    0``, false for NaN, instead of ``!=`` and a NaN mask combined with ``&``, which the
    compiled kernel converts between mask types lane by lane)."""
    hard = ((v * (1.0 + eps)).float() - (v * (1.0 - eps)).float()).abs() > 0
    return v.float(), hard


class _NegZero:
    """-0.0 as a compiled kernel's constant: a Python float captured by a kernel is traced
    as a symbolic float (torch.compile with dynamic shapes), whose sign of zero sympy drops
    (torch 2.13: silu(-inf) was +0 compiled, -0 eager; the kernels' first-use self-check
    caught it and ran silu-exact eagerly from then on)."""

    def __repr__(self) -> str:
        return "NEG_ZERO"


NEG_ZERO = _NegZero()


def signed_zero(c: float | _NegZero, x: torch.Tensor) -> torch.Tensor | float:
    """``c`` for ``torch.where`` at the elements where ``x`` is infinite; :data:`NEG_ZERO`
    is written ``1 / x`` there (-0.0 at -inf)."""
    return 1.0 / x if c is NEG_ZERO else c


@lru_cache(maxsize=1024)
def inf_values(fn: Fn, r: Rq) -> tuple[float | _NegZero, float | _NegZero]:
    """``fn(+inf)`` and ``fn(-inf)`` rounded by ``r``, as floats (-0.0 as :data:`NEG_ZERO`):
    computed outside the compiled kernels (a cached function is traced through, not looked
    up)."""
    def f(v: Value) -> float | _NegZero:
        v = float(v)
        return NEG_ZERO if v == 0 and math.copysign(1.0, v) < 0 else v

    return f(r.exact(_at_inf(fn, True))), f(r.exact(_at_inf(fn, False)))
