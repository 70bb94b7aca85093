"""Vectorised GEMM under a :class:`MatrixUnit`: ``matmul(a, b, unit, c=None)``.

Two fidelities, both public:

* ``"bit-exact"`` returns exactly what the unit produces (ARITHMETIC.md section 4; tested bit
  for bit against :mod:`precisim.emulation.reference` and all 60000 real-GPU recordings).
  For the NVIDIA-style units (exact products, unnormalised alignment, truncation, joint c:
  every GPU preset) each block is done with exact float arithmetic: the products of a block
  are formed in float32 (FP8 inputs) or float64 (fp16/bf16/tf32), scaled by 2^(F-E) (exact),
  truncated by conversion to integers and summed in int32/int64; the block sum S * 2^(E-F)
  is then rounded once with an exact float64 rounding (:func:`_round_float`). Other units use
  an int64 kernel (integer significands, shifts, integer rounding of every mode). Exact units
  (``alignment_bits=None``) and very wide alignments use a window of
  ``W = 59 - bitlen(k+1)`` bits below E (k: the block's actual length); any output whose
  block drops bits below that window is recomputed by the exact reference (rare for small
  blocks: it needs an exponent spread of ~30 bits inside one block).
* ``"fast"``: each block sum is one float64 matmul per block of k (exact when the block's
  products and c span fewer than 53 bits), then the unit's block rounding, promotion and
  output rounding as in bit-exact mode. It leaves out the alignment truncation of step 3 of
  the model, so it is *not* close to bit-exact for the truncating units: measured on
  512x512 @ 512x4096 N(0,1) inputs (benchmarks/bench_gemm.py), H100 E4M3: 92% of outputs
  differ, normwise relative difference 4.8e-4; H100 bf16: 36% differ, 9.6e-8 (the largest
  differences in ulps, ~3e5, are at outputs near zero after cancellation).
  :func:`fast_divergence` measures this on any inputs.

Special values (ARITHMETIC.md section 4, model assumption): any NaN among the products
(including 0 * inf) or in c, or +inf with -inf, gives NaN; otherwise an infinite product or c
gives that infinity; a block that overflows gives inf (``acc_overflow="inf"``) and the output
stays inf. Input values that are not values of the unit's formats raise ``ValueError``
(inf in a format without inf included; NaN is always accepted and propagates).
A K that is not a multiple of the block size is padded with zero products, which take no
part in the alignment: the result is that of the unpadded model.
Works on any device torch supports (every step is a torch op); scales for promotion
(``s_a*s_b``) are supported by the reference only (here they are 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from precisim.formats import FloatFormat, IntFormat, Overflow, Rounding

from .matrix_unit import Alignment, CMode, Drop, MatrixUnit
from .presets import get_unit

__all__ = ["FIDELITIES", "fast_divergence", "matmul"]

FIDELITIES = ("bit-exact", "fast")
NEG_BIG = -(1 << 40)  # exponent of a zero term: below everything
_SHIFT_MAX = 62
NEG_BIG_32 = -(1 << 20)  # the same, for the int32 exponents of the float64 kernel


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

def _decompose(x: torch.Tensor, fmt: FloatFormat | IntFormat):
    """Finite float32 values of ``fmt`` -> (neg, significand, lsb exponent g, alignment e).

    |x| = sig * 2^g; e = max(floor(log2|x|), emin(fmt)) (NEG_BIG for zeros).
    """
    neg = torch.signbit(x)
    ax = x.abs().to(torch.float64)
    _, ex = torch.frexp(ax)
    fl = ex.to(torch.int64) - 1
    if isinstance(fmt, IntFormat):
        emin, g = -fmt.frac_bits, torch.full_like(fl, -fmt.frac_bits)
        e = torch.maximum(fl, torch.full_like(fl, emin))
    else:
        e = torch.maximum(fl, torch.full_like(fl, fmt.emin))
        g = e - fmt.man_bits
    sig = torch.ldexp(ax, (-g).to(torch.float64)).to(torch.int64)
    zero = ax == 0
    e = torch.where(zero, NEG_BIG, e)
    return neg, sig, g, e


def _c_exponent(q: torch.Tensor, g: torch.Tensor, fmt: FloatFormat | IntFormat) -> torch.Tensor:
    emin = fmt.emin if isinstance(fmt, FloatFormat) else -fmt.frac_bits
    e = g + _bitlen(q) - 1
    return torch.where(q > 0, torch.maximum(e, torch.full_like(e, emin)), NEG_BIG)


def _to_float(neg, q, g) -> torch.Tensor:
    v = torch.ldexp(q.to(torch.float64), g.to(torch.float64)).to(torch.float32)
    return torch.where(neg, -v, v)


# ---------------------------------------------------------------------------------------------
# checks

def _check_values(x: torch.Tensor, fmt: FloatFormat | IntFormat, what: str) -> None:
    """Raise ``ValueError`` unless every finite element of x is a value of ``fmt``."""
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


def _prepare(a, b, unit, c):
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
    if c is None:
        c = torch.zeros(out_shape, dtype=torch.float32, device=a.device)
    else:
        if not isinstance(c, torch.Tensor):
            c = torch.as_tensor(c, dtype=torch.float32, device=a.device)
        try:
            c = c.float().to(a.device).expand(out_shape)
        except RuntimeError:
            raise ValueError(f"c of shape {tuple(c.shape)} does not broadcast to the output "
                             f"shape {out_shape}") from None
        _check_values(c, c_fmt, "c")
    _check_values(a, unit.a_format, "a")
    _check_values(b, unit.b_format, "b")
    return a, b, c.reshape(-1, M, N).contiguous(), out_shape, c_fmt


def _specials(a, b, c):
    """(nan, +inf, -inf) masks of the outputs per the model's special-value rule."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    shape = (a.shape[0], a.shape[1], b.shape[2])
    if bool(fa.all()) and bool(fb.all()) and bool(torch.isfinite(c).all()):
        z = torch.zeros(shape, dtype=torch.bool, device=a.device)
        return z, z, z

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
    nan = nan | torch.isnan(c) | (pos & neg)
    pos = pos | (c == math.inf)
    neg = neg | (c == -math.inf)
    nan = nan | (pos & neg)
    return nan, pos & ~nan, neg & ~nan


