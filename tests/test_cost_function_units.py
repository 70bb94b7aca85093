"""Cost of table-based function units (exp, rcp, rsqrt: precisim.eval.cost_units.TableGeometry,
docs/cost-perf.md section 4b) and their rows in ``precisim cost``.

* every number of a unit's geometry (entries, entry width, stored and read bits, FMAs and
  multiplier widths) derives from the unit's fields, for the preset exp / rcp / rsqrt units and
  for changed fields, and the cost terms are priced from exactly those numbers;
* more entries -> strictly more area (energy unchanged: the same bits are read), a wider table
  format -> more area and energy, more Newton steps -> more of both, for exp, rcp and rsqrt;
* ``precisim cost`` lists function units (by default and by name, ``fn:NAME``), says they are a
  model and prices them per evaluated element; an unknown one is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from precisim.emulation.functions import get_function_unit
from precisim.eval.cli import main
from precisim.eval.cost import unit_cost
from precisim.eval.cost_units import TableGeometry
from precisim.formats import get_format


def _bits(name: str) -> int:
    return int(get_format(name).bits)


def _p(name: str) -> int:
    return get_format(name).man_bits + 1


@pytest.mark.parametrize("name", ["exp-lut64", "exp-lut16", "silu-lut64"])
def test_interpolated_table_geometry_derives_from_fields(name: str) -> None:
    u = get_function_unit(name)
    g = TableGeometry.of(u)
    w = _bits(u.table_format or u.working_format)
    assert g.entries == 2 ** u.table_bits + 1 and g.entry_bits == w  # linear: one closing entry
    assert g.stored_bits == (2 ** u.table_bits + 1) * w and g.read_bits == 2 * w
    assert g.fmas == 1 and g.multiplier == (_p(u.working_format),) * 2
    c = unit_cost(u)
    assert c.term("table").rom_bits == g.stored_bits and c.term("table").read_bits == g.read_bits
    assert c.term("interpolate").mul == g.multiplier_cells == 24 * 24
    near = dataclasses.replace(u, interpolation="none", table_bits=5, table_format="bf16")
    gn = TableGeometry.of(near)
    assert (gn.entries, gn.entry_bits, gn.read_entries, gn.fmas) == (32, 16, 1, 0)


@pytest.mark.parametrize("name,per_step", [("rcp-newton1", 2), ("rcp-newton2", 2),
                                           ("rsqrt-newton1", 3), ("rsqrt-newton2", 3)])
def test_newton_geometry_derives_from_fields(name: str, per_step: int) -> None:
    u = get_function_unit(name)
    g = TableGeometry.of(u)
    assert g.entries == 2 ** u.table_bits and g.entry_bits == _bits(u.table_format)
    assert g.read_entries == 1 and g.fmas == per_step * u.newton_steps
    c = unit_cost(u)
    assert c.term("seed_table").rom_bits == g.stored_bits
    assert c.term("newton").mul == g.multiplier_cells == g.fmas * _p(u.working_format) ** 2
    half = dataclasses.replace(u, working_format="bf16")
    assert TableGeometry.of(half).multiplier == (8, 8)
    assert unit_cost(half).term("newton").mul == g.fmas * 64


@pytest.mark.parametrize("name", ["exp-lut16", "rcp-newton1", "rsqrt-newton1"])
def test_more_entries_more_area(name: str) -> None:
    u = get_function_unit(name)
    prev = unit_cost(u)
    for n in range(u.table_bits + 1, u.table_bits + 5):
        cur = unit_cost(dataclasses.replace(u, table_bits=n))
        assert cur.area > prev.area  # strictly: more ROM cells
        assert cur.energy == pytest.approx(prev.energy)  # the same bits are read
        prev = cur
    wide = dataclasses.replace(u, table_format="fp32")
    narrow = dataclasses.replace(u, table_format="bf16")
    assert unit_cost(wide).area > unit_cost(narrow).area
    assert unit_cost(wide).energy > unit_cost(narrow).energy


def test_more_newton_steps_cost_more() -> None:
    for fn in ("rcp", "rsqrt"):
        u = get_function_unit(f"{fn}-newton1")
        costs = [unit_cost(dataclasses.replace(u, newton_steps=s)) for s in range(4)]
        assert all(b.area > a.area and b.energy > a.energy for a, b in zip(costs, costs[1:]))


def test_cost_command_lists_function_units(capsys) -> None:
    assert main(["cost"]) == 0
    out = capsys.readouterr().out
    assert "| fn:exp-lut64 | function |" in out and "| fn:rsqrt-newton1 | function |" in out
    assert "not measured" in out and "one evaluated element (function units)" in out
    assert main(["cost", "rcp-newton1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    row = d["rows"][0]
    assert row["kind"] == "function" and "128 x 16 bits stored" in row["datapath"]
    assert row["energy"] == pytest.approx(unit_cost(get_function_unit("rcp-newton1")).energy)
    assert main(["cost", "fn:exp-lut99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown function unit 'exp-lut99'; did you mean" in err[0]
    assert main(["cost", "nothing-at-all"]) == 2
    assert "nor a function unit" in capsys.readouterr().err
