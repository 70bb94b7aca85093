"""Elementwise function units: frozen, parametric descriptions of exp, exp2, reciprocal,
reciprocal square root, sigmoid-type and activation units (docs/arithmetic.md section 7.1).

A :class:`FunctionUnit` computes ``y = Q_out(f(Q_in(x)))`` through a datapath described field
by field: the input, working and output formats and roundings, the range reduction, the core
approximation and subnormal flushing. The pipeline (section 7.1 has it with formulas):

1. **Input**: x is rounded to ``input_format`` (RNE; inputs below its smallest normal read as
   zero with ``flush_input``).
2. **Range reduction**, by function:

   * ``exp``: ``t = Q_w(x * c)`` with ``c = log2(e)`` rounded to ``log2e_format`` (default: the
     working format); ``exp2``: ``t = Q_w(x)``. The reduced argument is the fixed-point value
     ``T = t`` rounded to a multiple of ``2^-arg_frac_bits`` (ties to even), split as
     ``T = n + f``, ``n = floor(T)``, ``f`` in [0, 1); the core approximates ``2^f`` and the
     result is ``2^n * core(f)`` (an exponent add, exact), rounded once to the output;
   * ``rcp``: ``|x| = m * 2^e``, m in [1, 2); the core approximates ``1/m``; result
     ``sign(x) * core(m) * 2^-e``;
   * ``rsqrt``: ``x = u * 4^k``, u in [1, 4); the core approximates ``1/sqrt(u)``; result
     ``core(u) * 2^-k``;
   * bounded functions (sigmoid, tanh, erf, silu, the GELU forms): ``X`` = x rounded to a
     multiple of ``2^-arg_frac_bits``; on ``interval`` = [lo, hi) the core approximates f, and
     outside it the unit returns the asymptote (sigmoid 0 / 1, tanh and erf -1 / 1,
     activations 0 / x).

3. **Core** (``method``): ``exact`` (the function itself; with no range reduction for exp when
   ``log2e_format`` is None, so the unit is correctly rounded); ``table``: 2^``table_bits``
   uniform segments of the reduced domain, entries rounded to ``table_format``, either the
   value at the segment's midpoint (``interpolation="none"``) or linear interpolation between
   the values at its ends, ``y = Q_w(T0 + Q_w(T1 - T0) * r)`` (r in [0, 1) the position in the
   segment; with ``fma=False`` the product is rounded too); ``polynomial``: per segment (one
   segment when ``table_bits=0``) a polynomial of ``degree`` in r whose coefficients
   interpolate f at the Chebyshev nodes (near-minimax) and are rounded to ``coef_format``,
   evaluated by Horner's rule in the working format (one rounding per step with ``fma``, two
   without); ``newton`` (rcp, rsqrt): a seed table of 2^``table_bits`` midpoint values in
   ``table_format``, then ``newton_steps`` Newton-Raphson steps in the working format
   (rcp: ``e = Q(1 - u y)``, ``y = Q(y + y e)``; rsqrt: ``a = Q(y y)``, ``e = Q(1 - u a)``,
   ``y = Q(y + (y/2) e)``; without ``fma``: ``y = Q(y Q(2 - Q(u y)))`` and
   ``y = Q(y Q(3 - Q(u Q(y y))) / 2)``); ``bound`` (exp only): a *bound model, not a bit
   model* of CUDA's fast ``__expf``: the correctly rounded fp32 exp moved by a pseudo-random
   number of ulps, uniform in ``[-B, B]``, ``B = 2 + floor(1.173 |x|)`` (the CUDA Programming
   Guide's maximum error), drawn from a hash of the input's bits and ``bound_seed``.
4. **Output**: rounded once to ``output_format`` with ``output_rounding`` and
   ``output_overflow`` (None: inf where the format has it), flushed below its smallest normal
   with ``flush_output``.

Every unit has a slow exact reference (:meth:`FunctionUnit.reference`: Python fractions, mpmath
with a Ziv loop for the transcendental values, every rounding by
:func:`precisim.formats.reference.round_to_float_format`) and a fast torch path
(:meth:`FunctionUnit.__call__`: exact float64 arithmetic with round-to-odd sums, rounding
through the same decision table, one compiled kernel), bit-identical (tests/test_functions.py
checks every preset on every fp16 and bf16 input). Where the working rounding is float32's own
and every tabulated value is a float32 value (every fp32 table, polynomial and Newton preset),
the kernel runs in float32 arithmetic instead, each fused step one float32 FMA
(:func:`_f32_core`; the same bits as the float64 kernel: tests/test_functions_f32.py).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Any

import torch
from precisim.formats import FloatFormat, Rounding, kernels
from precisim.formats.quantize import check_tensor

from ..matmul.floatarith import fexp64, pow2_64
from .core import (
    ACTIVATIONS,
    Fn,
    Rq,
    Value,
    add_rne32,
    add_ro,
    check_format,
    cr_exact,
    cr_fast,
    fma32,
    fused_fma32_compiles,
    grid_exact,
    grid_magic,
    grid_rne,
    grid_rne32,
    inf_values,
    parse_enum,
    rq,
)

__all__ = ["FunctionUnit", "Interp", "Method"]


class Method(enum.Enum):
    """The core approximation of a :class:`FunctionUnit`."""

    EXACT = "exact"  #: the function itself (correctly rounded where nothing else rounds)
    TABLE = "table"  #: 2^n-entry table, midpoint values or linear interpolation
    POLYNOMIAL = "polynomial"  #: Horner evaluation of (piecewise) Chebyshev interpolants
    NEWTON = "newton"  #: seed table + Newton-Raphson steps (rcp, rsqrt)
    BOUND = "bound"  #: exp only: correctly rounded +- a hashed number of ulps (bound model)


class Interp(enum.Enum):
    """How a table is read."""

    NONE = "none"  #: the segment's midpoint value
    LINEAR = "linear"  #: linear interpolation between the segment's end values


#: the default approximation interval of the bounded functions
DEFAULT_INTERVAL = (-8.0, 8.0)
MAX_TABLE_BITS = 16
MAX_DEGREE = 8
MAX_NEWTON = 4
MAX_FRAC_BITS = 28


def _check_int(value: object, what: str, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{what}={value!r} is not valid: accepted {lo}..{hi}")


def _pow2(e: int) -> Fraction:
    return Fraction(1 << e) if e >= 0 else Fraction(1, 1 << -e)


def _is_pow2(v: Fraction) -> bool:
    return v > 0 and v.numerator & (v.numerator - 1) == 0 and \
        v.denominator & (v.denominator - 1) == 0


@dataclass(frozen=True)
class FunctionUnit:
    """An elementwise function unit (see the module docstring for the datapath).

    Formats are names or :class:`~precisim.formats.FloatFormat` objects (signed floats with
    subnormals whose values are float32 values), enums accept their values; every field is
    validated with an error naming the value and what is accepted.
    """

    name: str
    function: Fn | str
    method: Method | str = Method.EXACT
    input_format: FloatFormat | str = "fp32"
    working_format: FloatFormat | str = "fp32"
    working_rounding: Rounding | str = Rounding.NEAREST_EVEN
    output_format: FloatFormat | str = "fp32"
    output_rounding: Rounding | str = Rounding.NEAREST_EVEN
    output_overflow: str | None = None  #: None: inf where the output format has it, else saturate
    flush_input: bool = False  #: inputs below the input format's smallest normal read as 0
    flush_output: bool = False  #: results below the output format's smallest normal become 0
    log2e_format: FloatFormat | str | None = None  #: exp: log2(e) rounded to it (None: working)
    arg_frac_bits: int = 24  #: fraction bits of the fixed-point reduced argument
    table_bits: int = 0  #: 2^n table entries / polynomial pieces / seed entries
    table_format: FloatFormat | str | None = None  #: table entries and seeds (None: working)
    interpolation: Interp | str = Interp.LINEAR
    degree: int = 3
    coef_format: FloatFormat | str | None = None  #: polynomial coefficients (None: working)
    newton_steps: int = 0
    fma: bool = True  #: Horner / Newton steps fused (one rounding each)
    interval: tuple[float, float] | None = None  #: bounded functions: [lo, hi) (None: -8, 8)
    bound_seed: int = 0
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        s = object.__setattr__
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name={self.name!r} is not valid: accepted a non-empty string")
        fn = parse_enum(Fn, self.function, "function")
        s(self, "function", fn)
        m = parse_enum(Method, self.method, "method")
        s(self, "method", m)
        for what in ("input_format", "working_format", "output_format"):
            s(self, what, check_format(getattr(self, what), what))
        for what in ("log2e_format", "table_format", "coef_format"):
            if getattr(self, what) is not None:
                s(self, what, check_format(getattr(self, what), what))
        s(self, "working_rounding", parse_enum(Rounding, self.working_rounding,
                                               "working_rounding"))
        s(self, "output_rounding", parse_enum(Rounding, self.output_rounding,
                                              "output_rounding"))
        s(self, "interpolation", parse_enum(Interp, self.interpolation, "interpolation"))
        for what in ("flush_input", "flush_output", "fma"):
            if not isinstance(getattr(self, what), bool):
                raise ValueError(f"{what}={getattr(self, what)!r} is not valid: accepted a bool")
        _check_int(self.arg_frac_bits, "arg_frac_bits", 1, MAX_FRAC_BITS)
        _check_int(self.bound_seed, "bound_seed", 0, 2**31 - 1)
        if self.log2e_format is not None and fn is not Fn.EXP:
            raise ValueError(f"log2e_format is for the exp function, not {fn.value!r}")
        # the method, its parameters and the function
        if m is Method.TABLE:
            _check_int(self.table_bits, "table_bits", 1, MAX_TABLE_BITS)
        elif m is Method.NEWTON:
            if fn not in (Fn.RCP, Fn.RSQRT):
                raise ValueError(f"method='newton' is for rcp and rsqrt, not {fn.value!r}")
            _check_int(self.table_bits, "table_bits", 1, MAX_TABLE_BITS)
            _check_int(self.newton_steps, "newton_steps", 0, MAX_NEWTON)
        elif m is Method.POLYNOMIAL:
            _check_int(self.degree, "degree", 0, MAX_DEGREE)
            _check_int(self.table_bits, "table_bits", 1 if fn is Fn.RSQRT else 0, 12)
        elif m is Method.BOUND:
            if fn is not Fn.EXP:
                raise ValueError(f"method='bound' models CUDA's __expf: function 'exp' only, "
                                 f"not {fn.value!r}")
            if self.output_format.name != "fp32":
                raise ValueError(f"method='bound' counts ulps of fp32: output_format="
                                 f"{self.output_format.name!r} is not valid: accepted fp32")
        else:
            _check_int(self.table_bits, "table_bits", 0, 0)
        if m is Method.TABLE and fn is Fn.RSQRT and self.table_bits < 1:
            raise ValueError("rsqrt tables are indexed by the exponent's parity and "
                             "table_bits - 1 fraction bits: table_bits >= 1")
        # output range: every function takes the value 1 (or +-1) somewhere
        out = self.output_format
        if out.max < 1:
            raise ValueError(f"output_format={out.name!r} cannot hold the range of "
                             f"{fn.value}: its largest value is {float(out.max):g} < 1")
        if m not in (Method.EXACT, Method.BOUND) and self.working_format.max < 4:
            raise ValueError(f"working_format={self.working_format.name!r} is not valid for "
                             f"method {m.value!r}: it must hold 4 (its largest value is "
                             f"{float(self.working_format.max):g})")
        if self.working_format.man_bits > 23 or (
                self.table_format is not None and self.table_format.man_bits > 23):
            raise ValueError("working and table formats have at most 24 significant bits")
        # the interval of the bounded functions
        if self.interval is not None:
            if not fn.bounded:
                raise ValueError(f"interval is for the bounded functions (sigmoid, tanh, erf, "
                                 f"activations), not {fn.value!r}")
            iv = self.interval
            if not isinstance(iv, tuple | list) or len(iv) != 2:
                raise ValueError(f"interval={iv!r} is not valid: accepted (lo, hi)")
            s(self, "interval", (float(iv[0]), float(iv[1])))
        if fn.bounded and m not in (Method.EXACT,):
            lo, hi = (Fraction(v) for v in self.bounds)
            width = hi - lo
            if not (-4096 <= lo < hi <= 4096) or not _is_pow2(width):
                raise ValueError(f"interval={self.bounds!r} is not valid: accepted lo < hi in "
                                 "-4096..4096 with hi - lo a power of two")
            w = width / (1 << self.table_bits)
            if w < _pow2(-self.arg_frac_bits) or (lo / w).denominator != 1:
                raise ValueError(f"interval={self.bounds!r} with table_bits={self.table_bits} "
                                 f"is not valid: its segments (width {float(w):g}) must be "
                                 f"multiples of 2^-arg_frac_bits and lo a multiple of them")
        self.rounders  # noqa: B018 - validates the overflow policy against the output format

    # -- derived -------------------------------------------------------------------------
    @property
    def bounds(self) -> tuple[float, float]:
        """The approximation interval of a bounded function."""
        return self.interval if self.interval is not None else DEFAULT_INTERVAL

    @property
    def rounders(self) -> dict[str, Rq]:
        return _rounders(self)

    def with_(self, **changes: Any) -> FunctionUnit:
        return dataclasses.replace(self, **changes)

    # -- description ---------------------------------------------------------------------
    def describe(self) -> str:
        fn, m = self.function, self.method
        core = m.value
        if m is Method.TABLE:
            core = f"table 2^{self.table_bits}" + (
                " + linear interp." if self.interpolation is Interp.LINEAR else " (midpoints)")
            if self.table_format is not None:
                core += f" ({self.table_format.name})"
        elif m is Method.POLYNOMIAL:
            core = f"poly deg {self.degree}" + (f" x 2^{self.table_bits} pieces"
                                                if self.table_bits else "")
            if self.coef_format is not None:
                core += f" (coef {self.coef_format.name})"
        elif m is Method.NEWTON:
            core = f"seed 2^{self.table_bits} + {self.newton_steps} Newton"
        elif m is Method.BOUND:
            core = "bound model +-(2 + floor(1.173|x|)) ulp"
        elif m is Method.EXACT and self.log2e_format is None:
            core = "correctly rounded"
        parts = [f"{fn.value}: {core}"]
        if fn is Fn.EXP and (self.log2e_format is not None or m not in (Method.EXACT,
                                                                       Method.BOUND)):
            parts.append(f"via exp2, log2e {self.rounders['c'].fmt.name}")
        r = self.rounders
        parts.append(f"in {r['in'].describe()}")
        if m not in (Method.EXACT, Method.BOUND) or self.log2e_format is not None:
            parts.append(f"work {r['w'].describe()}" + ("" if self.fma or m is Method.TABLE
                                                        else " no-fma"))
        parts.append(f"out {r['out'].describe()}")
        if self.flush_input:
            parts.append("daz")
        if fn.bounded and m is not Method.EXACT:
            parts.append(f"on [{self.bounds[0]:g}, {self.bounds[1]:g})")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Every field that differs from its default (formats and enums by name)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "description" or v == _default(f):
                continue
            if isinstance(v, FloatFormat):
                v = v.name
            elif isinstance(v, enum.Enum):
                v = v.value
            elif isinstance(v, tuple):
                v = list(v)
            if f.name in ("input_format", "working_format", "output_format") and v == "fp32":
                continue
            out[f.name] = v
        return out

    # -- evaluation ----------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The unit applied to every element of ``x`` (float32, bfloat16 or float16); a
        float32 tensor of output-format values, bit-identical to :meth:`reference`."""
        return self._apply(x)[0]

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, xq)``: the outputs and the inputs rounded to the input format (both float32,
        whose values they are), for telemetry."""
        y, xq = self._apply(x)
        if xq is None:
            xf = x.detach().float()
            if self.flush_input:
                xf = torch.where(xf.abs() < float(self.input_format.min_normal), xf * 0.0, xf)
            xq = self.rounders["in"].fast32(xf.double())
        return y, xq

    def _apply(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(y, xq)``; xq is None (:meth:`evaluate` rounds the inputs itself)."""
        x = check_tensor(x)
        flat = x.detach().reshape(-1).float()
        dt = _LUT_DTYPES.get(self.input_format.name)
        if dt is not None and flat.numel() >= _LUT_MIN_NUMEL:
            lut = _code_table(self).to(flat.device)
            y = kernels.run(_lut_kernel(self, dt), ("function-unit-lut", self), flat.numel(),
                            flat, lut)
            return y.reshape(x.shape), None
        return self._direct(x)

    def _direct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`_apply` without the table of 16-bit codes: the unit's kernel. A correctly
        rounded core marks its hard cases NaN in the one pass that writes the results (and
        counts them); only where the count is not zero are the NaN results whose input is not
        NaN (the hard cases, and results that are NaN anyway) computed again by the kernel
        with the mask (not when there are as many of them as marks: then all are hard
        cases), and the hard ones by the exact reference (for the bound model, its
        displaced value: the kernel displaces every other result in the same pass)."""
        flat = x.detach().reshape(-1).float()
        tabs = _fast_tables(self, flat.device)
        n = flat.numel()
        idx = None
        y, count = kernels.run(_kernel(self, mark=True), ("function-unit-mark", self), n,
                               flat, *tabs)
        if float(count) > 0:
            cand = _nan_indices(y)  # (one pass over the batch)
            cand = cand[~torch.isnan(flat[cand])]
            if cand.numel() == int(count):  # (no NaN result besides the marks: all hard)
                idx = cand
            else:
                yc, hc = kernels.run(_kernel(self), ("function-unit", self), cand.numel(),
                                     flat[cand], *tabs)
                y[cand] = yc
                idx = cand[hc]
        if idx is not None and idx.numel():
            vals = [self.reference(v) for v in flat[idx].tolist()]
            y[idx] = torch.tensor([_as_float(v) for v in vals], dtype=torch.float64,
                                  device=y.device).float()
        return y.reshape(x.shape), None

    def reference(self, x: Value | float) -> Value:
        """The exact result for one input value (a Python float or an exact Fraction):
        a Fraction, or a float for -0.0, nan and +-inf."""
        return _reference(self, x)


#: the NaN scan of :meth:`FunctionUnit._direct` counts the NaNs of each chunk of this many
#: elements in one compiled read-only pass and scans only the chunks with one (small masks
#: that the allocator reuses warm): 4 ms on 2^24 float32 results with a few NaNs, one thread,
#: against 14 ms for scanning every chunk and 26 ms for one fresh full-size bool mask
_SCAN_CHUNK = 1 << 16


def _nan_rows(y2: torch.Tensor) -> torch.Tensor:
    """The number of NaN elements in each row of ``y2`` (a compiled read-only pass)."""
    return torch.where(y2 != y2, 1.0, 0.0).sum(-1)


def _nan_indices(y: torch.Tensor) -> torch.Tensor:
    """The indices of the NaN elements of the flat tensor ``y``, ascending (int64), as
    ``torch.isnan(y).nonzero().reshape(-1)``: a compiled pass counts the NaNs of each
    :data:`_SCAN_CHUNK`-element chunk, and only the chunks with one are scanned."""
    n = y.numel()
    c = _SCAN_CHUNK
    if n <= c:
        return torch.isnan(y).nonzero().reshape(-1)
    full = n - n % c
    rows = kernels.run(_nan_rows, ("function-unit-nan-rows",), full, y[:full].view(-1, c))
    parts = [torch.isnan(y[r * c:(r + 1) * c]).nonzero().reshape(-1) + r * c
             for r in rows.nonzero().reshape(-1).tolist()]
    if full < n:
        parts.append(torch.isnan(y[full:]).nonzero().reshape(-1) + full)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=y.device)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        d = f.default
        return d.value if isinstance(d, enum.Enum) else d
    return None


def _as_float(v: Value) -> float:
    return float(v)


# ---------------------------------------------------------------------------------------------
# rounders, constants and tables (computed once per unit)

@lru_cache(maxsize=512)
def _rounders(u: FunctionUnit) -> dict[str, Rq]:
    w = u.working_format
    return {
        "in": rq(u.input_format, what="input_format"),
        "w": rq(w, u.working_rounding, what="working_format"),
        "out": rq(u.output_format, u.output_rounding, u.output_overflow, u.flush_output,
                  what="output_format"),
        "t": rq(u.table_format or w, what="table_format"),
        "k": rq(u.coef_format or w, what="coef_format"),
        "c": rq(u.log2e_format or w, what="log2e_format"),
    }


def _log2e_rounded(r: Rq) -> Fraction:
    import mpmath

    with mpmath.workprec(200):
        v = mpmath.log(mpmath.e, 2)  # log2(e)
        man, exp = int(v.man), int(v.exp)
    vf = Fraction(man, 1 << -exp)
    lo, hi = r.exact(vf - vf / 2**180), r.exact(vf + vf / 2**180)
    assert lo == hi
    return Fraction(lo)


def _core_fn(u: FunctionUnit) -> Fn:
    return Fn.EXP2 if u.function in (Fn.EXP, Fn.EXP2) else u.function


@dataclass(frozen=True)
class _Tables:
    """Exact tables of a unit: per segment its left end and width, the end values T0 / T1,
    the midpoint value Tm, and the polynomial coefficients C (lowest degree first)."""

    left: tuple[Fraction, ...]
    width: tuple[Fraction, ...]
    t0: tuple[Fraction, ...]
    t1: tuple[Fraction, ...]
    tm: tuple[Fraction, ...]
    coef: tuple[tuple[Fraction, ...], ...]
    c: Fraction  # log2(e) rounded (exp), else 1


def _segments(u: FunctionUnit) -> tuple[list[Fraction], list[Fraction]]:
    fn, n = u.function, u.table_bits
    N = 1 << n
    if fn in (Fn.EXP, Fn.EXP2):
        return [Fraction(i, N) for i in range(N)], [Fraction(1, N)] * N
    if fn is Fn.RCP:
        return [1 + Fraction(i, N) for i in range(N)], [Fraction(1, N)] * N
    if fn is Fn.RSQRT:
        half = N // 2
        left = [1 + Fraction(i, half) for i in range(half)] + \
            [2 + Fraction(2 * i, half) for i in range(half)]
        return left, [Fraction(1, half)] * half + [Fraction(2, half)] * half
    lo, hi = (Fraction(v) for v in u.bounds)
    w = (hi - lo) / N
    return [lo + i * w for i in range(N)], [w] * N


def _mp_value(fn: Fn, x: Any) -> Any:
    import mpmath

    from .core import FN_DEFS

    return FN_DEFS[fn].mp(mpmath.mp, x)


@lru_cache(maxsize=256)
def _tables(u: FunctionUnit) -> _Tables:
    import mpmath

    r = u.rounders
    cfn = _core_fn(u)
    c = _log2e_rounded(r["c"]) if u.function is Fn.EXP else Fraction(1)
    if u.method in (Method.EXACT, Method.BOUND):
        return _Tables((), (), (), (), (), (), c)
    left, width = _segments(u)
    t0 = tuple(cr_exact(cfn, a, r["t"]) for a in left)
    t1 = tuple(cr_exact(cfn, a + w, r["t"]) for a, w in zip(left, width))
    tm = tuple(cr_exact(cfn, a + w / 2, r["t"]) for a, w in zip(left, width))
    coef: list[tuple[Fraction, ...]] = []
    if u.method is Method.POLYNOMIAL:
        d = u.degree
        with mpmath.workprec(256):
            nodes = [(1 - mpmath.cos((2 * j + 1) * mpmath.pi / (2 * (d + 1)))) / 2
                     for j in range(d + 1)]
            for a, w in zip(left, width):
                A = mpmath.matrix([[t**k for k in range(d + 1)] for t in nodes])
                b = mpmath.matrix([_mp_value(cfn, mpmath.mpf(a.numerator) / a.denominator
                                             + mpmath.mpf(w.numerator) / w.denominator * t)
                                   for t in nodes])
                sol = mpmath.lu_solve(A, b)
                cs = []
                for k in range(d + 1):
                    v = sol[k]
                    man, exp = (int(v.man) * (-1 if v < 0 else 1), int(v.exp)) if v != 0 \
                        else (0, 0)
                    vf = Fraction(man << exp) if exp >= 0 else Fraction(man, 1 << -exp)
                    cs.append(Fraction(r["k"].exact(vf)))
                coef.append(tuple(cs))
    return _Tables(tuple(left), tuple(width), tuple(map(Fraction, t0)), tuple(map(Fraction, t1)),
                   tuple(map(Fraction, tm)), tuple(coef), c)


def _fast_tables(u: FunctionUnit, device: torch.device) -> tuple[torch.Tensor, ...]:
    tabs = _fast_tables_cpu(u)
    if _f32_core(u):
        tabs = tuple(t.float() for t in tabs)
        if u.method is Method.TABLE and u.interpolation is Interp.LINEAR:
            # T0 and the slope in one int64 entry: one gather instead of two (a compiled
            # gather loads lane by lane)
            tabs += ((tabs[0].view(torch.int32).long() & 0xFFFFFFFF)
                     | (tabs[3].view(torch.int32).long() << 32),)
    return tuple(t.to(device) for t in tabs)


@lru_cache(maxsize=256)
def _fast_tables_cpu(u: FunctionUnit) -> tuple[torch.Tensor, ...]:
    t = _tables(u)
    if u.method in (Method.EXACT, Method.BOUND):
        return ()
    d = torch.float64
    out = [torch.tensor([float(v) for v in t.t0], dtype=d),
           torch.tensor([float(v) for v in t.t1], dtype=d),
           torch.tensor([float(v) for v in t.tm], dtype=d)]
    if u.method is Method.TABLE:  # the slopes W(T1 - T0), as the datapath rounds them
        w = u.rounders["w"]
        out.append(torch.tensor([float(w.exact(b - a)) for a, b in zip(t.t0, t.t1)],
                                dtype=d))
    if u.method is Method.POLYNOMIAL:
        # one table per coefficient: a gather from each (a gather of whole rows made the
        # compiled kernel write an (n, degree + 1) float64 tensor)
        out += [torch.tensor([float(cs[k]) for cs in t.coef], dtype=d)
                for k in range(u.degree + 1)]
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# the exact reference

def _clamp_limits(u: FunctionUnit) -> tuple[int, int]:
    """Clamp of the exp argument t (output-invariant: below, every result is under a
    quarter of the output's smallest step; above, beyond its range)."""
    o = u.output_format
    return o.emin - o.man_bits - 3, o.emax + 3


def _asymptote(fn: Fn, x: Value, high: bool) -> Value:
    if fn is Fn.SIGMOID:
        return Fraction(1) if high else Fraction(0)
    if fn in (Fn.TANH, Fn.ERF):
        return Fraction(1) if high else Fraction(-1)
    return x if high else Fraction(0)  # activations: x, or 0


def _reference(u: FunctionUnit, x: Value | float) -> Value:
    r = u.rounders
    fn, m = u.function, u.method
    if isinstance(x, float) and math.isfinite(x) and not (x == 0 and math.copysign(1, x) < 0):
        x = Fraction(x)
    if isinstance(x, float) and math.isnan(x):
        return math.nan
    if u.flush_input and isinstance(x, Fraction) and 0 < abs(x) < u.input_format.min_normal:
        x = -0.0 if x < 0 else Fraction(0)
    x = r["in"].exact(x)
    if isinstance(x, float) and math.isnan(x):
        return math.nan
    if m is Method.EXACT and not (fn is Fn.EXP and u.log2e_format is not None):
        return cr_exact(fn, x, r["out"])
    if m is Method.BOUND:
        y = cr_exact(Fn.EXP, x, r["out"])
        return _displace_exact(y, x, u.bound_seed)
    zero = x == 0  # (Fraction 0 or -0.0)
    xv = Fraction(0) if zero else x
    if fn in (Fn.EXP, Fn.EXP2):
        if isinstance(x, float) and math.isinf(x):
            return r["out"].exact(math.inf if x > 0 else Fraction(0))
        t = r["w"].exact(xv * _tables(u).c) if fn is Fn.EXP else r["w"].exact(xv)
        t = Fraction(0) if t == 0 else t
        tmin, tmax = _clamp_limits(u)
        t = min(max(t, Fraction(tmin)), Fraction(tmax))
        if m is Method.EXACT:
            return cr_exact(Fn.EXP2, t, r["out"])
        T = grid_exact(t, u.arg_frac_bits)
        n = math.floor(T)
        y = _core_exact(u, T - n)
        return r["out"].exact(y * _pow2(n))
    if fn in (Fn.RCP, Fn.RSQRT):
        neg = isinstance(x, float) and math.copysign(1, x) < 0 or (not zero and x < 0)
        if fn is Fn.RSQRT and neg and not zero:
            return math.nan
        if zero:
            return r["out"].exact(-math.inf if neg else math.inf)
        if isinstance(x, float):  # +-inf
            return r["out"].exact(-0.0 if x < 0 else 0.0)
        ax = abs(x)
        e = ax.numerator.bit_length() - ax.denominator.bit_length()
        if _pow2(e) > ax:
            e -= 1
        if fn is Fn.RCP:
            y = _core_exact(u, ax / _pow2(e))
            res = y / _pow2(e)
            return r["out"].exact(-res if neg else res)
        k = e // 2
        y = _core_exact(u, ax / _pow2(2 * k))
        return r["out"].exact(y / _pow2(k))
    # bounded functions
    lo, hi = (Fraction(v) for v in u.bounds)
    w = (hi - lo) / (1 << u.table_bits)
    if isinstance(x, float) and math.isinf(x):
        xg = hi if x > 0 else lo - w
    else:
        xg = grid_exact(min(max(xv, lo - w), hi), u.arg_frac_bits)
    if xg < lo or xg >= hi:
        v = _asymptote(fn, x, xg >= hi)
        return r["out"].exact(v)
    return r["out"].exact(_core_exact(u, xg))


def _locate(u: FunctionUnit, v: Fraction) -> tuple[int, Fraction]:
    """(segment index, position r in [0, 1)) of the reduced argument v."""
    t = _tables(u)
    fn, N = u.function, 1 << u.table_bits
    if fn is Fn.RSQRT:
        half = N // 2
        p = int(v >= 2)
        s = (v / (1 + p) - 1) * half
        j = math.floor(s)
        return p * half + j, s - j
    s = (v - t.left[0]) / t.width[0]
    i = math.floor(s)
    return i, s - i


def _core_exact(u: FunctionUnit, v: Fraction) -> Fraction:
    r = u.rounders
    W = r["w"].exact
    t = _tables(u)
    m = u.method
    i, pos = _locate(u, v)

    def Wf(z: Value) -> Fraction:
        return Fraction(W(z))

    if m is Method.TABLE:
        if u.interpolation is Interp.NONE:
            return t.tm[i]
        d = Wf(t.t1[i] - t.t0[i])
        return Wf(t.t0[i] + d * pos) if u.fma else Wf(t.t0[i] + Wf(d * pos))
    if m is Method.POLYNOMIAL:
        cs = t.coef[i]
        y = cs[-1]
        if len(cs) == 1:
            return Wf(y)
        for ck in reversed(cs[:-1]):
            y = Wf(y * pos + ck) if u.fma else Wf(Wf(y * pos) + ck)
        return y
    # Newton-Raphson from the seed
    y = t.tm[i]
    for _ in range(u.newton_steps):
        if u.function is Fn.RCP:
            if u.fma:
                e = Wf(1 - v * y)
                y = Wf(y + y * e)
            else:
                y = Wf(y * Wf(2 - Wf(v * y)))
        else:
            a = Wf(y * y)
            if u.fma:
                e = Wf(1 - v * a)
                y = Wf(y + y / 2 * e)
            else:
                y = Wf(y * Wf(3 - Wf(v * a)) / 2)
    return y


# ---------------------------------------------------------------------------------------------
# the fast path (one compiled kernel per unit)

@lru_cache(maxsize=256)
def _f32_core(u: FunctionUnit) -> bool:
    """Whether the unit's kernel runs in float32 arithmetic (docs/arithmetic.md section 7.1):
    a table, polynomial or Newton core whose working rounding is float32's own (fp32, RNE,
    overflow to inf, no flush) and whose tabulated values (and exp's constant log2(e)) are
    float32 values. Every value of the range reduction and the core is then a float32 value:
    the input is one; the reduced argument T is t rounded to a coarser grid, so it has fewer
    significant bits than t; the position in a segment is the fraction of a float32 value;
    every product of two float32 values is exact in float64, so each working rounding is one
    float32 operation (a sum of a product: :func:`fma32`). The same bits as the float64
    kernel. With ``fma``, only where the compiled FMA rounds once
    (:func:`fused_fma32_compiles`; else the float64 kernel is the faster one). Also the
    correctly rounded rcp with an fp32 output rounding (with or without flush): IEEE 754's
    float32 division of float32 values is correctly rounded, subnormals, overflow and signed
    zeros included."""
    if u.method is Method.EXACT:
        out = u.rounders["out"]
        return u.function is Fn.RCP and (out.is_f32 or out.is_f32_ftz)
    if u.method not in (Method.TABLE, Method.POLYNOMIAL, Method.NEWTON):
        return False
    if not u.rounders["w"].is_f32 or (u.fma and not fused_fma32_compiles()):
        return False
    c = float(_tables(u).c)
    if torch.tensor(c, dtype=torch.float32).item() != c:
        return False
    return all(torch.equal(t.float().double(), t) for t in _fast_tables_cpu(u))


@lru_cache(maxsize=512)
def _kernel(u: FunctionUnit, mark: bool = False,  # noqa: ANN202 - a closure over constants
            f32: bool | None = None):
    """The unit's kernel on flat float32 input: ``(y, hard)`` (the bound model's y displaced,
    :func:`_displace32`); with ``mark``, ``(y, count)`` instead, with every hard case's result NaN
    and ``count`` the number of hard cases (a float32 sum: compiled, it costs far less than
    writing the bool mask; the NaN results are found again by :meth:`FunctionUnit._direct`
    without a mask pass over the batch)."""
    r = u.rounders
    fn, m = u.function, u.method
    W = r["w"].fast
    c = float(_tables(u).c)
    tmin, tmax = (float(v) for v in _clamp_limits(u))
    F = grid_magic(u.arg_frac_bits)
    N = 1 << u.table_bits
    lo, hi = u.bounds
    w = (hi - lo) / N
    lo_w = lo / w  # (an integer: the unit checks it)
    m32 = 2.0 ** (23 - u.arg_frac_bits)  # (grid_rne32's constant)
    min_in = float(u.input_format.min_normal)
    seed_bits = _seed_bits(u.bound_seed)
    # constants from exact arithmetic, computed before tracing (Fraction code in a compiled
    # kernel would be traced into symbolic integers)
    inf_out = float(r["out"].exact(math.inf))
    infs = {f: inf_values(f, r["out"]) for f in (Fn.EXP, Fn.EXP2, fn)}

    Nf = float(N)  # (floats: a captured int is a symbolic size when compiled)
    same_in = r["in"].is_f32 and not u.flush_input  # (the kernel's x is its rounded input)
    f32 = _f32_core(u) if f32 is None else f32
    # a correctly rounded core (or the bound model) has hard cases; the other cores, and the
    # float32 kernel (whose correctly rounded rcp is a float32 division), none
    exact_core = m in (Method.BOUND, Method.EXACT) and not f32

    # Compiled, isnan and signbit are evaluated lane by lane (inductor, torch 2.13, CPU):
    # comparisons replace them. Measured per 2^24 elements, one thread, compiled, on top of a
    # plain float32 -> float64 -> float32 pass (31-38 ms): W(add_ro) +22 ms (its int64 view
    # and combined masks), add_rne32 (fp32 working rounding) +10 ms, of which its overflow
    # edge is 4-5 ms (an earlier float-only midpoint test that combined masks with & took
    # +34 ms: each & of comparisons converts mask types lane by lane); a 64-entry table
    # gather +10-12 ms (int32 or int64 index alike; scalar loads); 2^n from its int64 bits
    # (pow2_64) +1.5 ms against +13 ms for torch.exp2 at integers. A one-entry table is
    # broadcast, not gathered.
    def addw(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """W(a + b) of exact values (round-to-odd sum, then the working rounding; float32's
        own rounding by :func:`add_rne32`, the same bits with float operations only)."""
        return add_rne32(a, b) if r["w"].is_f32 else W(add_ro(a, b))

    def take(tab: torch.Tensor, i: torch.Tensor | None) -> torch.Tensor:
        # (the index is in range by construction: no bounds check in the compiled gather)
        return tab if i is None else torch.ops.aten._unsafe_index(tab, [i])

    def is_neg(v: torch.Tensor) -> torch.Tensor:  # signbit (-0 included; NaN: either)
        # (copysign, vectorised; measured 3.3 ms per 2^24 elements against 106 ms for the
        # former (v < 0) | ((v == 0) & (1 / v < 0)), compiled, one thread)
        return torch.copysign(torch.ones_like(v), v) < 0

    def locate(v: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(int32 segment index, None for a one-entry table; position in the segment)."""
        if fn is Fn.RSQRT:
            half = float(N // 2)
            p = v >= 2
            s = (torch.where(p, v * 0.5, v) - 1.0) * half
            j = s.floor()
            return (j + torch.where(p, half, 0.0)).int(), s - j
        if fn.bounded:  # (v / w and its floor are exact in float32 too: w is a power of two)
            q = v * (1.0 / w)
            k = q.floor()
            j = (k - lo_w).clamp(0.0, Nf - 1.0)  # (clamped outside [lo, hi): asymptote there)
            return (None if N == 1 else j.int()), q - k
        s = v * Nf if fn in (Fn.EXP, Fn.EXP2) else (v - 1.0) * Nf
        j = s.floor().clamp(0.0, Nf - 1.0)
        return (None if N == 1 else j.int()), s - j

    if f32:  # the core's values are float32 values: float32 arithmetic (module docstring)
        fused = u.fma and fused_fma32_compiles()

        def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return fma32(a, b, c, fused)

        def mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a * b

        def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b
    else:
        def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return addw(a * b, c)

        def mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return W(a * b)

        add = addw

    def core(v: torch.Tensor, tabs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The core at v: float32 values and tables (_fast_tables) in kernel_f32, float64 in
        kernel."""
        i, pos = locate(v)
        if m is Method.TABLE:
            if u.interpolation is Interp.NONE:
                return take(tabs[2], i)
            if f32:  # (T0 and d packed in one int64 entry, _fast_tables)
                g = take(tabs[4], i)
                t0, d = g.int().view(torch.float32), (g >> 32).int().view(torch.float32)
            else:
                t0, d = take(tabs[0], i), take(tabs[3], i)  # d = W(T1 - T0), tabulated
            return fma(d, pos, t0) if u.fma else add(t0, mul(d, pos))
        if m is Method.POLYNOMIAL:
            y = take(tabs[3 + u.degree], i)
            if u.degree == 0:
                return y if f32 else W(y)
            for k in range(u.degree - 1, -1, -1):
                ck = take(tabs[3 + k], i)
                y = fma(y, pos, ck) if u.fma else add(mul(y, pos), ck)
            return y
        y = take(tabs[2], i)
        for _ in range(u.newton_steps):
            if fn is Fn.RCP:
                if u.fma:
                    y = fma(y, fma(-v, y, torch.ones_like(y)), y)
                else:
                    y = mul(y, add(torch.full_like(y, 2.0), -mul(v, y)))
            else:
                # (y / 2 is exact: y >= 2^-3 at every step, docs/arithmetic.md section 7.1)
                a = mul(y, y)
                if u.fma:
                    y = fma(y * 0.5, fma(-v, a, torch.ones_like(y)), y)
                else:
                    y = mul(y * 0.5, add(torch.full_like(y, 3.0), -mul(v, a)))
        return y

    def asymptote(xg: torch.Tensor, xq: torch.Tensor, high: bool) -> torch.Tensor:
        """A bounded function's value outside [lo, hi) (below: 0, or -1 for tanh and erf;
        above: 1, or x for the activations)."""
        if fn in (Fn.TANH, Fn.ERF):
            return torch.ones_like(xg) if high else -torch.ones_like(xg)
        if not high:
            return torch.zeros_like(xg)
        return torch.ones_like(xg) if fn is Fn.SIGMOID else xq

    def rcp_specials(y: torch.Tensor, xq: torch.Tensor, ax: torch.Tensor, neg: torch.Tensor
                     ) -> torch.Tensor:
        """rcp / rsqrt results at zero, infinity and (rsqrt) negative inputs."""
        y = torch.where(ax == 0, torch.where(neg, -inf_out, inf_out), y)
        if fn is Fn.RCP:
            return torch.where(ax == math.inf, torch.copysign(torch.zeros_like(xq), xq), y)
        y = torch.where(xq == math.inf, 0.0, y)
        return torch.where(xq < 0, math.nan, y)  # (-0 < 0 is false: rsqrt(-0) = -inf)

    def flushed(x: torch.Tensor) -> torch.Tensor:
        """x with inputs below the input format's smallest normal read as zero
        (``flush_input``)."""
        return torch.where(x.abs() < min_in, x * 0.0, x) if u.flush_input else x

    def exp_specials(y: torch.Tensor, xq: torch.Tensor, nan: torch.Tensor) -> torch.Tensor:
        """exp / exp2 results at +-inf and NaN inputs."""
        y = torch.where(xq == math.inf, inf_out, y)
        y = torch.where(xq == -math.inf, 0.0, y)
        return torch.where(nan, math.nan, y)

    def bounded(y: torch.Tensor, xg: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        """A bounded function's core value y at the grid value xg, the asymptote outside
        [lo, hi) (its segment index is clamped in locate, so no mask keeps xg inside)."""
        return torch.where(xg < lo, asymptote(xg, xq, False),
                           torch.where(xg >= hi, asymptote(xg, xq, True), y))

    def kernel(x: torch.Tensor, *tabs: torch.Tensor):  # noqa: ANN202
        x = flushed(x)
        # (the kernel's x holds float32 values: float32's own input rounding keeps them)
        xq = x if r["in"].is_f32 else r["in"].fast(x)
        nan = xq != xq
        no = torch.zeros_like(nan)
        if m is Method.BOUND or (m is Method.EXACT and not (fn is Fn.EXP
                                                            and u.log2e_format is not None)):
            f = Fn.EXP if m is Method.BOUND else fn
            y, hard = cr_fast(f, xq, r["out"], infs[f])
            return y, xq, hard
        if fn in (Fn.EXP, Fn.EXP2):
            t = W(xq * c) if fn is Fn.EXP else W(xq)
            t = torch.where(t != t, 0.0, t).clamp(tmin, tmax)
            if m is Method.EXACT:
                y, hard = cr_fast(Fn.EXP2, t, r["out"], infs[Fn.EXP2])
            else:
                T = grid_rne(t, F)  # (|t| <= 2^8)
                n = T.floor()
                y = r["out"].fast(core(T - n, tabs) * pow2_64(n))
                hard = no
            return exp_specials(y, xq, nan), xq, hard
        if fn in (Fn.RCP, Fn.RSQRT):
            ax = xq.abs()
            # (nested where, not (ax > 0) & (ax < inf): compiled, & converts mask types)
            axs = torch.where(ax > 0, torch.where(ax < math.inf, ax, 1.0), 1.0)
            neg = is_neg(xq)
            e = fexp64(axs)
            if fn is Fn.RCP:
                y = core(axs * pow2_64(-e), tabs) * pow2_64(-e)
                y = torch.where(neg, -y, y)
            else:
                k = e >> 1  # floor(e / 2)
                y = core(axs * pow2_64(-2 * k), tabs) * pow2_64(-k)
            y = rcp_specials(r["out"].fast(y), xq, ax, neg)
            return torch.where(nan, math.nan, y), xq, no
        # bounded functions
        xg = grid_rne(torch.where(nan, 0.0, xq).clamp(lo - w, hi), F)  # (|.| <= 2^13)
        y = bounded(core(xg, tabs), xg, xq)
        return torch.where(nan, math.nan, r["out"].fast(y)), xq, no

    def kernel_f32(x: torch.Tensor, tabs: tuple[torch.Tensor, ...]):  # noqa: ANN202
        """:func:`kernel` in float32 arithmetic (:func:`_f32_core`): every value of the
        range reduction and the core is a float32 value and every working rounding one
        float32 operation; float64 only for the exact scaling by a power of two before the
        output rounding. The same bits as the float64 kernel (tests/test_functions_f32.py)."""
        x = flushed(x)
        xq = x if r["in"].is_f32 else r["in"].fast(x.double()).float()
        if m is Method.EXACT:  # rcp, correctly rounded: the float32 division (_f32_core)
            y = 1.0 / xq
            return (r["out"].flush32(y) if r["out"].is_f32_ftz else y), xq
        nan = xq != xq
        if fn in (Fn.EXP, Fn.EXP2):
            t = xq * c if fn is Fn.EXP else xq  # (W(x c): c is a float32 value)
            T = grid_rne32(torch.where(nan, 0.0, t).clamp(tmin, tmax), m32)
            n = T.floor()
            y = r["out"].fast32(core(T - n, tabs).double() * pow2_64(n))
            return exp_specials(y, xq, nan), xq
        if fn in (Fn.RCP, Fn.RSQRT):
            ax = xq.abs()
            axs = torch.where(ax > 0, torch.where(ax < math.inf, ax, 1.0), 1.0)
            sub = axs < 2.0**-126  # (float32 subnormals, scaled to normals exactly)
            b = torch.where(sub, axs * 2.0**24, axs).view(torch.int32)
            e = ((b >> 23) & 0xFF) - torch.where(sub, 127 + 24, 127)  # floor(log2 |x|)
            m1 = ((b & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # |x| / 2^e in [1, 2)
            neg = is_neg(xq)
            if fn is Fn.RCP:
                y = core(m1, tabs).double() * pow2_64(-e)
                y = torch.where(neg, -y, y)
            else:
                k = e >> 1  # floor(e / 2); |x| / 4^k = m1 or 2 m1
                y = core(torch.where(e - 2 * k == 1, m1 * 2.0, m1), tabs).double() * \
                    pow2_64(-k)
            y = rcp_specials(r["out"].fast32(y), xq, ax, neg)
            return torch.where(nan, math.nan, y), xq
        xg = grid_rne32(torch.where(nan, 0.0, xq).clamp(lo - w, hi), m32)
        y = bounded(core(xg, tabs), xg, xq)
        y = y if r["out"].is_f32 else r["out"].fast32(y.double())
        return torch.where(nan, math.nan, y), xq

    def kernel32(x: torch.Tensor, *tabs: torch.Tensor):  # noqa: ANN202
        if f32:
            y, xq = kernel_f32(x, tabs)
            hard = torch.zeros_like(xq, dtype=torch.bool)
        else:
            # float32 in and out (every value involved is a float32 value): compiled, the
            # float64 arithmetic stays in registers, no full-size float64 tensor is written
            y, xq, hard = kernel(x.double(), *tabs)
            y = y.float()
        if m is Method.BOUND:  # (the displacement reads the rounded inputs: x itself when
            # its rounding and flush change nothing, which saves two conversions)
            y = _displace32(y, x if same_in else xq.float(), seed_bits)
        if mark:
            if not exact_core:  # (no hard cases: no counting pass over the batch)
                return y, torch.zeros((), dtype=torch.float32, device=y.device)
            count = torch.where(hard, 1.0, 0.0).float().sum()
            return torch.where(hard, math.nan, y).float(), count
        return y, hard

    return kernel32


# ---------------------------------------------------------------------------------------------
# 16-bit inputs: the whole unit as a table of its 65536 results

#: input formats whose rounding is torch's own cast (RNE, overflow to inf, NaN kept)
_LUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: below this many elements the direct kernel is cheaper than building the table once
_LUT_MIN_NUMEL = 1 << 16


@lru_cache(maxsize=64)
def _code_table(u: FunctionUnit) -> torch.Tensor:
    """The unit's float32 result for every 16-bit code of its input format (computed by the
    direct path, which equals the exact reference on every code: tests/test_functions.py)."""
    dt = _LUT_DTYPES[u.input_format.name]
    codes = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dt).float()
    return u._direct(codes)[0]


def _lut_kernel(u: FunctionUnit, dt: torch.dtype):  # noqa: ANN202 - closes over the unit
    """``y = T[code(Q_in(x))]``: the input rounded by torch's cast (the input format's RNE,
    overflow to inf, NaN kept), flushed first with ``flush_input``, its bits index the table."""
    min_in = float(u.input_format.min_normal)

    def kernel(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
        if u.flush_input:
            x = torch.where(x.abs() < min_in, x * 0.0, x)
        code = x.to(dt).view(torch.int16).to(torch.int32) & 0xFFFF
        return lut[code]

    return kernel


# ---------------------------------------------------------------------------------------------
# the bound model's displacement

_HASH_A = 0x45D9F3B
_M32 = 0xFFFFFFFF


def _hash_py(b: int, seed: int) -> int:
    h = (b + seed * 0x9E3779B1) & _M32
    h = ((h ^ (h >> 16)) * _HASH_A) & _M32
    h = ((h ^ (h >> 16)) * _HASH_A) & _M32
    return h ^ (h >> 16)


def _bound_py(x: Fraction | float) -> int:
    ax = abs(Fraction(x))
    return 2 + math.floor(ax * 1173 / 1000)


def _displace_exact(y: Value, x: Value, seed: int) -> Value:
    """The bound model: ``y`` (an fp32 value) moved by k ulps, k uniform in [-B, B] from the
    hash of x's fp32 bits, B = 2 + floor(1.173 |x|), clamped to [0, max] in magnitude."""
    from precisim.formats.reference import f32_bits_to_value, value_to_f32_bits

    if isinstance(y, float) and (math.isnan(y) or math.isinf(y)) or y == 0:
        return y
    xb = value_to_f32_bits(x)
    B = _bound_py(x)
    k = _hash_py(xb, seed) % (2 * B + 1) - B
    yb = value_to_f32_bits(y)
    nb = min(max(yb + k, 0), 0x7F7FFFFF)
    return f32_bits_to_value(nb)


def _seed_bits(seed: int) -> int:
    """The hash's seed term ``seed * 0x9E3779B1 mod 2^32`` as a signed int32 (the same bits)."""
    v = seed * 0x9E3779B1 & _M32
    return v - (1 << 32) if v >= 1 << 31 else v


def _displace32(y: torch.Tensor, xq: torch.Tensor, seed_bits: int) -> torch.Tensor:
    """:func:`_displace_exact` on float32 tensors (y the correctly rounded results, xq the
    inputs), in int32 and float64 lanes only (vectorised when compiled; no int64): the
    unsigned 32-bit hash is computed on int32 bits (additions and products wrap mod 2^32 as
    the unsigned ones do; the logical shift is an arithmetic one masked to 16 bits), then
    read as an exact float64 in [0, 2^32) for the remainder by 2B + 1, exact: the floor of
    the float64 quotient is the floor of the exact one (an exact quotient below an integer
    is at least ``1 / (2B + 1) >= 2^-21.2`` below it, beyond the quotient's rounding error
    ``2^32 / 5 * 2^-53 < 2^-23``; an integer quotient is exact). ``seed_bits``:
    :func:`_seed_bits`."""
    xd = xq.double()
    # (floor(m / 1000) of the integer m <= 1.173e9 as floor((m + 0.5) * 0.001), no division:
    # the product is within 1e-9 of (m + 0.5) / 1000, which is 0.0005 or more from an integer)
    B = 2.0 + torch.floor((torch.floor(xd.abs().clamp(max=1e6) * 1173.0) + 0.5) * 0.001)
    h = xq.view(torch.int32) + seed_bits
    h = (h ^ ((h >> 16) & 0xFFFF)) * _HASH_A
    h = (h ^ ((h >> 16) & 0xFFFF)) * _HASH_A
    h = h ^ ((h >> 16) & 0xFFFF)
    hd = h.double() + torch.where(h < 0, 4294967296.0, 0.0)
    mod = 2.0 * B + 1.0
    k = (hd - torch.floor(hd / mod) * mod - B).to(torch.int32)
    nb = (y.view(torch.int32) + k).clamp(0, 0x7F7FFFFF).view(torch.float32)
    # (NaN, inf and zero kept; nested wheres: compiled, | of masks converts them lane by lane)
    return torch.where(y.abs() < math.inf, torch.where(y != 0, nb, y), y)


def unit_from_dict(spec: Mapping[str, Any], where: str = "function unit") -> FunctionUnit:
    """A function unit from a mapping: ``base`` (a preset name) plus the fields to change, or
    every field (``name`` and ``function`` required)."""
    from .presets import FUNCTION_UNITS

    return _from_dict(FunctionUnit, FUNCTION_UNITS, spec, where)


def _from_dict(cls: type, registry: Any, spec: Mapping[str, Any], where: str) -> Any:
    from ..specs import check_keys

    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a preset name or a mapping of fields, got "
                         f"{type(spec).__name__} {spec!r}")
    allowed = ["base"] + [f.name for f in dataclasses.fields(cls)]
    check_keys(spec, allowed, where, error=ValueError)
    fields = {k: v for k, v in spec.items() if k != "base"}
    if isinstance(fields.get("interval"), list):
        fields["interval"] = tuple(fields["interval"])
    try:
        if spec.get("base") is not None:
            base = registry.get(str(spec["base"]))
            fields.setdefault("name", f"{base.name}+custom")
            return base.with_(**fields)
        if "name" not in fields:
            raise ValueError("a unit without 'base' needs a 'name'")
        return cls(**fields)
    except (TypeError, KeyError) as e:
        raise ValueError(f"{where}: {e.args[0] if e.args else e}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


__all__ += ["unit_from_dict", "ACTIVATIONS"]
