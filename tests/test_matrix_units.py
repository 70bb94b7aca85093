"""Matrix units (emulation/): known-answer vectors, real tensor-core recordings, the fast path
against the exact reference, the DeepSeek FP8 experiment and bad input (issue 3).

Known-answer vectors and the error-growth figures are from docs/arithmetic.md section 4; the
recordings are ../shared/data/tensor-core-recordings (Khattak & Mikaitis, arXiv 2512.07004).
"""

from __future__ import annotations

import math
import struct
import zlib
from functools import cache

import pytest
import torch
from precisim.emulation import fast_divergence, matmul
from precisim.emulation.matrix_unit import CMode, Drop, MatrixUnit, chunked, kulisch
from precisim.emulation.presets import available_units, get_unit
from precisim.emulation.recordings import RECORDED_CASES, RecordingError
from precisim.emulation.recordings import load_recording as load_recorded
from precisim.emulation.reference import dot, exact_dot
from precisim.formats import FormatError, quantize

# ---------------------------------------------------------------------------------------------
# helpers


def f32_bits(x: float) -> int:
    return struct.unpack(">I", struct.pack(">f", x))[0]


def bits_f32(b: int) -> float:
    return struct.unpack(">f", b.to_bytes(4, "big"))[0]


def both(a: list[float], b: list[float], unit: MatrixUnit | str, c: float = 0.0) -> tuple[int, int]:
    """fp32 bits of the reference result and of the vectorised matmul for one dot product."""
    unit = get_unit(unit)
    r = dot(a, b, unit, c)
    d = matmul(torch.tensor([a]), torch.tensor([b]).T, unit, torch.tensor([[c]]))
    return f32_bits(r), f32_bits(float(d[0, 0]))


def assert_tv(a, b, unit, c, expected: int) -> None:
    r, f = both(a, b, unit, c)
    assert r == expected, f"reference {r:#010x} != {expected:#010x} for {get_unit(unit).name}"
    assert f == expected, f"matmul {f:#010x} != {expected:#010x} for {get_unit(unit).name}"


EXACT_RNE = kulisch("fp16", "fp32", "rne", name="exact-rne")
FMA32 = "fma-fp16-fp32"

# ---------------------------------------------------------------------------------------------
# known-answer vectors (docs/arithmetic.md section 4)


@pytest.mark.parametrize("unit,expected", [
    ("v100-fp16", 0x34000000), ("a100-fp16", 0x33800000), ("h100-fp16", 0x33800000),
    (EXACT_RNE, 0x33800000)])
def test_tv1(unit, expected):
    assert_tv([1.0], [1.0], unit, -(1 - 2.0**-24), expected)


@pytest.mark.parametrize("unit,expected", [
    ("v100-fp16", 0x3F800000), ("a100-fp16", 0x3F800000), ("h100-fp16", 0x3F800001),
    (EXACT_RNE, 0x3F800001), (FMA32, 0x3F800000)])
def test_tv2(unit, expected):
    assert_tv([2.0**-24] * 3, [1.0, 0.5, 0.5], unit, 1.0, expected)


@pytest.mark.parametrize("unit,expected", [
    ("v100-fp16", 0x3F800000), ("a100-fp16", 0x3F800000), ("h100-fp16", 0x3F800000),
    (EXACT_RNE, 0x3F800001)])
def test_tv3(unit, expected):
    assert_tv([2.0**-12], [1.5 * 2.0**-12], unit, 1.0, expected)


@pytest.mark.parametrize("unit", ["v100-fp16", "a100-fp16", "h100-fp16", EXACT_RNE])
def test_tv4(unit):
    u = get_unit(unit)
    for p in range(1, 32):
        a = [0.0] * 32
        a[0], a[p] = 1.0, 2.0**-23
        exact = u.alignment_bits is None
        expected = 0x40000001 if exact or p < u.block_size else 0x40000000
        assert_tv(a, [1.0] * 32, u, 1 + 2.0**-23, expected)


def test_tv5_v100_not_monotonic():
    assert_tv([1.0] * 4, [2.0**-24] * 4, "v100-fp16", 1 - 2.0**-24, 0x3F800001)
    assert_tv([1.0] * 4, [2.0**-24] * 4, "v100-fp16", 1.0, 0x3F800000)


@pytest.mark.parametrize("unit,expected", [
    ("h100-e4m3", 0x3F800000), (kulisch("e4m3", name="exact-e4m3-rne"), 0x3F803E00)])
