"""precisim.emulation.vectors: matrix-unit conformance vectors are reproduced bit for bit by
the fast matmul; files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from precisim.emulation import available_units, get_unit, matmul
from precisim.emulation.vectors import unit_vectors
from precisim.formats import get_format
from precisim.formats.vectors import Vectors, code_value, write_vectors


@pytest.fixture(autouse=True, scope="module")
def _single_thread(eager_single_thread):
    """Many small tensors: one intra-op thread (see conftest)."""


def _unit_tensors(rows: Vectors, unit):
    c_fmt = get_format(rows.meta["c_format"])

    def vals(s, fmt):
        return [code_value(fmt, int(h, 16)) for h in s.split()]

    a = torch.tensor([vals(r["a"], unit.a_format) for r in rows]).unsqueeze(1)
    b = torch.tensor([vals(r["b"], unit.b_format) for r in rows]).unsqueeze(2)
    c = torch.tensor([vals(r["c"], c_fmt) for r in rows]).reshape(-1, 1, 1)
    return a, b, c


def _check_unit(rows: Vectors, unit) -> None:
    a, b, c = _unit_tensors(rows, unit)
    d = matmul(a, b, unit, c).reshape(-1)
    out_fmt = get_format(rows.meta["out_format"])
    for r, got in zip(rows, d.tolist()):
        want = code_value(out_fmt, int(r["expected"], 16))
        assert (math.isnan(got) and math.isnan(want)) or (
            got == want and math.copysign(1, got) == math.copysign(1, want)), (r["case"], got,
                                                                             want)
        e = r["expected_value"]
        assert (math.isnan(e) and math.isnan(want)) or e == want


REPRESENTATIVE_UNITS = ["v100-fp16", "a100-fp16-fp16out", "a100-tf32", "h100-e4m3",
                        "h100-bf16", "deepseek-fp8", "exact-e5m2", "fma-bf16-bf16",
                        "mul-add-fp16-fp32"]


@pytest.mark.parametrize("name", REPRESENTATIVE_UNITS)
def test_unit_vectors_reproduced_by_matmul(name):
    """The fast emulation.matmul returns the expected bits of every vector (one of each unit
    structure: block sizes, fp16 accumulators, block-result bits, promotion, exact, FMA,
    rounded products)."""
    unit = get_unit(name)
    rows = unit_vectors(unit, n=8, seed=1, k_len=160 if name == "deepseek-fp8" else None)
    assert rows.meta["unit"] == name and rows.meta["k"] == len(rows[0]["a"].split())
    _check_unit(rows, unit)
    cases = {r["case"].split(" (")[0] for r in rows}
    assert {"all zero", "random", "cancellation", "exponent spread", "subnormal"} <= cases
    assert {"tie", "just above tie", "tie below", "overflow"} <= cases
    if unit.a_format.has_nan:
        assert "nan input" in cases


def test_unit_vectors_default_size_and_ties():
    unit = get_unit("fma-fp16-fp32")
    rows = unit_vectors(unit)
    assert rows.meta["k"] == 16 and len(rows) >= 100
    _check_unit(rows, unit)
    # ties at the fp32 accumulator: ties-to-even keeps an even C and rounds an odd C up
    ties = {r["case"]: r for r in rows if r["case"].startswith("tie (")}
    even, odd = ties["tie (even, +)"], ties["tie (odd, +)"]
    assert even["expected"] == even["c"]
    assert int(odd["expected"], 16) == int(odd["c"], 16) + 1
    assert unit_vectors("deepseek-fp8", n=0).meta["k"] == 256
    assert unit_vectors("exact-fp16", n=0).meta["k"] == 64


@pytest.mark.slow
@pytest.mark.parametrize("name", available_units())
def test_unit_vectors_every_preset_slow(name):
    unit = get_unit(name)
    _check_unit(unit_vectors(unit, n=100, seed=2), unit)


def test_write_unit_vectors_json(tmp_path):
    urows = unit_vectors("h100-e4m3", n=2)
    h = json.loads(write_vectors(urows, tmp_path / "u.json").read_text())["header"]
    assert h["unit"] == "h100-e4m3" and h["parameters"]["block_result_bits"] == 13
    assert h["parameters"]["a_format"] == "float8_e4m3fn" and "K" in h["encoding"]


def test_bad_unit_input():
    with pytest.raises(KeyError, match="unknown matrix unit 'h200-e4m3'"):
        unit_vectors("h200-e4m3")
    with pytest.raises(ValueError, match="k_len=0"):
        unit_vectors("h100-e4m3", k_len=0)
    with pytest.raises(ValueError, match="rounds stochastically"):
        unit_vectors(get_unit("fma-fp16-fp32").with_(name="sr", acc_rounding="sr",
                                                     acc_sr_bits=8))
