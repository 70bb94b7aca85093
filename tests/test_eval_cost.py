"""The datapath cost model (precisim.eval.cost, docs/cost-perf.md): every term follows its
stated formula, costs are monotone in the widths, the stated multiplier ratios hold, the
baseline is 1, coefficients are overridable, and every output says it is a model."""

from __future__ import annotations

import math

import pytest
from precisim.emulation import GemmSpec, MatrixUnit, get_recipe, get_unit
from precisim.eval.cost import (
    BASELINE_UNIT,
    HOROWITZ_2014,
    MODEL_NOTE,
    CostCoefficients,
    CostError,
    DatapathCost,
    gemm_cost,
    implied_unit,
    recipe_cost,
    register_cost_model,
    unit_cost,
)

C = HOROWITZ_2014


def _clog2(n: float) -> int:
    return math.ceil(math.log2(n)) if n > 1 else 0


def test_coefficients_come_from_the_cited_figures() -> None:
    # Horowitz ISSCC 2014, 45 nm: 8b mult 0.2 pJ / 282 um^2; 32b add 0.1 pJ / 137 um^2;
    # 32b fp add 0.9 pJ / 4184 um^2
    assert C.mul_cell_pj == pytest.approx(0.2 / 64)
    assert C.mul_cell_um2 == pytest.approx(282 / 64)
    assert C.add_bit_pj == pytest.approx(0.1 / 32)
    assert C.add_bit_um2 == pytest.approx(137 / 32)
    # an fp32 adder = 24 + 8 adder bits + two 24-bit, 5-stage shifters, by construction
    assert 32 * C.add_bit_pj + 2 * 24 * 5 * C.shift_cell_pj == pytest.approx(0.9)
    assert 32 * C.add_bit_um2 + 2 * 24 * 5 * C.shift_cell_um2 == pytest.approx(4184)


def test_baseline_is_one_and_outputs_say_they_are_a_model() -> None:
    base = unit_cost(BASELINE_UNIT)
    assert base.energy == pytest.approx(1.0) and base.area == pytest.approx(1.0)
    assert get_unit(BASELINE_UNIT) == get_unit("fma-bf16-fp32")
    u = unit_cost("h100-e4m3")
    assert u.note == MODEL_NOTE and "not measured" in u.note
    assert "not measured" in u.table() and u.to_dict()["note"] == MODEL_NOTE
    assert gemm_cost(get_recipe("nvfp4").linear).to_dict()["note"] == MODEL_NOTE


@pytest.mark.parametrize("name", ["h100-e4m3", "h100-bf16", "a100-tf32", "v100-fp16",
                                  "deepseek-fp8", "fma-bf16-fp32", "exact-fp16",
                                  "mul-add-fp16-fp32", "h100-fp16-fp16out"])
def test_each_term_follows_its_formula(name: str) -> None:
    u = get_unit(name)
    c = unit_cost(u)
    a, b, acc = u.a_format, u.b_format, u.acc_format
    pa, pb, pacc = a.man_bits + 1, b.man_bits + 1, acc.man_bits + 1
    k = u.block_size
    n = k + (1 if u.c_mode.value == "joint" else 0)
    assert c.term("multiplier").mul == pa * pb
    e_prod = max(a.exp_bits, b.exp_bits) + 1
    assert c.term("exponent_add").add == e_prod
    e_cmp = max(e_prod, acc.exp_bits if u.c_mode.value == "joint" else 0) + 1
    assert c.term("max_exponent").add == pytest.approx((n - 1) * e_cmp / k)
    if u.alignment_bits is not None:
        w = u.alignment_bits + 2
        assert c.term("alignment").shift == pytest.approx(n * w * _clog2(w) / k)
    elif k == 1:
        w = pa + pb + pacc + 2
        assert c.term("alignment").shift == pytest.approx(w * _clog2(w))
    else:
        w = c.term("alignment").shift  # exact block sums: checked below for monotonicity
        w = None
    if w is not None:
        ws = w + _clog2(n)
        assert c.term("adder_tree").add == pytest.approx((n - 1) * ws / k)
        assert c.term("normalise").shift == pytest.approx(ws * _clog2(ws) / k)
    p_blk = (u.block_result_bits + 1) if u.block_result_bits is not None else pacc
    rnd = 0 if u.acc_rounding.value == "rtz" else p_blk
    assert c.term("round").add == pytest.approx(rnd / k)
    if u.promotion_interval:
        pp = u.promotion_format.man_bits + 1
        ep = u.promotion_format.exp_bits
        t = c.term("promotion")
        assert t.add == pytest.approx((pp + ep + pp) / u.promotion_interval)
        assert t.shift == pytest.approx(2 * pp * _clog2(pp) / u.promotion_interval)
    if u.product_format is not None:
        assert c.term("product_rounding").shift == pa + pb
    # totals are the sum of the terms, priced by the coefficients
    e = sum(t.mul * C.mul_cell_pj + t.add * C.add_bit_pj + t.shift * C.shift_cell_pj
            for t in c.terms)
    assert c.energy_pj == pytest.approx(e)
    assert c.energy == pytest.approx(e / unit_cost(BASELINE_UNIT).energy_pj)