def test_tv6_fp8(unit, expected):
    x = [1.0] + [2.0**-7] * 31
    assert_tv(x, x, unit, 0.0, expected)


@pytest.mark.parametrize("unit", ["v100-fp16", "a100-fp16", "h100-fp16", "a100-bf16",
                                  "h100-bf16", "a100-tf32", "h100-tf32", EXACT_RNE, FMA32])
def test_tv7(unit):
    assert_tv([1.0] * 4, [1.0, 1.5, 1.75, 1.875], unit, 1.875, 0x41000000)


def test_tv11_bf16_double_rounding():
    a, b = [1.0, 2.0**-8, 2.0**-30], [1.0, 1.0, 1.0]
    units = {
        kulisch("bf16", "bf16", "rne", name="exact-then-bf16"): 0x3F81,
        get_unit("fma-bf16-fp32").with_(output_format="bf16"): 0x3F80,
        kulisch("bf16", "fp32", "rto", name="rto-fp32", output_format="bf16"): 0x3F81,
    }
    for unit, expected in units.items():
        r, f = both(a, b, unit)
        assert r >> 16 == expected and r & 0xFFFF == 0, unit.name
        assert f == r, unit.name


@pytest.mark.parametrize("overflow,expected", [("wrap", -32641), ("saturate", 32767)])
def test_tv12_fixed_point_accumulator(overflow, expected):
    unit = MatrixUnit(f"int16-{overflow}", "uint8", block_size=1, alignment_bits=None,
                      acc_format="int16", acc_overflow=overflow)
    r, f = both([255.0] * 129, [1.0] * 129, unit)
    assert bits_f32(r) == expected and bits_f32(f) == expected


# ---------------------------------------------------------------------------------------------
# the unit description


def test_every_preset_is_a_matrix_unit_and_lists_in_the_error():
    for name in available_units():
        assert get_unit(name).name == name
    with pytest.raises(KeyError, match="h100-e4m3"):
        get_unit("h100-e4m4")


@pytest.mark.parametrize("field,value,match", [
    ("block_size", 0, "block_size=0"),
    ("alignment_bits", -1, "alignment_bits=-1"),
    ("drop", "chop", "drop='chop'"),
    ("c_mode", "before", "c_mode='before'"),
    ("acc_rounding", "up-ish", "acc_rounding"),
    ("acc_format", "e9m9x", "acc_format"),
    ("a_format", "int32", "a_format"),
    ("promotion_interval", 100, "promotion_interval=100"),
    ("block_result_bits", 40, "block_result_bits=40"),
    ("acc_overflow", "wrap", "acc_overflow='wrap'"),
    ("acc_format", "e8m0", "acc_format='float8_e8m0fnu'"),
    ("output_format", "e8m0", "output_format='float8_e8m0fnu'"),
    ("alignment_floor", 5000, "alignment_floor=5000"),
])
def test_validation_names_the_bad_value(field, value, match):
    base = get_unit("h100-e4m3")
    with pytest.raises((ValueError, FormatError), match=match):
        base.with_(**{field: value})


def test_sr_needs_bits_and_is_reproducible():
    with pytest.raises(ValueError, match="acc_sr_bits"):
        MatrixUnit("sr", "bf16", acc_format="bf16", acc_rounding="sr")
    u = MatrixUnit("sr", "bf16", block_size=4, alignment_bits=None, acc_format="bf16",
                   acc_rounding="sr", acc_sr_bits=8)
    g = torch.Generator().manual_seed(3)
    a = quantize(torch.randn(2, 16, generator=g), "bf16")
    b = quantize(torch.randn(16, 3, generator=g), "bf16")
    d1, d2 = matmul(a, b, u, seed=5), matmul(a, b, u, seed=5)
    assert torch.equal(d1, d2)
    nb = 4
    gen = torch.Generator().manual_seed(5)
    rand = torch.randint(0, 256, (1, 2, 3, nb), generator=gen, dtype=torch.int64)
    for i in range(2):
        for j in range(3):
            r = dot(a[i].tolist(), b[:, j].tolist(), u, 0.0, rand=rand[0, i, j].tolist())
            assert f32_bits(r) == f32_bits(float(d1[i, j]))


# ---------------------------------------------------------------------------------------------
# recordings of real tensor cores (../shared/data/tensor-core-recordings, loaded by
# precisim.emulation.recordings; $PRECISIM_SHARED overrides the shared folder)

