"""The catalog of named formats, their ml_dtypes / torch aliases and string parsing.

Accepted spellings (case-insensitive):

* catalog names and aliases: ``float8_e4m3fn`` / ``e4m3`` / ``fp8_e4m3``, ``float8_e5m2``,
  ``float8_e4m3fnuz``, ``float8_e5m2fnuz``, ``float8_e4m3b11fnuz``, ``float8_e4m3``
  (IEEE-style E4M3 with inf, as in ml_dtypes), ``float8_e3m4``, ``float6_e3m2fn``,
  ``float6_e2m3fn``, ``float4_e2m1fn``, ``float8_e8m0fnu`` / ``e8m0``, ``bf16``, ``fp16``,
  ``fp32``, ``tf32``, ``int8``, ``int4``, ``uint8``, ``mxint8`` ...;
* the IEEE P3109 family ``binary{K}p{P}{s|u}{e|f}`` (e.g. ``binary8p4se``: K=8, P=4, signed,
  extended), also written ``p3109_k8p4se``;
* any ``eXmY`` with optional ``bNN`` bias and ``fn`` / ``fnuz`` / ``fnu`` suffix, e.g. ``e5m7``,
  ``e4m3b11fnuz``, ``float8_e3m4``. A bare ``eXmY`` that is not an alias is IEEE-style (inf and
  NaN in the top exponent field, bias 2^(X-1)-1).
* ``torch.dtype`` objects with a float8/bfloat16/float16/float32 meaning, and ml_dtypes types.
"""

from __future__ import annotations

import contextlib
import re

from .descriptor import FloatFormat, FormatError, Inf, IntFormat, Nan
from .registry import Registry, UnknownNameError


class UnknownFormatError(UnknownNameError, FormatError):
    """An unknown format name (a :class:`FormatError` and a ``KeyError``)."""

ElementFormat = FloatFormat | IntFormat

_F = FloatFormat
_BUILTIN: tuple[FloatFormat | IntFormat, ...] = (
    _F("fp32", 8, 23, 127, aliases=("float32", "float", "e8m23", "binary32"),
       description="IEEE 754 binary32"),
    _F("tf32", 8, 10, 127, aliases=("tensorfloat32", "e8m10"),
       description="NVIDIA TensorFloat-32 (fp32 range, 10 mantissa bits)"),
    _F("bf16", 8, 7, 127, aliases=("bfloat16", "e8m7"), description="bfloat16"),
    _F("fp16", 5, 10, 15, aliases=("float16", "half", "e5m10", "binary16"),
       description="IEEE 754 binary16"),
    _F("float8_e4m3fn", 4, 3, 7, nan=Nan.TOP, inf=Inf.NONE,
       aliases=("e4m3", "fp8_e4m3", "e4m3fn", "ocp_e4m3", "fp8"),
       description="OCP FP8 E4M3 (no inf, NaN = S.1111.111)"),
    _F("float8_e5m2", 5, 2, 15, aliases=("e5m2", "fp8_e5m2", "ocp_e5m2"),
       description="OCP FP8 E5M2 (IEEE-style inf/NaN)"),
    _F("float8_e4m3fnuz", 4, 3, 8, nan=Nan.NEG_ZERO, inf=Inf.NONE,
       aliases=("e4m3fnuz", "fp8_e4m3fnuz"), description="AMD MI300 FP8 E4M3 (NaN = 0x80)"),
    _F("float8_e5m2fnuz", 5, 2, 16, nan=Nan.NEG_ZERO, inf=Inf.NONE,
       aliases=("e5m2fnuz", "fp8_e5m2fnuz"), description="AMD MI300 FP8 E5M2 (NaN = 0x80)"),
    _F("float8_e4m3b11fnuz", 4, 3, 11, nan=Nan.NEG_ZERO, inf=Inf.NONE,
       aliases=("e4m3b11fnuz", "e4m3b11"), description="Graphcore-style E4M3, bias 11"),
    _F("float8_e4m3", 4, 3, 7, description="IEEE-style E4M3 with inf/NaN (ml_dtypes)"),
    _F("float8_e3m4", 3, 4, 3, description="IEEE-style E3M4 (ml_dtypes)"),
    _F("float6_e3m2fn", 3, 2, 3, nan=Nan.NONE, inf=Inf.NONE,
       aliases=("e3m2", "fp6_e3m2", "e3m2fn"), description="OCP MX FP6 E3M2 (no inf/NaN)"),
    _F("float6_e2m3fn", 2, 3, 1, nan=Nan.NONE, inf=Inf.NONE,
       aliases=("e2m3", "fp6_e2m3", "e2m3fn"), description="OCP MX FP6 E2M3 (no inf/NaN)"),
    _F("float4_e2m1fn", 2, 1, 1, nan=Nan.NONE, inf=Inf.NONE,
       aliases=("e2m1", "fp4", "fp4_e2m1", "e2m1fn", "float4_e2m1fn_x2"),
       description="OCP MX FP4 E2M1 (no inf/NaN)"),
    _F("float8_e8m0fnu", 8, 0, 127, signed=False, nan=Nan.TOP, inf=Inf.NONE, subnormals=False,
       aliases=("e8m0", "e8m0fnu", "ue8m0", "e8m0_scale"),
       description="OCP MX scale E8M0: powers of two 2^-127..2^127, NaN = 0xFF, no zero"),
    IntFormat("int8", 8, aliases=("i8",), description="two's-complement int8"),
    IntFormat("uint8", 8, signed=False, aliases=("u8",), description="unsigned int8"),
    IntFormat("int4", 4, aliases=("i4",), description="two's-complement int4"),
    IntFormat("uint4", 4, signed=False, aliases=("u4",), description="unsigned int4"),
    IntFormat("int2", 2, aliases=("i2",), description="two's-complement int2"),
    IntFormat("uint2", 2, signed=False, aliases=("u2",), description="unsigned int2"),
    IntFormat("int16", 16, aliases=("i16",), description="two's-complement int16"),
    IntFormat("mxint8", 8, frac_bits=6, aliases=("int8_mx", "mx_int8_element"),
              description="OCP MX INT8 element: two's complement with implicit scale 2^-6"),
)


