"""The fast fidelity (kernel ``fast-float``): one matmul per promotion chunk and a model of the
unit's systematic rounding.

For units with a float accumulator and a deterministic rounding, promotion if any to fp32 RNE
(every preset): one matmul per promotion chunk, or one for the whole K when the unit does not
promote (float32 when the products of the input formats are exact in it, else float64), plus a
model of the unit's systematic rounding on the M x N outputs: the chunk's sum x1 = c + T is
rounded once with the unit's block rounding (so results lie on the unit's output grid, e.g. the
13-bit block results of the H100 FP8 unit), after subtracting the expected loss of the other
``n - 1`` block roundings of a directed accumulator rounding (RTZ: toward zero),
``beta * (n-1) * rho * (|c| + |x1|) / 2`` with ``beta`` = the mean loss per block rounding in
ulps (:func:`fast_beta`; 0.375 for the H100 fp16/bf16 units, 0 for H100 FP8 where F = the
block result bits) and ``rho = 2^-p / (2 ln 2)`` the mean ulp of a value relative to its
magnitude (the running sum taken to grow linearly over the chunk). Partial sums are promoted
with fp32 RNE arithmetic (with a block scale: fl32(s*partial) is added, two roundings where the
unit does one). Units without alignment truncation (``alignment_bits=None``) get one exact
float64 sum per block of k instead, so there fast mode equals bit-exact wherever a block's
products span < 53 bits. The element-wise work runs single-threaded and the matmuls with every
torch thread (split element-wise ops wait for a time slice per op on a busy machine).

Not modelled: the alignment truncation of each term (step 3 of the model: zero-mean noise for
mixed-sign data, a bias toward zero for one-signed data), the order-dependent rounding of the
float32 matmul, intermediate overflow (a block overflow that the unit turns into inf may give
NaN or a finite value; fp32-range results overflow when converted to float32), and subnormal
partial sums. :func:`precisim.emulation.divergence.fast_divergence` measures the difference to
bit-exact; the measured figures are in :mod:`precisim.emulation.divergence`.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from precisim.formats import FloatFormat, Rounding
from precisim.formats.rounding import ROUNDING_RULES

from ..matrix_unit import MatrixUnit
from .call import GemmCall, Scales
from .float_chain import CHAIN_FIELDS, finish, float_chain_ok
from .floatarith import any_true, round_fast, truncate_bits32
from .intarith import RoundSpec
from .registry import Kernel, register_kernel
from .threads import all_threads, one_thread_per_op

__all__ = ["chunk_fast", "fast_beta", "fold", "mm_dtype"]

_RHO = 1.0 / (2.0 * math.log(2.0))  # E[ulp(x) / (|x| 2^-p)] for log-uniform significands


def fast_beta(unit: MatrixUnit) -> tuple[float, str]:
    """Mean rounding loss of one block rounding, in ulps of the block result, and its
    direction ('zero', 'down', 'up' from the rounding table's ``bias``; 0.0 for the unbiased
    roundings).

    The block sum lies on the alignment grid q = 2^(E-F) (continuous without alignment) and
    is rounded to g = ulp(result) = 2^(E - p) (p: block_result_bits or the accumulator's
    fraction bits; the result's exponent taken as E): a directed rounding loses (g - q)/2 on
    average, i.e. beta = (1 - 2^(p-F))/2 ulps when F > p, 0 when F <= p, 1/2 when F is None.
    """
    direction = ROUNDING_RULES[unit.acc_rounding].bias
    if not direction:
        return 0.0, ""
    p = unit.block_format.man_bits
    F = unit.alignment_bits
    beta = 0.5 if F is None else max(0.0, (1.0 - 2.0 ** (p - F)) / 2.0)
    return beta, direction


def mm_dtype(unit: MatrixUnit) -> torch.dtype:
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


def chunk_fast(unit, a, b, cval, sc: Scales | None, ns: slice):
    """Fast model for a chunk of columns (see the module docstring, "fast").

    a: (B, M, K), b: (B, K, Nc) in the matmul dtype (block scales of units without promotion
    already folded in); cval: float64 (B, M, Nc) or None (+0).
    """
    k = unit.block_size
    K = a.shape[-1]
    shape = (a.shape[0], a.shape[1], b.shape[2])
    dev = a.device
    spb = RoundSpec.of(unit.block_format, unit.acc_rounding, unit.acc_overflow,
                   unit.flush_output_subnormals)
    beta, direction = fast_beta(unit)
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
        with all_threads():
            T_all = torch.matmul(ap.reshape(B_, M_, nseg, seg).transpose(1, 2),
                                 bp.reshape(B_, nseg, seg, Nc))
    for j, lo in enumerate(range(0, max(K, 1), seg)):
        hi = min(K, lo + seg)
        x0 = part if per else x
        if T_all is not None:
            T = T_all[:, j]
        else:
            with all_threads():
                T = torch.matmul(a[:, :, lo:hi], b[:, lo:hi, :])
        nb = max(1, -(-(hi - lo) // k))
        f = 0.5 * beta * (nb - 1) * rho if beta and nb > 1 else 0.0
        if x0 is None and f32_path:
            if f:
                T.mul_(1.0 - f)  # the expected loss of the inner roundings, toward zero
            r = truncate_bits32(T, spb.m)
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
            r = round_fast(x1, spb)
        if not fp32_range:  # (else a value beyond the format shows as inf in float32)
            ovf = r.abs() > mx
            if any_true(ovf):
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
    return finish(unit, final, inf_pos, inf_neg, nan, sc, ns)




def fold(x: torch.Tensor, s: torch.Tensor | None, blk: int, axis: int) -> torch.Tensor:
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


def _supports(call: GemmCall) -> str | None:
    return float_chain_ok(call.unit)


def _run(call: GemmCall) -> torch.Tensor:
    unit, sc = call.unit, call.scales
    one = call.a.device.type == "cpu" and torch.get_num_threads() > 1
    with one_thread_per_op() if one else nullcontext():
        md = mm_dtype(unit)
        a, b = call.a, call.b
        per = unit.promotion_interval
        if sc is not None and sc.has_k and not per:
            # block scales of units without promotion multiply the products: fold them into
            # the operands (s_a*a and s_b*b in the matmul dtype: exact for power-of-two and
            # E4M3 scales of narrow elements, else rounded once)
            a = fold(a.to(md), sc.a, sc.a_blk, 2)
            b = fold(b.to(md), sc.b, sc.b_blk, 1)
            sc = sc.epilogue_only()
        a, b = a.to(md), b.to(md)
        Bt, M, K, N = call.shape
        c64 = None if call.c is None else call.c.to(torch.float64)
        nseg = -(-max(K, 1) // per) if per and unit.alignment_bits is not None else 1
        step = max(1, (call.max_chunk_elements * 8) // max(1, Bt * M * (nseg + 1)))
        if step >= N:
            return chunk_fast(unit, a, b, c64, sc, slice(None))
        out = torch.empty((Bt, M, N), dtype=torch.float32, device=a.device)
        for n0 in range(0, N, step):
            ns = slice(n0, min(N, n0 + step))
            out[:, :, ns] = chunk_fast(unit, a, b[:, :, ns],
                                       None if c64 is None else c64[:, :, ns], sc, ns)
        return out


#: the float model takes the float chains' fields; it approximates the datapath, and these
#: fields of the alignment and the products are among what it does not model (module
#: docstring), as the fast fidelity promises
FAST_FIELDS = CHAIN_FIELDS | {"alignment", "c_mode", "product_format", "product_rounding"}

FAST_FLOAT = register_kernel(Kernel(
    "fast-float", "fast", FAST_FIELDS,
    _supports, _run, priority=50,
    description="one float matmul per promotion chunk plus a model of the unit's systematic "
    "rounding (module precisim.emulation.matmul.fast)"))