CASES = [(c.gpu, c.fmt, c.out, c.preset) for c in RECORDED_CASES]


@cache
def load_recording(gpu: str, fmt: str, out: str):
    try:
        rec = load_recorded(gpu, fmt, out)
    except RecordingError as e:
        pytest.skip(str(e))
    a, b, c = rec.a.tolist(), rec.b.tolist(), rec.c.tolist()
    dd = rec.d_bits.tolist()
    assert len(a) == len(b) == len(c) == len(dd) == 5000
    return a, b, c, dd


def test_recording_loader_against_the_raw_files(tmp_path):
    """load_recording parses the files as the README says (checked line by line with struct
    on the first and last samples), applies C = 0 (FP8) and fp16 C (fp16 outputs), and names
    the path when the data are missing."""
    for gpu, fmt, out, preset in CASES:
        a, b, c, dd = load_recording(gpu, fmt, out)
        rec = load_recorded(gpu, fmt, out)
        assert rec.preset == preset and len(rec) == 5000
        lines = {n: (rec.path / f"{n}_{gpu}_{f}.txt").read_text().splitlines()
                 for n, f in (("a", fmt), ("b", fmt), ("c", "fp32"), ("d", out))}
        for i in (0, 4999):
            assert a[i] == [bits_f32(int(h, 16)) for h in lines["a"][i].split()]
            assert b[i] == [bits_f32(int(h, 16)) for h in lines["b"][i].split()]
            assert dd[i] == int(lines["d"][i], 2)
            raw_c = bits_f32(int(lines["c"][i], 2))
            if fmt in ("E4M3", "E5M2"):
                assert c[i] == 0.0
            elif out == "fp16":
                assert c[i] == float(torch.tensor(raw_c).half())
            else:
                assert f32_bits(c[i]) == f32_bits(raw_c)
    with pytest.raises(RecordingError, match=str(tmp_path)):
        load_recorded("H100", "E4M3", "fp32", root=tmp_path)
    with pytest.raises(KeyError, match="V100"):
        load_recorded("H100", "E4M3", "fp16")


@pytest.mark.parametrize("gpu,fmt,out,preset", CASES, ids=[f"{g}-{f}-{o}" for g, f, o, _ in CASES])
def test_recordings_matmul_bit_exact(gpu, fmt, out, preset):
    """Every one of the 5000 recorded outputs, by the vectorised bit-exact matmul."""
    a, b, c, d = load_recording(gpu, fmt, out)
    A = torch.tensor(a).unsqueeze(1)  # (5000, 1, K)
    B = torch.tensor(b).unsqueeze(2)  # (5000, K, 1)
    C = torch.tensor(c).reshape(-1, 1, 1)
    got = matmul(A, B, preset, C).reshape(-1).view(torch.int32).tolist()
    got = [x & 0xFFFFFFFF for x in got]
    bad = [i for i in range(len(d)) if got[i] != d[i]]
    assert not bad, (f"{len(bad)} of {len(d)} differ, first sample {bad[0]}: "
                     f"got {got[bad[0]]:#010x}, recorded {d[bad[0]]:#010x}")


def _reference_on(gpu, fmt, out, preset, n):
    a, b, c, d = load_recording(gpu, fmt, out)
    unit = get_unit(preset)
    bad = [i for i in range(n) if f32_bits(dot(a[i], b[i], unit, c[i])) != d[i]]
    assert not bad, f"{len(bad)} of {n} differ (first sample {bad[0]})"


@pytest.mark.parametrize("gpu,fmt,out,preset", CASES, ids=[f"{g}-{f}-{o}" for g, f, o, _ in CASES])
def test_recordings_reference_sample(gpu, fmt, out, preset):
    """The exact reference on the first 100 samples of each file (all 5000: slow test)."""
    _reference_on(gpu, fmt, out, preset, 100)


@pytest.mark.slow
@pytest.mark.parametrize("gpu,fmt,out,preset", CASES, ids=[f"{g}-{f}-{o}" for g, f, o, _ in CASES])
def test_recordings_reference_all(gpu, fmt, out, preset):
    _reference_on(gpu, fmt, out, preset, 5000)


# ---------------------------------------------------------------------------------------------
# vectorised matmul == exact reference, every preset, random and adversarial inputs