def p3109(k: int, p: int, signed: bool = True, extended: bool = True) -> FloatFormat:
    """The IEEE P3109 format binaryKpP (interim report v3; gfloat ``format_info_p3109``).

    Signed: bias 2^(K-P-1), single zero 0x00, single NaN 0x80, extended: +inf 0x7F...,
    -inf 0xFF.... Unsigned: bias 2^(K-P), NaN at the all-ones code, extended: +inf below it.
    Subnormals always.
    """
    if not isinstance(k, int) or not 2 <= k <= 16:
        raise FormatError(f"P3109 K={k!r} is not supported: accepted 2..16")
    if not isinstance(p, int) or not 1 <= p <= k - int(signed):
        raise FormatError(f"P3109 P={p!r} is not valid for K={k}: accepted 1..{k - int(signed)}")
    exp_bits = k - p + (0 if signed else 1)
    if exp_bits < 1:
        raise FormatError(f"P3109 K={k}, P={p}: no exponent bits left")
    bias = 2 ** (k - p - 1) if signed else 2 ** (k - p)
    name = f"binary{k}p{p}{'s' if signed else 'u'}{'e' if extended else 'f'}"
    return FloatFormat(
        name,
        exp_bits,
        p - 1,
        bias,
        signed=signed,
        nan=Nan.NEG_ZERO if signed else Nan.TOP,
        inf=Inf.TOP if extended else Inf.NONE,
        aliases=(f"p3109_k{k}p{p}{'s' if signed else 'u'}{'e' if extended else 'f'}",),
        description=f"IEEE P3109 K={k} P={p} {'signed' if signed else 'unsigned'} "
        f"{'extended' if extended else 'finite'}",
    )


