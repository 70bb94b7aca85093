"""Training attention with ALiBi, a soft cap and attention sinks (docs/training.md section 1b):
the GEMM-level backward against float64 autograd and, per quantized role, against a hand
computation with quantized operands."""

from __future__ import annotations

import math

import pytest
import torch
from precisim.emulation import Recipe, emulate
from precisim.emulation.opkinds import EmulationError
from precisim.emulation.training import AttentionTrainingSpec, seed_scope
from precisim.emulation.training.attention import (
    ATTN_GEMMS,
    attach_attention_train_grad,
    attention_grads,
)
from test_training_attention import HIGH, MX, mx_mm

#: the extras of one case: (ALiBi bias in the mask, soft cap, sinks)
CASES = {"alibi": (True, None, False), "softcap": (False, 5.0, False),
         "sinks": (False, None, True), "all": (True, 3.0, True)}


def _inputs(b: int = 2, h: int = 4, hkv: int = 2, n: int = 32, d: int = 32, *,
            alibi: bool = False, sinks: bool = False) -> tuple:
    """q, k, v, an additive causal mask (with ALiBi slopes when ``alibi``), d_out (b, q, h, d)
    and sinks (h,) or None; scores large enough that a soft cap of 3-5 bends them."""
    g = torch.Generator().manual_seed(0)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g) * 2.0 ** torch.randint(-1, 3, (*s[:-1], 1),
                                                                    generator=g)

    causal = torch.triu(torch.full((n, n), -math.inf), 1)
    mask = causal[None, None].expand(b, h, n, n).clone()
    if alibi:  # ALiBi: -slope_h * (i - j), slopes 2^(-8 (h+1) / H)
        dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).float()
        slopes = 2.0 ** (-8.0 * torch.arange(1, h + 1) / h)
        mask = mask + (-slopes[:, None, None] * dist)[None]
    s = torch.randn(h, generator=g) * 2 if sinks else None
    return r(b, h, n, d), r(b, hkv, n, d), r(b, hkv, n, d), mask, r(b, n, h, d), s


def _eager64(q, k, v, mask, scaling, softcap, sinks):  # noqa: ANN001, ANN202
    """The model's eager attention (Gemma-2's cap, gpt-oss's sinks) in float64; (b, q, h, d)."""
    g = q.shape[1] // k.shape[1]
    kr, vr = (t.repeat_interleave(g, dim=1) for t in (k, v))
    s = q @ kr.transpose(-1, -2) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s + mask
    if sinks is not None:
        col = sinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)
        p = torch.softmax(torch.cat([s, col], -1), -1)[..., :-1]
    else:
        p = torch.softmax(s, -1)
    return (p @ vr).transpose(1, 2)


def _autograd64(q, k, v, mask, scaling, softcap, sinks, d_out):  # noqa: ANN001, ANN202
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    sk = None if sinks is None else sinks.double().requires_grad_()
    out = _eager64(*leaves, mask.double(), scaling, softcap, sk)
    grads = torch.autograd.grad((out * d_out.double()).sum(), leaves + ([sk] if sk is not None
                                                                       else []))
    return list(grads) + ([None] if sk is None else [])


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """fp32 tolerance: |got - ref| <= 1e-4 |ref| + 1e-5 max|ref| elementwise."""
    ref = ref.double()
    return bool(((got.double() - ref).abs() <= 1e-4 * ref.abs() + 1e-5 * ref.abs().max()).all())