def _inputs(unit: MatrixUnit, kind: str, seed: int, M=3, K=40, N=3):
    g = torch.Generator().manual_seed(seed)
    fa, fb = unit.a_format, unit.b_format
    cf = unit.promotion_format if unit.promotion_interval else unit.acc_format

    def q(x, f):
        if f.name == "fp32":  # already fp32 (and formats' quantize is slow for fp32 itself)
            return x
        return quantize(x, f, "rne", "saturate")

    if kind == "random":
        a, b = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
        c = torch.randn(M, N, generator=g)
    elif kind == "spread":  # wide exponent spread inside every block
        a = torch.randn(M, K, generator=g) * 2.0 ** torch.randint(-12, 12, (M, K), generator=g)
        b = torch.randn(K, N, generator=g) * 2.0 ** torch.randint(-12, 12, (K, N), generator=g)
        c = torch.randn(M, N, generator=g) * 2.0 ** torch.randint(-30, 30, (M, N), generator=g)
    elif kind == "cancel":  # products that cancel exactly, plus tiny survivors
        a = torch.randn(M, K, generator=g)
        b = torch.randn(K, N, generator=g)
        a[:, 1::2] = a[:, 0::2]
        b[1::2] = -b[0::2]
        a[:, -1] = a[:, -1] * 2.0**-10
        c = torch.zeros(M, N)
    elif kind == "subnormal":  # near the smallest values of the formats
        tiny = float(getattr(fa, "min_normal", 1))
        a = torch.randn(M, K, generator=g) * tiny * 4
        b = torch.randn(K, N, generator=g)
        c = torch.randn(M, N, generator=g) * 2.0**-130
    else:
        raise AssertionError(kind)
    return q(a, fa), q(b, fb), q(c, cf)


@pytest.mark.parametrize("name", available_units())
@pytest.mark.parametrize("kind", ["random", "spread", "cancel", "subnormal"])
def test_matmul_equals_reference(name, kind):
    unit = get_unit(name)
    a, b, c = _inputs(unit, kind, seed=zlib.crc32(f'{name}/{kind}'.encode()) % 1000)
    d = matmul(a, b, unit, c)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            r = dot(a[i].tolist(), b[:, j].tolist(), unit, float(c[i, j]))
            assert f32_bits(r) == f32_bits(float(d[i, j])), (name, kind, i, j, r, float(d[i, j]))


@pytest.mark.parametrize("drop", list(Drop))
@pytest.mark.parametrize("c_mode", list(CMode))
def test_matmul_equals_reference_other_datapaths(drop, c_mode):
    """Drop modes, late c, product rounding, RNE/RTO accumulators, promotion and flushing."""
    units = [
        MatrixUnit("x", "bf16", block_size=8, alignment_bits=12, drop=drop, c_mode=c_mode,
                   acc_format="fp32", acc_rounding="rne"),
        MatrixUnit("y", "fp16", block_size=4, alignment_bits=20, drop=drop, c_mode=c_mode,
                   acc_format="bf16", acc_rounding="rto", flush_input_subnormals=True,
                   flush_output_subnormals=True, output_format="fp16"),
        MatrixUnit("z", "e5m2", block_size=16, alignment_bits=9, drop=drop, c_mode=c_mode,
                   product_format="e5m2", product_rounding="rtz", acc_rounding="ru",
                   promotion_interval=32, alignment="normalised"),
    ]
    for unit in units:
        for kind in ("random", "spread", "subnormal"):
            a, b, c = _inputs(unit, kind, seed=7)
            d = matmul(a, b, unit, c)
            for i in range(a.shape[0]):
                for j in range(b.shape[1]):
                    r = dot(a[i].tolist(), b[:, j].tolist(), unit, float(c[i, j]))
                    assert f32_bits(r) == f32_bits(float(d[i, j])), (unit, kind, i, j)


@pytest.mark.parametrize("name", ["v100-fp16", "h100-bf16", "h100-e5m2", "exact-fp16",
                                  "fma-fp16-fp32", "deepseek-fp8"])
