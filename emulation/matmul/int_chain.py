"""The int64 block chain (kernels ``int-chain`` and ``blockwise-fast``): every matrix unit.

Every value of the chain is a (sign, integer significand < 2^62, exponent) triple
(:mod:`.intarith`): products of integer significands, exact shifts to the alignment grid with
the unit's drop rule (truncate, floor, nearest, sticky), exact integer sums, and roundings of
every mode through the decision table. Exact units (``alignment_bits=None``) and very wide
alignments use a window of ``W = 59 - bitlen(k+1)`` bits below E (k: the block's actual
length); any output whose block drops bits below that window is recomputed by the exact
reference (:mod:`precisim.emulation.reference`; rare for small blocks: it needs an exponent
spread of ~30 bits inside one block). NVIDIA-style datapaths whose sums fit float64 form their
block sums with the float64 block kernel of :mod:`.float_chain` instead (same bits).

``blockwise-fast`` is the fast fidelity for the units the float model of :mod:`.fast` does not
carry (integer or stochastic accumulators, product rounding...): a float64 matmul per block of
k, then the unit's exact block rounding, promotion and output rounding (it leaves out the
alignment truncation only).
"""

from __future__ import annotations

import math

import torch
from precisim.formats import Overflow, Rounding, get_format
from precisim.formats.rounding import BitsRemainder, round_up

from ..matrix_unit import Alignment, CMode, Drop, MatrixUnit
from .call import GemmCall, Scales
from .float_chain import block_float, sums_fit_float64
from .floatarith import any_true
from .intarith import (
    NEG_BIG,
    NEG_BIG_32,
    SHIFT_MAX,
    RoundSpec,
    add_two,
    bitlen,
    c_exponent,
    decompose,
    pos_parts,
    round_int,
    shift_remainder,
    shr,
    to_float,
)
from .registry import Kernel, register_kernel
from .threads import for_chunks

__all__: list[str] = []

FP32 = get_format("fp32")


def _window(k: int) -> int:
    """Bits kept below E by the int64 kernel when it sums k + 1 terms exactly."""
    return 59 - (k + 1).bit_length()


def _align(drop: Drop, n, m, gg, b):
    """Term (-1)^n m 2^gg on the grid 2^b under ``drop``: (signed integer, dropped-bits mask
    or None)."""
    s = gg - b  # >= 0: exact left shift
    left = m << s.clamp(0, SHIFT_MAX)
    rs = (-s).clamp(min=0)
    if drop is Drop.FLOOR:
        sm = torch.where(n, -m, m)
        right = torch.where(rs > SHIFT_MAX, torch.where(sm < 0, -1, 0),
                            sm >> rs.clamp(0, SHIFT_MAX))
        return torch.where(s >= 0, torch.where(n, -left, left), right), None
    if drop is Drop.STICKY:
        # the value grid is 2^b, half the F-bit grid: truncate to the F-bit grid, then set the
        # bit below it if anything was dropped
        rs1 = rs + 1  # shift to the F grid (2^(b+1))
        q = shr(m, rs1)
        lost = (q << rs1.clamp(0, SHIFT_MAX)) != m
        v = torch.where(s >= 0, left, (q << 1) | (lost & (s < 0)).to(torch.int64))
        return torch.where(n, -v, v), None
    q, rem, half = shift_remainder(m, rs)
    if drop is Drop.NEAREST:  # each term rounded to nearest, ties to even, on the grid
        up = round_up(Rounding.NEAREST_EVEN, BitsRemainder(q, rem, half, n))
        q = q + up.to(torch.int64)
    v = torch.where(s >= 0, left, q)
    return torch.where(n, -v, v), rem != 0


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
        sp = RoundSpec.of(pf, unit.product_rounding, Overflow.SATURATE)
        neg, mag, g, _, _ = round_int(neg, mag, g, sp)
        e = c_exponent(mag, g, pf)
    elif unit.alignment is Alignment.UNNORMALISED:
        e = torch.where(mag > 0, ea + eb + (0 if ps is None else ps[2]), NEG_BIG)
    else:
        e = torch.where(mag > 0, g + bitlen(mag) - 1, NEG_BIG)
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
    terms, lst = _align(drop, neg, mag, g, base.unsqueeze(-1))
    S = terms.sum(-1)
    if lst is not None and exact:
        lost = lost | (lst & (mag > 0)).any(-1)
    if joint:
        ct, cl = _align(drop, cn, cq, cg, base)
        S = S + ct
        if cl is not None and exact:
            lost = lost | (cl & (cq > 0))
        sneg, smag, sbase = S < 0, S.abs(), base
    else:
        sneg, smag, sbase = add_two(S < 0, S.abs(), base, cn, cq, cg)
    zero = smag == 0
    rn, rq, rg, rinf, rnan = round_int(sneg, smag, sbase, sp_block, rand)
    rn = torch.where(zero, (neg & (mag == 0)).all(-1) & cn & (cq == 0), rn)
    return (rn, rq, rg, c_exponent(rq, rg, unit.acc_format)), rinf, rnan, lost


