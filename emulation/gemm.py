"""One emulated GEMM ``y = a @ b_t^T`` under a :class:`~precisim.emulation.recipe.GemmSpec`.

This is the arithmetic every patched op (linear layers, the attention matmuls) runs:

1. each operand is quantized to its role's format (:class:`TensorSpec`; block-scaled formats
   with their blocks along K, the reduction axis: docs/arithmetic.md section 2), from a float32
   view of the model's values (bf16 / fp16 models are widened exactly first);
2. the products are summed by the spec's matrix unit (docs/arithmetic.md section 4) via
   :func:`precisim.emulation.matmul` / :func:`precisim.emulation.scaled_matmul`, or, when the
   spec has no unit, by an fp32 ``torch.matmul`` of the dequantized operands ("fake quant":
   exact products, fp32 accumulation in the library's order);
3. bias (linear layers) is added in fp32, the output is quantized to the ``output`` role's
   format if any, and returned in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from precisim.formats import FloatFormat, IntFormat, Overflow, Rounding, quantize
from precisim.formats.scaling import ScaledFormat, ScaledTensor, quantize_scaled

from .precision import ieee_fp32
from .recipe import GemmSpec, TensorSpec
from .telemetry import Telemetry, count_events

__all__ = ["Operand", "gemm", "quantize_operand", "resolved_format"]


@lru_cache(maxsize=512)
def resolved_format(spec: TensorSpec, axis: int) -> FloatFormat | IntFormat | ScaledFormat:
    """``spec.resolve(axis)``, cached (specs are frozen): the format an operand is quantized
    to, with its blocks along ``axis``."""
    return spec.resolve(axis)


@dataclass
class Operand:
    """A quantized operand: its dequantized float32 values and, for block-scaled formats, the
    codes and scales (what a block-scaled matrix unit consumes)."""

    values: torch.Tensor
    parts: ScaledTensor | None = None


def quantize_operand(x: torch.Tensor, spec: TensorSpec | None, *, axis: int = -1,
                     need_parts: bool = False, telemetry: Telemetry | None = None,
                     where: tuple[str, str] = ("", ""),
                     rand: torch.Tensor | None = None) -> Operand:
    """Quantize ``x`` (any float dtype) to ``spec`` with blocks along ``axis``; float32 result.

    With ``telemetry`` the events of :mod:`precisim.emulation.telemetry` are counted under
    ``where = (module name, role)``. ``rand``: explicit random bits for a stochastic-rounding
    spec (int32, x's shape; replayable gradient SR, :mod:`precisim.emulation.training.sr`),
    used instead of the spec's seed.
    """
    xf = x.float()
    if spec is None:
        return Operand(xf)
    fmt = resolved_format(spec, axis)
    rounding = Rounding.parse(spec.rounding)
    if isinstance(fmt, ScaledFormat):
        # the events are counted inside the quantization kernel (one pass over x)
        events: dict[str, torch.Tensor] | None = {} if telemetry is not None else None
        out = quantize_scaled(xf, fmt, rounding=rounding, flush_input=spec.flush_subnormals,
                              return_parts=need_parts, sr_bits=spec.sr_bits,
                              seed=None if rand is not None else spec.seed, rand=rand,
                              events=events)
        if telemetry is not None and events is not None:
            telemetry.add(*where, {"numel": torch.tensor(x.numel(), dtype=torch.int64),
                                   **events})
        if isinstance(out, ScaledTensor):
            return Operand(out.dequantized, out)
        return Operand(out)
    q = quantize(xf, fmt, rounding, Overflow.parse(spec.overflow),
                 flush_input=spec.flush_subnormals, flush_output=spec.flush_subnormals,
                 sr_bits=spec.sr_bits, seed=None if rand is not None else spec.seed,
                 rand=rand)
    if telemetry is not None:
        telemetry.add(*where, count_events(xf, q, fmt))
    return Operand(q)


def _unit_product(a: Operand, b: Operand, spec: GemmSpec) -> torch.Tensor:
    """(..., M, K) x (..., N, K) -> (..., M, N) through the spec's matrix unit."""
    from .matmul import matmul

    if a.parts is not None or b.parts is not None:
        from .scaled import scaled_matmul

        if a.parts is None or b.parts is None:
            raise ValueError("a block-scaled matrix unit needs both operands block-scaled "
                             f"(input: {spec.input}, weight: {spec.weight})")
        return scaled_matmul(a.parts, b.parts, spec.unit, fidelity=spec.fidelity)
    return matmul(a.values, b.values.transpose(-1, -2), spec.unit, fidelity=spec.fidelity)


@ieee_fp32
def gemm(a: Operand | torch.Tensor, b_t: Operand | torch.Tensor, spec: GemmSpec, *,
         bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
         telemetry: Telemetry | None = None, name: str = "") -> torch.Tensor:
    """``a @ b_t^T (+ bias)`` under ``spec``: a is (..., M, K), b_t is (N, K) or (..., N, K)
    (a weight in nn.Linear layout); either may be an already quantized :class:`Operand`
    (then ``out_dtype`` must be given for ``a``)."""
    use_unit = spec.unit is not None
    scaled = use_unit and _scaled(spec)
    if isinstance(a, Operand):
        if out_dtype is None:
            raise ValueError("gemm: give out_dtype when a is an already quantized Operand")
        qa = a
    else:
        qa = quantize_operand(a, spec.input, axis=-1, need_parts=scaled, telemetry=telemetry,
                              where=(name, "input"))
    qb = b_t if isinstance(b_t, Operand) else quantize_operand(
        b_t, spec.weight, axis=-1, need_parts=scaled, telemetry=telemetry,
        where=(name, "weight"))
    if use_unit:
        y = _unit_product(qa, qb, spec)
        if bias is not None:
            y = y + bias.float()
    elif qb.values.dim() == 2:  # bias fused as nn.Linear does (addmm)
        y = torch.nn.functional.linear(qa.values, qb.values,
                                       None if bias is None else bias.float())
    else:
        y = torch.matmul(qa.values, qb.values.transpose(-1, -2))
        if bias is not None:
            y = y + bias.float()
    if spec.output is not None:
        y = quantize_operand(y, spec.output, axis=-1, telemetry=telemetry,
                             where=(name, "output")).values
    return y.to(out_dtype or a.dtype)  # (a is a tensor when out_dtype is None)


def _scaled(spec: GemmSpec) -> bool:
    return any(s is not None and isinstance(resolved_format(s, -1), ScaledFormat)
               for s in (spec.input, spec.weight))


def needs_parts(spec: GemmSpec) -> bool:
    """True when the weight must be kept as codes + scales (a block-scaled unit GEMM)."""
    return spec.unit is not None and _scaled(spec)
