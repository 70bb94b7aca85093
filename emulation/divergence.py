"""How far the fast fidelity is from bit-exact: :func:`divergence` of two results of one GEMM,
:func:`fast_divergence` / :func:`scaled_fast_divergence` of one GEMM run at both fidelities.

Measured with these functions (benchmarks/bench_gemm.py; 512x512 @ 512x4096, inputs quantized
from N(0,1) / U(0,1); "differ": fraction of outputs not bit-identical; max ulp at the bit-exact
value, large only at outputs near zero after cancellation; normwise: ||fast - exact||_F /
||exact||_F; bias: mean(fast - exact) / mean|exact|)::

    unit           data    differ  max ulp  normwise  bias
    h100-e4m3      N(0,1)  0.887   3.7e5    3.4e-4    -5.7e-7
    h100-bf16      N(0,1)  0.913   1.3e7    2.7e-7     1.4e-10
    deepseek-fp8   N(0,1)  0.953   1.6e5    1.2e-4    -1.3e-7
    h100-fp16      N(0,1)  0.930   9.2e6    4.1e-7     3.5e-10
    h100-e4m3      U(0,1)  1.000   114      5.2e-3     5.2e-3
    h100-bf16      U(0,1)  0.964   13       2.7e-7     2.4e-7
    deepseek-fp8   U(0,1)  1.000   14.5     4.6e-4     4.5e-4

(For comparison, the exact sum rounded once differs from the H100 FP8 unit by 3.4e-4
normwise on the N(0,1) case: that unit's deviation is the zero-mean noise of its
alignment cut, which no deterministic model reproduces; on one-signed data the cut's bias
toward zero, 5e-3 at K=512, is what fast mode misses.) With a scaled GEMM
(``scaled_matmul``) the figures are alike: MXFP8 on h100-e4m3 0.897 / 3.6e-4, 1x128 /
128x128 FP8 on deepseek-fp8 0.995 / 1.2e-4 (benchmarks/bench_gemm.py --scaled).
"""

from __future__ import annotations

import torch
from precisim.formats import FloatFormat
from precisim.formats.scaling import ScaledTensor

from .matmul import matmul
from .matrix_unit import MatrixUnit
from .presets import get_unit

__all__ = ["divergence", "fast_divergence", "scaled_fast_divergence"]


def divergence(exact: torch.Tensor, fast: torch.Tensor, unit: MatrixUnit | str
               ) -> dict[str, float]:
    """How far ``fast`` is from ``exact`` (two results of the same GEMM under ``unit``).

    Returns ``n`` (outputs), ``fraction_differ`` (NaN == NaN), ``max_ulp`` (ulps of the output
    format, or of the block result precision when the unit cuts it, at the bit-exact value;
    finite outputs), ``normwise_relative`` (||fast - exact||_F / ||exact||_F over finite
    outputs), ``mean_relative_bias`` (mean(fast - exact) / mean|exact|) and
    ``nonfinite_mismatch`` (count).
    """
    unit = get_unit(unit)
    same = (exact == fast) | (torch.isnan(exact) & torch.isnan(fast))
    fmt = unit.out_format
    fin = torch.isfinite(exact) & torch.isfinite(fast)
    ex64 = exact.to(torch.float64)
    _, ee = torch.frexp(ex64.abs())
    m = fmt.man_bits if isinstance(fmt, FloatFormat) else 0
    emin = fmt.emin if isinstance(fmt, FloatFormat) else 0
    e = torch.maximum(ee.to(torch.int64) - 1, torch.full_like(ee, emin, dtype=torch.int64))
    if unit.block_result_bits is not None and unit.output_format is None:
        m = unit.block_result_bits
    ulp = torch.ldexp(torch.ones_like(ex64), (e - m).to(torch.float64))
    d = (fast.to(torch.float64) - ex64)[fin]
    diff = d.abs() / ulp[fin]
    ref = ex64[fin]
    norm = float(ref.norm())
    return {
        "n": float(exact.numel()),
        "fraction_differ": float((~same).float().mean()) if same.numel() else 0.0,
        "max_ulp": float(diff.max()) if diff.numel() else 0.0,
        "normwise_relative": float(d.norm()) / norm if norm > 0 else float(d.norm()),
        "mean_relative_bias": (float(d.mean()) / float(ref.abs().mean())
                               if d.numel() and float(ref.abs().mean()) > 0 else 0.0),
        "nonfinite_mismatch": float((~same & ~fin).sum()),
    }


def fast_divergence(a: torch.Tensor, b: torch.Tensor, unit: MatrixUnit | str,
                    c: torch.Tensor | None = None) -> dict[str, float]:
    """How far ``fidelity="fast"`` is from bit-exact on these inputs (see :func:`divergence`
    for the keys: fraction of outputs that differ, max ulp, normwise relative difference...).
    """
    unit = get_unit(unit)
    return divergence(matmul(a, b, unit, c, "bit-exact"), matmul(a, b, unit, c, "fast"), unit)


def scaled_fast_divergence(a: ScaledTensor, w: ScaledTensor, unit: MatrixUnit | str
                           ) -> dict[str, float]:
    """How far ``scaled_matmul(..., fidelity="fast")`` is from bit-exact on these operands
    (keys of :func:`divergence`)."""
    from .scaled import scaled_matmul

    unit = get_unit(unit)
    return divergence(scaled_matmul(a, w, unit), scaled_matmul(a, w, unit, fidelity="fast"),
                      unit)
