"""Fast kernels == exact reference, bit for bit, on every rounding decision of small formats.

For every format of at most 8 bits (the catalog, the whole IEEE P3109 K=8 family, integer
formats including MXINT8, a few K<8 P3109 formats), every deterministic rounding mode and every
overflow policy the format accepts, the inputs are: the value of every code, every midpoint
between neighbouring values (also between +-max and the next step of the unbounded grid), the
float32 neighbours (nextafter up / down) of all of those, both signs, and overflow, tiny, zero,
inf and NaN inputs (see ``_format_cases.input_bits``). By default the non-default overflow
policies run on the inputs where they can matter (|x| >= max/2, inf, NaN) and the flush (DAZ /
FTZ) variants on the inputs near the subnormal range; the ``slow`` test runs every combination
on every input (``pytest -m slow tests/test_formats_exhaustive.py``, about 10 minutes on a
busy 2-core machine).

16-bit formats (bf16, fp16): all 65536 codes' values and all midpoints with their float32
neighbours in every mode, against the exact table oracle ``_format_cases.table_round`` (the
pure-Python reference would take minutes); the oracle itself is checked against the reference
on every 8-bit input set here and on a sample of the 16-bit inputs.

NaN compares equal to NaN (any payload). The kernels run eagerly (``set_backend('eager')``).
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

import numpy as np
import pytest
import torch
from _format_cases import (
    DETERMINISTIC,
    assert_same_bits,
    bits_to_tensor,
    exact_values,
    input_bits,
    overflow_policies,
    ref_bits,
    table_round,
)
from precisim.formats import (
    FloatFormat,
    IntFormat,
    catalog,
    decode,
    encode,
    get_format,
    p3109,
    p3109_family,
    quantize,
)
from precisim.formats import reference as ref
from precisim.formats.rounding import Overflow, Rounding

SMALL_FORMATS = (
    [f for f in catalog() if f.bits <= 8]
    + p3109_family(8)
    + [p3109(6, 3), p3109(6, 2, extended=False), p3109(4, 2), p3109(4, 3, signed=False),
       p3109(5, 1), IntFormat("int8_sym", 8, symmetric=True), IntFormat("int6f3", 6, frac_bits=3)]
)
SMALL_FORMATS = list({f.name: f for f in SMALL_FORMATS}.values())  # de-duplicated by name


pytestmark = pytest.mark.usefixtures("eager_single_thread")


@cache
def _cases(fmt):
    bits = input_bits(fmt)
    return bits, exact_values(bits)


def _fast(bits: np.ndarray, fmt, rounding, overflow, **kw) -> np.ndarray:
    y = quantize(bits_to_tensor(bits), fmt, rounding, overflow, **kw)
    return y.view(torch.int32).numpy().view(np.uint32)


def test_format_list_covers_the_brief():
    names = {f.name for f in SMALL_FORMATS}
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
              "float8_e4m3b11fnuz", "float8_e4m3", "float8_e3m4", "float6_e3m2fn",
              "float6_e2m3fn", "float4_e2m1fn", "float8_e8m0fnu", "int8", "uint8", "int4",
              "mxint8", "binary6p3se", "binary4p2se", "binary8p1ue", "binary8p7sf"):
        assert n in names
    assert len(p3109_family(8)) == 30


def _overflow_region(fmt, bits: np.ndarray) -> np.ndarray:
    """The inputs whose result can depend on the overflow policy (|x| >= max/2, inf, NaN)."""
    x = np.abs(bits.view(np.float32).astype(np.float64))
    return bits[(x >= float(fmt.max) / 2) | ~np.isfinite(x)]


def _near_subnormal(fmt, bits: np.ndarray) -> np.ndarray:
    """The inputs whose result can depend on DAZ / FTZ (below 2 * the smallest normal of the
    format or of float32), plus inf and NaN."""
    x = np.abs(bits.view(np.float32).astype(np.float64))
    return bits[(x < 2 * float(fmt.min_normal)) | (x < 2.0 ** -125) | ~np.isfinite(x)]


def _check(fmt, rounding, overflow, bits, xs=None, *, flush_input=False, flush_output=False,
           table=True):
    xs = exact_values(bits) if xs is None else xs
    what = (f"{fmt.name} {rounding.value} overflow={overflow.value} "
            f"flush_input={flush_input} flush_output={flush_output}")
    want = ref_bits(xs, fmt, rounding, overflow, flush_input=flush_input,
                    flush_output=flush_output)
    got = _fast(bits, fmt, rounding, overflow, flush_input=flush_input,
                flush_output=flush_output)
    assert_same_bits(got, want, bits, what)
    if table and isinstance(fmt, FloatFormat):
        # the independent table oracle (used for the 16-bit formats) agrees with the reference
        tab = table_round(bits.view(np.float32), fmt, rounding, overflow,
                          flush_input=flush_input, flush_output=flush_output)
        assert_same_bits(tab.view(np.uint32), want, bits, "table oracle, " + what)


@pytest.mark.parametrize("rounding", DETERMINISTIC, ids=lambda r: r.value)
@pytest.mark.parametrize("fmt", SMALL_FORMATS, ids=str)
def test_fast_equals_reference(fmt, rounding):
    """All inputs with the default policy (saturate); the other overflow policies on the inputs
    where the policy can matter (the slow test below runs them on every input)."""
    bits, xs = _cases(fmt)
    _check(fmt, rounding, Overflow.SATURATE, bits, xs)
    big = _overflow_region(fmt, bits)
    for overflow in overflow_policies(fmt)[1:]:
        _check(fmt, rounding, overflow, big)


@pytest.mark.parametrize("fmt", [f for f in SMALL_FORMATS if isinstance(f, FloatFormat)],
                         ids=str)
@pytest.mark.parametrize("flush_input, flush_output", [(True, False), (False, True)])
def test_fast_equals_reference_flush(fmt, flush_input, flush_output):
    bits = _near_subnormal(fmt, input_bits(fmt))
    xs = exact_values(bits)
    for rounding in DETERMINISTIC:
        _check(fmt, rounding, Overflow.SATURATE, bits, xs, flush_input=flush_input,
               flush_output=flush_output)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", SMALL_FORMATS, ids=str)
def test_fast_equals_reference_every_combination(fmt):
    """Every input x every mode x every overflow policy x every flush combination."""
    bits, xs = _cases(fmt)
    flushes = [(False, False)]
    if isinstance(fmt, FloatFormat):
        flushes += [(True, False), (False, True), (True, True)]
    for rounding in DETERMINISTIC:
        for overflow in overflow_policies(fmt):
            for fi, fo in flushes:
                _check(fmt, rounding, overflow, bits, xs, flush_input=fi, flush_output=fo)


@pytest.mark.parametrize("fmt", SMALL_FORMATS, ids=str)
def test_encode_decode_match_reference(fmt):
    """encode == reference.encode_value of the reference result; decode(encode(x)) == quantize."""
    bits, xs = _cases(fmt)
    keep = [i for i, x in enumerate(xs)
            if fmt.has_nan or not (isinstance(x, float) and math.isnan(x))]
    bits = bits[keep]
    xs = [xs[i] for i in keep]
    want_vals = []
    for x in xs:
        if isinstance(fmt, IntFormat):
            want_vals.append(ref.round_to_int_format(x, fmt))
        else:
            want_vals.append(ref.round_to_float_format(x, fmt))
    if not fmt.has_nan:  # precisim propagates NaN where the format has no NaN code
        ok = [i for i, v in enumerate(want_vals) if not (isinstance(v, float) and math.isnan(v))]
        bits = bits[ok]
        want_vals = [want_vals[i] for i in ok]
    want = np.array([ref.encode_value(v, fmt) for v in want_vals])
    x = bits_to_tensor(bits)
    codes = encode(x, fmt)
    got = codes.to(torch.int64).numpy()
    bad = np.where(got != want)[0]
    assert bad.size == 0, [(float(bits[i].view(np.float32)), int(got[i]), int(want[i]))
                           for i in bad[:8]]
    back = decode(codes, fmt)
    assert_same_bits(back.view(torch.int32).numpy().view(np.uint32),
                     quantize(x, fmt).view(torch.int32).numpy().view(np.uint32), bits,
                     f"decode(encode(x)) vs quantize(x), {fmt.name}")


@pytest.mark.parametrize("fmt", SMALL_FORMATS, ids=str)
def test_quantize_is_idempotent_on_code_values(fmt):
    vals = decode(torch.arange(1 << fmt.bits, dtype=torch.int32), fmt)
    keep = ~vals.isnan()
    for rounding in DETERMINISTIC:
        for overflow in overflow_policies(fmt):
            out = quantize(vals, fmt, rounding, overflow)
            if overflow is Overflow.SATURATE and fmt.has_inf:  # +-inf saturate to +-max
                want = torch.where(vals.isinf(), vals.sign() * float(fmt.max), vals)
            else:
                want = vals
            assert torch.equal(out.view(torch.int32)[keep], want.view(torch.int32)[keep])


# -- 16-bit formats ---------------------------------------------------------------------------

SIXTEEN = [get_format("bf16"), get_format("fp16")]


@cache
def _inputs16(fmt: FloatFormat) -> np.ndarray:
    """All 65536 codes' values, all midpoints, their float32 neighbours, overflow/special."""
    vals = decode(torch.arange(1 << 16, dtype=torch.int32), fmt).numpy().astype(np.float64)
    vals = np.unique(vals[np.isfinite(vals)])
    step = 2.0 ** (fmt.emax - fmt.man_bits)
    mx = float(fmt.max)
    ext = np.concatenate([[-mx - 2 * step, -mx - step], vals, [mx + step, mx + 2 * step]])
    mids = (ext[1:] + ext[:-1]) / 2
    base = np.concatenate([ext, mids])
    base = base[np.abs(base) < 2.0 ** 128]  # bf16's max + step is 2^128: not a float32
    base32 = base.astype(np.float32)
    assert np.array_equal(base32.astype(np.float64), base)  # exact
    with np.errstate(over="ignore"):
        allx = np.concatenate([
            base32, np.nextafter(base32, np.float32(np.inf)),
            np.nextafter(base32, np.float32(-np.inf)),
            np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45, -1e-45, 3.4028235e38],
                     dtype=np.float32)])
    return np.unique(allx.view(np.uint32))