@pytest.mark.parametrize("case", CASES)
def test_high_roles_equal_float64_autograd(case):
    """All roles high: dQ, dK, dV (and the sinks' gradient) equal float64 autograd of the
    model's eager formula within fp32 tolerance (_close), and differ beyond it from the
    gradients without the extras (each extra is in effect)."""
    alibi, cap, sink = CASES[case]
    q, k, v, mask, d_out, sinks = _inputs(alibi=alibi, sinks=sink)
    scaling = 32 ** -0.5
    got = attention_grads(HIGH, q, k, v, mask, scaling, d_out, name="a", softcap=cap,
                          sinks=sinks)
    ref = _autograd64(q, k, v, mask, scaling, cap, sinks, d_out)
    for name, g, r in zip(("dq", "dk", "dv", "dsinks"), got, ref):
        if r is None:
            assert g is None
            continue
        assert g.dtype == torch.float32 and g.shape == r.shape, name
        assert _close(g, r), (name, float((g.double() - r).abs().max()))
    plain = _inputs()
    bare = _autograd64(q, k, v, plain[3], scaling, None, None, d_out)
    assert not _close(got.dq, bare[0])


def _hand(role: str, q, k, v, mask, scaling, d_out, softcap, sinks):  # noqa: ANN001, ANN202
    """dQ, dK, dV, dsinks with only ``role``'s operands quantized to MXFP8 by hand along that
    GEMM's reduction axis; P recomputed in fp32 with the cap and the sinks, the softmax
    backward and the cap's derivative 1 - tanh^2 in fp32, each GEMM in fp64 rounded to fp32."""
    g = q.shape[1] // k.shape[1]
    kr, vr = (t.repeat_interleave(g, dim=1) for t in (k, v))
    s = q @ kr.transpose(-1, -2) * scaling
    th = torch.tanh(s / softcap)
    s = th * softcap + mask
    col = sinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)
    full = torch.softmax(torch.cat([s, col], -1), -1)
    p, psink = full[..., :-1], full[..., -1]
    do = d_out.transpose(1, 2)
    t = lambda x: x.transpose(-1, -2)  # noqa: E731
    dv = mx_mm(t(p), t(do), role == "dv")
    dp = mx_mm(do, vr, role == "dp")
    rs = (dp * p).sum(-1, keepdim=True)
    ds = p * (dp - rs) * (1 - th * th)
    dq = mx_mm(ds, t(kr), role == "dq") * scaling
    dk = mx_mm(t(ds), t(q), role == "dk") * scaling
    b, h, n, d = dk.shape
    fold = lambda x: x.reshape(b, h // g, g, n, d).sum(2)  # noqa: E731
    return dq, fold(dk), fold(dv), -(psink * rs[..., 0]).sum((0, 2))


@pytest.mark.parametrize("role", ATTN_GEMMS)
def test_quantized_role_with_extras_is_the_hand_computation(role):
    """MXFP8 in one role with ALiBi, a soft cap and sinks together: the four gradients equal
    the hand computation with that GEMM's operands quantized (rtol/atol 1e-4: fp32 vs fp64
    accumulation), and the quantized role changes its gradients beyond that tolerance."""
    q, k, v, mask, d_out, sinks = _inputs(alibi=True, sinks=True)
    scaling, cap = 32 ** -0.5, 3.0
    spec = AttentionTrainingSpec(None, **{r: MX if r == role else None for r in ATTN_GEMMS})
    got = attention_grads(spec, q, k, v, mask, scaling, d_out, name="a", softcap=cap,
                          sinks=sinks)
    high = attention_grads(HIGH, q, k, v, mask, scaling, d_out, name="a", softcap=cap,
                           sinks=sinks)
    hand = _hand(role, q, k, v, mask, scaling, d_out, cap, sinks)
    for gt, hd in zip(got, hand):
        assert torch.allclose(gt, hd, rtol=1e-4, atol=1e-4)
    changed = {"dq": (0,), "dk": (1,), "dv": (2,), "dp": (0, 1, 3)}[role]
    for i in changed:
        assert not torch.allclose(got[i], high[i], rtol=1e-4, atol=1e-4)


def _tiny(kind: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=64, sliding_window=8)
    if kind == "gemma2":
        cfg = transformers.Gemma2Config(attn_logit_softcapping=0.1,
                                        final_logit_softcapping=None, **common)
    else:
        cfg = transformers.GptOssConfig(num_local_experts=2, num_experts_per_tok=1,
                                        layer_types=["sliding_attention", "full_attention"],
                                        **common)
    cfg._attn_implementation = "eager"
    model = {"gemma2": transformers.Gemma2ForCausalLM,
             "gpt_oss": transformers.GptOssForCausalLM}[kind](cfg).float()
    if kind == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0, 1)
    return model


