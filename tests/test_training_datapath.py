"""The backward of the op kinds softmax, normalization, activation, glu and residual
(docs/training.md section 1c): the emulated unit's value forward, the module's own backward on
the unquantized inputs (straight through the unit's roundings), recorded by ``GradProbe``."""

from __future__ import annotations

import pytest
import torch
from precisim.emulation import Recipe, emulate
from precisim.emulation.training import GradProbe, seed_scope
from test_training import _tiny_llama
from torch import nn

KINDS = ("softmax", "normalization", "activation", "glu", "residual")
#: low-precision units: their forward differs from PyTorch's, their backward must not
LOW = {"softmax": "softmax-bf16", "normalization": "rmsnorm-bf16-seq",
       "activation": "silu-table64", "glu": "bf16", "residual": "bf16"}
#: full precision: correctly rounded fp32 units, fp32 roundings of the product and the sum
FULL = {"softmax": "softmax-exact", "normalization": "rmsnorm", "activation": "silu",
        "glu": "fp32", "residual": "fp32"}


def _grads(model: nn.Module, recipe: Recipe | None, ids: torch.Tensor
           ) -> tuple[dict[str, torch.Tensor], GradProbe]:
    model.zero_grad()
    with GradProbe() as probe:
        if recipe is None:
            model(ids, labels=ids).loss.backward()
        else:
            with emulate(model, recipe, warn=False):
                model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, probe


# -- one op: the gradient is the module's own backward, close to a float64 reference -----------

def _f64_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("unit", ["rmsnorm", "rmsnorm-bf16-seq", "rmsnorm-warp-newton"])
def test_norm_backward_is_pytorchs_and_near_float64(unit):
    """x and weight gradients of an emulated RMSNorm: bit for bit the module's own backward
    at the unquantized input (whatever the unit's forward rounding), and within fp32 error of
    float64 autograd of the exact RMSNorm (rtol 1e-5 of the largest component)."""
    model = _tiny_llama()
    norm = model.model.norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_()
    g = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    with emulate(norm, Recipe("n", normalization=unit), warn=False):
        y = norm(x)
    (y * g).sum().backward()
    gx, gw = x.grad.clone(), norm.weight.grad.clone()
    x.grad, norm.weight.grad = None, None
    (norm(x) * g).sum().backward()  # plain PyTorch
    assert torch.equal(gx, x.grad) and torch.equal(gw, norm.weight.grad)
    xd = x.detach().double().requires_grad_()
    wd = norm.weight.detach().double().requires_grad_()
    (_f64_rmsnorm(xd, wd, norm.variance_epsilon) * g.double()).sum().backward()
    for got, ref in ((gx, xd.grad), (gw, wd.grad)):
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, float(err)


@pytest.mark.parametrize("unit", ["silu", "silu-table16", "silu-sfu-fast"])
def test_activation_backward_is_pytorchs_and_near_float64(unit):
    """SiLU's input gradient: PyTorch's bit for bit, within 1e-6 of float64 autograd; the
    table unit's forward is far from SiLU (its backward is not the table's slope)."""
    act = nn.SiLU()
    x = torch.linspace(-9, 9, 401).requires_grad_()
    with emulate(act, Recipe("a", activation=unit), warn=False):
        y = act(x)
    y.sum().backward()
    got = x.grad.clone()
    x.grad = None
    torch.nn.functional.silu(x).sum().backward()
    assert torch.equal(got, x.grad)
    xd = x.detach().double().requires_grad_()
    torch.nn.functional.silu(xd).sum().backward()
    assert (got.double() - xd.grad).abs().max() < 1e-6


def test_softmax_glu_residual_backward_near_float64():
    """Under the low-precision softmax, glu and residual units at once, every parameter
    gradient of a tiny Llama is within 1e-4 (relative to its largest component) of float64
    autograd of the plain model on the same input: the backward is PyTorch's, evaluated at
    the emulated forward's activations."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    rec = Recipe("s", softmax="softmax-exact", glu="fp32", residual="fp32")
    model = _tiny_llama()
    got, probe = _grads(model, rec, ids)
    ref64 = _tiny_llama().double()
    ref, _ = _grads(ref64, None, ids)
    for n, g in got.items():
        err = (g.double() - ref[n]).abs().max() / ref[n].abs().max()
        assert err < 1e-4, (n, float(err))
    assert {k for _, k in probe.straight_through} == {"softmax", "glu", "residual"}


# -- a model: every parameter gets its gradient, recorded as straight through ------------------

def test_every_parameter_gets_a_gradient_under_the_datapath_kinds():
    """On main each of these kinds cut autograd's graph silently: softmax left q_proj and
    k_proj without gradients, normalization 20 parameters, activation gate_proj, glu
    gate_proj and up_proj, residual 19. Now every parameter has one, close to plain
    PyTorch's (cosine > 0.99 under bf16-class units), and GradProbe names every emulated
    module whose backward ran straight through."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    model = _tiny_llama()
    ref, none = _grads(model, None, ids)
    assert none.straight_through == {}
    got, probe = _grads(model, Recipe("low", **LOW), ids)
    for n, g in got.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref[n].flatten(), 0)
        assert cos > 0.99, (n, float(cos))
    seen = {k: {m for m, kk in probe.straight_through if kk == k} for k in KINDS}
    assert seen["softmax"] == {f"model.layers.{i}.self_attn" for i in range(2)}
    assert seen["activation"] == {f"model.layers.{i}.mlp.act_fn" for i in range(2)}
    assert seen["glu"] == {f"model.layers.{i}.mlp" for i in range(2)}
    assert seen["residual"] == {f"model.layers.{i}" for i in range(2)}
    assert len(seen["normalization"]) == 5  # two per layer and the final norm
    # one backward call per module and forward; a decoder layer makes two residual adds
    assert all(v == (2 if k == "residual" else 1) for (_, k), v in probe.straight_through.items())


def _train(model: nn.Module, recipe: Recipe | None, batches: list) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step, ids in enumerate(batches):
        if recipe is None:
            model(ids, labels=ids).loss.backward()
        else:
            with emulate(model, recipe, warn=False), seed_scope(1, step):
                model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_glu_and_residual_at_fp32_train_bit_identically_to_pytorch():
    """glu and residual at fp32 (forward: IEEE 754's own product and sum) plus the backward
    rule: every weight of a tiny Llama bit-identical to plain PyTorch after 4 AdamW steps."""
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(s))
               for s in range(4)]
    ref, emu = _tiny_llama(), _tiny_llama()
    _train(ref, None, batches)
    _train(emu, Recipe("hp", glu="fp32", residual="fp32"), batches)
    for (n, p), (_, q) in zip(ref.named_parameters(), emu.named_parameters()):
        assert torch.equal(p, q), n


def test_all_five_kinds_at_full_precision_train_like_pytorch():
    """The five kinds with correctly rounded fp32 units: the forward differs from PyTorch's
    kernels by about one fp32 ulp (its softmax, rsqrt and SiLU are not correctly rounded), so
    the weights are not bit-identical; after 4 AdamW steps every weight is within 1e-4 of
    plain PyTorch's (the steps themselves are 1e-2), and with glu and residual alone they are
    bit-identical (previous test)."""
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(s))
               for s in range(4)]
    ref, emu = _tiny_llama(), _tiny_llama()
    _train(ref, None, batches)
    _train(emu, Recipe("full", **FULL), batches)
    worst = max(float((p - q).abs().max())
                for p, q in zip(ref.parameters(), emu.parameters()))
    assert 0 < worst < 1e-4, worst
