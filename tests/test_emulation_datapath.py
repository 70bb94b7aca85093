"""The op kinds softmax, normalization and activation (docs/arithmetic.md section 7.8) on tiny
random Llama, GPT-2 and Qwen2 models built from transformers configs: a recipe without these
keys is bit-identical with and without the kinds registered; with every unit exact the logits
agree with the unpatched model within a stated fp32 tolerance; approximate units change them;
plan, telemetry and YAML describe them; restore is exact; mismatched specs are refused."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from _op_kinds import unregistered
from precisim.emulation import EmulationError, Recipe, emulate, plan

IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
KINDS = ("softmax", "normalization", "activation")

#: |emulated - unpatched| <= TOL * max |unpatched logit| with every unit exact (fp32 models;
#: the units are correctly rounded, torch's kernels are not: a few ulp per op)
TOL = 2e-6


def _llama(cls=transformers.LlamaForCausalLM, cfg_cls=transformers.LlamaConfig):
    cfg = cfg_cls(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 2.0)
    return model


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


MODELS = {
    "llama": (_llama, "rmsnorm", "silu"),
    "qwen2": (lambda: _llama(transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
              "rmsnorm", "silu"),
    "gpt2": (_gpt2, "layernorm", "gelu-tanh"),
}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _exact_recipe(norm: str, act: str, extra: str = "") -> Recipe:
    return Recipe.from_yaml(f"name: exact-units\n{extra}softmax: softmax-exact\n"
                            f"normalization: {norm}\nactivation: {act}\n")


def _state(model):
    return ([(n, type(m), dict(m._forward_hooks), dict(m._forward_pre_hooks),
              "forward" in vars(m)) for n, m in model.named_modules()],
            model.config._attn_implementation)


@pytest.mark.parametrize("arch", list(MODELS))
def test_exact_units_match_the_unpatched_model(arch: str) -> None:
    make, norm, act = MODELS[arch]
    model = make()
    ref = _logits(model)
    before = _state(model)
    r = _exact_recipe(norm, act)
    p = plan(model, r)
    ops = {e.op for e in p.emulated()}
    assert ops == set(KINDS), p.table()
    n_layers = 2
    assert len(p.emulated("softmax")) == n_layers
    assert len(p.emulated("activation")) == n_layers
    assert len(p.emulated("normalization")) == 2 * n_layers + 1
    with emulate(model, r) as em:
        y = _logits(model)
        keys = {(t["module"], t["role"]) for t in em.telemetry.records()}
    assert keys == {(e.module, "output") for e in p.emulated()}
    err = (y - ref).abs().max().item()
    assert err <= TOL * ref.abs().max().item(), (arch, err)
    assert _state(model) == before
    assert torch.equal(_logits(model), ref)  # exact restore


def test_recipe_without_the_keys_is_bit_identical() -> None:
    """Plans and logits of recipes that do not name the kinds are the same with the kinds
    unregistered (as before they existed) and registered."""
    model = _llama()
    names = ["mxfp4", "bf16", "fp32"]
    now = {}
    for n in names:
        with emulate(model, n):
            y = _logits(model)
        now[n] = (y, plan(model, n).records())
    with unregistered(KINDS):  # the registry is restored in its order afterwards
        for n in names:
            with emulate(model, n):
                y = _logits(model)
            assert torch.equal(y, now[n][0]) and plan(model, n).records() == now[n][1], n


def test_approximate_units_change_logits_and_telemetry_counts() -> None:
    model = _llama()
    with torch.no_grad():  # normalised values beyond e2m1's largest value, 6
        model.model.layers[0].input_layernorm.weight.mul_(4)
    ref = _logits(model)
    r = Recipe.from_yaml("""
name: sfu-bf16
softmax: softmax-bf16
normalization: {base: rmsnorm, reduction: {format: bf16, order: chunked, chunk: 32},
                output_format: e2m1}
activation: silu-table16
rules:
  - match: model.norm
    normalization: null