def test_scale_application_terms() -> None:
    # MX (E8M0) on a k=32 unit: exponent adds only, once per 32 products
    mx = gemm_cost(GemmSpec.parse({"input": "mxfp8", "weight": "mxfp8",
                                   "unit": {"base": "h100-e4m3", "name": "mx-k32"}}, "t"))
    t = mx.datapath.term("scale_apply")
    assert t.mul == 0 and t.add == pytest.approx(((2 - 1) * (8 + 1) + 8 + 2) / 32)
    # NVFP4 (E4M3 scales, blocks of 16) on a k=16 unit: a 4x4 scale multiply and the block sum
    # (block result 13 bits: 14-bit significand) times the 7-bit scale product, per 16 products
    nv = gemm_cost(GemmSpec.parse({"input": "nvfp4", "weight": "nvfp4",
                                   "unit": {"base": "h100-e4m3", "name": "nv-k16",
                                            "block_size": 16}}, "t"))
    t = nv.datapath.term("scale_apply")
    assert t.mul == pytest.approx((4 * 4 + 14 * (4 + 4 - 1)) / 16)
    assert t.add == pytest.approx(((2 - 1) * (4 + 1) + 4 + 2) / 16)
    # an E4M3 multiply costs more than an E8M0 shift, per product
    assert t.energy_pj(C) > mx.datapath.term("scale_apply").energy_pj(C)
    # DeepSeek-style fp32 scales are applied at promotion, once per 128 products
    ds = gemm_cost(get_recipe("deepseek-fp8").linear)
    t = ds.datapath.term("scale_apply")
    assert t.mul == pytest.approx((24 * 24 + 14 * (24 + 24 - 1)) / 128)
    # per-tensor scales are amortised over the output: no per-product term
    ft = gemm_cost(get_recipe("fp8-e4m3").linear)
    assert "scale_apply" not in [x.name for x in ft.datapath.terms]
    # storage bits come from the recipe's formats (scales included)
    assert mx.bits == {"input": 8.25, "weight": 8.25}
    assert nv.bits == {"input": 4.5, "weight": 4.5}


def test_multiplier_ratios() -> None:
    """E2M1 x E2M1 < E4M3 x E4M3 < bf16 x bf16 by the stated ratios (p_a p_b: 4, 16, 64)."""
    mults = {}
    for f in ("e2m1", "e4m3", "bf16"):
        u = MatrixUnit(f"t-{f}", f, block_size=16, alignment_bits=25)
        mults[f] = unit_cost(u).term("multiplier")
    e = {f: t.energy_pj(C) for f, t in mults.items()}
    a = {f: t.area_um2(C) for f, t in mults.items()}
    assert e["e2m1"] < e["e4m3"] < e["bf16"] and a["e2m1"] < a["e4m3"] < a["bf16"]
    assert e["e2m1"] / e["e4m3"] == pytest.approx(1 / 4)
    assert e["e4m3"] / e["bf16"] == pytest.approx(1 / 4)
    assert a["e2m1"] / a["e4m3"] == pytest.approx(1 / 4)


def _total(u: MatrixUnit) -> tuple[float, float]:
    c = unit_cost(u)
    return c.energy, c.area


