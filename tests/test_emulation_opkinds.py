"""Op kinds as a registry (emulation/opkinds.py): a kind registered here alone is planned,
emulated, reported and restored; modules are recognised by behaviour, not by class name;
unknown op kinds in recipes and rules raise the registry's error."""

from __future__ import annotations

import pytest
import torch
from precisim.emulation import (
    EmulationError,
    Recipe,
    RecipeError,
    Rule,
    TensorSpec,
    emulate,
    get_recipe,
    plan,
)
from precisim.emulation.gemm import quantize_operand
from precisim.emulation.opkinds import (
    OP_KINDS,
    Installer,
    OpKind,
    UnknownOpKindError,
    dispatches_attention,
    linear_layout,
)
from precisim.emulation.patch import EmulatedLinear
from precisim.formats import quantize
from precisim.formats.registry import UnknownNameError
from precisim.formats.scaling import quantize_scaled
from torch import nn

transformers = pytest.importorskip("transformers")
# the function transformers' attention interface falls back to, defined in this module: the
# evidence (with ALL_ATTENTION_FUNCTIONS in Mixer.forward) that Mixer dispatches through it
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaAttention,
    eager_attention_forward,
)

IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms initialised to ones would hide a wrong scale
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 2.0)
    return model


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _snapshot(model):
    return ([(n, type(m), dict(m._forward_hooks), dict(m._forward_pre_hooks))
             for n, m in model.named_modules()],
            [(n, id(p), p.detach().clone()) for n, p in model.named_parameters()],
            model.config._attn_implementation)


def _same(model, snap) -> None:
    mods, params, impl = snap
    assert [(n, type(m), dict(m._forward_hooks), dict(m._forward_pre_hooks))
            for n, m in model.named_modules()] == mods
    now = list(model.named_parameters())
    assert [(n, id(p)) for n, p in now] == [(n, i) for n, i, _ in params]
    for (_, p), (_, _, old) in zip(now, params):
        assert torch.equal(p, old)
    assert model.config._attn_implementation == impl


# ---------------------------------------------------------------------------------------------
# (a) a new op kind, registered by this test alone: the worked example of docs/extending.md

def behaves_like_norm(name: str, m: nn.Module, model: nn.Module) -> bool:
    """Found by behaviour, never by class name: a leaf with a 1-D weight and an epsilon whose
    forward is invariant to scaling its input (it normalises the last axis)."""
    w = getattr(m, "weight", None)
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or not isinstance(eps, float) \
            or next(m.children(), None) is not None:
        return False
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w)
    with torch.no_grad():
        y, y4 = type(m).forward(m, x), type(m).forward(m, 4 * x)
    return y.shape == x.shape and torch.allclose(y, y4, rtol=1e-3, atol=1e-5)


def install_norm(installer, entries) -> None:
    """Quantize each norm's output to its TensorSpec (a forward hook, removed at restore)."""
    em = installer.emulation
    for e in entries:
        def hook(module, args, out, e=e):
            q = quantize_operand(out, e.spec, telemetry=em.telemetry, where=(e.module, "output"))
            return q.values.to(out.dtype)

        installer.on_restore(installer.modules[e.module].register_forward_hook(hook).remove)


NORM = OpKind("norm", TensorSpec, match=behaves_like_norm, install=install_norm,
              roles=("output",), default_on=False)

NORM_YAML = """
name: norm8
linear: mxfp8
norm: e4m3
rules:
  - match: model.norm
    norm: null
  - match: "*.post_attention_layernorm"
    norm: {format: e5m2, rounding: rtz}
"""


@pytest.fixture
def norm_kind():
    OP_KINDS.register("norm", NORM)
    try:
        yield NORM
    finally:
        OP_KINDS.unregister("norm")


def test_a_new_op_kind_from_one_registration() -> None:
    model = _llama()
    ref = _logits(model)
    before = plan(model, "mxfp4").records()
    OP_KINDS.register("norm", NORM)  # the one registration call
    try:
        _check_the_norm_kind(model, ref, before)
    finally:
        OP_KINDS.unregister("norm")
    assert "norm" not in OP_KINDS
    with pytest.raises(UnknownOpKindError):
        Recipe.from_yaml(NORM_YAML)