# ---------------------------------------------------------------------------------------------
# the block chain

def _window(k: int) -> int:
    """Bits kept below E by the int64 kernel when it sums k + 1 terms exactly."""
    return 59 - (k + 1).bit_length()


def _block_exact(unit, pa, pb, cst, sp_block, rand, lost):
    """One block of bit-exact products for every output of the chunk.

    pa: (neg, sig, g, e) of A's block, each (B, M, 1, k); pb likewise (B, 1, N, k);
    cst: the accumulator state (neg, q, g, e) each (B, M, N).
    """
    na, sa, ga, ea = pa
    nb, sb, gb, eb = pb
    neg = na ^ nb
    mag = sa * sb
    g = ga + gb
    if unit.product_format is not None:
        pf = unit.product_format
        sp = _Spec.of(pf, unit.product_rounding, Overflow.SATURATE)
        neg, mag, g, _, _ = _round(neg, mag, g, sp)
        e = _c_exponent(mag, g, pf)
    elif unit.alignment is Alignment.UNNORMALISED:
        e = torch.where(mag > 0, ea + eb, NEG_BIG)
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


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """2.0**n in float64, exactly, for integer n in [-1022, 1023] (built from the bits)."""
    return ((n.to(torch.int64) + 1023) << 52).view(torch.float64)


def _pow2_32(n: torch.Tensor) -> torch.Tensor:
    """2.0**n in float32, exactly, for integer n in [-126, 127]."""
    return ((n.to(torch.int32) + 127) << 23).view(torch.float32)


