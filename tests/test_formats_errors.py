"""Clear errors, naming the offending value, for every misuse of quantize / encode / decode."""

from __future__ import annotations

import pytest
import torch
from precisim.formats import FormatError, decode, encode, get_format, quantize


def x(dtype=torch.float32):
    return torch.ones(3, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8,
                                   torch.bool, torch.float64, torch.complex64])
def test_unsupported_tensor_dtypes(dtype):
    t = torch.ones(3, dtype=dtype)
    msg = rf"x has dtype {dtype}; accepted float32, bfloat16, float16"
    with pytest.raises(TypeError, match=msg):
        quantize(t, "e4m3")
    with pytest.raises(TypeError, match=msg):
        encode(t, "e4m3")


def test_encode_float64_is_not_rounded_twice():
    """Regression: encode() used to cast float64 to float32 first (double rounding): the exact
    value 1 + 2^-4 + 2^-30 is above the E4M3 tie 1.0625 (-> 1.125), but float32 rounds it onto
    the tie, which RNE then sends to 1.0. encode now rejects float64 like quantize does."""
    t = torch.tensor([1 + 2.0 ** -4 + 2.0 ** -30], dtype=torch.float64)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64"):
        encode(t, "e4m3")


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        quantize([1.0, 2.0], "e4m3")


def test_unknown_format_name_lists_close_names():
    with pytest.raises(FormatError, match=r"unknown format 'e4m4x'; did you mean 'e4m3'"):
        quantize(x(), "e4m4x")
    with pytest.raises(FormatError, match=r"unknown format 'int64'"):
        quantize(x(), torch.int64)
    with pytest.raises(FormatError, match=r"'mxfp8' is a block-scaled format.*call precisim"
                                          r"\.formats\.scaling\.quantize_scaled\(x, 'mxfp8'\)"):
        quantize(x(), "mxfp8")


@pytest.mark.parametrize("bad", ["nearest_odd", "rn_even", "", "SR2"])
def test_unknown_rounding(bad):
    with pytest.raises(ValueError, match=rf"unknown rounding '{bad}': accepted .*rne.*sr"):
        quantize(x(), "e4m3", bad)


@pytest.mark.parametrize("bad", ["clip", "clamp", "infinity"])
def test_unknown_overflow(bad):
    with pytest.raises(ValueError, match=rf"unknown overflow '{bad}': accepted saturate, inf, "
                                         r"nan, wrap"):
        quantize(x(), "e4m3", "rne", bad)


@pytest.mark.parametrize("fmt", ["e4m3", "e4m3fnuz", "e2m1", "e8m0", "binary8p4sf", "int8"])
def test_overflow_inf_without_inf(fmt):
    name = get_format(fmt).name
    with pytest.raises(FormatError, match=rf"overflow='inf' is not possible: {name} has no "
                                          r"infinity"):
        quantize(x(), fmt, "rne", "inf")


@pytest.mark.parametrize("fmt", ["e2m1", "e2m3", "e3m2", "int4", "mxint8"])
def test_overflow_nan_without_nan(fmt):
    name = get_format(fmt).name
    with pytest.raises(FormatError, match=rf"overflow='nan' is not possible: {name} has no NaN"):
        quantize(x(), fmt, "rne", "nan")


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "bf16", "e8m0", "binary8p3se"])
def test_wrap_on_float_format(fmt):
    name = get_format(fmt).name
    with pytest.raises(FormatError, match=rf"overflow='wrap' is for integer formats, not {name}"):
        quantize(x(), fmt, "rne", "wrap")


@pytest.mark.parametrize("bits", [0, -1, 31, 64, 4.5])
def test_sr_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=rf"sr_bits={bits!r} is not valid: accepted 1\.\.30"):
        quantize(x(), "e4m3", "sr", sr_bits=bits)


def test_sr_options_without_sr():
    with pytest.raises(ValueError, match=r"sr_bits=8 is only meaningful with rounding='sr'"):
        quantize(x(), "e4m3", "rne", sr_bits=8)
    with pytest.raises(ValueError, match=r"seed/generator are only used with rounding='sr'"):
        quantize(x(), "e4m3", "rne", seed=0)
    with pytest.raises(ValueError, match=r"seed/generator are only used with rounding='sr'"):
        quantize(x(), "e4m3", "rtz", generator=torch.Generator())
    with pytest.raises(ValueError, match=r"pass either seed or generator, not both"):
        quantize(x(), "e4m3", "sr", seed=1, generator=torch.Generator())


@pytest.mark.parametrize("dtype, fmt", [
    (torch.bfloat16, "fp16"),  # 10 mantissa bits do not fit bf16's 7
    (torch.float16, "bf16"),  # bf16's range does not fit fp16
    (torch.float16, "e8m0"),  # 2^-127 .. 2^127
    (torch.bfloat16, "tf32"),
    (torch.float16, "binary8p1se"),
])
def test_result_not_representable_in_input_dtype(dtype, fmt):
    name = get_format(fmt).name
    with pytest.raises(FormatError, match=rf"{name} values are not all representable in "
                                          rf"{dtype}; quantize a float32 copy"):
        quantize(x(dtype), fmt)


@pytest.mark.parametrize("dtype, fmt", [(torch.bfloat16, "e4m3"), (torch.float16, "e4m3"),
                                        (torch.bfloat16, "e8m0"), (torch.float16, "e2m1"),
                                        (torch.float16, "int8"), (torch.bfloat16, "mxint8")])
def test_representable_lower_precision_inputs_are_accepted(dtype, fmt):
    t = torch.tensor([0.3, 1.7, 100.0, -2.5], dtype=dtype)
    if fmt == "e8m0":
        t = t.abs()
    y = quantize(t, fmt)
    assert y.dtype == dtype
    assert torch.equal(y.float(), quantize(t.float(), fmt))


def test_encode_nan_without_nan_code():
    with pytest.raises(ValueError, match=r"float4_e2m1fn has no NaN code: the input holds NaN"):
        encode(torch.tensor([1.0, float("nan")]), "e2m1")
    with pytest.raises(ValueError, match=r"int8 has no code for NaN"):
        encode(torch.tensor([float("nan")]), "int8")


def test_decode_errors():
    with pytest.raises(TypeError, match=r"codes must be an integer tensor, got torch.float32"):
        decode(torch.tensor([1.0]), "e2m1")
    with pytest.raises(ValueError, match=r"codes must lie in 0\.\.15 for float4_e2m1fn; got "
                                         r"0\.\.16"):
        decode(torch.tensor([0, 16]), "e2m1")
    with pytest.raises(ValueError, match=r"got -1\.\.3"):
        decode(torch.tensor([-1, 3]), "e2m1")
    with pytest.raises(FormatError, match=r"decode supports formats of up to 16 bits, not fp32"):
        decode(torch.tensor([0]), "fp32")


def test_format_object_of_wrong_type():
    with pytest.raises(FormatError, match=r"cannot interpret 3\.5 \(type float\)"):
        quantize(x(), 3.5)