def _block_fn(unit, sp_block):
    """The block kernel for this unit (the float64 block sums of :mod:`.float_chain` where the
    datapath allows them, else :func:`_block_exact`). (torch.compile of these kernels was
    measured no faster than eager on a 2-core CPU, so they run eagerly.)"""
    if not sums_fit_float64(unit):
        def exact(pa, pb, state, r, lost, ps=None):
            return _block_exact(unit, pa, pb, state, sp_block, r, lost, ps)
        return exact
    F, fl, uf = unit.alignment_bits, unit.alignment_floor, unit.drop is Drop.FLOOR

    def floats(pa, pb, state, r, lost, ps=None):
        cn, cq, cg, ce = state
        cval = torch.ldexp(cq.to(torch.float64), cg.to(torch.float64))
        cval = torch.where(cn, -cval, cval)
        # (the exponent of a zero state, NEG_BIG, does not fit int32: clamp it first)
        S, E = block_float(pa[0], pa[1], pb[0], pb[1], cval,
                           ce.clamp(min=NEG_BIG_32).to(torch.int32), F, fl, uf)
        rn, rq, rg, rinf, rnan = round_int(S < 0, S.abs(), E - F, sp_block, r)
        return (rn, rq, rg, c_exponent(rq, rg, unit.acc_format)), rinf, rnan, lost
    return floats


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
    rn, rq, rg, rinf, rnan = round_int(neg, mag, base, sp_block, rand)
    return (rn, rq, rg, c_exponent(rq, rg, unit.acc_format)), rinf, rnan


def _term_scales(unit: MatrixUnit, sc: Scales | None) -> bool:
    """Whether K-blocked scales multiply each product (:func:`_block_exact`'s ``ps``, on the
    decomposed operands): only in a unit without promotion. With promotion they multiply each
    promoted partial sum, and the blocks run through the kernel of an unscaled call."""
    return sc is not None and sc.has_k and not unit.promotion_interval


