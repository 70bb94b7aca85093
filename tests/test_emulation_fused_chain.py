"""The compiled bit-exact chain (kernel ``fused-chain``, emulation/matmul/fused.py) against the
eager float chain (kernel ``float-chain``), bit for bit, on adversarial operands: wide exponent
spreads, zeros of both
signs, all-zero blocks, ragged K, accumulator overflow and saturation, subnormal incoming c,
round-to-nearest-even and floor variants of the H100 FP8 datapath, in-block power-of-two
scales (MX) and promotion with scales (DeepSeek 1x128 / 128x128). The eager float chain is in
turn tested against the exact reference (tests/test_matrix_units.py, test_scaled_matmul.py)
and the GPU recordings; both kernels of the fused chain run compiled and eagerly here.
"""

from __future__ import annotations

import json
import math
import random
import zlib

import pytest
import torch
from precisim.emulation import explain, get_unit, scaled_matmul, unit_from_dict, use_kernels
from precisim.emulation.matmul import fused as fc
from precisim.emulation.matmul import matmul
from precisim.emulation.recordings import RECORDED_CASES, RecordingError, load_recording
from precisim.formats import kernels, quantize
from precisim.formats.scaling import quantize_scaled

UNITS = {
    # the wider-input NVIDIA units (bf16 / fp16 / tf32 products, F = 23..25, k = 4..16)
    "h100-bf16": "h100-bf16",
    "h100-fp16": "h100-fp16",
    "h100-fp16-fp16out": "h100-fp16-fp16out",
    "a100-tf32": "a100-tf32",
    "v100-fp16": "v100-fp16",
    "h100-e4m3": "h100-e4m3",
    "h100-e5m2": "h100-e5m2",
    "deepseek-fp8": "deepseek-fp8",
    "rne": {"base": "h100-e4m3", "name": "rne", "acc_rounding": "rne"},
    "floor-drop": {"base": "h100-e4m3", "name": "floor-drop", "drop": "floor"},
    "saturate": {"base": "h100-e4m3", "name": "saturate", "acc_overflow": "saturate"},
    "k16-F10": {"base": "h100-e4m3", "name": "k16-F10", "block_size": 16,
                "alignment_bits": 10, "block_result_bits": 11},
    "align-floor": {"base": "h100-e4m3", "name": "align-floor", "alignment_floor": -2},
    "promo64-rne": {"base": "h100-e4m3", "name": "promo64-rne", "promotion_interval": 64,
                    "acc_rounding": "rne"},
    # the other deterministic roundings of the block result (the rounding table in the kernel)
    "ru": {"base": "h100-e4m3", "name": "ru", "acc_rounding": "ru"},
    "rd": {"base": "h100-e4m3", "name": "rd", "acc_rounding": "rd"},
    "rna": {"base": "h100-e4m3", "name": "rna", "acc_rounding": "rna"},
    "rto": {"base": "h100-e4m3", "name": "rto", "acc_rounding": "rto"},
    "rto-promo": {"base": "deepseek-fp8", "name": "rto-promo", "acc_rounding": "rto"},
    # promotion with E5M2 inputs: the exponent-maximum matmul of each interval in float64
    "e5m2-promo": {"base": "h100-e5m2", "name": "e5m2-promo", "promotion_interval": 128},
}


def unit_of(name):
    spec = UNITS[name]
    return get_unit(spec) if isinstance(spec, str) else unit_from_dict(spec)


