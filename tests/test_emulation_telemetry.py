"""Telemetry counters: known answers at the overflow threshold, and the fused counting kernel
(eager and torch.compile'd) equal to the plain definition on adversarial data."""

from __future__ import annotations

import math

import pytest
import torch
from precisim.emulation.telemetry import count_events, count_events_reference
from precisim.formats import Overflow, get_backend, quantize, set_backend
from precisim.formats.scaling import get_scaled_format, quantize_scaled


def _plain(x: torch.Tensor, fmt: str, overflow: str = "saturate") -> dict[str, int]:
    q = quantize(x, fmt, overflow=Overflow.parse(overflow))
    return {k: int(v) for k, v in count_events(x, q, __import__(
        "precisim.formats", fromlist=["get_format"]).get_format(fmt)).items()}


def test_known_answers_e4m3_threshold_and_flush() -> None:
    # e4m3fn: max 448 = 1.110b x 2^8, ulp 32: 464 is a tie that rounds (to even) to 448
    x = torch.tensor([464.0, 464.5, 470.0, 500.0, -1e4, math.inf, math.nan, 1e-5, -1e-4,
                      0.0, 1.0])
    c = _plain(x, "e4m3")
    assert c["saturated"] == 4 and c["flushed"] == 2 and c["nonfinite"] == 0
    assert c["numel"] == 11
    # with overflow to inf (e5m2) the beyond-threshold values become inf: counted as both
    y = torch.tensor([61440.0, 61441.0, 1e6, 1.0])  # e5m2 max 57344 = 1.11b x 2^15, tie 61440
    c = _plain(y, "e5m2", "inf")
    assert c["saturated"] == 3 and c["nonfinite"] == 3


def test_known_answers_odd_maximum_tie_overflows() -> None:
    # e2m1: max 6 = 1.1b x 2^2 (odd): the tie at 7 rounds to 8, beyond the format
    c = _plain(torch.tensor([6.9, 7.0, 7.1, -7.0, 6.0]), "e2m1")
    assert c["saturated"] == 3


