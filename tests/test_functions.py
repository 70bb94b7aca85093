"""Elementwise function units (docs/arithmetic.md section 7.1): every preset's fast torch path
equals its exact reference (Fractions, mpmath with a Ziv loop, every rounding by
``round_to_float_format``) bit for bit, on every fp16 and every bf16 input (slow; the default
run takes a strided subset plus every special value), on random fp32 inputs, and for variants
that exercise each field (no FMA, midpoint tables, piecewise polynomials, coefficient formats,
flushing, directed output rounding). Impossible parameters give an error naming the value."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from precisim.emulation.functions import (
    FUNCTION_UNITS,
    FunctionUnit,
    get_function_unit,
    unit_from_dict,
)


def _all(dtype: torch.dtype, stride: int = 1) -> torch.Tensor:
    bits = torch.arange(0, 1 << 16, stride, dtype=torch.int32).to(torch.int16)
    return bits.view(dtype)


def _specials(dtype: torch.dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    v = [0.0, -0.0, math.inf, -math.inf, math.nan, fi.tiny, -fi.tiny, fi.max, -fi.max,
         fi.smallest_normal / 4, -fi.smallest_normal / 4, 1.0, -1.0, 0.5, 2.0, 4.0, 8.0, -8.0,
         7.99, -8.01, 88.5, -87.5, 11.0, -17.0]
    return torch.tensor(v, dtype=dtype)


def _same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def _check(u: FunctionUnit, x: torch.Tensor) -> None:
    y = u(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    bad = []
    for xi, yi in zip(x.float().tolist(), y.tolist()):
        ref = float(u.reference(xi))
        if not _same(ref, yi):
            bad.append((xi, yi, ref))
    assert not bad, f"{u.name}: {len(bad)} mismatches, e.g. (x, fast, exact) {bad[:5]}"


PRESETS = FUNCTION_UNITS.names()

#: variants that exercise the fields the presets leave at their defaults
VARIANTS = [
    dict(base="exp-lut64", name="exp-lut-nofma-bf16", fma=False, table_format="bf16",
         output_format="bf16"),
    dict(base="exp-lut16", name="exp-lut-mid", interpolation="none"),
    dict(base="exp-poly3", name="exp-poly2-pieces", degree=2, table_bits=3,
         coef_format="bf16", fma=False),
    dict(base="exp-poly3", name="exp2-poly4-fp16", function="exp2", degree=4,
         output_format="fp16", flush_output=True),
    dict(base="exp-mx-bf16", name="exp-mx-rtz", output_rounding="rtz", flush_input=True),
    dict(base="exp-exact", name="exp-exact-fp16-out", output_format="fp16"),
    dict(base="rcp-newton1", name="rcp-nofma", fma=False, output_format="bf16"),
    dict(base="rsqrt-newton1", name="rsqrt-nofma-0", fma=False, newton_steps=0),
    dict(base="rsqrt-newton2", name="rsqrt-poly", method="polynomial", degree=3,
         table_bits=2),
    dict(base="rcp-exact", name="rcp-fp16-ru", output_format="fp16", output_rounding="ru"),
    dict(base="silu-lut64", name="silu-poly", method="polynomial", degree=3, table_bits=4),
    dict(base="gelu-lut64", name="gelu-tanh-lut", function="gelu_tanh", interval=(-4, 4),
         output_format="bf16"),
    dict(base="sigmoid-lut64", name="sigmoid-mid", interpolation="none", table_bits=8,
         arg_frac_bits=12),
    dict(name="gelu-sigmoid-ex", function="gelu_sigmoid"),
    dict(name="erf-ex", function="erf", output_format="bf16"),
    dict(base="expf-fast-bound", name="expf-bound-seed", bound_seed=7),
]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_preset_strided(name: str, dtype: torch.dtype) -> None:
    """Every 61st input code of the format (1075 values) and its special values."""
    u = get_function_unit(name)
    _check(u, torch.cat([_all(dtype, 61), _specials(dtype)]))


@pytest.mark.parametrize("spec", VARIANTS, ids=[v["name"] for v in VARIANTS])
def test_variant_strided(spec: dict) -> None:
    u = unit_from_dict(spec)
    for dtype in (torch.float16, torch.bfloat16):
        _check(u, torch.cat([_all(dtype, 127), _specials(dtype)]))


@pytest.mark.parametrize("name", ["exp-exact", "exp-lut64", "exp-poly5", "rcp-newton2",
                                  "rsqrt-newton1", "silu-lut64", "gelu-exact",
                                  "expf-fast-bound", "exp-mx-bf16"])
def test_random_fp32(name: str) -> None:
    """fp32 inputs (24-bit significands) over the ranges that matter."""
    g = torch.Generator().manual_seed(15)
    x = torch.cat([torch.randn(600, generator=g) * 12,
                   torch.randn(200, generator=g).exp() ** 8,
                   -torch.rand(200, generator=g) * 120])
    _check(get_function_unit(name), x)


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS + [v["name"] for v in VARIANTS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_exhaustive(name: str, dtype: torch.dtype) -> None:
    """Every one of the 65536 codes of fp16 and of bf16."""
    spec = next((v for v in VARIANTS if v["name"] == name), None)
    u = unit_from_dict(spec) if spec else get_function_unit(name)
    _check(u, _all(dtype))


def _next(v: torch.Tensor, k: int) -> torch.Tensor:
    """The float32 values ``k`` codes above |v| (same sign): neighbours of edges."""
    b = v.abs().view(torch.int32) + k
    return torch.copysign(b.clamp(0, 0x7F800000).view(torch.float32), v)


def adversarial_fp32(fn: str) -> torch.Tensor:
    """fp32 inputs where a fast path for function ``fn`` is most likely to go wrong, each with
    its fp32 neighbours and both signs: signed zeros, infinities, NaN, subnormals, the normal
    range's ends; for exp / exp2 the overflow and underflow edges (normal, subnormal and zero
    results) and the reduced argument's table boundaries k/64 (and their exp preimages); for
    rcp / rsqrt the seed-table boundaries and powers of two and four; for the bounded
    functions the segment ends on [-8, 8) (2^7 segments) and the asymptotes' region."""
    f = torch.finfo(torch.float32)
    d = torch.float64
    vals = [torch.tensor([0.0, 1.0, 0.5, 2.0, 3.0, f.max, f.tiny, f.tiny / 2, 2.0 ** -149,
                          2.0 ** -140, 1e-8, 1e-30, 1e30, 1e38, 8.0, 40.0, 700.0, 1e6])]
    if fn in ("exp", "exp2"):
        k64 = torch.arange(-64, 129, dtype=d) / 64
        vals += [torch.tensor([88.72283, 88.7, 89.0, 87.33654, 103.27893, 103.97208, 104.0,
                               128.0, 127.99, 126.0, 149.0, 150.0, 151.0, 80.0, 150.0]),
                 k64, k64 / math.log2(math.e)]
    elif fn in ("rcp", "rsqrt"):
        vals += [1 + torch.arange(0, 129, dtype=d) / 128, 2 + torch.arange(0, 129, dtype=d) / 64,
                 torch.tensor([4.0 ** e for e in range(-60, 60, 3)])]
    else:
        vals += [torch.arange(-64, 65, dtype=d) / 8, torch.tensor([15.0, 16.0, 37.0, 150.0])]
    v = torch.cat([t.float() for t in vals])
    v = torch.cat([v, _next(v, 1), _next(v, -1)])
    return torch.cat([v, -v, torch.tensor([math.inf, -math.inf, math.nan, -0.0])])


