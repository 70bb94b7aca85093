"""Patching real (tiny, randomly initialised) Hugging Face models: plan, emulate, restore."""

from __future__ import annotations

import warnings

import pytest
import torch
from precisim.emulation import (
    Emulation,
    EmulationError,
    Recipe,
    RecipeError,
    emulate,
    get_recipe,
    plan,
)
from precisim.emulation.patch import EmulatedLinear
from precisim.formats import quantize
from precisim.formats.scaling import quantize_scaled

transformers = pytest.importorskip("transformers")


def _llama(**kw):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


MODELS = {"llama": _llama, "gpt2": _gpt2, "qwen2": _qwen2}
IDS = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, id(p), p.detach().clone()) for n, p in model.named_parameters()],
            model.config._attn_implementation)


def _same(model, snap) -> None:
    mods, params, impl = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == mods
    now = list(model.named_parameters())
    assert [(n, id(p)) for n, p in now] == [(n, i) for n, i, _ in params]
    for (_, p), (_, _, old) in zip(now, params):
        assert torch.equal(p, old)
    assert model.config._attn_implementation == impl


@pytest.mark.parametrize("arch", list(MODELS))
def test_restore_is_exact_and_outputs_change(arch: str) -> None:
    model = MODELS[arch]()
    ref = _logits(model)
    snap = _snapshot(model)
    with emulate(model, "mxfp4") as em:
        out = _logits(model)
        assert em.active
        # parameters are shared, not copied, and keep their names
        assert [id(p) for p in model.parameters()] == [i for _, i, _ in snap[1]]
    assert not torch.equal(out, ref)
    assert torch.isfinite(out).all()
    _same(model, snap)
    assert torch.equal(_logits(model), ref)


@pytest.mark.parametrize("arch", list(MODELS))
def test_high_precision_recipe_is_bit_identical(arch: str) -> None:
    model = MODELS[arch]()
    ref = _logits(model)
    with emulate(model, "fp32") as em:
        assert torch.equal(_logits(model), ref)
    assert em.plan.emulated() == []
    # fp32 "formats" go through the wrappers and are still bit-identical
    r = Recipe.from_dict({"name": "fp32-wrapped", "linear": {"input": "fp32", "weight": "fp32"}})
    with emulate(model, r) as em:
        assert any(isinstance(m, EmulatedLinear) for m in model.modules())
        assert torch.equal(_logits(model), ref)


def test_restore_when_forward_raises() -> None:
    model = _llama()
    ref = _logits(model)
    snap = _snapshot(model)

    def boom(*a):
        raise RuntimeError("boom")

    h = model.model.layers[1].mlp.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"), emulate(model, "mxfp8"):
            model(IDS)
    finally:
        h.remove()
    _same(model, snap)
    assert torch.equal(_logits(model), ref)


def test_every_op_kind_goes_through_the_emulated_path() -> None:
    model = _llama()
    ref = _logits(model)
    base = {"name": "x"}
    # each op kind alone, in a format coarse enough that it must change the logits
    for op, d in {
        "linear": {"linear": "e2m1"},
        "qk": {"attention": {"qk": "e2m1"}},
        "pv": {"attention": {"pv": "e2m1"}},
        "kv_cache": {"attention": {"kv_cache": "e2m1"}},
        "embedding": {"embedding": {"weight": "e2m1"}},
        "lm_head": {"lm_head": "e2m1"},
    }.items():
        with emulate(model, Recipe.from_dict({**base, **d})) as em:
            out = _logits(model)
        assert not torch.equal(out, ref), f"{op} was left in high precision"
        roles = {(r["module"].rsplit(".", 1)[-1], r["role"]) for r in em.telemetry.records()}
        expect = {"linear": ("o_proj", "input"), "qk": ("qk", "input"),
                  "pv": ("pv", "input"), "kv_cache": ("self_attn", "k_cache"),
                  "embedding": ("embed_tokens", "weight"), "lm_head": ("lm_head", "input")}[op]
        assert expect in roles, (op, roles)


def test_attention_emulation_matches_a_hand_computation() -> None:
    """QK^T under e4m3 inputs == the eager attention with q and k rounded to e4m3 by hand."""
    model = _llama(attn_implementation="eager")
    attn = model.model.layers[0].self_attn
    captured = {}

    def grab(mod, args, kwargs, out):
        captured["out"] = out[0]

    h = attn.register_forward_hook(grab, with_kwargs=True)
    r = Recipe.from_dict({"name": "qk8", "attention": {"qk": "e4m3"}})
    with emulate(model, r):
        _logits(model)
    emu = captured["out"]
    # by hand: run the unpatched layer with q and k rounded to e4m3 before the matmul
    from transformers.models.llama import modeling_llama as ml

    orig = ml.eager_attention_forward

    def rounded(module, q, k, v, mask, **kw):
        return orig(module, quantize(q, "e4m3"), quantize(k, "e4m3"), v, mask, **kw)

    ml.eager_attention_forward = rounded
    try:
        _logits(model)
    finally:
        ml.eager_attention_forward = orig
        h.remove()
    assert torch.equal(captured["out"], emu)