@pytest.mark.parametrize("base", ["h100-e4m3", "h100-bf16", "a100-tf32", "fma-bf16-fp32",
                                  "deepseek-fp8", "exact-e4m3"])
def test_monotone(base: str) -> None:
    """A wider accumulator, more alignment bits or a wider significand never costs less."""
    u = get_unit(base)
    e0, a0 = _total(u)
    if u.alignment_bits is not None:
        for f in range(1, 40, 3):
            e, a = _total(u.with_(alignment_bits=u.alignment_bits + f))
            assert e >= e0 and a >= a0
        prev = (0.0, 0.0)
        for f in range(0, 40):
            cur = _total(u.with_(alignment_bits=f, block_result_bits=None))
            assert cur[0] >= prev[0] and cur[1] >= prev[1]
            prev = cur
    # accumulator significand: fp16-like -> tf32-like -> fp32 (same range)
    prev = (0.0, 0.0)
    for acc in ("e8m7", "e8m10", "e8m15", "fp32"):
        cur = _total(u.with_(acc_format=acc, block_result_bits=None, acc_overflow=None))
        assert cur[0] >= prev[0] and cur[1] >= prev[1]
        prev = cur
    # block result bits
    if u.block_result_bits is not None:
        prev = (0.0, 0.0)
        for bits in range(1, 24):  # (0 fraction bits is refused on an fp32 accumulator)
            cur = _total(u.with_(block_result_bits=bits, acc_rounding="rne"))
            assert cur[0] >= prev[0] and cur[1] >= prev[1]
            prev = cur
    # input significand (same exponent width)
    e = u.a_format.exp_bits
    prev = (0.0, 0.0)
    for m in range(0, 8):
        try:
            v = u.with_(a_format=f"e{e}m{m}", b_format=f"e{e}m{m}")
        except ValueError:
            continue
        cur = _total(v)
        assert cur[0] >= prev[0] and cur[1] >= prev[1]
        prev = cur


def test_known_orderings() -> None:
    # a block FMA amortises the accumulator: cheaper per product than one FMA per product
    assert unit_cost("h100-bf16").energy < unit_cost("fma-bf16-fp32").energy
    # FP8 with a 13-bit alignment window is cheaper than bf16 with 25 bits
    assert unit_cost("h100-e4m3").energy < unit_cost("h100-bf16").energy
    # a Kulisch accumulator over bf16 products is far more expensive
    assert unit_cost("exact-bf16").area > 3 * unit_cost("h100-bf16").area
    # rounding to nearest costs an incrementer truncation does not
    u = get_unit("h100-bf16")
    assert unit_cost(u.with_(acc_rounding="rne")).energy > unit_cost(u).energy


def test_integer_dot_product() -> None:
    from precisim.formats import IntFormat

    u = MatrixUnit("int8-dot", "int8", block_size=32, acc_format=IntFormat("int24", 24),
                   acc_overflow="wrap")
    c = unit_cost(u)
    assert c.term("multiplier").mul == 64
    assert c.term("adder_tree").add == pytest.approx(31 * (16 + 5) / 32)
    assert c.term("accumulate").add == pytest.approx(24 / 32)
    # an FP8 dot product costs more than an INT8 one with the same k (van Baalen et al. 2023
    # report 50-180% more for FP8 MACs)
    assert 1.2 < unit_cost("h100-e4m3").energy / c.energy < 3.0


def test_coefficients_override_and_errors(tmp_path) -> None:
    cheap_shift = C.with_(fp32_add_pj=0.3)
    assert cheap_shift.shift_cell_pj < C.shift_cell_pj
    c1 = unit_cost("h100-e4m3", cheap_shift)
    assert c1.coefficients == cheap_shift and c1.energy_pj < unit_cost("h100-e4m3").energy_pj
    assert unit_cost("h100-e4m3", {"int8_mult_pj": 0.4}).term("multiplier").energy_pj(
        C.with_(int8_mult_pj=0.4)) == pytest.approx(16 * 0.4 / 64)
    p = tmp_path / "c.yaml"
    p.write_text("name: mine\nint8_mult_pj: 0.1\n")
    assert CostCoefficients.load(p).int8_mult_pj == 0.1
    with pytest.raises(CostError, match="unknown key.*'int8_mul_pj'.*accepted"):
        CostCoefficients.from_dict({"int8_mul_pj": 1})
    with pytest.raises(CostError, match="fp32_add_pj=-1.*positive"):
        C.with_(fp32_add_pj=-1)
    with pytest.raises(CostError, match="must exceed"):
        C.with_(fp32_add_pj=0.05)
    with pytest.raises(KeyError, match="unknown matrix unit 'h100-e4m4'"):
        unit_cost("h100-e4m4")
    with pytest.raises(CostError, match="no cost model for int"):
        unit_cost(3)


