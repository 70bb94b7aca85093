"""The chunked emulated attention (emulation/attention.py) against the generic path (the
model's own eager attention function with its two matmuls routed through the emulated GEMM)."""

from __future__ import annotations

import pytest
import torch
from precisim.emulation import Recipe, emulate, get_recipe
from precisim.emulation import attention as attn_mod
from precisim.emulation import patch as patch_mod
from precisim.emulation.attention import _key_ends, chunkable, is_standard_eager

transformers = pytest.importorskip("transformers")


def _model(arch: str, dtype: torch.dtype = torch.float32):
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg = (transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config)(**kw)
    torch.manual_seed(0)
    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    return cls(cfg).eval().to(dtype)


IDS = torch.randint(0, 96, (2, 150), generator=torch.Generator().manual_seed(3))

RECIPES = {
    "mxfp8": get_recipe("mxfp8"),
    "nvfp4": get_recipe("nvfp4"),
    "bf16": get_recipe("bf16"),
    "e3m2-elementwise": Recipe.from_dict({"name": "e", "attention": {"qk": "e4m3",
                                                                     "pv": "e3m2"}}),
    "group16-int8": Recipe.from_dict({"name": "g", "attention": {
        "qk": "e4m3", "pv": {"input": {"format": "int8", "scaling": "group:16",
                                       "scale_rule": "amax"}, "weight": "e4m3"}}}),
    "per-token-p": Recipe.from_dict({"name": "t", "attention": {
        "qk": "mxfp8", "pv": {"input": {"format": "e4m3", "scaling": "token"},
                              "weight": "mxfp8"}}}),
}


def _run(model, recipe, *, generic: bool, mp: pytest.MonkeyPatch, mask=None, ids=IDS):
    calls = []
    real = patch_mod.chunked_attention

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    with mp.context() as m:
        m.setattr(attn_mod, "CHUNK_BYTES", 1)  # the smallest chunks (16 rows): many of them
        m.setattr(patch_mod, "chunked_attention", counting)
        if generic:
            m.setattr(patch_mod, "chunkable", lambda spec: None)
        with torch.no_grad(), emulate(model, recipe) as em:
            out = model(ids, attention_mask=mask, use_cache=False).logits
    return out, len(calls), em.telemetry.records()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_chunked_attention_equals_the_generic_path(arch: str, name: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(arch)
    fast, n_fast, tel = _run(model, RECIPES[name], generic=False, mp=monkeypatch)
    slow, n_slow, _ = _run(model, RECIPES[name], generic=True, mp=monkeypatch)
    assert n_fast == 2 and n_slow == 0  # one call per layer, and the generic path did not use it
    # the same computation: bit-identical (fp32 products and sums in the same order; the
    # skipped keys only add exact zeros)
    assert torch.equal(fast, slow)
    # the reference is not trivially equal: the attention formats change the logits
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
    assert not torch.equal(fast, ref)
    roles = {(r["module"].rsplit(".", 1)[-1], r["role"]) for r in tel}
    assert {("qk", "input"), ("qk", "weight"), ("pv", "input"), ("pv", "weight")} <= roles


def test_chunked_attention_with_left_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Padded rows are fully masked (uniform softmax over every key): those chunks keep every
    key, the others still skip the masked triangle; same result as the generic path."""
    model = _model("llama")
    mask = torch.ones_like(IDS)
    mask[1, :37] = 0
    fast, n, _ = _run(model, get_recipe("mxfp8"), generic=False, mp=monkeypatch, mask=mask)
    slow, _, _ = _run(model, get_recipe("mxfp8"), generic=True, mp=monkeypatch, mask=mask)
    assert n == 2
    assert torch.equal(fast, slow)


def test_half_precision_chunked_equals_generic(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("llama", torch.bfloat16)
    fast, n, _ = _run(model, get_recipe("mxfp8"), generic=False, mp=monkeypatch)
    slow, _, _ = _run(model, get_recipe("mxfp8"), generic=True, mp=monkeypatch)
    assert n == 2 and fast.dtype == torch.bfloat16
    assert torch.equal(fast, slow)


def test_key_ends_skip_the_causal_triangle() -> None:
    n = 100
    causal = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
    assert _key_ends(causal, n, n, 16, 32) == [32, 32, 64, 64, 96, 96, 100]
    assert _key_ends(causal, n, n, 16, 1) == [16, 32, 48, 64, 80, 96, 100]
    assert _key_ends(None, n, n, 16, 32) == [n] * 7
    fully_masked = causal.clone()
    fully_masked[..., 20, :] = torch.finfo(torch.float32).min
    assert _key_ends(fully_masked, n, n, 16, 1)[1] == n


def test_when_the_chunked_path_does_not_apply() -> None:
    # P per-tensor scaled (its amax spans every row), stochastic rounding, a matrix unit
    assert chunkable(get_recipe("fp8-e4m3").attention) is None
    sr = Recipe.from_dict({"name": "sr", "attention": {
        "qk": "e4m3", "pv": {"input": {"format": "e4m3", "rounding": "sr", "sr_bits": 8,
                                       "seed": 0}, "weight": "e4m3"}}})
    assert chunkable(sr.attention) is None
    unit = Recipe.from_dict({"name": "u", "attention": {
        "qk": {"input": "e4m3", "weight": "e4m3", "unit": "h100-e4m3"},
        "pv": {"input": "e4m3", "weight": "e4m3", "unit": "h100-e4m3"}}})
    assert chunkable(unit.attention) is None
    assert chunkable(get_recipe("mxfp8").attention) == 32
    assert chunkable(get_recipe("bf16").attention) == 1
    from transformers.models.gpt2 import modeling_gpt2
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    assert is_standard_eager(modeling_llama.eager_attention_forward)
    assert is_standard_eager(modeling_qwen2.eager_attention_forward)
    assert not is_standard_eager(modeling_gpt2.eager_attention_forward)


def test_generate_with_a_kv_cache_chunked_equals_generic(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Prefill and one-token decode steps (a growing cache, a (1, k) mask) agree too."""
    model = _model("llama")
    r = Recipe.from_dict({"name": "kv", "linear": "mxfp8", "attention": {
        "qk": "mxfp8", "pv": "mxfp8", "kv_cache": "e4m3"}})
    outs = []
    for generic in (False, True):
        with monkeypatch.context() as m:
            m.setattr(attn_mod, "CHUNK_BYTES", 1)
            if generic:
                m.setattr(patch_mod, "chunkable", lambda spec: None)
            with torch.no_grad(), emulate(model, r):
                g = model.generate(IDS[:1, :40], max_new_tokens=8, do_sample=False,
                                   pad_token_id=0, output_logits=True,
                                   return_dict_in_generate=True)
        outs.append(g)
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits):
        assert torch.equal(a, b)