def _kernel_dtype(unit: MatrixUnit) -> torch.dtype:
    """float32 when the products, the aligned terms and their sum are all exact in it."""
    fa, fb, F = unit.a_format, unit.b_format, unit.alignment_bits
    if not (isinstance(fa, FloatFormat) and isinstance(fb, FloatFormat)):
        return torch.float64
    ok = (fa.man_bits + fb.man_bits + 2 <= 24 and F + 3 <= 24
          and F + 3 + (unit.block_size + 1).bit_length() <= 31
          and fa.emin - fa.man_bits + fb.emin - fb.man_bits >= -126
          and fa.emax + fb.emax + 2 <= 127)
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
        v = p * _pow2(d).unsqueeze(-1)
        t = v.to(torch.int64)
        if use_floor:
            t = t - (t.to(v.dtype) > v).to(torch.int64)
        S = t.sum(-1)
    cv = cval * _pow2(d)
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

            def fn(pa, pb, state, r, lost):
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
            def fn(pa, pb, state, r, lost):
                return _block_exact(unit, pa, pb, state, sp_block, r, lost)
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


def _chunk(unit, fidelity, A, Bm, Cst, rand, cfmt):
    """All blocks of K for one chunk of outputs. A: decomposed (B, M, K) tensors or the raw
    (B, M, K) floats (fast); Bm likewise (B, K, N)."""
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
    for j in range(nblk):
        sl = slice(j * k, min((j + 1) * k, K))
        r = None if rand is None else rand[..., j]
        if fidelity == "bit-exact":
            pa = tuple(t[:, :, None, sl] for t in A)
            pb = tuple(t[:, sl, :].transpose(1, 2)[:, None, :, :].contiguous() for t in Bm)
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
            sn, smag, sbase = _add_two(n1, q1, g1, state[0], state[1], state[2])
            zero = smag == 0
            rn, rq, rg, rinf2, _ = _round(sn, smag, sbase, sp_prom)
            rn = torch.where(zero, n1 & (q1 == 0) & state[0] & (state[1] == 0), rn)
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
    return final, inf_pos, inf_neg, nan, lost


# ---------------------------------------------------------------------------------------------
# float64 chain: block sums and roundings done with exact float64 operations

def _float_chain_ok(unit: MatrixUnit, fidelity: str) -> bool:
    """The float64 chain handles deterministic roundings to float accumulators, with
    promotion only when it is fp32 RNE with unit scales (then one float32 addition is the
    correctly rounded promotion); bit-exact mode also needs the float64 block kernel."""
    acc = unit.acc_format
    ok = (isinstance(acc, FloatFormat) and unit.acc_rounding is not Rounding.STOCHASTIC
          and acc.signed and isinstance(unit.out_format, FloatFormat))
    if unit.promotion_interval:
        pf = unit.promotion_format
        ok = ok and (pf.exp_bits, pf.man_bits, pf.bias) == (8, 23, 127) and (
            unit.promotion_rounding is Rounding.NEAREST_EVEN)
    return ok and (fidelity == "fast" or _float_ok(unit))


def _fexp(x: torch.Tensor) -> torch.Tensor:
    """floor(log2|x|) of nonzero finite float64 values (normal in float64)."""
    return ((x.view(torch.int64) >> 52) & 0x7FF) - 1023


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
        if bool(tiny.any()):
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


