"""precisim.formats: bit-exact number formats, rounding, block scaling, encoding and packing.

Public API::

    from precisim.formats import get_format, quantize, encode, decode
    quantize(x, "e4m3")                      # fake-quantize, same dtype as x
    quantize(x, "e2m1", rounding="sr", sr_bits=8, seed=0)
"""

from .catalog import catalog, get_format, p3109, p3109_family
from .descriptor import FloatFormat, FormatError, Inf, IntFormat, Nan
from .kernels import get_backend, set_backend
from .packing import pack, packed_size, unpack
from .quantize import decode, encode, quantize
from .rounding import Overflow, Rounding

__all__ = [
    "FloatFormat", "FormatError", "Inf", "IntFormat", "Nan", "Overflow", "Rounding",
    "catalog", "decode", "encode", "get_backend", "get_format", "p3109", "p3109_family",
    "pack", "packed_size", "quantize", "set_backend", "unpack",
]
