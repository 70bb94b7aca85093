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


@pytest.mark.parametrize("name", UNITS)
def test_compiled_and_eager_equal_the_reference(name):
    unit = get_unit(name)
    a, b, c = _ops(unit, seed=len(name))
    ref = matmul(a, b, unit, c, kernel="reference")
    old = kernels.get_backend()
    try:
        for backend in ("compile", "eager"):
            kernels.set_backend(backend)
            assert _same(matmul(a, b, unit, c, kernel="exact-blocks"), ref), backend
    finally:
        kernels.set_backend(old)


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
