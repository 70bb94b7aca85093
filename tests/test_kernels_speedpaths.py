"""The fast kernel paths against the general kernels they stand in for, bit for bit.

* ``round_bits_nearest`` (round to nearest even by add-and-mask on the float32 bits) against
  ``round_bits_generic``, without and with a block scale 2^k, on every tie position of every
  float32 exponent, random bit patterns and specials, for every eligible catalog format and
  every overflow policy;
* the fused one-pass MX kernel against the two-pass one (scales, then elements);
* the float block amax against the integer one;
* compiled == eager for the flattened / fused kernels on several shapes, and one compiled graph
  for every shape of an element-wise quantization.

The exact reference checks of these paths are in test_formats_exhaustive.py, test_scaling.py
and test_formats_oracles.py (they run through the fast paths wherever those apply).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _format_cases import assert_same_bits
from precisim.formats import catalog, get_format, p3109_family, quantize, set_backend
from precisim.formats import kernels as K
from precisim.formats.rounding import Overflow, Rounding
from precisim.formats.scaling import (
    ScaleRule,
    _block_amax_bits,
    _elem_emax_and_mant,
    _pow2_two_pass,
    get_scaled_format,
    pow2_scale_exponent,
    quantize_scaled,
)

RNE = Rounding.NEAREST_EVEN
MX = ["mxfp8", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4"]
RULES = ["floor", "ceil", "rceil", "even"]


def _float_formats():
    fmts = [f for f in catalog() if hasattr(f, "man_bits")] + p3109_family(8)
    fmts += [get_format(n) for n in ("e5m7", "e3m4", "e6m9", "e4m10")]
    return list({f.name: f for f in fmts}.values())


FAST = [f for f in _float_formats() if K.KernelParams.of(f).nearest is not None]
FAST_SCALED = [f for f in _float_formats() if K.KernelParams.of(f).nearest_scaled is not None]


def probe_bits(seed: int = 0, n_random: int = 1 << 16) -> torch.Tensor:
    """int32 bit patterns: for every exponent field and every shift s in 1..23, the fraction
    patterns around a tie at bit s (tie, tie +-1, with the kept bit odd and even, all-ones,
    zero), both signs; float32 specials; random patterns."""
    E = torch.arange(256, dtype=torch.int64).view(-1, 1)
    fr = []
    for s in range(1, 24):
        half = 1 << (s - 1)
        for base in (0, 1 << s, 3 << s, (0x7FFFFF >> s) << s):
            fr += [base | half, base | (half - 1), base | (half + 1) if s > 1 else base | half,
                   base, base | ((1 << s) - 1)]
    F = torch.tensor(sorted(set(f & 0x7FFFFF for f in fr)), dtype=torch.int64).view(1, -1)
    grid = ((E << 23) | F).reshape(-1)
    gen = torch.Generator().manual_seed(seed)
    rnd = torch.randint(0, 1 << 31, (n_random,), generator=gen, dtype=torch.int64)
    mags = torch.cat([grid, rnd, torch.tensor([0, 1, 0x7FFFFF, 0x800000, 0x7F7FFFFF,
                                               0x7F800000, 0x7F800001, 0x7FC00000,
                                               0x7FFFFFFF])])
    allb = torch.cat([mags, mags - (1 << 31)])  # both signs: the int32 value of bits | 2^31
    return allb.to(torch.int32)


BITS = probe_bits()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32)


def _policies(fmt) -> list[Overflow]:
    return ([Overflow.SATURATE] + ([Overflow.INF] if fmt.has_inf else [])
            + ([Overflow.NAN] if fmt.has_nan else []))


pytestmark = pytest.mark.usefixtures("eager_single_thread")


def test_fast_path_covers_the_benchmark_formats():
    for name in ("e4m3", "e5m2", "e3m2", "e2m1", "e5m7", "bf16", "fp16", "tf32",
                 "float8_e4m3fnuz", "float8_e5m2fnuz"):
        assert K.KernelParams.of(get_format(name)).nearest is not None, name
    for name in ("e4m3", "e5m2", "e3m2", "e2m3", "e2m1"):
        assert K.KernelParams.of(get_format(name)).nearest_scaled is not None, name
    # integer grids, unsigned formats, formats without zero take the general kernel
    for name in ("int8", "e8m0"):
        assert K.KernelParams.of(get_format(name)).nearest is None, name
    assert get_format("bf16") in FAST and K.KernelParams.of(get_format("bf16")).nearest.wide


@pytest.mark.parametrize("fmt", FAST, ids=str)
def test_nearest_equals_generic(fmt):
    p = K.KernelParams.of(fmt)
    for overflow in _policies(fmt):
        got = K.round_bits_nearest(BITS, None, p.nearest, overflow)
        want = K.round_bits_generic(BITS, None, p, RNE, overflow, 0, False, None, 30)
        assert_same_bits(_np(got), _np(want), _np(BITS), f"{fmt.name} {overflow.value}")
        # the dispatcher takes the fast path
        via = K.round_bits(BITS, None, p, RNE, overflow, 0, False, None, 30)
        assert torch.equal(via, got)


@pytest.mark.parametrize("fmt", FAST_SCALED, ids=str)
def test_nearest_scaled_equals_generic(fmt):
    """With a block scale 2^k for every k a scale rule can give (-127 .. 128 - emax), per
    element, including the blocks whose normal range starts below 2^-126."""
    p = K.KernelParams.of(fmt)
    emax = fmt.emax
    edge = [-127, -126, -125, -126 - fmt.emin, -125 - fmt.emin, -127 - fmt.emin,
            -126 - (fmt.emin - fmt.man_bits), 0, 1, 127 - emax, 128 - emax]
    gen = torch.Generator().manual_seed(fmt.bits)
    for kv in edge + [None]:
        if kv is None:
            k = torch.randint(-127, 129 - emax, BITS.shape, generator=gen, dtype=torch.int32)
        else:
            k = torch.full(BITS.shape, kv, dtype=torch.int32)
        got = K.round_bits_nearest(BITS, k, p.nearest_scaled, Overflow.SATURATE)
        want = K.round_bits_generic(BITS, k, p, RNE, Overflow.SATURATE, 0, False, None, 30)
        assert_same_bits(_np(got), _np(want), _np(BITS), f"{fmt.name} k={kv}")


@pytest.mark.parametrize("fmt", FAST_SCALED, ids=str)
def test_nearest_scaled_without_subnormal_lead_equals_generic(fmt):
    """``subnormal_lead=False`` (the step without a subnormal input's leading-bit bound) for
    every k from ``k_no_lead`` (-126 - emin) to 128 - emax, on every probe pattern (float32
    subnormals included); and one k lower, where that bound is needed, it differs."""
    p = K.KernelParams.of(fmt)
    c = p.nearest_scaled
    assert c.k_no_lead == -126 - fmt.emin
    for kv in range(c.k_no_lead, 129 - fmt.emax):
        k = torch.full(BITS.shape, kv, dtype=torch.int32)
        got = K.round_bits_nearest(BITS, k, c, Overflow.SATURATE, subnormal_lead=False)
        want = K.round_bits_generic(BITS, k, p, RNE, Overflow.SATURATE, 0, False, None, 30)
        assert_same_bits(_np(got), _np(want), _np(BITS), f"{fmt.name} k={kv}")
    k = torch.full(BITS.shape, c.k_no_lead - 1, dtype=torch.int32)
    got = K.round_bits_nearest(BITS, k, c, Overflow.SATURATE, subnormal_lead=False)
    want = K.round_bits_generic(BITS, k, p, RNE, Overflow.SATURATE, 0, False, None, 30)
    assert not torch.equal(got, want)


def _adversarial(rows: int = 64, cols: int = 96, seed: int = 0) -> torch.Tensor:
    """Blocks of 32 spanning the float32 range: tiny (subnormal) blocks, blocks mixing normals
    and subnormals, zero blocks, NaN / inf blocks, ties of every element format."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen)
    x = x * torch.exp2(torch.randint(-160, 120, (rows, cols // 32), generator=gen)
                       .float()).repeat_interleave(32, dim=1)
    x[0, :32] = 0.0
    x[1, :32] = torch.tensor(2.0**-149) * torch.arange(32)
    x[2, :32] = torch.tensor(2.0**-130) * torch.randn(32, generator=gen)
    x[3, 5] = float("nan")
    x[4, 40] = float("inf")
    x[5, 70] = -float("inf")
    x[6, :32] = torch.tensor([1.0625, 1.1875, 3.5, 5.0, -2.5, 0.75, 0.25, 1e-40] * 4)
    x[7, 32:64] = -0.0
    x[8, :] = torch.tensor(2.0**-126) * (1 + torch.arange(cols) / 64)
    x[9, :32] = 3e38
    return x


@pytest.mark.parametrize("name", MX)
@pytest.mark.parametrize("rule", RULES)
def test_fused_mx_equals_two_pass(name, rule):
    f = get_scaled_format(name, rule)
    p = K.KernelParams.of(f.element)
    assert p.nearest_scaled is not None
    x = _adversarial()
    st = quantize_scaled(x, f, return_parts=True)
    xb = x.reshape(-1, 32)
    out, k = _pow2_two_pass(xb, (1,), _elem_emax_and_mant(f.element), f.rule, p, RNE, 0, 30,
                            None)
    assert torch.equal(st.dequantized.view(torch.int32), out.reshape(x.shape))
    kq = torch.where(k == 255, 255, k + 127).to(torch.uint8).reshape(st.scales.shape)
    assert torch.equal(st.scales, kq)


@pytest.mark.parametrize("name", MX)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_fused_mx_without_tiny_blocks_equals_two_pass(name, rule, backend):
    """The fused kernel's first run, without the subnormal-lead term, on blocks that mix
    normals with float32 subnormals down to 2^-149 but whose scale is at least 2^(-126 - emin)
    (so it is not run again with the term): the same bits as the two-pass kernel."""
    f = get_scaled_format(name, rule)
    p = K.KernelParams.of(f.element)
    x = _adversarial(seed=1)
    x = x[~(x.isnan() | x.isinf()).any(dim=1)]
    lowest = 2.0 ** (f.element.emax - f.element.emin - 126 + 1)
    x = x.reshape(-1, 32)
    x[:, 0] = torch.maximum(x.abs().amax(dim=1), torch.tensor(lowest))
    x[::2, 1:9] = torch.tensor(2.0 ** -149) * torch.arange(1, 9)
    x = x.repeat(64, 1)  # past the compile threshold
    set_backend(backend)
    try:
        st = quantize_scaled(x, f, return_parts=True)
    finally:
        set_backend("eager")
    k = st.scales.to(torch.int32).reshape(-1) - 127
    assert bool((k >= p.nearest_scaled.k_no_lead).all()), "a block would take the lead term"
    out, _ = _pow2_two_pass(x, (1,), _elem_emax_and_mant(f.element), f.rule, p, RNE, 0, 30,
                            None)
    assert torch.equal(st.dequantized.view(torch.int32), out)


def test_float_block_amax_equals_int_amax():
    x = _adversarial().reshape(-1, 32)
    got = _block_amax_bits(x, (1,))
    want = (x.view(torch.int32) & 0x7FFFFFFF).amax(dim=1, keepdim=True)
    nan = (got > 0x7F800000) & (want > 0x7F800000)
    assert torch.equal(got[~nan], want[~nan]) and nan.any()
    for rule in ScaleRule:
        if rule.power_of_two:
            consts = _elem_emax_and_mant(get_format("e2m1"))
            assert torch.equal(pow2_scale_exponent(got, consts, rule),
                               pow2_scale_exponent(want, consts, rule))


SHAPES = [(4099,), (37, 96), (3, 70), (2, 5, 64)]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    nan = ((a & 0x7FFFFFFF) > 0x7F800000) & ((b & 0x7FFFFFFF) > 0x7F800000)
    return a.shape == b.shape and torch.equal(a[~nan], b[~nan])


def _backend_pair(fn):
    set_backend("eager")
    a = fn()
    set_backend("compile")
    try:
        b = fn()
    finally:
        set_backend("eager")
    return a, b


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_compiled_equals_eager_elementwise(shape):
    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=gen) * torch.exp2(
        torch.randint(-140, 120, shape, generator=gen).float())
    flat = x.view(-1)
    flat[:8] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45,
                             -3e38, 2.0**-126])
    for name, overflow in [("e4m3", "saturate"), ("e5m2", "inf"), ("e5m2", "nan"),
                           ("bf16", "saturate"), ("e2m1", "saturate"),
                           ("float8_e4m3fnuz", "nan"), ("e5m7", "saturate")]:
        a, b = _backend_pair(lambda name=name, overflow=overflow: quantize(x, name,
                                                                           overflow=overflow))
        assert _same(a, b), (name, overflow, shape)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_compiled_equals_eager_scaled(shape):
    gen = torch.Generator().manual_seed(len(shape) + 7)
    x = torch.randn(shape, generator=gen) * torch.exp2(
        torch.randint(-140, 100, shape[:-1] + (1,), generator=gen).float())
    x.view(-1)[:3] = torch.tensor([float("nan"), 1e-42, -0.0])
    for name in ("mxfp8", "mxfp4", "mxfp6_e2m3", "nvfp4", "fp8_1x128", "int8_token",
                 "mxint8"):
        a, b = _backend_pair(lambda name=name: quantize_scaled(x, name, return_parts=True))
        assert _same(a.dequantized, b.dequantized), (name, shape)
        assert torch.equal(a.codes, b.codes), (name, shape)
        sa, sb = a.scales, b.scales
        assert _same(sa, sb) if sa.is_floating_point() else torch.equal(sa, sb), (name, shape)


