"""precisim.formats.vectors: format conformance vectors agree with the fast encode; files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from precisim.formats import FormatError, catalog, encode, get_format
from precisim.formats.vectors import (
    Vectors,
    code_value,
    format_vectors,
    hex_code,
    rows_sha256,
    value_code,
    write_vectors,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread(eager_single_thread):
    """Many small tensors: one intra-op thread (see conftest)."""


def _fast_codes(rows, fmt, rounding, overflow, **kw) -> list[int]:
    bits = np.array([int(r["input_bits"], 16) for r in rows], dtype=np.uint32).view(np.int32)
    x = torch.from_numpy(bits).view(torch.float32)
    return (encode(x, fmt, rounding, overflow, **kw).to(torch.int64) & 0xFFFFFFFF).tolist()


def _check_format(rows: Vectors, fmt, rounding, overflow, **kw) -> None:
    f = get_format(fmt)
    fast = _fast_codes(rows, f, rounding, overflow, **kw)
    bad = [(r, hex(c)) for r, c in zip(rows, fast) if int(r["expected_code"], 16) != c]
    assert not bad, bad[:5]
    for r in rows:  # the expected value is the value of the expected code
        v = code_value(f, int(r["expected_code"], 16))
        e = r["expected"]
        assert (math.isnan(v) and math.isnan(e)) or (
            v == e and math.copysign(1, v) == math.copysign(1, e)), r
        x = np.array([int(r["input_bits"], 16)], dtype=np.uint32).view(np.float32)[0]
        assert (math.isnan(x) and math.isnan(r["input"])) or float(x) == r["input"]


@pytest.mark.parametrize("name", [f.name for f in catalog()])
def test_format_vectors_equal_fast_encode(name):
    """Every catalog format, default rounding (RNE) and overflow: the codes from the exact
    reference equal precisim.formats.encode on the same float32 inputs."""
    rows = format_vectors(name, n_random=200)
    _check_format(rows, name, "rne", rows.meta["overflow"])
    f = get_format(name)
    cases = {r["case"] for r in rows}
    for needed in ("zero", "-zero", "inf", "-inf", "f32 min subnormal", "value", "value+",
                   "value-", "random", "random bits"):
        assert needed in cases, needed
    assert any(c.startswith("midpoint") for c in cases)
    # (for fp32 itself the float32 values around its overflow boundary are f32 max and inf)
    assert any(c.startswith("overflow boundary") for c in cases) or name == "fp32"
    inputs = {r["input"] for r in rows}
    tiny = f.min_subnormal if hasattr(f, "min_subnormal") else f.ulp
    assert float(tiny) in inputs and (float(tiny / 2) in inputs or name == "fp32")
    assert float(f.max) in inputs and -float(f.max) in inputs
    if f.has_nan:
        assert {"nan", "-nan", "snan"} <= cases
    else:
        assert rows.meta["skipped_no_code"] >= 3  # NaN inputs have no code
    assert rows.meta["overflow"] == ("inf" if f.has_inf else "saturate")


def test_every_code_value_is_an_input_for_8_bit_formats():
    f = get_format("e4m3")
    rows = format_vectors(f, n_random=0)
    inputs = {r["input_bits"] for r in rows}
    for _code, v in f.value_table():
        if isinstance(v, float):
            continue
        bits = np.array([float(v)], dtype=np.float32).view(np.uint32)[0]
        assert f"0x{int(bits):08X}" in inputs or v == 0
    # a tie between 0x38 (1.0) and 0x39 (1.125) goes to the even code under RNE
    row = next(r for r in rows if r["input"] == 1.0625)
    assert row["case"] == "midpoint" and row["expected_code"] == "0x38"


@pytest.mark.parametrize(
    ("fmt", "rounding", "overflow", "kw"),
    [
        ("e4m3", "rtz", "saturate", {}),
        ("e4m3", "rto", "nan", {}),
        ("e5m2", "ru", "saturate", {}),
        ("e5m2", "rd", "inf", {}),
        ("e2m1", "rna", "saturate", {}),
        ("e3m2", "ru", None, {}),
        ("e8m0", "rne", "saturate", {}),
        ("binary8p3se", "rne", "inf", {}),
        ("int8", "rne", "wrap", {}),
        ("uint4", "rd", "saturate", {}),
        ("fp16", "rtz", "inf", {}),
        ("e4m3", "rne", None, {"flush_output": True}),
        ("bf16", "rne", "inf", {"flush_input": True}),
        ("e5m2", "ru", "inf", {"flush_input": True, "flush_output": True}),
    ],
)
def test_format_vectors_other_modes(fmt, rounding, overflow, kw):
    rows = format_vectors(fmt, rounding, overflow, n_random=100, seed=3, **kw)
    assert rows.meta["rounding"] == rounding
    _check_format(rows, fmt, rounding, rows.meta["overflow"], **kw)


@pytest.mark.slow
@pytest.mark.parametrize("name", [f.name for f in catalog()])
def test_format_vectors_every_mode_slow(name):
    f = get_format(name)
    overflows = ["saturate", "wrap"] if not hasattr(f, "exp_bits") else (
        ["saturate"] + (["inf"] if f.has_inf else []) + (["nan"] if f.has_nan else []))
    for rounding in ("rne", "rtz", "ru", "rd", "rna", "rto"):
        for overflow in overflows:
            rows = format_vectors(f, rounding, overflow, n_random=2000, seed=1)
            _check_format(rows, f, rounding, overflow)


def test_write_vectors_json_and_csv(tmp_path):
    rows = format_vectors("e5m2", "rne", "inf", n_random=20)
    path = write_vectors(rows, tmp_path / "v" / "e5m2.json")
    data = json.loads(path.read_text())
    h = data["header"]
    assert h["format"] == "float8_e5m2" and h["rounding"] == "rne" and h["overflow"] == "inf"
    assert h["precisim_version"] and h["rows"] == len(rows) == len(data["rows"])
    assert h["sha256"] == rows_sha256(rows) == rows_sha256(data["rows"])
    def no_constant(name):  # strict JSON: no NaN / Infinity tokens
        raise AssertionError(name)

    json.loads(path.read_text(), parse_constant=no_constant)
    inf_row = next(r for r in data["rows"] if r["case"] == "inf")
    assert inf_row["input"] == "inf" and inf_row["expected_code"] == "0x7C"
    out = write_vectors(rows, tmp_path / "e5m2.csv")
    back = list(csv.DictReader(out.open()))
    assert len(back) == len(rows) and back[0].keys() == rows[0].keys()
    assert [r["expected_code"] for r in back] == [r["expected_code"] for r in rows]
    for b, r in zip(back, rows):
        x = float(b["input"])
        assert x == r["input"] or (math.isnan(x) and math.isnan(r["input"]))
    with pytest.raises(ValueError, match="accepted suffixes .csv, .json"):
        write_vectors(rows, tmp_path / "v.txt")
    with pytest.raises(ValueError, match="no vector rows"):
        write_vectors([], tmp_path / "v.csv")


def test_bad_input():
    with pytest.raises(FormatError, match="e4m3x"):
        format_vectors("e4m3x")
    with pytest.raises(ValueError, match="rounding='sr' is random"):
        format_vectors("e4m3", "sr")
    with pytest.raises(ValueError, match="unknown rounding 'nearest-odd'"):
        format_vectors("e4m3", "nearest-odd")
    with pytest.raises(ValueError, match="overflow='inf' is not possible for float8_e4m3fn: "
                       "accepted saturate, nan"):
        format_vectors("e4m3", overflow="inf")
    with pytest.raises(ValueError, match="overflow='nan' is not possible for int8"):
        format_vectors("int8", overflow="nan")
    with pytest.raises(ValueError, match="n_random=-1"):
        format_vectors("e4m3", n_random=-1)
    with pytest.raises(ValueError, match="for float formats"):
        format_vectors("int8", flush_input=True)


def test_codes_values_and_hex():
    assert hex_code(0x7C, 8) == "0x7C" and hex_code(5, 4) == "0x5" and hex_code(1, 32) == (
        "0x00000001")
    for name in ("e4m3", "e5m2", "e2m1", "int8", "e8m0"):
        f = get_format(name)
        for code, _ in f.value_table():
            v = code_value(f, code)
            if not math.isnan(v):
                assert value_code(f, v) == code, (name, code, v)
    assert math.copysign(1, code_value("e4m3", 0x80)) < 0 and value_code(get_format("e4m3"),
                                                                          -0.0) == 0x80
