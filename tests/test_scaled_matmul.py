"""Block-scaled GEMMs under matrix units (issue 3): ``scaled_matmul`` against the exact
reference ``scaled_dot`` bit for bit, for MX, NVFP4, DeepSeek 1x128/128x128, per-tensor and
per-channel/per-token scalings, on random and adversarial operands (docs/arithmetic.md sections 2
and 4). The per-element scales the reference gets are worked out here from the ScaledTensor
fields with plain Python loops, independently of emulation/scaled.py.
"""

from __future__ import annotations

import math
import struct
import zlib

import pytest
import torch
from precisim.emulation import (
    available_kernels,
    get_unit,
    kulisch,
    matmul,
    scaled_fast_divergence,
    scaled_matmul,
    use_kernels,
)
from precisim.emulation.matrix_unit import MatrixUnit
from precisim.emulation.reference import scaled_dot
from precisim.emulation.scaled import scaled_explain
from precisim.formats import decode, get_format
from precisim.formats.scaling import ScaledTensor, get_scaled_format, quantize_scaled

WHOLE_K = {"fp8_tensor", "fp8_e5m2_tensor", "int8_channel", "int8_token"}


def f32_bits(x: float) -> int:
    return struct.unpack(">I", struct.pack(">f", x))[0]


def same(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or f32_bits(x) == f32_bits(y)


# ---------------------------------------------------------------------------------------------
# an independent reading of ScaledTensor parts for the reference


def scale_value(st: ScaledTensor, idx: tuple[int, ...]) -> float:
    s = st.scales[idx]
    if st.scales.is_floating_point():
        return float(s)
    if st.format.scale.name == "float8_e8m0fnu":
        c = int(s)
        return math.nan if c == 255 else 2.0 ** (c - 127)
    return float(decode(s.reshape(1), st.format.scale)[0])


def row_parts(st: ScaledTensor, r: int) -> tuple[list[float], list[float], float]:
    """(element values, per-element K-block scales, whole-K scale) of row r of a 2-D part."""
    K = st.codes.shape[1]
    br, bk = st.block_shape
    elems = decode(st.codes[r], st.format.element).tolist()
    if st.format.name in WHOLE_K:
        return elems, [1.0] * K, scale_value(st, (r // br, 0))
    return elems, [scale_value(st, (r // br, i // bk)) for i in range(K)], 1.0


def reference(a: ScaledTensor, w: ScaledTensor, unit: MatrixUnit, m: int, n: int) -> float:
    ea, sa, pa = row_parts(a, m)
    ew, sw, pw = row_parts(w, n)
    e8m0 = [st.format.scale.name == "float8_e8m0fnu" for st in (a, w)
            if st.format.name not in WHOLE_K]
    ga = 1.0 if a.tensor_scale is None else float(a.tensor_scale)
    gw = 1.0 if w.tensor_scale is None else float(w.tensor_scale)
    if math.isnan(pa) or math.isnan(pw) or math.isnan(ga) or math.isnan(gw):
        return math.nan
    ep = None
    if a.format.name in WHOLE_K or w.format.name in WHOLE_K or a.tensor_scale is not None or (
            w.tensor_scale is not None):
        ep = (pa, pw, ga, gw)
    return scaled_dot(ea, ew, unit, sa, sw, exact_scale_product=all(e8m0), epilogue=ep)


def check_against_reference(a, w, unit, rows=None, cols=None, fidelity="bit-exact"):
    unit = get_unit(unit)
    y = scaled_matmul(a, w, unit, fidelity=fidelity)
    M, N = y.shape
    for m in rows or range(M):
        for n in cols or range(N):
            r = reference(a, w, unit, m, n)
            assert same(r, float(y[m, n])), (unit.name, a.format.name, w.format.name, m, n, r,
                                             float(y[m, n]))
    return y


# ---------------------------------------------------------------------------------------------
# operands


def make(codes: torch.Tensor, scales: torch.Tensor, fmt: str,
         tensor_scale: float | None = None) -> ScaledTensor:
    """A ScaledTensor from chosen codes and scales (dequantized only for completeness)."""
    f = get_scaled_format(fmt)
    bshape = f.granularity.block_shape(tuple(codes.shape))
    vals = decode(codes, f.element)
    ts = None if tensor_scale is None else torch.tensor(tensor_scale, dtype=torch.float32)
    return ScaledTensor(vals, codes.to(torch.uint8), scales, ts, bshape, f)


def valid_codes(fmt, shape, g, *, low_exp=False):
    """Random codes of an element format, no NaN codes; low_exp: small exponent fields."""
    f = get_format(fmt)
    n = 1 << f.bits
    ok = [c for c in range(n) if not math.isnan(float(decode(torch.tensor([c]), f)[0]))]
    if low_exp and hasattr(f, "man_bits"):
        ok = [c for c in ok if ((c >> f.man_bits) & ((1 << f.exp_bits) - 1)) <= 1] or ok
    idx = torch.randint(0, len(ok), shape, generator=g)
    return torch.tensor(ok, dtype=torch.int64)[idx]


def adversarial(fmt: str, rows: int, K: int, g, kind: str, tensor_scale=None) -> ScaledTensor:
    f = get_scaled_format(fmt)
    bshape = f.granularity.block_shape((rows, K))
    grid = (-(-rows // bshape[0]), -(-K // bshape[1]))
    codes = valid_codes(f.element, (rows, K), g, low_exp=kind == "subnormal")
    if kind == "cancel":  # pairs that cancel (the other operand is equal in pairs), except
        sign = 1 << (f.element.bits - 1)  # the last element: a small survivor
        codes[:, 1::2] = codes[:, 0::2] ^ sign
        codes[:, -1] = valid_codes(f.element, (rows,), g, low_exp=True)
    if f.scale.name == "float8_e8m0fnu":
        spread = 20 if kind == "spread" else 3
        sc = torch.randint(127 - spread, 127 + spread + 1, grid, generator=g)
        if kind == "nan":
            sc[0, -1] = 255
    elif f.scale.name == "fp32":
        e = torch.randint(-12 if kind == "spread" else -3, 13 if kind == "spread" else 4, grid,
                          generator=g)
        sc = torch.ldexp(1 + torch.rand(grid, generator=g), e.float())
        if kind == "nan":
            sc[0, -1] = math.nan
        return make(codes, sc.float(), fmt, tensor_scale)
    else:  # e4m3 block scales: every positive code, zero included
        sc = torch.randint(0, 0x7F, grid, generator=g)
        if kind == "nan":
            sc[0, -1] = 0x7F
    return make(codes, sc.to(torch.uint8), fmt, tensor_scale)


# ---------------------------------------------------------------------------------------------
# bit for bit against the reference

CASES = [  # (activation format, weight format, unit, K)
    ("mxfp8", "mxfp8", "h100-e4m3", 96),
    ("mxfp8", "mxfp8", "h100-bf16", 64),
    ("mxfp4", "mxfp4", "h100-e4m3", 64),
    ("mxfp6", "mxfp6_e2m3", "h100-fp16", 64),
    ("mxint8", "mxint8", "h100-bf16", 64),
    ("nvfp4", "nvfp4", "h100-bf16", 48),
    ("nvfp4", "nvfp4", "exact-fp32", 48),
    ("mxfp4", "mxfp4", "exact-fp32", 64),
    ("fp8_1x128", "fp8_128x128", "deepseek-fp8", 256),
    ("fp8_1x128", "fp8_1x128", "h100-e4m3", 256),
    ("fp8_tensor", "fp8_tensor", "h100-e4m3", 96),
    ("fp8_tensor", "fp8_tensor", "deepseek-fp8", 256),
    ("int8_token", "int8_channel", "exact-fp32", 40),
    ("int4_group128", "int4_group128", "h100-bf16", 256),
    ("mxfp8", "mxfp8", "fma-bf16-fp32", 40),
    ("mxfp8", "mxfp8", "mul-add-fp16-fp32", 40),
]


@pytest.mark.parametrize("fa,fw,unit,K", CASES, ids=[f"{a}-{w}-{u}" for a, w, u, _ in CASES])
def test_random_operands_equal_reference(fa, fw, unit, K):
    g = torch.Generator().manual_seed(K + len(fa) + len(unit))
    x = torch.randn(3, K, generator=g) * 3
    W = torch.randn(130 if fw == "fp8_128x128" else 3, K, generator=g)
    a = quantize_scaled(x, fa, return_parts=True)
    w = quantize_scaled(W, fw, return_parts=True)
    y = check_against_reference(a, w, unit, cols=[0, 1, 2])
    deq = a.dequantized.double() @ w.dequantized.double().T
    assert float((y.double() - deq).norm() / deq.norm()) < 2e-2


@pytest.mark.parametrize("fa,fw,unit,K", CASES, ids=[f"{a}-{w}-{u}" for a, w, u, _ in CASES])
def test_every_supporting_kernel_equals_the_reference(fa, fw, unit, K):
    """Not only the kernel the dispatcher picks: every bit-exact kernel that accepts the
    scaled call gives the exact reference's bits (the int64 chain once returned zeros for
    fp32 K-blocked scales under a promoting unit, deepseek-fp8 with 1x128 scales, because its
    operands were decomposed for per-product scales that such a unit does not apply)."""
    g = torch.Generator().manual_seed(K + len(fa) + len(unit) + 1)
    x = torch.randn(3, K, generator=g) * 3
    W = torch.randn(130 if fw == "fp8_128x128" else 3, K, generator=g)
    a = quantize_scaled(x, fa, return_parts=True)
    w = quantize_scaled(W, fw, return_parts=True)
    ref = torch.tensor([[reference(a, w, get_unit(unit), m, n) for n in range(3)]
                        for m in range(3)], dtype=torch.float32)
    ran = []
    for k in available_kernels("bit-exact"):
        if k == "reference" or scaled_explain(a, w, unit, kernel=k).kernel is None:
            continue
        with use_kernels(k):
            y = scaled_matmul(a, w, unit)[:, :3]
        same = (y.view(torch.int32) == ref.view(torch.int32)) | (y.isnan() & ref.isnan())
        assert bool(same.all()), (k, y[~same][:4], ref[~same][:4])
        ran.append(k)
    assert "int-chain" in ran


ADV = [  # (activation, weight, unit, K, tensor scales)
    ("mxfp8", "mxfp8", "h100-e4m3", 96, None),
    ("mxfp4", "mxfp4", "h100-bf16", 64, None),
    ("mxfp8_e5m2", "mxfp8_e5m2", "h100-e5m2", 64, None),
    ("nvfp4", "nvfp4", "h100-bf16", 48, (0.75, 3.5)),
    ("nvfp4", "nvfp4", "exact-fp32", 48, (1.0, 0.3)),
    ("fp8_1x128", "fp8_128x128", "deepseek-fp8", 384, None),
    ("fp8_tensor", "fp8_tensor", "h100-e4m3", 64, None),
    ("fp8_tensor", "fp8_1x128", "deepseek-fp8", 256, None),
]


@pytest.mark.parametrize("kind", ["spread", "cancel", "subnormal", "nan"])
@pytest.mark.parametrize("fa,fw,unit,K,ts", ADV, ids=[f"{a}-{w}-{u}" for a, w, u, _, _ in ADV])
def test_adversarial_operands_equal_reference(fa, fw, unit, K, ts, kind):
    """Wide spread of scales and elements, exact cancellation, subnormal elements and E4M3
    zero / subnormal scales, NaN blocks."""
    g = torch.Generator().manual_seed(zlib.crc32(f'{fa}/{unit}/{kind}'.encode()) % 10_000)
    rows_w = 130 if fw == "fp8_128x128" else 3
    a = adversarial(fa, 3, K, g, kind, None if ts is None else ts[0])
    w = adversarial(fw, rows_w, K, g, kind if kind == "subnormal" else "spread",
                    None if ts is None else ts[1])
    if kind == "cancel":  # w equal in pairs along K: a's pairs cancel exactly
        w.codes[:, 1::2] = w.codes[:, 0::2]
    y = check_against_reference(a, w, unit, cols=[0, 1, 2])
    if kind == "nan":  # a's row 0 (per-tensor: every row) has a NaN block
        assert torch.isnan(y[0]).all()
        if fa not in WHOLE_K and not get_scaled_format(fa).element.has_inf:
            assert not torch.isnan(y[1:, :3]).any()


def test_wide_alignment_fallback_equals_reference():
    """exact-fp32 with an exponent spread beyond the int64 window inside one block: the
    flagged outputs are recomputed by the reference (and agree with it)."""
    g = torch.Generator().manual_seed(5)
    a = adversarial("mxfp8", 2, 64, g, "spread")
    a.scales[:, 0] = 127 + 60
    a.scales[:, 1] = 127 - 60
    w = adversarial("mxfp8", 2, 64, g, "random")
    check_against_reference(a, w, "exact-fp32")


def test_unit_scales_equal_plain_matmul():
    """All scales = 1: scaled_matmul is matmul on the element values, every unit kind."""
    g = torch.Generator().manual_seed(1)
    for unit, fmt in (("h100-e4m3", "mxfp8"), ("h100-bf16", "mxfp8"), ("deepseek-fp8", "mxfp8"),
                      ("exact-fp32", "mxfp4"), ("fma-bf16-fp32", "mxfp8"),
                      ("mul-add-fp16-fp32", "mxfp8")):
        K = 256
        ca = valid_codes(get_scaled_format(fmt).element, (4, K), g)
        cw = valid_codes(get_scaled_format(fmt).element, (5, K), g)
        ones = torch.full((4, K // 32), 127, dtype=torch.uint8)
        a = make(ca, ones, fmt)
        w = make(cw, ones[:1].expand(5, -1).clone(), fmt)
        if unit == "deepseek-fp8":  # scales at promotion: 1x128 blocks of 1.0
            a = make(ca, torch.ones(4, 2), "fp8_1x128")
            w = make(cw, torch.ones(1, 2), "fp8_128x128")
        for fid in ("bit-exact", "fast"):
            y = scaled_matmul(a, w, unit, fidelity=fid)
            d = matmul(a.dequantized, w.dequantized.T, unit, fidelity=fid)
            assert torch.equal(y.view(torch.int32), d.view(torch.int32)), (unit, fid)


def test_k_not_multiple_of_block_is_zero_padded():
    """K = 40 with MX blocks of 32 (the last block partial) and NVFP4 blocks of 16: the result
    is that of the operands padded with zeros to a whole number of blocks."""
    g = torch.Generator().manual_seed(2)
    for fmt, unit in (("mxfp8", "h100-e4m3"), ("mxfp4", "h100-bf16"), ("nvfp4", "h100-bf16"),
                      ("fp8_1x128", "deepseek-fp8")):
        x = torch.randn(3, 40, generator=g)
        W = torch.randn(4, 40, generator=g)
        wf = "fp8_128x128" if fmt == "fp8_1x128" else fmt
        a, w = quantize_scaled(x, fmt, return_parts=True), quantize_scaled(W, wf, return_parts=True)
        pad = torch.nn.functional.pad
        ap = quantize_scaled(pad(x, (0, 24)), fmt, return_parts=True)
        wp = quantize_scaled(pad(W, (0, 24)), wf, return_parts=True)
        if fmt == "nvfp4":  # same tensor scale (the padding does not change the amax)
            assert float(ap.tensor_scale) == float(a.tensor_scale)
        y = check_against_reference(a, w, unit)
        assert torch.equal(y, scaled_matmul(ap, wp, unit)), (fmt, unit)


def test_batched_activations_broadcast_against_weights():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 64, generator=g)
    W = torch.randn(7, 64, generator=g)
    a = quantize_scaled(x, "mxfp8", return_parts=True)
    w = quantize_scaled(W, "mxfp8", return_parts=True)
    y = scaled_matmul(a, w, "h100-e4m3")
    assert y.shape == (2, 3, 5, 7)
    for i in range(2):
        for j in range(3):
            aij = quantize_scaled(x[i, j], "mxfp8", return_parts=True)
            assert torch.equal(y[i, j], scaled_matmul(aij, w, "h100-e4m3"))


# ---------------------------------------------------------------------------------------------
# fast fidelity


@pytest.mark.parametrize("fa,fw,unit", [
    ("mxfp8", "mxfp8", "h100-e4m3"), ("nvfp4", "nvfp4", "h100-bf16"),
    ("fp8_1x128", "fp8_128x128", "deepseek-fp8"), ("fp8_tensor", "fp8_tensor", "h100-e4m3")])
def test_fast_fidelity_is_close_and_measured(fa, fw, unit):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 512, generator=g)
    W = torch.randn(48, 512, generator=g)
    a, w = quantize_scaled(x, fa, return_parts=True), quantize_scaled(W, fw, return_parts=True)
    r = scaled_fast_divergence(a, w, unit)
    assert r["n"] == 32 * 48 and 0 <= r["fraction_differ"] <= 1
    assert r["normwise_relative"] < 2e-3, r
    assert r["nonfinite_mismatch"] == 0


def test_fast_equals_bit_exact_for_exact_units():
    g = torch.Generator().manual_seed(6)
    x, W = torch.randn(8, 96, generator=g), torch.randn(8, 96, generator=g)
    for fmt in ("mxfp4", "nvfp4", "mxfp8"):
        a = quantize_scaled(x, fmt, return_parts=True)
        w = quantize_scaled(W, fmt, return_parts=True)
        assert scaled_fast_divergence(a, w, "exact-fp32")["fraction_differ"] == 0.0


def test_llm_shaped_fast_call_is_quick_and_chunked():
    """A (1, 1024, 576) activation against a 1536 x 576 weight in fast fidelity, with a small
    chunk bound (memory): same result as one chunk."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 1024, 576, generator=g)
    W = torch.randn(1536, 576, generator=g) * 0.05
    a = quantize_scaled(x, "fp8_1x128", return_parts=True)
    w = quantize_scaled(W, "fp8_128x128", return_parts=True)
    y = scaled_matmul(a, w, "deepseek-fp8", fidelity="fast")
    assert y.shape == (1, 1024, 1536)
    y2 = scaled_matmul(a, w, "deepseek-fp8", fidelity="fast", max_chunk_elements=1 << 18)
    assert torch.equal(y, y2)
    deq = a.dequantized[0].double() @ w.dequantized.double().T
    assert float((y[0].double() - deq).norm() / deq.norm()) < 1e-3


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_errors():
    g = torch.Generator().manual_seed(8)
    x, W = torch.randn(2, 64, generator=g), torch.randn(3, 64, generator=g)
    mx = quantize_scaled(x, "mxfp8", return_parts=True)
    mw = quantize_scaled(W, "mxfp8", return_parts=True)
    nv = quantize_scaled(x, "nvfp4", return_parts=True)
    nvw = quantize_scaled(W, "nvfp4", return_parts=True)
    with pytest.raises(ValueError, match=r"k=32 must divide the scale block 16"):
        scaled_matmul(nv, nvw, "h100-e4m3")
    with pytest.raises(ValueError, match=r"scale blocks of 32 along K.*every 128 products"):
        scaled_matmul(mx, mw, "deepseek-fp8")
    e5 = quantize_scaled(W, "mxfp8_e5m2", return_parts=True)
    with pytest.raises(ValueError, match=r"cannot take the elements of w \(mxfp8_e5m2"):
        scaled_matmul(mx, e5, "h100-e4m3")
    with pytest.raises(ValueError, match="shapes do not match"):
        scaled_matmul(mx, quantize_scaled(W[:, :32], "mxfp8", return_parts=True), "h100-e4m3")
    with pytest.raises(ValueError, match="fidelity"):
        scaled_matmul(mx, mw, "h100-e4m3", fidelity="approx")
    with pytest.raises(TypeError, match="ScaledTensor"):
        scaled_matmul(x, mw, "h100-e4m3")
    neg = quantize_scaled(x, "fp8_1x128", return_parts=True)
    neg.scales[0, 0] = -1.0
    with pytest.raises(ValueError, match="scale -1.0 is not valid"):
        scaled_matmul(neg, quantize_scaled(W, "fp8_128x128", return_parts=True), "deepseek-fp8")
    with pytest.raises(ValueError, match="scales vary inside promotion chunk"):
        scaled_dot([1.0] * 4, [1.0] * 4, get_unit("deepseek-fp8").with_(promotion_interval=32),
                   [1.0, 2.0, 1.0, 1.0], [1.0] * 4)


def test_custom_exact_unit_takes_any_element_format():
    """A Kulisch unit over the element format itself (kulisch(in_format=...))."""
    g = torch.Generator().manual_seed(9)
    x, W = torch.randn(2, 64, generator=g), torch.randn(3, 64, generator=g)
    a = quantize_scaled(x, "mxfp4", return_parts=True)
    w = quantize_scaled(W, "mxfp4", return_parts=True)
    unit = kulisch("e2m1", "fp32", name="exact-e2m1")
    assert torch.equal(scaled_matmul(a, w, unit), scaled_matmul(a, w, "exact-fp32"))
    check_against_reference(a, w, unit)