@pytest.mark.parametrize("name", PRESETS)
def test_adversarial_fp32(name: str) -> None:
    """Every preset's fast path (float32 bit patterns in and out) on :func:`adversarial_fp32`
    equals the exact reference bit for bit."""
    u = get_function_unit(name)
    _check(u, adversarial_fp32(u.function.value))


@pytest.mark.parametrize("name", ["exp-exact", "silu-exact", "rsqrt-exact", "rcp-exact",
                                  "exp-lut64", "exp-mx-bf16", "gelu-exact"])
def test_adversarial_fp32_compiled(name: str) -> None:
    """The same inputs through the torch.compile'd kernel (forced for small tensors): equal
    to the exact reference, hence to the eager kernel, bit for bit."""
    from precisim.formats import kernels

    old = kernels.get_backend()
    try:
        kernels.set_backend("compile")
        u = get_function_unit(name)
        _check(u, adversarial_fp32(u.function.value))
    finally:
        kernels.set_backend(old)


def test_compiled_equals_eager() -> None:
    """The torch.compile'd kernel gives the eager kernel's bits."""
    from precisim.formats import kernels

    x = torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 10
    for name in ("exp-lut64", "rsqrt-newton1", "silu-lut64", "exp-poly3"):
        u = get_function_unit(name)
        old = kernels.get_backend()
        try:
            kernels.set_backend("eager")
            a = u(x)
            kernels.set_backend("compile")
            b = u(x)
        finally:
            kernels.set_backend(old)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name


