"""Misuse never corrupts or misleads (issue 14): each defect found by trying precisim with bad
and unusual inputs has a test here that failed before its fix. The generated bad-input suite
is tests/test_properties.py; the command-line cases are in tests/test_misuse_cli.py."""

from __future__ import annotations

import gc
import time
import warnings

import precisim.emulation as emulation
import pytest
import torch
from precisim.emulation import (
    EmulationError,
    Recipe,
    RecipeError,
    TensorSpec,
    emulate,
    matmul,
    plan,
    scaled_matmul,
)
from precisim.emulation.presets import get_unit, unit_from_dict
from precisim.emulation.reference import dot
from precisim.formats import (
    FloatFormat,
    FormatError,
    get_format,
    kernels,
    quantize,
    set_backend,
)
from precisim.formats.scaling import get_scaled_format, quantize_scaled
from precisim.formats.vectors import format_vectors

transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(3))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _identity(model):
    """Everything a restore must give back: module objects by name, parameters by identity,
    the attention implementation."""
    return ([(n, id(m)) for n, m in model.named_modules()],
            [(n, id(p)) for n, p in model.named_parameters()],
            model.config._attn_implementation)


# ---------------------------------------------------------------------------------------------
# 1. a huge bias is refused before anything is derived from it

def test_huge_bias_is_refused_at_once_with_the_accepted_range() -> None:
    for name in ("e4m3b1000000000", "e4m3b1000000000000000000000", "e4m3b" + "9" * 5000):
        t0 = time.perf_counter()
        with pytest.raises(FormatError) as e:
            get_format(name)
        assert time.perf_counter() - t0 < 0.5, name
        assert "bias" in str(e.value) and len(str(e.value)) < 600
    with pytest.raises(FormatError) as e:
        get_format("e4m3b200")
    msg = str(e.value)
    assert "max 0, smallest 0" not in msg
    assert "bias=200" in msg and "accepted bias -113..147" in msg and "2^-202" in msg
    # the edges of the accepted range are formats, one past them is not
    assert get_format("e4m3b147").bias == 147 and FloatFormat("x", 4, 3, -113).bias == -113
    with pytest.raises(FormatError, match="accepted bias -113..147"):
        get_format("e4m3b148")
    # the same check in a recipe
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match="bias"):
        Recipe.from_yaml("name: x\nlinear: e4m3b1000000000\n")
    assert time.perf_counter() - t0 < 0.5


# ---------------------------------------------------------------------------------------------
# 2. enumerating every code of a wide format is refused up front

def test_all_codes_of_a_wide_format_is_refused() -> None:
    t0 = time.perf_counter()
    for name in ("fp32", "tf32"):
        with pytest.raises(ValueError, match="up to 16 bits"):
            format_vectors(name, all_codes=True)
    with pytest.raises(ValueError, match="n_random"):
        format_vectors("e4m3", n_random=10**12)
    assert time.perf_counter() - t0 < 1
    from precisim.emulation.vectors import unit_vectors

    with pytest.raises(ValueError, match="products"):
        unit_vectors("h100-e4m3", n=10**9)


# ---------------------------------------------------------------------------------------------
# 3, 4. emulations do not nest: a second one is refused, the first stays intact, restores are
# exact in any order, and collected handles never break the model

def test_two_handles_on_one_model_in_any_order() -> None:
    model = _llama()
    ref, ident = _logits(model), _identity(model)
    a, b = emulate(model, "mxfp4"), emulate(model, "bf16")
    a.apply()
    under_a = _logits(model)
    with pytest.raises(EmulationError, match="under emulation 'mxfp4'"):
        b.apply()
    assert not b.active and emulation.active_emulation(model) is a
    assert torch.equal(_logits(model), under_a)  # a is untouched by the refused b
    a.restore()
    b.restore()  # never applied: a no-op
    assert _identity(model) == ident and torch.equal(_logits(model), ref)
    # the other order, and b after a's restore
    b.apply()
    with pytest.raises(EmulationError, match="under emulation 'bf16'"):
        a.apply()
    b.restore()
    a.apply()
    assert torch.equal(_logits(model), under_a)
    a.restore()
    assert _identity(model) == ident and torch.equal(_logits(model), ref)
    # collected handles: applied and dropped, the model keeps working (still emulated) until
    # it is restored through active_emulation
    del a, b
    emulate(model, "mxfp4").apply()
    gc.collect()
    assert torch.equal(_logits(model), under_a)
    emulation.active_emulation(model).restore()
    gc.collect()
    assert _identity(model) == ident and torch.equal(_logits(model), ref)
    assert emulation.active_emulation(model) is None


