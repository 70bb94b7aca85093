"""Block-scaled GEMMs computed as a matrix unit does: ``scaled_matmul(a, w, unit)``.

``a`` and ``w`` are :class:`~precisim.formats.scaling.ScaledTensor` parts
(``quantize_scaled(x, fmt, return_parts=True)``) of an activation x (..., M, K) and a weight
W (..., N, K) (``nn.Linear`` layout), both with their scale blocks along K (the last axis);
the result is what ``unit`` returns for x @ W^T, float32 (..., M, N). The elements are fed
to the unit's datapath and the scales are applied to the partial sums the way the unit
description says, not by dequantizing the operands first (docs/arithmetic.md sections 2 and 4):

* **Element values.** The elements (decoded from ``codes``) must be values of the unit's
  input formats: ``a.format.element`` must be a subset of ``unit.a_format`` (every e2m1
  value is an e4m3 value, for instance; checked with
  :func:`precisim.formats.quantize.is_subset`). The alignment exponents are those of the
  unit's formats (the datapath sees e4m3 values). ``"exact-fp32"`` (a Kulisch accumulator
  over fp32 inputs: every element format fits) takes any operands; so does any
  ``kulisch(in_format=...)`` unit whose format contains the elements.
* **The scale product** of a pair of K-blocks is s = s_a*s_b: exact when both scales are
  E8M0 (the exponents add; the product may lie outside fp32's range), otherwise rounded
  once to fp32 with RNE, as DeepGEMM and cuBLAS form it (exact for E4M3 pairs: NVFP4).
  A scale that applies to a whole row (per-tensor, per-token, per-channel: the block spans
  all of K) is not a K-block scale: see "epilogue".
* **Units with promotion** (``deepseek-fp8``: every 128 products; DeepSeek-V3 / DeepGEMM,
  docs/arithmetic.md section 4 "chunked accumulation with promotion"): the unit sums the
  *unscaled* products of one promotion chunk with its block chain, then
  ``acc32 = RNE_fp32(acc32 + s*partial)`` in one rounding (an FMA). Each chunk must lie
  inside one scale block of each operand (1x128 activations and 128x128 weights with
  interval 128 do); otherwise ``ValueError`` names both sizes.
* **Units without promotion** (an MX-capable tensor core modelled on the H100 datapath,
  docs/arithmetic.md section 4 items 1-5): the scale must be constant over each block-FMA of k
  products, i.e. each block of k lies inside one scale block (MX 32 with k = 16 or 32,
  NVFP4 16 with k = 16); otherwise ``ValueError`` names k and the scale block. The block's
  products are multiplied by s before alignment: term i is s*a_i*b_i, formed exactly, and
  its (unnormalised) alignment exponent is e_a + e_b + floor(log2 s), so the term's
  significand lies in [1, 8); the terms are then aligned jointly with the incoming
  accumulator to the largest exponent, cut to F fraction bits, summed exactly and rounded
  to the accumulator format exactly as for unscaled inputs. For power-of-two scales this is
  the block FMA of the scaled values (the scale adds to the exponents); for E4M3 / fp32
  scales the scale's significand multiplies each product exactly and the unit's usual
  alignment cut and block rounding apply to the scaled terms. Units without alignment
  truncation (``alignment_bits=None``: ``exact-*``, ``fma-*``) take any scale blocks (the
  terms s_i*a_i*b_i are summed exactly).
* **Epilogue.** Whole-K scales (per-tensor, per-token, per-channel) and NVFP4's fp32
  tensor scales g are applied once to the final accumulator, as cuBLAS applies
  scale_a*scale_b: ``alpha = fl32(fl32(p_a*p_b) / fl32(g_a*g_b))`` (a missing factor is 1;
  NVFP4 dequantizes as q*s/g) and ``y = fl32(alpha*acc)`` in fp32 RNE, before the unit's
  output rounding if it has one.
* **Padding.** A K that is not a multiple of the scale block (the last block is partial)
  or of the block-FMA size k is padded with zero products, which take no part in the
  alignment: the result is that of the unpadded model.
* **Special values.** A NaN scale (E8M0 0xFF, a NaN block of ``quantize_scaled``) makes
  every element of its block NaN, hence every output that uses the block; otherwise the
  special-value rules of :mod:`precisim.emulation.matmul` apply to the elements. Scales
  must be finite and >= 0 (a zero scale zeroes its block's terms).

The exact reference is :func:`precisim.emulation.reference.scaled_dot`; ``fidelity="fast"``
is the fast model of :mod:`precisim.emulation.matmul` with the K-block scales folded into
the operands (units without promotion: s_a*a and s_b*b in the matmul's dtype) or applied at
promotion (fl32(s*partial) added in fp32), and the epilogue as above. Measured on a
(1, 1024, 576) x (1536, 576) layer (benchmarks/bench_gemm.py --scaled): MXFP8 on h100-e4m3,
0.897 of the outputs differ from bit-exact, normwise 3.6e-4; 1x128 / 128x128 FP8 on
deepseek-fp8, 0.995 and 1.2e-4
(:func:`precisim.emulation.divergence.scaled_fast_divergence`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from precisim.formats import FloatFormat, IntFormat, decode, get_format
from precisim.formats.quantize import is_subset
from precisim.formats.scaling import ScaledTensor

from .matmul import FIDELITIES, Explanation, Scales, run_gemm
from .matmul.call import prepare
from .matmul.registry import explain_call
from .matrix_unit import MatrixUnit
from .presets import get_unit

__all__ = ["accepts_elements", "scaled_explain", "scaled_matmul"]

E8M0 = get_format("e8m0")


@dataclass
class _Operand:
    """One operand as the GEMM core needs it (see :func:`_operand`)."""

    values: torch.Tensor  # (..., R, K) float32 element values (NaN in NaN blocks)
    k_scales: torch.Tensor | None  # (..., R, nK) float64 K-block scales (NaN -> 1)
    k_block: int  # K-block length (when k_scales is not None)
    row_scales: torch.Tensor | None  # (..., R) float64 whole-K scales (epilogue)
    tensor_scale: float | None  # NVFP4's g
    e8m0: bool  # the K-block scales are E8M0 codes


def accepts_elements(elem: FloatFormat | IntFormat, fmt: FloatFormat | IntFormat) -> bool:
    """Whether every value of ``elem`` is a value of the unit's input format ``fmt``."""
    if isinstance(fmt, FloatFormat):
        return is_subset(elem, fmt)
    return (isinstance(elem, IntFormat) and elem.frac_bits <= fmt.frac_bits
            and elem.qmin * 2 ** (fmt.frac_bits - elem.frac_bits) >= fmt.qmin
            and elem.qmax * 2 ** (fmt.frac_bits - elem.frac_bits) <= fmt.qmax)