def test_bound_model_stays_within_its_bound() -> None:
    """expf-fast-bound differs from the correctly rounded fp32 exp by at most 2 +
    floor(1.173|x|) ulp (and is labelled a bound model)."""
    x = torch.linspace(-80, 80, 4001)
    y = get_function_unit("expf-fast-bound")(x).view(torch.int32).long()
    r = get_function_unit("exp-exact")(x).view(torch.int32).long()
    bound = 2 + torch.floor(x.abs() * 1.173).long()
    fin = torch.isfinite(get_function_unit("exp-exact")(x)) & (r > 0x00800000)
    assert ((y - r).abs()[fin] <= bound[fin]).all()
    assert ((y - r)[fin] != 0).float().mean() > 0.5
    assert "bound model" in get_function_unit("expf-fast-bound").describe()


def test_mx_bf16_constant() -> None:
    """microxcaling's LOG2E_BF16 = 1.4453125 is log2(e) rounded to bf16."""
    from precisim.emulation.functions.units import _tables

    assert float(_tables(get_function_unit("exp-mx-bf16")).c) == 1.4453125


@pytest.mark.parametrize("fields, named", [
    (dict(function="exp", method="table", table_bits=0), "table_bits=0"),
    (dict(function="exp", method="polynomial", degree=-1), "degree=-1"),
    (dict(function="exp", output_format="e3m2b10"), "output_format='e3m2b10'"),
    (dict(function="rcp", method="newton", table_bits=3, newton_steps=-2), "newton_steps=-2"),
    (dict(function="exp", method="newton", table_bits=3), "method='newton'"),
    (dict(function="sigmoid", method="table", table_bits=4, interval=(-3, 3)), "interval="),
    (dict(function="exp", input_format="ue8m0"), "input_format"),
    (dict(function="exp", method="bound", output_format="bf16"), "output_format='bf16'"),
    (dict(function="expo"), "function='expo'"),
])
def test_impossible_parameters(fields: dict, named: str) -> None:
    with pytest.raises(ValueError, match="not valid|cannot|is for") as e:
        FunctionUnit("bad", **fields)
    assert named in str(e.value)


def test_registry_and_dict_round_trip() -> None:
    import precisim

    assert precisim.lookup("function:exp-lut64") is get_function_unit("exp-lut64")
    with pytest.raises(KeyError, match="did you mean 'exp-lut64'"):
        get_function_unit("exp-lut65")
    for name in PRESETS:
        u = get_function_unit(name)
        d = u.to_dict()
        assert unit_from_dict(d) == u, name
        assert u.describe()
    with pytest.raises(ValueError, match="unknown key.*'degre' .did you mean 'degree'"):
        unit_from_dict({"base": "exp-poly3", "degre": 4})


@pytest.mark.parametrize("name", ["exp-mx-rtz", "expf-bound-seed", "gelu-sigmoid-ex"])
def test_evaluate_returns_rounded_inputs(name: str) -> None:
    """``evaluate`` gives the outputs of ``__call__`` and the inputs rounded to the input
    format (flushed with ``flush_input``), exactly."""
    u = unit_from_dict(next(v for v in VARIANTS if v["name"] == name))
    x = torch.cat([adversarial_fp32(u.function.value)[:200], torch.tensor([1e-39, -1e-39])])
    y, xq = u.evaluate(x)
    assert torch.equal(y.view(torch.int32), u(x).view(torch.int32))
    r = u.rounders["in"]
    for xi, qi in zip(x.tolist(), xq.tolist()):
        v = xi
        if u.flush_input and 0 < abs(v) < float(u.input_format.min_normal):
            v = math.copysign(0.0, v)
        exact = r.exact(v if not math.isfinite(v) or v == 0 else Fraction(v))
        assert _same(float(exact), qi), (xi, qi)


@pytest.mark.parametrize("spec", [dict(base="exp-mx-bf16", name="mx"),
                                  next(v for v in VARIANTS if v["name"] == "exp-mx-rtz"),
                                  dict(base="silu-lut64", name="silu-fp16-in",
                                       input_format="fp16")], ids=lambda s: s["name"])