def test_one_graph_for_every_shape():
    """The element-wise kernels run on a flattened view: new shapes reuse the compiled graph."""
    from torch._dynamo.utils import counters

    set_backend("compile")
    try:
        quantize(torch.randn(300), "e3m2")
        quantize(torch.randn(17, 23), "e3m2")
        before = counters["stats"]["unique_graphs"]
        for shape in [(5, 7, 11), (1000,), (64, 64)]:
            quantize(torch.randn(shape), "e3m2")
        assert counters["stats"]["unique_graphs"] == before
    finally:
        set_backend("eager")


def test_more_kernel_variants_than_dynamo_default_limit():
    """Every element kernel shares one code object; more than torch's default of 8 compiled
    variants of it (formats, roundings, overflow modes) still compile (kernels.RECOMPILE_LIMIT)
    and give the eager bits."""
    x = torch.randn(257) * 100
    x[:3] = torch.tensor([float("nan"), float("inf"), 1e-42])
    variants = [("e4m3", r, "saturate") for r in ("rne", "rtz", "ru", "rd", "rna", "rto")]
    variants += [("e5m2", "rne", "inf"), ("e5m2", "rtz", "nan"), ("bf16", "rne", "saturate")]
    for name, rounding, overflow in variants:
        a, b = _backend_pair(lambda name=name, r=rounding, o=overflow: quantize(x, name, r, o))
        assert _same(a, b), (name, rounding, overflow)


