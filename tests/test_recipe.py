"""Recipes: presets, YAML/JSON round trips, validation errors."""

from __future__ import annotations

import pytest
from precisim.emulation import (
    GemmSpec,
    Recipe,
    RecipeError,
    Rule,
    TensorSpec,
    available_recipes,
    get_recipe,
)
from precisim.formats.scaling import ScaledFormat


@pytest.mark.parametrize("name", available_recipes())
def test_presets_round_trip(name: str, tmp_path) -> None:
    r = get_recipe(name)
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert Recipe.from_json(r.to_json()) == r
    for suffix in (".yaml", ".json"):
        p = r.save(tmp_path / f"r{suffix}")
        assert Recipe.load(p) == r
        assert get_recipe(str(p)) == r


def test_required_presets_exist() -> None:
    for name in ("bf16", "fp8-e4m3", "deepseek-fp8", "mxfp8", "mxfp6", "mxfp4", "nvfp4"):
        assert name in available_recipes()
    ds = get_recipe("deepseek-fp8")
    assert ds.linear is not None and ds.linear.unit == "deepseek-fp8"
    assert ds.linear.input.resolve().granularity.blocks == ((-1, 128),)
    assert ds.linear.weight.resolve().granularity.name == "tile(128x128)"
    assert get_recipe("DeepSeek_FP8") == ds


def test_bits_per_element_includes_scales() -> None:
    assert get_recipe("mxfp4").bits_per_element()["weight"] == 4.25
    assert get_recipe("nvfp4").bits_per_element()["weight"] == 4.5
    assert get_recipe("mxfp8").bits_per_element()["input"] == 8.25
    assert get_recipe("bf16").bits_per_element()["kv_cache"] == 16.0
    assert get_recipe("fp32").bits_per_element()["weight"] is None


def test_rules_and_custom_scaling_from_yaml() -> None:
    text = """
name: mixed
linear: {input: mxfp4, weight: {format: mxfp4, scale_rule: rceil}}
attention:
  qk: e4m3
  kv_cache: {format: e4m3, scaling: group:64, scale_rule: amax}
rules:
  - match: "model.layers.0.*"
    linear: null
  - match: "re:.*down_proj"
    linear: {input: mxfp8, weight: mxfp8, unit: h100-e4m3, fidelity: fast}
  - match: Conv1D
    kind: type
    linear: bf16
"""
    r = Recipe.from_yaml(text)
    assert r.rules[0].kind == "glob" and r.rules[0].linear is None
    assert r.rules[1].kind == "regex" and r.rules[1].pattern == ".*down_proj"
    assert r.rules[1].linear.unit == "h100-e4m3" and r.rules[1].linear.fidelity == "fast"
    assert r.rules[2].kind == "type"
    assert r.linear.weight.resolve().rule.value == "rceil"
    kv = r.attention.kv_cache.resolve()
    assert isinstance(kv, ScaledFormat) and kv.granularity.blocks == ((-1, 64),)
    assert r.attention.qk.input == TensorSpec("e4m3")
    assert Recipe.from_yaml(r.to_yaml()) == r


def test_rule_matching() -> None:
    import torch

    g = Rule("model.*.q_proj", linear=None)
    assert g.matches("model.layers.3.q_proj", torch.nn.Linear)
    assert not g.matches("model.layers.3.k_proj", torch.nn.Linear)
    assert Rule(r"model\.layers\.\d+\.q_proj", kind="regex", linear=None).matches(
        "model.layers.12.q_proj", torch.nn.Linear)
    assert Rule("Linear", kind="type", linear=None).matches("x", torch.nn.Linear)
    assert Rule("Module", kind="type", linear=None).matches("x", torch.nn.Linear)  # via MRO
    assert not Rule("Embedding", kind="type", linear=None).matches("x", torch.nn.Linear)


