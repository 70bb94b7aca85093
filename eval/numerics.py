"""The numeric environment of an evaluation, and reproducible mode (docs/reproducibility.md).

The fp32 parts of a model's forward - the BLAS matmuls, ATen's vectorised reductions (softmax
and norm sums) and transcendental functions (exp, silu, rsqrt) - are computed by code that the
libraries pick by the CPU's vector capability (SSE, AVX2, AVX-512) and, for BLAS, by the thread
count. Their last bits differ between machines, and a quantization decision downstream of a
last-bit difference can flip: measured on SmolLM2-135M, metrics of the same spec sheet moved
by up to 15% between two x86 machines.

**Reproducible mode** pins those choices with the libraries' own mechanisms, before they load:
ATen's CPU capability (``ATEN_CPU_CAPABILITY=avx2``), Intel MKL's conditional numerical
reproducibility in strict mode (``MKL_CBWR=AVX2,STRICT``: the AVX2 code path on every CPU that
has AVX2, and results independent of the thread count) and oneDNN's ISA
(``ONEDNN_MAX_CPU_ISA=AVX2``), and the target of the C++ code torch.compile generates for
precisim's own kernels (``TORCHINDUCTOR_CPP_MARCH=x86-64-v3``: inductor writes AVX2 vector code
once ATen is pinned to AVX2, and by default compiles it with ``-march=native``; GCC 12.2 on an
AVX-512 CPU was measured to miscompile that code, see docs/reproducibility.md section 9). Every
x86-64 CPU since 2013 (Haswell, Zen) has AVX2; the same
torch and MKL builds then give the same bits on any of them, at any thread count (measured:
tests/test_numerics.py; precisim's own compiled kernels are exact integer arithmetic or
elementwise float operations, which do not depend on the vector width). The cost on an AVX-512
machine is measured in benchmarks/bench_distributed.py.

:func:`environment` records what a result depends on (library versions, the pins, the
capability in use, threads, CPU); spec sheets carry it, and ``precisim eval --spec`` compares
exactly only when both environments are pinned alike (:func:`comparable`).
"""

from __future__ import annotations

import os
import platform
import re
import sys
from functools import cache
from typing import Any

__all__ = ["PINS", "can_pin", "comparable", "environment", "pinned", "pinned_env",
           "ReproducibilityError"]

#: the environment variables of reproducible mode (set before torch is imported)
PINS: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3",
}
#: the name of reproducible mode's compile cache (a directory of its own, see pinned_env)
PINNED_CACHE = "precisim_x86-64-v3"

#: the pins as they were when this module was first imported (torch reads them once, at load)
_AT_START = {k: os.environ.get(k) for k in PINS}


class ReproducibilityError(RuntimeError):
    """Reproducible mode is asked for but cannot be had (the message says why and what to do)."""


#: the /proc/cpuinfo flags of the x86-64-v3 level beyond x86-64-v2 (``abm``: LZCNT), which the
#: pinned compiled kernels are built for (``TORCHINDUCTOR_CPP_MARCH``)
X86_64_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"})


@cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def can_pin() -> str | None:
    """Why reproducible mode is not available on this machine (None: it is)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return (f"reproducible mode pins x86-64 AVX2 code paths; this machine is "
                f"{platform.machine()}")
    flags = _cpu_flags()
    missing = sorted(X86_64_V3 - flags) if flags else []
    if missing:
        return (f"reproducible mode needs an x86-64-v3 CPU (AVX2, FMA, BMI1/2, F16C, LZCNT, "
                f"MOVBE); this one lacks {', '.join(missing)}")
    import torch

    if not torch.backends.mkl.is_available():
        return "this torch build has no Intel MKL, whose strict reproducibility mode is pinned"
    return None


def pinned() -> bool:
    """Whether this process started with the pins of :data:`PINS` and runs at that capability."""
    if any(_AT_START[k] != v for k, v in PINS.items()):
        return False
    import torch

    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def pinned_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the pins of reproducible mode."""
    env = dict(os.environ if base is None else base)
    env.update(PINS)
    # a compile cache of its own, never shared with native runs nor with pinned runs from
    # before the -march pin (whose kernels could be miscompiled: docs/reproducibility.md); a
    # cache directory already set (by the user, or by torch itself in a process that compiled
    # something) gets a subdirectory
    given = env.get("TORCHINDUCTOR_CACHE_DIR")
    if given:
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(given, PINNED_CACHE)
    else:
        import getpass
        import tempfile

        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
            tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{PINNED_CACHE}")
    return env


def _mkl_version() -> str | None:
    import torch

    m = re.search(r"Math Kernel Library Version ([^\s]+)", torch.__config__.show())
    return m.group(1) if m else None


def environment() -> dict[str, Any]:
    """What an evaluation's bits depend on: whether it ran pinned, the pins in force, the
    library versions and builds, the CPU capability in use, threads, the CPU and platform."""
    import numpy
    import torch

    return {
        "reproducible": pinned(),
        "pins": {k: _AT_START[k] for k in PINS},
        "torch": torch.__version__,
        "mkl": _mkl_version(),
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_flags": sorted(f for f in _cpu_flags()
                            if f in ("avx2", "fma", "avx512f", "avx512bw", "amx_tile")),
        "platform": f"{sys.platform}-{platform.machine()}",
    }


#: the entries of :func:`environment` that must agree for two pinned runs to give the same bits
_SIGNATURE = ("pins", "torch", "mkl", "python", "numpy", "cpu_capability")


def comparable(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str | None:
    """Why two recorded environments need not give bit-identical metrics (None: both ran
    pinned with the same libraries, so they must)."""
    if not a or not b:
        return "a sheet records no numeric environment (written before reproducible mode)"
    if not a.get("reproducible") or not b.get("reproducible"):
        which = " and ".join(n for n, e in (("the original", a), ("the re-run", b))
                             if not e.get("reproducible"))
        return f"{which} did not run in reproducible mode"
    for k in _SIGNATURE:
        if a.get(k) != b.get(k):
            return f"their {k} differ ({a.get(k)!r} vs {b.get(k)!r})"
    return None