def test_nested_with_blocks_are_refused_and_the_outer_keeps_emulating() -> None:
    model = _llama()
    ref, ident = _logits(model), _identity(model)
    with emulate(model, "mxfp4"):
        outer = _logits(model)
    lin_only = Recipe.from_dict({"name": "lin", "linear": "mxfp4"})
    with emulate(model, lin_only):
        linear_only = _logits(model)
    assert not torch.equal(outer, linear_only)  # mxfp4 emulates the attention matmuls too
    with emulate(model, "mxfp4"):
        with pytest.raises(EmulationError, match="under emulation 'mxfp4'"), \
                emulate(model, "bf16"):
            pass
        with pytest.raises(EmulationError, match="under emulation 'mxfp4'"):
            plan(model, "bf16")  # (it would plan the wrappers: 0 linear layers)
        assert torch.equal(_logits(model), outer)  # the attention is still emulated
    assert _identity(model) == ident and torch.equal(_logits(model), ref)
    # a submodule of an emulated model, or a model around an emulated submodule
    with emulate(model.model.layers[0], "mxfp8"), \
            pytest.raises(EmulationError, match="under emulation 'mxfp8'"):
        emulate(model, "bf16").apply()
    assert _identity(model) == ident and torch.equal(_logits(model), ref)


# ---------------------------------------------------------------------------------------------
# 11. forward hooks on a swapped layer keep firing

def test_user_hooks_fire_under_emulation() -> None:
    model = _llama()
    lin = model.model.layers[0].mlp.down_proj
    seen: list[str] = []
    h1 = lin.register_forward_hook(lambda m, i, o: seen.append("post"))
    h2 = lin.register_forward_pre_hook(lambda m, i: seen.append("pre"))
    with emulate(model, "mxfp8"):
        _logits(model)
        assert seen == ["pre", "post"]
        h3 = model.model.layers[0].mlp.down_proj.register_forward_hook(
            lambda m, i, o: seen.append("during"))
        _logits(model)
    assert seen == ["pre", "post", "pre", "post", "during"]
    _logits(model)  # after the restore: the hooks are the original layer's, as registered
    assert seen[-3:] == ["pre", "post", "during"]
    for h in (h1, h2, h3):
        h.remove()
    _logits(model)
    assert len(seen) == 8
    # errors=True runs the layer in high precision too, without firing its hooks twice
    seen.clear()
    h = lin.register_forward_hook(lambda m, i, o: seen.append("post"))
    with emulate(model, "mxfp8", errors=True):
        _logits(model)
    h.remove()
    assert seen == ["post"]


# ---------------------------------------------------------------------------------------------
# 12. nn.MultiheadAttention's out_proj is not claimed

def test_multihead_attention_out_proj_is_not_claimed() -> None:
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.head(self.mha(x, x, x)[0])

    torch.manual_seed(0)
    net = Net().eval()
    with pytest.warns(UserWarning, match="mha.out_proj"):
        p = plan(net, "mxfp4")
    assert [e.module for e in p.emulated()] == ["head"]
    assert any(n == "mha.out_proj" and "reads its weight directly" in why
               for n, _, why in p.unsupported)
    assert "mha.out_proj" in p.table() and "not emulated" in p.table()


# ---------------------------------------------------------------------------------------------
# 9. every parameter is honoured or rejected

def test_scaled_format_parameters_are_honoured_or_rejected() -> None:
    with pytest.raises(FormatError, match="axis=0 is not possible.*accepted axis -1"):
        get_scaled_format("int8_channel", axis=0)
    with pytest.raises(FormatError, match="accepted axis -1 or -2"):
        get_scaled_format("fp8_128x128", axis=0)
    assert get_scaled_format("fp8_128x128", axis=-2).granularity.name == "tile(128x128)"
    assert get_scaled_format("int8_token", axis=0).granularity.blocks == ((0, None),)
    with pytest.raises(FormatError, match="axis"):
        get_scaled_format(get_scaled_format("mxfp4"), axis=0)
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="seed.*rounding='sr'"):
        quantize_scaled(x, "mxfp4", seed=1)
    with pytest.raises(FormatError, match="'floor' is not possible.*amax"):
        get_scaled_format("nvfp4", rule="floor")
    # in a recipe, with the reason (not "needs a block-scaled format": nvfp4 is one)
    with pytest.raises(RecipeError, match="'floor' is not possible.*amax"):
        TensorSpec("nvfp4", scale_rule="floor")
    with pytest.raises(RecipeError, match="scale_format.*needs 'scaling'"):
        TensorSpec("mxfp4", scale_format="fp32")
    with pytest.raises(RecipeError, match="overflow='inf'.*saturate"):
        TensorSpec("mxfp8", overflow="inf")


