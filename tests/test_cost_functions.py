"""Cost models of the softmax, norm and activation units (precisim.eval.cost_functions,
docs/cost-perf.md section 4b) and their ``precisim cost --detail`` text.

* ``precisim cost --detail`` lists, for every preset softmax, norm and activation unit, each of
  its cost terms (name and formula) like a matrix unit's, and says it is a model;
* each term follows its stated formula (cells counted by hand from the formats: fp32 p = 24,
  e = 8; bf16 p = 8, e = 8), the total is the sum of the terms, per-row work is divided by the
  row length, the function units inside are their own section-4b terms;
* a LayerNorm costs more than the RMSNorm with the same fields (mean and centring), a wider
  working format never costs less; bad input is refused with the value named.
"""

from __future__ import annotations

import dataclasses

import pytest
from precisim.emulation.functions import (
    ACTIVATION_UNITS,
    NORMS,
    SOFTMAXES,
    Activation,
    Norm,
    Softmax,
)
from precisim.eval.cli import main
from precisim.eval.cost import MODEL_NOTE, unit_cost
from precisim.eval.cost_functions import ROW, norm_cost, softmax_cost
from precisim.eval.cost_units import fp_add_cells, function_unit_terms

PRESETS = [(k, reg, n) for k, reg in (("softmax", SOFTMAXES), ("norm", NORMS),
                                      ("activation", ACTIVATION_UNITS)) for n in reg.names()]


def _cells(terms) -> dict[str, float]:
    return {k: sum(getattr(t, k) for t in terms) for k in ("mul", "add", "shift")}


def test_cost_detail_lists_every_term(capsys) -> None:
    names = [f"{k}:{n}" for k, _, n in PRESETS]
    assert main(["cost", ",".join(names), "--detail"]) == 0
    out = capsys.readouterr().out
    assert MODEL_NOTE in out
    blocks = out.split("\n**")[1:]  # one detail table per name, in order
    assert len(blocks) == len(names)
    for (_, reg, n), block in zip(PRESETS, blocks):
        dp = unit_cost(reg.get(n))
        assert block.startswith(f"{dp.name}**"), (n, block[:40])
        rows = {line.split("|")[1].strip(): line for line in block.splitlines()
                if line.startswith("| ") and not line.startswith("| term")}
        for t in dp.terms:
            if t.energy_pj(dp.coefficients) or t.area_um2(dp.coefficients):
                assert t.name in rows, (n, t.name)
                assert t.formula in rows[t.name], (n, t.name)
        assert "total" in rows
    # and the summary rows name the kind
    for k, _, n in PRESETS:
        assert f"| {k}:{n} | {k} |" in out


def test_softmax_terms_follow_their_formulas() -> None:
    s = SOFTMAXES.get("softmax-exact")
    dp = softmax_cost(s)
    t = {x.name: x for x in dp.terms}
    fp32_add = fp_add_cells(24, 8)
    assert (t["input_cast"].add, t["max"].add) == (32.0, 32.0)
    assert (t["subtract"].add, t["subtract"].shift) == (fp32_add["add"], fp32_add["shift"])
    assert (t["sum"].add, t["sum"].shift) == (32.0, 2 * 24 * 5)
    exp = _cells(function_unit_terms(s.exp))
    assert (t["exp"].mul, t["exp"].add, t["exp"].shift) == (exp["mul"], exp["add"],
                                                            exp["shift"])
    rcp = _cells(function_unit_terms(s.rcp))
    assert t["divide"].mul == rcp["mul"] + 24 * 24 and t["divide"].add == rcp["add"] + 32
    assert t["output_round"].add == 16.0  # None: bf16, p + e = 8 + 8
    assert dp.energy_pj == pytest.approx(sum(x.energy_pj(dp.coefficients) for x in dp.terms))
    # the reciprocal form: one rcp per row, one multiply per element
    r = dataclasses.replace(s, division="reciprocal")
    for row in (1, 64, ROW):
        tr = {x.name: x for x in softmax_cost(r, row=row).terms}
        assert tr["reciprocal"].mul == pytest.approx(rcp["mul"] / row)
        assert tr["scale"].mul == 24 * 24 and tr["scale"].add == 32
    assert softmax_cost(r).energy < dp.energy  # a divide per element costs more
    with pytest.raises(ValueError, match="row=0 is not valid"):
        softmax_cost(s, row=0)


def test_norm_and_activation_terms() -> None:
    rms = NORMS.get("rmsnorm")
    t = {x.name: x for x in norm_cost(rms).terms}
    assert (t["square"].mul, t["square"].add) == (24 * 24, 32)
    assert (t["sum_squares"].add, t["sum_squares"].shift) == (32.0, 240.0)
    assert t["variance"].mul == pytest.approx(24 * 24 / ROW)
    rs = _cells(function_unit_terms(rms.rsqrt))
    assert t["rsqrt"].mul == pytest.approx(rs["mul"] / ROW)
    assert (t["weight"].mul, t["weight"].add) == (8 * 8, 16)  # output None: bf16
    layer = dataclasses.replace(rms, kind="layer")
    assert {"mean", "center"} <= {x.name for x in norm_cost(layer).terms}
    assert norm_cost(layer).energy > norm_cost(rms).energy
    narrow = dataclasses.replace(rms, working_format="bf16")
    assert norm_cost(narrow).energy < norm_cost(rms).energy
    assert norm_cost(narrow).area < norm_cost(rms).area
    # an activation via its unit: the unit's cells and the rounding
    a = ACTIVATION_UNITS.get("silu-table64")
    ta = {x.name: x for x in unit_cost(a).terms}
    u = _cells(function_unit_terms(a.unit))
    assert (ta["unit"].mul, ta["unit"].add, ta["unit"].shift) == (u["mul"], u["add"],
                                                                  u["shift"])
    # via exp and rcp: gelu_tanh adds three multiplies and an add to SiLU's datapath
    silu = unit_cost(ACTIVATION_UNITS.get("silu-sfu"))
    gelu = unit_cost(ACTIVATION_UNITS.get("gelu-tanh-sfu"))
    arg = gelu.term("argument")
    assert arg.mul == 3 * 24 * 24 and arg.add == 3 * 32 + 32
    assert gelu.energy_pj == pytest.approx(silu.energy_pj + arg.energy_pj(gelu.coefficients))
    for spec in (Softmax(), Norm(), Activation()):
        assert unit_cost(spec).energy > 0


def test_cost_command_refuses_unknown_units(capsys) -> None:
    assert main(["cost", "softmax:nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown softmax unit 'nope'" in err[0]
    assert main(["cost", "no-such-unit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'no-such-unit' is neither" in err[0] and "softmax" in err[0]
