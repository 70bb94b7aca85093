"""Units whose blocks are summed exactly (kernel ``exact-blocks``): Kulisch accumulators,
sequential FMA, rounding after every add, exact blocks of k products (docs/arithmetic.md
section 4.8).

With ``alignment_bits=None`` a block's products and the incoming accumulator are summed
exactly and the sum is rounded once to the block format. This kernel forms the exact sum as a
float64 pair (hi, lo) with error-free additions (TwoSum, Knuth): each product (exact in float64:
two significands of <= 24 bits) is added to hi, and the exact error of that addition to lo; a
second TwoSum on lo records whether lo itself lost a bit. Where it did not (every output of
ordinary data: it needs products spread over more than ~50 binades), hi + lo *is* the exact
sum; it is rounded to the block format by rounding hi + lo to odd in float64 (53 bits) and
then to odd in float32 (24 bits), both with one TwoSum or one comparison, and finally with the
float32 rounding kernel of :mod:`precisim.formats.kernels` (every mode, overflow and flush
policy, through the rounding table): rounding to odd with p >= m + 2 bits first and then to m
bits is the correct rounding of the exact value. Outputs where lo lost a bit (or that became
infinite) are recomputed by the int64 chain. The steps run compiled, 16 products (or whole
blocks of k < 16) per kernel call, over every output at once. Sequential FMA under
round-to-nearest-even runs float32 variants instead (:func:`_sequential_variant`), 2-8
products per call (:data:`SEQ_CHUNK`).

Supported: float accumulators with at most 22 fraction bits (fp16, bf16, reduced-precision
block results), or fp32 with round-to-nearest-even; products exact or rounded to fp32 with
round-to-nearest-even (``product_format="fp32"``); no promotion; block scales that keep the
scaled products exact in float64.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from precisim.formats import FloatFormat, Rounding
from precisim.formats import kernels as compiled
from precisim.formats.kernels import KernelParams, round_bits

from ..matrix_unit import MatrixUnit
from .call import GemmCall
from .float_chain import finish
from .floatarith import any_true
from .registry import Kernel, register_kernel

__all__: list[str] = []

#: products per compiled call when a block is longer than this
CHUNK = 16
#: products per compiled call of a unit with one product per block (sequential FMA: a
#: rounding per product, so a larger unrolled kernel takes long to compile)
FMA_CHUNK = 8
#: products per compiled call of the float32 sequential variants (:func:`_sequential_variant`)
#: where fewer are faster (the compiled step's code stays small; measured at 512 x 4096
#: outputs on one thread, AMD EPYC: fp16 0.51 / 0.66 / 0.80 ns per product at 2 / 4 / 8,
#: bf16 0.27 at 4 and 0.33 at 8, emulated fp32 FMA 0.46 / 0.57 / 0.73 at 2 / 4 / 8)
SEQ_CHUNK = {("half", 5): 2, ("half", 8): 4, ("f32x", 8): 2}


def _fp32_rne(fmt, rounding: Rounding) -> bool:
    return (fmt.exp_bits, fmt.man_bits, fmt.bias) == (8, 23, 127) and (
        rounding is Rounding.NEAREST_EVEN)


def _refusal(call: GemmCall) -> str | None:
    unit = call.unit
    if unit.alignment_bits is not None:
        return "its blocks are not summed exactly (alignment_bits is set)"
    bf = unit.block_format
    if not isinstance(bf, FloatFormat) or not bf.signed:
        return f"the accumulator format {unit.acc_format.name} is not a signed float format"
    if unit.acc_rounding is Rounding.STOCHASTIC:
        return "the accumulator rounds stochastically"
    if bf.man_bits > 22 and not _fp32_rne(bf, unit.acc_rounding):
        return (f"block results of {bf.man_bits} fraction bits other than fp32 with "
                "round-to-nearest-even (the kernel rounds through float32 to odd)")
    if unit.product_format is not None and not _fp32_rne(unit.product_format,
                                                         unit.product_rounding):
        return "products are rounded to a format other than fp32 (round-to-nearest-even)"
    if unit.promotion_interval:
        return "the unit promotes its partial sums"
    if not isinstance(unit.out_format, FloatFormat):
        return f"the output format {unit.out_format.name} is not a float format"
    sc = call.scales
    if sc is not None and sc.has_k:
        bits = sum(f.man_bits + 1 if isinstance(f, FloatFormat) else f.bits
                   for f in (call.elem_formats or (unit.a_format, unit.b_format)))
        if bits + (0 if sc.pow2 else 24) > 53:
            return "its block-scaled products are not exact in float64"
    return None


def _two_sum(x, y):
    """(s, e): s = fl(x + y) and its exact error e (x + y = s + e; Knuth's TwoSum)."""
    s = x + y
    bb = s - x
    return s, (x - (s - bb)) + (y - bb)


def _sequential_variant(call: GemmCall) -> str:
    """For one product per block under round-to-nearest-even, how the running sum can be
    rounded without bit manipulation (:func:`_kernels`): ``"f32"`` an fp32 accumulator and
    products exact in float32 (one float32 addition is the unit's rounding), ``"f32x"`` an
    fp32 accumulator, exact (unrounded) products of fp32 values that are not exact in float32
    but whose Dekker halves are (:func:`_fma32`: float32 arithmetic only), ``"f64"`` an fp32
    accumulator and wider products (a float64 addition, corrected where it lands on a float32
    midpoint), ``"half"`` an fp16 or bf16 accumulator and products exact in float32 (a float32
    addition with its exact error, rounded on the float32 bits: :func:`_round_half32`);
    ``""`` the general rounding through odd values."""
    unit = call.unit
    if (unit.block_size != 1 or unit.acc_rounding is not Rounding.NEAREST_EVEN
            or unit.flush_output_subnormals or call.has_k_scales
            or (unit.product_format is not None
                and not _fp32_rne(unit.product_format, unit.product_rounding))):
        return ""
    bf, fa, fb = unit.block_format, unit.a_format, unit.b_format
    exact32 = False
    if isinstance(fa, FloatFormat) and isinstance(fb, FloatFormat) and (
            fa.man_bits + fb.man_bits + 2 <= 24):
        ra, rb = call.exponent_range(0), call.exponent_range(1)
        exact32 = ra is None or rb is None or (
            ra[0] + rb[0] - fa.man_bits - fb.man_bits >= -149 and ra[1] + rb[1] + 2 <= 127)
    shape = (bf.exp_bits, bf.man_bits, bf.bias)
    if shape == (8, 23, 127):
        if exact32:
            return "f32"
        return "f32x" if _fma32_ok(call) else "f64"
    if shape in ((5, 10, 15), (8, 7, 127)) and exact32:
        return "half"
    return ""


def _fma32_ok(call: GemmCall) -> bool:
    """Whether :func:`_fma32` computes every product of ``call`` exactly: unrounded products
    of float formats of at most 24 significant bits (fp32 values), every Veltkamp partial
    product at or above 2^-149 (the sum of the smallest alignment exponents, less both
    fraction widths, >= -149) and no operand at or above 2^115 (the split's 4097*x is finite).
    An operand all zeros is fine."""
    unit = call.unit
    fa, fb = unit.a_format, unit.b_format
    if unit.product_format is not None or not (
            isinstance(fa, FloatFormat) and isinstance(fb, FloatFormat)
            and fa.man_bits <= 23 and fb.man_bits <= 23):
        return False
    ra, rb = call.exponent_range(0), call.exponent_range(1)
    if ra is None or rb is None:
        return True
    return (ra[0] + rb[0] - fa.man_bits - fb.man_bits >= -149
            and ra[1] <= 114 and rb[1] <= 114)


def _split32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Veltkamp's split of float32 ``x`` (|x| < 2^115): (hi, lo), hi + lo = x exactly, each
    of at most 12 significant bits, so every product of two halves is exact in float32
    (docs/arithmetic.md section 4.8, emulated FMA). Both halves of -0 are -0."""
    x = x.to(torch.float32)
    g = x * 4097.0
    hi = g - (g - x)
    # a zero's halves are hi = x and lo = x, so hi + lo keeps the sign of -0
    return hi, torch.where(x == 0, x, x - hi)


def _fma32(c, a, b, ah, al, bh, bl):
    """RNE_fp32(c + a*b) of float32 ``c`` and the exact product of float32 a = ah + al and
    b = bh + bl (:func:`_split32` halves), in float32 arithmetic only (docs/arithmetic.md
    section 4.8, emulated FMA): Dekker's exact product a*b = ph + pl, TwoSum c + ph = th + tl,
    TwoSum tl + pl = u + ue and TwoSum th + u = w + we, so c + a*b = w + we + ue exactly.

    The result is w = RN(th + u) unless w + we is a float32 midpoint and ue != 0 has we's sign:
    then the exact value lies past the midpoint and the result is the other neighbour
    o = w + 2*we (exact). A midpoint is where o - w == 2*we (elsewhere 0 < |2*we| < the gap
    to w's neighbour, so o - w is 0 or the gap). ue cannot move a value that is not a midpoint
    across one: |ue| <= ulp(u)/2 while th + u is a multiple of ulp(u), which divides half an
    ulp of w (|u| <= 1.5 ulp(th), since |tl| <= ulp(th)/2 and |pl| <= ulp(ph)/2 <= ulp(th)
    unless c and ph cancel within a factor 2, where c + ph is exact and tl = ue = 0). This is
    the rounding to odd of Boldo & Melquiond ("Emulation of FMA and correctly rounded sums:
    proved algorithms using rounding to odd", IEEE TC 2008) decided by float comparisons
    instead of the last bit of RO(tl + pl) (a bit view costs more than the extra TwoSum,
    compiled). Exact where every partial product is at or above 2^-149 (:func:`_fma32_ok`);
    an overflow anywhere leaves an infinity or NaN (the caller recomputes those outputs).
    Where u is zero (tl + pl = 0 exactly) the result is th itself, so the IEEE sign of a
    zero sum is th's (th + 0 would turn -0 into +0)."""
    ph = a * b
    pl = (((ah * bh - ph) + ah * bl) + al * bh) + al * bl
    th, tl = _two_sum(c, ph)
    u, ue = _two_sum(tl, pl)
    w, we = _two_sum(th, u)
    we2 = we + we
    o = w + we2
    past = ((o - w) == we2) & (ue != 0) & ((ue > 0) == (we > 0))
    return torch.where(u == 0, th, torch.where(past, o, w))


def _round_half32(s: torch.Tensor, e: torch.Tensor, bf16: bool) -> torch.Tensor:
    """RNE of s + e (float32 ``s`` = fl(s + e), ``e`` its exact TwoSum error) to bf16
    (``bf16``) or fp16, as float32 (an fp16 overflow as inf); docs/arithmetic.md section 4.8,
    sequential FMA. Integer and float32 arithmetic only: no conversion to the narrow type
    (compiled, those cost 4x the rest of the step).

    In float32's normal range the rounding is integer arithmetic on the float32 bits: adding
    h - 1 + u (h: half the format's quantum in units of the last float32 bit, 2^15 for bf16,
    2^12 for fp16) and clearing the bits below the quantum rounds to nearest for either u in
    {0, 1} except at a midpoint (low bits exactly h), where u = 1 rounds up in magnitude and
    u = 0 down; u is the even-tie bit where e = 0 and whether e has s's sign otherwise (then
    the exact value lies past the midpoint, away from zero). A carry into the exponent gives
    the next binade (or inf), so for bf16 (float32's exponent range) this is the whole
    rounding, subnormals included. fp16 results of 2^16 and above are inf, and below 2^-14
    (fp16 subnormals: a fixed quantum 2^-24) s is rounded by (s + 0.75) - 0.75 (both exact
    but the first, a float32 rounding to the multiples of 2^-24 near 0.75, ties to even),
    the tie moved toward e where s is a midpoint and e != 0, a zero keeping s's sign."""
    bits = s.view(torch.int32)
    away = ((e.view(torch.int32) ^ bits) >= 0).to(torch.int32)  # e has s's sign
    inexact = e != 0
    shift = 16 if bf16 else 13
    u = torch.where(inexact, away, (bits >> shift) & 1)
    r = ((bits + ((1 << (shift - 1)) - 1) + u) & -(1 << shift)).view(torch.float32)
    if bf16:
        return r
    r = torch.where(r.abs() > 65504.0, r * math.inf, r)
    q = (s + 0.75) - 0.75
    d = s - q  # exact; +-2^-25 at a midpoint
    q = torch.where((d.abs() == 2.0 ** -25) & inexact & ((e > 0) == (d > 0)), q + 2 * d, q)
    q = torch.where(q == 0, s * 0.0, q)
    return torch.where(s.abs() < 2.0 ** -14, q, r)


def _sequential_kernel(unit: MatrixUnit, T: int, variant: str):
    """(steps, key) of a :func:`_sequential_variant`: T products, each added to the running
    sum ``hi`` and rounded. Results that overflow come back infinite (the caller recomputes
    them exactly). Variants other than ``"f64"`` keep ``hi`` and take the operands in
    float32 (:func:`_run` converts them once)."""
    bf = unit.block_format
    saturate = unit.acc_overflow.value == "saturate"
    mx = float(bf.max)

    def steps(hi, lo, bad, a_c, b_c, ah=None, al=None, bh=None, bl=None):
        if variant == "f32x":  # a_c, b_c: fp32 operands; ah, al, bh, bl: their halves
            c = hi
            for t in range(T):
                c = _fma32(c, a_c[:, :, t:t + 1], b_c[:, t:t + 1, :], ah[:, :, t:t + 1],
                           al[:, :, t:t + 1], bh[:, t:t + 1, :], bl[:, t:t + 1, :])
            return c, lo, bad
        if variant == "f32":
            c = hi
            for t in range(T):
                c = c + a_c[:, :, t:t + 1] * b_c[:, t:t + 1, :]
                if saturate:
                    c = c.clamp(-mx, mx)
            return c, lo, bad
        if variant == "f64":
            c = hi
            for t in range(T):
                s, e = _two_sum(c, a_c[:, :, t:t + 1] * b_c[:, t:t + 1, :])
                t64 = s.to(torch.float32).to(torch.float64)
                r = s - t64  # exact
                o = t64 + 2 * r  # the other float32 neighbour, when s is a midpoint
                mid = (r != 0) & (o.to(torch.float32).to(torch.float64) == o)
                c = torch.where(mid & (e != 0) & ((e > 0) == (r > 0)), o, t64)
            return c, lo, bad
        c, bf16 = hi, bf.exp_bits == 8
        for t in range(T):
            # c + a*b as s + e: the product is exact in float32, the TwoSum error too
            s, e = _two_sum(c, a_c[:, :, t:t + 1] * b_c[:, t:t + 1, :])
            c = _round_half32(s, e, bf16)
        return c, lo, bad

    return steps, ("exact-blocks-seq", unit.with_(name="-", description=""), T, variant)


@cache
def _kernels(unit: MatrixUnit, T: int, ends: tuple[int, ...], variant: str = ""):
    """(steps, key): the compiled step function for chunks of T products whose blocks end
    after the positions ``ends`` (within the chunk), and its cache key; ``variant``: see
    :func:`_sequential_variant`."""
    if variant:
        return _sequential_kernel(unit, T, variant)
    bf = unit.block_format
    params = KernelParams.of(bf)
    rounding, overflow = unit.acc_rounding, unit.acc_overflow
    flush = unit.flush_output_subnormals
    rne32 = _fp32_rne(bf, rounding)
    # fp32, round-to-nearest-even, overflow to inf, no flushing: float64 -> float32 is it
    plain32 = rne32 and overflow.value == "inf" and not flush
    round_products = unit.product_format is not None
    fma = ends == tuple(range(T))  # a block per product: the running sum is the state

    def round_pair(s, err):
        """s + err (s = fl(s + err), err exact) rounded to the block format (float64)."""
        bits = s.view(torch.int64)
        fix = (err != 0) & ((bits & 1) == 0) & (s.abs() < math.inf)
        bits = bits + torch.where(fix, torch.where((err > 0) == (s > 0), 1, -1), 0)
        s_ro = bits.view(torch.float64)  # rounded to odd at 53 bits
        t = s_ro.to(torch.float32)  # rounded to nearest-even at 24 bits
        if plain32:
            return t.to(torch.float64)
        tb = t.view(torch.int32)
        if not rne32:  # to odd at 24 bits instead (m <= 22: two bits to spare)
            back = t.to(torch.float64)
            fix32 = (back != s_ro) & ((tb & 1) == 0) & (t.abs() < math.inf)
            step = torch.where(fix32, torch.where(back.abs() < s_ro.abs(), 1, -1), 0)
            tb = tb + step.to(torch.int32)
        # the block format's rounding (fp32 with RNE: only its overflow and flush policies)
        out = round_bits(tb, None, params, rounding, overflow, 0, flush, None, 0)
        return out.view(torch.float32).to(torch.float64)

    # which products end a block, as Python bools (dynamo traced ``t in ends`` on a closure
    # tuple of ints as always False under dynamic shapes)
    round_after = tuple(bool(t in ends) for t in range(T))

    def product(a_c, b_c, t):
        p = a_c[:, :, t:t + 1] * b_c[:, t:t + 1, :]  # exact in float64
        return p.to(torch.float32).to(torch.float64) if round_products else p

    def steps(hi, lo, bad, a_c, b_c):
        if fma:  # hi is the running sum; every step rounds hi + p (exact: s + e) at once
            for t in range(T):
                hi = round_pair(*_two_sum(hi, product(a_c, b_c, t)))
            return hi, lo, bad
        for t in range(T):
            s, e = _two_sum(hi, product(a_c, b_c, t))
            s2, e2 = _two_sum(lo, e)
            bad = bad + (e2 != 0).to(torch.float64)
            hi, lo = s, s2
            if round_after[t]:
                # (hi alone keeps the sign of a zero sum)
                hi = round_pair(*_two_sum(hi, torch.where(lo == 0, -0.0, lo)))
                lo = torch.zeros_like(lo)
        return hi, lo, bad

    key = ("exact-blocks", unit.with_(name="-", description=""), T, ends)
    return steps, key


def _plan(k: int, K: int, seq_chunk: int | None = None) -> tuple[int, tuple[int, ...], int]:
    """(T, ends, Kp): chunks of T products, block ends inside a chunk, K padded to whole
    chunks (the last block ends at K); ``seq_chunk``: T for one product per block, if not
    :data:`FMA_CHUNK`."""
    if k == 1:
        T = seq_chunk or FMA_CHUNK
    elif k <= CHUNK:
        T = k * (CHUNK // k)
    else:
        T = max(d for d in range(1, CHUNK + 1) if k % d == 0)
    ends = tuple(i for i in range(T) if (i + 1) % k == 0) if k <= T else ()
    Kp = -(-max(K, 1) // T) * T
    return T, ends, Kp


def _run(call: GemmCall) -> torch.Tensor:
    unit, sc = call.unit, call.scales
    Bt, M, K, N = call.shape
    k = unit.block_size
    variant = _sequential_variant(call)
    T, ends, Kp = _plan(k, K, SEQ_CHUNK.get((variant, unit.block_format.exp_bits)))
    a = call.a.to(torch.float64)
    b = call.b.to(torch.float64)
    if sc is not None and sc.has_k:  # the scale product multiplies each product: exactly
        from .fast import fold

        a = fold(a, sc.a, sc.a_blk, 2)
        b = fold(b, sc.b, sc.b_blk, 1)
    # pad K with -0 products: they change no sum, not even the sign of a zero
    pad = Kp - K
    if pad:
        a = torch.cat([a, torch.full((Bt, M, pad), -0.0, dtype=a.dtype)], -1)
        b = torch.cat([b, torch.full((Bt, pad, N), 0.0, dtype=b.dtype)], -2)
    c = call.c_or_zero().to(torch.float64)
    hi, lo = c.clone(), torch.zeros_like(c)
    bad = torch.zeros_like(c)
    work = Bt * M * N * T
    halves = ()
    if variant and variant != "f64":  # float32 operands and running sum (exact: see
        # _sequential_variant), converted once instead of in every chunk
        a, b, hi = a.to(torch.float32), b.to(torch.float32), hi.to(torch.float32)
    if variant == "f32x":  # and the operands' Veltkamp halves (split once)
        halves = (*_split32(a), *_split32(b))
    for k0 in range(0, Kp, T):
        last = k0 + T >= Kp
        chunk_ends = ends
        if not ends and (last or (k0 + T) % k == 0):
            chunk_ends = (T - 1,)  # a long block (or the whole K) ends with this chunk
        steps, key = _kernels(unit, T, chunk_ends, variant)
        # (ah, al: a's halves, sliced along its last axis; bh, bl: b's, along the middle)
        parts = tuple(x[:, :, k0:k0 + T].contiguous() for x in halves[:2]) + tuple(
            x[:, k0:k0 + T, :].contiguous() for x in halves[2:])
        hi, lo, bad = compiled.run(steps, key, work, hi, lo, bad,
                                   a[:, :, k0:k0 + T].contiguous(),
                                   b[:, k0:k0 + T, :].contiguous(), *parts)
    hi = hi.to(torch.float64)
    final = hi
    flagged = (bad != 0) | ~torch.isfinite(hi)
    if any_true(flagged):
        final = _recompute(call, final, flagged)
    zeros = torch.zeros(hi.shape, dtype=torch.bool, device=hi.device)
    inf_pos, inf_neg = final == math.inf, final == -math.inf
    final = torch.where(torch.isinf(final), 0.0, final)
    return finish(unit, final, inf_pos, inf_neg, zeros.clone(), _epilogue(sc), slice(None))


def _epilogue(sc):
    return None if sc is None else sc.epilogue_only()


def _recompute(call: GemmCall, final: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
    """The flagged outputs' accumulators, exactly, by the int64 chain (without the output
    rounding and epilogue, which the caller applies)."""
    from dataclasses import replace

    from .call import Scales
    from .int_chain import INT_CHAIN

    idx = flagged.nonzero(as_tuple=True)
    bi, mi, ni = idx
    unit = call.unit.with_(output_format=None, output_overflow=None)
    sc = call.scales
    sub_sc = None
    if sc is not None and sc.has_k:
        sub_sc = Scales(a=None if sc.a is None else sc.a[bi, mi][:, None, :],
                        b=None if sc.b is None else sc.b[bi, ni][:, None, :],
                        a_blk=sc.a_blk, b_blk=sc.b_blk, exact=sc.exact, pow2=sc.pow2)
    sub = replace(call, unit=unit, a=call.a[bi, mi][:, None, :],
                  b=call.b[bi, :, ni].unsqueeze(-1),
                  c=None if call.c is None else call.c[idx].reshape(-1, 1, 1),
                  out_shape=(len(bi), 1, 1), scales=sub_sc, specials=None, _cache={})
    vals = INT_CHAIN.run(sub).reshape(-1).to(torch.float64)
    out = final.clone()
    out[idx] = vals
    return out


#: the MatrixUnit fields this kernel models (with exact block sums, c_mode, alignment and
#: drop change nothing)
EXACT_FIELDS = frozenset({
    "a_format", "b_format", "block_size", "product_format", "product_rounding", "c_mode",
    "alignment", "drop", "acc_format", "acc_rounding", "acc_overflow", "block_result_bits",
    "flush_output_subnormals", "output_format", "output_rounding", "output_overflow"})

EXACT_BLOCKS = register_kernel(Kernel(
    "exact-blocks", "bit-exact", EXACT_FIELDS, _refusal, _run, priority=15,
    description="exact block sums (Kulisch, sequential FMA, exact blocks) as certified float64 "
    "pairs, rounded through odd float64 and float32 values; compiled"))


def _fast_refusal(call: GemmCall) -> str | None:
    """Why ``exact-blocks-fast`` does not compute ``call``: it takes the units with one
    product per block (sequential FMA, rounding after every add), whose rounding per product
    the float model of ``fast-float`` computes as one matmul per product (9x-54x slower than
    this kernel on fma-fp32-fp32, fma-bf16-bf16 and fma-fp16-fp16: docs/bench-gemm.md), and
    then only what ``exact-blocks`` supports."""
    if call.unit.block_size != 1:
        return ("blocks of more than one product (the float model, fast-float, computes them "
                "with one matmul per block)")
    return _refusal(call)


EXACT_BLOCKS_FAST = register_kernel(Kernel(
    "exact-blocks-fast", "fast", EXACT_FIELDS, _fast_refusal, _run, priority=45,
    description="the fast fidelity of units with one product per block (sequential FMA): "
    "the exact-blocks kernel, so the result is bit-exact (faster than a matmul per product)"))

