"""Random Hadamard transforms (RHT) of GEMM inputs along the reduction axis
(docs/training.md section 4).

For a GEMM ``a @ b^T`` reducing over K, the transform multiplies each run of ``size``
consecutive elements along K of both operands by the same orthogonal matrix
``T = diag(s) H / sqrt(size)`` (H the Sylvester Hadamard matrix, s random signs):
``(a T)(b T)^T = a b^T`` exactly in real arithmetic, while outliers are spread over the block
before quantization. The NVFP4 pretraining recipe (arXiv 2509.25149) applies
16x16 transforms to the inputs of the weight-gradient GEMM. The signs are drawn from the
counter hash of :mod:`.sr` (seed, step, module), so they replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .sr import element_bits, key_of

__all__ = ["HadamardSpec", "hadamard_matrix", "random_hadamard", "rht"]


@dataclass(frozen=True)
class HadamardSpec:
    """A random Hadamard transform of ``size`` (a power of two) on the inputs of the GEMMs
    named in ``gemms`` (``wgrad``, ``dgrad``), with signs from ``seed`` (and the step)."""

    size: int = 16
    gemms: tuple[str, ...] = ("wgrad",)
    seed: int = 0

    def __post_init__(self) -> None:
        s = self.size
        if isinstance(s, bool) or not isinstance(s, int) or s < 2 or s & (s - 1):
            raise ValueError(f"hadamard: size={s!r} is not valid: accepted a power of two >= 2")
        object.__setattr__(self, "gemms", tuple(self.gemms))
        bad = [g for g in self.gemms if g not in ("wgrad", "dgrad")]
        if bad:
            raise ValueError(f"hadamard: gemms {bad!r} not valid: accepted 'wgrad', 'dgrad'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"hadamard: seed={self.seed!r} is not valid: accepted an "
                             "integer >= 0")


@lru_cache(maxsize=16)
def hadamard_matrix(size: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of ``size`` (entries +-1, float64)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_hadamard(size: int, seed: int, step: int = 0, module: str = "") -> torch.Tensor:
    """``diag(s) H / sqrt(size)`` (float32, orthogonal), signs s from (seed, step, module)."""
    signs = element_bits((size,), 1, key_of(seed, step, module, "rht")).double() * 2 - 1
    return (signs[:, None] * hadamard_matrix(size) / size ** 0.5).float()


def rht(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x`` with each run of ``t.shape[0]`` elements along its last axis multiplied by ``t``;
    the last axis must be a multiple of the size (ValueError naming both)."""
    n = t.shape[0]
    k = x.shape[-1]
    if k % n:
        raise ValueError(f"random Hadamard transform of size {n}: the reduction axis has "
                         f"{k} elements, not a multiple of {n}")
    xb = x.float().reshape(*x.shape[:-1], k // n, n)
    return (xb @ t.to(xb.device)).reshape(x.shape)
