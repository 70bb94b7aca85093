"""precisim.emulation.functions: the arithmetic beyond the GEMM (docs/arithmetic.md section 7).

Elementwise function units (exp, exp2, reciprocal, reciprocal square root, sigmoid-type and
activation functions), reductions in a format and an order, softmax, normalisation (RMSNorm,
LayerNorm) and activation units built from them. Each is a frozen description with a slow
exact reference and a fast torch path, bit-identical to each other.
"""

from .core import Fn
from .datapath import Activation, Cast, MaxOf, Norm, NormKind, Softmax, Via
from .presets import (
    ACTIVATION_UNITS,
    FUNCTION_UNITS,
    NORMS,
    SOFTMAXES,
    available_function_units,
    get_function_unit,
)
from .reduction import Order, ReduceOp, Reduction
from .units import FunctionUnit, Interp, Method, unit_from_dict

__all__ = [
    "ACTIVATION_UNITS", "Activation", "Cast", "MaxOf", "NORMS", "Norm", "NormKind", "Order",
    "ReduceOp", "Reduction", "SOFTMAXES", "Softmax", "Via",
    "FUNCTION_UNITS", "Fn", "FunctionUnit", "Interp", "Method", "available_function_units",
    "get_function_unit", "unit_from_dict",
]
