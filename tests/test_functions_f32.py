"""The float32 kernel of the table, polynomial and Newton function units (docs/arithmetic.md
section 7.1, "The float32 datapath") against the float64 kernel it replaces, bit for bit, and
its float32 helpers against their float64 forms: ``grid_rne32`` against ``grid_rne`` (ties
included), ``fma32`` (exact emulation eagerly, the fused instruction compiled) against the
exact sum in Fractions. The float64 kernel equals the exact reference on every fp16 and bf16
input (tests/test_functions.py); the float32 kernel is compared with it on every reduced
argument of the exp2 cores (all 2^24 of them), every float32 mantissa of the rcp / rsqrt cores
(all 2^24 inputs in [1, 4)), float32 subnormals, special values and random inputs, eager and
compiled."""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from precisim.emulation.functions import FunctionUnit, get_function_unit, unit_from_dict
from precisim.emulation.functions.core import (
    _fma_probe_args,
    fma32,
    fused_fma32_compiles,
    grid_rne,
    grid_rne32,
)
from precisim.emulation.functions.units import (
    _f32_core,
    _fast_tables,
    _fast_tables_cpu,
    _kernel,
)
from precisim.formats import Overflow, Rounding, get_format, kernels
from precisim.formats.reference import round_to_float_format

sys.path.insert(0, str(Path(__file__).parent))
from test_functions import VARIANTS, _all, _check, _specials, adversarial_fp32  # noqa: E402


def _same32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())


def _run(fn, backend: str, *args: torch.Tensor):  # noqa: ANN001, ANN202
    """``fn(*args)`` eagerly, or compiled as precisim compiles its kernels (without the
    first-use check against the eager twin, which would hide a compiled difference)."""
    if backend != "compile":
        return fn(*args)
    # (a fresh compile: torch.compile caches graphs per code object, and the private copies
    # that kernels._compile makes are told apart by kernels.run's keys, not used here)
    torch._dynamo.reset()
    return kernels._compile(fn)(*args)


# ---------------------------------------------------------------------------------------------
# the helpers

@pytest.mark.parametrize("frac_bits", [2, 12, 23, 24, 26, 28])
@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_grid_rne32_equals_grid_rne(frac_bits: int, backend: str) -> None:
    """Float32 values of every magnitude, the grid's ties and their float32 neighbours, both
    signs and zeros: ``grid_rne32`` gives ``grid_rne``'s value (on float64), zeros as +0."""
    g = torch.Generator().manual_seed(frac_bits)
    step = 2.0 ** -frac_bits
    ties = (torch.arange(-3000, 3000, dtype=torch.float64) + 0.5) * step
    big = (torch.arange(-3000, 3000, dtype=torch.float64) + 0.5) * step * 2.0**20
    t = torch.cat([ties, big, torch.randn(1 << 16, generator=g, dtype=torch.float64)
                   * torch.exp2(torch.randint(-40, 12, (1 << 16,), generator=g))]).float()
    b = t.view(torch.int32)
    t = torch.cat([t, (b + 1).view(torch.float32), (b - 1).view(torch.float32),
                   torch.tensor([0.0, -0.0, 2.0**-149, -(2.0**-149), 4096.0, -4095.5])])
    m = 2.0 ** (23 - frac_bits)
    want = grid_rne(t.double(), frac_bits).float()
    want = torch.where(want == 0, 0.0, want)  # (+0, as grid_rne32)
    got = _run(lambda t: grid_rne32(t, m), backend, t)  # (m a constant, as in the kernels)
    assert bool(_same32(got, want).all()), t[~_same32(got, want)][:5].tolist()


def _exact_fma32(a: float, b: float, c: float) -> float:
    s = Fraction(a) * Fraction(b) + Fraction(c)
    return float(round_to_float_format(s, get_format("fp32"), Rounding.NEAREST_EVEN,
                                       Overflow.INF))


def _fma_cases() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b, c = _fma_probe_args()
    g = torch.Generator().manual_seed(3)
    n = 1 << 16
    a2 = torch.rand(n, generator=g) + 1  # products near float32 midpoints: c cancels them
    b2 = torch.rand(n, generator=g) + 1
    c2 = -(a2 * b2) + torch.randn(n, generator=g) * 2.0**-30
    return torch.cat([a, a2]), torch.cat([b, b2]), torch.cat([c, c2])