def _check_the_norm_kind(model, ref, before) -> None:
    r = Recipe.from_yaml(NORM_YAML)
    # the recipe: parsed by the kind's spec type, attribute access, keyword construction,
    # round trips, rule overrides
    assert r.norm == TensorSpec("e4m3") and r.linear == get_recipe("mxfp8").linear
    assert r.rules[0].norm is None and r.rules[1].norm == TensorSpec("e5m2", rounding="rtz")
    assert not r.rules[0].overrides("linear")
    assert Recipe.from_yaml(r.to_yaml()) == r and Recipe.from_json(r.to_json()) == r
    assert r.to_dict()["norm"] == "e4m3"
    assert Recipe("x", norm="e4m3").norm == r.norm
    assert r.with_(norm=None).norm is None
    # an opt-in kind: plans of recipes that do not name it are unchanged
    assert plan(model, "mxfp4").records() == before
    p = plan(model, r)
    norms = {e.module: e for e in p.entries if e.op == "norm"}
    assert sorted(norms) == sorted(["model.norm"] + [f"model.layers.{i}.{n}" for i in (0, 1)
                                   for n in ("input_layernorm", "post_attention_layernorm")])
    assert norms["model.norm"].spec is None and norms["model.norm"].rule == "model.norm"
    text = p.table()
    assert "| model.layers.0.input_layernorm | LlamaRMSNorm | norm | e4m3 | default |" in text
    assert ("| model.layers.1.post_attention_layernorm | LlamaRMSNorm | norm | e5m2 rtz | "
            "*.post_attention_layernorm |") in text
    assert "| model.norm | LlamaRMSNorm | norm | high precision | model.norm |" in text
    # emulated: the norm outputs are quantized, values checked against the format by hand
    snap = _snapshot(model)
    layer = model.model.layers[0]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = [layer.input_layernorm(x), layer.post_attention_layernorm(x),
                 model.model.norm(x)]
    with torch.no_grad(), emulate(model, r) as em:
        got = [layer.input_layernorm(x), layer.post_attention_layernorm(x), model.model.norm(x)]
        em.telemetry.reset()
        out = _logits(model)
    assert torch.equal(got[0], quantize(plain[0], "e4m3")) and not torch.equal(got[0], plain[0])
    assert torch.equal(got[1], quantize(plain[1], "e5m2", "rtz"))
    assert torch.equal(got[2], plain[2])  # the rule left it in high precision
    with torch.no_grad(), emulate(model, "mxfp8"):
        linear_only = _logits(model)
    assert not torch.equal(out, linear_only)
    # telemetry: each norm's output role, once per forward; every key is a declared role
    rec = {(t["module"], t["role"]): t for t in em.telemetry.records()}
    assert rec[("model.layers.1.input_layernorm", "output")]["calls"] == 1
    assert rec[("model.layers.1.input_layernorm", "output")]["numel"] == IDS.numel() * 64
    assert ("model.norm", "output") not in rec
    keys = p.telemetry_keys()
    assert set(rec) <= set(keys)
    assert keys[("model.layers.0.post_attention_layernorm", "output")].op == "norm"
    # restored exactly: modules, hooks, parameters, config; the same logits
    _same(model, snap)
    assert torch.equal(_logits(model), ref)


def test_a_failed_install_restores_what_was_installed_before(norm_kind) -> None:
    """The kinds are installed in registry order; when one raises, the ones before are undone
    (module swaps, the attention config, the norm hooks)."""
    def boom(installer: Installer, entries) -> None:
        installer.swap(entries[0].module, nn.Identity())
        raise RuntimeError("boom")

    OP_KINDS.register("boom", OpKind("boom", TensorSpec,
                                     lambda n, m, model: n == "model.rotary_emb", boom,
                                     ("output",), family="other", default_on=False))
    try:
        model = _llama()
        ref = _logits(model)
        snap = _snapshot(model)
        r = Recipe.from_yaml(NORM_YAML + "attention: mxfp8\nboom: e4m3\n")
        em = emulate(model, r)
        with pytest.raises(RuntimeError, match="boom"):
            em.apply()
        assert not em.active
        _same(model, snap)
        assert torch.equal(_logits(model), ref)
    finally:
        OP_KINDS.unregister("boom")


