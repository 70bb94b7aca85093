"""GPU readiness (docs/reproducibility.md, "GPU"): what can be checked without a GPU, and the
CPU == GPU conformance checks of benchmarks/gpu_conformance.py, which run on a CUDA machine and
are skipped elsewhere (with the reason).

Without a GPU: Triton flushes float32 subnormal results to zero (pytorch/pytorch#125557: 2^-127,
the smallest E8M0 scale, becomes 0). The CPU's flush-to-zero mode (``torch.set_flush_denormal``)
does the same to every float32 operation, so quantization run under it shows whether precisim's
kernels materialise subnormal intermediates for normal inputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from precisim.formats import quantize, set_backend
from precisim.formats.scaling import get_scaled_format, quantize_scaled

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_conformance",
                                              ROOT / "benchmarks" / "gpu_conformance.py")
conf = importlib.util.module_from_spec(spec)
sys.modules["gpu_conformance"] = conf
spec.loader.exec_module(conf)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: the GPU conformance checks "
                                "(benchmarks/gpu_conformance.py) did not run")

#: formats whose float32 scale chain produces subnormal intermediates from normal inputs in
#: tiny blocks (NVFP4's E4M3 block scales over the fp32 tensor scale; the fp32 tile scales of
#: 128x128 FP8, amax / 448 below 2^-126): flushed, they change the result. Known and
#: documented (docs/reproducibility.md); strict xfails keep this list exact
FTZ_SENSITIVE = {"nvfp4", "fp8_128x128"}


def _ftz(fn):
    torch.set_flush_denormal(True)
    try:
        return fn()
    finally:
        torch.set_flush_denormal(False)


@pytest.fixture(params=["eager", pytest.param("compile", marks=pytest.mark.slow)])
def backend(request):
    set_backend(request.param)
    yield request.param
    set_backend("eager")


def _scaled_names() -> list:
    from precisim.formats.scaling import SCALED_FORMATS

    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="known: subnormal "
                                                    "intermediates in its scale chain"))
            if n in FTZ_SENSITIVE else n for n in SCALED_FORMATS]


@pytest.mark.parametrize("name", _scaled_names())
def test_smallest_scales_survive_flush_to_zero(name, backend) -> None:
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    torch.set_flush_denormal(False)
    fmt = get_scaled_format(name)
    for x in (conf._blocks(), conf._blocks(lo=-126, hi=-110)):  # wide, and only tiny blocks
        ref = quantize_scaled(x, fmt, return_parts=True)
        got = _ftz(lambda x=x: quantize_scaled(x, fmt, return_parts=True))
        assert conf.same(ref.dequantized, got.dequantized)
        assert conf.same(ref.codes, got.codes) and conf.same(ref.scales, got.scales)


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2", "bf16", "fp16",
                                 "float4_e2m1fn", "float6_e3m2fn"])
def test_formats_survive_flush_to_zero_on_normal_inputs(fmt) -> None:
    x = conf._blocks().flatten()
    ref = quantize(x, fmt)
    assert conf.same(ref, _ftz(lambda: quantize(x, fmt)))


def test_the_conformance_script_runs_on_the_cpu() -> None:
    """The script's own code (CPU against CPU: everything must agree trivially)."""
    results = list(conf.check_scaled("cpu")) + list(conf.check_model("cpu"))
    assert len(results) > 10 and all(ok for _, ok in results), results
    if not CUDA:  # a clear refusal, not a pass
        assert conf.main(["--device", "cuda"]) == 2


@needs_cuda
@pytest.mark.parametrize("check", list(conf.CHECKS))
def test_cpu_equals_gpu(check) -> None:
    bad = [what for what, ok in conf.CHECKS[check]("cuda") if not ok]
    assert not bad, bad