def test_nan_inf_propagation(name):
    """Model assumption (docs/arithmetic.md 4): NaN wins, +inf with -inf is NaN, else inf."""
    unit = get_unit(name)
    fmt = unit.a_format
    a = quantize(torch.randn(5, 8), fmt)
    b = quantize(torch.randn(8, 2), fmt)
    a[0, 3] = math.nan
    a[1, 2] = 0.0
    b[2, 0] = math.inf if fmt.has_inf else math.nan  # 0 * inf -> NaN in column 0
    a[2, 5] = math.inf if fmt.has_inf else 1.0
    if fmt.has_inf:
        a[3, 0], a[3, 1] = math.inf, -math.inf
        b[0, :], b[1, :] = 1.0, 1.0  # +inf and -inf products -> NaN
    d = matmul(a, b, unit)
    for i in range(5):
        for j in range(2):
            r = dot(a[i].tolist(), b[:, j].tolist(), unit)
            x = float(d[i, j])
            assert (math.isnan(r) and math.isnan(x)) or r == x, (i, j, r, x)
    assert math.isnan(float(d[0, 0])) and math.isnan(float(d[0, 1]))


def test_overflow_gives_inf_even_under_rtz():
    a = torch.tensor([[2.0**100] * 16])
    b = torch.full((16, 1), 2.0**27)
    unit = get_unit("h100-bf16")  # 16 * 2^127 = 2^131: beyond fp32, rounded toward zero
    assert float(matmul(a, b, unit)) == math.inf
    assert dot(a[0].tolist(), b[:, 0].tolist(), unit) == math.inf
    assert float(matmul(-a, b, unit)) == -math.inf
    # below 2^128 round-toward-zero gives the largest finite value
    assert float(matmul(a[:, :1], b[:1] * 1.5, unit)) == 1.5 * 2.0**127


# ---------------------------------------------------------------------------------------------
# batched, broadcast, padding, bad input

def test_batched_and_broadcast():
    unit = get_unit("a100-bf16")
    g = torch.Generator().manual_seed(1)
    a = quantize(torch.randn(2, 3, 4, 20, generator=g), "bf16")
    b = quantize(torch.randn(3, 20, 5, generator=g), "bf16")
    d = matmul(a, b, unit)
    assert d.shape == (2, 3, 4, 5)
    for i in range(2):
        for j in range(3):
            assert torch.equal(d[i, j], matmul(a[i, j], b[j], unit))


def test_k_not_multiple_of_block_is_zero_padded():
    unit = get_unit("h100-fp16")
    g = torch.Generator().manual_seed(2)
    a = quantize(torch.randn(3, 21, generator=g), "fp16")
    b = quantize(torch.randn(21, 2, generator=g), "fp16")
    pa = torch.cat([a, torch.zeros(3, 11)], 1)
    pb = torch.cat([b, torch.zeros(11, 2)], 0)
    assert torch.equal(matmul(a, b, unit), matmul(pa, pb, unit))


def test_bad_input_errors():
    unit = get_unit("h100-e4m3")
    a = quantize(torch.randn(2, 32), "e4m3")
    b = quantize(torch.randn(32, 3), "e4m3")
    with pytest.raises(ValueError, match="shapes do not match"):
        matmul(a, b[:31], unit)
    with pytest.raises(ValueError, match="not float8_e4m3fn values"):
        matmul(a + 0.01, b, unit)
    with pytest.raises(ValueError, match="infinities"):
        matmul(torch.where(a > 0, math.inf, a), b, unit)
    with pytest.raises(ValueError, match="does not broadcast"):
        matmul(a, b, unit, torch.zeros(5, 7))
    with pytest.raises(ValueError, match="fidelity"):
        matmul(a, b, unit, fidelity="approximate")
    with pytest.raises(TypeError, match="dtype"):
        matmul(a.to(torch.int32), b, unit)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        matmul(a[0], b, unit)
    with pytest.raises(ValueError, match="not a value of"):
        dot([0.1], [1.0], get_unit("h100-fp16"))
    with pytest.raises(ValueError, match="c holds values that are not fp16"):
        matmul(quantize(a, "fp16"), quantize(b, "fp16"), "h100-fp16-fp16out",
               torch.full((2, 3), 0.1))


# ---------------------------------------------------------------------------------------------
# fast fidelity and the DeepSeek experiment

def test_fast_mode_divergence_is_measured():
    g = torch.Generator().manual_seed(0)
    a = quantize(torch.randn(16, 256, generator=g), "bf16")
    b = quantize(torch.randn(256, 16, generator=g), "bf16")
    r = fast_divergence(a, b, "h100-bf16")
    assert 0.0 <= r["fraction_differ"] <= 1.0 and r["n"] == 256
    # exact units have no alignment truncation: fast mode equals bit-exact there
    r = fast_divergence(a, b, MatrixUnit("exact-blocks", "bf16", block_size=16))
    assert r["fraction_differ"] == 0.0