def _adversarial(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.distributions.StudentT(2.0).sample((n,)) * 0.5
    x = x * torch.exp2(torch.randint(-30, 20, (n,), generator=g).float() / 4)
    idx = torch.randint(0, n, (n // 50,), generator=g)
    x[idx[: len(idx) // 4]] = math.inf
    x[idx[len(idx) // 4: len(idx) // 2]] = math.nan
    x[idx[len(idx) // 2: 3 * len(idx) // 4]] = 0.0
    x[idx[3 * len(idx) // 4:: 2]] = 3.4e38  # beyond bf16's threshold too
    x[idx[3 * len(idx) // 4 + 1:: 2]] = -1e-44  # an fp32 subnormal: flushed by every format
    return x.reshape(-1, 256)


@pytest.mark.parametrize("backend", ["eager", "compile"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e2m1", "int8", "bf16", "mxfp4", "mxfp8",
                                 "nvfp4", "fp8_tensor", "int4_group128"])
def test_fused_counts_equal_the_definition(fmt: str, backend: str) -> None:
    old = get_backend()
    set_backend(backend)
    try:
        for seed in (0, 1):
            x = _adversarial(1 << 16, seed)
            try:
                sf = get_scaled_format(fmt)
            except Exception:
                sf = None
            if sf is not None:
                st = quantize_scaled(x, sf, return_parts=True)
                got = count_events(x, st.dequantized, sf, st)
                ref = count_events_reference(x, st.dequantized, sf, st)
            else:
                from precisim.formats import get_format

                f = get_format(fmt)
                q = quantize(x, f)
                got, ref = count_events(x, q, f), count_events_reference(x, q, f)
            assert {k: int(v) for k, v in got.items()} == {k: int(v) for k, v in ref.items()}
            if fmt not in ("nvfp4", "fp8_tensor"):  # a tensor-wide scale follows the outliers
                assert int(ref["flushed"]) > 0
    finally:
        set_backend(old)


def _counts(d: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k: int(v) for k, v in d.items() if k != "numel"}


# every format eagerly; the compiled kernels (slow to build) for one of each kernel family:
# fused MX (rne), two-pass MX (rtz, sr), float scales with a tensor scale, 2-D tiles
_COMPILED_FORMATS = ("mxfp8", "mxfp4", "nvfp4", "fp8_128x128")


@pytest.mark.parametrize("backend,rounding", [("eager", "rne"), ("eager", "rtz"),
                                              ("eager", "sr"), ("compile", "rne"),
                                              ("compile", "sr")])
def test_events_counted_in_the_quantization_kernel_equal_the_definition(
        backend: str, rounding: str) -> None:
    """quantize_scaled(..., events=...) counts inside its kernel (fused MX, two-pass MX, float
    scales; padded operands through the parts) exactly what the eager definition counts, and
    returns the same values as without counting."""
    from precisim.formats.scaling import SCALED_FORMATS, events_of_parts

    names = SCALED_FORMATS.names() if backend == "eager" else _COMPILED_FORMATS
    old = get_backend()
    set_backend(backend)
    try:
        xs = [_adversarial(1 << 14, 2), _adversarial(1 << 14, 3)[:, :200],  # padded blocks
              torch.randn(64, 256) * torch.logspace(-40, 38, 256)]  # scales at both limits
        for name in names:
            f = get_scaled_format(name)
            kw: dict = {"rounding": rounding}
            if rounding == "sr":
                kw.update(sr_bits=8, seed=5)
            for x in xs:
                st = quantize_scaled(x, f, return_parts=True, **kw)
                ev: dict[str, torch.Tensor] = {}
                deq = quantize_scaled(x, f, events=ev, **kw)
                assert torch.equal(deq.view(torch.int32), st.dequantized.view(torch.int32)), name
                ref = count_events_reference(x, st.dequantized, f, st)
                assert _counts(ev) == _counts(ref), (name, tuple(x.shape))
                assert _counts(ev) == _counts(events_of_parts(x, st)), name
    finally:
        set_backend(old)


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_e8m0_scale_clamps_known_answers(backend: str) -> None:
    """MXFP4 blocks: amax 12 (scale 2^1, E8M0 code 128: not clamped; an earlier version took
    code 128 for a clamp), all 1e-40 (k clamps at -127: clamped), a NaN (code 0xFF; its block's
    finite elements are counted as ``nonfinite``, not as a scale clamp), all zero (2^-127 but
    nothing to represent: not clamped), an inf (code 0xFF: clamped)."""
    old = get_backend()
    set_backend(backend)
    try:
        x = torch.zeros(4, 32)
        x[0] = 12.0
        x[1] = 1e-40
        x[2, 3] = math.nan
        x = torch.cat([x, torch.full((1, 32), math.inf)]).repeat(1 << 12, 1)  # compiled size
        f = get_scaled_format("mxfp4")
        ev: dict[str, torch.Tensor] = {}
        st = quantize_scaled(x, f, return_parts=True, events=ev)
        n = 1 << 12
        assert int(ev["scale_clamped"]) == 2 * n and int(ev["blocks"]) == 5 * n
        assert int(ev["nonfinite"]) == 31 * n + 0
        ref = count_events_reference(x, st.dequantized, f, st)
        assert int(ref["scale_clamped"]) == 2 * n
    finally:
        set_backend(old)


def _next(x: torch.Tensor, d: int) -> torch.Tensor:
    """The float32 neighbour of each positive ``x`` (d = +1 up, -1 down)."""
    return (x.view(torch.int32) + d).view(torch.float32)


def _floor_edges(name: str) -> torch.Tensor:
    """Blocks of 32 at the thresholds of :func:`precisim.formats.scaling._floor_events` for
    every scale from 2^-127 to the largest FLOOR gives: the flush threshold 2^(k + emin - m - 1)
    and the overflow threshold fl32(max * ratio) * 2^k, each with its float32 neighbours and
    signs, max * 2^k, zeros, float32 subnormals; and blocks holding NaN or inf."""
    from precisim.formats.events import overflow_ratio

    e = get_scaled_format(name).element
    g = torch.Generator().manual_seed(7)
    rows = []
    for k in range(-127, 128 - e.emax):
        s = 2.0 ** k
        top = torch.tensor(float(e.max), dtype=torch.float32) * overflow_ratio(e)
        thr = top * s
        tiny = torch.tensor(2.0 ** (k + e.emin - e.man_bits - 1), dtype=torch.float32)
        amax = _next(torch.tensor(2.0 ** (k + e.emax + 1), dtype=torch.float32), -1)
        vals = [amax, thr, _next(thr, 1), _next(thr, -1), torch.tensor(float(e.max) * s),
                tiny, _next(tiny, 1), _next(tiny, -1), torch.tensor(0.0),
                torch.tensor(1e-45), torch.tensor(2.0 ** -126)]
        row = torch.stack([v.float() for v in vals])
        row = torch.cat([row, -row[1:8]])
        fill = torch.rand(32 - len(row), generator=g) * float(amax)
        rows.append(torch.cat([row, fill])[torch.randperm(32, generator=g)])
    x = torch.stack(rows)
    odd = x[:4].clone()
    odd[0, 3], odd[1, 5], odd[2] = math.nan, math.inf, -math.inf
    odd[3, 7] = 3.4e38  # FLOOR's largest scale next to small elements
    return torch.cat([x, odd]).repeat(64, 1)  # past the compile threshold


@pytest.mark.parametrize("backend", ["eager", "compile"])
@pytest.mark.parametrize("name", ["mxfp8", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4"])
def test_floor_events_from_block_exponents_equal_the_kernel_over_results(
        name: str, backend: str) -> None:
    """The events of a FLOOR round-to-nearest-even quantization counted in its kernel from the
    input bits and the block exponents (_floor_events) equal those of the kernel over the
    quantized results (_pow2_events, used before and for the other rules) and the
    definition, at every threshold's float32 neighbours for every scale, in NaN/inf blocks and
    on the adversarial data."""
    from precisim.formats.scaling import (
        _block_amax_bits,
        _event_consts,
        _pow2_events,
        events_of_parts,
    )

    f = get_scaled_format(name)
    old = get_backend()
    set_backend(backend)
    try:
        for x in (_floor_edges(name), _adversarial(1 << 16, 4)):
            ev: dict[str, torch.Tensor] = {}
            deq = quantize_scaled(x, f, events=ev)
            st = quantize_scaled(x, f, return_parts=True)
            assert torch.equal(deq.view(torch.int32), st.dequantized.view(torch.int32))
            xb = x.reshape(-1, 32)
            codes = st.scales.reshape(-1, 1).to(torch.int32)
            k = torch.where(codes == 255, 255, codes - 127)
            before = _pow2_events(xb, st.dequantized.reshape(-1, 32), k,
                                  _block_amax_bits(xb, (1,)), f, _event_consts(f))
            got = [int(ev[n]) for n in ("flushed", "nonfinite", "saturated", "scale_clamped")]
            assert got == [int(v) for v in before], name
            assert _counts(ev) == _counts(events_of_parts(x, st)), name
            if x.shape[0] < 1 << 14:  # the edge blocks hit every kind of event
                assert min(got[:3]) > 0, got
    finally:
        set_backend(old)


def _formats_with_thresholds() -> list:
    from precisim.formats import get_format
    from precisim.formats.catalog import FORMATS

    names = list(FORMATS.names()) + ["e8m23", "e11m52", "e5m10", "e3m4", "e2m3", "int4"]
    out = []
    for n in dict.fromkeys(names):
        try:
            out.append(get_format(n))
        except Exception:  # a name that is not an element format (no threshold)
            continue
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_beyond_bound_is_the_first_value_of_the_type_that_overflows(dtype: torch.dtype) -> None:
    """For every registered element format (and fp32/fp64-wide ones) the one-sided bound of
    ``dtype`` that plain_events compares with classifies the bound and its neighbours of that
    type exactly as the definition (above the threshold t, or at t when the tie overflows),
    decided in Fractions."""
    from fractions import Fraction

    from precisim.formats.events import beyond_bound, overflow_threshold

    fmts = _formats_with_thresholds()
    assert len(fmts) > 10
    for f in fmts:
        t, tie = overflow_threshold(f)
        c = beyond_bound(f, dtype)
        if math.isinf(c):  # no finite value of dtype overflows: the largest one does not
            big = torch.finfo(dtype).max
            assert Fraction(big) < Fraction(t) or (Fraction(big) == Fraction(t) and not tie), f
            continue
        ct = torch.tensor(c, dtype=dtype)
        for v in (ct, torch.nextafter(ct, torch.tensor(math.inf, dtype=dtype)),
                  torch.nextafter(ct, torch.tensor(0.0, dtype=dtype))):
            fv = Fraction(float(v))
            want = fv > Fraction(t) or (fv == Fraction(t) and tie)
            assert (float(v) >= c) == want, (f, float(v))


@pytest.mark.parametrize("backend", ["eager", "compile"])
@pytest.mark.parametrize("op", ["add", "mul"])
@pytest.mark.parametrize("fmt", ["bf16", "e4m3", "fp16", "e5m2"])
def test_op_events_count_the_exact_value(op: str, fmt: str, backend: str) -> None:
    """count_op_events (the exact sum or product computed inside the counting kernel) equals
    the definition applied to the float64 exact value, on adversarial operands, and counts
    what a float32 rounding of the exact value would hide: a product below float32's range
    that became zero is flushed; a sum just below an odd-maximum tie threshold does not
    overflow."""
    from precisim.emulation.rounded_ops import _EXACT, Rounded, _Counted
    from precisim.emulation.telemetry import count_op_events, plain_counts
    from precisim.formats import get_format
    from precisim.formats.events import overflow_threshold

    f = get_format(fmt)
    spec = Rounded.parse(fmt)
    old = get_backend()
    set_backend(backend)
    try:
        a = _adversarial(1 << 16, 4).reshape(-1)
        b = _adversarial(1 << 16, 5).reshape(-1)
        t, _ = overflow_threshold(f)
        extra_a = torch.tensor([2.0 ** -80, t, -t, t, 1.0], dtype=torch.float32)
        extra_b = torch.tensor([2.0 ** -80, -(2.0 ** -100), 2.0 ** -100, 0.0, 0.0])
        a, b = torch.cat([a, extra_a]), torch.cat([b, extra_b])
        ro: list[torch.Tensor] = []
        y = spec.add(a, b, ro) if op == "add" else spec.mul(a, b, ro)
        got = count_op_events(_EXACT[op], f"test-{op}", a, b, y, f)
        exact = _EXACT[op](a, b)
        assert exact.dtype == torch.float64
        ref = count_events_reference(exact, y, f)
        assert {k: int(v) for k, v in got.items()} == {k: int(v) for k, v in ref.items()}
        # the rounding's float32 round-to-odd value counts the same (what telemetry uses)
        assert len(ro) == 1 and ro[0].dtype == torch.float32
        from_ro = count_events(ro[0], y, f)
        assert {k: int(v) for k, v in from_ro.items()} == {k: int(v) for k, v in ref.items()}
        assert int(got["saturated"]) > 0 and int(got["flushed"]) > 0
        # the counts made inside the rounding's own kernel (_Counted: the sums of the
        # round-to-odd value, never written out), on every operand and on those inside the
        # fast product's ranges (every product there takes that kernel)
        p = a.double() * b.double()
        safe = ((a.abs() >= 2.0 ** -100) & (b.abs() >= 2.0 ** -100) & (a.abs() < 2.0 ** 100)
                & (b.abs() < 2.0 ** 100) & (p.abs() >= 2.0 ** -96) & (p.abs() < 2.0 ** 120))
        for sa, sb in ((a, b), (a[safe], b[safe])):
            cnt = _Counted()
            yc = spec.add(sa, sb, cnt) if op == "add" else spec.mul(sa, sb, cnt)
            ys = spec.add(sa, sb) if op == "add" else spec.mul(sa, sb)
            assert torch.equal(yc.view(torch.int32), ys.view(torch.int32))
            if op == "add" or sa is not a:  # (all operands: a product outside the ranges)
                assert cnt.sums is not None and not cnt
                counted = plain_counts(yc.numel(), cnt.sums)
            else:
                assert cnt.sums is None and len(cnt) == 1
                counted = count_events(cnt[0], yc, f)
            want = count_events_reference(_EXACT[op](sa, sb), yc, f)
            assert {k: int(v) for k, v in counted.items()} == \
                {k: int(v) for k, v in want.items()}
            assert sa is not a or (int(want["saturated"]) > 0 and int(want["flushed"]) > 0)
        # the float32-rounded exact value would count otherwise on the extra elements
        tail = slice(len(a) - 5, len(a))
        e64 = count_events_reference(exact[tail], y[tail], f)
        e32 = count_events_reference(exact[tail].float(), y[tail], f)
        if op == "mul" and fmt == "bf16":  # 2^-160 != 0 became 0
            assert int(e64["flushed"]) == int(e32["flushed"]) + 1
        if op == "add" and fmt == "bf16":  # t - 2^-100 and -(t - 2^-100) stay below t
            assert int(e32["saturated"]) == int(e64["saturated"]) + 2
    finally:
        set_backend(old)