def test_register_cost_model_for_a_new_unit_type() -> None:
    class Sfu:
        name = "exp2-sfu"

    def cost(sfu: Sfu, coefficients: CostCoefficients) -> DatapathCost:
        from precisim.eval.cost import CostTerm

        return DatapathCost(sfu.name, (CostTerm("table", "64 add bits", add=64),),
                            coefficients, *_baseline(coefficients))

    def _baseline(c: CostCoefficients) -> tuple[float, float]:
        b = unit_cost(BASELINE_UNIT, c)
        return b.energy_pj, b.area_um2

    register_cost_model(Sfu, cost)
    try:
        assert unit_cost(Sfu()).energy == pytest.approx(64 * C.add_bit_pj /
                                                        unit_cost(BASELINE_UNIT).energy_pj)
        with pytest.raises(ValueError, match="registered already"):
            register_cost_model(Sfu, cost)
    finally:
        from precisim.eval.cost import COST_MODELS

        del COST_MODELS[Sfu]


def test_implied_unit_and_recipe_cost() -> None:
    u = implied_unit(get_recipe("nvfp4").linear)
    assert u.a_format.name == "float4_e2m1fn" and u.block_size == 16
    assert u.alignment_bits == 25 and u.acc_format.name == "fp32"
    assert implied_unit(get_recipe("mxfp8").linear).block_size == 32
    assert implied_unit(get_recipe("deepseek-fp8").linear).name == "deepseek-fp8"
    w_only = gemm_cost({"weight": "mxfp4"})
    assert w_only.bits == {"input": 16.0, "weight": 4.25}
    assert implied_unit(GemmSpec.parse({"weight": "mxfp4"}, "t")).a_format.name == "bf16"
    assert recipe_cost("fp32") is None
    assert recipe_cost("nvfp4").energy == gemm_cost(get_recipe("nvfp4").linear).energy
    assert recipe_cost("mxfp4", "attention.qk").bits["input"] == 8.25
    g = recipe_cost("bf16")
    assert g.traffic_pj("weight", "dram") == pytest.approx(16 * C.dram_bit_pj)
    assert g.traffic("weight", "sram") > 0
    with pytest.raises(CostError, match="level='hbm'"):
        g.traffic("weight", "hbm")


def test_a_recipe_with_rules_is_priced_per_module() -> None:
    """recipe_module_cost prices every linear module at the spec its rule gives it, weighted by
    its products per token (in x out): NVFP4 by default, MXFP8 on the second layer, the third
    left in high precision (bf16 x bf16); the spec sheet's cost column uses it for a recipe with
    rules given the model (the default spec alone for the same recipe without a model), and a
    recipe without rules costs what its default spec does."""
    import torch
    from precisim.emulation import Recipe, Rule
    from precisim.eval.cost import recipe_module_cost
    from precisim.eval.spec import _cost_info

    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False),
                                torch.nn.Linear(32, 128, bias=False),
                                torch.nn.Linear(128, 16, bias=False))
    mx = {"input": "mxfp8", "weight": "mxfp8"}
    r = Recipe("mix", linear={"input": "nvfp4", "weight": "nvfp4"},
               rules=(Rule("1", "glob", linear=mx), Rule("2", "glob", linear=None)))
    rc = recipe_module_cost(r, model)
    assert rc is not None and rc.macs == 64 * 32 + 32 * 128 + 128 * 16
    nv, m8, hp = gemm_cost("nvfp4"), gemm_cost(mx), gemm_cost(GemmSpec())
    w = (64 * 32, 32 * 128, 128 * 16)
    for attr in ("energy", "area"):
        want = (w[0] * getattr(nv, attr) + w[1] * getattr(m8, attr)
                + w[2] * getattr(hp, attr)) / sum(w)
        assert getattr(rc, attr) == pytest.approx(want, rel=1e-12)
    assert rc.bits["weight"] == pytest.approx((w[0] * 4.5 + w[1] * 8.25 + w[2] * 16) / sum(w))
    assert rc.energy != pytest.approx(nv.energy)
    assert "not measured" in rc.note
    sheet = _cost_info(r, model)
    assert sheet["energy"] == pytest.approx(rc.energy) and "per module" in sheet["priced"]
    assert _cost_info(r)["energy"] == pytest.approx(nv.energy)  # no model: default spec
    plain = recipe_module_cost("nvfp4", model)
    assert plain.energy == pytest.approx(nv.energy) and plain.bits["weight"] == 4.5
    assert recipe_module_cost("nvfp4", torch.nn.Sequential(torch.nn.ReLU())) is None


