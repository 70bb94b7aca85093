"""The eager float block chain (kernel ``float-chain``) for NVIDIA-style units, and what the
float chains share.

For units with exact products, unnormalised alignment exponents, joint c, truncation (or
floor) of the aligned terms and a float accumulator with a deterministic rounding (every GPU
preset; docs/arithmetic.md section 4), each block is done with exact float arithmetic: the
products of a block are formed in float32 (FP8 inputs) or float64 (fp16/bf16/tf32), scaled by
2^(F-E) (exact), truncated by conversion to integers and summed in int32/int64; the block sum
S * 2^(E-F) is then rounded once with an exact float64 rounding
(:func:`~.floatarith.round_float`). The kernel works on reused (k, M, N-chunk) buffers (the
block's k products outermost: the exponent maximum and the sum are plane-wise), with int8
exponents for FP8 inputs and the float32 kernel whenever the inputs' exponent range allows
it; column chunks run in parallel Python threads with single-threaded torch ops
(:mod:`.threads`). Promotion is supported to an fp32 RNE register (one correctly rounded
fp32 addition, or fused multiply-add with a scale).

Shared with the compiled chain (:mod:`.fused`) and the fast model (:mod:`.fast`): the start
state, the promotion step and the epilogue (:func:`chain_start`, :func:`promote`,
:func:`finish`).
"""

from __future__ import annotations

import math
import threading

import torch
from precisim.formats import FloatFormat, Rounding

from ..matrix_unit import Alignment, CMode, Drop, MatrixUnit
from .call import GemmCall, Scales
from .floatarith import all_finite, any_true, fexp64, pow2_32, pow2_64, round_float, sum_to_f32
from .intarith import NEG_BIG_32, RoundSpec
from .registry import Kernel, register_kernel
from .threads import for_chunks

__all__ = ["chain_start", "finish", "float_chain_ok", "promote", "sums_fit_float64",
           "sums_refusal"]


def sums_refusal(unit: MatrixUnit) -> str | None:
    """Why the bit-exact block sums of ``unit`` cannot be formed in float64 (see
    :func:`block_float`; None: they can): the datapath must be NVIDIA-style (exact products,
    unnormalised exponents, joint c, truncation or floor at the alignment) with aligned
    terms that fit 53 bits."""
    F = unit.alignment_bits
    if unit.product_format is not None:
        return "products are rounded (product_format)"
    if unit.alignment is not Alignment.UNNORMALISED:
        return f"alignment={unit.alignment.value!r} (the float sums need unnormalised exponents)"
    if unit.drop not in (Drop.TRUNCATE, Drop.FLOOR):
        return f"drop={unit.drop.value!r} (the float sums truncate or floor)"
    if unit.c_mode is not CMode.JOINT:
        return f"c_mode={unit.c_mode.value!r} (the float sums align c jointly)"
    if F is None:
        return "alignment_bits=None (exact block sums need a wider window than float64's)"
    if F + 3 + (unit.block_size + 1).bit_length() > 53:
        return (f"a block sum of k={unit.block_size} terms with F={F} fraction bits needs more "
                "than float64's 53 bits")
    return None


def sums_fit_float64(unit: MatrixUnit) -> bool:
    """Whether :func:`sums_refusal` has no objection."""
    return sums_refusal(unit) is None


def float_chain_ok(unit: MatrixUnit) -> str | None:
    """Why the float chains (this module's, the compiled one, the fast model) cannot carry
    ``unit``'s state in floats (None: they can): a signed float accumulator with a
    deterministic rounding, a float output format, promotion (if any) to fp32 RNE."""
    acc = unit.acc_format
    if not isinstance(acc, FloatFormat) or not acc.signed:
        return f"the accumulator format {acc.name} is not a signed float format"
    if unit.acc_rounding is Rounding.STOCHASTIC:
        return "the accumulator rounds stochastically"
    if not isinstance(unit.out_format, FloatFormat):
        return f"the output format {unit.out_format.name} is not a float format"
    if unit.promotion_interval:
        pf = unit.promotion_format
        if (pf.exp_bits, pf.man_bits, pf.bias) != (8, 23, 127) or (
                unit.promotion_rounding is not Rounding.NEAREST_EVEN):
            return "promotion is not to an fp32 register with round-to-nearest-even"
    return None


def kernel_dtype(unit: MatrixUnit, scales: Scales | None = None) -> torch.dtype:
    """float32 when the products, the aligned terms and their sum are all exact in it for
    any inputs of the unit's formats (and block scales, if any, are powers of two applied
    through the exponent only), else float64."""
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


