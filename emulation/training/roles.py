"""Training roles of a linear layer's GEMMs (docs/training.md section 1).

A linear layer ``y = x W^T`` runs three GEMMs in training, each with its own operand specs
and matrix unit (a :class:`~precisim.emulation.specs.GemmSpec`):

* ``forward``: ``y = x @ W^T``, reduction over K (input features); roles ``input`` = x,
  ``weight`` = W;
* ``dgrad``: ``dx = dy @ W``, reduction over N (output features); roles ``input`` = dy,
  ``weight`` = W^T (so a 1x32-blocked format is re-blocked along N, as hardware must; a 2-D
  ``tile:16x16`` format gives the same blocks, hence the same quantized weight, in both);
* ``wgrad``: ``dW = dy^T @ x``, reduction over M (tokens); roles ``input`` = dy^T,
  ``weight`` = x^T (blocks along the tokens).

Every role must be given, ``None`` (``high`` in YAML) meaning high precision: the gradient
PyTorch itself computes from the unquantized operands. A :class:`TrainingSpec` is the spec
type of the ``train_linear`` op kind (registered by :mod:`precisim.emulation.training`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from precisim.formats.scaling import ScaledFormat

from ..specs import GemmSpec, RecipeError, TensorSpec, check_keys
from .hadamard import HadamardSpec

__all__ = ["GEMMS", "TrainingSpec", "check_blocks"]

GEMMS = ("forward", "dgrad", "wgrad")
_UNSET: Any = object()


def is_high(value: Any) -> bool:
    """True for the spellings of "high precision" a role accepts ('high', 'none')."""
    return isinstance(value, str) and value.lower() in ("high", "none")


def parse_gemm_roles(value: Any, gemms: tuple[str, ...], optional: str, where: str,
                     what: str = "GEMM") -> dict[str, GemmSpec | None]:
    """The GemmSpec of each of ``gemms`` in the recipe mapping ``value`` (every one must be
    given: a format, a mapping of roles, or 'high' / null for high precision); ``optional``:
    the one other key the mapping may hold (parsed by the caller)."""
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: expected a mapping with {', '.join(gemms)} (and "
                          f"optionally {optional}), got {type(value).__name__} {value!r}")
    check_keys(value, (*gemms, optional), where)
    missing = [g for g in gemms if g not in value]
    if missing:
        raise RecipeError(f"{where}: the {missing[0]!r} GEMM has no spec; every {what} "
                          f"({', '.join(gemms)}) must be given: a format, a mapping of "
                          "roles, or 'high' / null for high precision")
    return {g: None if is_high(value[g]) else GemmSpec.parse(value[g], f"{where}.{g}")
            for g in gemms}


@dataclass(frozen=True)
class TrainingSpec:
    """The three GEMMs of a trained linear layer (see the module docstring) and an optional
    random Hadamard transform; every GEMM role must be given (None = high precision)."""

    forward: GemmSpec | None = _UNSET
    dgrad: GemmSpec | None = _UNSET
    wgrad: GemmSpec | None = _UNSET
    hadamard: HadamardSpec | None = None

    def __post_init__(self) -> None:
        for g in GEMMS:
            v = getattr(self, g)
            if v is _UNSET:
                raise RecipeError(f"training spec: the {g!r} GEMM has no spec; every GEMM "
                                  f"({', '.join(GEMMS)}) must be given: a format, a mapping "
                                  "of roles, or None / 'high' for high precision")
            if v is not None and not isinstance(v, GemmSpec):
                raise RecipeError(f"training spec: {g}={v!r} is not a GemmSpec or None")
        if self.hadamard is not None and not isinstance(self.hadamard, HadamardSpec):
            raise RecipeError(f"training spec: hadamard={self.hadamard!r} is not a "
                              "HadamardSpec or None")

    def gemm(self, which: str) -> GemmSpec | None:
        return getattr(self, which)

    @property
    def is_identity(self) -> bool:
        return self.hadamard is None and all(
            getattr(self, g) is None or getattr(self, g).is_identity for g in GEMMS)

    @classmethod
    def parse(cls, value: Any, where: str = "training") -> TrainingSpec | None:
        if value is None or isinstance(value, TrainingSpec):
            return value
        kw = parse_gemm_roles(value, GEMMS, "hadamard", where)
        h = value.get("hadamard")
        if h is not None:
            if not isinstance(h, Mapping):
                raise RecipeError(f"{where}.hadamard: expected a mapping (size, gemms, seed)")
            check_keys(h, ("size", "gemms", "seed"), f"{where}.hadamard")
            try:
                kw["hadamard"] = HadamardSpec(**dict(h))
            except (TypeError, ValueError) as e:
                raise RecipeError(f"{where}.{e}") from None
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {g: ("high" if getattr(self, g) is None
                                 else getattr(self, g).to_dict()) for g in GEMMS}
        if self.hadamard is not None:
            h = self.hadamard
            d["hadamard"] = {"size": h.size, "gemms": list(h.gemms), "seed": h.seed}
        return d

    def describe(self) -> str:
        parts = [f"{g}[{'high' if getattr(self, g) is None else getattr(self, g).describe()}]"
                 for g in GEMMS]
        if self.hadamard is not None:
            parts.append(f"rht{self.hadamard.size}({','.join(self.hadamard.gemms)})")
        return " ".join(parts)


def check_blocks(spec: TensorSpec | None, shape: tuple[int, ...], where: str) -> None:
    """Raise :class:`RecipeError` when a block-scaled ``spec``'s blocks (along the GEMM's
    reduction axis, the last; or 2-D tiles) do not divide ``shape`` (an operand as the GEMM
    sees it, e.g. the transposed weight W^T for dgrad); names the role, axis and sizes."""
    if spec is None:
        return
    fmt = spec.resolve(-1)
    if not isinstance(fmt, ScaledFormat) or fmt.granularity.keep_axis is not None:
        return
    for axis, size in fmt.granularity.blocks:
        if size is None:
            continue
        d = shape[axis]
        if d % size:
            raise RecipeError(
                f"{where}: format {fmt.name} has blocks of {size} along axis {axis} of the "
                f"operand of shape {tuple(shape)}, but that axis has {d} elements, not a "
                f"multiple of {size}; accepted: a layer whose dimensions are multiples of the "
                "block, or a smaller block (or high precision for this layer via a rule)")
