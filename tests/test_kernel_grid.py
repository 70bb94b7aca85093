"""Every bit-exact matrix-unit kernel against the exact reference, over a grid of MatrixUnit
field values: for each unit of the grid and each kernel that says it supports the call, the
kernel's output equals ``kernel="reference"`` bit for bit (and a kernel that refuses says why).

The grid varies one field at a time around several bases (NVIDIA-style FP8 / bf16 datapaths,
an exact accumulator, an integer accumulator) and adds seeded random combinations of many
fields. The compiled chain runs its kernels eagerly here (backend "auto" on small tensors);
tests/test_emulation_fused_chain.py checks the compiled kernels against their eager twins.
"""

from __future__ import annotations

import dataclasses
import random
import zlib

import pytest
import torch
from precisim.emulation import MatrixUnit, available_kernels, explain, matmul
from precisim.emulation.matmul.reference_kernel import REFERENCE_FIELDS
from precisim.emulation.matmul.registry import ALL_FIELDS, KERNELS
from precisim.formats import FormatError, kernels, quantize

BASES = {
    "nv-fp8": dict(a_format="e4m3", block_size=32, alignment_bits=13, acc_rounding="rtz",
                   block_result_bits=13),
    "nv-bf16": dict(a_format="bf16", block_size=16, alignment_bits=25, acc_rounding="rtz"),
    "exact": dict(a_format="fp16", block_size=8, alignment_bits=None),
    "int-acc": dict(a_format="int8", block_size=4, acc_format="int16", acc_overflow="wrap"),
}

# one field at a time (each value applied to every base where it is valid)
VARIATIONS: dict[str, list] = {
    "b_format": ["e5m2", "e2m1", "bf16"],
    "block_size": [1, 4, 16],
    "product_format": ["bf16", "fp32"],
    "c_mode": ["after"],
    "alignment": ["normalised"],
    "alignment_bits": [None, 10, 30],
    "drop": ["floor", "nearest", "sticky"],
    "alignment_floor": [-3],
    "acc_format": ["fp16", "bf16"],
    "acc_rounding": ["rne", "rtz", "ru", "rd", "rna", "rto"],
    "acc_overflow": ["saturate"],
    "block_result_bits": [5, 13],
    "flush_input_subnormals": [True],
    "flush_output_subnormals": [True],
    "output_format": ["bf16", "fp16"],
    "output_rounding": ["rtz", "rna"],
    "promotion_interval": [32, 64],
    "promotion_rounding": ["rtz"],
}


def _unit(name: str, fields: dict) -> MatrixUnit | None:
    try:
        return MatrixUnit(name, **fields)
    except (ValueError, FormatError, TypeError):
        return None  # not a valid combination


def _grid() -> list[MatrixUnit]:
    units = []
    for bname, base in BASES.items():
        units.append(_unit(bname, base))
        for field, values in VARIATIONS.items():
            for v in values:
                units.append(_unit(f"{bname}:{field}={v}", {**base, field: v}))
    rng = random.Random(2025)
    for i in range(40):  # random combinations of several fields
        bname = rng.choice(list(BASES))
        fields = dict(BASES[bname])
        for field in rng.sample(list(VARIATIONS), 4):
            fields[field] = rng.choice(VARIATIONS[field])
        units.append(_unit(f"{bname}:mix{i}", fields))
    out, seen = [], set()
    for u in units:
        if u is not None and dataclasses.replace(u, name="x") not in seen:
            seen.add(dataclasses.replace(u, name="x"))
            out.append(u)
    return out


GRID = _grid()


def _operands(unit: MatrixUnit, seed: int):
    """Small operands with a wide exponent spread, zeros of both signs, exact cancellation,
    and an incoming c (values of the unit's formats)."""
    g = torch.Generator().manual_seed(seed)
    M, K, N = 3, 70, 4
    a = torch.randn(M, K, generator=g) * 2.0 ** torch.randint(-8, 8, (M, K), generator=g)
    b = torch.randn(K, N, generator=g) * 2.0 ** torch.randint(-8, 8, (K, N), generator=g)
    a[0, ::5] = 0.0
    b[1::7, 1] = -0.0
    a[1, 1::2] = a[1, 0::2]
    b[1::2, 2] = -b[0::2, 2]
    c = torch.randn(M, N, generator=g) * 4
    cf = unit.promotion_format if unit.promotion_interval else unit.acc_format
    return (quantize(a, unit.a_format), quantize(b, unit.b_format),
            quantize(c, cf, "rne", "saturate"))


def test_the_grid_is_large_and_covers_every_field() -> None:
    assert len(GRID) >= 100
    varied = {f for u in GRID for f in ALL_FIELDS
              if getattr(u, f) != getattr(MatrixUnit("d"), f)}
    assert varied >= ALL_FIELDS - {"acc_sr_bits", "promotion_format", "output_overflow",
                                   "product_rounding"}


def test_the_reference_models_every_field() -> None:
    """The exact reference is the specification: a field added to MatrixUnit must be added to
    the reference (and so to its field list) before any kernel can claim it."""
    assert REFERENCE_FIELDS == ALL_FIELDS
    for name in available_kernels():
        assert KERNELS.get(name).fields <= ALL_FIELDS


@pytest.mark.parametrize("unit", GRID, ids=[u.name for u in GRID])
def test_every_supporting_kernel_equals_the_reference(unit: MatrixUnit) -> None:
    a, b, c = _operands(unit, seed=zlib.crc32(unit.name.encode()) % 997)
    old = kernels.get_backend()
    kernels.set_backend("auto")  # the compiled chain's kernels, run eagerly on small tensors
    try:
        ref = matmul(a, b, unit, c, kernel="reference")
        ran = []
        for name in available_kernels("bit-exact"):
            if name == "reference":
                continue
            why = explain(a, b, unit, c, kernel=name)
            if why.kernel is None:
                assert why.refused and why.refused[-1][1], name  # a refusal says why
                continue
            got = matmul(a, b, unit, c, kernel=name)
            same = (got.view(torch.int32) == ref.view(torch.int32)) | (
                torch.isnan(got) & torch.isnan(ref))
            assert bool(same.all()), (name, unit, got[~same][:4], ref[~same][:4])
            ran.append(name)
        assert "int-chain" in ran  # the generic chain takes every unit
    finally:
        kernels.set_backend(old)
