"""Reductions, softmax, norms and activations (docs/arithmetic.md sections 7.3 to 7.6): the
fast torch path equals the exact reference (Fractions, one rounding per step) bit for bit on
random rows and on adversarial ones (huge spread, ties, -inf masks, all-equal rows, zeros,
NaN), for every preset and for variants of every field; the order of a reduction changes the
result where the model says it should; impossible parameters are named."""

from __future__ import annotations

import math

import pytest
import torch
from precisim.emulation.functions import (
    ACTIVATION_UNITS,
    NORMS,
    SOFTMAXES,
    Activation,
    Norm,
    Reduction,
    Softmax,
)


def _same(a: float, b: float) -> bool:
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def _rows(n: int = 40, seed: int = 0) -> torch.Tensor:
    """Random rows and adversarial ones."""
    g = torch.Generator().manual_seed(seed)
    r = [torch.randn(n, generator=g) * 3, torch.randn(n, generator=g) * 30,
         torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 8),  # spread
         torch.full((n,), 0.3), torch.full((n,), -2.5),  # all equal
         torch.where(torch.arange(n) % 3 == 0, 7.0, -1.0),  # ties
         torch.where(torch.arange(n) > 4, -math.inf, torch.randn(n, generator=g)),  # mask
         torch.tensor([1e30, -1e30, 1e-30, 3.0] * (n // 4)),
         torch.tensor([65504.0, 65520.0, -65504.0, 1.0] * (n // 4)),
         torch.zeros(n), torch.randn(n, generator=g) * 1e-20]
    return torch.stack(r)


def _check_rows(fast: torch.Tensor, ref_rows: list[list]) -> None:
    bad = [(i, j, float(a), float(b)) for i, (fr, rr) in enumerate(zip(fast.tolist(), ref_rows))
           for j, (a, b) in enumerate(zip(fr, rr)) if not _same(a, b)]
    assert not bad, f"{len(bad)} mismatches (row, col, fast, exact): {bad[:5]}"


REDUCTIONS = [Reduction(op, f, order=o, chunk=c) for op in ("sum", "max")
              for f in ("fp32", "bf16", "fp16", "e4m3")
              for o, c in (("sequential", 1), ("pairwise", 1), ("chunked", 8), ("chunked", 7))]


@pytest.mark.parametrize("red", REDUCTIONS, ids=lambda r: r.describe().replace(" ", "-"))
def test_reduction(red: Reduction) -> None:
    x = torch.cat([_rows(40), _rows(40, seed=1)[:, :33].repeat(1, 2)[:, :40]])
    y = red(x)
    _check_rows(y[:, None], [[red.reference(r)] for r in x.tolist()])


@pytest.mark.parametrize("red", REDUCTIONS, ids=lambda r: r.describe().replace(" ", "-"))
def test_reduction_fast32(red: Reduction) -> None:
    """The float32 path (IEEE float32 additions where the format rounds like float32, else
    the float64 one) equals the exact reference too."""
    x = torch.cat([_rows(40), _rows(40, seed=1)[:, :33].repeat(1, 2)[:, :40]])
    y = red.fast32(x)
    assert y.dtype == torch.float32
    _check_rows(y[:, None], [[red.reference(r)] for r in x.tolist()])


def test_float32_paths_on_model_widths() -> None:
    """The float32 paths of the fp32 presets (softmax-exact, rmsnorm, layernorm, silu and its
    SwiGLU product) on rows as wide as SmolLM2's (576: the mean divides by a number whose
    reciprocal is inexact) equal the exact reference bit for bit."""
    g = torch.Generator().manual_seed(8)
    x = torch.cat([torch.randn(3, 576, generator=g) * 3,
                   torch.randn(1, 576, generator=g) * torch.exp(torch.randn(576, generator=g) * 6)])
    w = torch.randn(576, generator=g).to(torch.bfloat16)
    for nm in (NORMS.get("rmsnorm"), NORMS.get("rmsnorm-te"), NORMS.get("layernorm")):
        b = w if nm.kind.value == "layer" else None
        y = nm(x, w, b, eps=1e-5)
        _check_rows(y, [nm.reference(r, w.float().tolist(),
                                     None if b is None else b.float().tolist(), eps=1e-5)
                        for r in x.tolist()])
    sm = SOFTMAXES.get("softmax-exact")
    _check_rows(sm(x), [sm.reference(r) for r in x.tolist()])
    act = ACTIVATION_UNITS.get("silu")
    u = torch.randn(576, generator=g)
    _check_rows(act.glu(x[0], u)[None], [[act.glu_reference(a, b)
                                          for a, b in zip(x[0].tolist(), u.tolist())]])


def test_reduction_order_matters() -> None:
    """Sequential, pairwise and chunked bf16 sums of the same row differ (and each matches
    its reference above): the order is modelled, not only the format."""
    x = torch.tensor([[1.0] + [2.0**-9] * 255])
    out = {o: float(Reduction("sum", "bf16", order=o, chunk=16)(x)) for o in
           ("sequential", "pairwise", "chunked")}
    assert out["sequential"] == 1.0  # every 2^-9 is lost against 1 (a quarter ulp)
    assert out["pairwise"] > 1.45 and out["chunked"] > 1.45  # the small terms add up first
    assert float(Reduction("sum", "fp32")(x)) == 1 + 255 * 2.0**-9


SOFTMAX_VARIANTS = [SOFTMAXES.get(n) for n in SOFTMAXES.names()] + [
    Softmax("s-in-max", input_format="e4m3", max_of="input", sub_format="bf16"),
    Softmax("s-fp16", input_format="fp16", sub_format="fp16", output_format="fp16",
            exp={"base": "exp-lut64", "output_format": "fp16"},
            sum={"format": "fp16", "order": "chunked", "chunk": 8}),
    Softmax("s-rcp-bf16", division="reciprocal",
            rcp={"base": "rcp-newton2", "output_format": "bf16"}, output_format="e4m3"),
]


@pytest.mark.parametrize("sm", SOFTMAX_VARIANTS, ids=lambda s: s.name)
def test_softmax(sm: Softmax) -> None:
    x = _rows(40)
    y = sm(x)
    _check_rows(y, [sm.reference(r) for r in x.tolist()])
    x2 = torch.full((2, 9), -math.inf)  # a fully masked row is NaN, as torch.softmax
    x2[1, 3] = 2.0
    y2 = sm(x2)
    _check_rows(y2, [sm.reference(r) for r in x2.tolist()])
    assert torch.isnan(y2[0]).all() and abs(y2[1, 3] - 1) < 1e-3 and (y2[1, :3] == 0).all()


def test_softmax_dim_and_exact_preset_vs_torch() -> None:
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(3)) * 4
    sm = SOFTMAXES.get("softmax-exact")
    assert torch.equal(sm(x, dim=1), sm(x.transpose(1, 2), dim=-1).transpose(1, 2))
    torch.testing.assert_close(sm(x), torch.softmax(x, -1), rtol=2e-7, atol=1e-9)


NORM_VARIANTS = [NORMS.get(n) for n in NORMS.names()] + [
    Norm("n-bf16-te", working_format="bf16", cast="te", output_format="bf16",
         reduction={"format": "fp32", "order": "chunked", "chunk": 5}),
    Norm("n-fp16-out", output_format="fp16", eps=1e-3, rsqrt="rsqrt-newton2"),
    Norm("ln-bf16", kind="layer", working_format="bf16", cast="te",
         reduction={"format": "bf16", "order": "sequential"}),
]


@pytest.mark.parametrize("nm", NORM_VARIANTS, ids=lambda n: n.name)
def test_norm(nm: Norm) -> None:
    g = torch.Generator().manual_seed(4)
    x = _rows(40)[[0, 1, 2, 3, 5, 7, 8, 9, 10]]
    w = torch.randn(40, generator=g).to(torch.bfloat16).float()
    b = torch.randn(40, generator=g).to(torch.bfloat16).float() if nm.kind.value == "layer" \
        else None
    y = nm(x, w, b, eps=1e-6)
    _check_rows(y, [nm.reference(r, w.tolist(), None if b is None else b.tolist(), eps=1e-6)
                    for r in x.tolist()])


def test_norm_cast_order_differs_and_exact_matches_torch() -> None:
    """HF (cast, then weight) and TE (weight in fp32, then cast) differ with a bf16 output;
    the fp32 presets agree with torch's RMSNorm / LayerNorm to 3 ulp."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(64, 96, generator=g), torch.randn(96, generator=g) * 3
    hf = Norm("a", output_format="bf16")(x, w)
    te = Norm("b", output_format="bf16", cast="te")(x, w)
    assert (hf != te).float().mean() > 0.05
    ref = torch.nn.functional.rms_norm(x, (96,), w, eps=1e-6)
    torch.testing.assert_close(NORMS.get("rmsnorm")(x, w, eps=1e-6), ref, rtol=3 * 2**-23, atol=0)
    lref = torch.nn.functional.layer_norm(x, (96,), w, w, eps=1e-5)
    torch.testing.assert_close(NORMS.get("layernorm")(x, w, w, eps=1e-5), lref,
                               rtol=1e-6, atol=1e-6)


ACT_VARIANTS = [ACTIVATION_UNITS.get(n) for n in ACTIVATION_UNITS.names()] + [
    Activation("a-gs", function="gelu_sigmoid", via="exp-rcp", working_format="bf16",
               exp="exp-mx-bf16", output_format="bf16"),
    Activation("a-silu-poly", unit={"base": "silu-lut64", "method": "polynomial",
                                    "degree": 2, "table_bits": 3}, output_format="fp16"),
]


@pytest.mark.parametrize("act", ACT_VARIANTS, ids=lambda a: a.name)
def test_activation(act: Activation) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(700, generator=g) * 5, torch.randn(100, generator=g) * 40,
                   torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 8.0, -8.0, 1e-40])])
    y = act(x)
    _check_rows(y[None], [[act.reference(v) for v in x.tolist()]])
    u = torch.randn(x.shape, generator=g)
    _check_rows(act.glu(x, u)[None], [[act.glu_reference(a, b)
                                       for a, b in zip(x.tolist(), u.tolist())]])


@pytest.mark.parametrize("make, named", [
    (lambda: Reduction("sum", chunk=0), "chunk=0"),
    (lambda: Reduction("prod"), "op='prod'"),
    (lambda: Reduction("sum", order="random"), "order='random'"),
    (lambda: Softmax("x", exp="rcp-exact"), "exp='rcp-exact'"),
    (lambda: Softmax("x", max_of="median"), "max_of='median'"),
    (lambda: Norm("x", rsqrt="exp-exact"), "rsqrt='exp-exact'"),
    (lambda: Norm("x", eps=-1.0), "eps=-1.0"),
    (lambda: Norm("x", cast="apex"), "cast='apex'"),
    (lambda: Activation("x", function="gelu", via="exp-rcp"), "via='exp-rcp'"),
    (lambda: Activation("x", function="exp"), "function='exp'"),
    (lambda: Activation("x", unit="gelu-lut64"), "unit='gelu-lut64'"),
    (lambda: Softmax.parse({"base": "softmax-exact", "sum_format": "bf16"}), "'sum_format'"),
])
def test_impossible_parameters(make, named: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError) as e:
        make()
    assert named in str(e.value)


def test_parse_round_trip() -> None:
    for reg, cls in ((SOFTMAXES, Softmax), (NORMS, Norm), (ACTIVATION_UNITS, Activation)):
        for n in reg.names():
            spec = reg.get(n)
            assert cls.parse(n) is spec
            assert cls.parse(spec.to_dict()) == spec, n
            assert spec.describe()


DROPPING = [SOFTMAXES.get("softmax-exact"),
            Softmax("d-bound", exp="expf-fast-bound"),
            Softmax("d-seq-bf16", sum={"format": "bf16", "order": "sequential"},
                    output_format="bf16"),
            Softmax("d-chunk7-rcp", sum={"order": "chunked", "chunk": 7},
                    division="reciprocal", rcp="rcp-newton2"),
            Softmax("d-exp-fp16", exp={"base": "exp-exact", "output_format": "fp16"},
                    sum={"format": "fp16", "order": "pairwise"})]


@pytest.mark.parametrize("sm", DROPPING, ids=lambda s: s.name)
def test_softmax_drops_far_entries(sm: Softmax) -> None:
    """Softmax.drop_gap: entries at least drop_gap below their row's maximum (and -inf) get
    an exact +0, and cutting a row's trailing run of them off leaves every other probability
    unchanged, bit for bit, for every reduction order and odd lengths (the pairwise tree's
    carried element; dropped entries also inside the kept prefix); the dropped entries sit
    exactly at the gap, at -inf or at float32's most negative value (an attention mask's).
    The cut row equals the exact reference."""
    gap = sm.drop_gap
    assert gap == 1024.0
    g = torch.Generator().manual_seed(11)
    for n, k in ((40, 13), (33, 1), (64, 31), (9, 8), (100, 37)):
        rows = torch.randn(6, k, generator=g) * torch.tensor([[1.0], [5.0], [30.0], [1e-3],
                                                              [80.0], [0.0]])
        m = rows.amax(-1, keepdim=True)
        far = torch.cat([m - gap, torch.full((6, 1), -math.inf),
                         torch.full((6, 1), torch.finfo(torch.float32).min), m - 3 * gap], -1)
        inside = torch.rand(6, k, generator=g) < 0.3  # dropped entries in the kept prefix
        inside.scatter_(1, rows.argmax(-1, keepdim=True), False)  # (the maximum stays)
        prefix = torch.where(inside, far.gather(1, torch.randint(0, 4, (6, k), generator=g)),
                             rows)
        full = torch.cat([prefix, far.gather(1, torch.randint(0, 4, (6, n - k), generator=g))],
                         -1)
        m = prefix.amax(-1, keepdim=True)
        assert bool((full[:, k:] <= m - gap).all()) and bool(
            (prefix[inside] <= m.expand_as(prefix)[inside] - gap).all())
        y_full, y_cut = sm(full), sm(prefix)
        assert bool((y_full[:, k:].view(torch.int32) == 0).all())
        assert bool((y_cut[inside].view(torch.int32) == 0).all())
        assert torch.equal(y_full[:, :k].view(torch.int32), y_cut.view(torch.int32))
    _check_rows(y_cut, [sm.reference(r) for r in prefix.tolist()])


@pytest.mark.parametrize("sm, why", [
    (SOFTMAXES.get("softmax-bf16"), "bf16 input rounding"),
    (SOFTMAXES.get("softmax-lut16"), "a table exp (not known monotonic)"),
    (Softmax("u", exp={"base": "exp-exact", "output_rounding": "ru"}), "exp rounded up: "
     "its smallest subnormal at -1024"),
    (Softmax("v", sub_format="bf16"), "bf16 subtraction")])
def test_softmax_that_does_not_drop(sm: Softmax, why: str) -> None:
    assert sm.drop_gap is None, why