def _deepseek_error(unit: str, seed: int, M=64, K=4096, N=64) -> float:
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    a = quantize(x * (448 / x.abs().max()), "e4m3")  # per-tensor scaling to 448
    b = quantize(w * (448 / w.abs().max()), "e4m3")
    exact = a.double() @ b.double()  # exact: fp8 products span < 53 bits over K=4096
    d = matmul(a, b, unit).double()
    return float((d - exact).norm() / exact.norm())


def test_deepseek_fp8_promotion():
    """docs/arithmetic.md 4: K=4096, N(0,1): ~1.3e-3 without promotion, ~10x less with it."""
    e0 = _deepseek_error("h100-e4m3", seed=0)
    e1 = _deepseek_error("deepseek-fp8", seed=0)
    assert 0.6e-3 < e0 < 2.6e-3, e0
    assert 0.6e-4 < e1 < 2.6e-4, e1
    assert 5 < e0 / e1 < 20
    assert chunked(get_unit("h100-e4m3"), 128).with_(name="deepseek-fp8") == get_unit(
        "deepseek-fp8").with_(description="")


def test_exact_dot_rounds_once():
    assert f32_bits(exact_dot([2.0**-12], [1.5 * 2.0**-12], 1.0)) == 0x3F800001


@pytest.mark.parametrize("name", ["v100-fp16", "a100-tf32", "h100-bf16", "h100-e4m3",
                                  "deepseek-fp8", "h100-fp16-fp16out"])
def test_float_and_int_kernels_agree(name, monkeypatch):
    """The float32/float64 block kernel (kernel float-chain) and the generic int64 kernel
    (kernel int-chain, its float64 block sums switched off) give identical bits."""
    from precisim.emulation.matmul import int_chain

    unit = get_unit(name)
    for kind in ("random", "spread", "cancel"):
        a, b, c = _inputs(unit, kind, seed=11, M=6, K=300, N=5)
        fast_kernel = matmul(a, b, unit, c, kernel="float-chain")
        with monkeypatch.context() as m:
            m.setattr(int_chain, "sums_fit_float64", lambda u: False)
            int_kernel = matmul(a, b, unit, c, kernel="int-chain")
        assert torch.equal(fast_kernel.view(torch.int32), int_kernel.view(torch.int32)), kind


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["h100-e4m3", "h100-bf16", "deepseek-fp8", "exact-fp16"])
def test_gpu_matches_cpu(name):
    unit = get_unit(name)
    a, b, c = _inputs(unit, "spread", seed=3, M=16, K=256, N=8)
    cpu = matmul(a, b, unit, c)
    gpu = matmul(a.cuda(), b.cuda(), unit, c.cuda()).cpu()
    assert torch.equal(cpu.view(torch.int32), gpu.view(torch.int32))


def test_fp16_output_alignment_floor():
    """fp16-output modes align to E >= -19/-20/-21 (docs/arithmetic.md 4.6): bits below
    2^(floor - F) are cut even when every product is tiny. Products 2^-25 + 2^-48: with the
    floor the 2^-48 is cut and the exact tie 2^-25 rounds (RNE) to 0 in fp16; without it the
    sum is above the tie and rounds to 2^-24. (The recordings do not reach this range: they
    match with any floor <= -16, or none.)"""
    a, b = [2.0**-13, 2.0**-24, 0.0, 0.0], [2.0**-12, 2.0**-24, 0.0, 0.0]
    unit = get_unit("v100-fp16-fp16out")
    assert both(a, b, unit) == (0, 0)
    no_floor = unit.with_(alignment_floor=None)
    assert both(a, b, no_floor) == (f32_bits(2.0**-24),) * 2


@pytest.mark.parametrize("name", ["v100-fp16", "a100-bf16", "h100-bf16", "h100-e4m3",
                                  "h100-e5m2", "deepseek-fp8", "h100-fp16-fp16out"])
def test_float32_and_float64_chain_kernels_agree(name, monkeypatch):
    """The float block kernel in float32 (chosen when the inputs' exponent range allows it)
    and in float64 give identical bits."""
    from precisim.emulation.matmul import float_chain
    from precisim.emulation.matmul.call import prepare

    unit = get_unit(name)
    for kind in ("random", "cancel"):
        a, b, c = _inputs(unit, kind, seed=12, M=5, K=300, N=7)
        call = prepare(a, b, unit, c, "bit-exact")
        assert float_chain.chain_kernel_dtype(call) == torch.float32, kind
        d32 = matmul(a, b, unit, c, kernel="float-chain")
        with monkeypatch.context() as m:
            m.setattr(float_chain, "chain_kernel_dtype", lambda call: torch.float64)
            d64 = matmul(a, b, unit, c, kernel="float-chain")
        assert torch.equal(d32.view(torch.int32), d64.view(torch.int32)), kind


