"""The op kinds glu (the gated product act(gate) * up) and residual (the residual adds of a
decoder layer), docs/arithmetic.md section 7.9: the fast path of their rounding equals the
exact reference (Fractions) bit for bit on random and adversarial operands; on tiny random
Llama, Qwen2 and GPT-2 models the exact settings (fp32, rne) give the unpatched logits bit
for bit, and every kind exact together stays within the stated fp32 tolerance; a recipe
without the keys is bit-identical with and without the kinds registered; approximate settings
change the logits and count saturated / flushed values; restore is exact; modules are found
by behaviour, not class name; bad specs are refused naming the value."""

from __future__ import annotations

import math

import pytest
import torch
from _op_kinds import unregistered
from precisim.emulation import EmulationError, Recipe, emulate, plan
from precisim.emulation.rounded_ops import Rounded, glu_roles
from precisim.emulation.specs import RecipeError
from test_emulation_datapath import MODELS, TOL, _llama, _logits, _state
from torch import nn

KINDS = ("glu", "residual")


def _same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def _operands() -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 pairs: random, huge spread, exact ties of bf16 / fp16 / e4m3, cancellation, signed
    zeros, results beyond every format's range and in the subnormal range, infinities."""
    g = torch.Generator().manual_seed(3)
    n = 400
    a = [torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 6)]
    b = [torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 6)]
    one = torch.ones(64)
    a += [one, one * 448, -one * 65504, one * 3e38, one * 1e-3, one * 0.0, -one * 0.0,
          one * 1.5, one * math.inf]
    b += [torch.tensor([2.0 ** -e for e in range(64)]), torch.full((64,), 16.0),
          -torch.full((64,), 16.0), torch.full((64,), 3e38), torch.full((64,), -1e-3 * 1.0000001),
          -one * 0.0, -one * 0.0, torch.tensor([2.0 ** -(130 + e % 20) for e in range(64)]),
          torch.full((64,), -2.0)]
    # a tie of bf16 / fp16 / e4m3 plus a tiny sticky part of either sign (double rounding)
    for tie in (1 + 2.0 ** -8, 1 + 2.0 ** -11, 1 + 2.0 ** -4, 1 + 3 * 2.0 ** -8):
        a.append(torch.full((64,), tie))
        b.append(torch.tensor([(-1) ** e * 2.0 ** -(20 + e % 40) for e in range(64)]))
    # sums and products of magnitude >= 2^127 (twice them overflows float32) that are not
    # float32 values: at bf16's overflow threshold t plus or minus a sticky part, and random
    # products in [2^127, 2^129)
    t = (2.0 ** 8 - 0.5) * 2.0 ** 120
    a.append(torch.tensor([(-1) ** (e // 2) * t for e in range(64)]))
    b.append(torch.tensor([(-1) ** e * 2.0 ** -(e % 40) for e in range(64)]))
    a.append((torch.rand(64, generator=g) + 1) * 2.0 ** 64)
    b.append((torch.rand(64, generator=g) + 1) * 2.0 ** 63)
    # products below float32's smallest subnormal (either sign): rounded to odd at float32,
    # +-2^-149, never zero
    a.append(torch.tensor([(-1) ** e * 2.0 ** -(70 + e % 30) for e in range(64)]))
    b.append(torch.tensor([(-1) ** (e // 2) * 1.25 * 2.0 ** -(60 + e % 25) for e in range(64)]))
    return torch.cat(a), torch.cat(b)


SPECS = [Rounded("bf16"), Rounded("fp16", rounding="rtz"), Rounded("e4m3"),
         Rounded("e5m2", rounding="ru", flush=True), Rounded("e4m3", rounding="rna"),
         Rounded("fp32"), Rounded("bf16", overflow="saturate", rounding="rd")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", "-"))
def test_rounding_equals_the_exact_reference(spec: Rounded) -> None:
    a, b = _operands()
    for fast, ref in ((spec.add(a, b), spec.add_reference), (spec.mul(a, b),
                                                             spec.mul_reference)):
        bad = [(x, y, f) for x, y, f in zip(a.tolist(), b.tolist(), fast.tolist())
               if not _same(f, float(ref(x, y)))]
        assert not bad, f"{len(bad)} mismatches (a, b, fast): {bad[:4]}"


def _recipe(text: str) -> Recipe:
    return Recipe.from_yaml("name: t\n" + text)


@pytest.mark.parametrize("arch", list(MODELS))
def test_exact_settings_match_the_unpatched_model(arch: str) -> None:
    """fp32 rne in an fp32 model is IEEE's own product and sum: the logits are bit-identical;
    with every unit of section 7 exact, within TOL (as tests/test_emulation_datapath.py)."""
    make, norm, act = MODELS[arch]
    model = make()
    ref = _logits(model)
    before = _state(model)
    r = _recipe("glu: fp32\nresidual: fp32\n")
    p = plan(model, r)
    n_layers = 2
    assert len(p.emulated("residual")) == n_layers
    # GPT-2's MLP is not gated (act(c_fc(x)) -> c_proj): no glu op
    assert len(p.emulated("glu")) == (0 if arch == "gpt2" else n_layers), p.table()
    with emulate(model, r) as em:
        y = _logits(model)
        recs = {(t["module"], t["role"]): t for t in em.telemetry.records()}
    assert set(recs) == {(e.module, "output") for e in p.emulated()}
    for e in p.emulated("residual"):  # both adds of every layer ran emulated
        assert recs[(e.module, "output")]["calls"] == 2
    assert torch.equal(y, ref)
    everything = _recipe(f"softmax: softmax-exact\nnormalization: {norm}\nactivation: {act}\n"
                         "glu: fp32\nresidual: fp32\n")
    with emulate(model, everything):
        y = _logits(model)
    assert (y - ref).abs().max().item() <= TOL * ref.abs().max().item()
    assert _state(model) == before
    assert torch.equal(_logits(model), ref)  # exact restore


def test_recipe_without_the_keys_is_bit_identical() -> None:
    model = _llama()
    names = ["mxfp4", "bf16"]
    extra = _recipe("softmax: softmax-bf16\nactivation: silu-table16\n")
    now = {}
    for n in [*names, extra]:
        with emulate(model, n):
            y = _logits(model)
        now[str(n)] = (y, plan(model, n).records())
    with unregistered(KINDS):
        for n in [*names, extra]:
            with emulate(model, n):
                y = _logits(model)
            assert torch.equal(y, now[str(n)][0]), n
            assert plan(model, n).records() == now[str(n)][1], n


def test_approximate_settings_change_logits_and_count_events() -> None:
    model = _llama()
    with torch.no_grad():  # a residual stream beyond e4m3's largest value, 448
        model.model.embed_tokens.weight.mul_(50000)  # std 1000
    ref = _logits(model)
    r = _recipe("glu: bf16\nresidual: {format: e4m3, overflow: saturate}\n"
                "activation: silu-table16\n")
    p = plan(model, r)
    with emulate(model, r) as em:
        y = _logits(model)
        recs = {(t["module"], t["role"]): t for t in em.telemetry.records()}
    assert (y - ref).abs().max() > 1e-3
    assert recs[("model.layers.0", "output")]["saturated"] > 0
    assert recs[("model.layers.0.mlp", "output")]["numel"] == 2 * 24 * 96
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert "e4m3" in p.table() and "glu" in p.table()
    # the product takes the emulated activation's output: glu bf16 over silu-table16 is
    # Q_bf16(Q(silu_table(g)) u) = Activation.glu
    from precisim.emulation.functions import ACTIVATION_UNITS

    act = ACTIVATION_UNITS.get("silu-table16")
    mlp = model.model.layers[0].mlp
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    with emulate(model, _recipe("glu: bf16\nactivation: silu-table16\n")), torch.no_grad():
        seen = {}
        h = mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("p", a[0]))
        mlp(x)
        h.remove()
    with torch.no_grad():
        want = Rounded("bf16").mul(act(mlp.gate_proj(x)), mlp.up_proj(x)).float()
    assert torch.equal(seen["p"], want)


class _Odd(nn.Module):
    """A gated MLP with unusual names and order (found by behaviour)."""

    def __init__(self, gated: bool = True):
        super().__init__()
        self.zz, self.aa, self.mm = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)
        self.f = nn.SiLU()
        self.gated = gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.mm(self.aa(x) * self.f(self.zz(x)))
        return self.mm(self.f(self.zz(x)) + self.aa(x))


def test_gated_mlps_are_found_by_behaviour() -> None:
    roles = glu_roles(_Odd())
    assert roles is not None and (roles.gate, roles.up, roles.down, roles.act) == (
        "zz", "aa", "mm", "f")
    assert glu_roles(_Odd(gated=False)) is None
    gpt2 = MODELS["gpt2"][0]()
    assert all(glu_roles(m) is None for m in gpt2.modules())  # GPT2MLP: not gated


@pytest.mark.parametrize("value, match", [
    ("fp99", "fp99"),
    ({"format": "bf16", "roundng": "rtz"}, "'roundng' \\(did you mean 'rounding'\\?\\)"),
    ({"format": "e4m3", "overflow": "inf"}, "has no infinity"),
    ({"format": "bf16", "rounding": "sr"}, "stochastic rounding"),
    ({"rounding": "rtz"}, "needs a 'format'"),
    ({"format": "bf16", "flush": "yes"}, "flush='yes'"),
    (3, "expected a format name"),
    ("int8", "int8"),
])
def test_bad_specs_are_refused(value, match: str) -> None:  # noqa: ANN001
    for key in KINDS:
        with pytest.raises(RecipeError, match=match):
            Recipe("x", **{key: value})


def test_a_layer_without_residual_adds_is_refused() -> None:
    """A decoder layer whose forward makes no residual add (here: an instance forward that
    only scales its input) is named in an EmulationError; the model is restored."""
    model = _llama()
    ref = _logits(model)
    before = _state(model)
    layer = model.model.layers[1]
    r = _recipe("residual: bf16\nrules:\n  - match: model.layers.0\n    residual: null\n")
    assert [e.module for e in plan(model, r).emulated()] == ["model.layers.1"]
    layer.forward = lambda hidden_states, *a, **k: hidden_states * 1.0
    try:
        with pytest.raises(EmulationError, match="model.layers.1: its forward made no "
                           "residual add"), emulate(model, r):
            _logits(model)
    finally:
        del layer.forward
    assert _state(model) == before
    assert torch.equal(_logits(model), ref)


def test_compiled_equals_eager() -> None:
    """The torch.compile'd kernels of the sum and the product give the eager kernels' bits
    (benchmarks/bench_functions.py times them)."""
    from precisim.formats import kernels

    a, b = _operands()
    for spec, op in ((Rounded("bf16"), "add"), (Rounded("e4m3", rounding="rtz"), "mul"),
                     (Rounded("fp32"), "add")):
        old = kernels.get_backend()
        try:
            kernels.set_backend("eager")
            want = getattr(spec, op)(a, b)
            kernels.set_backend("compile")
            got = getattr(spec, op)(a, b)
        finally:
            kernels.set_backend(old)
        assert torch.equal(want.view(torch.int32), got.view(torch.int32)), (spec, op)


def test_product_float32_path_equals_the_exact_reference() -> None:
    """The float32 product kernel (Dekker's TwoProduct, no float64) on operands inside its
    ranges: random products, near-ties of bf16 / fp16 / e4m3 with sticky parts of either sign,
    products at the ends of the ranges; equal to the exact reference bit for bit, and batches
    with an operand outside the ranges are handed to the float64 kernel."""
    from precisim.emulation.rounded_ops import _mul_rto32_fast

    g = torch.Generator().manual_seed(5)
    n = 2000
    a = [torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 10)]
    b = [torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 10)]
    e = torch.arange(64, dtype=torch.float32)
    for tie in (1 + 2.0 ** -8, 1 + 2.0 ** -11, 1 + 2.0 ** -4, 1 + 3 * 2.0 ** -8):
        for sign in (1.0, -1.0):
            a.append(torch.full((64,), tie * sign))
            b.append(1 + (-1) ** e * torch.exp2(-(12 + e % 12)))
    # inexact products whose float32 rounding is a tie of bf16 or fp16: a = fl(T / b) and its
    # neighbours for ties T (the sticky direction decides the rounding)
    for step in (2.0 ** -7, 2.0 ** -10):  # the ulps of bf16 and fp16 at 1
        bb = 1 + torch.rand(3000, generator=g)
        tie = 1 + (torch.randint(0, 2 ** 7, (3000,), generator=g) * 2 + 1) * step / 2
        tie = tie * (1 - 2 * torch.randint(0, 2, (3000,), generator=g)) * 2.0 ** 30
        q = (tie.double() / bb.double()).float()
        for aa in (q, torch.nextafter(q, q * 2), torch.nextafter(q, q * 0)):
            prod = aa.double() * bb.double()
            hit = (prod.float() == tie) & (prod != tie.double())
            a.append(aa[hit])
            b.append(bb[hit])
    edge = torch.tensor([2.0 ** -100, 2.0 ** 99 * 1.999, 2.0 ** -48, 2.0 ** 60 * 1.7])
    a.append(edge)
    b.append(torch.tensor([2.0 ** 4 * 1.3, 2.0 ** 20 * 1.1, -(2.0 ** -48) * 1.25, 2.0 ** 59]))
    a, b = torch.cat(a), torch.cat(b)
    p = a.double() * b.double()
    keep = (a.abs() >= 2.0 ** -100) & (b.abs() >= 2.0 ** -100) & (a.abs() < 2.0 ** 100) \
        & (b.abs() < 2.0 ** 100) & (p.abs() >= 2.0 ** -96) & (p.abs() < 2.0 ** 120)
    a, b = a[keep], b[keep]
    assert len(a) > 3000
    _, unsafe = _mul_rto32_fast(a, b)
    assert not bool(unsafe)
    from precisim.formats import kernels

    old = kernels.get_backend()
    try:
        kernels.set_backend("compile")
        compiled = Rounded("bf16").mul(a, b)
    finally:
        kernels.set_backend(old)
    for spec in (Rounded("bf16"), Rounded("fp16", rounding="rtz"), Rounded("e4m3"),
                 Rounded("bf16", rounding="ru"), Rounded("e5m2", rounding="rd")):
        fast = spec.mul(a, b)
        if spec == Rounded("bf16"):
            assert torch.equal(fast.view(torch.int32), compiled.view(torch.int32))
        bad = [(x, y, f) for x, y, f in zip(a.tolist(), b.tolist(), fast.tolist())
               if not _same(f, float(spec.mul_reference(x, y)))]
        assert not bad, f"{spec.describe()}: {len(bad)} mismatches: {bad[:4]}"
    for x, y in ((2.0 ** 100, 1.0), (2.0 ** -101, 4.0), (2.0 ** -50, 2.0 ** -47),
                 (2.0 ** 70, 2.0 ** 51)):
        _, unsafe = _mul_rto32_fast(torch.tensor([1.0, x]), torch.tensor([1.0, y]))
        assert bool(unsafe), (x, y)