def _grads(model: torch.nn.Module, recipe: Recipe | None, ids: torch.Tensor) -> dict:
    model.zero_grad()
    if recipe is None:
        model(ids, labels=ids).loss.backward()
    else:
        with emulate(model, recipe, warn=False), seed_scope(3, 0):
            model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["gemma2", "gpt_oss"])
def test_models_with_softcap_sinks_and_window_train(kind):
    """Tiny Gemma-2 (soft cap 0.1, where tanh bends its scores; sliding window 8) and gpt-oss
    (sinks, sliding window 8) train under train_attention with every role high: every
    parameter's gradient (the sinks' too) equals plain PyTorch's within fp32 tolerance (rtol
    1e-4, atol 1e-6), and the GEMM-level backward ran (q-projection gradients not
    bit-identical)."""
    model = _tiny(kind)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    ref = _grads(model, None, ids)
    got = _grads(model, Recipe("hp", train_attention=HIGH), ids)
    assert set(got) == set(ref)
    for n, g in ref.items():
        assert torch.allclose(got[n], g, rtol=1e-4, atol=1e-6), n
    if kind == "gpt_oss":
        assert all(float(got[n].abs().max()) > 1e-4 for n in got if n.endswith("sinks"))
    assert any(not torch.equal(got[n], ref[n]) for n in ref if "q_proj" in n)


def _eager32_sinks(sinks: torch.Tensor, mask: torch.Tensor, scaling: float):  # noqa: ANN202
    """An fp32 eager attention with gpt-oss's sinks as the model writes it: it reads the sinks
    tensor itself (not an argument), subtracts the row max of ``[scores, sink]``, and drops the
    sink column after the softmax; (b, q, h, d)."""
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g = q.shape[1] // k.shape[1]
        kr, vr = (t.repeat_interleave(g, dim=1) for t in (k, v))
        s = q @ kr.transpose(-1, -2) * scaling + mask
        col = sinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)
        full = torch.cat([s, col], -1)
        p = torch.softmax(full - full.amax(-1, keepdim=True), -1)[..., :-1]
        return (p @ vr).transpose(1, 2)

    return fn


def test_high_precision_attention_grad_gives_the_sinks_gradient():
    """The high-precision backward of the attention op kind (AttentionGrad, no train_attention:
    autograd of the model's eager attention recomputed on the unquantized q, k, v) gives the
    sinks their gradient (before, their .grad stayed None): dQ, dK, dV and dsinks equal
    float64 autograd of the plain eager formula with a sink column within fp32 tolerance
    (_close), and equal the GEMM-level backward of train_attention with every role high
    (attention_grads, dS_sink = -sum P_sink * rowsum(dP * P) in fp32) within the same
    tolerance."""
    from precisim.emulation.training.autograd import attach_attention_grad

    q, k, v, mask, d_out, sinks = _inputs(sinks=True)
    scaling = 32 ** -0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    fn = _eager32_sinks(leaves[3], mask, scaling)
    out = fn(*leaves[:3]).detach() + 0.25  # the emulated forward's value is not used
    y = attach_attention_grad(out, *leaves[:3], fn, leaves[3])
    assert torch.equal(y, out)
    (y * d_out).sum().backward()
    got = [t.grad for t in leaves]
    assert all(g is not None for g in got)
    ref = _autograd64(q, k, v, mask, scaling, None, sinks, d_out)
    emu = attention_grads(HIGH, q, k, v, mask, scaling, d_out, name="a", sinks=sinks)
    for name, g, r, e in zip(("dq", "dk", "dv", "dsinks"), got, ref, emu):
        assert g.dtype == torch.float32 and g.shape == r.shape, name
        assert _close(g, r), (name, float((g.double() - r).abs().max()))
        assert _close(g, e.double()), (name, float((g - e).abs().max()))
    assert float(got[3].abs().min()) > 1e-3  # every head's sink gradient is in play
    # only the sinks need a gradient: they get it, q, k, v none
    sk = sinks.clone().requires_grad_()
    y = attach_attention_grad(out, q, k, v, _eager32_sinks(sk, mask, scaling), sk)
    (y * d_out).sum().backward()
    assert torch.equal(sk.grad, got[3])