# ---------------------------------------------------------------------------------------------
# 10. recipes validate types and combinations when parsed

@pytest.mark.parametrize("spec, match", [
    ({"format": "e4m3", "flush_subnormals": "no"}, "flush_subnormals='no'"),
    ({"format": "e4m3", "flush_subnormals": 1}, "flush_subnormals=1"),
    ({"format": "e4m3", "rounding": "sr", "sr_bits": 0}, "sr_bits=0"),
    ({"format": "e4m3", "rounding": "sr", "sr_bits": 31}, "sr_bits=31"),
    ({"format": "e4m3", "overflow": "inf"}, "overflow='inf'.*no infinity"),
    ({"format": "e2m1", "overflow": "nan"}, "overflow='nan'"),
    ({"format": "e4m3", "overflow": "wrap"}, "wrap"),
    ({"format": "e4m3", "rounding": "sr", "seed": "abc"}, "seed='abc'"),
    ({"format": "e4m3", "rounding": "sr", "seed": True}, "seed=True"),
    ({"format": "e4m3", "seed": 3}, "seed=3 needs rounding='sr'"),
    ({"format": "e4m3", "rounding": 3}, "rounding=3"),
])
def test_tensor_spec_fields_are_validated_when_parsed(spec, match) -> None:
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict({"name": "x", "linear": {"input": spec, "weight": "e4m3"}})


def test_unit_operand_formats_are_validated_when_parsed() -> None:
    with pytest.raises(RecipeError, match="'bf16'.*cannot be fed to matrix unit 'h100-e4m3'"):
        Recipe.from_dict({"name": "x", "linear": {"input": "bf16", "weight": "e4m3",
                                                  "unit": "h100-e4m3"}})
    with pytest.raises(RecipeError, match="scale blocks of 16.*k|32 must divide 16"):
        Recipe.from_dict({"name": "x", "linear": {"input": "nvfp4", "weight": "nvfp4",
                                                  "unit": "h100-e4m3"}})
    with pytest.raises(RecipeError, match="in pairs"):
        Recipe.from_dict({"name": "x", "linear": {"input": "mxfp8", "weight": "e4m3",
                                                  "unit": "h100-e4m3"}})
    # what runs is accepted
    Recipe.from_dict({"name": "x", "linear": {"input": "nvfp4", "weight": "nvfp4", "unit": {
        "base": "h100-e4m3", "name": "k16", "block_size": 16}}})
    Recipe.from_dict({"name": "x", "linear": {"input": "e2m1", "weight": "e4m3",
                                              "unit": "h100-e4m3"}})


# ---------------------------------------------------------------------------------------------
# 13. empty operands

@pytest.mark.parametrize("a_shape, b_shape", [((4, 0), (0, 3)), ((0, 8), (8, 3)),
                                              ((4, 8), (8, 0)), ((0, 4, 8), (8, 3)),
                                              ((2, 4, 0), (0, 3))])
def test_matmul_with_empty_operands(a_shape, b_shape) -> None:
    a, b = torch.zeros(a_shape), torch.zeros(b_shape)
    out = matmul(a, b, "h100-e4m3")
    assert out.shape == torch.matmul(a, b).shape and torch.equal(out, torch.matmul(a, b))


@pytest.mark.parametrize("unit", ["h100-e4m3", "deepseek-fp8", "exact-fp16", "mul-add-fp16-fp32"])
def test_matmul_with_k_zero_is_c_through_the_units_roundings(unit) -> None:
    c = torch.tensor([[1.5, -(2.0**-130), 3e38, -0.0]])
    out = matmul(torch.zeros(1, 0), torch.zeros(0, 4), unit, c=c)
    want = [dot([], [], get_unit(unit), float(v)) for v in c[0]]
    assert out[0].tolist() == want


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8_tensor", "int8_channel", "fp8_128x128"])
@pytest.mark.parametrize("shape", [(0, 32), (4, 0), (0,), (2, 0, 16)])
def test_quantize_scaled_of_an_empty_tensor(fmt, shape) -> None:
    if fmt == "fp8_128x128" and len(shape) < 2:
        pytest.skip("tiles need two axes")
    x = torch.zeros(shape)
    y = quantize_scaled(x, fmt)
    assert y.shape == x.shape
    parts = quantize_scaled(x, fmt, return_parts=True)
    assert parts.dequantized.shape == x.shape and parts.codes.shape == x.shape