""")
    p = plan(model, r)
    assert "model.norm" not in {e.module for e in p.emulated("normalization")}
    with emulate(model, r) as em:
        y = _logits(model)
        recs = {(t["module"], t["role"]): t for t in em.telemetry.records()}
    assert (y - ref).abs().max() > 1e-3
    sat = recs[("model.layers.0.input_layernorm", "output")]
    assert sat["saturated"] > 0  # e2m1 (max 6) cannot hold the normalised values
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert "softmax-bf16" in p.table() and "bf16 chunked 32" in p.table()


def test_softmax_with_the_attention_kind() -> None:
    """Both kinds on one attention module: the matmuls under bf16 operands, the softmax
    emulated; with the exact softmax the logits equal those of the bf16 recipe alone up to
    the softmax's own rounding."""
    model = _llama()
    with emulate(model, "bf16"):
        base = _logits(model)
    bf16 = Recipe.from_yaml("name: b\nattention: bf16\nlinear: bf16")
    r = Recipe("x", attention=bf16.attention, linear=bf16.linear, softmax="softmax-exact")
    with emulate(model, r) as em:
        y = _logits(model)
        keys = {(t["module"], t["role"]) for t in em.telemetry.records()}
    assert ("model.layers.1.self_attn", "output") in keys  # the softmax ran emulated
    assert ("model.layers.1.self_attn.pv", "input") in keys  # and so did P @ V
    assert (y - base).abs().max().item() <= 1e-4 * base.abs().max().item()


def test_mismatched_specs_are_refused() -> None:
    model = _llama()
    before = _state(model)
    with pytest.raises(EmulationError, match="model.layers.0.input_layernorm.*layer norm"):
        emulate(model, Recipe("x", normalization="layernorm")).apply()
    assert _state(model) == before  # a failed apply leaves the model as it was
    with pytest.raises(EmulationError, match="mlp.act_fn.*computes gelu"):
        emulate(model, Recipe("x", activation="gelu")).apply()
    with pytest.raises(ValueError, match="unknown softmax unit 'softmax-fast'"):
        Recipe("x", softmax="softmax-fast")


def test_cli_refuses_an_unknown_unit_in_a_recipe_file(tmp_path) -> None:
    """`precisim eval --recipe-file` reads the new keys; an unknown unit is one 'error:' line
    naming it, exit status 2, before any model is loaded."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsoftmax: softmax-fast\n")
    p = subprocess.run([sys.executable, "-m", "precisim.eval.cli", "eval", "--recipe-file",
                        str(bad), "--data", str(bad), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'softmax-fast'" in lines[0]
    assert not (tmp_path / "o").exists()


CHUNK_SOFTMAXES = ["softmax-bf16", "softmax-poly3-rcp", "softmax-lut16",
                   {"base": "softmax-exact", "exp": "expf-fast-bound"},
                   {"base": "softmax-bf16", "input_format": "e4m3", "sub_format": "e4m3",
                    "max_of": "input", "output_format": "e4m3"}]


@pytest.mark.parametrize("sm", CHUNK_SOFTMAXES, ids=str)
def test_chunked_attention_uses_the_emulated_softmax(sm, monkeypatch) -> None:  # noqa: ANN001
    """The chunked fake-quant attention path (emulation/attention.py; forced into 16-row
    chunks so that row chunks and the masked triangle arise) runs the emulated softmax and
    gives the generic path's logits and softmax telemetry bit for bit."""
    from precisim.emulation import attention, patch

    model = _llama()
    bf16 = Recipe.from_yaml("name: b\nattention: bf16\nlinear: bf16")
    r = Recipe("x", attention=bf16.attention, linear=bf16.linear, softmax=sm)
    with emulate(model, bf16):
        plain = _logits(model)
    monkeypatch.setattr(attention, "CHUNK_ROWS", 16)
    calls = []
    own = patch.chunked_attention
    monkeypatch.setattr(patch, "chunked_attention",
                        lambda *a, **k: calls.append(k["skip_keys"]) or own(*a, **k))

    def run():  # noqa: ANN202
        with emulate(model, r) as em:
            y = _logits(model)
            tel = {t["module"]: (t["numel"], t["saturated"], t["flushed"])
                   for t in em.telemetry.records() if t["role"] == "output"}
        return y, tel

    chunked, tel_chunked = run()
    # both layers chunked; every key computed unless the softmax drops entries (cut rows)
    assert calls == [r.softmax.drop_gap is not None] * 2
    monkeypatch.setattr(patch, "chunkable", lambda spec: None)  # the generic path
    generic, tel_generic = run()
    assert len(calls) == 2
    assert torch.equal(chunked, generic)
    assert tel_chunked == tel_generic and len(tel_chunked) == 2
    if "exp" not in sm:  # the emulated softmax ran (the bound model's few ulps of fp32 exp
        assert not torch.equal(chunked, plain)  # vanish when P is rounded to bf16)