def chain_kernel_dtype(call: GemmCall) -> torch.dtype:
    """float32 for the float chain's block kernel when, for these inputs, every product is
    exact in float32 (significands of <= 24 bits, exponents inside float32's normal range),
    the power of two 2^(e_s + F - E) never needs clamping where a product is nonzero, and the
    integer sum of the block's aligned products (each < 2^(F+2)) fits in int32 (the aligned
    c is added in int64); else float64. Block scales must be powers of two (they enter the
    power of two only). Both kernels give identical bits."""
    unit, sc = call.unit, call.scales
    fa, fb, F, k = unit.a_format, unit.b_format, unit.alignment_bits, unit.block_size
    if sc is not None and sc.has_k and not sc.pow2 and not unit.promotion_interval:
        return torch.float64  # (scales applied at promotion never enter the block kernel)
    if not (isinstance(fa, FloatFormat) and isinstance(fb, FloatFormat)):
        return torch.float64
    if fa.man_bits + fb.man_bits + 2 > 24 or k * 2 ** (F + 2) > 2**31:
        return torch.float64
    ra, rb = call.exponent_range(0), call.exponent_range(1)
    if ra is None or rb is None:
        return torch.float32
    lo = ra[0] + rb[0] - fa.man_bits - fb.man_bits  # exponent of the smallest product's lsb
    hi = ra[1] + rb[1] + 2
    ok = lo >= -126 and hi <= 126 and F - (ra[0] + rb[0]) <= 127
    return torch.float32 if ok else torch.float64