# ---------------------------------------------------------------------------------------------
# the non-GEMM units (precisim.eval.cost_units, docs/cost-perf.md section 4b)

def _fu(**kw):
    from precisim.emulation.functions import FunctionUnit

    return FunctionUnit(**{"name": "t", "function": "exp2", **kw})


def test_function_unit_terms_follow_their_formulas() -> None:
    """Table, polynomial and Newton units: every term's cells are its stated formula, and the
    total is the cells priced by the coefficients (table bits at one SRAM cell of area and one
    SRAM bit read each)."""
    from precisim.eval.cost_units import fma_cells, fp_add_cells

    fma = fma_cells(24, 8)
    assert fma == {"mul": 576.0, "add": 48 + 8 + 8.0, "shift": 2 * 48 * 6.0}
    assert fp_add_cells(24, 8) == {"add": 32.0, "shift": 240.0}  # Horowitz's fp32 adder
    assert 32 * C.add_bit_pj + 240 * C.shift_cell_pj == pytest.approx(0.9)
    t = unit_cost(_fu(method="table", table_bits=6, table_format="bf16"))
    tab = t.term("table")
    assert tab.rom_bits == (64 + 1) * 16 and tab.read_bits == 2 * 16  # linear: 2 entries read
    assert t.term("interpolate").mul == 576
    assert t.term("range_reduction").add == 24 + 8 and t.term("output_round").add == 24 + 8
    near = unit_cost(_fu(method="table", table_bits=6, interpolation="none"))
    assert near.term("table").rom_bits == 64 * 32 and near.term("table").read_bits == 32
    with pytest.raises(KeyError):
        near.term("interpolate")
    p = unit_cost(_fu(method="polynomial", degree=5, table_bits=2))
    assert p.term("coefficients").rom_bits == 4 * 6 * 32
    assert p.term("coefficients").read_bits == 6 * 32
    assert p.term("horner").mul == 5 * 576
    n = unit_cost(_fu(function="rsqrt", method="newton", table_bits=7, newton_steps=2,
                      table_format="bf16"))
    assert n.term("seed_table").rom_bits == 128 * 16 and n.term("newton").mul == 2 * 3 * 576
    r = unit_cost(_fu(function="rcp", method="newton", table_bits=7, newton_steps=1))
    assert r.term("newton").mul == 2 * 576
    ex = unit_cost(_fu())  # exact: priced as the cubic reaching fp32 (2^7 pieces)
    assert ex.term("coefficients").rom_bits == 128 * 4 * 32 and ex.term("horner").mul == 1728
    for d in (t, p, n):
        e = sum(x.mul * C.mul_cell_pj + x.add * C.add_bit_pj + x.shift * C.shift_cell_pj
                + x.read_bits * C.sram_bit_pj for x in d.terms)
        a = sum(x.mul * C.mul_cell_um2 + x.add * C.add_bit_um2 + x.shift * C.shift_cell_um2
                + x.rom_bits * C.sram_cell_um2 for x in d.terms)
        assert d.energy_pj == pytest.approx(e) and d.area_um2 == pytest.approx(a)
        assert "not measured" in d.note