def _chunk_float(unit, fidelity, A, Bm, cval):
    """All blocks of K for a chunk of outputs with a float64 state (see _float_chain_ok).

    A: (a float64 (B, M, K), ea int32) in bit-exact mode, else a (B, M, K); Bm likewise.
    cval: the incoming c (float64 values of the accumulator / promotion format).
    """
    k = unit.block_size
    exact = fidelity == "bit-exact"
    a, b = (A[0], Bm[0]) if exact else (A, Bm)
    K = a.shape[-1]
    nblk = max(1, -(-K // k))
    acc = unit.acc_format
    spb = _Spec.of(unit.block_format, unit.acc_rounding, unit.acc_overflow,
                   unit.flush_output_subnormals)
    F, floor, use_floor = unit.alignment_bits, unit.alignment_floor, unit.drop is Drop.FLOOR
    inf_pos = torch.zeros(cval.shape, dtype=torch.bool, device=cval.device)
    inf_neg = torch.zeros_like(inf_pos)
    nan = torch.zeros_like(inf_pos)
    per = (unit.promotion_interval // k) if unit.promotion_interval else None
    reg = cval.to(torch.float32)
    part = torch.zeros_like(cval) if per else cval
    part_pos, part_neg = torch.zeros_like(inf_pos), torch.zeros_like(inf_pos)
    for j in range(nblk):
        sl = slice(j * k, min((j + 1) * k, K))
        if exact:
            ab = a[:, :, None, sl]
            bb = b[:, sl, :].transpose(1, 2)[:, None, :, :].contiguous()
            eab = A[1][:, :, None, sl]
            ebb = Bm[1][:, sl, :].transpose(1, 2)[:, None, :, :].contiguous()
            pe = torch.where(part != 0, torch.clamp(_fexp(part), min=acc.emin), NEG_BIG_32)
            S, E = _block_float(ab, eab, bb, ebb, part, pe.to(torch.int32), F, floor,
                                use_floor)
            s = S.to(torch.float64) * _pow2(E - F)  # exact: |S| < 2^53
            zero = S == 0
            if bool(zero.any()):  # IEEE: the sum of zeros is -0 only if all are -0
                p = ab * bb
                allneg = (torch.signbit(p) & (p == 0)).all(-1) & torch.signbit(part) & (
                    part == 0)
                s = torch.where(zero & allneg, -0.0, s)
        else:
            s = a[:, :, sl].to(torch.float64) @ b[:, sl, :].to(torch.float64) + part
        r, ovf = _round_float(s, spb)
        tp, tn = (part_pos, part_neg) if per else (inf_pos, inf_neg)
        fresh = ovf & ~(tp | tn)
        tp |= fresh & (r > 0)
        tn |= fresh & (r < 0)
        part = torch.where(ovf, 0.0, r)
        if per and ((j + 1) % per == 0 or j == nblk - 1):
            new = reg + part.to(torch.float32)  # fp32 RNE addition: the promotion
            np_ = part_pos | (new == math.inf)
            nn_ = part_neg | (new == -math.inf)
            nan |= (inf_pos & nn_) | (inf_neg & np_) | (np_ & nn_)
            inf_pos |= np_
            inf_neg |= nn_
            reg = torch.where(torch.isfinite(new), new, 0.0)
            part = torch.zeros_like(part)
            part_pos, part_neg = torch.zeros_like(inf_pos), torch.zeros_like(inf_pos)
    final = reg.to(torch.float64) if per else part
    if unit.output_format is not None or unit.flush_output_subnormals:
        sp = _Spec.of(unit.out_format, unit.output_rounding, unit.output_overflow,
                      unit.flush_output_subnormals)
        final, ovf = _round_float(final, sp)
        inf_pos |= ovf & (final > 0)
        inf_neg |= ovf & (final < 0)
    res = final.to(torch.float32)
    res = torch.where(inf_pos, math.inf, res)
    res = torch.where(inf_neg, -math.inf, res)
    return torch.where(nan | (inf_pos & inf_neg), math.nan, res)


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
    if fidelity not in FIDELITIES:
        raise ValueError(f"fidelity={fidelity!r} is not valid: accepted {FIDELITIES}")
    a, b, c, out_shape, cfmt = _prepare(a, b, unit, c)
    nan, pos, neg = _specials(a, b, c)
    a = torch.where(torch.isfinite(a), a, 0.0)
    b = torch.where(torch.isfinite(b), b, 0.0)
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
    if fidelity == "bit-exact" and _float_ok(unit):
        # the float64 kernel needs the signed values and the alignment exponents only
        ea = _decompose(a, unit.a_format)[3].clamp(min=NEG_BIG_32).to(torch.int32)
        eb = _decompose(b, unit.b_format)[3].clamp(min=NEG_BIG_32).to(torch.int32)
        kd = _kernel_dtype(unit)
        A = (a.to(kd), ea)
        Bd = (b.to(kd), eb)
    elif fidelity == "bit-exact":
        A = _decompose(a, unit.a_format)
        Bd = _decompose(b, unit.b_format)
    else:
        A, Bd = a, b
    cd = _decompose(c, cfmt)
    cd = (cd[0], cd[1], cd[2], _c_exponent(cd[1], cd[2], cfmt))
    out = torch.empty((Bt, M, N), dtype=torch.float32, device=a.device)
    lost_all = torch.zeros((Bt, M, N), dtype=torch.bool, device=a.device)
    kk = min(k, K) if fidelity == "bit-exact" else 1
    step = max(1, max_chunk_elements // max(1, M * kk))
    if _float_chain_ok(unit, fidelity):
        c64 = c.to(torch.float64)
        for n0 in range(0, N, step):
            ns = slice(n0, min(N, n0 + step))
            Bc = tuple(t[:, :, ns] for t in Bd) if fidelity == "bit-exact" else Bd[:, :, ns]
            out[:, :, ns] = _chunk_float(unit, fidelity, A, Bc, c64[:, :, ns])
        return _apply_specials(unit, out, nan, pos, neg).reshape(out_shape)
    for n0 in range(0, N, step):
        ns = slice(n0, min(N, n0 + step))
        Bc = tuple(t[:, :, ns] for t in Bd) if fidelity == "bit-exact" else Bd[:, :, ns]
        Cc = tuple(t[:, :, ns] for t in cd)
        rc = None if rand is None else rand[:, :, ns]
        final, ip, ineg, nn, lost = _chunk(unit, fidelity, A, Bc, Cc, rc, cfmt)
        res = _output(unit, final)
        res = torch.where(ip, math.inf, res)
        res = torch.where(ineg, -math.inf, res)
        res = torch.where(nn, math.nan, res)
        out[:, :, ns] = res
        lost_all[:, :, ns] = lost
    out = _apply_specials(unit, out, nan, pos, neg)
    if bool(lost_all.any()):
        out = _fallback(unit, a, b, c, out, lost_all & ~(nan | pos | neg), rand)
    return out.reshape(out_shape)


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


def _apply_specials(unit, out, nan, pos, neg):
    if not bool((nan | pos | neg).any()):
        return out
    fmt = unit.out_format
    big = math.inf if fmt.has_inf and unit.output_overflow is not Overflow.SATURATE else float(
        fmt.max)
    out = torch.where(pos, big, out)
    out = torch.where(neg, -big, out)
    return torch.where(nan, math.nan, out)


def _fallback(unit, a, b, c, out, mask, rand):
    """Recompute the outputs flagged in ``mask`` with the exact reference (rare)."""
    from .reference import dot

    out = out.clone()
    idx = mask.nonzero().tolist()
    for bi, m, n in idx:
        rr = None if rand is None else rand[bi, m, n].tolist()
        out[bi, m, n] = dot(a[bi, m].tolist(), b[bi, :, n].tolist(), unit,
                            float(c[bi, m, n]), rand=rr)
    return out


def fast_divergence(a: torch.Tensor, b: torch.Tensor, unit: MatrixUnit | str,
                    c: torch.Tensor | None = None) -> dict[str, float]:
    """How far ``fidelity="fast"`` is from bit-exact on these inputs.

    Returns ``{"fraction_differ": ..., "max_ulp": ..., "n": ...}`` where ulps are those of the
    output format at the bit-exact result (NaN/inf outputs compare by identity).
    """
    unit = get_unit(unit)
    exact = matmul(a, b, unit, c, "bit-exact")
    fast = matmul(a, b, unit, c, "fast")
    same = (exact == fast) | (torch.isnan(exact) & torch.isnan(fast))
    fmt = unit.out_format
    fin = torch.isfinite(exact) & torch.isfinite(fast)
    ex64 = exact.to(torch.float64)
    _, ee = torch.frexp(ex64.abs())
    m = fmt.man_bits if isinstance(fmt, FloatFormat) else 0
    emin = fmt.emin if isinstance(fmt, FloatFormat) else 0
    e = torch.maximum(ee.to(torch.int64) - 1, torch.full_like(ee, emin, dtype=torch.int64))
    if unit.block_result_bits is not None:
        m = unit.block_result_bits
    ulp = torch.ldexp(torch.ones_like(ex64), (e - m).to(torch.float64))
    diff = ((fast.to(torch.float64) - ex64).abs() / ulp)[fin]
    return {
        "n": float(exact.numel()),
        "fraction_differ": float((~same).float().mean()),
        "max_ulp": float(diff.max()) if diff.numel() else 0.0,
        "nonfinite_mismatch": float((~same & ~fin).sum()),
    }