@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_code_table_path(spec: dict, backend: str) -> None:
    """Units with a bf16 / fp16 input read large tensors from the table of their 65536
    results (indexed by the input's code after torch's cast): equal bit for bit to the direct
    kernel (itself equal to the exact reference) on fp32 inputs at, just below and just above
    every rounding tie of the input format, and on every code."""
    from precisim.formats import kernels

    u = unit_from_dict(spec)
    dt = torch.bfloat16 if u.input_format.name == "bf16" else torch.float16
    codes = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dt).float()
    bits = codes.view(torch.int32)
    if dt is torch.bfloat16:
        ties = [(bits | off).view(torch.float32) for off in (0x8000, 0x7FFF, 0x8001)]
    else:  # fp16 -> fp32 values with 13 extra bits: the half-ulp is bit 12
        ties = [(bits + off).view(torch.float32) for off in (0x1000, 0xFFF, 0x1001)]
    x = torch.cat([codes, *ties, adversarial_fp32(u.function.value)])
    old = kernels.get_backend()
    try:
        kernels.set_backend(backend)
        y = u(x)
    finally:
        kernels.set_backend(old)
    ref = u._direct(x)[0]
    same = (y.view(torch.int32) == ref.view(torch.int32)) | (y.isnan() & ref.isnan())
    assert bool(same.all()), f"{int((~same).sum())} elements differ"
    _check(u, x[::997])  # and a sample against the exact reference


def test_hard_cases_are_found_on_a_compiled_batch() -> None:
    """A correctly rounded unit's compiled kernel reports a count of hard cases (the elements
    whose float64 value is too close to a rounding boundary) and marks their results NaN; a
    non-zero count makes the unit compute the exact results there. rsqrt rounded toward zero
    of powers of 4 is such a case (the float64 value straddles the exact 2^-k); the large
    batch is compiled."""
    from precisim.emulation.functions.units import FunctionUnit, _kernel
    from precisim.formats import kernels

    u = FunctionUnit("t-rsqrt-rtz", function="rsqrt", method="exact", output_rounding="rtz")
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(300000, generator=g) * 100, 4.0 ** torch.arange(-20, 20).float()])
    old = kernels.get_backend()
    try:
        kernels.set_backend("compile")
        y, count = kernels.run(_kernel(u, mark=True), ("function-unit-mark", u), x.numel(),
                               x)
        _, hard = kernels.run(_kernel(u), ("function-unit", u), x.numel(), x)
        got = u(x)
    finally:
        kernels.set_backend(old)
    assert float(count) == int(hard.sum()) >= 40
    assert bool(hard[-40:].all())
    want = [float(u.reference(v)) for v in x[-40:].tolist()]
    assert got[-40:].tolist() == want
    assert bool(torch.isnan(y[hard]).all())
    assert torch.equal(torch.where(hard, got, y), got)


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_bound_displacement_int32_kernel(backend: str) -> None:
    """The bound model's displacement in int32 / float64 lanes (inside the compiled kernel)
    equals the exact one (Python integers: the unsigned 32-bit hash, the remainder by 2B + 1)
    on inputs whose bits cover every sign and hash range with |x| < 1e6 (the kernel clamps
    |x| there when computing B; beyond, exp(x) is 0 or inf, which are never displaced), and
    results near 0 and near the largest float32 (the clamp of the displaced bits)."""
    from fractions import Fraction

    from precisim.emulation.functions.units import _displace32, _displace_exact, _seed_bits
    from precisim.formats import kernels

    g = torch.Generator().manual_seed(3)
    n = 1 << 18
    xb = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int32)
    x = xb.view(torch.float32)
    u = torch.rand(n, generator=g) * 2e6 - 1e6
    x = torch.where(x.abs() < 1e6, x, u)  # (NaN and inf replaced too)
    yb = torch.randint(1, 0x7F7FFFFF, (n,), generator=g, dtype=torch.int32)
    yb[:1000] = torch.arange(1, 1001, dtype=torch.int32)
    yb[1000:2000] = 0x7F7FFFFF - torch.arange(1000, dtype=torch.int32)
    y = yb.view(torch.float32)
    for seed in (0, 7, 2**31 - 1):
        sb = _seed_bits(seed)

        def disp(y: torch.Tensor, x: torch.Tensor, sb: int = sb) -> torch.Tensor:
            return _displace32(y, x, sb)

        old = kernels.get_backend()
        try:
            kernels.set_backend(backend)
            got = kernels.run(disp, ("test-displace", seed), n, y, x)
        finally:
            kernels.set_backend(old)
        idx = list(range(0, n, 97)) + list(range(2000))
        for i in idx:
            want = _displace_exact(Fraction(float(y[i])), Fraction(float(x[i])), seed)
            assert float(got[i]) == float(want), (float(x[i]), float(y[i]), seed)


