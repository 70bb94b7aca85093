"""Vectorised GEMM under a :class:`MatrixUnit`: ``matmul(a, b, unit, c=None)``.

Two fidelities, both public:

* ``"bit-exact"`` returns exactly what the unit produces (docs/arithmetic.md section 4; tested bit
  for bit against :mod:`precisim.emulation.reference` and all 60000 real-GPU recordings).
  For the NVIDIA-style units (exact products, unnormalised alignment, truncation, joint c:
  every GPU preset) each block is done with exact float arithmetic: the products of a block
  are formed in float32 (FP8 inputs) or float64 (fp16/bf16/tf32), scaled by 2^(F-E) (exact),
  truncated by conversion to integers and summed in int32/int64; the block sum S * 2^(E-F)
  is then rounded once with an exact float64 rounding (:func:`_round_float`). The kernel
  works on reused (k, M, N-chunk) buffers (the block's k products outermost: the exponent
  maximum and the sum are plane-wise), with int8 exponents for FP8 inputs and the float32
  kernel whenever the inputs' exponent range allows it; column chunks run in parallel
  Python threads with single-threaded torch ops (robust on a shared machine). For FP8-class
  inputs whose block results are float32 values (H100 E4M3/E5M2, DeepSeek FP8, variants) the
  same chain runs compiled (:mod:`.fused_chain`: exponent maxima by one float matmul of
  powers of two, then one int32/float32 kernel per block for the truncated sum and its
  rounding), bit-identical and several times faster; ``PRECISIM_BACKEND=eager`` keeps the
  eager chain. Other units
  use an int64 kernel (integer significands, shifts, integer rounding of every mode). Exact
  units (``alignment_bits=None``) and very wide alignments use a window of
  ``W = 59 - bitlen(k+1)`` bits below E (k: the block's actual length); any output whose
  block drops bits below that window is recomputed by the exact reference (rare for small
  blocks: it needs an exponent spread of ~30 bits inside one block).
* ``"fast"`` (units with a float accumulator and a deterministic rounding, promotion if any
  to fp32 RNE: every preset): one matmul per promotion chunk, or one for the whole K when
  the unit does not promote (float32 when the products of the input formats are exact in
  it, else float64), plus a model of the unit's systematic rounding on the M x N outputs:
  the chunk's sum x1 = c + T is rounded once with the unit's block rounding (so results lie
  on the unit's output grid, e.g. the 13-bit block results of the H100 FP8 unit), after
  subtracting the expected loss of the other ``n - 1`` block roundings of a directed
  accumulator rounding (RTZ: toward zero), ``beta * (n-1) * rho * (|c| + |x1|) / 2`` with
  ``beta`` = the mean loss per block rounding in ulps (:func:`_fast_beta`; 0.375 for the
  H100 fp16/bf16 units, 0 for H100 FP8 where F = the block result bits) and
  ``rho = 2^-p / (2 ln 2)`` the mean ulp of a value relative to its magnitude (the running
  sum taken to grow linearly over the chunk). Partial sums are promoted with fp32 RNE
  arithmetic (with a block scale: fl32(s*partial) is added, two roundings where the unit
  does one). Units without
  alignment truncation (``alignment_bits=None``) get one exact float64 sum per block of k
  instead, so there fast mode equals bit-exact wherever a block's products span < 53 bits.
  The element-wise work runs single-threaded and the matmuls with every torch thread (split
  element-wise ops wait for a time slice per op on a busy machine). Not modelled: the
  alignment truncation of each
  term (step 3 of the model: zero-mean noise for mixed-sign data, a bias toward zero for
  one-signed data), the order-dependent rounding of the float32 matmul, intermediate
  overflow (a block overflow that the unit turns into inf may give NaN or a finite value;
  fp32-range results overflow when converted to float32), and subnormal partial sums.
  Measured divergence from bit-exact (:func:`fast_divergence`; 512x512 @ 512x4096, inputs
  quantized from N(0,1) / U(0,1); "differ": fraction of outputs not bit-identical; max ulp
  at the bit-exact value, large only at outputs near zero after cancellation; normwise:
  ||fast - exact||_F / ||exact||_F; bias: mean(fast - exact) / mean|exact|)::

      unit           data    differ  max ulp  normwise  bias
      h100-e4m3      N(0,1)  0.887   3.7e5    3.4e-4    -5.7e-7
      h100-bf16      N(0,1)  0.913   1.3e7    2.7e-7     1.4e-10
      deepseek-fp8   N(0,1)  0.953   1.6e5    1.2e-4    -1.3e-7
      h100-fp16      N(0,1)  0.930   9.2e6    4.1e-7     3.5e-10
      h100-e4m3      U(0,1)  1.000   114      5.2e-3     5.2e-3
      h100-bf16      U(0,1)  0.964   13       2.7e-7     2.4e-7
      deepseek-fp8   U(0,1)  1.000   14.5     4.6e-4     4.5e-4

  (For comparison, the exact sum rounded once differs from the H100 FP8 unit by 3.4e-4
  normwise on the N(0,1) case: that unit's deviation is the zero-mean noise of its
  alignment cut, which no deterministic model reproduces; on one-signed data the cut's bias
  toward zero, 5e-3 at K=512, is what fast mode misses.) With a scaled GEMM
  (``scaled_matmul``) the figures are alike: MXFP8 on h100-e4m3 0.897 / 3.6e-4, 1x128 /
  128x128 FP8 on deepseek-fp8 0.995 / 1.2e-4 (benchmarks/bench_gemm.py --scaled).
  Other units (integer or stochastic accumulators, product rounding...) use the older fast
  path: a float64 matmul per block of k, then the unit's exact block rounding, promotion and
  output rounding (it leaves out the alignment truncation only).

Block-scaled GEMMs (:func:`precisim.emulation.scaled_matmul`) pass their scales to the
same kernels: per block-FMA term scales s = s_a*s_b (the alignment exponent of a term is
e_a + e_b + floor(log2 s) and the term is s*a*b, exact), at promotion
(``acc = RNE_fp32(acc + s*partial)``), or once on the final accumulator (whole-K scales);
see :mod:`precisim.emulation.scaled` for the semantics.

Special values (docs/arithmetic.md section 4, model assumption): any NaN among the products
(including 0 * inf) or in c, or +inf with -inf, gives NaN; otherwise an infinite product or c
gives that infinity; a block that overflows gives inf (``acc_overflow="inf"``) and the output
stays inf. Input values that are not values of the unit's formats raise ``ValueError``
(inf in a format without inf included; NaN is always accepted and propagates).
A K that is not a multiple of the block size is padded with zero products, which take no
part in the alignment: the result is that of the unpadded model.
Works on any device torch supports (every step is a torch op), without autograd (the results
are not differentiable).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache

import torch
from precisim.formats import FloatFormat, IntFormat, Overflow, Rounding, get_format

from . import fused_chain as _fused
from .fused_chain import _fexp64 as _fexp
from .fused_chain import _pow2_32
from .fused_chain import _pow2_64 as _pow2
from .matrix_unit import Alignment, CMode, Drop, MatrixUnit
from .presets import get_unit

__all__ = ["FIDELITIES", "divergence", "fast_divergence", "matmul"]

FP32 = get_format("fp32")

FIDELITIES = ("bit-exact", "fast")
NEG_BIG = -(1 << 40)  # exponent of a zero term: below everything
_SHIFT_MAX = 62
NEG_BIG_32 = -(1 << 20)  # the same, for the int32 exponents of the float64 kernel
_NEG_16 = -(1 << 14)  # the same, for the int16 exponents of the float block kernel
_ZERO_SUM = -(1 << 13)  # a sum of two int16 exponents below this involves a zero


# ---------------------------------------------------------------------------------------------
# rounding of (sign, integer magnitude, exponent) triples

@dataclass(frozen=True)
class _Spec:
    """Everything a rounding to one format needs, as plain ints."""

    is_int: bool
    m: int  # fraction bits (float formats)
    emin: int
    max_sig: int  # largest finite value = max_sig * 2^max_exp
    max_exp: int
    rounding: Rounding
    overflow: Overflow
    flush: bool
    sr_bits: int
    frac_bits: int = 0
    bits: int = 0
    signed: bool = True
    qmin: int = 0
    qmax: int = 0

    @staticmethod
    def of(fmt: FloatFormat | IntFormat, rounding: Rounding, overflow: Overflow,
           flush: bool = False, sr_bits: int | None = None) -> _Spec:
        sb = sr_bits or 0
        if isinstance(fmt, IntFormat):
            return _Spec(True, 0, 0, 0, 0, rounding, overflow, False, sb, fmt.frac_bits,
                         fmt.bits, fmt.signed, fmt.qmin, fmt.qmax)
        mc = fmt.max_code_magnitude
        e_field, m_field = mc >> fmt.man_bits, mc & ((1 << fmt.man_bits) - 1)
        if e_field == 0 and fmt.subnormals:
            sig, exp = m_field, fmt.emin - fmt.man_bits
        else:
            sig, exp = m_field | (1 << fmt.man_bits), e_field - fmt.bias - fmt.man_bits
        return _Spec(False, fmt.man_bits, fmt.emin, sig, exp, rounding, overflow, flush, sb)


def _bitlen(x: torch.Tensor) -> torch.Tensor:
    """Bit length of non-negative int64 values below 2^62 (0 for 0)."""
    ex = (x.to(torch.float64).view(torch.int64) >> 52) - 1022  # x in [2^(ex-1), 2^ex)
    too_big = (x >> (ex - 1).clamp(0, _SHIFT_MAX)) == 0
    ex = ex - (too_big & (x > 0)).to(torch.int64)
    return torch.where(x > 0, ex, 0)


def _shr(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x >> s for non-negative x < 2^62 and s >= 0 of any size."""
    return torch.where(s > _SHIFT_MAX, 0, x >> s.clamp(0, _SHIFT_MAX))


def _round(neg: torch.Tensor, mag: torch.Tensor, base: torch.Tensor, sp: _Spec,
           rand: torch.Tensor | None = None):
    """Round the exact value (-1)^neg * mag * 2^base (mag < 2^62) to the format of ``sp``.

    Returns (neg, q, g, inf, nan): the value (-1)^neg * q * 2^g, plus masks of results that
    overflowed to infinity / NaN.
    """
    if sp.is_int:
        g = torch.full_like(base, -sp.frac_bits)
    else:
        e = base + _bitlen(mag) - 1
        g = torch.maximum(e, torch.full_like(e, sp.emin)) - sp.m
    sh = g - base
    right = sh > 0
    shp = sh.clamp(0, 63)
    q = torch.where(right, _shr(mag, shp), mag << (-sh).clamp(0, _SHIFT_MAX))
    rem = torch.where(right, mag - (q << shp.clamp(max=_SHIFT_MAX)), 0)
    rem = torch.where(shp > _SHIFT_MAX, mag, rem)
    r = sp.rounding
    if r is Rounding.TOWARD_ZERO:
        up = None
    elif r in (Rounding.NEAREST_EVEN, Rounding.NEAREST_AWAY):
        # compare rem with half = 2^(sh-1) without forming it when sh > 62
        big = shp > _SHIFT_MAX
        half = torch.where(big, 0, 1 << (shp - 1).clamp(0, _SHIFT_MAX - 1))
        gt = ~big & (rem > half)
        eq = ~big & (rem == half) & right
        up = gt | (eq & ((q & 1) == 1)) if r is Rounding.NEAREST_EVEN else gt | eq
    elif r is Rounding.STOCHASTIC:
        d = shp - sp.sr_bits
        t = torch.where(d >= 0, _shr(mag, d.clamp(min=0)) & ((1 << sp.sr_bits) - 1),
                        rem << (-d).clamp(0, _SHIFT_MAX))
        up = right & (t + rand >= (1 << sp.sr_bits))
    else:
        inexact = rem != 0
        if r is Rounding.UP:
            up = inexact & ~neg
        elif r is Rounding.DOWN:
            up = inexact & neg
        else:  # ODD
            up = inexact & ((q & 1) == 0)
    if up is not None:
        q = q + up.to(torch.int64)
    inf = torch.zeros_like(neg)
    nan = torch.zeros_like(neg)
    if sp.is_int:
        code = torch.where(neg, -q, q)
        if sp.overflow is Overflow.WRAP:
            code = code & ((1 << sp.bits) - 1)
            if sp.signed:
                code = torch.where(code >= (1 << (sp.bits - 1)), code - (1 << sp.bits), code)
        code = code.clamp(sp.qmin, sp.qmax)
        return code < 0, code.abs(), g, inf, nan
    ovf = ((g > sp.max_exp) | ((g == sp.max_exp) & (q > sp.max_sig))) & (q > 0)
    if sp.overflow is Overflow.SATURATE:
        q = torch.where(ovf, sp.max_sig, q)
        g = torch.where(ovf, sp.max_exp, g)
    elif sp.overflow is Overflow.NAN:
        nan = ovf
    else:
        inf = ovf
    if sp.flush:
        q = torch.where(q < (1 << sp.m), 0, q)
    return neg, q, g, inf, nan