def block_float(a, ea, b, eb, cval, ce, F: int, floor: int | None, use_floor: bool):
    """Bit-exact aligned block sum with float arithmetic, for the NVIDIA-style units.

    a: (B, M, 1, k) values (float32 or float64, see :func:`kernel_dtype`), ea their
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
        v = p * pow2_32(d.clamp(max=127)).unsqueeze(-1)
        t = v.to(torch.int32)
        if use_floor:
            t = t - (t.to(v.dtype) > v).to(torch.int32)
        S = t.sum(-1, dtype=torch.int32).to(torch.int64)
    else:
        v = p * pow2_64(d.clamp(-1022, 1023)).unsqueeze(-1)
        t = v.to(torch.int64)
        if use_floor:
            t = t - (t.to(v.dtype) > v).to(torch.int64)
        S = t.sum(-1)
    cv = cval * pow2_64(d.clamp(-1022, 1023))
    ct = cv.to(torch.int64)
    if use_floor:
        ct = ct - (ct.to(cv.dtype) > cv).to(torch.int64)
    return S + ct, E


# ---------------------------------------------------------------------------------------------
# what the float chains share

def promote_float(reg, part, s):
    """The fp32 promotion register after adding one partial sum (times its scale s)."""
    if s is None:
        return reg + part.to(torch.float32)  # both fp32 values: one correctly rounded add
    return sum_to_f32(reg.to(torch.float64), s * part)  # s*part is exact in float64


def chain_start(unit: MatrixUnit, cval: torch.Tensor, sc: Scales | None):
    """State of a float chain before its first block: the (B, M, N) masks of outputs that
    became +inf, -inf, NaN (all clear), the number of blocks per promotion (None: the unit
    does not promote) and whether K-blocked scales are present."""
    inf_pos = torch.zeros(tuple(cval.shape), dtype=torch.bool, device=cval.device)
    per = (unit.promotion_interval // unit.block_size) if unit.promotion_interval else None
    return (inf_pos, torch.zeros_like(inf_pos), torch.zeros_like(inf_pos), per,
            sc is not None and sc.has_k)


def promote(reg, part, s, part_pos, part_neg, inf_pos, inf_neg, nan, new=None):
    """Promotion step of the float chains: reg = RNE_fp32(reg + s*part), with the special
    values of the model (an inf partial sum makes the register inf; +inf with -inf: NaN).
    part_pos / part_neg: the partial sum overflowed (None: it did not). ``new``: the sum
    already computed (:func:`.fused.promote_kernel`). Returns the new register."""
    if new is None:
        new = promote_float(reg, part, s)
    flagged = part_pos is not None and (any_true(part_pos) or any_true(part_neg))
    if not flagged and all_finite(new):
        return new
    if part_pos is None:
        part_pos = part_neg = torch.zeros_like(inf_pos)
    if s is not None:
        z = s == 0
        nan |= (part_pos | part_neg) & z  # inf * 0
        part_pos = part_pos & ~z
        part_neg = part_neg & ~z
    # where the register is already infinite (carried as 0) it stays so: inf + a finite
    # s*part is inf (docs/arithmetic.md section 4.10), even where 0 + s*part overflows
    held = inf_pos | inf_neg
    np_ = part_pos | ((new == math.inf) & ~held)
    nn_ = part_neg | ((new == -math.inf) & ~held)
    nan |= (inf_pos & nn_) | (inf_neg & np_) | (np_ & nn_)
    inf_pos |= np_
    inf_neg |= nn_
    return torch.where(torch.isfinite(new), new, 0.0)


def finish(unit, final, inf_pos, inf_neg, nan, sc, ns):
    """Epilogue scale, output rounding and special values of the float chains."""
    if sc is not None and sc.has_epilogue:
        al = sc.alpha(ns, tuple(final.shape))
        y = (final * al).to(torch.float32)  # exact float64 product, one fp32 rounding
        nan |= (inf_pos | inf_neg) & (al == 0)  # inf * 0
        inf_pos |= y == math.inf
        inf_neg |= y == -math.inf
        final = torch.where(torch.isinf(y), 0.0, y).to(torch.float64)
    if unit.output_format is not None or unit.flush_output_subnormals:
        sp = RoundSpec.of(unit.out_format, unit.output_rounding, unit.output_overflow,
                          unit.flush_output_subnormals)
        final = final.to(torch.float64)
        fin = torch.isfinite(final)
        if not bool(fin.all()):  # (fast mode carries inf / NaN in the values)
            inf_pos |= final == math.inf
            inf_neg |= final == -math.inf
            nan |= torch.isnan(final)
            final = torch.where(fin, final, 0.0)
        final, ovf = round_float(final, sp)
        inf_pos |= ovf & (final > 0)
        inf_neg |= ovf & (final < 0)
    res = final.to(torch.float32)
    if not (any_true(inf_pos) or any_true(inf_neg) or any_true(nan)):
        return res
    res = torch.where(inf_pos, math.inf, res)
    res = torch.where(inf_neg, -math.inf, res)
    return torch.where(nan | (inf_pos & inf_neg), math.nan, res)


def block_spec(unit: MatrixUnit) -> RoundSpec:
    """The rounding of a block result (to ``unit.block_format``)."""
    return RoundSpec.of(unit.block_format, unit.acc_rounding, unit.acc_overflow,
                        unit.flush_output_subnormals)


# ---------------------------------------------------------------------------------------------
# the eager chain

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


def chunk_float(call: GemmCall, A, Bt, cval, ns: slice = slice(None),
                bufs: _Buffers | None = None):
    """All blocks of K for a chunk of outputs with a float64 state.

    A = (a (K, B, M) kernel dtype, ea int8/int16 alignment exponents), Bt = (b (K, B, Nc),
    eb). cval: the incoming c (float64 values of the accumulator / promotion format).
    """
    unit, sc = call.unit, call.scales
    bufs = bufs or _Buffers()
    a, ea = A
    bt, eb = Bt
    k = unit.block_size
    K = a.shape[0]
    nblk = max(1, -(-K // k))
    acc = unit.acc_format
    spb = block_spec(unit)
    F, floor, use_floor = unit.alignment_bits, unit.alignment_floor, unit.drop is Drop.FLOOR
    shape = tuple(cval.shape)
    dev = cval.device
    inf_pos, inf_neg, nan, per, scaled = chain_start(unit, cval, sc)
    reg = cval.to(torch.float32)
    part = torch.zeros_like(cval) if per else cval
    part_pos, part_neg = torch.zeros_like(inf_pos), torch.zeros_like(inf_pos)
    kd = a.dtype
    idt = torch.int32 if kd == torch.float32 else torch.int64
    zero_sum = call.exponent_dtype[2]
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
            es = torch.where(sz, 0, fexp64(s)).to(torch.int32)
            Ep = Ep + es
            zero_blk = zero_blk | sz
        Ep = torch.where(zero_blk, NEG_BIG_32, Ep)
        pe = torch.where(part != 0, torch.clamp(fexp64(part), min=acc.emin), NEG_BIG_32)
        E = torch.maximum(Ep, pe.to(torch.int32))
        if floor is not None:
            E = torch.clamp(E, min=floor)
        d = F - E
        dt = d if es is None else d + es
        if kd == torch.float32:
            mult = pow2_32(dt.clamp(lo_d, hi_d))
        else:
            mult = pow2_64(dt.clamp(lo_d, hi_d))
            if es is not None and not sc.pow2:
                mult = mult * (s * pow2_64(-es))  # the scale's significand: exact (<= 24 bits)
        if es is not None:
            mult = torch.where(sz, 0.0, mult)  # a zero scale: zero terms
        torch.mul(a[lo:hi, :, :, None], bt[lo:hi, :, None, :], out=pbuf)
        pbuf.mul_(mult)
        ibuf.copy_(pbuf)  # conversion to integer: truncation toward zero
        if use_floor:
            ibuf.sub_((ibuf.to(kd) > pbuf).to(idt))
        S = ibuf.sum(0, dtype=idt).to(torch.int64)  # exact in idt (see chain_kernel_dtype)
        cv = part * pow2_64(d.clamp(-1022, 1023))
        ct = cv.to(torch.int64)
        if use_floor:
            ct = ct - (ct.to(cv.dtype) > cv).to(torch.int64)
        S = S + ct
        sval = S.to(torch.float64) * pow2_64(E - F)  # exact: |S| < 2^53
        zero = S == 0
        if any_true(zero):  # IEEE: the sum of zeros is -0 only if all are -0
            zi = zero.nonzero(as_tuple=True)
            p = a[lo:hi, zi[0], zi[1]] * bt[lo:hi, zi[0], zi[2]]  # (w, zeros)
            pz = p == 0
            if scaled and not per:
                pz = pz | sz[zi].unsqueeze(0)
            pzi = part[zi]
            allneg = (torch.signbit(p) & pz).all(0) & torch.signbit(pzi) & (pzi == 0)
            sval[zi] = torch.where(allneg, -0.0, sval[zi])
        r, ovf = round_float(sval, spb)
        tp, tn = (part_pos, part_neg) if per else (inf_pos, inf_neg)
        fresh = ovf & ~(tp | tn)
        tp |= fresh & (r > 0)
        tn |= fresh & (r < 0)
        part = torch.where(ovf, 0.0, r)
        if per and ((j + 1) % per == 0 or j == nblk - 1):
            s_p = sc.at((j // per) * per * k, ns, shape) if scaled else None
            reg = promote(reg, part, s_p, part_pos, part_neg, inf_pos, inf_neg, nan)
            part = torch.zeros_like(part)
            part_pos, part_neg = torch.zeros_like(inf_pos), torch.zeros_like(inf_pos)
    return finish(unit, reg.to(torch.float64) if per else part, inf_pos, inf_neg, nan, sc, ns)


#: the MatrixUnit fields the float chains model
CHAIN_FIELDS = frozenset({
    "a_format", "b_format", "block_size", "alignment_bits", "drop", "alignment_floor",
    "acc_format", "acc_rounding", "acc_overflow", "block_result_bits", "flush_output_subnormals",
    "output_format", "output_rounding", "output_overflow", "promotion_interval",
    "promotion_format", "promotion_rounding"})


def _supports(call: GemmCall) -> str | None:
    why = float_chain_ok(call.unit)
    if why is not None:
        return why
    return sums_refusal(call.unit)


def _run(call: GemmCall) -> torch.Tensor:
    unit = call.unit
    a, b = call.a, call.b
    c = call.c_or_zero()
    Bt, M, K, N = call.shape
    k = unit.block_size
    ea, eb = call.exponents
    kd = chain_kernel_dtype(call)
    # K outermost: (K, B, M) and (K, B, N), so that the block's k products are the outer axis
    # of the work buffers and their reductions are plane-wise (vectorised)
    A = (a.to(kd).permute(2, 0, 1).contiguous(), ea.permute(2, 0, 1).contiguous())
    Bk = (b.to(kd).permute(1, 0, 2).contiguous(), eb.permute(1, 0, 2).contiguous())
    c64 = c.to(torch.float64)
    out = torch.empty((Bt, M, N), dtype=torch.float32, device=a.device)
    step = max(1, call.max_chunk_elements // max(1, Bt * M * min(k, max(K, 1))))
    local = threading.local()

    def run(ns: slice) -> None:
        bufs = getattr(local, "bufs", None) or _Buffers()
        local.bufs = bufs
        out[:, :, ns] = chunk_float(call, A, (Bk[0][:, :, ns], Bk[1][:, :, ns]), c64[:, :, ns],
                                    ns, bufs)

    for_chunks(N, step, run, a.device)
    return out


FLOAT_CHAIN = register_kernel(Kernel(
    "float-chain", "bit-exact", CHAIN_FIELDS, _supports, _run, priority=20,
    description="eager block chain with exact float products, integer block sums and exact "
    "float64 roundings (NVIDIA-style datapaths, float accumulators)"))
