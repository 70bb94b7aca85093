"""Perturbed summation orders: the same fp32 arithmetic, added up in another order.

Within ``with perturbed_order(seed):`` every fp32 matmul of a forward (``nn.functional.linear``,
``matmul``/``@``, ``bmm``, ``mm``) contracts its operands with the reduction axis permuted, and
``scaled_dot_product_attention`` runs with its head dimension and its keys (with the values and
the mask) permuted. The results are the same sums in another order: what another BLAS library,
CPU or thread count could have produced. The permutation of each call is drawn from ``(seed,
call number)``, so a perturbed run is itself reproducible. Matrix-unit GEMMs are not touched
(their order is the unit's). :mod:`precisim.eval.noise` measures how far metrics move under
such perturbations: the numerical noise of fp32 arithmetic, against which a format's effect is
to be judged (docs/reproducibility.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["perturbed_order"]

_F = torch.nn.functional
_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.mm,
            torch.Tensor.bmm, torch.Tensor.mm}


class _Perturb(TorchFunctionMode):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.calls = 0

    def _perm(self, n: int, device: torch.device) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        return torch.randperm(n, generator=g).to(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is _F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.is_floating_point() and x.shape[-1] > 1:
                p = self._perm(x.shape[-1], x.device)
                return func(x.index_select(-1, p), w.index_select(-1, p), b)
        elif func in _MATMULS:
            a, b = args[0], args[1]
            if a.is_floating_point() and a.dim() >= 2 and b.dim() >= 2 and a.shape[-1] > 1:
                p = self._perm(a.shape[-1], a.device)
                return func(a.index_select(-1, p), b.index_select(-2, p))
        elif func is _F.scaled_dot_product_attention:
            return self._sdpa(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _sdpa(self, func: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, **kw: Any) -> torch.Tensor:
        if scale is None:
            scale = q.shape[-1] ** -0.5
        nq, nk = q.shape[-2], k.shape[-2]
        if is_causal:  # the causal mask, explicitly (its columns are permuted below)
            attn_mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        d = self._perm(q.shape[-1], q.device)
        keys = self._perm(nk, q.device)
        q, k = q.index_select(-1, d), k.index_select(-1, d).index_select(-2, keys)
        v = v.index_select(-2, keys)
        if attn_mask is not None:
            attn_mask = attn_mask.expand(*attn_mask.shape[:-1], nk).index_select(-1, keys)
        return func(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=False,
                    scale=scale, **kw)


@contextmanager
def perturbed_order(seed: int) -> Iterator[None]:
    """Run the block's fp32 matmuls and attention with permuted reduction orders (see the
    module docstring); ``seed`` (an int) chooses the permutations."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} is not valid: accepted an integer")
    with _Perturb(seed):
        yield