def test_scaled_matmul_with_empty_operands() -> None:
    u = unit_from_dict({"base": "h100-e4m3", "name": "k16", "block_size": 16})
    for sa, sb in (((4, 0), (3, 0)), ((0, 32), (3, 32)), ((4, 32), (0, 32))):
        a = quantize_scaled(torch.zeros(sa), "nvfp4", return_parts=True)
        w = quantize_scaled(torch.zeros(sb), "nvfp4", return_parts=True)
        out = scaled_matmul(a, w, u)
        assert out.shape == (sa[0], sb[0]) and not out.any()


# ---------------------------------------------------------------------------------------------
# 14. a changed field's derived defaults are derived again

def test_unit_from_dict_rederives_defaults_of_changed_fields() -> None:
    u = unit_from_dict({"base": "h100-e4m3", "acc_format": "int16", "block_result_bits": None})
    assert u.acc_overflow.value == "saturate" and u.output_overflow.value == "saturate"
    # what the base sets explicitly and cannot apply is named, with where it comes from
    with pytest.raises(ValueError, match="block_result_bits=13 is taken from base 'h100-e4m3'"):
        unit_from_dict({"base": "h100-e4m3", "acc_format": "int16"})
    # what the user sets is still checked
    with pytest.raises(ValueError, match="acc_overflow='inf'"):
        unit_from_dict({"base": "h100-e4m3", "acc_format": "int16", "block_result_bits": None,
                        "acc_overflow": "inf"})
    # b_format follows a changed a_format unless it was set to something else
    v = unit_from_dict({"base": "h100-bf16", "a_format": "fp16"})
    assert v.a_format.name == v.b_format.name == "fp16"
    w = get_unit("h100-bf16").with_(b_format="fp16").with_(a_format="tf32")
    assert (w.a_format.name, w.b_format.name) == ("tf32", "fp16")


def test_a_block_result_width_the_accumulator_cannot_hold_is_refused_when_parsed() -> None:
    """Found by tests/test_properties.py: block_result_bits=0 on an fp32 accumulator was accepted
    and every matmul on the unit then failed inside the kernel with a FormatError about an
    internal 'fp32_m0' format (zero fraction bits leave no room for an IEEE NaN)."""
    with pytest.raises(ValueError, match="block_result_bits=0 is not valid for acc_format 'fp32'"):
        unit_from_dict({"name": "u", "a_format": "fp16", "block_result_bits": 0})
    u = unit_from_dict({"name": "u", "a_format": "fp16", "block_result_bits": 1})
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5], [0.25]])
    assert float(matmul(a, b, u)[0, 0]) == dot([1.0, 2.0], [0.5, 0.25], u)


# ---------------------------------------------------------------------------------------------
# 17. a compiled kernel is checked against its eager twin the first time it is used

def _corrupting_compile(monkeypatch, calls):
    """Make every newly compiled kernel return wrong bits for half of its outputs (as a compile
    cache written under another CPU capability did)."""
    def corrupt(fn):
        def compiled(*args):
            calls.append(fn.__name__)
            out = fn(*args)
            if isinstance(out, tuple):
                return (_flip(out[0]), *out[1:])
            return _flip(out)
        return compiled
    monkeypatch.setattr(kernels, "_compile", corrupt)