_NATIVE = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def _decode(codes: torch.Tensor, fmt: FloatFormat | IntFormat) -> torch.Tensor:
    """Element values of the codes (float32): torch's own FP8 conversion where it exists
    (exact), else the format's decode table."""
    native = _NATIVE.get(fmt.name)
    if native is not None and codes.dtype == torch.uint8:
        return codes.view(native).to(torch.float32)
    return decode(codes, fmt)


def _scale_values(st: ScaledTensor) -> torch.Tensor:
    """The block scales as float64 values (NaN for NaN blocks)."""
    s = st.scales
    if s.is_floating_point():
        return s.to(torch.float64)
    fmt = st.format.scale
    if fmt == E8M0:
        c = s.to(torch.int64)
        v = torch.ldexp(torch.ones_like(c, dtype=torch.float64), (c - 127).to(torch.float64))
        return torch.where(c == 255, float("nan"), v)
    return decode(s, fmt, torch.float64)


def _k_block(st: ScaledTensor, nd: int) -> int | None:
    """Length of the scale blocks along K (the last axis), or None when one scale covers
    all of K (per-tensor, per-token, per-channel)."""
    g = st.format.granularity
    if g.is_per_tensor():
        return None
    if g.keep_axis is not None:
        return 1 if g.keep_axis % nd == nd - 1 else None
    for axis, size in g.blocks:
        if axis % nd == nd - 1:
            return size
    return 1