def _exmy(e: int, m: int, bias: int | None, suffix: str | None) -> FloatFormat:
    default_bias = 2 ** (e - 1) - 1 if e > 1 else 1
    b = default_bias if bias is None else bias
    name = f"e{e}m{m}" + (f"b{bias}" if bias is not None else "") + (suffix or "")
    if suffix is None:
        if m == 0:
            raise FormatError(
                f"{name}: an IEEE-style format needs a mantissa bit for NaN; use a 'fn' or "
                "'fnu' suffix (e.g. e8m0fnu)"
            )
        return FloatFormat(name, e, m, b)
    if suffix == "fn":
        return FloatFormat(name, e, m, b, nan=Nan.TOP, inf=Inf.NONE)
    if suffix == "fnuz":
        return FloatFormat(name, e, m, b + (1 if bias is None else 0), nan=Nan.NEG_ZERO,
                           inf=Inf.NONE)
    # fnu: unsigned, NaN at the top code; m == 0 gives the E8M0-style power-of-two scale
    return FloatFormat(name, e, m, b, signed=False, nan=Nan.TOP, inf=Inf.NONE,
                       subnormals=m > 0)


def _small_int(text: str | None, what: str, name: str) -> int | None:
    """A parameter of a parametric name as an int, refused with a FormatError when it has more
    digits than any accepted value (Python's int() of a huge digit string is slow, and past
    4300 digits raises a bare ValueError)."""
    if text is None:
        return None
    if len(text) > 6:
        short = name if len(name) <= 40 else name[:37] + "..."
        raise FormatError(f"{short!r}: {what}={text[:12]}{'...' if len(text) > 12 else ''} "
                          f"({len(text)} digits) is far outside the accepted range (an "
                          "eXmY format has 1..8 exponent and 0..23 mantissa bits and a bias "
                          "that keeps its values in float32; P3109 K is 2..16)")
    return int(text)


def _family_exmy(m: re.Match[str]) -> FloatFormat:
    name = m.group(0)
    return _exmy(_small_int(m.group(1), "exponent bits", name),
                 _small_int(m.group(2), "mantissa bits", name),
                 _small_int(m.group(3), "bias", name), m.group(4))


def _family_p3109(m: re.Match[str]) -> FloatFormat:
    name = m.group(0)
    return p3109(_small_int(m.group(1), "K", name), _small_int(m.group(2), "P", name),
                 m.group(3) == "s", m.group(4) == "e")


#: every named element format (docs/naming.md); the P3109 and eXmY families are parsed
FORMATS: Registry[FloatFormat | IntFormat] = Registry(
    "format", error=UnknownFormatError,
    hint="block-scaled formats (mxfp8, nvfp4, ...) are looked up by "
    "precisim.formats.scaling.get_scaled_format")
for _f in _BUILTIN:
    FORMATS.register(_f.name, _f, aliases=_f.aliases)
FORMATS.register_family(r"(?:p3109_k|binary)(\d+)p(\d+)([su])([ef])", _family_p3109,
                        "binary8p3se")
FORMATS.register_family(r"(?:float\d+_|fp\d+_)?e(\d+)m(\d+)(?:b(\d+))?(fnuz|fnu|fn)?",
                        _family_exmy, "e5m7[b15][fn|fnuz|fnu]")


def catalog() -> list[FloatFormat | IntFormat]:
    """Every built-in format (not counting the open families P3109 and eXmY)."""
    return list(_BUILTIN)


def p3109_family(k: int = 8) -> list[FloatFormat]:
    """All P3109 formats with K bits (signed and unsigned, extended and finite)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 16:
        raise FormatError(f"P3109 K={k!r} is not supported: accepted 2..16")
    out = []
    for signed in (True, False):
        for p in range(1, k - int(signed) + 1):
            for ext in (True, False):
                with contextlib.suppress(FormatError):  # no exponent bits left
                    out.append(p3109(k, p, signed, ext))
    return out


def _torch_name(obj: object) -> str | None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return None


def get_format(spec: str | FloatFormat | IntFormat | object) -> FloatFormat | IntFormat:
    """Resolve a format from a descriptor, a name, an alias, a torch dtype or an ml_dtypes type.

    Raises :class:`FormatError` naming the closest known names when nothing matches.
    """
    if isinstance(spec, FloatFormat | IntFormat):
        return spec
    name = _torch_name(spec)
    if name is None and isinstance(spec, type):
        name = spec.__name__
    if name is None:
        if not isinstance(spec, str):
            raise FormatError(
                f"cannot interpret {spec!r} (type {type(spec).__name__}) as a number format: "
                "pass a name such as 'e4m3', a FloatFormat/IntFormat, or a torch dtype"
            )
        name = spec
    return FORMATS.get(name)
