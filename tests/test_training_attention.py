"""Backward GEMMs of the attention matmuls under their own formats (docs/training.md s. 1b)."""

from __future__ import annotations

import pytest
import torch
from precisim.emulation import GemmSpec, Recipe, TensorSpec, emulate
from precisim.emulation.opkinds import EmulationError
from precisim.emulation.recipe import RecipeError
from precisim.emulation.specs import AttentionSpec
from precisim.emulation.training import (
    AttentionTrainingSpec,
    GradProbe,
    SRSeedError,
    seed_scope,
)
from precisim.emulation.training.attention import ATTN_GEMMS, attention_backward
from precisim.formats.scaling import get_scaled_format, quantize_scaled

HIGH = AttentionTrainingSpec(None, None, None, None, None)
MX = GemmSpec(TensorSpec("mxfp8"), TensorSpec("mxfp8"))


def _tiny_llama(seed: int = 0, head_dim: int = 16) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=4 * head_dim,
                                   intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg)


def _grads(model: torch.nn.Module, recipe: Recipe | None, ids: torch.Tensor) -> dict:
    model.zero_grad()
    if recipe is None:
        model(ids, labels=ids).loss.backward()
    else:
        with emulate(model, recipe, warn=False), seed_scope(3, 0):
            model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_high_precision_roles_equal_pytorch_attention():
    """Every backward role in high precision (GQA 4:2 heads, causal mask): every parameter's
    gradient equals plain PyTorch's within fp32 tolerance (rtol 1e-4, atol 1e-6 of a gradient
    whose largest entries are ~1e-1): the GEMM-level backward is the eager one re-associated."""
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 24))
    model = _tiny_llama()
    ref = _grads(model, None, ids)
    got = _grads(model, Recipe("hp", train_attention=HIGH), ids)
    for n, g in ref.items():
        assert torch.allclose(got[n], g, rtol=1e-4, atol=1e-6), n
    # the new backward ran (the q/k/v projections' gradients are not bit-identical)
    assert any(not torch.equal(got[n], ref[n]) for n in ref if "q_proj" in n)


def _qkv(b: int = 2, h: int = 4, hkv: int = 2, n: int = 32, d: int = 32) -> tuple:
    torch.manual_seed(0)

    def r(*s: int) -> torch.Tensor:  # rows of different magnitudes: blocks along each axis
        return torch.randn(*s) * 2.0 ** torch.randint(-3, 4, (*s[:-1], 1))

    mask = torch.triu(torch.full((n, n), float("-inf")), 1)[None, None].expand(b, 1, n, n)
    return r(b, h, n, d), r(b, hkv, n, d), r(b, hkv, n, d), mask, r(b, n, h, d)


def mx_mm(a: torch.Tensor, b: torch.Tensor, on: bool) -> torch.Tensor:
    """a @ b^T in fp64 of the fp32 operands (quantized to MXFP8 by hand along the last axis,
    the GEMM's reduction axis, when ``on``), rounded to fp32."""
    if on:
        f = get_scaled_format("mxfp8", axis=-1)
        a, b = (quantize_scaled(t.contiguous(), f) for t in (a, b))
    return (a.double() @ b.double().transpose(-1, -2)).float()