def _operand(st: ScaledTensor, what: str) -> _Operand:
    if not isinstance(st, ScaledTensor):
        raise TypeError(f"{what} must be a ScaledTensor (quantize_scaled(..., return_parts=True))"
                        f", got {type(st).__name__}")
    codes = st.codes
    nd = codes.dim()
    if nd < 2:
        raise ValueError(f"{what} must have at least 2 dimensions (..., rows, K), got shape "
                         f"{tuple(codes.shape)}")
    vals = _decode(codes, st.format.element)
    shape = tuple(codes.shape)
    bshape = tuple(st.block_shape)
    if len(bshape) != nd:
        raise ValueError(f"{what}: block shape {bshape} does not match the shape {shape}")
    sv = _scale_values(st)
    grid = tuple(-(-d // b) for d, b in zip(shape, bshape))
    if tuple(sv.shape) != grid:
        raise ValueError(f"{what}: scales of shape {tuple(sv.shape)} do not match the "
                         f"{grid} blocks of a {shape} tensor with blocks {bshape}")
    bad = ~torch.isnan(sv) & (~torch.isfinite(sv) | (sv < 0))
    if bool(bad.any()):
        v = float(sv[bad][0])
        raise ValueError(f"{what}: scale {v!r} is not valid: accepted finite scales >= 0 (NaN "
                         "marks a NaN block)")
    # one scale per row and K-block: expand the blocks of every other axis
    for d in range(nd - 1):
        if bshape[d] != 1:
            idx = torch.arange(shape[d], device=sv.device) // bshape[d]
            sv = sv.index_select(d, idx)
    nan_blk = torch.isnan(sv)
    kb = _k_block(st, nd)
    K = shape[-1]
    if bool(nan_blk.any()):
        idx = torch.arange(K, device=sv.device) // (bshape[-1] if K else 1)
        nan_el = nan_blk.index_select(nd - 1, idx.clamp(max=sv.shape[-1] - 1))
        vals = torch.where(nan_el, float("nan"), vals)
        sv = torch.where(nan_blk, 1.0, sv)
    g = None
    if st.tensor_scale is not None:
        g = float(st.tensor_scale)
        if g != g:  # NaN: the whole tensor is NaN
            vals = torch.full_like(vals, float("nan"))
            g = 1.0
        elif not (0 < g < float("inf")):
            raise ValueError(f"{what}: tensor scale {g!r} is not valid: accepted a finite "
                             "positive value")
    if kb is None:
        return _Operand(vals, None, 1, sv[..., 0], g, False)
    return _Operand(vals, sv, kb, None, g, st.format.scale == E8M0)


def _constant_over(block: int, window: int, K: int) -> bool:
    """Whether every window [j*window, min((j+1)*window, K)) lies inside one block."""
    if block % window == 0:
        return True
    return all(lo // block == (min(lo + window, K) - 1) // block for lo in range(0, K, window))


def _check_unit(op: _Operand, st: ScaledTensor, unit: MatrixUnit, fmt, what: str, K: int):
    elem = st.format.element
    if not accepts_elements(elem, fmt):
        raise ValueError(
            f"unit {unit.name!r} cannot take the elements of {what} ({st.format.name}: "
            f"{elem.name}): its input format {fmt.name} does not hold every {elem.name} "
            "value; accepted: a unit whose input format contains the element format, e.g. "
            "'exact-fp32' (any element format) or kulisch(in_format=...)")
    if op.k_scales is None:
        return
    bk = op.k_block
    if unit.promotion_interval is not None:
        n = unit.promotion_interval
        if not _constant_over(bk, n, K):
            raise ValueError(
                f"{what} ({st.format.name}) has scale blocks of {bk} along K, but unit "
                f"{unit.name!r} applies the scales at promotion every {n} products: each "
                f"promotion chunk must lie inside one scale block (a block of a multiple of "
                f"{n}, e.g. 1x{n} / {n}x{n})")
    elif unit.alignment_bits is not None and not _constant_over(bk, unit.block_size, K):
        raise ValueError(
            f"{what} ({st.format.name}) has scale blocks of {bk} along K, but unit "
            f"{unit.name!r} sums block FMAs of k={unit.block_size} products with one scale "
            f"each: k={unit.block_size} must divide the scale block {bk} (e.g. MX 32 with "
            "k = 16 or 32, NVFP4 16 with k = 16)")


def _pow2(x: torch.Tensor) -> bool:
    m, _ = torch.frexp(x)
    return bool(((m == 0.5) | (x == 0)).all())


def _build(a: ScaledTensor, w: ScaledTensor, unit: MatrixUnit):
    """Element values, broadcast shapes and the core's :class:`_Scales`."""
    oa, ow = _operand(a, "a"), _operand(w, "w")
    va, vw = oa.values, ow.values
    K = va.shape[-1]
    if vw.shape[-1] != K:
        raise ValueError(f"shapes do not match: a is {tuple(va.shape)} (K={K}) and w is "
                         f"{tuple(vw.shape)} (K={vw.shape[-1]}); w is (..., N, K)")
    try:
        batch = torch.broadcast_shapes(va.shape[:-2], vw.shape[:-2])
    except RuntimeError:
        raise ValueError(f"batch dimensions do not broadcast: a {tuple(va.shape)}, w "
                         f"{tuple(vw.shape)}") from None
    _check_unit(oa, a, unit, unit.a_format, "a", K)
    _check_unit(ow, w, unit, unit.b_format, "w", K)
    M, N = va.shape[-2], vw.shape[-2]
    B = 1
    for d in batch:
        B *= d

    sa = None if oa.k_scales is None else oa.k_scales.expand(*batch, M, -1).reshape(
        B, M, oa.k_scales.shape[-1])
    sb = None if ow.k_scales is None else ow.k_scales.expand(*batch, N, -1).reshape(
        B, N, ow.k_scales.shape[-1])
    pa = None if oa.row_scales is None else oa.row_scales.expand(*batch, M).reshape(B, M)
    pb = None if ow.row_scales is None else ow.row_scales.expand(*batch, N).reshape(B, N)
    gs = [g for g in (oa.tensor_scale, ow.tensor_scale) if g is not None]
    ep_g = None
    if gs:
        gg = torch.tensor(gs, dtype=torch.float64).prod()
        ep_g = float(gg.to(torch.float32))
    ks = [t for t in (sa, sb) if t is not None]
    exact = all(o.e8m0 for o in (oa, ow) if o.k_scales is not None)
    sc = Scales(a=sa, b=sb, a_blk=oa.k_block, b_blk=ow.k_block, exact=exact,
                 pow2=all(_pow2(t) for t in ks), ep_a=pa, ep_b=pb, ep_g=ep_g)
    return va, vw, sc, (a.format.element, w.format.element)


def scaled_matmul(a: ScaledTensor, w: ScaledTensor, unit: MatrixUnit | str, *,
                  fidelity: str = "bit-exact", seed: int | None = None,
                  max_chunk_elements: int = 1 << 21,
                  kernel: str | Sequence[str] | None = None) -> torch.Tensor:
    """What ``unit`` returns for ``x @ W^T`` from block-scaled operands (float32).

    Args:
        a: ``quantize_scaled(x, fmt_a, return_parts=True)`` of x (..., M, K), scales along
            K (MX, NVFP4, fp8_1x128, per-group, per-token, per-tensor...).
        w: ``quantize_scaled(W, fmt_w, return_parts=True)`` of W (..., N, K) (a weight in
            ``nn.Linear`` layout; leading dimensions broadcast with a's), scales along K or
            2-D tiles (fp8_128x128), per-channel or per-tensor.
        unit: a :class:`MatrixUnit` or preset name whose input formats hold the elements.
        fidelity: ``"bit-exact"`` or ``"fast"`` (:mod:`precisim.emulation.matmul`).
        seed: random bits for units with stochastic accumulator rounding.
        max_chunk_elements: bound on the elements processed at once (memory).
        kernel: restrict the matrix-unit kernels (see :func:`precisim.emulation.matmul`).

    Returns (..., M, N) float32. See the module docstring for the semantics; bad input
    (shapes, element formats the unit cannot take, scale blocks that do not fit the unit's
    block FMA or promotion interval, invalid scales) raises ``ValueError`` / ``TypeError``.
    """
    unit = get_unit(unit)
    if fidelity not in FIDELITIES:
        raise ValueError(f"fidelity={fidelity!r} is not valid: accepted {FIDELITIES}")
    va, vw, sc, elems = _build(a, w, unit)
    if va.shape[-1] == 0 or va.numel() == 0 or vw.numel() == 0:
        # no products (K = 0: the accumulator stays +0, and +0 times any scale rounds to +0)
        # or no outputs
        shape = (*torch.broadcast_shapes(va.shape[:-2], vw.shape[:-2]), va.shape[-2],
                 vw.shape[-2])
        return torch.zeros(shape, dtype=torch.float32, device=va.device)
    return run_gemm(va, vw.transpose(-1, -2), unit, None, fidelity, seed=seed,
                    max_chunk_elements=max_chunk_elements, scales=sc, elem_formats=elems,
                    check=False, kernel=kernel)


def scaled_explain(a: ScaledTensor, w: ScaledTensor, unit: MatrixUnit | str, *,
                   fidelity: str = "bit-exact",
                   kernel: str | Sequence[str] | None = None) -> Explanation:
    """Which kernel :func:`scaled_matmul` would use for these operands, and why each faster
    kernel was refused (see :func:`precisim.emulation.matmul.explain`)."""
    unit = get_unit(unit)
    va, vw, sc, elems = _build(a, w, unit)
    call = prepare(va, vw.transpose(-1, -2), unit, None, fidelity, scales=sc,
                   elem_formats=elems, check=False)
    return explain_call(call, kernel)
