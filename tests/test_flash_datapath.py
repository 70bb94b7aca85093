"""The attention datapath (precisim.emulation.flash, docs/attention-datapath.md): fast path vs
the step-by-step exact reference bit for bit, agreement with standard attention at full
precision, the saturation preset and its fix, telemetry counts and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from precisim.emulation.flash import (
    AttentionDatapath,
    FlashStats,
    UnknownDatapathError,
    available_datapaths,
    flash_attention,
    flash_attention_reference,
    get_datapath,
)
from precisim.emulation.functions import FunctionUnit


def _inputs(seed: int, b: int = 1, h: int = 2, n_q: int = 4, n_k: int = 37, d: int = 8,
            spread: float = 3.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g)
    k = torch.randn(b, h, n_k, d, generator=g) * spread
    v = torch.randn(b, h, n_k, d, generator=g)
    return q, k, v


def _causal(n_q: int, n_k: int) -> torch.Tensor:
    pos = torch.arange(n_k - n_q, n_k)[:, None]
    keys = torch.arange(n_k)[None, :]
    return torch.where(keys <= pos, 0.0, -math.inf)[None, None]


def _same(q, k, v, mask, dp, scaling=0.35):  # noqa: ANN001, ANN202
    s1, s2 = FlashStats(), FlashStats()
    a = flash_attention(q, k, v, mask, scaling, dp, s1)
    r = flash_attention_reference(q, k, v, mask, scaling, dp, s2)
    assert torch.equal(a.view(torch.int32), r.view(torch.int32)), dp.describe()
    assert s1 == s2, (s1, s2)
    return a, s1


KNOBS = [
    {},
    {"order": "reverse"},
    {"tile": 5},
    {"max_format": "bf16", "alpha_format": "bf16"},
    {"sum_format": "fp16"},
    {"sum_format": "bf16", "row_sum": "quantized", "p_format": "e5m2"},
    {"acc_format": "fp16"},
    {"rescale_threshold": 8.0},
    {"max_offset": 8, "p_format": "e4m3"},
    {"max_offset": 8, "rescale_threshold": 4.0, "p_format": "e4m3"},
    {"max_offset": 2, "p_format": "nvfp4"},
    {"max_offset": 7, "p_format": "int8"},
    {"normalize": "reciprocal"},
    {"exp2": FunctionUnit("exp2-poly3", "exp2", method="polynomial", degree=3,
                          flush_output=True)},
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda d: ",".join(f"{k}={v}" for k, v in
                                                               d.items()) or "fp32")
def test_each_knob_fast_equals_reference(knobs: dict) -> None:
    dp = AttentionDatapath("t", **{"tile": 16, **knobs})
    q, k, v = _inputs(1)
    _same(q, k, v, None, dp)
    _same(q, k, v, _causal(4, 37), dp)


@pytest.mark.parametrize("name", available_datapaths())
def test_presets_fast_equal_reference(name: str) -> None:
    dp = get_datapath(name).with_(tile=16)
    q, k, v = _inputs(2, n_k=48)
    _same(q, k, v, _causal(4, 48), dp)


def _sink_inputs() -> tuple[torch.Tensor, ...]:
    """Key 0 is an attention sink: its score exceeds every other key's by ~20 (log2 units)."""
    q, k, v = _inputs(3, n_k=64, spread=0.5)
    k[:, :, 0] = q[:, :, 0].mean(0, keepdim=True) * 40 / q[:, :, 0].norm(dim=-1).mean()
    return q, k, v