def _hand(role: str, q, k, v, mask, scaling, d_out):  # noqa: ANN001, ANN202
    """dQ, dK, dV with only ``role``'s operands quantized to MXFP8 by hand, each along that
    GEMM's reduction axis (the last axis of the operand as the GEMM reads it)."""
    g = q.shape[1] // k.shape[1]
    kr, vr = (t.repeat_interleave(g, dim=1) for t in (k, v))
    p = torch.softmax(q @ kr.transpose(-1, -2) * scaling + mask, -1)  # fp32, as recomputed
    do = d_out.transpose(1, 2)
    t = lambda x: x.transpose(-1, -2)  # noqa: E731
    dv = mx_mm(t(p), t(do), role == "dv")
    dp = mx_mm(do, vr, role == "dp")
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = mx_mm(ds, t(kr), role == "dq") * scaling
    dk = mx_mm(t(ds), t(q), role == "dk") * scaling
    b, h, n, d = dk.shape
    fold = lambda t: t.reshape(b, h // g, g, n, d).sum(2)  # noqa: E731
    return dq, fold(dk), fold(dv)


@pytest.mark.parametrize("role", ATTN_GEMMS)
def test_each_role_is_the_hand_computation(role):
    """MXFP8 in one role, the others high: dQ, dK, dV equal the hand computation with that
    GEMM's operands quantized along its own reduction axis (rtol/atol 1e-4: fp32 vs fp64
    accumulation; softmax and its backward elementwise in fp32 as specified), and differ
    from the all-high gradients (the role is in effect)."""
    q, k, v, mask, d_out = _qkv()
    scaling = 32 ** -0.5
    spec = AttentionTrainingSpec(None, **{r: MX if r == role else None for r in ATTN_GEMMS})
    got = attention_backward(spec, q, k, v, mask, scaling, d_out, name="a")
    high = attention_backward(HIGH, q, k, v, mask, scaling, d_out, name="a")
    hand = _hand(role, q, k, v, mask, scaling, d_out)
    for gt, hd in zip(got, hand):
        assert torch.allclose(gt, hd, rtol=1e-4, atol=1e-4)
    changed = {"dq": (0,), "dk": (1,), "dv": (2,), "dp": (0, 1)}[role]
    for i in changed:
        assert not torch.allclose(got[i], high[i], rtol=1e-4, atol=1e-4)


def test_matrix_unit_roles_run_batched():
    """Every role on a bit-exact matrix unit (h100-bf16, bf16 operands) over (b, h) batches:
    gradients within bf16 error of the all-high ones (relative norm error in (0, 1e-2))."""
    q, k, v, mask, d_out = _qkv(n=16, d=16)
    u = GemmSpec(TensorSpec("bf16"), TensorSpec("bf16"), unit="h100-bf16")
    got = attention_backward(AttentionTrainingSpec(None, u, u, u, u), q, k, v, mask, 0.25,
                             d_out, name="a")
    high = attention_backward(HIGH, q, k, v, mask, 0.25, d_out, name="a")
    for g, h in zip(got, high):
        assert 0 < float((g - h).norm() / h.norm()) < 1e-2


def test_recipe_without_new_roles_is_unchanged(monkeypatch):
    """Without train_attention the eager high-precision backward (AttentionGrad) runs and the
    new code is never entered: gradients bit-identical to plain PyTorch under an fp32
    attention forward, and with MXFP8 attention the graph node is AttentionGrad."""
    import precisim.emulation.training.attention as ta

    def boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("train_attention code entered")

    monkeypatch.setattr(ta, "attach_attention_train_grad", boom)
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 16))
    model = _tiny_llama()
    fp32 = GemmSpec(TensorSpec("fp32"), TensorSpec("fp32"))
    ref = _grads(model, None, ids)
    got = _grads(model, Recipe("a", attention=AttentionSpec(fp32, fp32)), ids)
    for n, g in ref.items():
        assert torch.equal(got[n], g), n
    _grads(model, Recipe("m", attention=AttentionSpec(MX, MX)), ids)  # runs, no boom


def test_mxfp8_roles_train_and_sr_replays():
    """All four roles MXFP8 with SR on dS in a tiny Llama: the gradients differ from the
    all-high ones but stay close (cosine > 0.99), and replay bit for bit with the same seed."""
    sr = GemmSpec(TensorSpec("mxfp8", rounding="sr", sr_bits=16), TensorSpec("mxfp8"))
    spec = AttentionTrainingSpec(AttentionSpec(MX, MX), dq=sr, dk=MX, dp=MX, dv=MX)
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (2, 32))
    model = _tiny_llama(head_dim=32)
    high = _grads(model, Recipe("h", train_attention=AttentionTrainingSpec(
        AttentionSpec(MX, MX), None, None, None, None)), ids)
    a = _grads(model, Recipe("t", train_attention=spec), ids)
    b = _grads(model, Recipe("t", train_attention=spec), ids)
    for n in high:
        assert torch.equal(a[n], b[n]), n
    with GradProbe() as probe:
        c = _grads(model, Recipe("t", train_attention=spec), ids)
    assert set(probe.by_gemm()) == set(ATTN_GEMMS)
    assert all(0 < s["noise_ratio"] < 0.2 for s in probe.by_gemm().values())
    assert all(torch.equal(a[n], c[n]) for n in a)  # probing changes nothing
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[w], high[w])
    cos = torch.nn.functional.cosine_similarity(a[w].flatten(), high[w].flatten(), dim=0)
    assert cos > 0.99


