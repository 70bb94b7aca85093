"""Optimizer-side numerics (docs/training.md section 7).

* fp32 master weights (the default): the optimizer updates fp32 parameters, nothing else;
* ``bf16-sr``: the weights are bf16 (no fp32 master copy): after each optimizer step every
  parameter is rounded to bf16 with stochastic rounding, its bits from the counter hash of
  :mod:`.sr` keyed by (seed, step, parameter name), so the run replays (AdamW's states in a
  low-precision format: :mod:`.lowp_optim`);
* ``bf16-rne``: the same with round-to-nearest-even (updates smaller than half an ulp are
  lost: the classic stagnation SR avoids);
* static loss scaling (fp16 gradients): the loss is multiplied by ``loss_scale`` before the
  backward and the gradients divided by it before the step (dynamic: :mod:`.lowp_optim`).
"""

from __future__ import annotations

import torch
from precisim.formats import quantize

from .sr import element_bits, key_of

__all__ = ["MASTER_MODES", "round_weights"]

MASTER_MODES = ("fp32", "bf16-sr", "bf16-rne")


def round_weights(model: torch.nn.Module, mode: str, seed: int, step: int) -> None:
    """Round every parameter of ``model`` in place to the weight format of ``mode``."""
    if mode not in MASTER_MODES:
        raise ValueError(f"master weights {mode!r} are not valid; accepted: "
                         f"{', '.join(MASTER_MODES)}")
    if mode == "fp32":
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype != torch.float32:
                raise ValueError(f"master weights {mode!r}: parameter {name!r} is {p.dtype}; "
                                 "the model must hold float32 parameters")
            if mode == "bf16-sr":
                r = element_bits(tuple(p.shape) or (1,), 16, key_of(seed, step, name, "update"),
                                 device=p.device)
                q = quantize(p.reshape(r.shape), "bf16", "sr", sr_bits=16, rand=r)
            else:
                q = quantize(p, "bf16")
            p.copy_(q.reshape(p.shape))
