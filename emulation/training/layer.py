"""The ``train_linear`` op kind: linear layers whose forward, dgrad and wgrad GEMMs each follow
a :class:`~.roles.TrainingSpec` (docs/training.md section 1).

Opt-in (planned only where a recipe or rule names ``train_linear``); it outranks ``linear``
and yields to ``lm_head`` (kept in high precision unless the recipe says otherwise), so a
rule ``train_linear: null`` keeps chosen layers (e.g. the last blocks, as the NVFP4
pretraining recipe does) in high precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..opkinds import OP_KINDS, Installer, OpKind, is_linear
from ..patch import EmulatedLinear, PlanEntry
from ..specs import GemmSpec
from .attention import TRAIN_ATTENTION
from .autograd import attach_linear_grad, check_layer, plain_linear
from .roles import TrainingSpec

__all__ = ["TRAIN_LINEAR", "TrainableLinear"]


class TrainableLinear(EmulatedLinear):
    """An :class:`~precisim.emulation.patch.EmulatedLinear` whose backward follows its
    :class:`TrainingSpec` (a high-precision forward runs the layer's plain forward)."""

    def __init__(self, orig: torch.nn.Module, spec: TrainingSpec, handle: Any, name: str):
        super().__init__(orig, spec.forward or GemmSpec(), handle, name)
        self.training_spec = spec

    def extra_repr(self) -> str:
        return f"{self._name}: {self.training_spec.describe()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spec.is_identity:
            return super().forward(x)
        o = self._orig
        with torch.no_grad():
            y = plain_linear(x, o.weight, o.bias, self.transposed)
        return attach_linear_grad(y, x, self)


def install_train_linear(installer: Installer, entries: Sequence[PlanEntry]) -> None:
    """Swap in :class:`TrainableLinear` wrappers (weight-side block checks first)."""
    em = installer.emulation
    for e in entries:
        orig = installer.modules[e.module]
        check_layer(e.module, orig, e.spec, _transposed(orig))
        installer.swap(e.module, TrainableLinear(orig, e.spec, em, e.module))


def _transposed(m: torch.nn.Module) -> bool:
    from ..opkinds import linear_layout

    return linear_layout(m) == "in_out"


TRAIN_LINEAR = OpKind(
    "train_linear", TrainingSpec, lambda n, m, model: is_linear(m), install_train_linear,
    ("input", "weight", "output", "dgrad.input", "dgrad.weight", "wgrad.input",
     "wgrad.weight"), priority=15, default_on=False,
    description="linear layers in training: forward, dgrad and wgrad GEMMs each under its "
    "own spec (docs/training.md)")

if "train_linear" not in OP_KINDS.names():
    OP_KINDS.register("train_linear", TRAIN_LINEAR)
if "train_attention" not in OP_KINDS.names():  # (docs/training.md section 1b)
    OP_KINDS.register("train_attention", TRAIN_ATTENTION)