def test_linear_matches_a_hand_computation() -> None:
    model = _llama()
    lin = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, lin.in_features)
    with emulate(model, "mxfp8"):
        y = model.model.layers[0].mlp.down_proj(x)
    xq = quantize_scaled(x, "mxfp8")
    wq = quantize_scaled(lin.weight.detach(), "mxfp8")
    assert torch.equal(y, torch.nn.functional.linear(xq, wq))


def test_weights_quantized_once_and_identical_to_per_call() -> None:
    model = _llama()
    with emulate(model, "nvfp4") as em:
        a = _logits(model)
        b = _logits(model)
        rec = {(r["module"], r["role"]): r["calls"] for r in em.telemetry.records()}
        assert rec[("model.layers.0.mlp.up_proj", "weight")] == 1
        assert rec[("model.layers.0.mlp.up_proj", "input")] == 2
        em.clear_cache()  # quantize again: bit-identical
        c = _logits(model)
    assert torch.equal(a, b) and torch.equal(a, c)
    # an in-place change to a weight invalidates the cache
    with emulate(model, "nvfp4") as em:
        _logits(model)
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.mul_(2)
        d = _logits(model)
    assert not torch.equal(a, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype: torch.dtype) -> None:
    model = _llama().to(dtype)
    ref = _logits(model)
    with emulate(model, "mxfp8"):
        out = _logits(model)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert not torch.equal(out, ref)
    assert torch.equal(_logits(model), ref)


def test_generate_under_mxfp4_and_kv_cache_stored_in_format() -> None:
    model = _llama()
    prompt = IDS[:1, :6]
    r = Recipe.from_dict({"name": "kv", "linear": "mxfp4",
                          "attention": {"kv_cache": "e4m3"}})
    with torch.no_grad(), emulate(model, r) as em:
        out = model.generate(prompt, max_new_tokens=6, do_sample=False,
                             return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences.shape == (1, 12)
    cache = out.past_key_values
    k = cache.layers[0].keys
    assert torch.equal(quantize(k, "e4m3"), k) and k.abs().sum() > 0
    recs = {(r["module"], r["role"]) for r in em.telemetry.records()}
    assert ("model.layers.1.self_attn", "v_cache") in recs
    # the cache's own update method is back
    assert "update" not in vars(cache.layers[0]) and "update" not in vars(cache)
    with torch.no_grad(), emulate(model, "mxfp4"):
        g = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert g.shape == (1, 10)


def test_cache_and_no_cache_agree() -> None:
    """Keys/values rounded on the way into the cache == rounded in the attention function."""
    model = _llama()
    r = Recipe.from_dict({"name": "kv", "attention": {"kv_cache": "e3m2"}})
    with torch.no_grad(), emulate(model, r):
        a = model(IDS, use_cache=True).logits
        b = model(IDS, use_cache=False).logits
    assert torch.equal(a, b)


def test_plan_rules_last_match_wins_and_warnings() -> None:
    model = _llama()
    r = Recipe.from_dict({
        "name": "rules", "linear": "mxfp8",
        "rules": [
            {"match": "model.layers.*.mlp.*", "linear": "mxfp4"},
            {"match": r"re:model\.layers\.1\.mlp\.down_proj", "linear": None},
            {"match": "Linear", "kind": "type", "lm_head": "e4m3"},
            {"match": "nothing.here.*", "linear": "bf16"},
        ]})
    with pytest.warns(UserWarning, match="nothing.here"):
        p = plan(model, r)
    spec = {e.module: e for e in p.entries}
    assert spec["model.layers.0.self_attn.q_proj"].spec.input.format == "mxfp8"
    assert spec["model.layers.0.mlp.up_proj"].spec.input.format == "mxfp4"
    assert spec["model.layers.1.mlp.down_proj"].spec is None
    assert spec["model.layers.1.mlp.down_proj"].rule == r"model\.layers\.1\.mlp\.down_proj"
    assert spec["lm_head"].spec.input.format == "e4m3"
    assert [x.pattern for x in p.unmatched_rules] == ["nothing.here.*"]
    text = p.table()
    assert "model.layers.1.mlp.down_proj" in text and "high precision" in text


def test_unsupported_modules_are_reported() -> None:
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3)
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    m = Odd()
    with pytest.warns(UserWarning, match="'conv' \\(Conv2d\\)"):
        p = plan(m, "mxfp8")
    assert p.unsupported[0][0] == "conv"
    assert [e.module for e in p.emulated()] == ["lin"]


