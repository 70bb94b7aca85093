"""The compiled exact-block kernel (emulation/matmul/exact_blocks.py): Kulisch accumulators,
sequential FMA and per-add rounding, compiled and eager, against the exact reference; its
certificate (outputs whose float64 pair lost a bit go to the int64 chain), signed zeros and
overflow."""

from __future__ import annotations

import pytest
import torch
from precisim.emulation import get_unit, matmul, unit_from_dict
from precisim.emulation.matmul import exact_blocks as xb
from precisim.formats import kernels, quantize

UNITS = ["exact-fp16", "exact-bf16", "exact-fp32", "exact-e4m3", "fma-fp16-fp32",
         "fma-fp32-fp32", "fma-fp16-fp16", "fma-bf16-bf16", "mul-add-fp16-fp32"]


def _ops(unit, seed, M=4, K=70, N=6, spread=6):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g) * 2.0 ** torch.randint(-spread, spread, (M, K),
                                                              generator=g)
    b = torch.randn(K, N, generator=g) * 2.0 ** torch.randint(-spread, spread, (K, N),
                                                              generator=g)
    c = torch.randn(M, N, generator=g)

    def q(x, f):
        return x if f.name == "fp32" else quantize(x, f, "rne", "saturate")

    return q(a, unit.a_format), q(b, unit.b_format), q(c, unit.acc_format)


def _same(x, y) -> bool:
    return bool(((x.view(torch.int32) == y.view(torch.int32))
                 | (torch.isnan(x) & torch.isnan(y))).all())


def _compiled_and_eager_equal_reference(a, b, unit, c) -> None:
    """exact-blocks, compiled and eager, gives the exact reference's bits."""
    ref = matmul(a, b, unit, c, kernel="reference")
    old = kernels.get_backend()
    try:
        for backend in ("compile", "eager"):
            kernels.set_backend(backend)
            assert _same(matmul(a, b, unit, c, kernel="exact-blocks"), ref), backend
    finally:
        kernels.set_backend(old)


@pytest.mark.parametrize("name", UNITS)
def test_compiled_and_eager_equal_the_reference(name):
    unit = get_unit(name)
    a, b, c = _ops(unit, seed=len(name))
    _compiled_and_eager_equal_reference(a, b, unit, c)