def _add_two(n1, m1, g1, n2, m2, g2):
    """(-1)^n1 m1 2^g1 + (-1)^n2 m2 2^g2 in a 60-bit window with a sticky bit.

    Exact when both fit in the window; otherwise the smaller operand is truncated with a
    sticky bit at the bottom of the window, which keeps every later rounding to a precision of
    up to 30 bits correct (the window keeps >= 28 bits below such a rounding point).
    """
    t1 = torch.where(m1 > 0, g1 + _bitlen(m1), NEG_BIG)
    t2 = torch.where(m2 > 0, g2 + _bitlen(m2), NEG_BIG)
    top = torch.maximum(t1, t2)
    far = 1 << 40
    low = torch.minimum(torch.where(m1 > 0, g1, far), torch.where(m2 > 0, g2, far))
    base = torch.where(top == NEG_BIG, 0, torch.maximum(low, top - 60))  # 0 + 0: base 0

    def put(n, m, g):
        s = g - base
        left = m << s.clamp(0, _SHIFT_MAX)
        right = _shr(m, (-s).clamp(min=0))
        lost = (right << (-s).clamp(0, _SHIFT_MAX)) != m
        v = torch.where(s >= 0, left, right | (lost & (s < 0)).to(torch.int64))
        return torch.where(n, -v, v)

    s = put(n1, m1, g1) + put(n2, m2, g2)
    return s < 0, s.abs(), base


# ---------------------------------------------------------------------------------------------
# element decomposition

def _emin(fmt: FloatFormat | IntFormat) -> int:
    return fmt.emin if isinstance(fmt, FloatFormat) else -fmt.frac_bits


def _decompose(x: torch.Tensor, fmt: FloatFormat | IntFormat,
               sig_fmt: FloatFormat | IntFormat | None = None):
    """Finite float32 values of ``fmt`` -> (neg, significand, lsb exponent g, alignment e).

    |x| = sig * 2^g; e = max(floor(log2|x|), emin(fmt)) (NEG_BIG for zeros). ``sig_fmt``: a
    format every x is a value of whose grid gives sig and g (default ``fmt``): block-scaled
    elements use their element format, which keeps the significands short.
    """
    neg = torch.signbit(x)
    ax = x.abs().to(torch.float64)
    _, ex = torch.frexp(ax)
    fl = ex.to(torch.int64) - 1
    e = torch.maximum(fl, torch.full_like(fl, _emin(fmt)))
    sf = fmt if sig_fmt is None else sig_fmt
    if isinstance(sf, IntFormat):
        g = torch.full_like(fl, -sf.frac_bits)
    else:
        g = torch.maximum(fl, torch.full_like(fl, sf.emin)) - sf.man_bits
    sig = torch.ldexp(ax, (-g).to(torch.float64)).to(torch.int64)
    zero = ax == 0
    e = torch.where(zero, NEG_BIG, e)
    return neg, sig, g, e


def _align_exponents(x: torch.Tensor, fmt: FloatFormat | IntFormat, zero: int) -> torch.Tensor:
    """Alignment exponents max(floor(log2|x|), emin) of finite values of ``fmt`` (``zero`` for
    zeros), as ``_decompose(x, fmt)[3]`` clamped at ``zero`` gives them: from the float32 bits
    when the format's exponents lie in float32's (a float32 subnormal then has exponent field
    0 and alignment exponent emin = -126), else through :func:`_decompose`."""
    if x.dtype != torch.float32 or not isinstance(fmt, FloatFormat) or fmt.emin < -126:
        return _decompose(x, fmt)[3].clamp(min=zero)
    e = ((x.view(torch.int32) >> 23) & 0xFF) - 127
    return torch.where(x == 0, zero, e.clamp(min=fmt.emin))


def _c_exponent(q: torch.Tensor, g: torch.Tensor, fmt: FloatFormat | IntFormat) -> torch.Tensor:
    e = g + _bitlen(q) - 1
    return torch.where(q > 0, torch.maximum(e, torch.full_like(e, _emin(fmt))), NEG_BIG)


def _to_float(neg, q, g) -> torch.Tensor:
    v = torch.ldexp(q.to(torch.float64), g.to(torch.float64)).to(torch.float32)
    return torch.where(neg, -v, v)


# ---------------------------------------------------------------------------------------------
# checks