ADVERSARIAL = {
    "sink": _sink_inputs,
    "all-equal": lambda: (torch.ones(1, 1, 3, 4), torch.ones(1, 1, 50, 4),
                          torch.randn(1, 1, 50, 4, generator=torch.Generator().manual_seed(4))),
    "long-row": lambda: _inputs(5, h=1, n_q=2, n_k=700, spread=2.0),
    "huge-scores": lambda: _inputs(6, n_k=40, spread=60.0),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("name", ["fa4-fp8-saturating", "fa3-fp8", "sage2-fp16-acc",
                                  "fa2-bf16"])
def test_adversarial_fast_equals_reference(case: str, name: str) -> None:
    q, k, v = ADVERSARIAL[case]()
    dp = get_datapath(name).with_(tile=16)
    _same(q, k, v, None, dp)
    _same(q, k, v.flip(-2), None, dp.with_(order="reverse"))


def test_masks_with_fully_masked_rows_and_tiles() -> None:
    q, k, v = _inputs(7, n_q=4, n_k=40)
    mask = _causal(4, 40).clone()
    mask[..., 0, :] = -math.inf  # a fully masked row gives 0
    mask[..., 1, :20] = torch.finfo(torch.float32).min  # whole tiles masked (dtype minimum)
    for name in ("fa3-fp8", "exact-online"):
        out, st = _same(q, k, v, mask, get_datapath(name).with_(tile=8))
        assert torch.equal(out[..., 0, :], torch.zeros_like(out[..., 0, :]))
        assert st.p_numel == int((mask.expand(1, 2, 4, 40) == 0).sum())


@pytest.mark.parametrize("tile", [1, 7, 128])
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_full_precision_agrees_with_standard_attention(tile: int, order: str) -> None:
    """Every knob at full precision: within 1e-5 of softmax(QK^T * scale) V in float64
    (|V| < 5, up to 300 keys: the fp32 roundings of scores, exp2, row sums and up to 300
    accumulator updates with tile 1; measured at most 2.7e-6)."""
    q, k, v = _inputs(8, b=2, h=3, n_q=9, n_k=300, d=16)
    mask = _causal(9, 300)
    dp = get_datapath("exact-online").with_(tile=tile, order=order)
    out = flash_attention(q, k, v, mask, 0.25, dp).double()
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25 + mask.double()
    ref = torch.softmax(s, -1) @ v.double()
    assert v.abs().max() < 5
    assert (out - ref).abs().max().item() < 1e-5


def test_saturation_preset_clips_and_fix_does_not() -> None:
    """Scores rising along the keys keep the stale max (threshold 4): P reaches ~2^12 and E4M3
    clips it at 448 while the row sum adds the unclipped P; the fix never saturates."""
    n_k = 64
    q = torch.ones(1, 1, 1, 1)
    k = torch.linspace(0, 3.9, n_k).reshape(1, 1, n_k, 1)  # log2 units with scale 1/log2e
    k[..., 32:, :] = 3.9
    v = torch.ones(1, 1, n_k, 1)
    sc = 1 / math.log2(math.e)
    bad, sb = _same(q, k, v, None, get_datapath("fa4-fp8-saturating").with_(tile=16), sc)
    good, sg = _same(q, k, v, None, get_datapath("fa4-fp8-fixed").with_(tile=16), sc)
    assert sb.p_saturated > 0 and sg.p_saturated == 0
    # V = 1: exact attention is 1; the clipped P with the unclipped row sum is below it
    assert bad.item() < 0.9 and abs(good.item() - 1) < 0.07
    assert get_datapath("fa4-fp8-saturating").p_max == 4096
    assert get_datapath("fa4-fp8-fixed").p_max <= 448


def test_reverse_iteration_keeps_the_sink_from_flushing_p() -> None:
    """A sink at key 0 under forward iteration is seen first: the max is the sink's and the
    other P values underflow E4M3 (flushed); in reverse order fewer are flushed (the
    rescale multiplies an already accumulated, unflushed sum)."""
    q, k, v = _sink_inputs()
    dp = get_datapath("fa3-fp8").with_(tile=16, max_offset=0)
    _, fwd = _same(q, k, v, None, dp)
    _, rev = _same(q, k, v, None, dp.with_(order="reverse"))
    assert fwd.p_flushed > rev.p_flushed


def test_row_sum_and_accumulator_overflow_counted() -> None:
    q, k, v = _inputs(9, h=1, n_q=2, n_k=600, spread=0.0)
    _, st = _same(q, k, v * 400, None,
                  AttentionDatapath("o", tile=64, max_offset=14, sum_format="fp16",
                                    acc_format="fp16"))
    assert st.row_sum_overflow == 2 and st.acc_overflow > 0


@pytest.mark.parametrize("field,value,needle", [
    ("tile", 0, "tile=0"),
    ("tile", -3, "tile=-3"),
    ("max_offset", 0.5, "max_offset=0.5"),
    ("max_offset", 200, "max_offset=200"),
    ("rescale_threshold", 0.1, "rescale_threshold=0.1"),
    ("rescale_threshold", math.inf, "rescale_threshold=inf"),
    ("rescale_threshold", -1.0, "rescale_threshold=-1.0"),
    ("order", "sideways", "order='sideways'"),
    ("sum_format", "int8", "sum_format"),
    ("exp2", "exp-exact", "exp2='exp-exact'"),
    ("p_format", "nope", "p_format='nope'"),
])
def test_bad_input_names_the_value(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        AttentionDatapath("x", **{field: value})


def test_lookup_style() -> None:
    assert get_datapath("FA3_FP8") is get_datapath("fa3-fp8")
    with pytest.raises(UnknownDatapathError, match="did you mean 'fa3-fp8'"):
        get_datapath("fa3-fp9")
    dp = AttentionDatapath.parse({"base": "fa3-fp8", "tile": 64})
    assert dp.tile == 64 and dp.p_format == get_datapath("fa3-fp8").p_format
    with pytest.raises(ValueError, match="unknown key"):
        AttentionDatapath.parse({"tiles": 3})
    assert AttentionDatapath.parse(dp.to_dict()) == dp


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "bf16", "fp16"])
def test_p_cast_is_the_saturating_rounding(fmt: str) -> None:
    """The fast path casts P with torch's conversion after a clamp: bit for bit the
    saturating RNE rounding of the format (Rq) on every fp32 exponent, ties, subnormals of
    the target, values just below and far above its maximum."""
    from precisim.emulation.flash import _p_caster, _torch_dtype
    from precisim.emulation.functions.core import Rq
    from precisim.formats import Overflow, get_format

    f = get_format(fmt)
    assert _torch_dtype(f) is not None  # the torch conversion is what is tested
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(0, 2**31 - 2**23, (200_000,), generator=g, dtype=torch.int64)
    rnd = bits.to(torch.int32).view(torch.float32)  # positive finite fp32 of every exponent
    mx, tiny = float(f.max), float(f.min_normal) * 2.0 ** -f.man_bits
    grid = torch.arange(0, 4096, dtype=torch.float64)
    special = torch.cat([grid * tiny / 2, mx * (1 + grid / 8192), mx / (1 + grid / 4096),
                         torch.tensor([0.0, mx, 2 * mx, 1e30, 3.0e38])]).float()
    p = torch.cat([rnd, special, -special])
    want = Rq(f, overflow=Overflow.SATURATE).fast(p.double()).float()
    got = _p_caster(f)(p)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def _exp2_inputs() -> torch.Tensor:
    """float32 exp2 arguments of every kind: random in the range that gives normal, subnormal
    and overflowing fp32 results, integers, values next to integers, +-inf and NaN."""
    g = torch.Generator().manual_seed(11)
    rnd = (torch.rand(300_000, generator=g, dtype=torch.float64) * 320 - 180).float()
    small = (torch.randn(100_000, generator=g) * 4).float()
    ints = torch.arange(-160, 140, dtype=torch.float32)
    near = torch.cat([torch.nextafter(ints, ints + 1), torch.nextafter(ints, ints - 1)])
    special = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 127.99999, 128.0,
                            -149.0, -149.5, -150.0, -126.0])
    return torch.cat([rnd, small, ints, near, special])


