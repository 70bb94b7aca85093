"""The FP8 attention preset and ``precisim train --attention-backward`` (docs/training.md
sections 1b, 5 and 8)."""

from __future__ import annotations

import pytest
import torch
from precisim.emulation import GemmSpec, Recipe, TensorSpec, emulate, get_recipe
from precisim.emulation.training import GradProbe, seed_scope
from precisim.emulation.training.attention import ATTN_GEMMS
from precisim.eval.train import TrainConfig, TrainError, attention_backward_spec
from test_train_run import _cfg, setup  # noqa: F401  (the fixture)


def _tiny_llama() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg)


def _grads(model: torch.nn.Module, recipe: Recipe, ids: torch.Tensor) -> dict:
    model.zero_grad()
    with emulate(model, recipe, warn=False), seed_scope(3, 0):
        model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_fp8_attention_preset_quantizes_the_four_backward_gemms():
    """fp8-attention-train = fp8-tensor-train's linear roles plus FP8 attention: the four
    backward GEMMs are emulated (GradProbe sees dq, dk, dp, dv with a noise ratio between 0
    and 0.3: E5M2 / E4M3 per-tensor), the q-projection gradient differs from
    fp8-tensor-train's (eager attention backward) yet keeps a cosine above 0.95 to it."""
    r = get_recipe("fp8-attention-train")
    base = get_recipe("fp8-tensor-train")
    assert r.train_linear == base.train_linear
    e4, e5 = TensorSpec("fp8_tensor"), TensorSpec("fp8_e5m2_tensor")
    spec = r.train_attention
    assert spec.dp == GemmSpec(e5, e4) and spec.dv == GemmSpec(e4, e5)
    assert spec.dq == spec.dk == GemmSpec(e5, e4) and spec.forward.qk == GemmSpec(e4, e4)
    assert Recipe.from_yaml(r.to_yaml()) == r and Recipe.from_json(r.to_json()) == r
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    model = _tiny_llama()
    with GradProbe() as probe:
        got = _grads(model, r, ids)
    stats = probe.by_gemm()
    assert set(ATTN_GEMMS) <= set(stats)
    assert all(0 < stats[g]["noise_ratio"] < 0.3 for g in ATTN_GEMMS), stats
    ref = _grads(model, base, ids)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.isfinite(g).all() for g in got.values())
    assert not torch.equal(got[w], ref[w])
    assert torch.nn.functional.cosine_similarity(got[w].flatten(), ref[w].flatten(), 0) > 0.95


def test_attention_backward_spec_and_bad_values():
    g = GemmSpec.parse("mxfp8", "x")
    s = attention_backward_spec("mxfp8")
    assert s.forward is None and all(getattr(s, k) == g for k in ATTN_GEMMS)
    assert all(getattr(attention_backward_spec("high"), k) is None for k in ATTN_GEMMS)
    assert TrainConfig(recipe="bf16-train", attention_backward="mxfp8").name \
        == "bf16-train+attn-mxfp8"
    for bad in ("fp9", "", 3):
        with pytest.raises(TrainError, match=f"attention_backward={bad!r}"):
            TrainConfig(attention_backward=bad)


def test_attention_backward_changes_training_and_resumes(setup):  # noqa: F811
    """A run with --attention-backward fp8_tensor differs from the plain one, is named
    <recipe>+attn-fp8_tensor in the store, and a killed run resumes bit for bit."""
    from precisim.eval.store import RunStore

    tok, data, tmp = setup
    plain = _cfg(data, steps=4, probe_every=0, checkpoint_every=2)
    cfg = _cfg(data, steps=4, probe_every=0, checkpoint_every=2,
               attention_backward="fp8_tensor")
    a = train_(plain, tmp / "p", tok)
    b = train_(cfg, tmp / "a", tok)
    assert a["loss"][0] == b["loss"][0] and a["loss"][1:] != b["loss"][1:]
    train_(cfg, tmp / "k", tok, stop_after=3)
    with RunStore(tmp / "runs.sqlite") as store:
        c = train_(cfg, tmp / "k", tok, store=store)
        assert store.has("train/mxfp8-floor-train+attn-fp8_tensor/seed1")
    assert c["loss"] == b["loss"] and c["val"] == b["val"]


def train_(cfg, out, tok, **kw):
    from precisim.eval.train import train

    return train(cfg, out=out, tokenizer=tok, **kw)


def test_checkpoint_from_before_a_new_field_still_resumes(setup):  # noqa: F811
    """A checkpoint whose config lacks a field added later (attention_backward) resumes when
    the field has its default; any other difference is still refused."""
    tok, data, tmp = setup
    cfg = _cfg(data, steps=2, probe_every=0, checkpoint_every=1)
    train_(cfg, tmp / "o", tok, stop_after=1)
    path = tmp / "o" / "ckpt.pt"
    state = torch.load(path, weights_only=False)
    del state["config"]["attention_backward"]
    torch.save(state, path)
    assert train_(cfg, tmp / "o", tok)["steps_done"] == 2
    with pytest.raises(TrainError, match="another configuration"):
        train_(_cfg(data, steps=2, probe_every=0, attention_backward="mxfp8"), tmp / "o", tok)


def test_cli_attention_backward(setup, tiny_checkpoint, capsys):  # noqa: F811
    from precisim.eval.cli import main

    _, data, tmp = setup
    rc = main(["train", "--recipe", "bf16-train", "--attention-backward", "fp8_tensor", "--steps",
               "1", "--data", data, "--tokenizer", tiny_checkpoint, "--layers", "1",
               "--hidden", "64", "--batch", "2", "--seq", "16", "--val-every", "1",
               "--val-batches", "1", "--out", str(tmp / "cli")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "| bf16-train+attn-fp8_tensor |" in out
    assert (tmp / "cli" / "bf16-train+attn-fp8_tensor" / "seed0" / "ckpt.pt").exists()
    rc = main(["train", "--recipe", "bf16-train", "--attention-backward", "fp9", "--out",
               str(tmp / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error:")
    assert "attention_backward='fp9'" in err and "accepted 'high'" in err