def _any(mask: torch.Tensor) -> bool:
    """``mask.any()`` for a bool tensor (a max over its bytes: many times faster on CPU)."""
    if mask.numel() == 0:
        return False
    return bool(mask.view(torch.uint8).max())


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every element of a float32 tensor is finite (from the bits)."""
    if x.numel() == 0:
        return True
    return int((x.view(torch.int32) & 0x7FFFFFFF).max()) < 0x7F800000


@cache
def _check_consts(fmt: FloatFormat) -> tuple[int, int, int, float]:
    m = min(fmt.man_bits, 23)
    max_bits = int(torch.tensor(float(fmt.max), dtype=torch.float32).view(torch.int32))
    normal_bits = 0 if m >= 23 else (max(fmt.emin, -126) + 127) << 23
    return (1 << (23 - m)) - 1, max_bits, normal_bits, 2.0 ** (fmt.emin - m + 23)


def _check_values(x: torch.Tensor, fmt: FloatFormat | IntFormat, what: str) -> bool:
    """Raise ``ValueError`` unless every finite element of x is a value of ``fmt``; returns
    True when it found every element finite (False: not known).

    For float formats a few passes on the float32 bits look for suspects (magnitudes above
    the format's max, inf and NaN included; bits below the format's precision; values below
    its smallest normal that are not multiples of its smallest subnormal, tested as
    (|x| + C) - C == |x| with ulp(C) that step, |x| clamped to the smallest normal); only if
    there are any does the exact check run.
    """
    if isinstance(fmt, FloatFormat) and x.dtype == torch.float32 and x.numel():
        low, max_bits, normal_bits, C = _check_consts(fmt)
        bits = x.view(torch.int32)
        mag = bits & 0x7FFFFFFF
        suspect = int(mag.max()) > max_bits or (not fmt.signed and int(bits.min()) < 0)
        if not suspect and low:
            suspect = int((mag & low).max()) > 0
        if not suspect and normal_bits and _any(mag < normal_bits):
            v = mag.clamp_(max=normal_bits).view(torch.float32)  # (2^emin itself is valid)
            suspect = _any((v + C) - C != v)
        if not suspect:
            return True
    _check_values_exact(x, fmt, what)
    return False


def _check_values_exact(x: torch.Tensor, fmt: FloatFormat | IntFormat, what: str) -> None:
    if not fmt.has_inf and torch.isinf(x).any():
        raise ValueError(f"{what} holds infinities, which {fmt.name} cannot represent")
    ax = torch.where(torch.isfinite(x), x, 0.0).abs().to(torch.float64)
    if isinstance(fmt, IntFormat):
        k = torch.ldexp(ax, torch.tensor(float(fmt.frac_bits), dtype=torch.float64))
        k = torch.where(torch.signbit(x), -k, k)
        bad = (k != torch.floor(k)) | (k > fmt.qmax) | (k < fmt.qmin)
    else:
        _, ex = torch.frexp(ax)
        e = torch.clamp(ex.to(torch.float64) - 1, min=fmt.emin)
        sig = torch.ldexp(ax, fmt.man_bits - e)
        bad = (sig != torch.floor(sig)) | (ax > float(fmt.max))
        if not fmt.signed:
            bad |= torch.signbit(x) & (ax != 0)
    bad &= ~torch.isnan(x)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{what} holds values that are not {fmt.name} values (first: {float(x[idx])!r} at "
            f"index {idx}); round them first, e.g. precisim.formats.quantize({what}, "
            f"{fmt.name!r})")


def _prepare(a, b, unit, c, check: bool = True):
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} has dtype {t.dtype}; accepted float32 (or float16 / "
                            "bfloat16, read exactly)")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., rows, cols), got "
                             f"shape {tuple(t.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"shapes do not match: a is {tuple(a.shape)} (K={a.shape[-1]}) and b "
                         f"is {tuple(b.shape)} (K={b.shape[-2]})")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} and b on {b.device}")
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise ValueError(f"batch dimensions do not broadcast: a {tuple(a.shape)}, b "
                         f"{tuple(b.shape)}") from None
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    a = a.float().expand(*batch, M, K).reshape(-1, M, K)
    b = b.float().expand(*batch, K, N).reshape(-1, K, N)
    out_shape = (*batch, M, N)
    c_fmt = unit.promotion_format if unit.promotion_interval else unit.acc_format
    if c is not None:
        if not isinstance(c, torch.Tensor):
            c = torch.as_tensor(c, dtype=torch.float32, device=a.device)
        try:
            c = c.float().to(a.device).expand(out_shape)
        except RuntimeError:
            raise ValueError(f"c of shape {tuple(c.shape)} does not broadcast to the output "
                             f"shape {out_shape}") from None
        _check_values(c, c_fmt, "c")
        c = c.reshape(-1, M, N).contiguous()
    finite = False
    if check:
        finite = _check_values(a, unit.a_format, "a") & _check_values(b, unit.b_format, "b")
    return a, b, c, out_shape, c_fmt, finite


def _specials(a, b, c, finite_ab: bool = False):
    """(nan, +inf, -inf) masks of the outputs per the model's special-value rule, or None
    when every input is finite (c may be None: +0; finite_ab: a and b are known finite)."""
    if (finite_ab or (_all_finite(a) and _all_finite(b))) and (c is None or _all_finite(c)):
        return None

    def mm(x, y):
        return (x.to(torch.float64) @ y.to(torch.float64)) > 0

    an, bn = torch.isnan(a), torch.isnan(b)
    ai, bi = torch.isinf(a), torch.isinf(b)
    az, bz = a == 0, b == 0
    ap, am = a > 0, a < 0
    bp, bm = b > 0, b < 0
    nan = mm(an, torch.ones_like(bn)) | mm(torch.ones_like(an), bn) | mm(ai, bz) | mm(az, bi)
    pos = mm(ai & ap, bp) | mm(ai & am, bm) | mm(ap, bi & bp) | mm(am, bi & bm)
    neg = mm(ai & ap, bm) | mm(ai & am, bp) | mm(ap, bi & bm) | mm(am, bi & bp)
    if c is not None:
        nan = nan | torch.isnan(c)
        pos = pos | (c == math.inf)
        neg = neg | (c == -math.inf)
    nan = nan | (pos & neg)
    return nan, pos & ~nan, neg & ~nan


# ---------------------------------------------------------------------------------------------
# scales of block-scaled GEMMs (built by :mod:`precisim.emulation.scaled`)

@dataclass
class _Scales:
    """The scales of a block-scaled GEMM as the core applies them (docs/arithmetic.md section 2).

    ``a``: (B, M, nA) float64, the scale of K-block ``i // a_blk`` of each row of A (None: no
    K-blocked scales on A); ``b``: (B, N, nB) likewise for the columns of B. ``exact``: the
    scale product s_a*s_b is exact (E8M0 pairs, the exponents add), else it is rounded once
    to fp32 (RNE). ``pow2``: every K-blocked scale is a power of two or zero.
    Epilogue (whole-K scales): ``ep_a`` (B, M) and ``ep_b`` (B, N) float64 fp32 values and
    ``ep_g`` = fl32(g_a*g_b) (NVFP4 tensor scales; 1.0 if none); alpha =
    fl32(fl32(ep_a*ep_b) / ep_g) multiplies the final accumulator once (fp32 RNE).
    """

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    a_blk: int = 1
    b_blk: int = 1
    exact: bool = True
    pow2: bool = True
    ep_a: torch.Tensor | None = None
    ep_b: torch.Tensor | None = None
    ep_g: float | None = None

    @property
    def has_k(self) -> bool:
        return self.a is not None or self.b is not None

    @property
    def has_epilogue(self) -> bool:
        return self.ep_a is not None or self.ep_b is not None or self.ep_g is not None

    def _product(self, sa, sb) -> torch.Tensor:
        s = sa * sb  # exact in float64: two float32 values
        return s if self.exact else s.to(torch.float32).to(torch.float64)

    def at(self, lo: int, ns: slice, shape: tuple[int, int, int]) -> torch.Tensor:
        """(B, M, Nc) scale products of the K-range starting at product ``lo``."""
        one = torch.ones((), dtype=torch.float64)
        sa = one if self.a is None else self.a[:, :, lo // self.a_blk, None]
        sb = one if self.b is None else self.b[:, ns, lo // self.b_blk][:, None, :]
        return self._product(sa, sb).expand(shape)

    def at32(self, lo: int, ns: slice) -> torch.Tensor:
        """:meth:`at` in float32 arithmetic (fast mode): fl32(s_a*s_b), broadcastable."""
        one = torch.ones((), dtype=torch.float32)
        sa = one if self.a is None else self.a[:, :, lo // self.a_blk, None].float()
        sb = one if self.b is None else self.b[:, ns, lo // self.b_blk][:, None, :].float()
        return sa * sb

    def terms(self, lo: int, hi: int, ns: slice) -> torch.Tensor:
        """(B, M, Nc, hi-lo) scale product of every product of the K-range [lo, hi)."""
        one = torch.ones((), dtype=torch.float64)
        idx = torch.arange(lo, hi)
        sa = one if self.a is None else self.a[:, :, idx // self.a_blk][:, :, None, :]
        sb = one if self.b is None else self.b[:, ns][:, :, idx // self.b_blk][:, None, :, :]
        return self._product(sa, sb)

    def expanded(self, K: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-element scales: A's (B, M, K) and B's (B, K, N) (None where unscaled)."""
        idx = torch.arange(K)
        sa = None if self.a is None else self.a[:, :, idx // self.a_blk]
        sb = None if self.b is None else self.b[:, :, idx // self.b_blk].transpose(1, 2)
        return sa, sb

    def alpha(self, ns: slice, shape: tuple[int, int, int]) -> torch.Tensor:
        """(B, M, Nc) epilogue factors (float64 holding fp32 values)."""
        one = torch.ones((), dtype=torch.float64)
        pa = one if self.ep_a is None else self.ep_a[:, :, None]
        pb = one if self.ep_b is None else self.ep_b[:, None, ns]
        p = (pa * pb).to(torch.float32).to(torch.float64)  # fl32(p_a*p_b)
        if self.ep_g is not None:
            # a float64 quotient of float32 values rounded to float32 is the correctly rounded
            # float32 quotient (53 >= 2*24 + 2: the double rounding is innocuous)
            p = (p / self.ep_g).to(torch.float32).to(torch.float64)
        return p.expand(shape)


def _pos_parts(s: torch.Tensor):
    """(sig, g, e) of float64 values s >= 0 with at most 24 significant bits: s = sig*2^g,
    e = floor(log2 s) (NEG_BIG for 0)."""
    mant, ex = torch.frexp(s)
    sig = torch.ldexp(mant, torch.full_like(mant, 24.0)).to(torch.int64)
    ex = ex.to(torch.int64)
    return sig, ex - 24, torch.where(s > 0, ex - 1, NEG_BIG)


# ---------------------------------------------------------------------------------------------
# the block chain (int64 kernel: every unit)

def _window(k: int) -> int:
    """Bits kept below E by the int64 kernel when it sums k + 1 terms exactly."""
    return 59 - (k + 1).bit_length()


def _block_exact(unit, pa, pb, cst, sp_block, rand, lost, ps=None):
    """One block of bit-exact products for every output of the chunk.

    pa: (neg, sig, g, e) of A's block, each (B, M, 1, k); pb likewise (B, 1, N, k);
    cst: the accumulator state (neg, q, g, e) each (B, M, N); ps: None or the (sig, g, e) of
    the scale product of every term, broadcastable to (B, M, N, k) (block-scaled GEMMs: the
    term is s*a*b, its alignment exponent e_a + e_b + e_s).
    """
    na, sa, ga, ea = pa
    nb, sb, gb, eb = pb
    neg = na ^ nb
    mag = sa * sb
    g = ga + gb
    if ps is not None:
        mag = mag * ps[0]
        g = g + ps[1]
    if unit.product_format is not None:
        pf = unit.product_format
        sp = _Spec.of(pf, unit.product_rounding, Overflow.SATURATE)
        neg, mag, g, _, _ = _round(neg, mag, g, sp)
        e = _c_exponent(mag, g, pf)
    elif unit.alignment is Alignment.UNNORMALISED:
        e = torch.where(mag > 0, ea + eb + (0 if ps is None else ps[2]), NEG_BIG)
    else:
        e = torch.where(mag > 0, g + _bitlen(mag) - 1, NEG_BIG)
    cn, cq, cg, ce = cst
    joint = unit.c_mode is CMode.JOINT
    E = e.amax(-1)
    if joint:
        E = torch.maximum(E, ce)
    F = unit.alignment_bits
    W = _window(mag.shape[-1])  # the block's actual length (the last may be short)
    exact = F is None or F > W
    if unit.alignment_floor is not None:
        E = torch.maximum(E, torch.full_like(E, unit.alignment_floor))
    base = E - (W if exact else F)
    drop = Drop.TRUNCATE if exact else unit.drop
    if drop is Drop.STICKY:
        base = base - 1

    def align(n, m, gg, b):
        s = gg - b  # >= 0: exact left shift
        left = m << s.clamp(0, _SHIFT_MAX)
        rs = (-s).clamp(min=0)
        if drop is Drop.FLOOR:
            sm = torch.where(n, -m, m)
            right = torch.where(rs > _SHIFT_MAX, torch.where(sm < 0, -1, 0),
                                sm >> rs.clamp(0, _SHIFT_MAX))
            return torch.where(s >= 0, torch.where(n, -left, left), right), None
        q = _shr(m, rs)
        rem = m - (q << rs.clamp(0, _SHIFT_MAX))
        rem = torch.where(rs > _SHIFT_MAX, m, rem)
        if drop is Drop.NEAREST:
            big = rs > _SHIFT_MAX
            half = torch.where(big, 0, 1 << (rs - 1).clamp(0, _SHIFT_MAX - 1))
            up = ~big & (rs > 0) & ((rem > half) | ((rem == half) & ((q & 1) == 1)))
            q = q + up.to(torch.int64)
        v = torch.where(s >= 0, left, q)
        return torch.where(n, -v, v), rem != 0

    if drop is Drop.STICKY:
        # the value grid is 2^base, half the F-bit grid: truncate to the F-bit grid, then
        # set the bit below it if anything was dropped
        def align_sticky(n, m, gg, b):
            s = gg - b
            left = m << s.clamp(0, _SHIFT_MAX)
            rs = (-s).clamp(min=0) + 1  # shift to the F grid (2^(b+1))
            q = _shr(m, rs)
            lost = (q << rs.clamp(0, _SHIFT_MAX)) != m
            v = torch.where(s >= 0, left, (q << 1) | (lost & (s < 0)).to(torch.int64))
            return torch.where(n, -v, v), None
        align = align_sticky  # noqa: F811

    terms, lst = align(neg, mag, g, base.unsqueeze(-1))
    S = terms.sum(-1)
    if lst is not None and exact:
        lost = lost | (lst & (mag > 0)).any(-1)
    if joint:
        ct, cl = align(cn, cq, cg, base)
        S = S + ct
        if cl is not None and exact:
            lost = lost | (cl & (cq > 0))
        sneg, smag, sbase = S < 0, S.abs(), base
    else:
        sneg, smag, sbase = _add_two(S < 0, S.abs(), base, cn, cq, cg)
    zero = smag == 0
    rn, rq, rg, rinf, rnan = _round(sneg, smag, sbase, sp_block, rand)
    rn = torch.where(zero, (neg & (mag == 0)).all(-1) & cn & (cq == 0), rn)
    return (rn, rq, rg, _c_exponent(rq, rg, unit.acc_format)), rinf, rnan, lost


def _float_ok(unit: MatrixUnit) -> bool:
    """Whether the bit-exact block sums can be formed in float64 (see :func:`_block_float`)."""
    F = unit.alignment_bits
    return (unit.product_format is None and unit.alignment is Alignment.UNNORMALISED
            and unit.drop in (Drop.TRUNCATE, Drop.FLOOR) and unit.c_mode is CMode.JOINT
            and F is not None and F + 3 + (unit.block_size + 1).bit_length() <= 53)


def _kernel_dtype(unit: MatrixUnit, scales: _Scales | None = None) -> torch.dtype:
    """float32 when the products, the aligned terms and their sum are all exact in it (and
    block scales, if any, are powers of two applied through the exponent only)."""
    fa, fb, F = unit.a_format, unit.b_format, unit.alignment_bits
    if not (isinstance(fa, FloatFormat) and isinstance(fb, FloatFormat)):
        return torch.float64
    ok = (fa.man_bits + fb.man_bits + 2 <= 24 and F + 3 <= 24
          and F + 3 + (unit.block_size + 1).bit_length() <= 31
          and fa.emin - fa.man_bits + fb.emin - fb.man_bits >= -126
          and fa.emax + fb.emax + 2 <= 127)
    if scales is not None and scales.has_k:
        # power-of-two scales enter through the exponent only; the clamped float32 power of
        # two 2^(e_s + F - E) must then still give 0 where the true one underflows, and
        # never need clamping where a product is nonzero
        ok = (ok and scales.pow2 and fa.emax + fb.emax + 2 <= 126
              and F - fa.emin - fb.emin <= 127)
    return torch.float32 if ok else torch.float64


def _exp_range(e: torch.Tensor, zero: int) -> tuple[int, int] | None:
    """(min, max) of the alignment exponents of the nonzero elements (None: all zero)."""
    if e.numel() == 0:
        return None
    hi = int(e.max())
    if hi == zero:
        return None
    return int(torch.where(e == zero, hi, e).min()), hi


def _chain_kernel_dtype(unit: MatrixUnit, sc: _Scales | None, ea: torch.Tensor,
                        eb: torch.Tensor, zero: int) -> torch.dtype:
    """float32 for the float chain's block kernel when, for these inputs, every product is
    exact in float32 (significands of <= 24 bits, exponents inside float32's normal range),
    the power of two 2^(e_s + F - E) never needs clamping where a product is nonzero, and the
    integer sum of the block's aligned products (each < 2^(F+2)) fits in int32 (the aligned
    c is added in int64); else float64. Block scales must be powers of two (they enter the
    power of two only). Both kernels give identical bits."""
    fa, fb, F, k = unit.a_format, unit.b_format, unit.alignment_bits, unit.block_size
    if sc is not None and sc.has_k and not sc.pow2 and not unit.promotion_interval:
        return torch.float64  # (scales applied at promotion never enter the block kernel)
    if not (isinstance(fa, FloatFormat) and isinstance(fb, FloatFormat)):
        return torch.float64
    if fa.man_bits + fb.man_bits + 2 > 24 or k * 2 ** (F + 2) > 2**31:
        return torch.float64
    ra, rb = _exp_range(ea, zero), _exp_range(eb, zero)
    if ra is None or rb is None:
        return torch.float32
    lo = ra[0] + rb[0] - fa.man_bits - fb.man_bits  # exponent of the smallest product's lsb
    hi = ra[1] + rb[1] + 2
    ok = lo >= -126 and hi <= 126 and F - (ra[0] + rb[0]) <= 127
    return torch.float32 if ok else torch.float64


def _block_float(a, ea, b, eb, cval, ce, F: int, floor: int | None, use_floor: bool):
    """Bit-exact aligned block sum with float arithmetic, for the NVIDIA-style units.

    a: (B, M, 1, k) values (float32 or float64, see :func:`_kernel_dtype`), ea their
    alignment exponents (int32, NEG_BIG_32 for zeros); b, eb: (B, 1, N, k); cval, ce: the
    accumulator value (float64) and exponent (B, M, N). Every product is exact (two
    significands of <= 24 bits in float64, <= 12 in float32); scaling it by 2^(F-E) is exact;
    converting it to an integer truncates it toward zero, giving the aligned term (< 2^(F+2));
    the k+1 terms are summed exactly in integers. Returns the integer block sum S (int64) and
    E: the block sum is S * 2^(E-F).
    """
    p = a * b
    E = torch.maximum((ea + eb).amax(-1), ce)
    if floor is not None:
        E = torch.clamp(E, min=floor)
    d = F - E
    if p.dtype == torch.float32:
        # d > 127 only when every product of the block is zero (then c alone matters)
        v = p * _pow2_32(d.clamp(max=127)).unsqueeze(-1)
        t = v.to(torch.int32)
        if use_floor:
            t = t - (t.to(v.dtype) > v).to(torch.int32)
        S = t.sum(-1, dtype=torch.int32).to(torch.int64)
    else:
        v = p * _pow2(d.clamp(-1022, 1023)).unsqueeze(-1)
        t = v.to(torch.int64)
        if use_floor:
            t = t - (t.to(v.dtype) > v).to(torch.int64)
        S = t.sum(-1)
    cv = cval * _pow2(d.clamp(-1022, 1023))
    ct = cv.to(torch.int64)
    if use_floor:
        ct = ct - (ct.to(cv.dtype) > cv).to(torch.int64)
    return S + ct, E


_KERNELS: dict = {}


def _block_fn(unit, sp_block, has_rand):
    """The block kernel for this unit (float64 kernel when eligible, else the int64 one).

    (torch.compile of these kernels was measured no faster than eager on a 2-core CPU, so
    they run eagerly.)
    """
    key = (unit, sp_block, has_rand)
    fn = _KERNELS.get(key)
    if fn is None:
        if _float_ok(unit):
            F, fl, uf = unit.alignment_bits, unit.alignment_floor, unit.drop is Drop.FLOOR

            def fn(pa, pb, state, r, lost, ps=None):
                cn, cq, cg, ce = state
                cval = torch.ldexp(cq.to(torch.float64), cg.to(torch.float64))
                cval = torch.where(cn, -cval, cval)
                S, E = _block_float(pa[0], pa[1], pb[0], pb[1], cval, ce.to(torch.int32), F,
                                    fl, uf)
                neg = S < 0
                mag = S.abs()
                rn, rq, rg, rinf, rnan = _round(neg, mag, E - F, sp_block, r)
                return (rn, rq, rg, _c_exponent(rq, rg, unit.acc_format)), rinf, rnan, lost
        else:
            def fn(pa, pb, state, r, lost, ps=None):
                return _block_exact(unit, pa, pb, state, sp_block, r, lost, ps)
        _KERNELS[key] = fn
    return fn


def _block_fast(unit, a_blk, b_blk, cst, sp_block, rand):
    """One block in fast mode: the float64 block sum of the products (+ c) rounded once."""
    s = a_blk.to(torch.float64) @ b_blk.to(torch.float64)
    cn, cq, cg, _ = cst
    s = s + torch.where(cn, -1.0, 1.0).to(torch.float64) * torch.ldexp(
        cq.to(torch.float64), cg.to(torch.float64))
    neg = s < 0
    mant, ex = torch.frexp(s.abs())
    mag = torch.ldexp(mant, torch.full_like(mant, 53.0)).to(torch.int64)
    base = ex.to(torch.int64) - 53
    rn, rq, rg, rinf, rnan = _round(neg, mag, base, sp_block, rand)
    return (rn, rq, rg, _c_exponent(rq, rg, unit.acc_format)), rinf, rnan


def _chunk(unit, fidelity, A, Bm, Cst, rand, cfmt, sc: _Scales | None = None,
           ns: slice = slice(None)):
    """All blocks of K for one chunk of outputs (int64 chain; every unit). A: decomposed
    (B, M, K) tensors or the raw (B, M, K) floats (fast); Bm likewise (B, K, N); ``sc``: the
    scales (bit-exact: per term; both fidelities: at promotion), ``ns`` the chunk's columns."""
    k = unit.block_size
    K = (A[0] if fidelity == "bit-exact" else A).shape[-1]
    nblk = max(1, -(-K // k))
    sp_block = _Spec.of(unit.block_format, unit.acc_rounding, unit.acc_overflow,
                        unit.flush_output_subnormals, unit.acc_sr_bits)
    cn, cq, cg, ce = Cst
    shape = cn.shape
    dev = cn.device
    inf_pos = torch.zeros(shape, dtype=torch.bool, device=dev)
    inf_neg = torch.zeros_like(inf_pos)
    nan = torch.zeros_like(inf_pos)
    lost = torch.zeros_like(inf_pos)
    per = (unit.promotion_interval // k) if unit.promotion_interval else None
    zero_state = (torch.zeros_like(cn), torch.zeros_like(cq), torch.zeros_like(cg),
                  torch.full_like(ce, NEG_BIG))
    reg = Cst
    state = zero_state if per else Cst
    part_inf_pos = torch.zeros_like(inf_pos)
    part_inf_neg = torch.zeros_like(inf_pos)
    sp_prom = _Spec.of(unit.promotion_format, unit.promotion_rounding, Overflow.INF)
    term_scales = sc is not None and sc.has_k and not per and fidelity == "bit-exact"
    for j in range(nblk):
        sl = slice(j * k, min((j + 1) * k, K))
        r = None if rand is None else rand[..., j]
        if fidelity == "bit-exact":
            pa = tuple(t[:, :, None, sl] for t in A)
            pb = tuple(t[:, sl, :].transpose(1, 2)[:, None, :, :].contiguous() for t in Bm)
            if term_scales:
                ps = _pos_parts(sc.terms(sl.start, sl.stop, ns))
                state, rinf, rnan, lost = _block_exact(unit, pa, pb, state, sp_block, r, lost,
                                                       ps)
            else:
                state, rinf, rnan, lost = _block_fn(unit, sp_block, r is not None)(
                    pa, pb, state, r, lost)
        else:
            state, rinf, rnan = _block_fast(unit, A[:, :, sl], Bm[:, sl, :], state, sp_block,
                                            r)
        tgt_pos, tgt_neg = (part_inf_pos, part_inf_neg) if per else (inf_pos, inf_neg)
        tgt_pos |= rinf & ~state[0] & ~(tgt_pos | tgt_neg)
        tgt_neg |= rinf & state[0] & ~(tgt_pos | tgt_neg)
        nan |= rnan
        if per and ((j + 1) % per == 0 or j == nblk - 1):
            n1, q1, g1, _ = reg
            pn, pq, pg = state[0], state[1], state[2]
            if sc is not None and sc.has_k:
                s = sc.at((j // per) * per * k, ns, tuple(shape))
                s_sig, s_g, _ = _pos_parts(s)
                pq, pg = pq * s_sig, pg + s_g
                zero_s = s == 0
                nan |= (part_inf_pos | part_inf_neg) & zero_s  # inf * 0
                part_inf_pos &= ~zero_s
                part_inf_neg &= ~zero_s
            sn, smag, sbase = _add_two(n1, q1, g1, pn, pq, pg)
            zero = smag == 0
            rn, rq, rg, rinf2, _ = _round(sn, smag, sbase, sp_prom)
            rn = torch.where(zero, n1 & (q1 == 0) & pn & (pq == 0), rn)
            new_pos = part_inf_pos | (rinf2 & ~rn)
            new_neg = part_inf_neg | (rinf2 & rn)
            nan |= (inf_pos & new_neg) | (inf_neg & new_pos)
            inf_pos |= new_pos
            inf_neg |= new_neg
            reg = (rn, rq, rg, _c_exponent(rq, rg, unit.promotion_format))
            state = zero_state
            part_inf_pos = torch.zeros_like(inf_pos)
            part_inf_neg = torch.zeros_like(inf_pos)
    final = reg if per else state
    if sc is not None and sc.has_epilogue:
        al = sc.alpha(ns, tuple(shape))
        a_sig, a_g, _ = _pos_parts(al)
        n, q, g, _ = final
        sp32 = _Spec.of(FP32, Rounding.NEAREST_EVEN, Overflow.INF)
        zero = q == 0
        rn, rq, rg, rinf, _ = _round(n, q * a_sig, g + a_g, sp32)
        rn = torch.where(zero, n, rn)
        nan |= (inf_pos | inf_neg) & (al == 0)
        inf_pos |= rinf & ~rn
        inf_neg |= rinf & rn
        final = (rn, rq, rg, _c_exponent(rq, rg, FP32))
    return final, inf_pos, inf_neg, nan, lost


# ---------------------------------------------------------------------------------------------
# float64 chain: block sums and roundings done with exact float64 operations

def _float_chain_ok(unit: MatrixUnit, fidelity: str) -> bool:
    """The float64 chain handles deterministic roundings to float accumulators, with
    promotion only when it is fp32 RNE (then the promotion is one correctly rounded fp32
    addition, or fused multiply-add with a scale); bit-exact mode also needs the float64
    block kernel."""
    acc = unit.acc_format
    ok = (isinstance(acc, FloatFormat) and unit.acc_rounding is not Rounding.STOCHASTIC
          and acc.signed and isinstance(unit.out_format, FloatFormat))
    if unit.promotion_interval:
        pf = unit.promotion_format
        ok = ok and (pf.exp_bits, pf.man_bits, pf.bias) == (8, 23, 127) and (
            unit.promotion_rounding is Rounding.NEAREST_EVEN)
    return ok and (fidelity == "fast" or _float_ok(unit))


def _round_float(x: torch.Tensor, sp: _Spec):
    """Round exact float64 values x to the float format of ``sp`` (deterministic modes).

    Where the result is normal in the target format, round-toward-zero and
    round-to-nearest-even work on the float64 bits (clear, or round and clear, the low
    52 - m bits: a carry correctly bumps the exponent). Otherwise the value is scaled by
    2^(m - e), which is exact, and one float64 rounding-to-integer operation with the right
    direction gives the correctly rounded significand. Returns (result, overflow mask).
    """
    ax = x.abs()
    neg = torch.signbit(x)
    r = sp.rounding
    tiny = ax < 2.0 ** sp.emin
    if r in (Rounding.TOWARD_ZERO, Rounding.NEAREST_EVEN):
        sh = 52 - sp.m
        bits = ax.view(torch.int64)
        if r is Rounding.NEAREST_EVEN:
            bits = bits + (((1 << (sh - 1)) - 1) + ((bits >> sh) & 1))
        res = (bits & ~((1 << sh) - 1)).view(torch.float64)
        if _any(tiny):
            res = torch.where(tiny, _round_scaled(ax, neg, sp), res)
    else:
        res = _round_scaled(ax, neg, sp)
    mx = float(sp.max_sig) * 2.0 ** sp.max_exp
    ovf = res > mx
    if sp.overflow is Overflow.SATURATE:
        res = torch.where(ovf, mx, res)
        ovf = torch.zeros_like(ovf)
    if sp.flush:
        res = torch.where(res < 2.0 ** sp.emin, 0.0, res)
    return torch.where(neg, -res, res), ovf


def _round_scaled(ax: torch.Tensor, neg: torch.Tensor, sp: _Spec) -> torch.Tensor:
    """|x| rounded to the format of ``sp`` via exact scaling to an integer significand."""
    e = torch.clamp(_fexp(ax), min=sp.emin)
    v = ax * _pow2(sp.m - e)
    r = sp.rounding
    if r is Rounding.TOWARD_ZERO:
        q = torch.trunc(v)
    elif r is Rounding.NEAREST_EVEN:
        q = torch.round(v)
    elif r is Rounding.NEAREST_AWAY:
        q = torch.floor(v + 0.5)
    elif r is Rounding.UP:
        q = torch.where(neg, torch.trunc(v), torch.ceil(v))
    elif r is Rounding.DOWN:
        q = torch.where(neg, torch.ceil(v), torch.trunc(v))
    else:  # ODD
        t = torch.trunc(v)
        q = t + ((t != v) & (torch.remainder(t, 2) == 0)).to(v.dtype)
    return q * _pow2(e - sp.m)


def _sum_to_f32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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
    if _any(fix):
        step = torch.where((err > 0) == (s > 0), 1, -1)
        bits = torch.where(fix, bits + step, bits)
    return bits.view(torch.float64).to(torch.float32)


def _exp_dtype(unit: MatrixUnit) -> tuple[torch.dtype, int, int]:
    """(dtype, zero marker, threshold) of the alignment exponents in the float block kernel:
    int8 when every exponent of the input formats lies in [-15, 15] (FP8 and narrower), else
    int16. A zero's exponent is the marker; a sum of two exponents below the threshold
    involves a zero."""
    lim = max(abs(_emin(f)) if isinstance(f, IntFormat) else max(abs(f.emin), abs(f.emax))
              for f in (unit.a_format, unit.b_format))
    if lim <= 15:
        return torch.int8, -64, -40
    return torch.int16, _NEG_16, _ZERO_SUM


class _Buffers:
    """Reused work buffers of the float block kernel (fresh allocations of this size cost
    page faults that dominate the kernel's time)."""

    def __init__(self) -> None:
        self._d: dict = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        key = (shape, dtype, str(device))
        t = self._d.get(key)
        if t is None:
            t = self._d[key] = torch.empty(shape, dtype=dtype, device=device)
        return t


def _promote_float(reg, part, s):
    """The fp32 promotion register after adding one partial sum (times its scale s)."""
    if s is None:
        return reg + part.to(torch.float32)  # both fp32 values: one correctly rounded add
    return _sum_to_f32(reg.to(torch.float64), s * part)  # s*part is exact in float64


def _chain_start(unit: MatrixUnit, cval: torch.Tensor, sc: _Scales | None):
    """State of a float chain before its first block: the (B, M, N) masks of outputs that
    became +inf, -inf, NaN (all clear), the number of blocks per promotion (None: the unit
    does not promote) and whether K-blocked scales are present."""
    inf_pos = torch.zeros(tuple(cval.shape), dtype=torch.bool, device=cval.device)
    per = (unit.promotion_interval // unit.block_size) if unit.promotion_interval else None
    return (inf_pos, torch.zeros_like(inf_pos), torch.zeros_like(inf_pos), per,
            sc is not None and sc.has_k)


def _chunk_float(unit, fidelity, A, Bt, cval, sc: _Scales | None = None,
                 ns: slice = slice(None), bufs: _Buffers | None = None):
    """All blocks of K for a chunk of outputs with a float64 state (see _float_chain_ok).

    Bit-exact: A = (a (K, B, M) kernel dtype, ea int8/int16 alignment exponents), Bt =
    (b (K, B, Nc), eb). Fast: A = a (B, M, K), Bt = b (B, K, Nc), the matmul dtype.
    cval: the incoming c (float64 values of the accumulator / promotion format).
    """
    if fidelity == "fast":
        return _chunk_fast(unit, A, Bt, cval, sc, ns)
    bufs = bufs or _Buffers()
    a, ea = A
    bt, eb = Bt
    k = unit.block_size
    K = a.shape[0]
    nblk = max(1, -(-K // k))
    acc = unit.acc_format
    spb = _Spec.of(unit.block_format, unit.acc_rounding, unit.acc_overflow,
                   unit.flush_output_subnormals)
    F, floor, use_floor = unit.alignment_bits, unit.alignment_floor, unit.drop is Drop.FLOOR
    shape = tuple(cval.shape)
    dev = cval.device
    inf_pos, inf_neg, nan, per, scaled = _chain_start(unit, cval, sc)
    reg = cval.to(torch.float32)
    part = torch.zeros_like(cval) if per else cval
    part_pos, part_neg = torch.zeros_like(inf_pos), torch.zeros_like(inf_pos)
    kd = a.dtype
    idt = torch.int32 if kd == torch.float32 else torch.int64
    zero_sum = _exp_dtype(unit)[2]
    lo_d, hi_d = (-126, 127) if kd == torch.float32 else (-1022, 1023)
    for j in range(nblk):
        lo, hi = j * k, min((j + 1) * k, K)
        bs = (hi - lo, *shape)
        ebuf = bufs.get(bs, ea.dtype, dev)
        pbuf = bufs.get(bs, kd, dev)
        ibuf = bufs.get(bs, idt, dev)
        torch.add(ea[lo:hi, :, :, None], eb[lo:hi, :, None, :], out=ebuf)
        Ep = ebuf.amax(0).to(torch.int32)
        zero_blk = Ep < zero_sum
        es = None
        if scaled and not per:
            s = sc.at(lo, ns, shape)
            sz = s == 0
            es = torch.where(sz, 0, _fexp(s)).to(torch.int32)
            Ep = Ep + es
            zero_blk = zero_blk | sz
        Ep = torch.where(zero_blk, NEG_BIG_32, Ep)
        pe = torch.where(part != 0, torch.clamp(_fexp(part), min=acc.emin), NEG_BIG_32)
        E = torch.maximum(Ep, pe.to(torch.int32))
        if floor is not None:
            E = torch.clamp(E, min=floor)
        d = F - E
        dt = d if es is None else d + es
        if kd == torch.float32:
            mult = _pow2_32(dt.clamp(lo_d, hi_d))
        else:
            mult = _pow2(dt.clamp(lo_d, hi_d))
            if es is not None and not sc.pow2:
                mult = mult * (s * _pow2(-es))  # the scale's significand: exact (<= 24 bits)
        if es is not None:
            mult = torch.where(sz, 0.0, mult)  # a zero scale: zero terms
        torch.mul(a[lo:hi, :, :, None], bt[lo:hi, :, None, :], out=pbuf)
        pbuf.mul_(mult)
        ibuf.copy_(pbuf)  # conversion to integer: truncation toward zero
        if use_floor:
            ibuf.sub_((ibuf.to(kd) > pbuf).to(idt))
        S = ibuf.sum(0, dtype=idt).to(torch.int64)  # exact in idt (see _kernel_dtype)
        cv = part * _pow2(d.clamp(-1022, 1023))
        ct = cv.to(torch.int64)
        if use_floor:
            ct = ct - (ct.to(cv.dtype) > cv).to(torch.int64)
        S = S + ct
        sval = S.to(torch.float64) * _pow2(E - F)  # exact: |S| < 2^53
        zero = S == 0
        if _any(zero):  # IEEE: the sum of zeros is -0 only if all are -0
            zi = zero.nonzero(as_tuple=True)
            p = a[lo:hi, zi[0], zi[1]] * bt[lo:hi, zi[0], zi[2]]  # (w, zeros)
            pz = p == 0
            if scaled and not per:
                pz = pz | sz[zi].unsqueeze(0)
            pzi = part[zi]
            allneg = (torch.signbit(p) & pz).all(0) & torch.signbit(pzi) & (pzi == 0)
            sval[zi] = torch.where(allneg, -0.0, sval[zi])
        r, ovf = _round_float(sval, spb)
        tp, tn = (part_pos, part_neg) if per else (inf_pos, inf_neg)
        fresh = ovf & ~(tp | tn)
        tp |= fresh & (r > 0)
        tn |= fresh & (r < 0)
        part = torch.where(ovf, 0.0, r)
        if per and ((j + 1) % per == 0 or j == nblk - 1):
            s_p = sc.at((j // per) * per * k, ns, shape) if scaled else None
            reg, _, _ = _promote(reg, part, s_p, part_pos, part_neg, inf_pos, inf_neg, nan)
            part = torch.zeros_like(part)
            part_pos, part_neg = torch.zeros_like(inf_pos), torch.zeros_like(inf_pos)
    return _finish_float(unit, reg.to(torch.float64) if per else part, inf_pos, inf_neg, nan,
                         sc, ns)


def _fused_ok(unit: MatrixUnit, kd: torch.dtype, sc: _Scales | None) -> bool:
    """Whether the compiled chain of :mod:`.fused_chain` computes this bit-exact GEMM: the
    float chain with the float32 block kernel, float input formats whose exponent powers fit
    a float matmul, block results that are float32 values (rounded toward zero or to
    nearest-even, not flushed, with the accumulator's minimum exponent), and K-blocked scales
    (if any) applied at promotion or powers of two."""
    fa, fb, bf = unit.a_format, unit.b_format, unit.block_format
    if not (kd == torch.float32 and isinstance(fa, FloatFormat) and isinstance(fb, FloatFormat)
            and isinstance(bf, FloatFormat) and isinstance(unit.acc_format, FloatFormat)):
        return False
    sp = _Spec.of(bf, unit.acc_rounding, unit.acc_overflow, unit.flush_output_subnormals)
    return (_fused.pow_dtype(fa, fb, unit.block_size) is not None
            and sp.rounding in (Rounding.TOWARD_ZERO, Rounding.NEAREST_EVEN) and not sp.flush
            and sp.m <= 23 and sp.emin - sp.m >= -149 and sp.emin == unit.acc_format.emin
            and sp.max_exp + sp.max_sig.bit_length() <= 128
            and (unit.block_size + 1) << (unit.alignment_bits + 1) <= 1 << 24
            and (sc is None or not sc.has_k or bool(unit.promotion_interval) or sc.pow2))


def _fused_kernels(unit: MatrixUnit):
    """(key, prepare, block) of a unit (see :func:`.fused_chain.make_kernels`)."""
    sp = _Spec.of(unit.block_format, unit.acc_rounding, unit.acc_overflow,
                  unit.flush_output_subnormals)
    args = dict(F=unit.alignment_bits, c=unit.block_size.bit_length(),
                acc_emin=unit.acc_format.emin, floor=unit.alignment_floor,
                use_floor=unit.drop is Drop.FLOOR, m=sp.m, bemin=sp.emin,
                max_val=float(sp.max_sig) * 2.0 ** sp.max_exp,
                rne=sp.rounding is Rounding.NEAREST_EVEN,
                saturate=sp.overflow is Overflow.SATURATE)
    key = ("fused-chain", *sorted(args.items()))
    return key, *_fused.make_kernels(**args)


def _fused_flags(flags, r, pe, a_j, b_j, part, sz, tpn, negz: bool = True):
    """The rare cases of a fused block (see :func:`_chunk_fused`): an integer sum of 0 gets the
    IEEE sign of zero (-0 only when every product and the running sum are zeros of negative
    sign); an overflowed result sets the flags ``tpn`` = (positive, negative) once and leaves
    0. Returns the block results and their exponents."""
    zero = (flags & 1) != 0
    if negz and _any(zero):  # IEEE: the sum of zeros is -0 only if all are -0
        zi = zero.nonzero(as_tuple=True)
        p = a_j[zi[0], zi[1]] * b_j[zi[0], :, zi[2]]  # (zeros, w)
        pz = p == 0
        if sz is not None:
            pz = pz | sz[zi].unsqueeze(-1)
        pzi = part[zi]
        allneg = (torch.signbit(p) & pz).all(-1) & torch.signbit(pzi) & (pzi == 0)
        r[zi] = torch.where(allneg, -0.0, r[zi])
    ovf = (flags & 2) != 0
    if _any(ovf):
        tp, tn = tpn
        fresh = ovf & ~(tp | tn)
        tp |= fresh & (r > 0)
        tn |= fresh & (r < 0)
        r = torch.where(ovf, 0.0, r)
        pe = torch.where(ovf, _fused.NEG_BIG_32, pe)
    return r, pe


def _chunk_fused(unit, a, pa, bt, pb, cval, sc: _Scales | None = None, ns: slice = slice(None)):
    """:func:`_chunk_float` in bit-exact mode with the compiled kernels of :mod:`.fused_chain`
    (same bits). a: (B, M, K) float32 values, pa: their exponent powers (B, M, K); bt: (B, K,
    Nc), pb: (B, K, Nc); cval: (B, M, Nc) float64 incoming c."""
    from precisim.formats import kernels as _kernels

    k = unit.block_size
    K = a.shape[-1]
    nblk = max(1, -(-K // k))
    shape = tuple(cval.shape)
    dev = cval.device
    inf_pos, inf_neg, nan, per, scaled = _chain_start(unit, cval, sc)
    acc_emin = unit.acc_format.emin
    reg = cval.to(torch.float32)
    neg32 = torch.full(shape, _fused.NEG_BIG_32, dtype=torch.int32, device=dev)
    if per:
        part, pe = torch.zeros_like(reg), neg32
    else:
        part = reg
        pe = torch.where(cval != 0, torch.clamp(_fexp(cval), min=acc_emin), neg32)
        pe = pe.to(torch.int32)
    part_pos, part_neg = torch.zeros_like(inf_pos), torch.zeros_like(inf_pos)
    negz = _any(torch.signbit(part) & (part == 0))  # some running sum is -0
    kkey, prepare, block = _fused_kernels(unit)
    work = shape[0] * shape[1] * shape[2] * min(k, max(K, 1))
    for j in range(nblk):
        lo, hi = j * k, min((j + 1) * k, K)
        P = torch.matmul(pa[:, :, lo:hi], pb[:, lo:hi])  # exponent maxima: see fused_chain
        if scaled and not per:
            s = sc.at(lo, ns, shape)
            sz = s == 0
            es = torch.where(sz, 0, _fexp(s)).to(torch.int32)
            E, mult, ct = _kernels.run(prepare, (*kkey, "prepare", True), work, P, part, pe,
                                       es, sz)
        else:
            E, mult, ct = _kernels.run(prepare, (*kkey, "prepare", False), work, P, part, pe)
        a_j, b_j = a[:, :, lo:hi], bt[:, lo:hi]
        r, pe, flags = _kernels.run(block, (*kkey, "block"), work, a_j, b_j, mult, ct, E)
        fl = int(flags.max())
        # a zero sum is +0 (as the kernel returns it) unless the running sum is -0
        if fl >= 2 or (fl == 1 and negz):
            r, pe = _fused_flags(flags, r, pe, a_j, b_j, part, sz if scaled and not per else None,
                                 (part_pos, part_neg) if per else (inf_pos, inf_neg), negz)
            negz = _any(torch.signbit(r) & (r == 0))
        part = r
        if per and ((j + 1) % per == 0 or j == nblk - 1):
            s_p = sc.at((j // per) * per * k, ns, shape) if scaled else None
            args = (reg, part) if s_p is None else (reg, part, s_p)
            new = _kernels.run(_fused.promote, ("fused-promote", s_p is None), work, *args)
            reg, _, _ = _promote(reg, part, s_p, part_pos, part_neg, inf_pos, inf_neg, nan,
                                 new=new)
            part, pe, negz = torch.zeros_like(part), neg32, False
            part_pos, part_neg = torch.zeros_like(inf_pos), torch.zeros_like(inf_pos)
    return _finish_float(unit, reg.to(torch.float64) if per else part.to(torch.float64),
                         inf_pos, inf_neg, nan, sc, ns)


#: use the compiled chain of :mod:`.fused_chain` where it applies (tests switch it off to
#: compare it with the eager float chain)
USE_FUSED = True


def _fused_backend() -> bool:
    from precisim.formats import kernels as _kernels

    return _kernels.get_backend() != "eager"


def _core_fused(unit, a, b, ea, eb, c, sc, out, max_chunk_elements: int) -> None:
    """The bit-exact float chain through :func:`_chunk_fused`, in column chunks of at most
    ``max_chunk_elements`` outputs (the compiled kernels use every torch thread)."""
    k = unit.block_size
    Bt, M, _ = a.shape
    N = b.shape[-1]
    dt = _fused.pow_dtype(unit.a_format, unit.b_format, k)
    # row-major (B, M, K) and (B, K, N): the block kernel loads vectors along N (a weight
    # arrives as the transposed view of an (N, K) tensor)
    a32, b32 = a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()
    pa = _fused.exponent_powers(ea, a32 == 0, k, dt).contiguous()
    pb = _fused.exponent_powers(eb, b32 == 0, k, dt).contiguous()
    c64 = c.to(torch.float64)
    step = max(1, max_chunk_elements // max(1, Bt * M))
    for n0 in range(0, N, step):
        ns = slice(n0, min(N, n0 + step))
        out[:, :, ns] = _chunk_fused(unit, a32, pa, b32[:, :, ns], pb[:, :, ns], c64[:, :, ns],
                                     sc, ns)


def _promote(reg, part, s, part_pos, part_neg, inf_pos, inf_neg, nan, new=None):
    """Promotion step of the float chains: reg = RNE_fp32(reg + s*part), with the special
    values of the model (an inf partial sum makes the register inf; +inf with -inf: NaN).
    part_pos / part_neg: the partial sum overflowed (None: it did not). ``new``: the sum
    already computed (:func:`.fused_chain.promote`). Returns the new register and None, None
    (the partial sum's flags after a promotion)."""
    if new is None:
        new = _promote_float(reg, part, s)
    flagged = part_pos is not None and (_any(part_pos) or _any(part_neg))
    if not flagged and _all_finite(new):
        return new, None, None
    if part_pos is None:
        part_pos = part_neg = torch.zeros_like(inf_pos)
    if s is not None:
        z = s == 0
        nan |= (part_pos | part_neg) & z  # inf * 0
        part_pos = part_pos & ~z
        part_neg = part_neg & ~z
    np_ = part_pos | (new == math.inf)
    nn_ = part_neg | (new == -math.inf)
    nan |= (inf_pos & nn_) | (inf_neg & np_) | (np_ & nn_)
    inf_pos |= np_
    inf_neg |= nn_
    reg = torch.where(torch.isfinite(new), new, 0.0)
    return reg, None, None


def _finish_float(unit, final, inf_pos, inf_neg, nan, sc, ns):
    """Epilogue scale, output rounding and special values of the float chains."""
    if sc is not None and sc.has_epilogue:
        al = sc.alpha(ns, tuple(final.shape))
        y = (final * al).to(torch.float32)  # exact float64 product, one fp32 rounding
        nan |= (inf_pos | inf_neg) & (al == 0)  # inf * 0
        inf_pos |= y == math.inf
        inf_neg |= y == -math.inf
        final = torch.where(torch.isinf(y), 0.0, y).to(torch.float64)
    if unit.output_format is not None or unit.flush_output_subnormals:
        sp = _Spec.of(unit.out_format, unit.output_rounding, unit.output_overflow,
                      unit.flush_output_subnormals)
        final = final.to(torch.float64)
        fin = torch.isfinite(final)
        if not bool(fin.all()):  # (fast mode carries inf / NaN in the values)
            inf_pos |= final == math.inf
            inf_neg |= final == -math.inf
            nan |= torch.isnan(final)
            final = torch.where(fin, final, 0.0)
        final, ovf = _round_float(final, sp)
        inf_pos |= ovf & (final > 0)
        inf_neg |= ovf & (final < 0)
    res = final.to(torch.float32)
    if not (_any(inf_pos) or _any(inf_neg) or _any(nan)):
        return res
    res = torch.where(inf_pos, math.inf, res)
    res = torch.where(inf_neg, -math.inf, res)
    return torch.where(nan | (inf_pos & inf_neg), math.nan, res)


# ---------------------------------------------------------------------------------------------
# fast fidelity: one matmul per promotion chunk (or for the whole K) and a model of the
# unit's rounding bias

_RHO = 1.0 / (2.0 * math.log(2.0))  # E[ulp(x) / (|x| 2^-p)] for log-uniform significands


def _fast_beta(unit: MatrixUnit) -> tuple[float, str]:
    """Mean rounding loss of one block rounding, in ulps of the block result, and its
    direction ('zero', 'down', 'up'; 0.0 for the unbiased roundings).

    The block sum lies on the alignment grid q = 2^(E-F) (continuous without alignment) and
    is rounded to g = ulp(result) = 2^(E - p) (p: block_result_bits or the accumulator's
    fraction bits; the result's exponent taken as E): a directed rounding loses (g - q)/2 on
    average, i.e. beta = (1 - 2^(p-F))/2 ulps when F > p, 0 when F <= p, 1/2 when F is None.
    """
    r = unit.acc_rounding
    direction = {Rounding.TOWARD_ZERO: "zero", Rounding.DOWN: "down", Rounding.UP: "up"}.get(r)
    if direction is None:
        return 0.0, ""
    p = unit.block_format.man_bits
    F = unit.alignment_bits
    beta = 0.5 if F is None else max(0.0, (1.0 - 2.0 ** (p - F)) / 2.0)
    return beta, direction


def _fast_mm_dtype(unit: MatrixUnit) -> torch.dtype:
    """float32 when every product of the unit's input formats is exact in float32 (the sums
    are then as good as float32 accumulation gives) and the unit truncates at alignment,
    else float64 (units with exact block sums get exact float64 block sums)."""
    if unit.alignment_bits is None:
        return torch.float64
    bits = 0
    for f in (unit.a_format, unit.b_format):
        bits += f.man_bits + 1 if isinstance(f, FloatFormat) else max(
            abs(f.qmin), f.qmax).bit_length()
    return torch.float32 if bits <= 24 else torch.float64


def _round_fast(x: torch.Tensor, sp: _Spec) -> torch.Tensor:
    """``x`` (a float64 tensor this function may overwrite) rounded to the format of ``sp``
    for the fast fidelity: RTZ and RNE on the float64 bits in place (the sign bit is
    untouched: sign-magnitude), at the precision of normal numbers; formats with a normal
    range narrower than float32's and the other roundings use the exact
    :func:`_round_float`. Overflow is left to the caller."""
    if sp.rounding not in (Rounding.TOWARD_ZERO, Rounding.NEAREST_EVEN) or sp.flush or (
            sp.emin > -126):
        return _round_float(x, sp)[0]
    sh = 52 - sp.m
    bits = x.view(torch.int64)
    if sp.rounding is Rounding.NEAREST_EVEN:
        bits.add_(((bits >> sh) & 1) + ((1 << (sh - 1)) - 1))
    bits.bitwise_and_(~((1 << sh) - 1))
    return x


def _round_bits32(t: torch.Tensor, m: int) -> torch.Tensor:
    """Round-toward-zero of a float32 tensor to m fraction bits, in place on its bits."""
    if m < 23:
        t.view(torch.int32).bitwise_and_(~((1 << (23 - m)) - 1))
    return t


def _chunk_fast(unit, a, b, cval, sc: _Scales | None, ns: slice):
    """Fast model for a chunk of columns (see the module docstring, "fast").

    a: (B, M, K), b: (B, K, Nc) in the matmul dtype (block scales of units without promotion
    already folded in); cval: float64 (B, M, Nc) or None (+0).
    """
    k = unit.block_size
    K = a.shape[-1]
    shape = (a.shape[0], a.shape[1], b.shape[2])
    dev = a.device
    spb = _Spec.of(unit.block_format, unit.acc_rounding, unit.acc_overflow,
                   unit.flush_output_subnormals)
    beta, direction = _fast_beta(unit)
    rho = _RHO * 2.0 ** -unit.block_format.man_bits
    inf_pos = torch.zeros(shape, dtype=torch.bool, device=dev)
    inf_neg = torch.zeros_like(inf_pos)
    nan = torch.zeros_like(inf_pos)
    per = unit.promotion_interval
    # units that do not truncate at alignment: one exact float64 block sum per block (then
    # fast mode equals bit-exact wherever a block's products span < 53 bits)
    seg = k if unit.alignment_bits is None else (per or max(K, 1))
    mx = float(spb.max_sig) * 2.0 ** spb.max_exp
    # formats with float32's range: an overflow shows as inf when the result is converted to
    # float32 (the block format's precision is at most float32's, so a value beyond its max
    # is >= 2^128)
    fp32_range = spb.emin <= -126 and spb.max_exp + spb.m >= 127 and not spb.flush
    # a chunk's sum alone (no incoming value), rounded toward zero: on its float32 bits
    f32_path = (fp32_range and a.dtype == torch.float32 and spb.m <= 23
                and spb.rounding is Rounding.TOWARD_ZERO)
    reg = None if cval is None else cval.to(torch.float32)
    x = cval
    part = part_pos = part_neg = None
    scaled = sc is not None and sc.has_k
    nseg = -(-max(K, 1) // seg)
    T_all = None
    if 1 < nseg <= 64 and unit.alignment_bits is not None:
        # every chunk's sum in one batched matmul (B, nseg, M, Nc) (K padded with zeros)
        Kp, B_, M_, Nc = nseg * seg, shape[0], shape[1], shape[2]
        ap = torch.nn.functional.pad(a, (0, Kp - K)) if Kp > K else a
        bp = torch.nn.functional.pad(b, (0, 0, 0, Kp - K)) if Kp > K else b
        with _all_threads():
            T_all = torch.matmul(ap.reshape(B_, M_, nseg, seg).transpose(1, 2),
                                 bp.reshape(B_, nseg, seg, Nc))
    for j, lo in enumerate(range(0, max(K, 1), seg)):
        hi = min(K, lo + seg)
        x0 = part if per else x
        if T_all is not None:
            T = T_all[:, j]
        else:
            with _all_threads():
                T = torch.matmul(a[:, :, lo:hi], b[:, lo:hi, :])
        nb = max(1, -(-(hi - lo) // k))
        f = 0.5 * beta * (nb - 1) * rho if beta and nb > 1 else 0.0
        if x0 is None and f32_path:
            if f:
                T.mul_(1.0 - f)  # the expected loss of the inner roundings, toward zero
            r = _round_bits32(T, spb.m)
        else:
            x1 = T.to(torch.float64)
            if x0 is not None:
                x1 += x0
            if f:
                # loss = f * (|x0| + |x1|) in the rounding's direction (from x0 = 0, toward
                # zero, that is a factor (1 - f) on x1)
                if direction == "zero":
                    x1 *= 1.0 - f
                    if x0 is not None:
                        x1 -= f * x0.abs() * torch.sign(x1)
                else:
                    u = x1.abs() if x0 is None else x1.abs() + x0.abs()
                    x1 += (-f if direction == "down" else f) * u
            r = _round_fast(x1, spb)
        if not fp32_range:  # (else a value beyond the format shows as inf in float32)
            ovf = r.abs() > mx
            if _any(ovf):
                pp, pn = ovf & (r > 0), ovf & (r < 0)
                r = torch.where(ovf, 0.0, r)
                if per:
                    if part_pos is None:
                        part_pos, part_neg = pp, pn
                    else:
                        part_pos = part_pos | (pp & ~part_neg)
                        part_neg = part_neg | (pn & ~part_pos)
                else:
                    inf_pos |= pp & ~inf_neg
                    inf_neg |= pn & ~inf_pos
        if per:
            part = r
            if hi % per == 0 or hi >= K:
                # plain IEEE arithmetic gives the model's special values here (an inf
                # partial sum makes the register inf, inf - inf and inf * 0 are NaN)
                if part_pos is not None:  # partial sums that overflowed a narrow format
                    part = torch.where(part_pos, math.inf, torch.where(part_neg, -math.inf,
                                                                        part))
                p32 = part.to(torch.float32)
                if scaled:  # fast: fl32(s*partial) added with fp32 RNE (two roundings)
                    s32 = sc.at32((lo // per) * per, ns)
                    reg = p32 * s32 + 0.0 if reg is None else reg.addcmul_(p32, s32)
                elif reg is None:  # (a new tensor: p32 may be a view of the batched sums)
                    reg = p32 + 0.0  # RNE(0 + -0) = +0
                else:
                    reg = reg.add_(p32)
                part = part_pos = part_neg = None
        else:
            x = r
    final = reg if per else x
    return _finish_float(unit, final, inf_pos, inf_neg, nan, sc, ns)


# ---------------------------------------------------------------------------------------------
# the GEMM

def matmul(a: torch.Tensor, b: torch.Tensor, unit: MatrixUnit | str,
           c: torch.Tensor | float | None = None, fidelity: str = "bit-exact", *,
           seed: int | None = None, max_chunk_elements: int = 1 << 21) -> torch.Tensor:
    """``D = A @ B + C`` exactly as ``unit`` computes it (float32 result).

    Args:
        a: (..., M, K) float32 tensor holding values of ``unit.a_format``.
        b: (..., K, N) float32 tensor holding values of ``unit.b_format``; leading dimensions
            broadcast.
        unit: a :class:`MatrixUnit` or a preset name (:func:`get_unit`).
        c: the addend, broadcastable to (..., M, N), holding values of the accumulator format
            (of ``promotion_format`` when the unit promotes); default +0.
        fidelity: ``"bit-exact"`` or ``"fast"`` (see the module docstring).
        seed: random bits for ``acc_rounding="sr"`` (one draw per output and block, int64
            tensor of shape (B, M, N, blocks) from ``torch.Generator(seed)``).
        max_chunk_elements: bound on M*N*k elements processed at once (memory).
    """
    unit = get_unit(unit)
    return _core(a, b, unit, c, fidelity, seed, max_chunk_elements)


def _core(a, b, unit: MatrixUnit, c, fidelity: str, seed, max_chunk_elements: int,
          sc: _Scales | None = None, elem_formats=None, check: bool = True) -> torch.Tensor:
    """:func:`matmul`, plus the scales of a block-scaled GEMM (see :mod:`.scaled`).

    ``elem_formats``: (format of a's values, of b's values) when they are narrower than the
    unit's input formats (block-scaled elements): it keeps the int64 kernel's significands
    short enough for the scale factors. ``check=False`` skips the input value checks (the
    caller guarantees them).
    """
    if fidelity not in FIDELITIES:
        raise ValueError(f"fidelity={fidelity!r} is not valid: accepted {FIDELITIES}")
    if not isinstance(max_chunk_elements, int) or max_chunk_elements < 1:
        raise ValueError(f"max_chunk_elements={max_chunk_elements!r} is not valid: accepted a "
                         "positive integer")
    one = (fidelity == "fast" and isinstance(a, torch.Tensor) and a.device.type == "cpu"
           and torch.get_num_threads() > 1)
    with torch.no_grad(), (_one_thread_per_op() if one else nullcontext()):
        # fast mode: the element-wise work runs single-threaded (on a shared machine a split
        # op waits for a time slice per synchronisation) and the matmuls with every thread
        a, b, c, out_shape, cfmt, finite = _prepare(a, b, unit, c, check)
        specials = _specials(a, b, c, finite)
        if specials is not None:
            a = torch.where(torch.isfinite(a), a, 0.0)
            b = torch.where(torch.isfinite(b), b, 0.0)
            if c is not None:
                c = torch.where(torch.isfinite(c), c, 0.0)
        if unit.flush_input_subnormals:
            for fmt, name in ((unit.a_format, "a"), (unit.b_format, "b")):
                if isinstance(fmt, FloatFormat):
                    t = a if name == "a" else b
                    t = torch.where(t.abs() < float(fmt.min_normal), 0.0 * t, t)
                    a, b = (t, b) if name == "a" else (a, t)
        Bt, M, K = a.shape
        N = b.shape[-1]
        k = unit.block_size
        nblk = max(1, -(-K // k))
        rand = None
        if unit.acc_rounding is Rounding.STOCHASTIC:
            gen = torch.Generator(device=a.device)
            gen.manual_seed(0 if seed is None else int(seed))
            rand = torch.randint(0, 1 << unit.acc_sr_bits, (Bt, M, N, nblk), generator=gen,
                                 device=a.device, dtype=torch.int64)
        out = torch.empty((Bt, M, N), dtype=torch.float32, device=a.device)
        if fidelity == "fast":
            out = _core_fast(unit, a, b, c, sc, rand, cfmt, out, max_chunk_elements)
            return _apply_specials(unit, out, specials).reshape(out_shape)
        if c is None:
            c = torch.zeros((Bt, M, N), dtype=torch.float32, device=a.device)
        if _float_chain_ok(unit, fidelity):
            edt, neg_e, _ = _exp_dtype(unit)
            ea = _align_exponents(a, unit.a_format, neg_e).to(edt)
            eb = _align_exponents(b, unit.b_format, neg_e).to(edt)
            kd = _chain_kernel_dtype(unit, sc, ea, eb, neg_e)
            if USE_FUSED and _fused_ok(unit, kd, sc) and _fused_backend():
                _core_fused(unit, a, b, ea, eb, c, sc, out, max_chunk_elements)
                return _apply_specials(unit, out, specials).reshape(out_shape)
            # K outermost: (K, B, M) and (K, B, N), so that the block's k products are the
            # outer axis of the work buffers and their reductions are plane-wise (vectorised)
            A = (a.to(kd).permute(2, 0, 1).contiguous(), ea.permute(2, 0, 1).contiguous())
            Bk = (b.to(kd).permute(1, 0, 2).contiguous(), eb.permute(1, 0, 2).contiguous())
            c64 = c.to(torch.float64)
            step = max(1, max_chunk_elements // max(1, Bt * M * min(k, max(K, 1))))
            local = threading.local()

            def run(ns: slice) -> None:
                bufs = getattr(local, "bufs", None) or _Buffers()
                local.bufs = bufs
                out[:, :, ns] = _chunk_float(unit, fidelity, A, (Bk[0][:, :, ns],
                                                                 Bk[1][:, :, ns]),
                                             c64[:, :, ns], sc, ns, bufs)

            _for_chunks(N, step, run, a.device)
            return _apply_specials(unit, out, specials).reshape(out_shape)
        fa, fb = elem_formats or (None, None)
        if _float_ok(unit) and not (sc is not None and sc.has_k):
            # the float64 kernel needs the signed values and the alignment exponents only
            ea = _decompose(a, unit.a_format)[3].clamp(min=NEG_BIG_32).to(torch.int32)
            eb = _decompose(b, unit.b_format)[3].clamp(min=NEG_BIG_32).to(torch.int32)
            kd = _kernel_dtype(unit)
            A = (a.to(kd), ea)
            Bd = (b.to(kd), eb)
        else:
            A = _decompose(a, unit.a_format, fa)
            Bd = _decompose(b, unit.b_format, fb)
        cd = _decompose(c, cfmt)
        cd = (cd[0], cd[1], cd[2], _c_exponent(cd[1], cd[2], cfmt))
        lost_all = torch.zeros((Bt, M, N), dtype=torch.bool, device=a.device)
        kk = min(k, max(K, 1))
        step = max(1, max_chunk_elements // max(1, Bt * M * kk))

        def run_int(ns: slice) -> None:
            Bc = tuple(t[:, :, ns] for t in Bd)
            Cc = tuple(t[:, :, ns] for t in cd)
            rc = None if rand is None else rand[:, :, ns]
            final, ip, ineg, nn, lost = _chunk(unit, fidelity, A, Bc, Cc, rc, cfmt, sc, ns)
            out[:, :, ns] = _int_result(unit, final, ip, ineg, nn)
            lost_all[:, :, ns] = lost

        _for_chunks(N, step, run_int, a.device)
        out = _apply_specials(unit, out, specials)
        if _any(lost_all):
            if specials is not None:
                lost_all &= ~(specials[0] | specials[1] | specials[2])
            out = _fallback(unit, a, b, c, out, lost_all, rand, sc)
        return out.reshape(out_shape)


_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"depth": 0, "saved": 1}


@contextmanager
def _one_thread_per_op():
    """torch ops single-threaded for the duration (restored after; nesting and concurrent
    callers share one saved value)."""
    with _THREADS_LOCK:
        if _THREADS_STATE["depth"] == 0:
            _THREADS_STATE["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["depth"] -= 1
            if _THREADS_STATE["depth"] == 0:
                torch.set_num_threads(_THREADS_STATE["saved"])


@contextmanager
def _all_threads():
    """Inside :func:`_one_thread_per_op`: the caller's thread count again (for one big op)."""
    with _THREADS_LOCK:
        n = _THREADS_STATE["saved"] if _THREADS_STATE["depth"] else 0
        if n > 1:
            torch.set_num_threads(n)
    try:
        yield
    finally:
        if n > 1:
            with _THREADS_LOCK:
                if _THREADS_STATE["depth"]:
                    torch.set_num_threads(1)


def _for_chunks(N: int, step: int, fn, device) -> None:
    """``fn(slice)`` for the column chunks of the bit-exact kernels.

    On a CPU with several torch threads the chunks run in that many Python threads, each op
    single-threaded: the kernels issue many mid-sized ops, and splitting every op across
    threads costs a synchronisation per op, which on a busy (shared) machine costs a
    scheduler time slice each time. Chunks write disjoint columns, so the result does not
    depend on the schedule.
    """
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    if workers > 1 and -(-N // step) < 2 * workers:
        step = max(1, -(-N // (2 * workers)))
    chunks = [slice(n0, min(N, n0 + step)) for n0 in range(0, N, step)]
    if workers <= 1 or len(chunks) <= 1 or _THREADS_STATE["depth"]:
        for ns in chunks:
            fn(ns)
        return
    with _one_thread_per_op(), ThreadPoolExecutor(workers) as ex:
        for f in [ex.submit(fn, ns) for ns in chunks]:
            f.result()


def _int_result(unit, final, ip, ineg, nn) -> torch.Tensor:
    res = _output(unit, final)
    res = torch.where(ip, math.inf, res)
    res = torch.where(ineg, -math.inf, res)
    return torch.where(nn | (ip & ineg), math.nan, res)


def _fold(x: torch.Tensor, s: torch.Tensor | None, blk: int, axis: int) -> torch.Tensor:
    """x * (its K-block scales): x is (B, M, K) (axis 2 is K) or (B, K, N) (axis 1); s is
    (B, rows, nK). Blocks of a K that is a multiple of blk are a reshape, else a gather."""
    if s is None:
        return x
    K = x.shape[axis]
    s = s.to(x.dtype)
    if K % blk == 0 and s.shape[-1] == K // blk:
        if axis == 2:
            B, M, _ = x.shape
            return (x.view(B, M, K // blk, blk) * s[..., None]).view(B, M, K)
        B, _, N = x.shape
        return (x.view(B, K // blk, blk, N) * s.transpose(1, 2)[:, :, None, :]).view(B, K, N)
    idx = torch.arange(K, device=x.device) // blk
    g = s[:, :, idx]
    return x * (g if axis == 2 else g.transpose(1, 2))


def _core_fast(unit, a, b, c, sc, rand, cfmt, out, max_chunk_elements):
    """The fast fidelity (module docstring): the float model, or for the other units the
    per-block float64 sums with the int64 chain."""
    per = unit.promotion_interval
    if sc is not None and sc.has_k and not per:
        # block scales of units without promotion multiply the products: fold them into the
        # operands (s_a*a and s_b*b in the matmul dtype: exact for power-of-two and E4M3
        # scales of narrow elements, else rounded once)
        md = _fast_mm_dtype(unit) if _float_chain_ok(unit, "fast") else torch.float64
        a = _fold(a.to(md), sc.a, sc.a_blk, 2)
        b = _fold(b.to(md), sc.b, sc.b_blk, 1)
        sc = _Scales(ep_a=sc.ep_a, ep_b=sc.ep_b, ep_g=sc.ep_g)
    Bt, M, K = a.shape
    N = b.shape[-1]
    if _float_chain_ok(unit, "fast"):
        md = _fast_mm_dtype(unit)
        a = a.to(md)
        b = b.to(md)
        c64 = None if c is None else c.to(torch.float64)
        per = unit.promotion_interval
        nseg = -(-max(K, 1) // per) if per and unit.alignment_bits is not None else 1
        step = max(1, (max_chunk_elements * 8) // max(1, Bt * M * (nseg + 1)))
        if step >= N:
            return _chunk_float(unit, "fast", a, b, c64, sc, slice(None))
        for n0 in range(0, N, step):
            ns = slice(n0, min(N, n0 + step))
            out[:, :, ns] = _chunk_float(unit, "fast", a, b[:, :, ns],
                                         None if c64 is None else c64[:, :, ns], sc, ns)
        return out
    if c is None:
        c = torch.zeros((Bt, M, N), dtype=torch.float32, device=a.device)
    cd = _decompose(c, cfmt)
    cd = (cd[0], cd[1], cd[2], _c_exponent(cd[1], cd[2], cfmt))
    step = max(1, max_chunk_elements // max(1, Bt * M))
    for n0 in range(0, N, step):
        ns = slice(n0, min(N, n0 + step))
        Cc = tuple(t[:, :, ns] for t in cd)
        rc = None if rand is None else rand[:, :, ns]
        final, ip, ineg, nn, _ = _chunk(unit, "fast", a, b[:, :, ns], Cc, rc, cfmt, sc, ns)
        out[:, :, ns] = _int_result(unit, final, ip, ineg, nn)
    return out


def _output(unit: MatrixUnit, final) -> torch.Tensor:
    n, q, g, _ = final
    if unit.output_format is None and not unit.flush_output_subnormals:
        return _to_float(n, q, g)
    sp = _Spec.of(unit.out_format, unit.output_rounding, unit.output_overflow,
                  unit.flush_output_subnormals)
    rn, rq, rg, inf, nan = _round(n, q, g, sp)
    v = _to_float(rn, rq, rg)
    v = torch.where(inf, torch.where(rn, -math.inf, math.inf), v)
    return torch.where(nan, math.nan, v)


def _apply_specials(unit, out, specials):
    if specials is None:
        return out
    nan, pos, neg = specials
    if not _any(nan | pos | neg):
        return out
    fmt = unit.out_format
    big = math.inf if fmt.has_inf and unit.output_overflow is not Overflow.SATURATE else float(
        fmt.max)
    out = torch.where(pos, big, out)
    out = torch.where(neg, -big, out)
    return torch.where(nan, math.nan, out)


def _fallback(unit, a, b, c, out, mask, rand, sc: _Scales | None = None):
    """Recompute the outputs flagged in ``mask`` with the exact reference (rare)."""
    from .reference import dot, scaled_dot

    out = out.clone()
    idx = mask.nonzero().tolist()
    if sc is not None:
        sa, sb = sc.expanded(a.shape[-1])
    for bi, m, n in idx:
        rr = None if rand is None else rand[bi, m, n].tolist()
        if sc is None:
            out[bi, m, n] = dot(a[bi, m].tolist(), b[bi, :, n].tolist(), unit,
                                float(c[bi, m, n]), rand=rr)
            continue
        K = a.shape[-1]
        ra = [1.0] * K if sa is None else sa[bi, m].tolist()
        rb = [1.0] * K if sb is None else sb[bi, :, n].tolist()
        ep = None
        if sc.has_epilogue:
            ep = (1.0 if sc.ep_a is None else float(sc.ep_a[bi, m]),
                  1.0 if sc.ep_b is None else float(sc.ep_b[bi, n]),
                  1.0 if sc.ep_g is None else sc.ep_g, 1.0)
        out[bi, m, n] = scaled_dot(a[bi, m].tolist(), b[bi, :, n].tolist(), unit, ra, rb,
                                   exact_scale_product=sc.exact, epilogue=ep, rand=rr)
    return out


def divergence(exact: torch.Tensor, fast: torch.Tensor, unit: MatrixUnit | str
               ) -> dict[str, float]:
    """How far ``fast`` is from ``exact`` (two results of the same GEMM under ``unit``).

    Returns ``n`` (outputs), ``fraction_differ`` (NaN == NaN), ``max_ulp`` (ulps of the output
    format, or of the block result precision when the unit cuts it, at the bit-exact value;
    finite outputs), ``normwise_relative`` (||fast - exact||_F / ||exact||_F over finite
    outputs), ``mean_relative_bias`` (mean(fast - exact) / mean|exact|) and
    ``nonfinite_mismatch`` (count).
    """
    unit = get_unit(unit)
    same = (exact == fast) | (torch.isnan(exact) & torch.isnan(fast))
    fmt = unit.out_format
    fin = torch.isfinite(exact) & torch.isfinite(fast)
    ex64 = exact.to(torch.float64)
    _, ee = torch.frexp(ex64.abs())
    m = fmt.man_bits if isinstance(fmt, FloatFormat) else 0
    emin = fmt.emin if isinstance(fmt, FloatFormat) else 0
    e = torch.maximum(ee.to(torch.int64) - 1, torch.full_like(ee, emin, dtype=torch.int64))
    if unit.block_result_bits is not None and unit.output_format is None:
        m = unit.block_result_bits
    ulp = torch.ldexp(torch.ones_like(ex64), (e - m).to(torch.float64))
    d = (fast.to(torch.float64) - ex64)[fin]
    diff = d.abs() / ulp[fin]
    ref = ex64[fin]
    norm = float(ref.norm())
    return {
        "n": float(exact.numel()),
        "fraction_differ": float((~same).float().mean()) if same.numel() else 0.0,
        "max_ulp": float(diff.max()) if diff.numel() else 0.0,
        "normwise_relative": float(d.norm()) / norm if norm > 0 else float(d.norm()),
        "mean_relative_bias": (float(d.mean()) / float(ref.abs().mean())
                               if d.numel() and float(ref.abs().mean()) > 0 else 0.0),
        "nonfinite_mismatch": float((~same & ~fin).sum()),
    }


def fast_divergence(a: torch.Tensor, b: torch.Tensor, unit: MatrixUnit | str,
                    c: torch.Tensor | None = None) -> dict[str, float]:
    """How far ``fidelity="fast"`` is from bit-exact on these inputs (see :func:`divergence`
    for the keys: fraction of outputs that differ, max ulp, normwise relative difference...).
    """
    unit = get_unit(unit)
    return divergence(matmul(a, b, unit, c, "bit-exact"), matmul(a, b, unit, c, "fast"), unit)