def test_installer_undoes_last_first_and_past_errors() -> None:
    from types import SimpleNamespace

    net = nn.Sequential(nn.Linear(2, 2))
    cfg = SimpleNamespace(impl="eager")
    inst = Installer(None, dict(net.named_modules()))  # type: ignore[arg-type]
    inst.setattr(cfg, "impl", "a")
    inst.setattr(cfg, "impl", "b")
    inst.setattr(cfg, "extra", 1)
    orig = inst.swap("0", nn.Identity())
    assert isinstance(net[0], nn.Identity) and cfg.impl == "b"
    ran = []
    inst.on_restore(lambda: ran.append("first"))
    inst.on_restore(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        inst.undo()
    assert ran == ["first"] and net[0] is orig and cfg.impl == "eager"
    assert not hasattr(cfg, "extra")
    with pytest.raises(EmulationError, match="the model itself"):
        inst.swap("", nn.Identity())


def test_op_kind_descriptions_are_checked() -> None:
    with pytest.raises(ValueError, match="reserved"):
        OpKind("rules", TensorSpec, behaves_like_norm, install_norm, ("output",))
    with pytest.raises(ValueError, match="identifier"):
        OpKind("Norm-2", TensorSpec, behaves_like_norm, install_norm, ("output",))
    with pytest.raises(TypeError, match="lacks parse"):
        OpKind("norm", int, behaves_like_norm, install_norm, ("output",))
    with pytest.raises(ValueError, match="roles"):
        OpKind("norm", TensorSpec, behaves_like_norm, install_norm, "output")
    with pytest.raises(ValueError, match="its own name"):
        OP_KINDS.register("layernorm", NORM)
    with pytest.raises(ValueError, match="registered already"):
        OP_KINDS.register("linear", OP_KINDS.get("linear"))
    assert OP_KINDS.names() == ["linear", "attention", "embedding", "lm_head", "softmax",
                                "normalization", "activation", "glu", "residual",
                                "train_linear", "train_attention"]
    assert OP_KINDS.get("op:LM-head").name == "lm_head"
    assert OP_KINDS.get("attention").telemetry_keys("a")[:2] == [("a.qk", "input"),
                                                                  ("a.qk", "weight")]


# ---------------------------------------------------------------------------------------------
# (b) recognition by behaviour, not by class name

class MyProj(nn.Module):
    """Behaves like transformers' Conv1D: weight (in, out), ``x @ W + b``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class Conv1D(nn.Module):
    """Named like transformers' Conv1D, with its attributes, but a real 1-D convolution."""

    def __init__(self):
        super().__init__()
        self.nf = 4
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.conv1d(x, self.weight.unsqueeze(-1), self.bias)


class Gate(nn.Module):
    """A 2-D weight of shape (in, out) that is not multiplied into x."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.bias = None

    def forward(self, x):
        return x * self.weight.sum(0)


class OutIn(nn.Module):
    """``F.linear``: the weight is (out, in), not the Conv1D layout."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return nn.functional.linear(x, self.weight)


class FooAttention(nn.Module):
    """Named like an attention module, but its matmuls do not go through the interface."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class Mixer(nn.Module):
    """Another name, but dispatches through transformers' attention interface."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_key_value_groups = 1
        self.scaling = 0.25

    def forward(self, q, k, v):
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                   eager_attention_forward)
        return fn(self, q, k, v, None, scaling=self.scaling)[0]


class Renamed(LlamaAttention):
    """Llama's attention under another class name (its forward is Llama's)."""


def test_linear_found_by_behaviour() -> None:
    net = nn.Sequential()
    net.add_module("proj", MyProj(8, 4))
    net.add_module("conv", Conv1D())
    net.add_module("gate", Gate())
    net.add_module("outin", OutIn())
    assert [linear_layout(m) for m in net] == ["in_out", None, None, None]
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=64, n_layer=1, n_head=4, n_positions=32))
    assert linear_layout(gpt2.transformer.h[0].attn.c_attn) == "in_out"  # transformers' Conv1D
    assert linear_layout(gpt2.lm_head) == "out_in"
    p = plan(net, Recipe("x", linear="mxfp8"), warn=False)
    assert [(e.module, e.op) for e in p.entries] == [("proj", "linear")]
    x = torch.randn(3, 8)
    with emulate(net, Recipe("x", linear="mxfp8")):
        assert isinstance(net.proj, EmulatedLinear)
        y = net.proj(x)
    ref = nn.functional.linear(quantize_scaled(x, "mxfp8"),
                               quantize_scaled(net.proj.weight.detach().t(), "mxfp8"),
                               net.proj.bias.detach())
    assert torch.equal(y, ref) and isinstance(net.proj, MyProj)


def test_attention_found_by_behaviour_not_by_name() -> None:
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                   num_hidden_layers=1)
    cfg._attn_implementation = "eager"
    net = nn.Module()
    net.foo = FooAttention(cfg)
    net.mixer = Mixer(cfg)
    net.renamed = Renamed(cfg, layer_idx=0)
    assert not dispatches_attention(net.foo)
    assert dispatches_attention(net.mixer) and dispatches_attention(net.renamed)
    with pytest.warns(UserWarning, match="'foo' \\(FooAttention\\) is not emulated: .*attention "
                      "interface"):
        p = plan(net, Recipe("x", attention={"qk": "e4m3"}))
    assert [(e.module, e.op) for e in p.entries if e.op == "attention"] == [
        ("mixer", "attention"), ("renamed", "attention")]
    assert [u[0] for u in p.unsupported] == ["foo"]
    # the dispatching module is emulated: Q and K rounded to e4m3 before Q K^T
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 6, 16, generator=g) for _ in range(3))
    with torch.no_grad(), emulate(net, Recipe("x", attention={"qk": "e4m3"}), warn=False) as em:
        got = net.mixer(q, k, v)
        assert cfg._attn_implementation == "precisim"
    with torch.no_grad():
        want = eager_attention_forward(net.mixer, quantize(q, "e4m3"), quantize(k, "e4m3"), v,
                                       None, scaling=0.25)[0]
        plain = net.mixer(q, k, v)
    assert torch.equal(got, want) and not torch.equal(got, plain)
    assert cfg._attn_implementation == "eager"
    assert {(t["module"], t["role"]) for t in em.telemetry.records()} == {
        ("mixer.qk", "input"), ("mixer.qk", "weight")}