def _flip(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the low bit of every other value flipped."""
    f32 = t.dtype == torch.float32
    bad = (t.view(torch.int32) if f32 else t).reshape(-1).clone()
    bad[::2] ^= 1
    return (bad.view(torch.float32) if f32 else bad).reshape(t.shape)


@pytest.fixture
def fresh_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "_CHECKED", set())
    monkeypatch.setattr(kernels, "_CHECK_STATS", {"checked": 0, "failed": 0, "seconds": 0.0})
    set_backend("compile")
    yield
    set_backend("eager")


def test_a_corrupted_compiled_kernel_falls_back_to_eager(monkeypatch, fresh_kernels) -> None:
    calls: list[str] = []
    _corrupting_compile(monkeypatch, calls)
    x = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0)) * 100
    with pytest.warns(RuntimeWarning, match="differ from its eager twin"):
        q = quantize(x, "e4m3")
    with pytest.warns(RuntimeWarning, match="differ from its eager twin"):
        s = quantize_scaled(x, "mxfp4")
    n_calls = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q2 = quantize(x, "e4m3")  # eager from now on: no second warning, no compiled call
        s2 = quantize_scaled(x, "mxfp4")
    assert len(calls) == n_calls
    set_backend("eager")
    assert torch.equal(q, quantize(x, "e4m3")) and torch.equal(q2, q)
    assert torch.equal(s, quantize_scaled(x, "mxfp4")) and torch.equal(s2, s)
    st = kernels.self_check_stats()
    assert st["checked"] == 2 and st["failed"] == 2


def test_a_healthy_compiled_kernel_is_checked_once(monkeypatch, fresh_kernels) -> None:
    calls: list[str] = []
    monkeypatch.setattr(kernels, "_compile", lambda fn: (lambda *a: calls.append(1) or fn(*a)))
    x = torch.randn(3000, 400, generator=torch.Generator().manual_seed(1))  # > the probe size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            quantize(x, "e5m2")
    st = kernels.self_check_stats()
    assert st["checked"] == 1 and st["failed"] == 0
    assert len(calls) == 4  # three calls and the check's leading slice


def test_every_call_self_check_catches_a_kernel_wrong_on_a_later_batch(monkeypatch,
                                                                          fresh_kernels) -> None:
    """A compiled kernel right on its first batch and wrong on the second passes the
    first-use check; ``PRECISIM_KERNEL_SELF_CHECK=all`` (every call checked) catches it."""
    def wrong_from_second_call(fn):
        seen = []

        def compiled(*args):
            seen.append(1)
            out = fn(*args)
            return out if len(seen) == 1 else _flip(out)
        return compiled

    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(2)) * 100
    monkeypatch.setattr(kernels, "_compile", wrong_from_second_call)
    quantize(x, "e4m3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrong = quantize(x, "e4m3")  # first-use mode: the second batch is not checked
    set_backend("eager")
    ref = quantize(x, "e4m3")
    assert not torch.equal(wrong, ref)

    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "_CHECKED", set())
    monkeypatch.setattr(kernels, "SELF_CHECK_EVERY_CALL", True)
    set_backend("compile")
    quantize(x, "e4m3")
    with pytest.warns(RuntimeWarning, match="differ from its eager twin on a batch"):
        got = quantize(x, "e4m3")
    assert torch.equal(got, ref)


def test_an_unknown_self_check_setting_is_an_error() -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, PRECISIM_KERNEL_SELF_CHECK="yes")
    r = subprocess.run([sys.executable, "-c", "import precisim.formats.kernels"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "PRECISIM_KERNEL_SELF_CHECK='yes'" in r.stderr and "'all'" in r.stderr


@pytest.mark.parametrize("recipe", ["fp8-e4m3", "nvfp4", "deepseek-fp8"])
def test_telemetry_is_unchanged_when_every_compiled_kernel_falls_back(
        monkeypatch, fresh_kernels, recipe) -> None:
    """Every compiled kernel (element and block quantization, the telemetry counters, the
    matrix-unit chains) rejected by its first-use check and run eagerly: the emulated model's
    logits and every telemetry record (elements, saturated, flushed per module and role) equal
    an eager run's (docs/reproducibility.md section 9)."""
    from precisim.emulation import Emulation, get_recipe
    from test_training import _tiny_llama

    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(3))

    def run() -> tuple[torch.Tensor, list[tuple]]:
        em = Emulation(model, get_recipe(recipe), warn=False)
        with torch.no_grad(), em:
            logits = model(ids * 1).logits
        assert em.telemetry is not None
        return logits, [(r["module"], r.get("role"), int(r["numel"]), int(r["saturated"]),
                         int(r["flushed"])) for r in em.telemetry.records()]

    set_backend("eager")
    ref_logits, ref_tel = run()
    set_backend("compile")
    calls: list[str] = []
    _corrupting_compile(monkeypatch, calls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        logits, tel = run()
    st = kernels.self_check_stats()
    assert calls and st["checked"] > 0 and st["failed"] == st["checked"]
    assert torch.equal(logits, ref_logits)
    assert tel == ref_tel
    assert sum(t[3] + t[4] for t in ref_tel) > 0 or recipe == "deepseek-fp8"
