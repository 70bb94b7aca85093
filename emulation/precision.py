"""precisim's own fp32 matmuls run in IEEE fp32, whatever the process asks of others.

PyTorch lets a program trade fp32 matmul accuracy for speed process-wide:
``torch.set_float32_matmul_precision("high")`` lets CUDA use TF32 (10-bit significands) and
``"medium"`` lets CPU matmuls (oneDNN, on CPUs with AVX-512 BF16 or AMX) and CUDA use bf16
(measured on this project's CPU: a 64x64 fp32 product changes in its third digit under
``"medium"``). The same switch exists per backend (``torch.backends.cuda.matmul.fp32_precision``,
``torch.backends.mkldnn.matmul.fp32_precision``). precisim's fp32 matmuls are part of the
arithmetic being emulated: the fp32 accumulation of dequantized operands ("fake quant",
docs/arithmetic.md), the attention products, and the exact sums of the fast matrix-unit
kernels. :func:`ieee_matmuls` pins them to IEEE fp32 for the duration of a call and restores
the process's setting afterwards; the model's own (unemulated) matmuls keep the user's
setting. Tested in tests/test_numerics.py (docs/reproducibility.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

__all__ = ["ieee_matmuls", "ieee_fp32"]

#: the backends whose fp32 matmul precision PyTorch lets a program lower
_BACKENDS = ("cuda", "mkldnn")

F = TypeVar("F", bound=Callable[..., Any])


def _switches() -> list[Any]:
    out = []
    for name in _BACKENDS:
        mm = getattr(getattr(torch.backends, name, None), "matmul", None)
        if mm is not None and hasattr(mm, "fp32_precision"):
            out.append(mm)
    return out


_SWITCHES = _switches()


@contextmanager
def ieee_matmuls() -> Iterator[None]:
    """Within the block, fp32 matmuls on every backend run in IEEE fp32 (no TF32, no bf16);
    the previous per-backend settings are restored on exit, exceptions included."""
    saved = []
    for mm in _SWITCHES:
        cur = mm.fp32_precision
        if cur not in ("ieee", "none"):
            saved.append((mm, cur))
            mm.fp32_precision = "ieee"
    try:
        yield
    finally:
        for mm, cur in reversed(saved):
            mm.fp32_precision = cur


def ieee_fp32(fn: F) -> F:
    """Decorator: run ``fn`` under :func:`ieee_matmuls`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with ieee_matmuls():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
