"""The float-only helpers of the function units' compiled kernels (docs/arithmetic.md section
7.1) and their one-pass form, each against the slower form it replaces, bit for bit:
``grid_rne`` against the decision-table ``grid_fast`` (exact ties included), ``pow2_pair``
against 2.0**k; the one-pass kernel that marks its hard cases NaN (only those re-run)
against the two-pass kernel and the exact reference; and compiled kernels keep -0.0 results
(a captured -0.0 constant was traced as +0.0)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from precisim.emulation.functions import FunctionUnit, get_function_unit
from precisim.emulation.functions.core import (
    grid_fast,
    grid_rne,
    pow2_pair,
)
from precisim.formats import kernels

sys.path.insert(0, str(Path(__file__).parent))
from test_functions import adversarial_fp32  # noqa: E402


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int64) == b.view(torch.int64)) | (a.isnan() & b.isnan())


def test_grid_rne_equals_grid_fast() -> None:
    """The magic-constant rounding to multiples of 2^-F equals the decision-table one,
    exact ties (odd multiples of 2^-(F+1)) included, for |t| up to 2^13."""
    g = torch.Generator().manual_seed(6)
    for F in (1, 7, 12, 24, 28):
        t = torch.cat([torch.randn(20000, generator=g, dtype=torch.float64) * 300,
                       (torch.randint(-2**20, 2**20, (20000,), generator=g).double() * 2 + 1)
                       * 2.0 ** -(F + 1),
                       torch.tensor([8191.75, -8191.75, 0.0, 2.0**-60, -2.0**-60],
                                    dtype=torch.float64)])
        t = t.clamp(-8192, 8192)
        a, b = grid_rne(t, F), grid_fast(t, F)
        assert torch.equal(a, b), F  # (== : a zero's sign may differ, see grid_rne)


def test_pow2_pair() -> None:
    k = torch.arange(-252, 253, dtype=torch.float64)
    assert torch.equal(pow2_pair(k), 2.0 ** k)


def _rsqrt_rtz() -> FunctionUnit:
    """rsqrt rounded toward zero: powers of 4 are hard cases (the float64 value straddles
    the exact 2^-k), so the exact fallback is forced at known places."""
    return FunctionUnit("t-rsqrt-rtz-mark", function="rsqrt", method="exact",
                        output_rounding="rtz")


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_hard_cases_marked_nan_in_one_pass(backend: str) -> None:
    """A batch with powers of 4 (hard cases) planted among random inputs, NaN inputs and
    negative ones (NaN results that are not hard cases) goes through the marking kernel: its
    NaN results are exactly the hard cases and the NaN results of NaN or negative inputs, its
    count is the number of hard cases, and the unit's result equals the kernel with the mask
    (two passes) everywhere else and the exact reference on every hard element."""
    from precisim.emulation.functions.units import _kernel

    u = _rsqrt_rtz()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(32 * 4096, generator=g) * 100 + 0.5
    planted = torch.tensor([3 * 4096 + 17, 3 * 4096 + 4000, 30 * 4096 + 5])
    x[planted] = torch.tensor([4.0**-20, 16.0, 4.0**30])
    x[[7, 9]] = torch.tensor([math.nan, -3.0])
    old = kernels.get_backend()
    try:
        kernels.set_backend(backend)
        got = u(x)
        marked, count = kernels.run(_kernel(u, mark=True), ("function-unit-mark", u),
                                    x.numel(), x)
        two_pass, hard = kernels.run(_kernel(u), ("function-unit", u), x.numel(), x)
    finally:
        kernels.set_backend(old)
    assert hard.nonzero().reshape(-1).tolist() == planted.tolist() and float(count) == 3
    assert marked.isnan().nonzero().reshape(-1).tolist() == [7, 9, *planted.tolist()]
    keep = ~hard
    assert torch.equal(got[keep].view(torch.int32), two_pass[keep].view(torch.int32))
    want = [float(u.reference(v)) for v in x[planted].tolist()]
    assert got[planted].tolist() == want


@pytest.mark.parametrize("name", ["silu-exact", "rcp-exact", "rcp-newton1"])
def test_compiled_kernel_keeps_negative_zero(name: str) -> None:
    """The compiled kernel returns the eager kernel's bits on the adversarial inputs, -0.0
    results included (silu(-inf) = -0, rcp(-inf) = -0): a -0.0 captured as a Python float
    was traced as a symbolic float and became +0.0."""
    from precisim.emulation.functions.units import _fast_tables, _kernel

    u = get_function_unit(name)
    x = adversarial_fp32(u.function.value)
    tabs = _fast_tables(u, x.device)
    k = _kernel(u)
    want = k(x, *tabs)[0]
    got = kernels._compile(k)(x, *tabs)[0]
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    assert bool(same.all()), x[~same].tolist()
    neg_inf = x == -math.inf
    assert bool(torch.signbit(got[neg_inf]).all()) and bool((got[neg_inf] == 0).all())
