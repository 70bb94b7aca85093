"""The one rounding decision table (formats/rounding.py, docs/arithmetic.md section 3): every
representation asks it, so they agree with each other and with hand-computed answers, the
bias-and-mask fast paths agree with it, and changing one row changes every layer."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch
from precisim.emulation import matmul, unit_from_dict
from precisim.formats import Rounding, kernels, quantize
from precisim.formats import reference as ref
from precisim.formats import rounding as R
from precisim.formats.catalog import get_format

DETERMINISTIC = [r for r in Rounding if r is not Rounding.STOCHASTIC]


def test_every_mode_has_a_row() -> None:
    assert set(R.ROUNDING_RULES) == set(Rounding)


# (kept ulps lo, dropped fraction, negative) -> rounds up?  per mode, by hand
CASES = [
    (4, Fraction(0), False), (4, Fraction(1, 4), False), (4, Fraction(1, 2), False),
    (5, Fraction(1, 2), False), (4, Fraction(3, 4), False), (5, Fraction(1, 4), True),
    (4, Fraction(1, 2), True), (5, Fraction(1, 2), True), (4, Fraction(3, 4), True),
]
EXPECTED = {
    Rounding.NEAREST_EVEN: [0, 0, 0, 1, 1, 0, 0, 1, 1],
    Rounding.TOWARD_ZERO: [0] * 9,
    Rounding.UP: [0, 1, 1, 1, 1, 0, 0, 0, 0],
    Rounding.DOWN: [0, 0, 0, 0, 0, 1, 1, 1, 1],
    Rounding.NEAREST_AWAY: [0, 0, 1, 1, 1, 0, 1, 1, 1],
    Rounding.ODD: [0, 1, 1, 0, 1, 0, 1, 0, 1],
}


@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_known_answers(mode: Rounding) -> None:
    got = [int(bool(R.round_up(mode, R.ExactRemainder(lo, f, neg)))) for lo, f, neg in CASES]
    assert got == EXPECTED[mode]


def test_stochastic_rounding_row() -> None:
    # fraction 3/8 of an ulp with 3 random bits: t = 3, rounds up iff t + R >= 8
    ups = [R.round_up(Rounding.STOCHASTIC, R.ExactRemainder(4, Fraction(3, 8), False, r, 3))
           for r in range(8)]
    assert ups == [False] * 5 + [True] * 3
    with pytest.raises(ValueError, match="random integer"):
        R.round_up(Rounding.STOCHASTIC, R.ExactRemainder(4, Fraction(3, 8), False))


@pytest.mark.parametrize("mode", DETERMINISTIC)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_integer_and_float_representations_agree_with_the_exact_one(mode, dtype) -> None:
    rng = random.Random(7)
    rows = []
    for _ in range(400):
        s = rng.randint(1, 20)  # dropped bits
        lo = rng.randint(0, 1 << 10)
        rem = rng.choice([0, 1 << (s - 1), rng.randint(0, (1 << s) - 1)])
        rows.append((lo, rem, s, rng.random() < 0.5))
    q = torch.tensor([r[0] for r in rows], dtype=dtype)
    rem = torch.tensor([r[1] for r in rows], dtype=dtype)
    half = torch.tensor([1 << (r[2] - 1) for r in rows], dtype=dtype)
    neg = torch.tensor([r[3] for r in rows])
    up_bits = R.round_up(mode, R.BitsRemainder(q, rem, half, neg))
    v = torch.tensor([r[0] + r[1] / 2 ** r[2] for r in rows], dtype=torch.float64)
    up_float = R.round_up(mode, R.FloatRemainder(v, neg))
    want = [bool(R.round_up(mode, R.ExactRemainder(lo, Fraction(rm, 1 << s), n)))
            for lo, rm, s, n in rows]
    for got in (up_bits, up_float):
        got = [False] * len(rows) if got is None else got.tolist()
        assert got == want


def test_mask_fast_paths_equal_the_table_path() -> None:
    """The bias-and-mask rounding of float64 bits (round-to-nearest-even, truncation) gives
    the table's bits (matrix-unit kernels: floatarith.round_float)."""
    from precisim.emulation.matmul.floatarith import MASK_ROUNDINGS, round_float, round_scaled
    from precisim.emulation.matmul.intarith import RoundSpec
    from precisim.formats import Overflow

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-30, 30, (20000,), generator=g).double())
    for name in ("fp32", "bf16", "fp16", "e4m3"):
        for mode in MASK_ROUNDINGS:
            sp = RoundSpec.of(get_format(name), mode, Overflow.SATURATE)
            normal = x.abs() >= 2.0 ** sp.emin
            fast, _ = round_float(x, sp)
            table = round_scaled(x.abs(), torch.signbit(x), sp)
            table = torch.where(torch.signbit(x), -table, table).clamp(-sp.max_value,
                                                                         sp.max_value)
            assert torch.equal(fast[normal], table[normal]), (name, mode)


