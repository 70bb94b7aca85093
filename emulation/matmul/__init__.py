"""GEMMs under a :class:`~precisim.emulation.MatrixUnit`: ``matmul(a, b, unit, c=None)``.

Two fidelities, both public:

* ``"bit-exact"`` returns exactly what the unit produces (docs/arithmetic.md section 4; tested
  bit for bit against :mod:`precisim.emulation.reference` and all 60000 real-GPU recordings);
* ``"fast"`` models the unit's systematic rounding on top of float matmuls
  (:mod:`.fast`; its measured distance to bit-exact is in
  :mod:`precisim.emulation.divergence`), except for units with one product per block
  (sequential FMA, rounding after every add): the model would take one matmul per product,
  so their fast fidelity is the bit-exact ``exact-blocks`` kernel (kernel
  ``exact-blocks-fast``; fast results may be exact).

Each fidelity has several **kernels** (:mod:`.registry`), tried fastest first; each declares
the unit fields it models and which calls it supports, and the first that supports a call
computes it:

========================  ========  ==========================================================
kernel                    fidelity  what it computes (module)
========================  ========  ==========================================================
``fused-chain``           bit-exact the float chain compiled: NVIDIA-style units
                                    (:mod:`.fused`)
``exact-blocks``          bit-exact exact block sums (Kulisch, sequential FMA), compiled
                                    (:mod:`.exact_blocks`)
``float-chain``           bit-exact eager float block chain: NVIDIA-style units with float
                                    accumulators (:mod:`.float_chain`)
``int-chain``             bit-exact int64 block chain: every unit (:mod:`.int_chain`)
``reference``             bit-exact the exact reference, one output at a time (only on request)
``exact-blocks-fast``     fast      units with one product per block (sequential FMA):
                                    ``exact-blocks`` itself, so bit-exact
``fast-float``            fast      one matmul per promotion chunk + a rounding model
``blockwise-fast``        fast      float64 block sums + the unit's exact roundings (every
                                    unit)
========================  ========  ==========================================================

:func:`explain` says which kernel would compute a call and why each faster one was refused;
``matmul(..., kernel=...)`` or the scoped :func:`use_kernels` restricts the choice (an
unknown name, or kernels that cannot compute the call, raise).

Common to every kernel (:mod:`.call`): inputs that are not values of the unit's formats raise
``ValueError`` (inf in a format without inf included; NaN is always accepted and propagates).
Special values follow docs/arithmetic.md section 5: any NaN among the products (including
0 * inf) or in c, or +inf with -inf, gives NaN; otherwise an infinite product or c gives that
infinity; a block that overflows gives inf (``acc_overflow="inf"``) and the output stays inf.
A K that is not a multiple of the block size is padded with zero products, which take no
part in the alignment: the result is that of the unpadded model. Works on any device torch
supports, without autograd (the results are not differentiable).

Block-scaled GEMMs (:func:`precisim.emulation.scaled_matmul`) pass their scales to the same
kernels (:class:`.call.Scales`): per block-FMA term scales s = s_a*s_b (the alignment
exponent of a term is e_a + e_b + floor(log2 s) and the term is s*a*b, exact), at promotion
(``acc = RNE_fp32(acc + s*partial)``), or once on the final accumulator (whole-K scales);
see :mod:`precisim.emulation.scaled` for the semantics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..matrix_unit import MatrixUnit
from ..precision import ieee_fp32
from ..presets import get_unit
from . import (  # noqa: F401  (the kernels register themselves)
    exact_blocks,
    fast,
    float_chain,
    fused,
    int_chain,
    reference_kernel,
)
from .call import FIDELITIES, GemmCall, Scales, prepare
from .registry import (
    KERNELS,
    Explanation,
    Kernel,
    UnknownKernelError,
    explain_call,
    register_kernel,
    select,
    use_kernels,
)

__all__ = ["FIDELITIES", "KERNELS", "Explanation", "GemmCall", "Kernel", "Scales",
           "UnknownKernelError", "available_kernels", "explain", "matmul", "register_kernel",
           "run_gemm", "use_kernels"]

KernelChoice = str | Sequence[str] | None


def available_kernels(fidelity: str | None = None) -> list[str]:
    """Kernel names, fastest first (only those of ``fidelity`` if given)."""
    ks = sorted((k for _, k in KERNELS.items()), key=lambda k: k.priority)
    return [k.name for k in ks if fidelity is None or k.fidelity == fidelity]


def matmul(a: torch.Tensor, b: torch.Tensor, unit: MatrixUnit | str,
           c: torch.Tensor | float | None = None, fidelity: str = "bit-exact", *,
           seed: int | None = None, max_chunk_elements: int = 1 << 21,
           kernel: KernelChoice = None) -> torch.Tensor:
    """``D = A @ B + C`` exactly as ``unit`` computes it (float32 result).

    Args:
        a: (..., M, K) float32 tensor holding values of ``unit.a_format``.
        b: (..., K, N) float32 tensor holding values of ``unit.b_format``; leading dimensions
            broadcast.
        unit: a :class:`MatrixUnit` or a preset name (:func:`get_unit`).
        c: the addend, broadcastable to (..., M, N), holding values of the accumulator format
            (of ``promotion_format`` when the unit promotes); default +0.
        fidelity: ``"bit-exact"`` or ``"fast"`` (see the module docstring).
        seed: random bits for ``acc_rounding="sr"`` (one draw per output and block, int64
            tensor of shape (B, M, N, blocks) from ``torch.Generator(seed)``).
        max_chunk_elements: bound on M*N*k elements processed at once (memory).
        kernel: a kernel name or names (fastest first) to restrict the choice to; default:
            every kernel of the fidelity (or the scope of :func:`use_kernels`).
    """
    return run_gemm(a, b, get_unit(unit), c, fidelity, seed=seed,
                    max_chunk_elements=max_chunk_elements, kernel=kernel)


@ieee_fp32
def run_gemm(a, b, unit: MatrixUnit, c, fidelity: str, *, seed: int | None = None,
             max_chunk_elements: int = 1 << 21, scales: Scales | None = None,
             elem_formats: tuple | None = None, check: bool = True,
             kernel: KernelChoice = None) -> torch.Tensor:
    """:func:`matmul` with the scales of a block-scaled GEMM (:mod:`precisim.emulation.
    scaled`): prepare the call, let the registry pick the kernel, put special values back."""
    with torch.no_grad():
        call = prepare(a, b, unit, c, fidelity, seed=seed,
                       max_chunk_elements=max_chunk_elements, scales=scales,
                       elem_formats=elem_formats, check=check)
        if call.a.numel() == 0 or call.b.numel() == 0:  # no outputs (B, M or N is 0)
            return torch.zeros(call.out_shape, dtype=torch.float32, device=call.a.device)
        k = select(call, kernel)
        return call.finish(k.run(call))


def explain(a: torch.Tensor, b: torch.Tensor, unit: MatrixUnit | str,
            c: torch.Tensor | float | None = None, fidelity: str = "bit-exact", *,
            kernel: KernelChoice = None) -> Explanation:
    """Which kernel :func:`matmul` would use for these arguments, and why each faster kernel
    was refused (``print(explain(a, b, "h100-bf16"))``)."""
    with torch.no_grad():
        call = prepare(a, b, get_unit(unit), c, fidelity)
        return explain_call(call, kernel)