def test_function_unit_cost_is_monotone() -> None:
    """More table entries, a higher degree, more Newton steps, wider table / coefficient /
    working formats never cost less (area and energy)."""
    def le(a, b):
        ca, cb = unit_cost(a), unit_cost(b)
        return ca.area <= cb.area and ca.energy <= cb.energy

    assert le(_fu(method="table", table_bits=4), _fu(method="table", table_bits=6))
    assert unit_cost(_fu(method="table", table_bits=4)).area < \
        unit_cost(_fu(method="table", table_bits=8)).area
    assert le(_fu(method="table", table_bits=6, table_format="bf16"),
              _fu(method="table", table_bits=6, table_format="fp32"))
    assert le(_fu(method="table", table_bits=6, interpolation="none"),
              _fu(method="table", table_bits=6))
    for d in range(0, 5):
        assert le(_fu(method="polynomial", degree=d), _fu(method="polynomial", degree=d + 1))
    assert le(_fu(method="polynomial", degree=3, table_bits=2),
              _fu(method="polynomial", degree=3, table_bits=4))
    assert le(_fu(method="polynomial", degree=3, coef_format="bf16"),
              _fu(method="polynomial", degree=3))
    for s in range(0, 3):
        assert le(_fu(function="rcp", method="newton", table_bits=7, newton_steps=s),
                  _fu(function="rcp", method="newton", table_bits=7, newton_steps=s + 1))
    assert le(_fu(function="rcp", method="newton", table_bits=5, newton_steps=1),
              _fu(function="rcp", method="newton", table_bits=8, newton_steps=1))
    assert le(_fu(method="polynomial", working_format="bf16"), _fu(method="polynomial"))


def test_reduction_and_attention_datapath_costs() -> None:
    """A sum costs one adder per element in its format (p + e add bits, 2 p ceil(log2 p)
    shift cells), a max one comparator; wider formats never cost less. The attention datapath's
    terms follow their formulas; a wider P format, a wider accumulator or a longer head never
    cost less, a longer tile never more."""
    import dataclasses

    from precisim.emulation.flash import get_datapath
    from precisim.emulation.functions import Reduction
    from precisim.eval.cost_units import attention_datapath_cost

    s = unit_cost(Reduction("sum", "bf16"))
    assert s.terms[0].add == 8 + 8 and s.terms[0].shift == 2 * 8 * 3
    assert unit_cost(Reduction("max", "fp32")).terms[0].add == 32
    sums = [unit_cost(Reduction("sum", f)) for f in ("bf16", "fp16", "fp32")]
    assert [x.energy for x in sums] == sorted(x.energy for x in sums)
    assert unit_cost(Reduction("sum", "fp32", order="sequential")).energy == \
        pytest.approx(unit_cost(Reduction("sum", "fp32")).energy)
    fa3 = get_datapath("fa3-fp8")
    c = attention_datapath_cost(fa3, head_dim=64)
    assert c.term("pv_multiply").mul == 64 * 4 * 4  # e4m3 P x e4m3 V significands
    assert c.term("p_cast").add == 4 + 4 and c.term("running_max").add == 32
    assert c.term("rescale").mul == pytest.approx((576 + 64 * 576) / 128)
    assert unit_cost(fa3).energy == pytest.approx(attention_datapath_cost(fa3).energy)

    def le(a, b, **kw):
        ca, cb = attention_datapath_cost(a, **kw), attention_datapath_cost(b, **kw)
        return ca.energy <= cb.energy and ca.area <= cb.area

    assert le(fa3, dataclasses.replace(fa3, p_format="bf16"))
    assert le(dataclasses.replace(fa3, p_format="bf16"), dataclasses.replace(fa3, p_format=None))
    assert le(dataclasses.replace(fa3, acc_format="fp16"), fa3)
    assert le(dataclasses.replace(fa3, sum_format="bf16"), fa3)
    assert le(dataclasses.replace(fa3, tile=256), fa3)
    assert attention_datapath_cost(fa3, head_dim=64).energy < \
        attention_datapath_cost(fa3, head_dim=128).energy
    with pytest.raises(ValueError, match="head_dim=0"):
        attention_datapath_cost(fa3, head_dim=0)