def test_bound_displacement_quotient_floor_needs_no_correction() -> None:
    """``_displace32`` takes the remainder of the hash ``h < 2^32`` by ``m = 2B + 1`` from the
    floor of the float64 quotient without a correction step: that floor is ``h // m`` for
    every modulus the kernel forms (B from 2 to 1173002) at the quotients nearest an integer
    (``h = k m - 1, k m, k m + 1`` for small k and the largest k below 2^32) and at random h."""
    m = torch.arange(5, 2 * 1173002 + 2, 2, dtype=torch.int64)
    kmax = (2**32 - 1) // m
    ks = [torch.full_like(m, k) for k in (1, 2, 3, 1000)] + [kmax, kmax - 1]
    g = torch.Generator().manual_seed(5)
    hs = [(k * m + d).clamp(0, 2**32 - 1) for k in ks for d in (-1, 0, 1)]
    hs.append(torch.randint(0, 2**32, m.shape, generator=g, dtype=torch.int64))
    for h in hs:
        assert torch.equal(torch.floor(h.double() / m.double()).long(), h // m)


@pytest.mark.slow
def test_bound_displacement_floor_by_1000_without_division() -> None:
    """``_displace32``'s ``floor(m / 1000)`` is ``floor((m + 0.5) * 0.001)`` in float64 for
    every integer m from 0 to 1.173e9 (``floor(|x| 1173)`` for |x| <= 1e6)."""
    step = 1 << 24
    for lo in range(0, 1_173_000_001, step):
        m = torch.arange(lo, min(lo + step, 1_173_000_001), dtype=torch.float64)
        assert torch.equal(torch.floor((m + 0.5) * 0.001), torch.floor(m / 1000.0)), lo


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_pow2_64_is_exact_at_integers(backend: str) -> None:
    """The table and polynomial exp units scale by ``pow2_64(n)`` (the float64 bits of 2^n):
    exactly 2^n for every integer n their clamped argument reaches (|n| <= 300 covers it),
    eager and compiled, in every lane position of a vectorised loop (and its scalar tail)."""
    from precisim.emulation.matmul.floatarith import pow2_64
    from precisim.formats import kernels

    n = torch.arange(-300, 301, dtype=torch.float64).repeat(37)
    old = kernels.get_backend()
    try:
        kernels.set_backend(backend)
        got = kernels.run(pow2_64, ("test-pow2-64",), n.numel(), n)
    finally:
        kernels.set_backend(old)
    want = torch.tensor([math.ldexp(1.0, int(k)) for k in n.tolist()], dtype=torch.float64)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_nan_scan_in_chunks(backend: str) -> None:
    """The chunked NaN scan of the marked results (a pass counting each chunk's NaNs, then
    only those chunks scanned) returns isnan().nonzero() exactly: NaNs at chunk boundaries,
    in a few chunks only, in the last partial chunk only, everywhere, none, and a small
    tensor; eager and with the counting pass compiled."""
    from precisim.emulation.functions.units import _SCAN_CHUNK, _nan_indices
    from precisim.formats import kernels

    c = _SCAN_CHUNK
    n = 5 * c + 123
    g = torch.Generator().manual_seed(5)
    cases = [[], [2 * c, 2 * c + 5, 4 * c - 1], [n - 124, n - 1], [5 * c - 1],
             [0, 1, c - 1, c, 3 * c + 7, n - 124, n - 1]
             + torch.randint(0, n, (200,), generator=g).tolist()]
    old = kernels.get_backend()
    try:
        kernels.set_backend(backend)
        for idx in cases:
            y = torch.zeros(n)
            y[idx] = math.nan
            want = torch.isnan(y).nonzero().reshape(-1)
            assert torch.equal(_nan_indices(y), want), idx
            assert torch.equal(_nan_indices(y[:4 * c]), want[want < 4 * c]), idx
        assert torch.equal(_nan_indices(y[:100]), torch.isnan(y[:100]).nonzero().reshape(-1))
    finally:
        kernels.set_backend(old)