def test_fma32_emulation_is_the_fused_multiply_add() -> None:
    """The eager ``fma32`` (exact product in float64, one rounding by ``add_rne32``) is the
    float32 rounding of the exact ``a * b + c`` (Fractions), on the probe's cases and on
    cancelling ones; the probe's cases tell a fused from an unfused compiled FMA (the unfused
    result differs on most of them)."""
    a, b, c = _fma_cases()
    got = fma32(a, b, c, fused=False)
    for i in list(range(0, 1031)) + list(range(1031, a.numel(), 97)):
        w = _exact_fma32(a[i].item(), b[i].item(), c[i].item())
        assert got[i].item() == w or (math.isnan(w) and math.isnan(got[i].item())), i
    pa, pb, pc = _fma_probe_args()
    unfused = pa * pb + pc
    assert int((~_same32(unfused, fma32(pa, pb, pc, fused=False))).sum()) > 500


def test_fma32_compiled_equals_eager() -> None:
    """Compiled, ``fma32`` with the probe's verdict gives the eager bits; on this machine's
    CPU (x86-64 with FMA, or aarch64) the probe finds the compiled FMA fused."""
    fused = fused_fma32_compiles()
    a, b, c = _fma_cases()

    def f(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return fma32(a, b, c, fused)

    got = _run(f, "compile", a, b, c)
    assert bool(_same32(got, fma32(a, b, c, fused=False)).all())
    assert fused, "the compiled prims.fma rounds twice on this machine"


# ---------------------------------------------------------------------------------------------
# the float32 kernel against the float64 kernel

#: units that exercise the float32 kernel's input and output roundings other than fp32's own
#: (bf16 / fp16 inputs, flushed inputs and outputs, directed output rounding)
EXTRA = {
    "rcp-exact-ftz": dict(base="rcp-exact", flush_output=True),
    "exp-lut-bf16in-ftz-rtz": dict(base="exp-lut64", input_format="bf16", flush_input=True,
                                   flush_output=True, output_rounding="rtz"),
    "silu-lut-fp16in-bf16out": dict(base="silu-lut64", input_format="fp16",
                                    output_format="bf16"),
    "rsqrt-newton-ftz-in": dict(base="rsqrt-newton1", flush_input=True, output_format="fp16"),
    "rcp-newton-ru": dict(base="rcp-newton2", output_rounding="ru", table_format="fp16"),
}


F32_PRESETS = ["exp-lut64", "exp-lut16", "exp-poly3", "exp-poly5", "rcp-newton1", "rcp-newton2",
               "rsqrt-newton1", "rsqrt-newton2", "silu-lut64", "silu-lut16", "gelu-lut64",
               "sigmoid-lut64", "rcp-exact", *EXTRA]
F32_VARIANTS = [v["name"] for v in VARIANTS if v["name"] in (
    "exp-lut-nofma-bf16", "exp-lut-mid", "exp-poly2-pieces", "exp2-poly4-fp16", "rcp-nofma",
    "rsqrt-nofma-0", "rsqrt-poly", "silu-poly", "gelu-tanh-lut", "sigmoid-mid")]
DEFAULT = {"exp-lut64", "exp-poly3", "rcp-newton1", "rsqrt-newton2", "silu-lut64", "rcp-exact",
           "exp-lut-bf16in-ftz-rtz", "rsqrt-newton-ftz-in",
           "exp-lut-nofma-bf16", "rsqrt-nofma-0", "sigmoid-mid"}


def _unit(name: str) -> FunctionUnit:
    if name in EXTRA:
        return unit_from_dict(dict(EXTRA[name], name=name))
    spec = next((v for v in VARIANTS if v["name"] == name), None)
    return unit_from_dict(spec) if spec else get_function_unit(name)


def test_f32_kernel_is_used() -> None:
    """Every table, polynomial and Newton preset and variant with an fp32 working rounding
    runs the float32 kernel (where the compiled FMA is fused), and so does the correctly
    rounded rcp to fp32 (a float32 division); a bf16 working format, another correctly rounded
    core or rcp to fp16 does not."""
    for name in F32_PRESETS + F32_VARIANTS:
        u = _unit(name)
        exact = u.method.value == "exact"
        assert _f32_core(u) == (exact or fused_fma32_compiles() or not u.fma), name
    assert not _f32_core(get_function_unit("exp-lut64").with_(working_format="bf16"))
    assert not _f32_core(get_function_unit("exp-exact"))
    assert not _f32_core(get_function_unit("exp-mx-bf16"))
    assert not _f32_core(get_function_unit("rcp-exact").with_(output_format="fp16"))


def _inputs(u: FunctionUnit) -> torch.Tensor:
    """Every reduced argument of an exp2 core (k 2^-24, k < 2^24, and shifted to negative,
    subnormal and overflowing results), every float32 in [1, 4) for rcp / rsqrt (both
    exponent parities) with float32 subnormals, random inputs of every function, and
    :func:`adversarial_fp32`."""
    g = torch.Generator().manual_seed(24)
    fn = u.function.value
    parts = [adversarial_fp32(fn), torch.randn(1 << 20, generator=g) * 12]
    if fn in ("exp", "exp2"):
        f = torch.arange(1 << 24, dtype=torch.float64) * 2.0**-24
        parts += [f.float(), (f[::7] - 140).float(), (f[::13] + 127).float(),
                  (f[::11] - 3).float(), (torch.rand(1 << 20, generator=g) * 250 - 160)]
    elif fn in ("rcp", "rsqrt"):
        m = (torch.arange(1 << 24, dtype=torch.int32) + 0x3F800000).view(torch.float32)
        sub = torch.randint(1, 1 << 23, (1 << 16,), generator=g, dtype=torch.int32)
        parts += [m, sub.view(torch.float32), -m[::101],
                  torch.randn(1 << 18, generator=g).exp() ** 20]
    else:
        parts += [torch.rand(1 << 22, generator=g) * 18 - 9]
    return torch.cat(parts)


def _compare(u: FunctionUnit) -> None:
    """Compiled, on :func:`_inputs`; eagerly (``fma32``'s exact emulation) on a slice."""
    assert _f32_core(u), u.name
    x = _inputs(u)
    tabs32, tabs64 = _fast_tables(u, x.device), _fast_tables_cpu(u)
    k64 = _kernel(u, f32=False)
    want, _ = _run(k64, "compile", x, *tabs64)
    got, _ = _run(_kernel(u, f32=True), "compile", x, *tabs32)
    bad = ~_same32(got, want)
    assert not bool(bad.any()), (u.name, int(bad.sum()), x[bad][:4].tolist())
    sl = torch.cat([x[: 1 << 14], x[-(1 << 14):], x[::997]])
    got_e, _ = _kernel(u, f32=True)(sl, *tabs32)
    want_e, _ = _run(k64, "compile", sl, *tabs64)
    assert bool(_same32(got_e, want_e).all()), u.name


@pytest.mark.parametrize("name", [n for n in F32_PRESETS + F32_VARIANTS if n in DEFAULT])
def test_f32_kernel_equals_f64_kernel(name: str) -> None:
    """The float32 kernel gives the float64 kernel's bits (:func:`_inputs`)."""
    _compare(_unit(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in F32_PRESETS + F32_VARIANTS if n not in DEFAULT])
def test_f32_kernel_equals_f64_kernel_all(name: str) -> None:
    """The same for the other presets and variants."""
    _compare(_unit(name))


@pytest.mark.parametrize("name", ["exp-lut64", "exp-poly3"])
def test_f32_kernel_exp2_core_all_reduced_arguments(name: str) -> None:
    """The exp2 form of the unit (the same core and tables): every one of the 2^24 reduced
    arguments reaches the core as itself."""
    _compare(get_function_unit(name).with_(name=name + "-as-exp2", function="exp2"))


@pytest.mark.parametrize("name", list(EXTRA))
def test_extra_units_equal_the_exact_reference(name: str) -> None:
    """The units of :data:`EXTRA` (float32 kernel) equal the exact reference on every 97th
    fp16 and bf16 code, the special values and :func:`adversarial_fp32`."""
    u = _unit(name)
    for dtype in (torch.float16, torch.bfloat16):
        _check(u, torch.cat([_all(dtype, 97), _specials(dtype)]))
    _check(u, adversarial_fp32(u.function.value))
