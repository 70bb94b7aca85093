"""precisim.emulation: matrix units (tensor-core datapaths) emulated bit for bit.

    from precisim.emulation import get_unit, matmul
    d = matmul(a, b, "h100-e4m3")            # what an H100 FP8 tensor core returns
    d = matmul(a, b, "deepseek-fp8")         # with promotion to fp32 every 128 products

See ARITHMETIC.md section 4 and :mod:`precisim.emulation.matrix_unit` for the model.
"""

from .matmul import fast_divergence, matmul
from .matrix_unit import (
    Alignment,
    CMode,
    Drop,
    MatrixUnit,
    chunked,
    kulisch,
    per_add_rounding,
    sequential_fma,
)
from .presets import available_units, get_unit
from .reference import dot, exact_dot

__all__ = [
    "Alignment", "CMode", "Drop", "MatrixUnit", "available_units", "chunked", "dot",
    "exact_dot", "fast_divergence", "get_unit", "kulisch", "matmul", "per_add_rounding",
    "sequential_fma",
]