def test_uncertified_outputs_go_to_the_int_chain(monkeypatch):
    """Products 2^100 apart in one output: the float64 pair cannot hold their sum, the
    certificate flags the output and the int64 chain (with its exact fallback) computes it."""
    unit = get_unit("exact-fp32")
    a = torch.tensor([[2.0 ** 60, 1.0, 2.0 ** -60, -(2.0 ** 60)],
                      [1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[1.0], [1.0 + 2.0 ** -23], [3.0], [1.0]])
    calls = []
    real = xb._recompute

    def counted(call, final, flagged):
        calls.append(int(flagged.sum()))
        return real(call, final, flagged)

    monkeypatch.setattr(xb, "_recompute", counted)
    got = matmul(a, b, unit, kernel="exact-blocks")
    assert calls == [1]  # the first row only
    assert _same(got, matmul(a, b, unit, kernel="reference"))
    assert got[0, 0].item() == 1.0 + 2.0 ** -23 + 3 * 2.0 ** -60  # (its fp32 rounding)


def test_signed_zeros_and_overflow():
    unit = get_unit("fma-fp16-fp16")
    a = torch.tensor([[-0.0, -0.0], [0.0, -0.0], [60000.0, 60000.0]])
    b = torch.tensor([[1.0], [1.0]])
    c = torch.tensor([[-0.0], [-0.0], [0.0]])
    got = matmul(a, b, unit, c, kernel="exact-blocks")
    assert torch.signbit(got[0, 0]) and got[0, 0] == 0  # every term -0
    assert not torch.signbit(got[1, 0]) and got[1, 0] == 0  # a +0 product
    assert got[2, 0] == float("inf")  # fp16 overflow gives inf, and stays inf
    sat = unit_from_dict({"base": "fma-fp16-fp16", "name": "s", "acc_overflow": "saturate"})
    assert matmul(a, b, sat, c, kernel="exact-blocks")[2, 0] == 65504.0
    for u in (unit, sat):
        assert _same(matmul(a, b, u, c, kernel="exact-blocks"),
                     matmul(a, b, u, c, kernel="reference"))


def _fma_cases(seed: int, M: int = 48, N: int = 40, K: int = 3):
    """fp32 operands whose products need 48 bits and whose sums with c land next to float32
    midpoints (c + a*b = 1 + 2^-24 + a tail), cancel to the product's low half (c = -fl(ab)),
    or sit at the extremes that :func:`xb._fma32_ok` still accepts."""
    g = torch.Generator().manual_seed(seed)

    def near(n, k, scale, sign):  # 1 +- s*2^-13, s in [-7, 7]: equal s give
        # a*b = 2^-24 * (1 - s^2 * 2^-26), just below the midpoint 2^-24 of c = 1 (+2^-23)
        u = torch.randint(-7, 8, (n, k), generator=g).to(torch.float64)
        return ((1 + sign * u * 2.0 ** -13) * scale).to(torch.float32)

    a = near(M, K, 2.0 ** -24, 1)
    b = near(K, N, 1.0, -1)
    sign = torch.where(torch.rand(M, N, generator=g) < 0.5, -1.0, 1.0)
    c = torch.where(torch.rand(M, N, generator=g) < 0.5, 1.0, 1.0 + 2.0 ** -23) * sign
    a[: M // 4] = -a[: M // 4]
    # cancellation: c = -fl(a0*b0) leaves the exact low half of the first product
    c[M // 4: M // 2] = -(a[M // 4: M // 2, :1] * b[:1]).to(torch.float32)
    # wide exponents within the accepted range (products down to 2^-149, operands to 2^114)
    e = torch.randint(-60, 58, (M, K), generator=g).to(torch.float32)
    a[M // 2:] = torch.randn(M - M // 2, K, generator=g) * torch.exp2(e[M // 2:])
    return a, b, c


@pytest.mark.parametrize("seed", range(4))
def test_fp32_fma_in_float32_equals_the_reference(seed):
    """fma-fp32-fp32 through the float32-only emulated FMA (variant f32x: Dekker product,
    TwoSum, rounding to odd), compiled and eager, equals the exact reference bit for bit on
    midpoint, cancellation and wide-exponent cases."""
    from precisim.emulation.matmul.call import prepare

    unit = get_unit("fma-fp32-fp32")
    a, b, c = _fma_cases(seed)
    assert xb._sequential_variant(prepare(a, b, unit, c, "bit-exact")) == "f32x"
    _compiled_and_eager_equal_reference(a, b, unit, c)


def test_fp32_fma_variant_limits_and_signed_zeros():
    """Operands at or above 2^115, or products below 2^-149, leave the float32 FMA for the
    float64 one; -0 terms keep their sign (-0 + -0*x = -0), an overflow is recomputed exactly,
    and every case equals the reference."""
    from precisim.emulation.matmul.call import prepare

    unit = get_unit("fma-fp32-fp32")
    b = torch.tensor([[1.0], [1.5]])
    for a, want in ((torch.tensor([[2.0 ** 114, 3.0]]), "f32x"),
                    (torch.tensor([[2.0 ** 115, 3.0]]), "f64"),
                    (torch.tensor([[2.0 ** -100, 2.0 ** -3]]), "f32x"),
                    (torch.tensor([[2.0 ** -110, 2.0 ** -3]]), "f64")):
        bb = b * 2.0 ** -3 if want == "f32x" and a[0, 0] < 1 else b
        assert xb._sequential_variant(prepare(a, bb, unit, None, "bit-exact")) == want
        assert _same(matmul(a, bb, unit, kernel="exact-blocks"),
                     matmul(a, bb, unit, kernel="reference"))
    a = torch.tensor([[-0.0, -0.0, -0.0], [0.0, -0.0, -0.0], [3.0e38, 3.0e38, -3.0e38],
                      [1.0 + 2.0 ** -23, -0.0, 0.0]])
    b = torch.tensor([[1.0 + 2.0 ** -23], [1.0], [1.0]])
    c = torch.tensor([[-0.0], [-0.0], [0.0], [-(1.0 + 2.0 ** -22)]])
    for backend in ("compile", "eager"):
        old = kernels.get_backend()
        kernels.set_backend(backend)
        try:
            got = matmul(a, b, unit, c, kernel="exact-blocks")
        finally:
            kernels.set_backend(old)
        assert torch.signbit(got[0, 0]) and got[0, 0] == 0
        assert not torch.signbit(got[1, 0]) and got[1, 0] == 0
        assert _same(got, matmul(a, b, unit, c, kernel="reference")), backend


def _half_ties(fmt: str, n: int = 200_000, seed: int = 0):
    """(a, b, c) as (B, 1, 1) batches of single products where the float32 sum s = fl(c + a*b)
    is a midpoint of ``fmt`` (fp16 or bf16) and the TwoSum error is nonzero (c far below a*b,
    both signs, so the exact value lies on either side of the midpoint), exact ties (c = 0)
    and, for fp16, sums in its subnormal range (quantum 2^-24) at midpoints; every case is
    checked to be what it claims."""
    g = torch.Generator().manual_seed(seed)
    hf = torch.float16 if fmt == "fp16" else torch.bfloat16
    lo, hi = (0, 7) if fmt == "fp16" else (-40, 40)

    def rnd(lo_e, hi_e):
        e = torch.randint(lo_e, hi_e, (n,), generator=g).to(torch.float32)
        return quantize(torch.randn(n, generator=g) * torch.exp2(e), fmt).double()

    def is_mid(x):  # x (float64) lies halfway between two neighbours in fmt
        r = x.to(hf).double()
        o = r + 2 * (x - r)
        return (x != r) & (o.to(hf).double() == o)

    a, b = rnd(lo, hi), rnd(lo, hi)
    p = a * b
    keep = is_mid(p) & (p.abs() >= 4)  # (|c| < ulp(p)/2 then: c does not reach a float32 bit)
    a, b, p = a[keep][:40], b[keep][:40], p[keep][:40]
    sign = torch.where(torch.arange(len(p)) % 2 == 0, 1.0, -1.0).double()
    tiny = quantize((p * sign * 2.0 ** -30).float(), fmt).double()
    tiny = torch.where(tiny == 0, sign * 2.0 ** -24, tiny)  # (fp16: its smallest subnormal)
    A, B, C = [a, a], [b, b], [tiny, torch.zeros_like(p)]
    if fmt == "fp16":  # subnormal-range sums: c + a*b = c +- 2^-25 -+ a tail, |c| < 2^-14
        k = torch.arange(1, 41, dtype=torch.float64) % 3 + 1  # (tails < 2^-41)
        sa = torch.where(torch.arange(40) % 4 < 2, 1.0, -1.0).double()
        A.append(sa * 2.0 ** -12 * (1 + k * 2.0 ** -10))  # a*b = +-2^-25 (1 - k^2 2^-20)
        B.append(2.0 ** -13 * (1 - k * 2.0 ** -10))
        j = torch.randint(512, 1024, (40,), generator=g).double()  # 2^-15 <= |c| < 2^-14
        C.append(j * 2.0 ** -24 * torch.where(torch.arange(40) % 2 == 0, 1.0, -1.0).double())
    a, b, c = (torch.cat(t).float().reshape(-1, 1, 1) for t in (A, B, C))
    x = c.double() + a.double() * b.double()
    s = x.float().double()
    assert bool(is_mid(s).all())
    inexact = (x != s).reshape(-1)
    assert int(inexact[:40].sum()) == 40 and int(inexact[80:].sum()) >= 10 * (fmt == "fp16")
    return a, b, c


@pytest.mark.parametrize("name", ["fma-fp16-fp16", "fma-bf16-bf16"])
def test_sequential_half_rounding_at_midpoints(name):
    """The fp16 / bf16 accumulators' rounding of c + a*b from its float32 TwoSum (rounding
    on the float32 bits, fp16's subnormal range by the 0.75 shift): sums at a midpoint of the
    format whose exact value lies just above or below it, exact ties, and fp16 subnormal
    midpoints, compiled and eager, equal the exact reference."""
    from precisim.emulation.matmul.call import prepare

    unit = get_unit(name)
    a, b, c = _half_ties(unit.acc_format.name)
    assert xb._sequential_variant(prepare(a, b, unit, c, "bit-exact")) == "half"
    _compiled_and_eager_equal_reference(a, b, unit, c)


def test_fp32_fma_in_float32_keeps_signed_zeros():
    """The float32-only FMA (variant f32x, operands in its range): -0 terms keep a -0 sum
    (-0 + -0*x = -0, where th + u would give +0), a +0 product makes it +0, and an exact
    cancellation of c against a 48-bit product leaves the product's low half; compiled and
    eager equal the reference."""
    from precisim.emulation.matmul.call import prepare

    unit = get_unit("fma-fp32-fp32")
    a = torch.tensor([[-0.0, -0.0, -0.0], [0.0, -0.0, -0.0],
                      [1.0 + 2.0 ** -23, -0.0, 0.0], [3.0, -0.0, 2.0 ** -20]])
    b = torch.tensor([[1.0 + 2.0 ** -23], [1.0], [1.0]])
    c = torch.tensor([[-0.0], [-0.0], [-(1.0 + 2.0 ** -22)], [-3.0 - 3 * 2.0 ** -23]])
    assert xb._sequential_variant(prepare(a, b, unit, c, "bit-exact")) == "f32x"
    _compiled_and_eager_equal_reference(a, b, unit, c)
    got = matmul(a, b, unit, c, kernel="exact-blocks")
    assert torch.signbit(got[0, 0]) and got[0, 0] == 0
    assert not torch.signbit(got[1, 0]) and got[1, 0] == 0
    assert got[2, 0].item() == 2.0 ** -46


@pytest.mark.parametrize("name", ["fma-fp16-fp16", "fma-bf16-bf16", "fma-fp32-fp32",
                                  "fma-e4m3-fp32", "mul-add-fp16-fp32"])
def test_fast_fidelity_of_one_product_blocks_is_exact_blocks(name):
    """Units with one product per block: the fast fidelity runs exact-blocks (kernel
    exact-blocks-fast, ahead of the float model, which would take a matmul per product), so
    the fast result equals the exact reference bit for bit; units with longer blocks keep the
    float model, and the refusal says why."""
    from precisim.emulation import explain

    unit = get_unit(name)
    a, b, c = _ops(unit, seed=3)
    ex = explain(a, b, unit, c, fidelity="fast")
    assert ex.kernel == "exact-blocks-fast", str(ex)
    ref = matmul(a, b, unit, c, kernel="reference")
    assert _same(matmul(a, b, unit, c, fidelity="fast"), ref)
    other = get_unit("exact-fp16")
    a2, b2, c2 = _ops(other, seed=3)
    ex2 = explain(a2, b2, other, c2, fidelity="fast")
    assert ex2.kernel == "fast-float"
    assert dict(ex2.refused)["exact-blocks-fast"].startswith("blocks of more than one product")