@pytest.mark.parametrize("text, needle", [
    ("linear: {input: e9m9}", "e9m9"),
    ("linear: {input: mxfp4, weight: mxfq4}", "mxfq4"),
    ("linear: {input: {format: e4m3, rounding: sideways}}", "sideways"),
    ("linear: {inptu: e4m3}", "did you mean 'input'"),
    ("linear: {input: e4m3, weight: e4m3, unit: h200-e4m3}", "h200-e4m3"),
    ("linear: {input: e4m3, weight: e4m3, fidelity: exactish}", "exactish"),
    ("rules: [{match: 'a.*', kind: wildcard, linear: null}]", "wildcard"),
    ("rules: [{match: '(', kind: regex, linear: null}]", "bad regex"),
    ("rules: [{kind: glob, linear: null}]", "needs 'match'"),
    ("rules: [{match: 'x'}]", "overrides nothing"),
    ("rules: {match: 'x'}", "must be a list"),
    ("name: x\nlinera: bf16", "'linera'"),
    ("linear: [1, 2]", "expected a mapping"),
    ("linear: {input: {format: e4m3, scaling: blocks:7}}", "blocks:7"),
    ("linear: {input: {format: e4m3, sr_bits: 4}}", "needs rounding='sr'"),
    ("linear: {input: {format: e4m3, scale_rule: rceil}}", "needs a block-scaled format"),
    ("name: [unclosed", "malformed recipe YAML"),
    ("- just\n- a list", "must be a mapping"),
])
def test_bad_recipes_raise_clear_errors(text: str, needle: str) -> None:
    with pytest.raises(RecipeError, match=None) as info:
        Recipe.from_yaml(text)
    assert needle in str(info.value), str(info.value)


def test_unknown_preset_and_missing_file(tmp_path) -> None:
    with pytest.raises(RecipeError, match="unknown recipe 'mxfp44'; did you mean 'mxfp4'"):
        get_recipe("mxfp44")
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="suffix"):
        get_recipe("bf16").save(tmp_path / "r.txt")
    with pytest.raises(RecipeError, match="malformed recipe JSON"):
        Recipe.from_json("{")


def test_gemm_spec_shorthand() -> None:
    g = GemmSpec.parse("mxfp8", "x")
    assert g.input == g.weight == TensorSpec("mxfp8") and g.output is None
    assert GemmSpec.parse("high", "x") is None and GemmSpec.parse(None, "x") is None
    assert GemmSpec.parse("fp32", "x").input == TensorSpec("fp32")


CUSTOM_UNIT_YAML = """
name: fp4-acc13
linear:
  input: nvfp4
  weight: nvfp4
  unit: {base: h100-e4m3, name: fp4-acc13-k16, block_size: 16}
"""


def test_custom_matrix_unit_in_a_recipe(tmp_path) -> None:
    """A unit given as fields (a preset + changes) round-trips through YAML/JSON with every
    field, is what the emulated GEMM runs, and reaches the spec sheet's unit parameters."""
    import torch
    from precisim.emulation import get_unit, scaled_matmul, unit_from_dict, unit_to_dict
    from precisim.emulation.gemm import gemm, quantize_operand
    from precisim.formats.scaling import quantize_scaled

    r = Recipe.from_yaml(CUSTOM_UNIT_YAML)
    u = r.linear.matrix_unit()
    assert u == get_unit("h100-e4m3").with_(name="fp4-acc13-k16", block_size=16,
                                            description=u.description)
    assert r.linear.unit_name == "fp4-acc13-k16" and r.units() == ["fp4-acc13-k16"]
    assert "unit=fp4-acc13-k16/bit-exact" in r.linear.describe()
    d = r.to_dict()["linear"]["unit"]
    assert d["block_size"] == 16 and d["alignment_bits"] == 13 and d["acc_rounding"] == "rtz"
    assert unit_from_dict(unit_to_dict(u)) == u
    assert Recipe.from_yaml(r.to_yaml()) == r and Recipe.from_json(r.to_json()) == r
    assert Recipe.load(r.save(tmp_path / "r.yaml")) == r
    # a preset given by name stays a name in the saved recipe
    assert get_recipe("deepseek-fp8").to_dict()["linear"]["unit"] == "deepseek-fp8"
    # the GEMM runs that unit: equal to scaled_matmul of the NVFP4 parts on it
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 64, generator=g), torch.randn(8, 64, generator=g)
    wq = quantize_operand(w, r.linear.weight, need_parts=True)
    y = gemm(x, wq, r.linear)
    ref = scaled_matmul(quantize_scaled(x, "nvfp4", return_parts=True),
                        quantize_scaled(w, "nvfp4", return_parts=True), u)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("unit, needle", [
    ("{base: h100-e4m3, block_sise: 16}", "'block_sise' (did you mean 'block_size'?)"),
    ("{base: h100-e4m9}", "unknown matrix unit 'h100-e4m9'"),
    ("{alignment_bits: 13}", "needs a 'name'"),
    ("{base: h100-e4m3, alignment_bits: -3}", "alignment_bits"),
    ("[1, 2]", "expected a preset name or a mapping"),
])
def test_bad_custom_units(unit: str, needle: str) -> None:
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(f"name: x\nlinear: {{input: e4m3, weight: e4m3, unit: {unit}}}")
    assert needle in str(info.value), str(info.value)