def test_bit_exact_does_not_depend_on_threads_or_chunks():
    unit = get_unit("h100-bf16")
    a, b, c = _inputs(unit, "spread", seed=13, M=9, K=70, N=50)
    ref = matmul(a, b, unit, c)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = matmul(a, b, unit, c, max_chunk_elements=1000)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ref.view(torch.int32), one.view(torch.int32))
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("name", ["v100-fp16", "h100-bf16", "h100-e5m2", "exact-fp16",
                                  "fma-fp16-fp32", "deepseek-fp8", "h100-fp16-fp16out"])
def test_fast_mode_special_values_match_bit_exact(name):
    """NaN / inf inputs (no overflow): fast mode puts NaN and inf where bit-exact does."""
    unit = get_unit(name)
    fmt = unit.a_format
    g = torch.Generator().manual_seed(14)
    a = quantize(torch.randn(5, 300, generator=g), fmt)
    b = quantize(torch.randn(300, 3, generator=g), fmt)
    a[0, 3] = math.nan
    b[2, 0] = math.inf if fmt.has_inf else math.nan
    a[2, 5] = math.inf if fmt.has_inf else 1.0
    if fmt.has_inf:
        a[3, 0], a[3, 1] = math.inf, -math.inf
        b[0, :], b[1, :] = 1.0, 1.0
    ex, fa = matmul(a, b, unit), matmul(a, b, unit, fidelity="fast")
    assert torch.equal(torch.isnan(ex), torch.isnan(fa))
    assert torch.equal(torch.isinf(ex), torch.isinf(fa))
    assert torch.equal(ex[torch.isinf(ex)], fa[torch.isinf(fa)])


def test_fast_mode_models_the_rtz_bias():
    """One-signed data on the H100 bf16 unit: the unit's round-toward-zero chain loses about
    0.375 ulp per block; fast mode models that mean loss, so its bias against bit-exact is
    several times smaller than that of the exact sum rounded once (docs/arithmetic.md 4.4)."""
    unit = get_unit("h100-bf16")
    g = torch.Generator().manual_seed(15)
    a = quantize(torch.rand(64, 512, generator=g), "bf16")
    b = quantize(torch.rand(512, 256, generator=g), "bf16")
    ex = matmul(a, b, unit).double()
    once = (a.double() @ b.double()).float().double()  # exact sum rounded once (RNE)
    fast = matmul(a, b, unit, fidelity="fast").double()
    bias_once = float((once - ex).mean() / ex.abs().mean())
    bias_fast = float((fast - ex).mean() / ex.abs().mean())
    assert bias_once > 3e-7 and abs(bias_fast) < bias_once / 3, (bias_once, bias_fast)
    r = fast_divergence(a, b, unit)
    assert {"fraction_differ", "max_ulp", "normwise_relative", "mean_relative_bias"} <= set(r)
    assert r["normwise_relative"] < 1e-6


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "bf16", "fp16", "tf32"])
def test_value_check_catches_off_grid_values_in_every_range(fmt):
    """The bit-level input check (fast path of the check) rejects values between grid points
    in the normal range, in the format's subnormal range, and above its max."""
    f = get_unit("exact-fp32").with_(a_format=fmt, b_format=fmt, name="x").a_format
    b = torch.ones(1, 1)
    tiny = float(f.min_normal) * 2.0 ** -f.man_bits  # smallest subnormal step
    for bad in (1.0 + 2.0 ** -(f.man_bits + 1), float(f.min_normal) * 0.75 + tiny / 2,
                tiny * 1.5, min(float(f.max) * 1.25, float(torch.finfo(torch.float32).max))):
        a = torch.tensor([[bad]])
        with pytest.raises(ValueError, match="not .* values"):
            matmul(a, b, kulisch(fmt, name="x"))
    ok = torch.tensor([[float(f.min_normal) * 0.75, tiny, float(f.max)]])
    matmul(ok, torch.ones(3, 1), kulisch(fmt, name="x"))