@pytest.mark.parametrize("sm", ["softmax-exact", {"base": "softmax-exact",
                                                  "exp": "expf-fast-bound"}], ids=str)
def test_chunked_attention_cuts_the_rows_a_softmax_drops(sm, monkeypatch) -> None:  # noqa: ANN001
    """Without telemetry, a softmax that drops entries far below the row maximum
    (Softmax.drop_gap: a correctly rounded or bound-model exp) runs over the visible keys of
    each row chunk only (shorter rows reach the unit), the GEMMs over every key, and the
    logits equal, bit for bit, those with every row whole (drops_tail forced False) and the
    generic path's."""
    from precisim.emulation import attention, patch
    from precisim.emulation.functions import Softmax

    model = _llama()
    ids = torch.randint(0, 96, (2, 80), generator=torch.Generator().manual_seed(2))
    bf16 = Recipe.from_yaml("name: b\nattention: bf16\nlinear: bf16")
    r = Recipe("x", attention=bf16.attention, linear=bf16.linear, softmax=sm)
    assert r.softmax.drop_gap == 1024.0
    monkeypatch.setattr(attention, "CHUNK_ROWS", 16)
    widths: list[int] = []
    own = Softmax.__call__
    monkeypatch.setattr(Softmax, "__call__",
                        lambda self, x, dim=-1: widths.append(x.shape[dim]) or own(self, x, dim))

    def run(telemetry: bool = False) -> tuple[torch.Tensor, list[int], dict]:
        widths.clear()
        with emulate(model, r, telemetry=telemetry) as em, torch.no_grad():
            y = model(ids).logits
            return y, list(widths), em.telemetry.state() if telemetry else {}

    cut, w, _ = run()
    assert sorted(set(w)) == [16, 32, 48, 64, 80]  # each chunk up to its last visible key
    # telemetry: rows cut at whole vectors of 32 keys; the same logits and counts as whole rows
    cut_t, w_t, tel_cut = run(telemetry=True)
    assert sorted(set(w_t)) == [32, 64, 80]
    monkeypatch.setattr(attention, "drops_tail", lambda x, c, gap: False)
    whole, w, _ = run()
    assert set(w) == {80}
    whole_t, _, tel_whole = run(telemetry=True)
    monkeypatch.setattr(patch, "chunkable", lambda spec: None)  # the generic path
    generic, _, _ = run()
    generic_t, _, tel_generic = run(telemetry=True)
    assert torch.equal(cut, whole) and torch.equal(cut, generic)
    for y in (cut_t, whole_t, generic_t):
        assert torch.equal(y, cut)
    assert tel_cut == tel_whole  # counters and calls (one per row chunk)
    assert {k: c for k, (c, _, _) in tel_cut.items()} == \
        {k: c for k, (c, _, _) in tel_generic.items()}  # the generic path: one call
    outs = [c for (m, role), (c, _, _) in tel_cut.items() if role == "output"]
    assert len(outs) == 2 and all(c["numel"] == 2 * 4 * 80 * 80 for c in outs), outs


def test_own_softmax_drops() -> None:
    """torch's float32 softmax here sends entries 1024 below the maximum to +0 (what the
    chunked attention's telemetry relies on to count cut-off keys as zeros), and not those
    within float32 exp's range."""
    from precisim.emulation.attention import own_softmax_drops

    assert own_softmax_drops(1024.0, "cpu")
    assert not own_softmax_drops(50.0, "cpu")


def test_drops_tail() -> None:
    """drops_tail: every later entry more than the gap below a finite maximum of the first
    c; exactly at the gap, NaN (in either part), an infinite or all -inf head: False."""
    from precisim.emulation.attention import drops_tail

    lo = torch.finfo(torch.float32).min
    x = torch.tensor([[3.0, 1.0, lo, -math.inf, 3.0 - 1025.0],
                      [-2.0, 0.5, -1e30, lo, -math.inf]])
    assert drops_tail(x, 2, 1024.0)
    assert not drops_tail(x, 1, 1024.0)  # row 1: 0.5 is not dropped
    for j, v in ((4, 3.0 - 1024.0), (3, math.nan), (0, math.nan), (0, math.inf)):
        y = x.clone()
        y[0, j] = v
        assert not drops_tail(y, 2, 1024.0), (j, v)
    assert not drops_tail(torch.full((1, 4), -math.inf), 2, 1024.0)
    assert drops_tail(torch.tensor([[1e38, -3e38]]), 1, 1024.0)