@pytest.mark.parametrize("rounding", DETERMINISTIC, ids=lambda r: r.value)
@pytest.mark.parametrize("fmt", SIXTEEN, ids=str)
def test_16bit_all_codes_and_midpoints(fmt, rounding):
    bits = _inputs16(fmt)
    assert bits.size > 6 * 60000
    x = bits.view(np.float32)
    for overflow in overflow_policies(fmt):
        want = table_round(x, fmt, rounding, overflow).view(np.uint32)
        got = _fast(bits, fmt, rounding, overflow)
        assert_same_bits(got, want, bits, f"{fmt.name} {rounding.value} {overflow.value}")
    for fi, fo in ((True, False), (False, True)):
        want = table_round(x, fmt, rounding, Overflow.SATURATE, flush_input=fi,
                           flush_output=fo).view(np.uint32)
        got = _fast(bits, fmt, rounding, Overflow.SATURATE, flush_input=fi, flush_output=fo)
        assert_same_bits(got, want, bits, f"{fmt.name} {rounding.value} flush {fi} {fo}")


@pytest.mark.parametrize("fmt", SIXTEEN, ids=str)
def test_16bit_table_oracle_matches_reference(fmt):
    """The table oracle used above agrees with the exact reference (a random sample)."""
    bits = _inputs16(fmt)
    rng = np.random.default_rng(1234)
    sample = np.unique(np.concatenate([rng.choice(bits, 800, replace=False), bits[:50],
                                       bits[-50:]]))
    xs = exact_values(sample)
    for rounding in DETERMINISTIC:
        for overflow in overflow_policies(fmt):
            want = ref_bits(xs, fmt, rounding, overflow)
            tab = table_round(sample.view(np.float32), fmt, rounding, overflow)
            assert_same_bits(tab.view(np.uint32), want, sample,
                             f"table oracle {fmt.name} {rounding.value} {overflow.value}")