def test_fast_exp2_is_the_unit_bit_for_bit() -> None:
    """The datapath's exp2 kernel for correctly rounded fp32 units returns the unit's bits on
    every kind of input (NaN: a NaN), eager and compiled, and so does its exact fallback for
    hard cases (forced here on every element); likewise the fused P kernel (x = t - mo, exp2)."""
    from precisim.emulation import flash
    from precisim.emulation.functions import get_function_unit
    from precisim.formats import kernels

    u = get_function_unit("exp2-exact")
    assert flash._is_cr_fp32_exp2(u)
    assert not flash._is_cr_fp32_exp2(KNOBS[-1]["exp2"])
    x = _exp2_inputs()
    want = u(x)
    for backend in ("eager", "compile"):
        old = kernels.get_backend()
        kernels.set_backend(backend)
        try:
            got = flash._unit32(u, x)
        finally:
            kernels.set_backend(old)
        nan = torch.isnan(want)  # NaN stays NaN (its sign bit is not specified)
        assert torch.equal(torch.isnan(got), nan), backend
        assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32)), backend
    xs = x[::997]
    real = flash._exp2_kernel

    def all_hard(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, _ = real(v)
        return y * 0, torch.ones_like(v, dtype=torch.bool) & torch.isfinite(v)

    old = kernels.get_backend()
    kernels.set_backend("eager")
    try:
        flash._exp2_kernel = all_hard
        got = flash._exp2_fp32(u, xs)
        t = torch.where(torch.isnan(xs), -math.inf, xs)[:400].reshape(-1, 10)[:, :9] * 0.5
        mo = t.amax(-1).clamp(min=-100) - 3
        fused = flash._p_fused(u, t, mo)
    finally:
        flash._exp2_kernel = real
        kernels.set_backend(old)
    assert torch.equal(got.view(torch.int32), u(xs).view(torch.int32))
    want = u(torch.where(t == -math.inf, -math.inf, t - mo[:, None]))
    assert torch.equal(fused.view(torch.int32), want.view(torch.int32))
    assert torch.equal(flash._p_fused(u, t, mo).view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("name", ["fa3-fp8", "fa4-fp8-saturating", "exact-online"])
def test_fused_paths_equal_the_unit_path(name: str) -> None:
    """The fast path with the datapath's own exp2 kernel equals the same path through the
    generic exp2 unit (the pre-fusion eager path), bit for bit, with equal telemetry, on a
    causal 300-key input with a sink."""
    from precisim.emulation import flash

    q, k, v = _inputs(12, h=3, n_q=40, n_k=300, spread=2.0)
    k[:, :, 0] *= 20
    mask = _causal(40, 300)
    dp = get_datapath(name).with_(tile=64)
    s1, s2 = FlashStats(), FlashStats()
    a = flash_attention(q, k, v, mask, 0.35, dp, s1)
    flash.FAST_EXP2 = False
    try:
        b = flash_attention(q, k, v, mask, 0.35, dp, s2)
    finally:
        flash.FAST_EXP2 = True
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert s1 == s2


def _alibi(h: int, n_q: int, n_k: int) -> torch.Tensor:
    """A causal mask plus ALiBi biases: -slope_h * (query position - key position)."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, h + 1) / h)
    pos = torch.arange(n_k - n_q, n_k)[:, None] - torch.arange(n_k)[None, :]
    bias = -slopes[:, None, None] * pos.clamp(min=0)
    return (bias + _causal(n_q, n_k)[0]).float()[None]


EXTRAS = {
    "softcap": {"softcap": 2.5},
    "sinks": {"sinks": torch.tensor([3.0, -1.5])},
    "alibi": {"alibi": True},
    "all": {"softcap": 4.0, "sinks": torch.tensor([9.0, 0.25]), "alibi": True},
}


def _extras(name: str, n_q: int, n_k: int) -> tuple[torch.Tensor, dict]:
    kw = dict(EXTRAS[name])
    mask = _alibi(2, n_q, n_k) if kw.pop("alibi", False) else _causal(n_q, n_k)
    return mask, kw


@pytest.mark.parametrize("extra", sorted(EXTRAS))
@pytest.mark.parametrize("name", ["exact-online", "fa3-fp8", "fa4-fp8-saturating",
                                  "sage2-fp16-acc"])
def test_softcap_sinks_alibi_fast_equal_reference(extra: str, name: str) -> None:
    q, k, v = _inputs(13, n_q=5, n_k=40)
    mask, kw = _extras(extra, 5, 40)
    dp = get_datapath(name).with_(tile=16)
    for d in (dp, dp.with_(order="reverse")):
        s1, s2 = FlashStats(), FlashStats()
        a = flash_attention(q, k, v, mask, 0.35, d, s1, **kw)
        r = flash_attention_reference(q, k, v, mask, 0.35, d, s2, **kw)
        assert torch.equal(a.view(torch.int32), r.view(torch.int32)), (extra, d.describe())
        assert s1 == s2


def _plain_attention(q, k, v, mask, scaling, softcap=None, sinks=None):  # noqa: ANN001, ANN202
    """Eager attention as Hugging Face writes it (Gemma-2 soft cap, gpt-oss sinks), float64."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s + mask.double()
    if sinks is not None:
        sk = sinks.double().reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        s = torch.cat([s, sk], -1)
    p = torch.softmax(s, -1)
    if sinks is not None:
        p = p[..., :-1]
    return p @ v.double()


@pytest.mark.parametrize("extra", sorted(EXTRAS))
@pytest.mark.parametrize("tile,order", [(1, "forward"), (7, "reverse"), (128, "forward")])
def test_softcap_sinks_alibi_agree_with_plain_attention(extra: str, tile: int,
                                                        order: str) -> None:
    """Every knob at full precision: within 1e-5 of plain float64 attention with the same
    soft cap, sinks and ALiBi bias (|V| < 5, 300 keys; fp32 roundings only)."""
    q, k, v = _inputs(14, b=2, n_q=9, n_k=300, d=16)
    mask, kw = _extras(extra, 9, 300)
    dp = get_datapath("exact-online").with_(tile=tile, order=order)
    out = flash_attention(q, k, v, mask, 0.25, dp, **kw).double()
    ref = _plain_attention(q, k, v, mask, 0.25, **kw)
    assert v.abs().max() < 5
    assert (out - ref).abs().max().item() < 1e-5


def test_sink_takes_the_mass_of_a_fully_masked_row_and_bad_extras() -> None:
    q, k, v = _inputs(15, n_q=2, n_k=8)
    mask = _causal(2, 8).clone()
    mask[..., 0, :] = -math.inf
    out = flash_attention(q, k, v, mask, 0.35, get_datapath("exact-online"),
                          sinks=torch.tensor([1.0, 2.0]))
    assert torch.equal(out[..., 0, :], torch.zeros_like(out[..., 0, :]))
    with pytest.raises(ValueError, match="softcap=0"):
        flash_attention(q, k, v, None, 0.35, get_datapath("exact-online"), softcap=0)
    with pytest.raises(ValueError, match=r"sinks of shape \(3,\)"):
        flash_attention(q, k, v, None, 0.35, get_datapath("exact-online"),
                        sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="tanh='exp2-exact'"):
        AttentionDatapath("x", tanh="exp2-exact")


def test_shared_parse_and_to_dict() -> None:
    """AttentionDatapath parses and serialises through the same code as the softmax, norm and
    activation units (functions.datapath.SpecBase): a preset serialises as its name, a
    derived one as its changed fields (a custom exp2 unit with its fields), and both parse
    back to equal datapaths; the unknown-key error suggests the near name."""
    from precisim.emulation.functions.datapath import SpecBase

    assert issubclass(AttentionDatapath, SpecBase)
    assert get_datapath("fa3-fp8").to_dict() == "fa3-fp8"
    dp = AttentionDatapath.parse({"base": "fa3-fp8", "tile": 32, "exp2": KNOBS[-1]["exp2"]})
    assert dp.name == "fa3-fp8+custom"
    d = dp.to_dict()
    assert d["tile"] == 32 and d["exp2"]["name"] == "exp2-poly3" and "max_offset" in d
    assert AttentionDatapath.parse(d) == dp
    assert AttentionDatapath.parse({"tile": 8}).name == "custom"
    with pytest.raises(ValueError, match="did you mean 'tile'"):
        AttentionDatapath.parse({"tiles": 3})


@pytest.mark.parametrize("pq64", [False, True])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fused_p_cast_kernel_is_the_separate_steps(fmt: str, pq64: bool) -> None:
    """P, its FP8 cast and the tile's counts from the one compiled kernel equal, bit for bit,
    the separate steps (the fused P kernel, the eager cast of :func:`_p_caster` checked in
    test_p_cast_is_the_saturating_rounding, the counts as the datapath takes them), compiled
    and eager, with the hard exp2 cases forced onto the exact fallback too. The scores put P on
    every rounding tie of the format, its subnormals, above its maximum and at -inf."""
    from precisim.emulation import flash
    from precisim.emulation.functions import get_function_unit
    from precisim.formats import get_format, kernels

    u = get_function_unit("exp2-exact")
    f = get_format(fmt)
    mx = float(f.max)
    tiny = float(f.min_normal) * 2.0 ** -f.man_bits
    vals = torch.cat([torch.arange(1, 2 ** 12, dtype=torch.float64) * tiny / 2,
                      mx * (1 + torch.arange(0, 512, dtype=torch.float64) / 512),
                      torch.tensor([2 * mx, 4 * mx])])
    tie_x = torch.log2(vals).float()  # exp2 near each value (exactly on ties where exp2 is)
    rnd = (torch.rand(20_000, generator=torch.Generator().manual_seed(3)) * 60 - 40).float()
    x = torch.cat([tie_x, rnd, torch.tensor([-math.inf, 0.0, -150.0, 9.0])])
    n = x.numel() // 64 * 64
    t = x[:n].reshape(-1, 64) + 8.0
    t[::7, 60:] = -math.inf
    mo = torch.full((t.shape[0],), 8.0)
    mo[1::3] = 7.5
    want_p = flash._p_fused(u, t, mo)
    want_q = flash._p_caster(f)(want_p)
    want_c = (int((t != -math.inf).sum()), int((want_p > mx).sum()),
              int(((want_q == 0) & (want_p > 0)).sum()))
    assert want_c[1] > 0 and want_c[2] > 0
    real = flash._exp2_kernel

    def all_hard(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, _ = real(v)  # every finite argument hard, its P wrong (saturating) until redone
        hard = torch.isfinite(v)
        return torch.where(hard, 1e30, y), hard

    for backend, force in (("eager", False), ("compile", False), ("eager", True)):
        old = kernels.get_backend()
        kernels.set_backend(backend)
        try:
            if force:
                flash._exp2_kernel = all_hard
                flash._P_CAST_KERNELS.clear()
            p, q, c = flash._p_fused_cast(u, f, t, mo, pq64)
        finally:
            flash._exp2_kernel = real
            flash._P_CAST_KERNELS.clear()
            kernels.set_backend(old)
        assert torch.equal(p.view(torch.int32), want_p.view(torch.int32)), backend
        assert q.dtype == (torch.float64 if pq64 else torch.float32)
        assert torch.equal(q.float().view(torch.int32), want_q.view(torch.int32)), backend
        assert c == want_c, backend


def test_scores_max_kernel_compiled_equals_eager() -> None:
    """The compiled score kernel (t = fp32(S * c), masked keys -inf, row maxima) returns the
    bits of the eager steps of the datapath (:func:`_scores`, the mask, amax), with and without
    a mask, on rows that are fully masked, hold NaN, +-inf or only equal scores."""
    from precisim.emulation import flash
    from precisim.formats import kernels

    g = torch.Generator().manual_seed(5)
    s = (torch.randn(2, 3, 40, 128, generator=g) * 30).float()
    s[0, 0, 0] = 4.0
    s[0, 1, 1, 7] = math.nan
    s[1, 2, 3, :5] = math.inf
    s[1, 0, 2, 9] = -math.inf
    vis = torch.rand(2, 3, 40, 128, generator=g) > 0.3
    vis[0, 2, 5] = False
    c = flash._scale_const(0.125)
    c32 = torch.tensor(c, dtype=torch.float32)
    for v in (None, vis[:, :, 3:40, 5:100]):
        sv = s[:, :, 3:40, 5:100]
        want = flash._scores(sv, c32, None, None, 0.125, None)  # type: ignore[arg-type]
        if v is not None:
            want = torch.where(v, want, -math.inf)
        wmax = want.amax(-1)
        for backend in ("eager", "compile"):
            old = kernels.get_backend()
            kernels.set_backend(backend)
            try:
                t, tmax = flash._scores_max(sv, c, v)
            finally:
                kernels.set_backend(old)
            for a, b in ((t, want), (tmax, wmax)):
                assert torch.equal(torch.isnan(a), torch.isnan(b)), backend
                assert torch.equal(a.nan_to_num(0.5).view(torch.int32),
                                   b.nan_to_num(0.5).view(torch.int32)), backend


@pytest.mark.parametrize("name", ["fa3-fp8", "fa4-fp8-saturating"])
def test_datapath_compiled_equals_eager(name: str) -> None:
    """The whole datapath with its compiled kernels (scores and max, P with its cast and
    counts, the per-tile statistics and the final normalisation) returns the eager bits and
    the same telemetry, on a causal input with a sink."""
    from precisim.formats import kernels

    q, k, v = _inputs(21, h=3, n_q=40, n_k=200, spread=2.0)
    k[:, :, 0] *= 20
    mask = _causal(40, 200)
    dp = get_datapath(name).with_(tile=64)
    res = {}
    for backend in ("eager", "compile"):
        old = kernels.get_backend()
        kernels.set_backend(backend)
        try:
            st = FlashStats()
            res[backend] = (flash_attention(q, k, v, mask, 0.35, dp, st), st.as_dict())
        finally:
            kernels.set_backend(old)
    (a, sa), (b, sb) = res["eager"], res["compile"]
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert sa == sb and sa["p_numel"] > 0


STATS_CASES = {
    "fa3-fp8": {}, "fa4-fp8-saturating": {}, "fa4-fp8-fixed": {}, "fa2-bf16": {},
    "sage2-fp16-acc": {}, "fa3-fp8/reverse": {"order": "reverse"},
    "fa3-fp8/narrow": {"max_format": "bf16", "alpha_format": "bf16", "sum_format": "fp16",
                       "row_sum": "quantized", "normalize": "reciprocal"},
    "fa4-fp8-saturating/thr8-e5m2": {"rescale_threshold": 8.0, "p_format": "e5m2"},
}


@pytest.mark.parametrize("case", sorted(STATS_CASES) + [
    pytest.param("compiled", marks=pytest.mark.slow)])
def test_kernel_statistics_equal_the_eager_loop(case: str) -> None:
    """The per-tile statistics (running max and rescale, row sum, accumulator) and the final
    normalisation through their kernels (FAST_STATS) return the bits and the telemetry of the
    eager per-tile loop, on a causal input with a sink key, sink logits, a fully masked row,
    rescales taken, and (fa4-fp8-saturating) saturated P. The kernels run eagerly here (the
    same functions the compiled kernels trace); test_datapath_compiled_equals_eager compares
    them compiled for the fp32 statistics of fa3-fp8 and fa4-fp8-saturating, and the slow
    case ``compiled`` compiles them for the narrow formats (bf16 max, fp16 sum, quantized row
    sum, reciprocal) and the fp16 accumulator."""
    if case == "compiled":
        for c in ("fa3-fp8/narrow", "sage2-fp16-acc"):
            _stats_vs_loop(c, ("eager", "compile"))
        return
    _stats_vs_loop(case, ("eager",))


def _stats_vs_loop(case: str, backends: tuple[str, ...]) -> None:
    from precisim.emulation import flash
    from precisim.formats import kernels

    q, k, v = _inputs(31, h=3, n_q=70, n_k=260, spread=2.5)
    k[:, :, 0] *= 20
    k[:, :, 150] *= 12
    mask = _causal(70, 260).clone()
    mask[..., 3, :] = -math.inf
    dp = get_datapath(case.split("/")[0]).with_(tile=64, **STATS_CASES[case])
    sinks = torch.tensor([0.5, 6.0, -4.0])
    res = []
    for fast, backend in ((False, "eager"), *((True, b) for b in backends)):
        old = kernels.get_backend()
        kernels.set_backend(backend)
        flash.FAST_STATS = fast
        try:
            st = FlashStats()
            out = flash_attention(q, k, v, mask, 0.35, dp, st, sinks=sinks)
        finally:
            flash.FAST_STATS = True
            kernels.set_backend(old)
        res.append((out, st))
    (a, sa), *rest = res
    for b, sb in rest:
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), case
        assert sa == sb, (sa, sb)
    assert sa.rescales > 0 and sa.p_numel > 0
    assert torch.equal(a[..., 3, :], torch.zeros_like(a[..., 3, :]))
    if case == "fa4-fp8-saturating":
        assert sa.p_saturated > 0


def test_mask_cache_follows_in_place_changes_and_views() -> None:
    """The mask read once per mask (every layer passes the same one) is read again when the
    tensor changes in place or another view of it is passed: each call equals a call with a
    fresh copy of its mask."""
    from precisim.emulation import flash

    q, k, v = _inputs(41, n_q=6, n_k=40)
    dp = get_datapath("fa3-fp8").with_(tile=16)
    mask = _causal(6, 40).clone()
    got = [flash_attention(q, k, v, mask, 0.35, dp)]
    mask[..., 2, :30] = -math.inf  # in place: the version counter moves
    got.append(flash_attention(q, k, v, mask, 0.35, dp))
    got.append(flash_attention(q, k[:, :, :30], v[:, :, :30], mask[..., :30], 0.35, dp))
    want = [flash_attention(q, k, v, _causal(6, 40), 0.35, dp)]
    m2 = _causal(6, 40).clone()
    m2[..., 2, :30] = -math.inf
    want.append(flash_attention(q, k, v, m2.clone(), 0.35, dp))
    want.append(flash_attention(q, k[:, :, :30], v[:, :, :30], m2[..., :30].clone(), 0.35, dp))
    for a, b in zip(got, want):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert not torch.equal(got[0], got[1])
    assert flash._LAST_MASK[0] is not None


#: datapaths of the GQA tests: fake quant (E4M3 K along head_dim, P cast element by element),
#: K in MXFP8 blocks along head_dim with NVFP4 P (blocks of 16 along the keys), the fp32
#: products, and QK / PV on the bit-exact h100-e4m3 unit
_EXACT = {"input": "e4m3", "weight": "e4m3", "unit": "h100-e4m3"}
GQA_CASES = {
    "fa3-fp8": ("fa3-fp8", {}),
    "mxfp8-k-nvfp4-p": ("fa3-fp8", {"qk": {"input": "mxfp8", "weight": "mxfp8"},
                                    "p_format": "nvfp4", "max_offset": 2}),
    "exact-online": ("exact-online", {}),
    "fa3-fp8-bit-exact-unit": ("fa3-fp8", {"qk": _EXACT, "pv": _EXACT}),
}


@pytest.mark.parametrize("case", sorted(GQA_CASES))
def test_gqa_per_kv_head_equals_repeated_heads(case: str) -> None:
    """Grouped-query attention as SmolLM2 has it (9 query heads, 3 key/value heads, head_dim
    64): K and V quantized once per kv head and the GEMMs per kv head with the query heads'
    rows stacked give the output bits and the telemetry of K and V repeated per query head
    (the previous behaviour), on a causal prefill over 3 tiles with a sink key and sink logits
    and on a decode step; and of GQA_PER_KV_HEAD = False."""
    from precisim.emulation import flash
    from precisim.emulation.attention import repeat_kv

    name, change = GQA_CASES[case]
    dp = get_datapath(name).with_(tile=64, **change)
    g = torch.Generator().manual_seed(7)
    n = 150
    q = torch.randn(2, 9, n, 64, generator=g)
    k = torch.randn(2, 3, n, 64, generator=g) * 2.0 ** torch.randint(-3, 3, (2, 3, 1, 64),
                                                                     generator=g)
    v = torch.randn(2, 3, n, 64, generator=g)
    k[:, :, 0] *= 8  # a sink key
    sinks = torch.randn(9, generator=g)
    calls = [(q, _causal(n, n), {}), (q[:, :, -1:], None, {"sinks": sinks}),
             (q[:, :, 100:], _causal(50, n), {"sinks": sinks})]
    for qq, mask, kw in calls:
        res = []
        for kk, vv, per_kv in ((k, v, True), (repeat_kv(k, 3), repeat_kv(v, 3), True),
                               (k, v, False)):
            st = FlashStats()
            old = flash.GQA_PER_KV_HEAD
            flash.GQA_PER_KV_HEAD = per_kv
            try:
                out = flash_attention(qq, kk, vv, mask, 0.125, dp, st, **kw)
            finally:
                flash.GQA_PER_KV_HEAD = old
            res.append((out, st))
        (a, sa), *rest = res
        assert sa.p_numel > 0
        for b, sb in rest:
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (case, kw)
            assert sa == sb, (sa, sb)


def test_gqa_fast_equals_reference_and_bad_heads() -> None:
    """GQA (6 query heads on 2 key/value heads) through the fast path equals the step-by-step
    reference (which repeats K and V per query head) bit for bit; key/value heads that do not
    divide the query heads are refused with the shapes named."""
    q, _, _ = _inputs(5, h=6, n_q=5, n_k=20)
    _, k, v = _inputs(6, h=2, n_q=5, n_k=20)
    for name in ("fa3-fp8", "exact-online"):
        _same(q, k, v, _causal(5, 20), get_datapath(name).with_(tile=8))
    with pytest.raises(ValueError, match=r"k and v of shapes \(1, 4, 20, 8\).*6 query heads"):
        flash_attention(q, torch.zeros(1, 4, 20, 8), torch.zeros(1, 4, 20, 8), None, 0.3,
                        get_datapath("fa3-fp8"))


#: float32 exp2 arguments whose exact result lies within 2^-47 (relative) of an fp32 rounding
#: tie (found by a search of 2^26 random arguments in [-30, 10] with _exp2_kernel's mask):
#: the float64 exp2 cannot decide their rounding, the exact reference does
HARD_X = ("-0x1.032d8ep+4", "-0x1.465b1cp+3", "-0x1.996c7p+1", "0x1.39a4e4p+3",
          "-0x1.4cb638p+2", "0x1.7349c8p+2", "0x1.19a4e4p+3", "-0x1.c32d8ep+4")


@pytest.mark.parametrize("pq64", [False, True])
def test_p_kernels_on_hard_cases_ties_and_extremes(pq64: bool) -> None:
    """The P kernels with the hard cases marked in P (_p_fused, _p_fused_cast: only the marked
    rows are redone with the exact reference) equal the exp2 unit applied element by element
    (its own kernel and fallback, the slow path), then the cast, bit for bit with equal counts,
    eager and compiled, on rows holding real hard cases (arguments next to an fp32 rounding
    tie, checked to be flagged), integer arguments (2^-150: the tie between 0 and 2^-149;
    2^128: overflow), -inf scores, huge negative and +inf arguments and a fully masked row,
    among ordinary rows, with running maxima 0, -8 and 3.5."""
    from precisim.emulation import flash
    from precisim.emulation.functions import get_function_unit
    from precisim.formats import get_format, kernels

    u = get_function_unit("exp2-exact")
    f = get_format("e4m3")
    g = torch.Generator().manual_seed(5)
    t = (torch.rand(64, 128, generator=g, dtype=torch.float64) * 52 - 40).float()
    hard_rows = [3, 17, 40]
    for i, r in enumerate(hard_rows):
        t[r, 5 * i:5 * i + len(HARD_X)] = torch.tensor([float.fromhex(h) for h in HARD_X])
    t[5, :12] = torch.tensor([-150.0, -149.0, -151.0, -149.5, 0.0, -0.0, 127.0, 128.0, 129.0,
                              -126.0, 8.0, 9.0])
    t[7, ::3] = -math.inf
    t[9, :4] = torch.tensor([-1e30, -3e38, math.inf, -1000.5])
    t[11] = -math.inf
    mo = torch.zeros(64)
    mo[40:50] = -8.0
    mo[50:] = 3.5
    marked, n_hard = flash._p_marked_kernel(t, mo)
    _, hard = flash._p_kernel(t, mo)
    assert torch.equal(marked < 0, hard) and int(n_hard) == int(hard.sum())
    assert bool(hard[hard_rows[:2]].any(-1).all()) and int(n_hard) >= 2 * len(HARD_X)
    assert flash._marked_rows(marked).tolist() == hard.any(-1).nonzero().reshape(-1).tolist()
    x = torch.where(t == -math.inf, -math.inf, t - mo[:, None])
    want_p = u(x)
    want_q = flash._p_caster(f)(want_p)
    mx = float(f.max)
    want_c = (int((t != -math.inf).sum()), int((want_p > mx).sum()),
              int(((want_q == 0) & (want_p > 0)).sum()))
    assert want_c[1] > 0 and want_c[2] > 0
    real = flash._exp2_kernel

    def poisoned(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, hard = real(v)  # the hard cases' P one step off until the exact reference redoes it
        return torch.where(hard, torch.nextafter(y, torch.full_like(y, math.inf)), y), hard

    for backend, poison in (("eager", False), ("compile", False), ("eager", True)):
        old = kernels.get_backend()
        kernels.set_backend(backend)
        try:
            if poison:
                flash._exp2_kernel = poisoned
            p1 = flash._p_fused(u, t, mo)
            p2, q2, c2 = flash._p_fused_cast(u, f, t, mo, pq64)
        finally:
            flash._exp2_kernel = real
            kernels.set_backend(old)
        for p in (p1, p2):
            assert torch.equal(p.view(torch.int32), want_p.view(torch.int32)), backend
        assert torch.equal(q2.float().view(torch.int32), want_q.view(torch.int32)), backend
        assert c2 == want_c, backend