def _chunk(unit, fidelity, A, Bm, Cst, rand, sc: Scales | None = None,
           ns: slice = slice(None)):
    """All blocks of K for one chunk of outputs. A: decomposed (B, M, K) tensors or the raw
    (B, M, K) floats (fast); Bm likewise (B, K, N); ``sc``: the scales (bit-exact: per term;
    both fidelities: at promotion), ``ns`` the chunk's columns."""
    k = unit.block_size
    K = (A[0] if fidelity == "bit-exact" else A).shape[-1]
    nblk = max(1, -(-K // k))
    sp_block = RoundSpec.of(unit.block_format, unit.acc_rounding, unit.acc_overflow,
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
    sp_prom = RoundSpec.of(unit.promotion_format, unit.promotion_rounding, Overflow.INF)
    term_scales = fidelity == "bit-exact" and _term_scales(unit, sc)
    block = _block_fn(unit, sp_block)
    for j in range(nblk):
        sl = slice(j * k, min((j + 1) * k, K))
        r = None if rand is None else rand[..., j]
        if fidelity == "bit-exact":
            pa = tuple(t[:, :, None, sl] for t in A)
            pb = tuple(t[:, sl, :].transpose(1, 2)[:, None, :, :].contiguous() for t in Bm)
            if term_scales:
                ps = pos_parts(sc.terms(sl.start, sl.stop, ns))
                state, rinf, rnan, lost = _block_exact(unit, pa, pb, state, sp_block, r, lost,
                                                       ps)
            else:
                state, rinf, rnan, lost = block(pa, pb, state, r, lost)
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
                s_sig, s_g, _ = pos_parts(s)
                pq, pg = pq * s_sig, pg + s_g
                zero_s = s == 0
                nan |= (part_inf_pos | part_inf_neg) & zero_s  # inf * 0
                part_inf_pos &= ~zero_s
                part_inf_neg &= ~zero_s
            sn, smag, sbase = add_two(n1, q1, g1, pn, pq, pg)
            zero = smag == 0
            rn, rq, rg, rinf2, _ = round_int(sn, smag, sbase, sp_prom)
            rn = torch.where(zero, n1 & (q1 == 0) & pn & (pq == 0), rn)
            new_pos = part_inf_pos | (rinf2 & ~rn)
            new_neg = part_inf_neg | (rinf2 & rn)
            nan |= (inf_pos & new_neg) | (inf_neg & new_pos)
            inf_pos |= new_pos
            inf_neg |= new_neg
            reg = (rn, rq, rg, c_exponent(rq, rg, unit.promotion_format))
            state = zero_state
            part_inf_pos = torch.zeros_like(inf_pos)
            part_inf_neg = torch.zeros_like(inf_pos)
    final = reg if per else state
    if sc is not None and sc.has_epilogue:
        al = sc.alpha(ns, tuple(shape))
        a_sig, a_g, _ = pos_parts(al)
        n, q, g, _ = final
        sp32 = RoundSpec.of(FP32, Rounding.NEAREST_EVEN, Overflow.INF)
        zero = q == 0
        rn, rq, rg, rinf, _ = round_int(n, q * a_sig, g + a_g, sp32)
        rn = torch.where(zero, n, rn)
        nan |= (inf_pos | inf_neg) & (al == 0)
        inf_pos |= rinf & ~rn
        inf_neg |= rinf & rn
        final = (rn, rq, rg, c_exponent(rq, rg, FP32))
    return final, inf_pos, inf_neg, nan, lost


def _output(unit: MatrixUnit, final) -> torch.Tensor:
    n, q, g, _ = final
    if unit.output_format is None and not unit.flush_output_subnormals:
        return to_float(n, q, g)
    sp = RoundSpec.of(unit.out_format, unit.output_rounding, unit.output_overflow,
                      unit.flush_output_subnormals)
    rn, rq, rg, inf, nan = round_int(n, q, g, sp)
    v = to_float(rn, rq, rg)
    v = torch.where(inf, torch.where(rn, -math.inf, math.inf), v)
    return torch.where(nan, math.nan, v)


def _result(unit, final, ip, ineg, nn) -> torch.Tensor:
    res = _output(unit, final)
    res = torch.where(ip, math.inf, res)
    res = torch.where(ineg, -math.inf, res)
    return torch.where(nn | (ip & ineg), math.nan, res)


def _c_state(call: GemmCall):
    cfmt = call.c_format
    cd = decompose(call.c_or_zero(), cfmt)
    return cd[0], cd[1], cd[2], c_exponent(cd[1], cd[2], cfmt)


def fallback(call: GemmCall, out, mask):
    """Recompute the outputs flagged in ``mask`` with the exact reference (rare)."""
    from ..reference import dot, scaled_dot

    unit, sc, a, b, rand = call.unit, call.scales, call.a, call.b, call.rand
    c = call.c_or_zero()
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


def _run_exact(call: GemmCall) -> torch.Tensor:
    unit, sc = call.unit, call.scales
    a, b = call.a, call.b
    Bt, M, K, N = call.shape
    k = unit.block_size
    fa, fb = call.elem_formats or (None, None)
    if sums_fit_float64(unit) and not _term_scales(unit, sc):
        # the float64 block kernel needs the signed values and the alignment exponents only
        ea = decompose(a, unit.a_format)[3].clamp(min=NEG_BIG_32).to(torch.int32)
        eb = decompose(b, unit.b_format)[3].clamp(min=NEG_BIG_32).to(torch.int32)
        from .float_chain import kernel_dtype

        kd = kernel_dtype(unit)
        A = (a.to(kd), ea)
        Bd = (b.to(kd), eb)
    else:
        A = decompose(a, unit.a_format, fa)
        Bd = decompose(b, unit.b_format, fb)
    cd = _c_state(call)
    out = torch.empty((Bt, M, N), dtype=torch.float32, device=a.device)
    lost_all = torch.zeros((Bt, M, N), dtype=torch.bool, device=a.device)
    step = max(1, call.max_chunk_elements // max(1, Bt * M * min(k, max(K, 1))))

    def run(ns: slice) -> None:
        Bc = tuple(t[:, :, ns] for t in Bd)
        Cc = tuple(t[:, :, ns] for t in cd)
        rc = None if call.rand is None else call.rand[:, :, ns]
        final, ip, ineg, nn, lost = _chunk(unit, "bit-exact", A, Bc, Cc, rc, sc, ns)
        out[:, :, ns] = _result(unit, final, ip, ineg, nn)
        lost_all[:, :, ns] = lost

    for_chunks(N, step, run, a.device)
    if any_true(lost_all):
        if call.specials is not None:  # (those outputs are replaced by special values)
            lost_all &= ~(call.specials[0] | call.specials[1] | call.specials[2])
        out = fallback(call, out, lost_all)
    return out


def _run_fast(call: GemmCall) -> torch.Tensor:
    unit, sc = call.unit, call.scales
    a, b = call.a, call.b
    if sc is not None and sc.has_k and not unit.promotion_interval:
        # block scales of units without promotion multiply the products: fold them into the
        # operands (s_a*a and s_b*b in float64)
        from .fast import fold

        a = fold(a.to(torch.float64), sc.a, sc.a_blk, 2)
        b = fold(b.to(torch.float64), sc.b, sc.b_blk, 1)
        sc = sc.epilogue_only()
    Bt, M, _, N = call.shape
    cd = _c_state(call)
    out = torch.empty((Bt, M, N), dtype=torch.float32, device=a.device)
    step = max(1, call.max_chunk_elements // max(1, Bt * M))
    for n0 in range(0, N, step):
        ns = slice(n0, min(N, n0 + step))
        Cc = tuple(t[:, :, ns] for t in cd)
        rc = None if call.rand is None else call.rand[:, :, ns]
        final, ip, ineg, nn, _ = _chunk(unit, "fast", a, b[:, :, ns], Cc, rc, sc, ns)
        out[:, :, ns] = _result(unit, final, ip, ineg, nn)
    return out


def _every_call(call: GemmCall) -> str | None:
    return None


#: every MatrixUnit field, written out: a field added to MatrixUnit is modelled here only once
#: this chain implements it (and :mod:`.reference_kernel`'s list, which tests compare with
#: MatrixUnit's fields, forces the exact reference to come first)
INT_CHAIN_FIELDS = frozenset({
    "a_format", "b_format", "block_size", "product_format", "product_rounding", "c_mode",
    "alignment", "alignment_bits", "drop", "alignment_floor", "acc_format", "acc_rounding",
    "acc_overflow", "acc_sr_bits", "block_result_bits", "flush_input_subnormals",
    "flush_output_subnormals", "output_format", "output_rounding", "output_overflow",
    "promotion_interval", "promotion_format", "promotion_rounding"})

INT_CHAIN = register_kernel(Kernel(
    "int-chain", "bit-exact", INT_CHAIN_FIELDS, _every_call, _run_exact, priority=30,
    description="int64 block chain (every unit; outputs whose block sums leave its window "
    "are recomputed by the exact reference)"))

BLOCKWISE_FAST = register_kernel(Kernel(
    "blockwise-fast", "fast", INT_CHAIN_FIELDS, _every_call, _run_fast, priority=60,
    description="fast fidelity for every unit: a float64 matmul per block of k products, "
    "then the unit's exact block rounding, promotion and output rounding"))
