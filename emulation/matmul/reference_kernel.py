"""The exact reference as a kernel (``reference``): every output by
:func:`precisim.emulation.reference.dot` / ``scaled_dot`` in Python fractions.

Very slow (one Python dot product per output): it is never chosen while a faster kernel
supports the call, but any call can be sent to it (``matmul(..., kernel="reference")``), so
every kernel can be checked against it on the same prepared operands.
"""

from __future__ import annotations

import torch

from .call import GemmCall
from .registry import Kernel, register_kernel

__all__ = ["REFERENCE_FIELDS"]

#: every MatrixUnit field, written out (tests check that this is all of MatrixUnit's fields:
#: the exact reference is the specification and must model a new field first)
REFERENCE_FIELDS = frozenset({
    "a_format", "b_format", "block_size", "product_format", "product_rounding", "c_mode",
    "alignment", "alignment_bits", "drop", "alignment_floor", "acc_format", "acc_rounding",
    "acc_overflow", "acc_sr_bits", "block_result_bits", "flush_input_subnormals",
    "flush_output_subnormals", "output_format", "output_rounding", "output_overflow",
    "promotion_interval", "promotion_format", "promotion_rounding"})


def _run(call: GemmCall) -> torch.Tensor:
    from .int_chain import fallback

    Bt, M, _, N = call.shape
    out = torch.zeros((Bt, M, N), dtype=torch.float32, device=call.a.device)
    return fallback(call, out, torch.ones_like(out, dtype=torch.bool))


REFERENCE = register_kernel(Kernel(
    "reference", "bit-exact", REFERENCE_FIELDS, lambda call: None, _run, priority=90,
    description="the exact reference, one output at a time in Python fractions (slow)"))