@pytest.mark.parametrize("attention", [{"qk": "fp32", "pv": "fp32"},
                                       {"datapath": "exact-online"}, {"qk": "mxfp8",
                                                                      "pv": "mxfp8"}])
def test_gpt_oss_sinks_train_under_inference_attention_recipes(attention):
    """Tiny gpt-oss (sinks, sliding window 8) under the attention op kind (no train_attention):
    the sinks get their gradient through the high-precision backward, bit-identical to plain
    PyTorch's under fp32 QK/PV (every parameter), within rtol 1e-4 / atol 1e-6 under the
    full-precision datapath (its forward differs in the last bits), and close (cosine >
    0.99) under MXFP8 QK/PV."""
    model = _tiny("gpt_oss")
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    ref = _grads(model, None, ids)
    got = _grads(model, Recipe("a", attention=attention), ids)
    assert set(got) == set(ref)
    sink_names = [n for n in ref if n.endswith("sinks")]
    assert len(sink_names) == 2
    for n, g in ref.items():
        if attention.get("qk") == "fp32":
            assert torch.equal(got[n], g), n
        elif "datapath" in attention:
            assert torch.allclose(got[n], g, rtol=1e-4, atol=1e-6), n
    for n in sink_names:
        cos = torch.nn.functional.cosine_similarity(got[n], ref[n], 0)
        assert cos > 0.99, (n, float(cos))


class _Attn(torch.nn.Module):
    training = False


def test_bad_extras_give_clear_errors():
    q, k, v, mask, d_out, sinks = _inputs(sinks=True)
    q.requires_grad_()
    out = torch.zeros(2, 32, 4, 32)

    def attach(m: torch.Tensor | None = mask, **kw):  # noqa: ANN003, ANN202
        return attach_attention_train_grad(out, q, k, v, _Attn(), m, (), {"scaling": 0.2, **kw},
                                           HIGH, "a", None)

    with pytest.raises(EmulationError, match=r"softcap=0\.0 is not valid.*> 0"):
        attach(softcap=0.0)
    with pytest.raises(EmulationError, match=r"softcap=inf is not valid"):
        attach(softcap=math.inf)
    with pytest.raises(EmulationError, match=r"sinks of shape \(3,\).*4 logits"):
        attach(s_aux=torch.zeros(3))
    with pytest.raises(EmulationError, match=r"finite logits"):
        attach(s_aux=torch.tensor([0.0, math.nan, 0.0, 0.0]))
    with pytest.raises(EmulationError, match=r"sink logits twice \('s_aux' and 'sinks'\)"):
        attach(s_aux=sinks, sinks=sinks)
    with pytest.raises(EmulationError, match=r"sliding_window=8 without an attention mask"):
        attach(None, sliding_window=8)
    with pytest.raises(ValueError, match=r"softcap=-1\.0 is not valid"):
        attention_grads(HIGH, q, k, v, mask, 0.2, d_out, name="a", softcap=-1.0)
    y = attach(sliding_window=8, softcap=4.0, s_aux=sinks)  # valid: runs
    assert y.requires_grad