def test_forward_is_the_attention_kinds():
    """train_attention's forward is the attention kind's under the same AttentionSpec, bit for
    bit (loss of a tiny Llama under MXFP8 QK^T and PV)."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    model = _tiny_llama(head_dim=32)
    fwd = AttentionSpec(MX, MX)
    losses = []
    for r in (Recipe("a", attention=fwd),
              Recipe("t", train_attention=AttentionTrainingSpec(fwd, MX, MX, MX, MX))):
        with torch.no_grad(), emulate(model, r, warn=False):
            losses.append(model(ids, labels=ids).loss)
    assert torch.equal(*losses)
    with torch.no_grad():
        assert not torch.equal(model(ids, labels=ids).loss, losses[0])  # the spec is in effect


def test_bad_specs_give_clear_errors():
    with pytest.raises(RecipeError, match="'dv' GEMM has no spec"):
        AttentionTrainingSpec(None, None, None, None)
    with pytest.raises(RecipeError, match="'dp' GEMM has no spec"):
        Recipe.from_dict({"name": "x", "train_attention": {"dq": "high", "dk": "high",
                                                           "dv": "high"}})
    with pytest.raises(RecipeError, match="dgrad"):
        AttentionTrainingSpec.parse({"dq": "high", "dk": "high", "dp": "high", "dv": "high",
                                     "dgrad": "high"})
    # mxfp8 blocks of 32 along a head dimension of 16 (dp's reduction axis)
    bad = AttentionTrainingSpec(None, None, None, MX, None)
    with pytest.raises(RecipeError, match=r"dp input.*blocks of 32.*16 elements"):
        emulate(_tiny_llama(head_dim=16), Recipe("b", train_attention=bad), warn=False).apply()
    # stochastic rounding without a seed source
    sr = GemmSpec(TensorSpec("bf16", rounding="sr"), None)
    q, k, v, mask, d_out = _qkv()
    with pytest.raises(SRSeedError, match=r"'dv.input' uses stochastic rounding"):
        attention_backward(AttentionTrainingSpec(None, None, None, None, sr), q, k, v, mask,
                           0.25, d_out, name="a")
    # a call the GEMM-level backward does not model (dropout while training)
    model = _tiny_llama()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    with emulate(model, Recipe("d", train_attention=HIGH), warn=False), \
            pytest.raises(EmulationError, match="dropout"):
        model(torch.randint(0, 128, (1, 8))).logits.sum().backward()


def test_yaml_round_trip():
    d = {"forward": {"qk": "mxfp8", "pv": "mxfp8"}, "dq": "mxfp8", "dk": "high",
         "dp": {"input": "mxfp8", "weight": "mxfp8"}, "dv": "high"}
    s = AttentionTrainingSpec.parse(d)
    assert s.dk is None and s.dq is not None and s.forward is not None
    assert AttentionTrainingSpec.parse(s.to_dict()) == s
    assert "dq[" in s.describe()


def test_train_attention_outranks_attention_and_rules_select_layers():
    """A recipe naming train_attention plans it on every attention module (the attention
    spec no longer applies there); a rule ``train_attention: null`` keeps a layer in high
    precision, and that layer keeps the eager backward (bit-identical q/k/v grads)."""
    from precisim.emulation.patch import plan

    r = Recipe.from_dict({"name": "mix", "attention": "mxfp8",
                          "train_attention": {"dq": "mxfp8", "dk": "high", "dp": "high",
                                              "dv": "high"},
                          "rules": [{"match": "model.layers.1.*", "train_attention": None}]})
    model = _tiny_llama(head_dim=32)
    ops = {e.module: e for e in plan(model, r, warn=False).entries if "self_attn" in e.module
           and not e.module.endswith("proj")}
    assert {e.op for e in ops.values()} == {"train_attention"}
    assert ops["model.layers.0.self_attn"].emulated
    assert not ops["model.layers.1.self_attn"].emulated
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    ref = _grads(model, None, ids)
    got = _grads(model, r, ids)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           ref["model.layers.0.self_attn.q_proj.weight"])
    for n in ref:  # the layer above backpropagates first, through the eager backward
        if n.startswith("model.layers.1."):
            assert torch.equal(got[n], ref[n]), n