def test_auto_backend_reuses_a_compiled_kernel_for_smaller_tensors(monkeypatch) -> None:
    """Under "auto" a kernel is compiled for a tensor of COMPILE_MIN_NUMEL elements or more;
    once compiled it also serves tensors down to REUSE_MIN_NUMEL (no new compilation: the
    one-off cost is paid), and smaller ones and never-compiled kernels run eagerly."""
    from precisim.formats import kernels

    calls: list[str] = []

    def fake_compile(fn):
        calls.append("compile")

        def compiled(*args):
            calls.append("compiled")
            return fn(*args)
        return compiled

    monkeypatch.setattr(kernels, "_compile", fake_compile)
    monkeypatch.setattr(kernels, "_call_compiled", lambda c, args: c(*args))
    monkeypatch.setattr(kernels, "SELF_CHECK", False)
    monkeypatch.setattr(kernels, "_COMPILED", {})
    old = kernels.get_backend()
    kernels.set_backend("auto")
    try:
        key = ("test-reuse",)
        fn = lambda x: x + 1  # noqa: E731
        small = torch.zeros(kernels.REUSE_MIN_NUMEL)
        kernels.run(fn, key, small.numel(), small)
        assert calls == []  # not compiled yet: eager
        big = torch.zeros(kernels.COMPILE_MIN_NUMEL)
        kernels.run(fn, key, big.numel(), big)
        assert calls == ["compile", "compiled"]
        kernels.run(fn, key, small.numel(), small)
        assert calls == ["compile", "compiled", "compiled"]  # reused, not recompiled
        tiny = torch.zeros(kernels.REUSE_MIN_NUMEL - 1)
        kernels.run(fn, key, tiny.numel(), tiny)
        kernels.run(fn, ("other",), small.numel(), small)
        assert calls == ["compile", "compiled", "compiled"]
    finally:
        kernels.set_backend(old)


def test_compile_from_lowers_the_threshold_in_its_block_only(monkeypatch) -> None:
    """``kernels.compile_from(n)`` compiles from min(threshold, n) elements inside the block,
    never raises the threshold, and restores it on exit, an exception included."""
    monkeypatch.setattr(K, "COMPILE_MIN_NUMEL", 1 << 18)
    with K.compile_from(1 << 12):
        assert K.COMPILE_MIN_NUMEL == 1 << 12
        with K.compile_from(1 << 20):
            assert K.COMPILE_MIN_NUMEL == 1 << 12
        assert K.COMPILE_MIN_NUMEL == 1 << 12
    assert K.COMPILE_MIN_NUMEL == 1 << 18
    with pytest.raises(RuntimeError), K.compile_from(16):
        raise RuntimeError
    assert K.COMPILE_MIN_NUMEL == 1 << 18
