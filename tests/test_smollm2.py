"""The real test model, SmolLM2-135M-Instruct: the plan covers it, emulation runs and restores."""

from __future__ import annotations

import pytest
import torch
from precisim.emulation import emulate, plan

# Loading the GGUF and quantizing 135M weights takes minutes on a busy 2-core machine: these run
# with the slow suite (`python -m pytest -m slow tests/test_smollm2.py`).
pytestmark = pytest.mark.slow

WIKI_LIKE = ("The tower is 324 metres tall, about the same height as an 81-storey building, "
             "and the tallest structure in Paris.")


def test_plan_covers_every_linear_and_both_attention_matmuls(smollm2) -> None:
    model, _ = smollm2
    n_layers = model.config.num_hidden_layers
    p = plan(model, "mxfp4")
    lin = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    emu_lin = {e.module for e in p.emulated("linear")}
    assert len(emu_lin) == 7 * n_layers == 210
    # every linear layer is emulated except the (tied) lm_head, which stays high precision
    assert lin - emu_lin == {"lm_head"}
    attn = p.emulated("attention")
    assert len(attn) == n_layers
    for e in attn:
        assert not e.spec.qk.is_identity and not e.spec.pv.is_identity


def test_forward_and_restore_on_smollm2(smollm2) -> None:
    model, tok = smollm2
    ids = tok(WIKI_LIKE, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        for recipe in ("mxfp8", "nvfp4"):
            with emulate(model, recipe) as em:
                out = model(ids).logits
            assert torch.isfinite(out).all()
            assert not torch.equal(out, ref)
            # telemetry saw every linear layer's input and both attention matmuls per layer
            mods = {r["module"] for r in em.telemetry.records()}
            assert sum(m.endswith(".qk") for m in mods) == model.config.num_hidden_layers
            assert sum(m.endswith(".pv") for m in mods) == model.config.num_hidden_layers
            # the next token is still mostly the same as the reference under 8 bits
            if recipe == "mxfp8":
                agree = (out.argmax(-1) == ref.argmax(-1)).float().mean()
                assert agree > 0.7
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("recipe", ["mxfp4"])
def test_generate_on_smollm2(smollm2, recipe: str) -> None:
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad(), emulate(model, recipe):
        out = model.generate(ids, max_new_tokens=5, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 5


def test_softmax_norm_activation_units_on_smollm2(smollm2) -> None:
    """The op kinds beyond the GEMM (docs/arithmetic.md section 7.8) on the real model: every
    attention softmax, RMSNorm and SiLU is planned; with exact units the logits agree with the
    unpatched model within 2e-6 x max|logit| (fp32); bf16 units move them; restore is exact."""
    from precisim.emulation import Recipe

    model, tok = smollm2
    ids = tok(WIKI_LIKE, return_tensors="pt").input_ids
    n = model.config.num_hidden_layers
    exact = Recipe("exact-units", softmax="softmax-exact", normalization="rmsnorm",
                   activation="silu")
    p = plan(model, exact)
    assert (len(p.emulated("softmax")), len(p.emulated("normalization")),
            len(p.emulated("activation"))) == (n, 2 * n + 1, n)
    with torch.no_grad():
        ref = model(ids).logits
        with emulate(model, exact):
            y = model(ids).logits
        assert (y - ref).abs().max() <= 2e-6 * ref.abs().max()
        with emulate(model, Recipe("bf16-units", softmax="softmax-bf16",
                                   normalization="rmsnorm-bf16-seq", activation="silu-table16")):
            z = model(ids).logits
        assert (z - ref).abs().max() > 1e-3
        assert (z.argmax(-1) == ref.argmax(-1)).float().mean() > 0.5
        assert torch.equal(model(ids).logits, ref)