def test_compiled_kernels_are_specialised_per_mode() -> None:
    """torch.compile'd kernels of several modes in one process each give their own mode's
    bits: the element rounding kernels, and the compiled block chain, whose block results
    round through the table inside the kernel (there a mode once reused the graph compiled
    for another mode: formats.kernels now compiles a private copy per key)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1 << 12, generator=g) * 10
    a = quantize(torch.randn(1, 8, 96, generator=g), "e4m3")
    b = quantize(torch.randn(96, 5, generator=g), "e4m3")
    units = [unit_from_dict({"base": "h100-e4m3", "name": f"u-{m.value}",
                             "acc_rounding": m.value}) for m in DETERMINISTIC]
    old = kernels.get_backend()
    try:
        for backend in ("compile", "eager"):
            kernels.set_backend(backend)
            outs = [quantize(x, "e4m3", mode) for mode in DETERMINISTIC]
            if backend == "compile":
                compiled = outs
                fused = [matmul(a, b, u, kernel="fused-chain") for u in units]
        for mode, p, q in zip(DETERMINISTIC, compiled, outs):
            assert torch.equal(p, q), mode
        chain = [matmul(a, b, u, kernel="float-chain") for u in units]
        for u, p, q in zip(units, fused, chain):
            assert torch.equal(p.view(torch.int32), q.view(torch.int32)), u.name
    finally:
        kernels.set_backend(old)


def test_one_row_drives_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace one row (ties away from zero -> ties toward zero) and every representation
    follows: the exact reference, the float32-bit kernels, and the int64, float and compiled
    matrix-unit kernels (docs/extending.md, 'A new rounding mode')."""
    ties_to_zero = R.RoundingRule(lambda r: r.above_half)
    monkeypatch.setitem(R.ROUNDING_RULES, Rounding.NEAREST_AWAY, ties_to_zero)
    fmt = get_format("e2m1")  # 0, 0.5, 1, 1.5, 2, 3, 4, 6
    xs = [0.25, 0.75, 1.25, 2.5, 3.5, 5.0, -0.75, -5.0, 0.3, 2.6]
    want = [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, -0.5, -4.0, 0.5, 3.0]
    got_ref = [float(ref.round_to_float_format(Fraction(x), fmt, Rounding.NEAREST_AWAY))
               for x in xs]
    assert got_ref == want
    old = kernels.get_backend()
    kernels.set_backend("eager")
    try:
        got = quantize(torch.tensor(xs), "e2m1", "rna").tolist()
        assert got == want
        # a matrix unit whose block result (3 fraction bits) rounds with the replaced row:
        # 1 + 1/16 is a tie between 1 and 1 + 1/8
        for kernel in ("int-chain", "float-chain", "reference"):
            unit = unit_from_dict({"base": "h100-e4m3", "name": "t", "acc_rounding": "rna",
                                   "block_result_bits": 3})
            a = torch.tensor([[1.0, 0.0625]])
            b = torch.tensor([[1.0], [1.0]])
            assert matmul(a, b, unit, kernel=kernel).item() == 1.0, kernel
    finally:
        kernels.set_backend(old)