def operand(shape, fmt, gen, spread=3.0):
    """Values of ``fmt`` over a wide exponent range, with +-0, maxima and zero blocks."""
    x = torch.randn(shape, generator=gen) * torch.exp2(
        torch.randn(shape, generator=gen) * spread)
    x = quantize(x, fmt)
    flat = x.view(-1)
    n = flat.numel()
    idx = torch.randint(0, n, (max(1, n // 20),), generator=gen)
    flat[idx] = 0.0
    idx = torch.randint(0, n, (max(1, n // 40),), generator=gen)
    flat[idx] = -0.0
    idx = torch.randint(0, n, (max(1, n // 50),), generator=gen)
    flat[idx] = quantize(torch.tensor([1e9]), fmt) * torch.where(
        torch.rand(idx.shape, generator=gen) < 0.5, -1.0, 1.0)
    return x


def incoming(shape, gen):
    """An incoming accumulator with ordinary, tiny (fp32 subnormal), huge and -0 values."""
    c = torch.randn(shape, generator=gen) * 100
    flat = c.view(-1)
    n = flat.numel()
    for value, frac in ((-0.0, 10), (1e-40, 10), (-3.0e38, 15), (3.4e38, 15), (0.0, 10)):
        flat[torch.randint(0, n, (max(1, n // frac),), generator=gen)] = value
    return c


def same_bits(x, y):
    return torch.equal(x.view(torch.int32), y.view(torch.int32))


def both(fn):
    """fn() with the eager float chain and with the fused chain (compiled, then eager); fails
    unless the fused chain ran (and only there)."""
    old_backend, old_chunk = kernels.get_backend(), fc.chunk_fused
    calls = []

    def counted(*args, **kw):
        calls.append(1)
        return old_chunk(*args, **kw)

    fc.chunk_fused = counted
    try:
        with use_kernels("float-chain"):
            ref = fn()
        assert not calls
        out = []
        for backend in ("compile", "auto"):
            kernels.set_backend(backend)
            with use_kernels("fused-chain"):
                out.append(fn())
            assert calls, "the fused chain did not run"
            calls.clear()
        return ref, out
    finally:
        fc.chunk_fused = old_chunk
        kernels.set_backend(old_backend)


@pytest.mark.parametrize("name", list(UNITS))
@pytest.mark.parametrize("shape", [(1, 9, 100, 7), (2, 16, 256, 24)])
def test_fused_matches_float_chain(name, shape):
    unit = unit_of(name)
    B, M, K, N = shape
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000 + K)
    a = operand((B, M, K), unit.a_format, gen)
    b = operand((B, K, N), unit.b_format, gen)
    a[0, 1, :] = 0.0  # a row of zeros: every block sum is an exact zero
    b[0, :40, 2] = -0.0  # all-zero blocks of -0 products
    a[0, 2, :] = -a[0, 2, :].abs()
    b[0, :, 3] = b[0, :, 3].abs()  # one-signed products: truncation bias shows
    cf = unit.promotion_format if unit.promotion_interval else unit.acc_format
    for c in (None, quantize(incoming((B, M, N), gen), cf, "rne", "saturate")):
        ref, outs = both(lambda c=c: matmul(a, b, unit, c))
        for out in outs:
            assert same_bits(ref, out), (name, int((ref.view(torch.int32)
                                                    != out.view(torch.int32)).sum()))


def test_fused_int32_sums_near_their_limit():
    """H100 bf16 (k = 16, F = 25): sixteen products of significand ~4 at the block's exponent
    plus a c of the same sign give an integer block sum above 2^31; the kernel flags those
    outputs (its float32 sum of the scaled products) and they are summed again in int64."""
    unit = get_unit("h100-bf16")
    big = quantize(torch.tensor(1.99), "bf16").item()
    a = torch.full((1, 3, 64), big)
    b = torch.full((1, 64, 4), big)
    b[0, :, 1] = -big
    b[0, 8:, 2] = -big  # half and half: far from the limit
    c = torch.tensor([[[3.9, -3.9, 0.0, 1.0]]]).expand(1, 3, 4).contiguous() * 2.0 ** 6
    c = quantize(c, "fp32")
    ref, outs = both(lambda: matmul(a, b, unit, c))
    for out in outs:
        assert same_bits(ref, out)
    exact = matmul(a[:, :1], b, unit, c[:, :1], kernel="reference")
    assert same_bits(exact[0, 0], ref[0, 0])


def test_fused_int32_sums_between_2_29_and_2_30_stay_in_the_kernel(monkeypatch):
    """H100 bf16 (k = 16, F = 25): one-signed blocks of sixteen products in [1, 2) (block
    exponent 0) have integer sums in [2^29, 2^30): the compiled kernel sums them in int32 and
    flags none of them for the int64 recount (the flag threshold, :func:`sum_guard`, lies just
    below 2^30; it was 2^29), and the bits equal the float chain's and the exact reference's.
    Sums above the threshold are still recounted (test above)."""
    unit = get_unit("h100-bf16")
    gen = torch.Generator().manual_seed(5)
    a = quantize(1.0 + 0.4 * torch.rand(2, 24, 16, generator=gen), "bf16").clamp(max=1.3984375)
    b = quantize(1.0 + 0.4 * torch.rand(2, 16, 40, generator=gen), "bf16").clamp(max=1.3984375)
    b[:, :, 1::2] = -b[:, :, 1::2]  # negative sums too
    a[:, 23] = quantize(torch.randn(2, 16, generator=gen), "bf16")  # rows of mixed signs
    sums = (a[:, :23].double() @ b.double()).abs()
    assert float(sums.min()) >= 16 and float(sums.max()) < 32  # S = sum * 2^25
    recounts = []
    old = fc._exact_sums
    monkeypatch.setattr(fc, "_exact_sums", lambda *x: recounts.append(1) or old(*x))
    ref, outs = both(lambda: matmul(a, b, unit))
    assert not recounts
    for out in outs:
        assert same_bits(ref, out)
    exact = matmul(a[:, :3], b, unit, kernel="reference")
    assert same_bits(exact, ref[:, :3])
    assert fc.sum_guard(fc.sum_bound(unit), 5) == (1 << 30) - 8832  # 2^30 - margin


def test_fused_overflow_inside_blocks():
    """Block sums beyond fp32 (E5M2 maxima with a huge c) and sign of zero after cancellation."""
    unit = get_unit("h100-e5m2")
    a = torch.full((1, 4, 64), 57344.0)
    b = torch.full((1, 64, 3), 57344.0)
    b[0, :, 1] = -57344.0
    b[0, 32:, 2] = -57344.0  # the second block cancels the first exactly: +0
    c = torch.tensor([[3.0e38, -3.0e38, -0.0]]).expand(4, 3).reshape(1, 4, 3).clone()
    ref, outs = both(lambda: matmul(a, b, unit, c))
    for out in outs:
        assert same_bits(ref, out)


@pytest.mark.parametrize("fmt,unit", [("mxfp8", "h100-e4m3"), ("mxfp8_e5m2", "h100-e5m2")])
def test_fused_in_block_power_of_two_scales(fmt, unit):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 160, generator=gen) * torch.exp2(torch.randn(2, 12, 1, generator=gen)
                                                            * 8)
    w = torch.randn(20, 160, generator=gen) * torch.exp2(torch.randn(20, 1, generator=gen) * 8)
    x[0, 0, :32] = 0.0  # a zero scale block
    xa, wb = quantize_scaled(x, fmt, return_parts=True), quantize_scaled(w, fmt,
                                                                         return_parts=True)
    ref, outs = both(lambda: scaled_matmul(xa, wb, unit))
    for out in outs:
        assert same_bits(ref, out)


def test_fused_promotion_with_scales():
    """DeepSeek-V3 FP8: 1x128 activations, 128x128 weights, promotion every 128 products."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(40, 384, generator=gen) * torch.exp2(torch.randn(40, 384, generator=gen))
    w = torch.randn(136, 384, generator=gen) * 0.02
    xa = quantize_scaled(x, "fp8_1x128", return_parts=True)
    wb = quantize_scaled(w, "fp8_128x128", return_parts=True)
    ref, outs = both(lambda: scaled_matmul(xa, wb, "deepseek-fp8"))
    for out in outs:
        assert same_bits(ref, out)


_PINNED = """
import json, sys, torch
from precisim.emulation import get_unit, scaled_matmul, unit_from_dict, use_kernels
from precisim.emulation.matmul import fused as fc
from precisim.emulation.matmul import matmul
from precisim.formats import kernels, quantize
from precisim.formats.scaling import quantize_scaled
torch.set_num_threads(1)
calls = []
old_chunk = fc.chunk_fused
fc.chunk_fused = lambda *a, **k: calls.append(1) or old_chunk(*a, **k)
gen = torch.Generator().manual_seed(4)
# DeepSeek-V3 FP8 (the recipe's GEMM): four blocks of 32 per promotion, so the running sum
# the prepare kernel aligns is nonzero from the second block on
x = torch.randn(24, 256, generator=gen) * torch.exp2(torch.randn(24, 256, generator=gen))
w = torch.randn(72, 256, generator=gen) * 0.02
xa = quantize_scaled(x, "fp8_1x128", return_parts=True)
wb = quantize_scaled(w, "fp8_128x128", return_parts=True)
floor = unit_from_dict({"base": "h100-e4m3", "name": "floor-drop", "drop": "floor"})
a = quantize(torch.randn(1, 24, 160, generator=gen) * 4, "e4m3")
b = quantize(torch.randn(1, 160, 72, generator=gen), "e4m3")
cases = {"deepseek-fp8": lambda: scaled_matmul(xa, wb, "deepseek-fp8"),
         "floor-drop": lambda: matmul(a, b, floor),
         "h100-e4m3": lambda: matmul(a, b, get_unit("h100-e4m3"))}
differ = {}
for name, fn in cases.items():
    kernels.set_backend("eager")
    with use_kernels("float-chain"):
        ref = fn()
    kernels.set_backend("compile")
    with use_kernels("fused-chain"):
        out = fn()
    differ[name] = int((ref.view(torch.int32) != out.view(torch.int32)).sum())
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "fused": len(calls),
                  "differ": differ}))
"""


def test_fused_kernels_compiled_for_avx2():
    """The compiled kernels as reproducible mode builds them (ATen pinned to AVX2, so inductor
    emits AVX2 code; compiled with -march=native, on an AVX-512 CPU GCC 12 then inverted the
    select of ``where(sh >= 0, ...)`` in the prepare kernel: every aligned running sum was
    wrong, the main job's deepseek-fp8 logits came out all zero, perplexity 49152), against
    the eager chain bit for bit, in a fresh pinned process without the first-use self-check
    (which saw only the first block, whose running sum is 0). Skipped where reproducible mode
    is not available."""
    import os
    import subprocess
    import sys

    from precisim.eval.numerics import can_pin, pinned_env

    why = can_pin()
    if why is not None:
        pytest.skip(why)
    # reproducible mode's own compile cache: torch.compile in this process has set
    # TORCHINDUCTOR_CACHE_DIR to the native one, whose kernels a pinned process must not load
    env = pinned_env({k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"})
    env["PRECISIM_KERNEL_SELF_CHECK"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, "-c", _PINNED], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.splitlines()[-1])
    assert res["capability"] == "AVX2"
    assert res["fused"] == 3, res
    assert res["differ"] == {"deepseek-fp8": 0, "floor-drop": 0, "h100-e4m3": 0}, res


@pytest.mark.parametrize("k", [4, 7, 16, 32])
def test_block_max_exponent_is_the_maximum(k):
    """The block maxima from the matmul of offset powers equal the brute-force maxima, for
    exponent ranges of every width the plan accepts (float32 and float64 matmuls, ranges
    placed anywhere, of different widths for a and b)."""
    gen = torch.Generator().manual_seed(5 + k)
    rng = random.Random(k)
    c = k.bit_length()
    seen = set()
    for _ in range(60):
        top = 120 if rng.random() < 0.5 else 1800  # float32- or float64-sized ranges
        wa, wb = rng.randint(0, top // c), rng.randint(0, top // c)
        lo_a, lo_b = rng.randint(-600, 300), rng.randint(-600, 300)
        plan = fc._plan(lo_a, lo_a + wa, lo_b, lo_b + wb, k)
        if isinstance(plan, str):
            assert c * (wa + wb + 1) > 2045 - 2 * c  # refused only when it cannot fit
            continue
        dt, off_a, off_b = plan
        seen.add(dt)
        ea = torch.randint(lo_a, lo_a + wa + 1, (2, 9, k), generator=gen)
        eb = torch.randint(lo_b, lo_b + wb + 1, (2, k, 11), generator=gen)
        ea[..., 0], eb[:, 0] = lo_a, lo_b + wb  # the range ends are present
        ea[..., -1], eb[:, -1] = lo_a + wa, lo_b
        za = torch.rand(ea.shape, generator=gen) < 0.3
        zb = torch.rand(eb.shape, generator=gen) < 0.3
        za[0, 0] = True  # an all-zero row: no nonzero product
        pa = fc.exponent_powers(ea, za, k, dt, off_a)
        pb = fc.exponent_powers(eb, zb, k, dt, off_b)
        assert bool(((pa == 0) == za).all() and ((pb == 0) == zb).all())  # no underflow
        assert bool(torch.isfinite(pa).all() and torch.isfinite(pb).all())
        got = fc.block_max_exponent(pa, pb, k, off_a + off_b)
        s = ea[:, :, :, None] + eb[:, None, :, :]
        s = torch.where(za[:, :, :, None] | zb[:, None, :, :], -(1 << 30), s)
        want = s.amax(2)
        want = torch.where(want < -(1 << 29), fc.NEG_BIG_32, want)
        assert torch.equal(got, want.to(torch.int32)), (lo_a, wa, lo_b, wb, dt)
    assert seen == {torch.float32, torch.float64}


@pytest.mark.parametrize("name", ["a100-tf32", "h100-bf16", "v100-fp16-fp16out",
                                  "h100-e5m2", "k16-F10"])
def test_fused_equals_the_chain_on_many_operands(name):
    """The compiled chain's kernels (run eagerly on small tensors) against the eager chain on
    80 seeds of adversarial operands each (exponent ranges that end anywhere)."""
    unit = unit_of(name) if name in UNITS else get_unit(name)
    old = kernels.get_backend()
    kernels.set_backend("auto")
    try:
        for seed in range(80):
            gen = torch.Generator().manual_seed(seed)
            a = operand((1, 5, 70), unit.a_format, gen, spread=1.0 + seed % 7)
            b = operand((1, 70, 6), unit.b_format, gen, spread=1.0 + seed % 5)
            cf = unit.acc_format
            c = quantize(incoming((1, 5, 6), gen), cf, "rne", "saturate")
            for cc in (None, c):
                f = matmul(a, b, unit, cc, kernel="fused-chain")
                e = matmul(a, b, unit, cc, kernel="float-chain")
                assert same_bits(f, e), (name, seed)
    finally:
        kernels.set_backend(old)


def test_fused_not_used_where_it_does_not_apply():
    a = quantize(torch.randn(1, 4, 64), "fp16")
    b = quantize(torch.randn(64, 3), "fp16")
    a8, b8 = quantize(a, "e4m3"), quantize(b, "e4m3")
    ex = explain(a8, b8, "h100-e4m3")  # (the tests' default backend is eager)
    assert ex.kernel == "float-chain" and "compiled kernels are off" in ex.refused[0][1]
    old = kernels.get_backend()
    kernels.set_backend("auto")
    try:
        assert explain(a, b, "h100-fp16").kernel == "fused-chain"
        # bf16 operands whose exponents span most of bf16's range: their products leave
        # float32's range, so the float64 block kernel of the eager chain is needed
        wide = quantize(torch.randn(1, 4, 64) * 2.0 ** torch.randint(-100, 100, (1, 4, 64)),
                        "bf16")
        ex = explain(wide, quantize(b, "bf16"), "h100-bf16")
        assert ex.kernel == "float-chain"
        assert ex.refused[0][0] == "fused-chain" and "float64 block kernel" in ex.refused[0][1]
        sr = unit_from_dict({"base": "h100-e4m3", "acc_rounding": "sr", "acc_sr_bits": 8})
        ex = explain(a8, b8, sr)
        assert ex.kernel == "int-chain"
        assert dict(ex.refused)["fused-chain"] == "it does not model acc_sr_bits=8"
        # every deterministic rounding of the block result is in the compiled kernel (the
        # rounding table), e.g. round-down
        rd = unit_from_dict({"base": "h100-e4m3", "acc_rounding": "rd"})
        assert explain(a8, b8, rd).kernel == "fused-chain"
    finally:
        kernels.set_backend(old)


@pytest.mark.parametrize("name", ["h100-e4m3", "deepseek-fp8"])
def test_fused_signed_zeros(name):
    """IEEE zeros: -0 only where every product and the incoming c are -0 (then without
    promotion the result is -0; a promoting unit adds to a +0 register: +0)."""
    unit = get_unit(name)
    a = torch.zeros(1, 3, 96)
    a[0, 0] = -0.0
    a[0, 2] = quantize(torch.linspace(-2, 2, 96), "e4m3")
    b = torch.zeros(1, 96, 2)
    b[0, :, 1] = -0.0
    c = torch.tensor([[[-0.0, -0.0], [-0.0, 0.0], [-0.0, -0.0]]])
    ref, outs = both(lambda: matmul(a, b, unit, c))
    for out in outs:
        assert same_bits(ref, out)
    neg = torch.signbit(ref[0])
    assert (ref == 0).all()
    if unit.promotion_interval:
        assert not neg.any()
    else:
        # row 0: (-0)(+0) = -0 products, with -0 c: -0; (-0)(-0) = +0 products: +0.
        # row 1: (+0)(+0) = +0: +0; (+0)(-0) = -0 with +0 c: +0. row 2: nonzero*0 mixed signs
        assert neg.tolist() == [[True, False], [False, False], [False, False]]


@pytest.mark.parametrize("case", RECORDED_CASES, ids=[c.preset for c in RECORDED_CASES])
def test_fused_compiled_reproduces_the_recordings(case):
    """The compiled kernels against the real tensor cores: for every recorded unit (V100,
    A100, H100; fp16, bf16, tf32, E4M3, E5M2; fp32 and fp16 outputs) all 5000 recorded dot
    products (with their incoming c), bit for bit."""
    try:
        rec = load_recording(case.gpu, case.fmt, case.out)
    except RecordingError as exc:
        pytest.skip(str(exc))
    A, B, C = rec.a.unsqueeze(1), rec.b.unsqueeze(2), rec.c.reshape(-1, 1, 1)
    ref, outs = both(lambda: matmul(A, B, case.preset, C))
    want = rec.d_bits.to(torch.int64)
    want = torch.where(want >= 1 << 31, want - (1 << 32), want).to(torch.int32)
    d = want
    for out in [ref, *outs]:
        got = out.reshape(-1).view(torch.int32)
        assert torch.equal(got, want), f"{int((got != want).sum())} of {len(d)} differ"


def test_promotion_register_that_overflowed_stays_infinite():
    """DeepSeek 1x128 / 128x128 with huge activations: the fp32 promotion register overflows
    in some outputs, and an infinite register stays infinite when a later partial sum would
    overflow the other way (docs/arithmetic.md section 4.10; the float chains gave NaN there).
    The compiled chain, the eager float chain and the exact reference agree bit for bit
    (+inf, -inf and NaN outputs included)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 300, generator=gen) * torch.exp2(torch.randn(6, 300, generator=gen))
    x[:3] *= 3e37  # rows whose dot products overflow fp32 (+inf, -inf and, mixed, NaN)
    w = torch.randn(5, 300, generator=gen)
    w[0] = w[0].abs() + 1
    xa = quantize_scaled(x, "fp8_1x128", return_parts=True)
    wb = quantize_scaled(w, "fp8_128x128", return_parts=True)
    old = kernels.get_backend()
    try:
        kernels.set_backend("compile")
        with use_kernels("fused-chain"):
            got = scaled_matmul(xa, wb, "deepseek-fp8")
    finally:
        kernels.set_backend(old)
    assert not bool(torch.isfinite(got[:3]).all())  # the overflow happened
    with use_kernels("float-chain"):
        chain = scaled_matmul(xa, wb, "deepseek-fp8")
    with use_kernels("reference"):
        ref = scaled_matmul(xa, wb, "deepseek-fp8")
    for other in (chain, ref):
        assert same_bits(got, other)


def _paths(monkeypatch):
    """Count the interval kernels built and the intervals computed block by block (their
    (first, end) block numbers) by :func:`fused.chunk_fused`."""
    seen = {"interval": 0, "blocks": []}
    make, blocks = fc.interval_kernel, fc._blocks

    def counted_make(*args):
        seen["interval"] += 1
        return make(*args)

    def counted_blocks(ctx, j0, j1, *rest):
        seen["blocks"].append((j0, j1))
        return blocks(ctx, j0, j1, *rest)

    monkeypatch.setattr(fc, "interval_kernel", counted_make)
    monkeypatch.setattr(fc, "_blocks", counted_blocks)
    return seen


def _three(fn):
    """fn() with the fused chain (compiled), the eager float chain and the exact reference."""
    old = kernels.get_backend()
    try:
        kernels.set_backend("compile")
        with use_kernels("fused-chain"):
            got = fn()
    finally:
        kernels.set_backend(old)
    with use_kernels("float-chain"):
        chain = fn()
    with use_kernels("reference"):
        ref = fn()
    return got, chain, ref


@pytest.mark.parametrize("K", [448, 456])
def test_fused_promotion_intervals_in_one_call(K, monkeypatch):
    """DeepSeek FP8 (k = 32, promotion every 4 blocks): the blocks of each promotion interval
    of full blocks are one compiled call (K = 448: three intervals of 4 blocks and one of 2);
    an interval with a partial block (K = 456: blocks 12-14) runs block by block. Same bits as
    the float chain and the exact reference, with -0 operands, zero rows and -0 in c."""
    unit = get_unit("deepseek-fp8")
    gen = torch.Generator().manual_seed(K)
    a = operand((2, 12, K), unit.a_format, gen)
    b = operand((2, K, 10), unit.b_format, gen)
    a[0, 1] = 0.0
    b[1, :, 2] = -0.0
    c = quantize(torch.randn(2, 12, 10, generator=gen) * 50, "fp32")
    c[0, 0] = -0.0
    seen = _paths(monkeypatch)
    got, chain, ref = _three(lambda: matmul(a, b, unit, c))
    assert seen["interval"] == (4 if K == 448 else 3)
    assert seen["blocks"] == ([] if K == 448 else [(12, 15)])
    assert same_bits(got, chain) and same_bits(got, ref)


def test_fused_promotion_interval_falls_back_on_a_non_finite_register(monkeypatch):
    """An interval whose register overflows (1x128 / 128x128 scales that overflow fp32 in some
    rows from the third interval on) is computed again block by block from the register
    before it, with the special values of docs/arithmetic.md section 4.10; the others stay
    in the interval kernel. Without the fallback an infinite register would make a later
    register NaN where the model keeps it infinite."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 512, generator=gen) * torch.exp2(torch.randn(6, 512, generator=gen))
    x[:2, 256:] *= 3e37  # overflows in the third and fourth interval only
    w = torch.randn(5, 512, generator=gen)
    w[0] = w[0].abs() + 1
    xa = quantize_scaled(x, "fp8_1x128", return_parts=True)
    wb = quantize_scaled(w, "fp8_128x128", return_parts=True)
    seen = _paths(monkeypatch)
    got, chain, ref = _three(lambda: scaled_matmul(xa, wb, "deepseek-fp8"))
    assert not bool(torch.isfinite(got[:2]).all()) and bool(torch.isfinite(got[2:]).all())
    assert seen["interval"] == 4
    assert seen["blocks"] == [(8, 12), (12, 16)]
    assert same_bits(got, chain) and same_bits(got, ref)


def test_fused_promotion_interval_falls_back_on_flagged_blocks(monkeypatch):
    """A promoting unit with bf16 inputs (k = 16, F = 25, promotion every 2 blocks): an
    interval whose int32 block sum overflows (a block of sixteen products of significand ~4
    at the exponent of the running sum before it: flag bit 2, summed again in int64) and
    one with an overflowed block (+-inf held through the next block, which cancels it) are
    computed again block by block; an ordinary interval stays in the interval kernel. Same
    bits as the eager float chain and the exact reference; without the fallback the wrapped
    int32 sums and the overflowed running sums give other bits (checked when this test was
    written)."""
    unit = unit_from_dict({"base": "h100-bf16", "name": "bf16-promo", "promotion_interval": 32})
    big = quantize(torch.tensor(1.99), "bf16").item()
    gen = torch.Generator().manual_seed(12)
    a = quantize(torch.randn(1, 4, 96, generator=gen), "bf16")
    b = quantize(torch.randn(1, 96, 3, generator=gen), "bf16")
    # interval 1 (products 32-63), rows 0-1: a running sum of 1.99, then sixteen products
    # 1.99^2 at its exponent: |S| ~ 2^31 + 2^26 in column 0 (column 1: they cancel)
    a[0, :2, 32:48] = 0.0
    a[0, :2, 32] = big
    b[0, 32] = 1.0
    a[0, :2, 48:64] = big
    b[0, 48:64, 0] = big
    b[0, 48:64, 1] = -big
    # interval 2 (products 64-95), row 3: sixteen products ~2^126 overflow (columns 0 and 2,
    # opposite signs), sixteen more of the other sign follow in the same interval
    huge = big * 2.0 ** 62
    a[0, :3, 64:96] = 0.0  # (rows 0-2: the last interval adds 0)
    a[0, 3, 64:96] = huge
    b[0, 64:80, 0] = huge
    b[0, 80:96, 0] = -huge
    b[0, 64:80, 2] = -huge
    b[0, 80:96, 2] = huge
    seen = _paths(monkeypatch)
    got, chain, ref = _three(lambda: matmul(a, b, unit))
    assert seen["interval"] == 3
    assert seen["blocks"] == [(2, 4), (4, 6)]
    assert got[0, 3, 0] == math.inf and got[0, 3, 2] == -math.inf
    assert same_bits(got, chain) and same_bits(got, ref)
