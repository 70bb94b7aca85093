"""The compiled bit-exact block chain (kernel ``fused-chain``): the float chain, fused.

The bit-exact float chain (:func:`.float_chain.chunk_float`) forms, for every
block of ``k`` products and every output, the alignment exponent ``E`` (the largest product
exponent of the block, or the running sum's exponent if larger), truncates every product to
``F`` fraction bits below ``E`` and sums the integers (docs/arithmetic.md section 4, steps 2-4).
Eagerly that is six passes over ``k*M*N`` elements per block. This module computes the same
bits with two changes of method:

* **the exponent maximum as a matrix product.** For alignment exponents ``e`` of the inputs
  and ``c = bitlen(k)`` (so ``2^c > k``), ``P = sum_i 2^(c*ea_i) * 2^(c*eb_i)`` lies in
  ``[2^(c*Emax), k*2^(c*Emax)]`` with ``Emax = max_i (ea_i + eb_i)``, hence
  ``Emax = floor(floor(log2 P) / c)``. ``P`` is one ordinary float matmul of two tensors of
  powers of two (BLAS speed). Its rounding cannot move ``floor(log2 P)`` out of
  ``[c*Emax, c*Emax + c - 1]``: every term is positive, so every rounded partial sum stays at
  or above the largest term ``2^(c*Emax)``; the exact sum is at most ``k*2^(c*Emax)``, a
  factor ``2^c/k >= 1 + 1/k`` below ``2^(c*Emax + c)``, far more than the float sum's
  relative error (below ``k*2^-24``). Zeros contribute 0 (an all-zero block gives ``P = 0``).
  The dtype is float32 when ``c*(emin_a+emin_b) >= -126`` and ``c*(emax_a+emax_b+1) <= 127``
  (E4M3 pairs with ``k <= 63``), else float64 (E5M2).
* **the truncated sum and the block rounding as one compiled kernel** (torch.compile, inductor
  C++ on CPU): the scaled products ``a_i*b_i*2^(F-E)`` are converted to int32 (truncation
  toward zero) and summed in registers, then the block sum is rounded to the block format in
  the same kernel with int32 arithmetic (bit length from the exponent of float32(S), shifts,
  the rounding decision of :data:`precisim.formats.rounding.ROUNDING_RULES`: every
  deterministic mode) and float32 powers of two built from their bits. The power of two
  ``2^(F-E)`` is an input of that kernel, computed by a small one before it, so that the
  inner loop is multiply, multiply, convert, add. Inductor's CPU code runs int64, float64,
  table lookups and bool outputs lane by lane, so the kernels use none of them on the outputs
  (the two masks come back as bits of one int32 tensor).

A third kernel (:func:`promote_kernel`) adds a partial sum to the fp32 promotion register. The
rare cases stay eager: an overflowed block result, and the IEEE sign of a zero sum where a
running sum is -0.

**Calls per GEMM.** Without promotion every block is one ``prepare`` and one ``block`` call
(:func:`_blocks`), and the host reads the block's flags once. A promoting unit (DeepSeek FP8:
k = 32, a promotion every 4 blocks) runs each promotion interval of full blocks as two
compiled calls: :func:`interval_kernel` (the interval's ``prepare`` and ``block`` steps in
sequence, from the +0 running sum a promotion leaves, their flags reduced to one scalar) and
:func:`checked_promote` (the promotion, kept out of the blocks' loops because its float64
steps would make inductor run them lane by lane, and whether the register stayed finite);
the exponent maxima of the interval's blocks are one batched matmul into a buffer reused
across intervals, and the host reads one scalar per interval. Where that scalar reports a
rare case (an overflowed block, a possible int32 sum overflow, a register that is not
finite), and for an interval with a partial block, the interval is computed again block by
block from the register before it, as without promotion. For one deepseek-fp8 bit-exact
SmolLM2-135M forward (1024 tokens) that is 2520 compiled calls instead of 10620.

The result is bit-identical to the eager float chain (tests/test_emulation_fused_chain.py
compares them, and both with the exact reference, on adversarial data); the dispatcher takes
it wherever :func:`supports` holds (H100 E4M3 / E5M2 and DeepSeek FP8 units and their
variants) unless compiled kernels are off (``PRECISIM_BACKEND=eager``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from precisim.formats import FloatFormat, Overflow, Rounding
from precisim.formats import kernels as compiled
from precisim.formats.rounding import BitsRemainder, round_up

from ..matrix_unit import MatrixUnit
from .call import GemmCall
from .float_chain import (
    CHAIN_FIELDS,
    block_spec,
    chain_kernel_dtype,
    chain_start,
    finish,
    float_chain_ok,
    promote,
    sums_refusal,
)
from .floatarith import all_finite, any_true, fexp32, fexp64, pow2_32, pow2_64, round_float
from .intarith import NEG_BIG_32
from .registry import Kernel, register_kernel

__all__ = ["block_max_exponent", "checked_promote", "exponent_of_sum", "exponent_powers",
           "interval_kernel", "make_kernels", "pow_dtype", "promote_kernel", "sum_guard"]


def pow_dtype(fa: FloatFormat, fb: FloatFormat, k: int) -> torch.dtype | None:
    """dtype of the exponent-maximum matmul for every input of these formats and block size
    (None: the powers 2^(c*e) do not fit float64): :func:`pow_plan` for the formats' whole
    exponent ranges."""
    plan = _plan(fa.emin, fa.emax, fb.emin, fb.emax, k)
    return None if isinstance(plan, str) else plan[0]


def _plan(lo_a: int, hi_a: int, lo_b: int, hi_b: int, k: int
          ) -> tuple[torch.dtype, int, int] | str:
    """(dtype, offset of a, offset of b) of the exponent-maximum matmul for alignment
    exponents in [lo_a, hi_a] and [lo_b, hi_b]: the operands are 2^(c*(e_a - off_a)) and
    2^(c*(e_b - off_b)), each a normal number, and so is every product of a pair and the sum
    of k products; or why no offsets do it."""
    c = k.bit_length()
    for dtype, lo, hi in ((torch.float32, -126, 127), (torch.float64, -1022, 1023)):
        up, down = hi // c, (-lo) // c  # c*x <= hi  <=>  x <= up;  c*x >= lo  <=>  x >= -down
        # the sums e_a + e_b - off: the smallest at -down, the largest leaving room for k terms
        off = lo_a + lo_b + down
        if c * (hi_a + hi_b - off) + c > hi:
            continue
        # each operand's own powers: off_a in [hi_a - up, lo_a + down], off - off_a likewise
        first = max(hi_a - up, off - lo_b - down)
        last = min(lo_a + down, off - hi_b + up)
        if first <= last:
            off_a = (first + last) // 2
            return dtype, off_a, off - off_a
    return (f"the operands' exponents span {hi_a - lo_a} and {hi_b - lo_b} binades: the "
            f"powers 2^(c*e) of the block-maximum matmul (c = {c}) do not fit float64")


def pow_plan(call: GemmCall) -> tuple[torch.dtype, int, int] | str:
    """(dtype, offset of a, offset of b) of the exponent-maximum matmul for these operands
    (their actual exponent ranges), or why it cannot be formed."""
    ra, rb = call.exponent_range(0), call.exponent_range(1)
    if ra is None or rb is None:  # an operand is all zeros
        return torch.float32, 0, 0
    return _plan(ra[0], ra[1], rb[0], rb[1], call.unit.block_size)


def exponent_powers(e: torch.Tensor, zero: torch.Tensor, k: int, dtype: torch.dtype,
                    offset: int = 0) -> torch.Tensor:
    """2^(c*(e - offset)) (0 where ``zero``) in ``dtype``, c = bitlen(k): the operands of
    :func:`block_max_exponent`."""
    c = k.bit_length()
    ce = (e.to(torch.int32) - offset) * c
    ce = torch.where(zero, 0, ce)
    p = pow2_32(ce) if dtype == torch.float32 else pow2_64(ce)
    return torch.where(zero, 0.0, p).to(dtype)


def exponent_of_sum(P: torch.Tensor, c: int) -> torch.Tensor:
    """Emax from the exponent-maximum matmul ``P`` (> 0; the result is meaningless where
    P == 0): floor(log2 P) lies in [c*Emax, c*Emax + c - 1], so Emax = floor((floor(log2 P)
    + 0.5) / c), taken in float32 (exact enough: the margin is 0.5/c) because inductor's CPU
    code divides integers lane by lane. int32 (B, M, N)."""
    x = fexp32(P) if P.dtype == torch.float32 else fexp64(P).to(torch.int32)
    return torch.floor((x.to(torch.float32) + 0.5) * (1.0 / c)).to(torch.int32)


def block_max_exponent(pa: torch.Tensor, pb: torch.Tensor, k: int, offset: int = 0
                       ) -> torch.Tensor:
    """max_i (ea_i + eb_i) over one block, for every output: (B, M, N) int32 (NEG_BIG_32
    where every product of the block is zero). pa: (B, M, kb) powers from
    :func:`exponent_powers`, pb: (B, kb, N) likewise, kb <= k, their offsets summing to
    ``offset``. (The block kernels do the same from the matmul, in :func:`make_kernels`'
    ``prepare``.)"""
    P = torch.matmul(pa, pb)
    return torch.where(P == 0, NEG_BIG_32, exponent_of_sum(P, k.bit_length()) + offset)


# ---------------------------------------------------------------------------------------------
# the compiled block kernels

def _p2(n: torch.Tensor) -> torch.Tensor:
    """2.0**n in float32 for int32 n, exact for n in [-126, 127] (n is clamped to it)."""
    return pow2_32(n.clamp(-126, 127))


def _times_pow2(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """x * 2^n in float32 in two steps of at most 2^±64 each: exact whenever the result is
    representable (x a float32 value; |n| <= 252)."""
    h = n >> 1  # floor(n / 2)
    return (x * _p2(h)) * _p2(n - h)


def sum_guard(sum_bound: int, c: int) -> int:
    """The threshold of the int32-overflow flag of the block kernel (:func:`make_kernels`,
    used where ``sum_bound`` > 2^30): a multiple of 2^7 below 2^30 (so a float32 value) such
    that ``approx = fl32(|fl32(sum v_i)| + |fl32(ct)|) <= T`` implies ``|S| < 2^30`` for the
    integer block sum ``S = sum trunc(v_i) + ct`` of fewer than ``2^c`` terms with
    ``sum |v_i| + |ct| <= sum_bound``. The margin covers the truncations (< 1 per term), the
    float32 sum (error <= gamma_(n-1) * sum |v_i| < 2^c * 2^-23 * sum_bound, Higham, *Accuracy
    and Stability of Numerical Algorithms*, 2nd ed., section 4.2, any order), the rounding of
    ct to float32 and of the final addition (<= 2^-24 * 2^30 = 2^6)."""
    terms = 1 << c
    err_sum = -(-(terms * sum_bound) >> 23)
    err_ct = -(-sum_bound >> 23)
    margin = terms + err_sum + err_ct + (1 << 6) + 1
    return ((1 << 30) - margin) >> 7 << 7


def make_kernels(F: int, c: int, acc_emin: int, floor: int | None, use_floor: bool, m: int,
                 bemin: int, max_val: float, rounding: Rounding, saturate: bool,
                 sum_bound: int = 1 << 24
                 ) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(prepare, block) kernels of one unit; the unit's constants are closed over (one
    compilation per unit, dynamic shapes). Only int32 and float32 arithmetic (and bit casts)
    on the outputs: no int64, no float64, no table lookups, which inductor's CPU code runs
    lane by lane. The running sum of the block chain is carried as ``part`` (float32: every
    block result of the units :func:`supports` admits is a
    float32 value) with ``pe``, its alignment exponent (int32: max(floor(log2|part|),
    acc_emin), NEG_BIG_32 for 0), which the block kernel derives from its integer sum.

    ``prepare(P, off, part, pe, es, sz)`` -> (E, mult, ct): from the exponent-maximum matmul
    ``P`` (:func:`block_max_exponent`'s operand powers summed, their offsets summing to the
    int32 scalar ``off``; a float32 P is given as its int32 bits), the block's alignment
    exponent E (the products' maximum plus the scale exponent ``es``, against ``pe``), the
    float32 factor 2^(F-E+es) of the products as its int32 bits (0 where no product is
    nonzero) and the running sum aligned to E and truncated (int32), from ``part`` given as
    its int32 bits. (Bit views of inputs and outputs are free outside the kernel; inside,
    inductor's CPU code copies every vector through the stack for them.) ``es``/``sz``: None,
    or the exponents and zero mask of in-block power-of-two scales.

    ``block(a, bt, mult, ct, E)`` -> (part, pe, flags): the integer block sum
    S = sum_i trunc(a_i*b_i*mult) + ct, its value S*2^(E-F) rounded to the block format
    (``m`` fraction bits, minimum exponent ``bemin``; any deterministic ``rounding``, decided
    by the rounding table), the new alignment exponent, and int32 flags: bit 0 where S == 0
    (the result is +0; the caller gives the zero its IEEE sign where that can be -0), bit 1
    where the result overflowed (above ``max_val``; with ``saturate`` it is clamped
    instead), bit 2 where |S| may reach 2^30, beyond which the int32 sum and the rounding
    below are not exact (only when ``sum_bound``, a bound on |S|, exceeds 2^30: the float32
    sum of the scaled products above :func:`sum_guard`; those outputs are recomputed exactly
    by the caller). a: (B, M, kb) float32, bt:
    (B, kb, N) float32.
    """
    lim = 1 << (m + 1)
    e_max = math.frexp(max_val)[1] - 1

    inv_c = 1.0 / c
    wide = sum_bound > 1 << 24  # |S| may not be exact in float32
    guard = sum_bound > 1 << 30  # |S| may reach 2^30
    if guard:
        limit = float(sum_guard(sum_bound, c))  # a plain float, exact in float32

    def prepare(P, off, part, pe, es=None, sz=None):
        zero_blk = P == 0
        if P.dtype == torch.int32:  # the bits of a float32 P >= +0 (normal or 0)
            x = (P >> 23) - 127
            Ep = torch.floor((x.to(torch.float32) + 0.5) * inv_c).to(torch.int32) + off
        else:
            Ep = exponent_of_sum(P, c) + off
        if es is not None:
            zero_blk = zero_blk | sz
            Ep = Ep + es
        Ep = torch.where(zero_blk, NEG_BIG_32, Ep)
        E = torch.maximum(Ep, pe)
        if floor is not None:
            E = torch.clamp(E, min=floor)
        d = F - E
        dt = d if es is None else d + es
        # the bits of float32 2^dt (+0 where no product is nonzero)
        mult = torch.where(zero_blk, 0, (dt.clamp(-126, 127) + 127) << 23)
        # part (given as its float32 bits) times 2^d, truncated, in integers: part =
        # sig * 2^(max(ex, 1) - 150); |part * 2^d| < 2^(F+1), so a left shift stays small
        mag = part & 0x7FFFFFFF
        ex = mag >> 23
        sig = torch.where(ex == 0, mag, (mag & 0x7FFFFF) | 0x800000)
        sh = torch.clamp(ex, min=1) - 150 + d
        # one shift of the two is by 0: no select on sh's sign. (GCC 12 at -O3 -march=native
        # on an AVX-512 CPU inverted such a select in inductor's AVX2 code; reproducible mode
        # now builds that code for x86-64-v3, eval/numerics.py, and this form needs no select;
        # tests/test_emulation_fused_chain.py runs the kernels pinned to AVX2)
        r = (-sh).clamp(0, 31)
        q = (sig << sh.clamp(0, 31)) >> r
        if use_floor:  # floor: a negative part with dropped bits goes one further down
            q = q + ((part < 0) & ((q << r) < sig)).to(torch.int32)
        ct = torch.where(part < 0, -q, q)
        return E, mult, ct

    def block(a, bt, mult, ct, E):
        v = a[:, :, :, None] * bt[:, None, :, :] * mult[:, :, None, :]
        t = v.to(torch.int32)
        if use_floor:
            t = t - (t.to(v.dtype) > v).to(torch.int32)
        S = t.sum(2, dtype=torch.int32) + ct
        n = S.abs()
        # bit length from the exponent of float32(n) (one too many where the conversion
        # rounded n up to a power of two: n >= 2^24 only)
        L = torch.where(n == 0, 0, (n.to(torch.float32).view(torch.int32) >> 23) - 126)
        if wide:
            over = ((n >> (L - 1).clamp(min=0)) == 0) & (n > 0)
            L = L - over.to(torch.int32)
        base = E - F
        e = base + L - 1
        g = torch.maximum(e, torch.full_like(e, bemin)) - m
        sh = g - base
        shc = sh.clamp(0, 31)
        q = torch.where(sh > 0, n >> shc, n)
        # the remainder below the kept bits; beyond 31 bits of shift n (< 2^24) is all
        # remainder and half an ulp (2^30 stands for it) exceeds it
        rem = torch.where(sh > 31, n, n - (q << shc))
        half = torch.where((sh > 31) | (sh <= 0), 1 << 30, 1 << (shc - 1).clamp(min=0))
        up = round_up(rounding, BitsRemainder(q, rem, half, S < 0))
        carry = torch.zeros_like(sh > 0)
        if up is not None:
            q = q + up.to(torch.int32)
            carry = (sh > 0) & (q >= lim)
        gq = torch.where(sh > 0, g, base).clamp(-252, 252)
        val = _times_pow2(q.to(torch.float32), gq)
        ovf = val > max_val
        pe = torch.where(q == 0, NEG_BIG_32,
                         torch.maximum(e + carry.to(torch.int32), torch.full_like(e, acc_emin)))
        if saturate:
            val = torch.where(ovf, max_val, val)
            pe = torch.where(ovf, e_max, pe)
            ovf = torch.zeros_like(ovf)
        part = torch.where(S < 0, -val, val)
        # the masks as one int32 tensor (bool outputs are stored lane by lane)
        flags = (S == 0).to(torch.int32) | (ovf.to(torch.int32) << 1)
        if guard:
            approx = v.sum(2).abs() + ct.to(torch.float32).abs()
            flags = flags | ((approx > limit).to(torch.int32) << 2)
        return part, pe, flags

    return prepare, block