@pytest.mark.parametrize("fmt", SIXTEEN, ids=str)
def test_16bit_rne_matches_torch_cast(fmt):
    """RNE with inf overflow == torch's own float32 -> bf16/fp16 cast, on all the inputs."""
    bits = _inputs16(fmt)
    x = bits_to_tensor(bits)
    dtype = torch.bfloat16 if fmt.name == "bf16" else torch.float16
    want = x.to(dtype).float().view(torch.int32).numpy().view(np.uint32)
    got = _fast(bits, fmt, Rounding.NEAREST_EVEN, Overflow.INF)
    assert_same_bits(got, want, bits, f"{fmt.name} vs torch cast")


def test_unsigned_negative_flush_regressions():
    """Two bugs the exhaustive flush tests found (fixed in kernels.py / reference.py).

    A negative value of an unsigned format that flushes to zero gives +0, like -0 does:
    * FTZ (kernel bug: the negative value was flagged as an overflow and became NaN):
      -0.2 -> 0.25 in binary4p3ue (smallest normal 0.5) is flushed to 0;
    * DAZ (reference bug: the unsigned-negative branch ignored ``flush_input_below``):
      the float32 subnormal -2^-149 read as -0 gives +0 even under round-down.
    """
    f = p3109(4, 3, signed=False)
    x = torch.tensor([-0.2, 0.2])
    assert quantize(x, f, flush_output=True).tolist() == [0.0, 0.0]
    assert math.isnan(quantize(x, f)[0].item())
    assert ref.round_to_float_format(ref.fraction_of_float(-0.2), f, flush_output=True) == 0
    g = p3109(8, 4, signed=False)
    tiny = -(2.0 ** -149)
    assert quantize(torch.tensor([tiny]), g, "rd", flush_input=True).item() == 0.0
    assert math.isnan(quantize(torch.tensor([tiny]), g, "rd").item())
    assert ref.round_to_float_format(ref.fraction_of_float(tiny), g, Rounding.DOWN,
                                     flush_input_below=Fraction(2) ** -126) == 0