def test_attention_without_interface_is_reported() -> None:
    class MyAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = object()
            self.proj = torch.nn.Linear(4, 4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = MyAttention()

    with pytest.warns(UserWarning, match="attention interface"):
        p = plan(Net(), "mxfp8")
    assert [e.module for e in p.emulated()] == ["attn.proj"]


def test_bad_input() -> None:
    model = _llama()
    with pytest.raises(RecipeError, match="unknown recipe"):
        emulate(model, "mxfp5")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        plan("not a model", "mxfp8")  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="needs an input and a weight"):
        plan(model, Recipe.from_dict({"name": "u", "linear": {"input": "bf16",
                                                             "unit": "h100-bf16"}}))
    em = emulate(model, "bf16")
    with em, pytest.raises(EmulationError, match="already applied"):
        em.apply()


def test_handle_can_be_reapplied_and_other_models_untouched() -> None:
    a, b = _llama(), _llama()
    ref_b = _logits(b)
    em = Emulation(a, "mxfp8", telemetry=False)
    with em:
        x = _logits(a)
        assert torch.equal(_logits(b), ref_b)  # the other model is not affected
    with em:
        y = _logits(a)
    assert torch.equal(x, y) and em.telemetry is None


def test_matrix_unit_recipe_runs_the_unit() -> None:
    """bf16 operands summed by the A100 bf16 tensor-core model (bit-exact), one layer."""
    from precisim.emulation import matmul

    model = _llama()
    lin = model.model.layers[0].mlp.gate_proj
    x = torch.randn(4, lin.in_features)
    r = Recipe.from_dict({"name": "tc", "linear": {"input": "bf16", "weight": "bf16",
                                                  "unit": "a100-bf16"}})
    with emulate(model, r):
        y = model.model.layers[0].mlp.gate_proj(x)
    xq, wq = quantize(x, "bf16"), quantize(lin.weight.detach(), "bf16")
    assert torch.equal(y, matmul(xq, wq.T, "a100-bf16"))
    assert not torch.equal(y, xq @ wq.T)


def test_plan_of_preset_covers_every_linear_and_attention() -> None:
    model = _llama()
    p = plan(model, get_recipe("mxfp4"))
    lin = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
           and n != "lm_head"]
    assert sorted(e.module for e in p.emulated("linear")) == sorted(lin)
    assert len(p.emulated("attention")) == 2
    assert [e.module for e in p.high_precision()] == ["model.embed_tokens", "lm_head"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan(model, "mxfp4")  # nothing to warn about


def test_deepseek_fp8_recipe_runs_the_block_scaled_unit() -> None:
    """Linear layers under deepseek-fp8 == scaled_matmul of the 1x128 / 128x128 parts."""
    from precisim.emulation import scaled_matmul

    model = _llama()
    lin = model.model.layers[0].mlp.gate_proj
    x = torch.randn(1, 7, lin.in_features)
    with emulate(model, "deepseek-fp8"):
        y = model.model.layers[0].mlp.gate_proj(x)
    a = quantize_scaled(x, "fp8_1x128", return_parts=True)
    w = quantize_scaled(lin.weight.detach(), "fp8_128x128", return_parts=True)
    assert torch.equal(y, scaled_matmul(a, w, "deepseek-fp8"))
    with emulate(model, get_recipe("deepseek-fp8").with_fidelity("fast")):
        yf = model.model.layers[0].mlp.gate_proj(x)
    assert torch.allclose(yf, y, rtol=1e-2, atol=1e-4)


def test_shared_inputs_are_quantized_once(monkeypatch) -> None:
    """q/k/v (and gate/up) read one tensor: it is quantized once per forward, and the logits
    and every telemetry record equal those of quantizing it for each layer."""
    from precisim.emulation import gemm as gemm_mod
    from precisim.emulation import patch as patch_mod

    model = _llama()
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(1))
    calls = []
    real = patch_mod.quantize_operand

    def counted(*a, **k):
        calls.append(k.get("where"))
        return real(*a, **k)

    monkeypatch.setattr(patch_mod, "quantize_operand", counted)
    with torch.no_grad(), emulate(model, "mxfp8") as em:
        once = model(ids).logits
    inputs = [w for w in calls if w is not None and w[1] == "input"]
    n_linear = len(em.plan.emulated("linear"))
    assert len(inputs) == n_linear - 2 * len(model.model.layers) - len(model.model.layers)
    records = em.telemetry.records()

    def every_time(self, name, x, spec):  # the reuse switched off
        return gemm_mod.quantize_operand(x, spec.input, need_parts=gemm_mod.needs_parts(spec),
                                         telemetry=self.telemetry, where=(name, "input"))

    monkeypatch.setattr(patch_mod.Emulation, "_input", every_time)
    with torch.no_grad(), emulate(model, "mxfp8") as em2:
        each = model(ids).logits
    assert torch.equal(once, each)
    assert records == em2.telemetry.records()