def promote_kernel(reg: torch.Tensor, part: torch.Tensor, s: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The promotion register RNE_fp32(reg + s*part) of finite float32 ``reg`` and ``part``
    (``s``: float64 scale products holding float32 values, or None for 1): one correctly
    rounded addition. With a scale, s*part is exact in float64 and the float64 sum is made
    round-to-odd from the exact error of TwoSum before the rounding to float32 (53 >= 24 + 2
    bits: the double rounding is innocuous), as in :func:`.floatarith.sum_to_f32`."""
    if s is None:
        return reg + part
    x = reg.to(torch.float64)
    y = s * part.to(torch.float64)
    t = x + y
    bb = t - x
    err = (x - (t - bb)) + (y - bb)
    bits = t.view(torch.int64)
    fix = (err != 0) & ((bits & 1) == 0)
    step = torch.where((err > 0) == (t > 0), 1, -1)
    return torch.where(fix, bits + step, bits).view(torch.float64).to(torch.float32)


def _promote_scaled_exact(reg, part, sa, sb):
    """:func:`promote_kernel` with the scale product s = sa*sb (exact in float64) formed in
    the kernel from A's (B, M, 1) and B's (B, 1, N) scales, not read as a (B, M, N) tensor."""
    return promote_kernel(reg, part, sa * sb)


def _promote_scaled_fp32(reg, part, sa, sb):
    """:func:`_promote_scaled_exact` with s = fl32(sa*sb) (RNE), as :meth:`.call.Scales.at`
    forms it for scales whose product is not exact."""
    return promote_kernel(reg, part, (sa * sb).to(torch.float32).to(torch.float64))


#: the promotion kernel per kind of scaling: None (unscaled), "exact" or "fp32" scale products
_PROMOTE: dict[str | None, Callable[..., Any]] = {
    None: promote_kernel, "exact": _promote_scaled_exact, "fp32": _promote_scaled_fp32}


# ---------------------------------------------------------------------------------------------
# the chain

def supports(call: GemmCall) -> str | None:
    """Why the compiled chain does not compute ``call`` (None: it does): it needs what the
    eager float chain needs with its float32 block kernel (:func:`.float_chain.
    chain_kernel_dtype`), float input formats whose exponent powers fit a float matmul, block
    results that are float32 values (a deterministic rounding, not flushed, with the
    accumulator's minimum exponent), integer block sums below 2^24, K-blocked scales (if any)
    applied at promotion or powers of two, and compiled kernels switched on."""
    unit, sc = call.unit, call.scales
    why = float_chain_ok(unit)
    if why is not None:
        return why
    why = sums_refusal(unit)
    if why is not None:
        return why
    if compiled.get_backend() == "eager":
        return "compiled kernels are off (precisim.formats.set_backend('eager') or " \
            "PRECISIM_BACKEND=eager)"
    fa, fb, bf = unit.a_format, unit.b_format, unit.block_format
    if not (isinstance(fa, FloatFormat) and isinstance(fb, FloatFormat)):
        return "an input format is not a float format"
    sp = block_spec(unit)
    if sp.flush:
        return "block results are flushed to zero"
    if not (sp.m <= 23 and sp.emin - sp.m >= -149 and sp.emin == unit.acc_format.emin
            and sp.max_exp + sp.max_sig.bit_length() <= 128 and isinstance(bf, FloatFormat)):
        return f"block results in {bf.name} are not float32 values with fp32's range"
    if sc is not None and sc.has_k and not unit.promotion_interval and not sc.pow2:
        return "in-block scales that are not powers of two"
    if chain_kernel_dtype(call) != torch.float32:
        return ("these operands' exponents need the float64 block kernel (products or "
                "powers of two outside float32's normal range)")
    plan = pow_plan(call)
    return plan if isinstance(plan, str) else None


def sum_bound(unit: MatrixUnit) -> int:
    """A bound on |S|, the integer block sum of the compiled kernel: k terms below 2^(F+2)
    (unnormalised products: significands below 4) and the aligned c below 2^(F+1)."""
    F = unit.alignment_bits
    return unit.block_size * (1 << (F + 2)) + (1 << (F + 1))


def _kernels_of(unit):
    """(key, prepare, block) of a unit (see :func:`make_kernels`)."""
    sp = block_spec(unit)
    args = dict(F=unit.alignment_bits, c=unit.block_size.bit_length(),
                acc_emin=unit.acc_format.emin, floor=unit.alignment_floor,
                use_floor=unit.drop.value == "floor", m=sp.m, bemin=sp.emin,
                max_val=sp.max_value, rounding=sp.rounding,
                saturate=sp.overflow is Overflow.SATURATE, sum_bound=sum_bound(unit))
    key = ("fused-chain", *sorted((k, str(v)) for k, v in args.items()))
    return key, *make_kernels(**args)


def _exact_sums(unit, flags, r, pe, a_j, b_j, mult, ct, E):
    """Outputs whose int32 block sum may have overflowed (flag bit 2): the block sum again in
    int64, rounded with the exact float64 rounding of the eager chain. Returns the updated
    (flags, r, pe)."""
    wi = ((flags & 4) != 0).nonzero(as_tuple=True)
    p = a_j[wi[0], wi[1]].double() * b_j[wi[0], :, wi[2]].double()  # (n, kb): exact
    v = p * mult[wi].double().unsqueeze(-1)
    t = v.to(torch.int64)
    if unit.drop.value == "floor":
        t = t - (t.to(v.dtype) > v).to(torch.int64)
    S = t.sum(-1) + ct[wi].to(torch.int64)
    val = S.double() * pow2_64((E[wi] - unit.alignment_bits).to(torch.int64))  # exact
    rv, ovf = round_float(val, block_spec(unit))
    acc_emin = unit.acc_format.emin
    e = torch.where(rv != 0, torch.clamp(fexp64(rv.abs().clamp(min=1e-300)), min=acc_emin),
                    NEG_BIG_32)
    r, pe, flags = r.clone(), pe.clone(), flags.clone()
    r[wi] = rv.to(torch.float32)
    pe[wi] = e.to(torch.int32)
    flags[wi] = (S == 0).to(torch.int32) | (ovf.to(torch.int32) << 1)
    return flags, r, pe


def _rare(flags, r, pe, a_j, b_j, part, sz, tpn, negz: bool = True):
    """The rare cases of a fused block (see :func:`chunk_fused`): an integer sum of 0 gets the
    IEEE sign of zero (-0 only when every product and the running sum are zeros of negative
    sign); an overflowed result sets the flags ``tpn`` = (positive, negative) once and leaves
    0. Returns the block results and their exponents."""
    zero = (flags & 1) != 0
    if negz and any_true(zero):  # IEEE: the sum of zeros is -0 only if all are -0
        zi = zero.nonzero(as_tuple=True)
        p = a_j[zi[0], zi[1]] * b_j[zi[0], :, zi[2]]  # (zeros, w)
        pz = p == 0
        if sz is not None:
            pz = pz | sz[zi].unsqueeze(-1)
        pzi = part[zi]
        allneg = (torch.signbit(p) & pz).all(-1) & torch.signbit(pzi) & (pzi == 0)
        r[zi] = torch.where(allneg, -0.0, r[zi])
    ovf = (flags & 2) != 0
    if any_true(ovf):
        tp, tn = tpn
        fresh = ovf & ~(tp | tn)
        tp |= fresh & (r > 0)
        tn |= fresh & (r < 0)
        r = torch.where(ovf, 0.0, r)
        pe = torch.where(ovf, NEG_BIG_32, pe)
    return r, pe


def interval_kernel(prepare: Callable[..., Any], block: Callable[..., Any], nb: int
                    ) -> Callable[..., Any]:
    """The blocks of one promotion interval, ``nb`` full blocks (:func:`chunk_fused`), in one
    compiled call: the ``nb`` :func:`make_kernels` steps, ``prepare`` then ``block``, from a
    running sum of +0 (docs/arithmetic.md section 4, steps 2-5).

    ``interval(a4, b4, P, off)`` -> (part, bad, *mults): a4 (B, M, nb, k) and b4
    (B, nb, k, N) float32 operands, P (B, nb, M, N) the blocks' exponent-maximum matmuls (a
    float32 P as its int32 bits), ``off`` as in ``prepare``; ``part`` the running sum after
    the last block and ``bad`` (a float32 scalar) nonzero where a block flagged an
    overflowed result or a possible int32 sum overflow (flag bits 1 and 2). Where ``bad`` is
    0 the per-block path gives the same ``part``: its rare cases are the flagged ones and the
    sign of a zero block sum, which the kernel leaves +0 as that path does when no running
    sum is -0 (a running sum starts at +0 after each promotion and becomes -0 only through
    the rare path of an overflowed block). ``mults``: the blocks' factors 2^(F-E), outputs
    only so that inductor stores them once (an intermediate would be computed again for
    each of the k products that read it: a broadcast read is not reuse to its heuristics)."""

    def interval(a4, b4, P, off):
        shape = P[:, 0].shape
        part = torch.zeros(shape, dtype=torch.float32, device=P.device)
        pe = torch.full(shape, NEG_BIG_32, dtype=torch.int32, device=P.device)
        acc = None
        mults = []
        for i in range(nb):
            E, mult, ct = prepare(P[:, i], off, part.view(torch.int32), pe)
            mult = mult.view(torch.float32)
            mults.append(mult)
            part, pe, flags = block(a4[:, :, i], b4[:, i], mult, ct, E)
            acc = flags if acc is None else acc | flags
        return part, (acc > 1).to(torch.float32).amax(), *mults

    return interval


def checked_promote(promo: str | None) -> Callable[..., Any]:
    """The promotion after :func:`interval_kernel` as its own compiled call (its float64
    steps, fused into the blocks' loops, would make inductor run those loops lane by lane):
    ``promote(reg, part, bad, *sab)`` -> (new, bad'), ``new`` from :func:`promote_kernel`
    (``promo`` None), :func:`_promote_scaled_exact` (``"exact"``) or
    :func:`_promote_scaled_fp32` (``"fp32"``) with the scale factors ``sab``, and ``bad'``
    nonzero where ``bad`` is or ``new`` is not finite everywhere."""
    fn = _PROMOTE[promo]

    def promote(reg, part, bad, *sab):
        new = fn(reg, part, *sab)
        return new, torch.maximum(bad, (~torch.isfinite(new)).to(torch.float32).amax())

    return promote


def chunk_fused(call: GemmCall, a, pa, bt, pb, cval, ns: slice = slice(None), offset: int = 0):
    """The eager chain's blocks with the compiled kernels (same bits). a: (B, M, K) float32
    values, pa: their exponent powers (B, M, K); bt: (B, K, Nc), pb: (B, K, Nc) (the
    exponent offsets of pa and pb sum to ``offset``); cval: (B, M, Nc) incoming c (float32
    values).

    A promoting unit runs each promotion interval of full blocks as one compiled call
    (:func:`interval_kernel`, its exponent maxima one batched matmul) and only where that
    call reports a rare case (or for a last, partial block) block by block
    (:func:`_blocks`), from the register saved before the interval."""
    unit, sc = call.unit, call.scales
    k = unit.block_size
    K = a.shape[-1]
    nblk = max(1, -(-K // k))
    shape = tuple(cval.shape)
    dev = cval.device
    inf_pos, inf_neg, nan, per, scaled = chain_start(unit, cval, sc)
    acc_emin = unit.acc_format.emin
    reg = cval.to(torch.float32).contiguous()  # (never written in place)
    neg32 = torch.full(shape, NEG_BIG_32, dtype=torch.int32, device=dev)
    kkey, prepare, block = _kernels_of(unit)
    work = shape[0] * shape[1] * shape[2] * min(k, max(K, 1))
    off = torch.tensor(offset, dtype=torch.int32, device=dev)
    ctx = (call, kkey, prepare, block, a, pa, bt, pb, off, ns, work, neg32)
    if not per:
        c64 = cval.to(torch.float64)
        pe = torch.where(c64 != 0, torch.clamp(fexp64(c64), min=acc_emin), neg32)
        part, _ = _blocks(ctx, 0, nblk, reg, pe.to(torch.int32), (inf_pos, inf_neg))
        return finish(unit, part, inf_pos, inf_neg, nan, sc, ns)
    zero = torch.zeros_like(reg)  # the running sum after a promotion (read only)
    nfull = K // k  # blocks of k products
    B, M, Nc = shape
    if nfull and B * M * Nc:
        # the exponent powers blockwise, (B, nfull, M, k) and (B, nfull, k, Nc): one batched
        # matmul per interval gives every block's P
        pa4 = pa[:, :, :nfull * k].unflatten(2, (nfull, k)).transpose(1, 2).contiguous()
        pb4 = pb[:, :nfull * k].unflatten(1, (nfull, k))
        a4 = a[:, :, :nfull * k].unflatten(2, (nfull, k))
        b4 = bt[:, :nfull * k].unflatten(1, (nfull, k))
        # P of each interval into one buffer per chunk (a fresh tensor of that size is
        # mapped and faulted in again on every call: page faults cost as much as the matmul)
        pbuf: dict[int, torch.Tensor] = {}
    promo = None if not scaled else "exact" if sc.exact else "fp32"
    checked = checked_promote(promo)
    for j0 in range(0, nblk, per):
        j1 = min(j0 + per, nblk)
        lo_p = j0 * k
        sab = sc.factors(lo_p, ns) if scaled else ()
        if j1 <= nfull and B * M * Nc:
            fn = interval_kernel(prepare, block, j1 - j0)
            buf = pbuf.get(j1 - j0)
            if buf is None:
                buf = pbuf[j1 - j0] = torch.empty((B, j1 - j0, M, Nc), dtype=pa.dtype,
                                                  device=dev)
            P = torch.matmul(pa4[:, j0:j1], pb4[:, j0:j1], out=buf)
            Pv = P.view(torch.int32) if P.dtype == torch.float32 else P
            part, bad, *_ = compiled.run(fn, (*kkey, "interval", j1 - j0), work,
                                         a4[:, :, j0:j1], b4[:, j0:j1], Pv, off)
            new, bad = compiled.run(checked, ("fused-promote-checked", promo), work, reg,
                                    part, bad, *sab)
            if not float(bad):
                reg = new
                continue
        # block by block (a rare case, or a partial block), from the register before
        part_pos, part_neg = torch.zeros_like(inf_pos), torch.zeros_like(inf_pos)
        part, part_ovf = _blocks(ctx, j0, j1, zero, neg32, (part_pos, part_neg))
        new = compiled.run(_PROMOTE[promo], ("fused-promote", promo), work, reg, part, *sab)
        if part_ovf or not all_finite(new):
            # the special values (rare): the (B, M, Nc) scale products after all
            s_p = sc.at(lo_p, ns, shape) if scaled else None
            reg = promote(reg, part, s_p, part_pos, part_neg, inf_pos, inf_neg, nan, new=new)
        else:
            reg = new
    # (finish takes float32 values as they are: no float64 copy)
    return finish(unit, reg, inf_pos, inf_neg, nan, sc, ns)


def _blocks(ctx, j0: int, j1: int, part, pe, tpn):
    """Blocks ``j0`` to ``j1 - 1`` of :func:`chunk_fused`, one compiled prepare and block call
    each, from the running sum ``part`` (float32) with alignment exponent ``pe``; ``tpn``:
    the (positive, negative) masks an overflowed block sets (see :func:`_rare`). Returns the
    running sum and whether a block overflowed (read by a promoting unit, whose ``part`` is a
    promotion's +0)."""
    call, kkey, prepare, block, a, pa, bt, pb, off, ns, work, neg32 = ctx
    unit, sc = call.unit, call.scales
    k = unit.block_size
    K = a.shape[-1]
    shape = tuple(part.shape)
    per = bool(unit.promotion_interval)
    inblock = sc is not None and sc.has_k and not per
    ovf_any = False
    negz = any_true(torch.signbit(part) & (part == 0))  # some running sum is -0
    for j in range(j0, j1):
        lo, hi = j * k, min((j + 1) * k, K)
        P = torch.matmul(pa[:, :, lo:hi], pb[:, lo:hi])  # exponent maxima (module docstring)
        Pv = P.view(torch.int32) if P.dtype == torch.float32 else P
        partv = part.view(torch.int32)
        sz = None
        if inblock:
            s = sc.at(lo, ns, shape)
            sz = s == 0
            es = torch.where(sz, 0, fexp64(s)).to(torch.int32)
            E, mult, ct = compiled.run(prepare, (*kkey, "prepare", True), work, Pv, off, partv,
                                       pe, es, sz)
        else:
            E, mult, ct = compiled.run(prepare, (*kkey, "prepare", False), work, Pv, off,
                                       partv, pe)
        mult = mult.view(torch.float32)
        a_j, b_j = a[:, :, lo:hi], bt[:, lo:hi]
        r, pe, flags = compiled.run(block, (*kkey, "block"), work, a_j, b_j, mult, ct, E)
        fl = int(flags.max())
        if fl >= 4:  # int32 sums that may have overflowed: exactly, in int64
            flags, r, pe = _exact_sums(unit, flags, r, pe, a_j, b_j, mult, ct, E)
            fl = int(flags.max())
        # a zero sum is +0 (as the kernel returns it) unless the running sum is -0
        if fl >= 2 or (fl == 1 and negz):
            r, pe = _rare(flags, r, pe, a_j, b_j, part, sz, tpn, negz)
            ovf_any = ovf_any or fl >= 2
            negz = any_true(torch.signbit(r) & (r == 0))
        part = r
    return part, ovf_any


def _run(call: GemmCall) -> torch.Tensor:
    """The chain through :func:`chunk_fused`, in column chunks of at most
    ``max_chunk_elements`` outputs (the compiled kernels use every torch thread)."""
    unit = call.unit
    k = unit.block_size
    Bt, M, _, N = call.shape
    ea, eb = call.exponents
    plan = pow_plan(call)
    assert not isinstance(plan, str), plan
    dt, off_a, off_b = plan
    # row-major (B, M, K) and (B, K, N): the block kernel loads vectors along N (a weight
    # arrives as the transposed view of an (N, K) tensor)
    a32, b32 = call.a.to(torch.float32).contiguous(), call.b.to(torch.float32).contiguous()
    pa = exponent_powers(ea, a32 == 0, k, dt, off_a).contiguous()
    pb = exponent_powers(eb, b32 == 0, k, dt, off_b).contiguous()
    c = call.c_or_zero()
    out = torch.empty((Bt, M, N), dtype=torch.float32, device=a32.device)
    step = max(1, call.max_chunk_elements // max(1, Bt * M))
    for n0 in range(0, N, step):
        ns = slice(n0, min(N, n0 + step))
        out[:, :, ns] = chunk_fused(call, a32, pa, b32[:, :, ns], pb[:, :, ns], c[:, :, ns],
                                    ns, off_a + off_b)
    return out


FUSED_CHAIN = register_kernel(Kernel(
    "fused-chain", "bit-exact", CHAIN_FIELDS, supports, _run, priority=10,
    description="the float chain compiled: block exponent maxima as one float matmul of "
    "powers of two, truncated sums and the block rounding in one int32/float32 kernel"))
