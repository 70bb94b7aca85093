"""Derived limits, value tables, aliases and validation of the format descriptors.

Every expected figure below is typed in from docs/arithmetic.md section 1 (or the IEEE 754 /
OCP / P3109 documents it cites), never computed with the code under test.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from precisim.formats import (
    FloatFormat,
    FormatError,
    Inf,
    IntFormat,
    Nan,
    catalog,
    decode,
    get_format,
    p3109,
    p3109_family,
)

F = Fraction


def p2(e: int) -> Fraction:
    return Fraction(2) ** e


# name: (bits, bias, max, min subnormal, +inf code or None, NaN code or None)
SECTION1_TABLE = {
    "float8_e4m3fn": (8, 7, F(448), p2(-9), None, 0x7F),
    "float8_e5m2": (8, 15, F(57344), p2(-16), 0x7C, 0x7F),
    "float8_e4m3fnuz": (8, 8, F(240), p2(-10), None, 0x80),
    "float8_e5m2fnuz": (8, 16, F(57344), p2(-17), None, 0x80),
    "float8_e4m3b11fnuz": (8, 11, F(30), p2(-13), None, 0x80),
    "float6_e3m2fn": (6, 3, F(28), p2(-4), None, None),
    "float6_e2m3fn": (6, 1, F(15, 2), p2(-3), None, None),
    "float4_e2m1fn": (4, 1, F(6), F(1, 2), None, None),
    "float8_e8m0fnu": (8, 127, p2(127), p2(-127), None, 0xFF),
    # IEEE 754 and friends
    "fp32": (32, 127, (2 - p2(-23)) * p2(127), p2(-149), 0x7F800000, 0x7FFFFFFF),
    "fp16": (16, 15, F(65504), p2(-24), 0x7C00, 0x7FFF),
    "bf16": (16, 127, (2 - p2(-7)) * p2(127), p2(-133), 0x7F80, 0x7FFF),
    "tf32": (19, 127, (2 - p2(-10)) * p2(127), p2(-136), 0x3FC00, 0x3FFFF),
    # ml_dtypes' IEEE-style E4M3 / E3M4 (inf and NaN in the top binade)
    "float8_e4m3": (8, 7, F(240), p2(-9), 0x78, 0x7F),
    "float8_e3m4": (8, 3, F(15.5), p2(-6), 0x70, 0x7F),
}


@pytest.mark.parametrize("name", sorted(SECTION1_TABLE))
def test_section1_limits(name):
    bits, bias, mx, min_sub, inf_code, nan_code = SECTION1_TABLE[name]
    f = get_format(name)
    assert isinstance(f, FloatFormat)
    assert f.bits == bits
    assert f.bias == bias
    assert f.max == mx
    assert f.min_subnormal == min_sub
    assert f.inf_magnitude_code == inf_code
    assert f.has_inf == (inf_code is not None)
    assert f.nan_code == nan_code
    assert f.has_nan == (nan_code is not None)
    if bits <= 8:
        vals = [v for _, v in f.value_table()]
        finite = [v for v in vals if isinstance(v, Fraction)]
        assert max(finite) == mx
        assert min(v for v in finite if v > 0) == min_sub
        if nan_code is not None:
            assert math.isnan(f.decode_exact(nan_code))
        if inf_code is not None:
            assert f.decode_exact(inf_code) == math.inf


@pytest.mark.parametrize("name", ["float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz"])
def test_fnuz_single_nan_no_negative_zero(name):
    f = get_format(name)
    table = f.value_table()
    nans = [c for c, v in table if isinstance(v, float) and math.isnan(v)]
    assert nans == [0x80]
    assert not f.has_negative_zero
    assert [c for c, v in table if v == 0] == [0x00]


def test_e4m3fn_nan_codes_and_negative_zero():
    f = get_format("e4m3")
    table = dict(f.value_table())
    assert [c for c, v in table.items() if isinstance(v, float) and math.isnan(v)] == [0x7F, 0xFF]
    assert f.has_negative_zero and table[0x80] == 0
    assert table[0x7E] == 448 and table[0xFE] == -448


def test_e5m2_specials():
    f = get_format("e5m2")
    table = dict(f.value_table())
    assert table[0x7C] == math.inf and table[0xFC] == -math.inf
    for c in (0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF):
        assert math.isnan(table[c])
    assert table[0x7B] == 57344


@pytest.mark.parametrize(
    "name, bias, mx, inf_code, nan_code",
    [
        ("binary8p4se", 8, F(224), 0x7F, 0x80),
        ("binary8p4sf", 8, F(240), None, 0x80),
        ("binary8p3se", 16, F(49152), 0x7F, 0x80),
        ("binary8p3sf", 16, F(57344), None, 0x80),
        ("binary8p4ue", 16, None, 0xFE, 0xFF),
        ("binary8p4uf", 16, None, None, 0xFF),
    ],
)
def test_p3109_k8_examples(name, bias, mx, inf_code, nan_code):
    f = get_format(name)
    assert f.bias == bias
    if mx is not None:
        assert f.max == mx
    assert f.nan_code == nan_code
    assert f.inf_magnitude_code == inf_code
    table = dict(f.value_table())
    assert math.isnan(table[nan_code])
    if f.signed:
        assert not f.has_negative_zero
        assert [c for c, v in table.items() if v == 0] == [0x00]
        if inf_code is not None:
            assert table[0x7F] == math.inf and table[0xFF] == -math.inf
    else:
        assert table[0x00] == 0
        if inf_code is not None:
            assert table[0xFE] == math.inf
            assert max(v for v in table.values() if isinstance(v, Fraction)) == table[0xFD]


@pytest.mark.parametrize("fmt", p3109_family(8), ids=str)
def test_p3109_family_structure(fmt):
    """Signed: bias 2^(K-P-1), zero 0x00, NaN 0x80; unsigned: bias 2^(K-P), NaN 0xFF."""
    k, p = fmt.bits, fmt.precision
    assert k == 8
    table = dict(fmt.value_table())
    nans = sorted(c for c, v in table.items() if isinstance(v, float) and math.isnan(v))
    infs = sorted(c for c, v in table.items() if isinstance(v, float) and math.isinf(v))
    extended = fmt.name.endswith("e")
    if fmt.signed:
        assert fmt.bias == 2 ** (k - p - 1)
        assert nans == [0x80]
        assert infs == ([0x7F, 0xFF] if extended else [])
    else:
        assert fmt.bias == 2 ** (k - p)
        assert nans == [0xFF]
        assert infs == ([0xFE] if extended else [])
    assert table[0] == 0
    assert fmt.subnormals
    # every finite value is distinct (one zero only)
    finite = [v for v in table.values() if isinstance(v, Fraction)]
    assert len(set(finite)) == len(finite)
    assert get_format(fmt.name) == fmt
    assert get_format(f"p3109_k8p{p}{fmt.name[-2:]}") == fmt


def test_p3109_family_counts():
    fam = p3109_family(8)
    assert len(fam) == 2 * 7 + 2 * 8
    assert len({f.name for f in fam}) == len(fam)


def test_small_p3109():
    f = get_format("binary4p2se")
    vals = dict(f.value_table())
    assert f.bias == 2 and math.isnan(vals[0x8]) and vals[0x7] == math.inf
    assert sorted(v for v in vals.values() if isinstance(v, Fraction) and v >= 0) == [
        0, F(1, 4), F(1, 2), F(3, 4), 1, F(3, 2), 2]
    f6 = get_format("binary6p3se")
    assert f6.bits == 6 and f6.bias == 4 and f6.max == 12


def test_e8m0():
    f = get_format("e8m0")
    assert not f.signed and not f.has_zero and not f.subnormals
    table = dict(f.value_table())
    assert table[0] == p2(-127)
    assert table[127] == 1
    assert table[254] == p2(127)
    assert math.isnan(table[255])
    assert all(v != 0 for v in table.values())
    assert f.min_subnormal == f.min_normal == p2(-127)
    # code 0 decodes to the fp32 subnormal 2^-127
    got = decode(torch.tensor([0, 127, 254, 255], dtype=torch.uint8), f)
    assert got[0].item() == 2.0 ** -127 and got[1].item() == 1.0
    assert got[2].item() == 2.0 ** 127 and math.isnan(got[3].item())


def test_e2m1_values():
    f = get_format("e2m1")
    table = dict(f.value_table())
    pos = [table[c] for c in range(8)]
    assert pos == [0, F(1, 2), 1, F(3, 2), 2, 3, 4, 6]
    assert [table[c] for c in range(8, 16)] == [-v for v in pos]
    assert f.has_negative_zero


def test_e2m3_e3m2_values():
    e2m3 = sorted({v for _, v in get_format("e2m3").value_table() if v >= 0})
    assert e2m3[:9] == [F(i, 8) for i in range(9)]
    assert e2m3[-1] == F(15, 2) and len(set(e2m3)) == 32
    e3m2 = sorted(set(v for _, v in get_format("e3m2").value_table() if v >= 0))
    assert e3m2[:5] == [0, F(1, 16), F(2, 16), F(3, 16), F(4, 16)]
    assert e3m2[-1] == 28


@pytest.mark.parametrize(
    "name, exp_bits, man_bits, emax, emin",
    [
        ("fp32", 8, 23, 127, -126),
        ("bf16", 8, 7, 127, -126),
        ("fp16", 5, 10, 15, -14),
        ("tf32", 8, 10, 127, -126),
        ("e4m3", 4, 3, 8, -6),
        ("e5m2", 5, 2, 15, -14),
        ("e2m3", 2, 3, 2, 0),
        ("e3m2", 3, 2, 4, -2),
        ("e2m1", 2, 1, 2, 0),
        ("e8m0", 8, 0, 127, -127),
    ],
)
def test_emax_emin(name, exp_bits, man_bits, emax, emin):
    """emax of the element formats as OCP MX section 6.3 uses them (E4M3 8, E5M2 15...)."""
    f = get_format(name)
    assert (f.exp_bits, f.man_bits, f.emax, f.emin) == (exp_bits, man_bits, emax, emin)
    assert f.min_normal == p2(emin)
    assert f.eps == p2(-man_bits)


def test_int_formats():
    assert (get_format("int8").qmin, get_format("int8").qmax) == (-128, 127)
    assert (get_format("uint8").qmin, get_format("uint8").qmax) == (0, 255)
    assert (get_format("int4").qmin, get_format("int4").qmax) == (-8, 7)
    mx = get_format("mxint8")
    assert isinstance(mx, IntFormat)
    assert mx.max == F(127, 64) and mx.min == -2 and mx.emax == 0 and mx.ulp == p2(-6)
    sym = IntFormat("int8s", 8, symmetric=True)
    assert sym.qmin == -127
    assert math.isnan(dict(sym.value_table())[0x80])
    assert dict(get_format("int4").value_table())[0x8] == -8


@pytest.mark.parametrize("fmt", [f for f in catalog() if f.bits <= 8], ids=str)
def test_decode_matches_exact_table(fmt):
    got = decode(torch.arange(1 << fmt.bits, dtype=torch.int32), fmt)
    for code, v in fmt.value_table():
        g = got[code].item()
        if isinstance(v, float) and math.isnan(v):
            assert math.isnan(g), (fmt.name, code)
        else:
            assert g == v, (fmt.name, code, g, v)
            if v == 0:
                assert math.copysign(1, g) == (-1 if code >> (fmt.bits - 1) and
                                                fmt.has_negative_zero else 1)


# -- names and aliases ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "spec, name",
    [
        ("float8_e4m3fn", "float8_e4m3fn"),
        ("E4M3", "float8_e4m3fn"),
        ("fp8_e4m3", "float8_e4m3fn"),
        ("e4m3fnuz", "float8_e4m3fnuz"),
        ("e5m2fnuz", "float8_e5m2fnuz"),
        ("e8m0fnu", "float8_e8m0fnu"),
        ("e8m0", "float8_e8m0fnu"),
        ("float4_e2m1fn", "float4_e2m1fn"),
        ("fp4", "float4_e2m1fn"),
        ("bfloat16", "bf16"),
        ("half", "fp16"),
        ("float32", "fp32"),
        ("binary8p4se", "binary8p4se"),
        ("p3109_k8p3sf", "binary8p3sf"),
        (torch.float8_e4m3fn, "float8_e4m3fn"),
        (torch.float8_e5m2, "float8_e5m2"),
        (torch.float8_e4m3fnuz, "float8_e4m3fnuz"),
        (torch.float8_e5m2fnuz, "float8_e5m2fnuz"),
        (torch.float8_e8m0fnu, "float8_e8m0fnu"),
        (torch.float4_e2m1fn_x2, "float4_e2m1fn"),
        (torch.bfloat16, "bf16"),
        (torch.float16, "fp16"),
        (torch.float32, "fp32"),
        (ml_dtypes.float8_e4m3fn, "float8_e4m3fn"),
        (ml_dtypes.float8_e4m3b11fnuz, "float8_e4m3b11fnuz"),
        (ml_dtypes.float8_e3m4, "float8_e3m4"),
        (ml_dtypes.float6_e2m3fn, "float6_e2m3fn"),
        (ml_dtypes.float4_e2m1fn, "float4_e2m1fn"),
        (ml_dtypes.float8_e8m0fnu, "float8_e8m0fnu"),
        (ml_dtypes.bfloat16, "bf16"),
        (np.float16, "fp16"),
    ],
    ids=str,
)
def test_aliases_resolve(spec, name):
    assert get_format(spec).name == name


def test_descriptor_passes_through():
    f = p3109(8, 4)
    assert get_format(f) is f


@pytest.mark.parametrize("t", [
    ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fnuz,
    ml_dtypes.float8_e5m2fnuz, ml_dtypes.float8_e4m3b11fnuz, ml_dtypes.float8_e4m3,
    ml_dtypes.float8_e3m4, ml_dtypes.float6_e2m3fn, ml_dtypes.float6_e3m2fn,
    ml_dtypes.float4_e2m1fn, ml_dtypes.float8_e8m0fnu, ml_dtypes.bfloat16, np.float16,
], ids=lambda t: t.__name__)
def test_limits_match_ml_dtypes_finfo(t):
    fi = ml_dtypes.finfo(t)
    f = get_format(t)
    assert float(f.max) == float(fi.max)
    assert float(f.min_normal) == float(fi.smallest_normal)
    assert float(f.min_subnormal) == float(fi.smallest_subnormal)
    assert float(f.eps) == float(fi.eps)
    assert f.bits == fi.bits


def test_exmy_strings_parse():
    f = get_format("e5m7")
    assert (f.exp_bits, f.man_bits, f.bias, f.nan, f.inf) == (5, 7, 15, Nan.IEEE, Inf.IEEE)
    assert f.bits == 13 and f.max == (2 - p2(-7)) * p2(15)
    g = get_format("e4m3b11fnuz")
    assert g == get_format("float8_e4m3b11fnuz")
    assert (g.bias, g.nan, g.inf) == (11, Nan.NEG_ZERO, Inf.NONE)
    h = get_format("e3m4b5fn")
    assert (h.exp_bits, h.man_bits, h.bias, h.nan, h.inf) == (3, 4, 5, Nan.TOP, Inf.NONE)
    u = get_format("e5m0fnu")
    assert not u.signed and not u.has_zero and u.bias == 15
    z = get_format("e5m2fnuz")
    assert z.bias == 16


@pytest.mark.parametrize("bad, close", [
    ("e4m3fx", "e4m3fn"),
    ("bfloat61", "bfloat16"),
    ("float8_e4m3fnz", "float8_e4m3fn"),
    ("mxint9", "mxint8"),
])
def test_unknown_names_list_close_matches(bad, close):
    # the registry's one error style (docs/naming.md): unknown X; did you mean; available
    with pytest.raises(FormatError, match=rf"unknown format '{bad}'; did you mean .*"
                       rf"'{close}'.*; available: fp32, "):
        get_format(bad)


def test_unknown_object():
    with pytest.raises(FormatError, match=r"cannot interpret 3\.5"):
        get_format(3.5)


@pytest.mark.parametrize("make, msg", [
    (lambda: FloatFormat("x", 9, 3, 7), r"exp_bits=9"),
    (lambda: FloatFormat("x", 0, 3, 7), r"exp_bits=0"),
    (lambda: FloatFormat("x", 4, 24, 7), r"man_bits=24"),
    (lambda: FloatFormat("x", 8, 7, 300), r"bias=300"),
    (lambda: FloatFormat("x", 4, 0, 7), r"nan=IEEE needs at least one mantissa bit"),
    (lambda: FloatFormat("x", 4, 3, 7, nan=Nan.TOP), r"inf=IEEE requires nan=IEEE"),
    (lambda: FloatFormat("x", 4, 3, 7, signed=False, nan=Nan.NEG_ZERO, inf=Inf.NONE),
     r"NEG_ZERO needs a signed format"),
    (lambda: IntFormat("x", 0), r"bits=0"),
    (lambda: IntFormat("x", 25), r"bits=25"),
    (lambda: IntFormat("x", 1), r"at least 2 bits"),
    (lambda: IntFormat("x", 8, frac_bits=200), r"frac_bits=200"),
    (lambda: IntFormat("x", 4, signed=False, symmetric=True), r"symmetric=True"),
    (lambda: p3109(8, 9), r"P=9"),
    (lambda: p3109(1, 1), r"K=1"),
    (lambda: p3109(8, 0), r"P=0"),
    (lambda: get_format("e4m0"), r"e4m0.*mantissa bit"),
    (lambda: get_format("e9m3"), r"exp_bits=9"),
])
def test_invalid_descriptors_name_the_bad_value(make, msg):
    with pytest.raises(FormatError, match=msg):
        make()


def test_decode_exact_out_of_range_code():
    with pytest.raises(FormatError, match=r"code 256 is outside 0\.\.255"):
        get_format("e4m3").decode_exact(256)


def test_value_table_only_small():
    with pytest.raises(FormatError, match="16 bits"):
        get_format("fp16").value_table()


def test_properties_dict():
    p = get_format("e4m3").properties()
    assert p["max"] == 448.0 and p["bias"] == 7 and p["neg_zero"] is True and p["nan"] == "top"
    assert get_format("mxint8").properties()["max"] == 127 / 64