def test_renamed_attention_in_a_model_is_emulated() -> None:
    model = _llama()
    model.model.layers[0].self_attn.__class__ = Renamed
    p = plan(model, "mxfp8")
    assert [(e.module, e.module_type) for e in p.emulated("attention")] == [
        ("model.layers.0.self_attn", "Renamed"), ("model.layers.1.self_attn", "LlamaAttention")]
    with torch.no_grad(), emulate(model, "mxfp8") as em:
        model(IDS)
    assert ("model.layers.0.self_attn.qk", "input") in {
        (t["module"], t["role"]) for t in em.telemetry.records()}


# ---------------------------------------------------------------------------------------------
# (c) unknown op kinds: the registry's error

@pytest.mark.parametrize("text, needle", [
    ("name: x\nnorm: e4m3", "unknown key(s) 'norm'; accepted: name, description, linear, "
     "attention, embedding, lm_head, softmax, normalization, activation, glu, residual, "
     "train_linear, train_attention, rules"),
    ("name: x\nlm-haed: bf16", "'lm-haed' (did you mean 'lm_head'?)"),
    ("rules: [{match: 'a.*', atention: null}]", "'atention' (did you mean 'attention'?); "
     "accepted: match, kind, linear, attention, embedding, lm_head, softmax, normalization, "
     "activation"),
])
def test_unknown_op_kinds_in_recipes_and_rules(text: str, needle: str) -> None:
    with pytest.raises(UnknownOpKindError) as info:
        Recipe.from_yaml(text)
    assert isinstance(info.value, RecipeError) and isinstance(info.value, UnknownNameError)
    assert needle in str(info.value), str(info.value)


def test_unknown_op_kinds_in_code() -> None:
    msg = ("unknown op kind 'linera'; did you mean 'linear', 'train_linear'?; available: "
           "linear, attention, embedding, lm_head, softmax, normalization, activation, glu, "
           "residual, train_linear, train_attention")
    with pytest.raises(UnknownOpKindError, match=msg.replace("?", r"\?")):
        Recipe("x", linera="mxfp8")
    with pytest.raises(UnknownOpKindError, match="rule 'a.\\*': unknown op kind 'lm_haed'"):
        Rule("a.*", lm_haed=None)
    with pytest.raises(UnknownOpKindError, match="did you mean 'embedding'"):
        get_recipe("mxfp4").spec("embeding")
    with pytest.raises(AttributeError, match="'linera'"):
        get_recipe("mxfp4").linera  # noqa: B018
    with pytest.raises(RecipeError, match="expected a mapping, a format name or null"):
        Recipe("x", linear=[1, 2])


def test_registered_kinds_are_accepted_and_unregistered_ones_rejected(norm_kind) -> None:
    with pytest.raises(UnknownOpKindError, match="accepted: name, description, linear, "
                       "attention, embedding, lm_head, softmax, normalization, activation, "
                       "glu, residual, train_linear, train_attention, norm, rules"):
        Recipe.from_yaml("name: x\nnrom: e4m3")
    assert Recipe.from_yaml("name: x\nnorm: e4m3").norm == TensorSpec("e4m3")
    OP_KINDS.unregister("norm")
    try:
        with pytest.raises(UnknownOpKindError, match="unknown key\\(s\\) 'norm'"):
            Recipe.from_yaml("name: x\nnorm: e4m3")
    finally:
        OP_KINDS.register("norm", NORM)


def test_the_docs_worked_example_is_this_test() -> None:
    """docs/extending.md shows the code and recipe of test (a), verbatim."""
    import re
    from pathlib import Path

    import yaml

    doc = (Path(__file__).parents[1] / "docs" / "extending.md").read_text()
    doc = doc.split("## A new op kind", 1)[1].split("\n## ", 1)[0]  # (its own section)
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    end = "default_on=False)\n"
    shown = code[code.index("def behaves_like_norm"):code.index(end) + len(end)]
    assert shown in Path(__file__).read_text()
    assert 'OP_KINDS.register("norm", NORM)' in code
    recipe = re.search(r"```yaml\n(.*?)```", doc, re.S).group(1)
    assert yaml.safe_load(recipe) == yaml.safe_load(NORM_YAML)