LOW_PRECISION_CASES = [
    (torch.float16, ["e4m3", "e5m2", "e2m1", "e3m2", "e4m3fnuz", "binary8p5ue", "int8",
                     "mxint8"]),
    (torch.bfloat16, ["e4m3", "e5m2", "e2m1", "e8m0", "binary8p2se", "int8", "uint4"]),
]


@pytest.mark.parametrize("dtype, names", LOW_PRECISION_CASES, ids=["fp16", "bf16"])
def test_fp16_bf16_inputs_every_code(dtype, names):
    """x of dtype fp16/bf16 (all 65536 codes): the result has x's dtype and equals the rounding
    of the float32 value; DAZ (flush_input) uses x.dtype's smallest normal (2^-14 for fp16)."""
    x = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    xf = x.float()
    tiny = xf.abs() < (2.0 ** -14 if dtype == torch.float16 else 2.0 ** -126)
    xf_daz = torch.where(tiny, torch.copysign(torch.zeros_like(xf), xf), xf)
    for name in names:
        fmt = get_format(name)
        for rounding in DETERMINISTIC:
            for flush in (False, True):
                got = quantize(x, fmt, rounding, flush_input=flush)
                assert got.dtype == dtype
                src = xf_daz if flush else xf
                if isinstance(fmt, FloatFormat):
                    want = table_round(src.numpy(), fmt, rounding, Overflow.SATURATE)
                    want = torch.from_numpy(want)
                else:
                    want = quantize(src, fmt, rounding)
                gb = got.float().view(torch.int32).numpy().view(np.uint32)
                wb = want.view(torch.int32).numpy().view(np.uint32)
                assert_same_bits(gb, wb, x.float().view(torch.int32).numpy().view(np.uint32),
                                 f"{dtype} -> {name} {rounding.value} flush_input={flush}")


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m1", "e3m2", "e8m0", "p3109_k8p3se",
                                  "fp16", "bf16"])
def test_codes_kernel_compiled_equals_eager_on_every_value(name):
    """values_to_codes (one compiled kernel for large tensors) on every value of the format,
    signed zeros, infinities and NaN included, repeated past the compile threshold: the same
    codes as the eager kernel, and decode gives the values back bit for bit."""
    from precisim.formats import get_backend, set_backend
    from precisim.formats.quantize import values_to_codes

    fmt = get_format(name)
    vals = decode(torch.arange(1 << fmt.bits, dtype=torch.int32), fmt)
    reps = -(-(1 << 19) // vals.numel())
    x = vals.repeat(reps)
    old = get_backend()
    try:
        set_backend("compile")
        got = values_to_codes(x, fmt)
        set_backend("eager")
        want = values_to_codes(x, fmt)
    finally:
        set_backend(old)
    assert got.dtype == want.dtype and torch.equal(got, want)
    back = decode(got, fmt)
    nan = x.isnan()
    assert torch.equal(back.isnan(), nan)
    assert torch.equal(back[~nan].view(torch.int32), x[~nan].view(torch.int32))
