"""Named matrix units: NVIDIA tensor cores and the simple accumulator models.

GPU parameters from docs/arithmetic.md section 4 (Khattak & Mikaitis, "Accurate Models of NVIDIA
Tensor Cores", arXiv 2512.07004; their MATLAB models ``V100TC``/``A100TC``/``H100TC``):

| unit, input      | k  | F = 23+neab | notes                                            |
|------------------|----|-------------|--------------------------------------------------|
| V100 fp16        | 4  | 23          | fp16-output mode: alignment exponent >= -19       |
| A100 fp16, bf16  | 8  | 24          | fp16-output mode: alignment exponent >= -20       |
| A100 tf32        | 4  | 24          |                                                  |
| H100 fp16, bf16  | 16 | 25          | fp16-output mode: alignment exponent >= -21       |
| H100 tf32        | 8  | 25          | recordings have K=4, so k is not tested          |
| H100 E4M3, E5M2  | 32 | 13          | block result cut to 13 fraction bits              |

All: exact products, c aligned jointly, unnormalised product exponents, sign-magnitude
truncation, fp32 accumulator rounded toward zero (fp16-output modes: fp16 accumulator, RNE).
``deepseek-fp8`` is the H100 E4M3 unit with promotion of the partial sums to an fp32 RNE
register every 128 products (DeepSeek-V3 technical report, section 3.3.2; DeepGEMM).

Block-scaled operands (:func:`precisim.emulation.scaled_matmul`): a unit takes the elements
of a scaled format when its input format contains the element format (``h100-e4m3``:
E4M3, E3M2, E2M3 and E2M1 elements; ``h100-bf16`` / ``h100-fp16`` also E5M2 and MXINT8), and
its block size k must divide the scale block (MX 32: k = 16 or 32; NVFP4 16: k = 16, so
NVFP4 runs on the k = 16 units, not on ``h100-e4m3``), or, with promotion
(``deepseek-fp8``), each promotion chunk must lie in one scale block (1x128 / 128x128).
``exact-fp32`` is the generic exact-then-fp32 path: a Kulisch accumulator over fp32 inputs,
so it takes every element format and any scale blocks (the scaled products are summed
exactly and rounded once to fp32 RNE); ``kulisch(fmt)`` builds the same with the element
format itself as input format.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from precisim.formats import FloatFormat, FormatError, IntFormat
from precisim.formats.registry import Registry, UnknownNameError

from .matrix_unit import MatrixUnit, kulisch, per_add_rounding, sequential_fma

_FP16_OUT_FLOOR = {"v100": -19, "a100": -20, "h100": -21}


def _nv(name: str, fmt: str, k: int, f: int, fp16_out: bool = False, **kw: object
        ) -> MatrixUnit:
    gpu = name.split("-")[0]
    if fp16_out:
        return MatrixUnit(name, fmt, block_size=k, alignment_bits=f, drop="truncate",
                          acc_format="fp16", acc_rounding="rne",
                          alignment_floor=_FP16_OUT_FLOOR[gpu],
                          description=f"{gpu.upper()} tensor core, {fmt} inputs, fp16 output "
                          "(docs/arithmetic.md section 4, item 6)", **kw)
    return MatrixUnit(name, fmt, block_size=k, alignment_bits=f, drop="truncate",
                      acc_format="fp32", acc_rounding="rtz",
                      description=f"{gpu.upper()} tensor core, {fmt} inputs, fp32 output "
                      "(docs/arithmetic.md section 4)", **kw)


def _build() -> dict[str, MatrixUnit]:
    units = [
        _nv("v100-fp16", "fp16", 4, 23),
        _nv("v100-fp16-fp16out", "fp16", 4, 23, fp16_out=True),
        _nv("a100-fp16", "fp16", 8, 24),
        _nv("a100-fp16-fp16out", "fp16", 8, 24, fp16_out=True),
        _nv("a100-bf16", "bf16", 8, 24),
        _nv("a100-tf32", "tf32", 4, 24),
        _nv("h100-fp16", "fp16", 16, 25),
        _nv("h100-fp16-fp16out", "fp16", 16, 25, fp16_out=True),
        _nv("h100-bf16", "bf16", 16, 25),
        _nv("h100-tf32", "tf32", 8, 25),
        _nv("h100-e4m3", "e4m3", 32, 13, block_result_bits=13),
        _nv("h100-e5m2", "e5m2", 32, 13, block_result_bits=13),
    ]
    ds = units[-2].with_(name="deepseek-fp8", promotion_interval=128,
                         description="H100 E4M3 unit with promotion to fp32 (RNE) every 128 "
                         "products (DeepSeek-V3 / DeepGEMM)")
    units.append(ds)
    for fmt in ("fp16", "bf16", "tf32", "e4m3", "e5m2", "fp32"):
        units.append(kulisch(fmt, "fp32", "rne", name=f"exact-{fmt}"))
        units.append(sequential_fma(fmt, "fp32", "rne", name=f"fma-{fmt}-fp32"))
    units.append(per_add_rounding("fp16", "fp32", "rne", name="mul-add-fp16-fp32"))
    units.append(sequential_fma("fp16", "fp16", "rne", name="fma-fp16-fp16"))
    units.append(sequential_fma("bf16", "bf16", "rne", name="fma-bf16-bf16"))
    return {u.name: u for u in units}


class UnknownUnitError(UnknownNameError):
    """An unknown matrix-unit name (a ``KeyError`` and a ``ValueError``)."""


#: the named matrix units (docs/naming.md; qualified spelling ``unit:<name>``)
UNITS: Registry[MatrixUnit] = Registry("matrix unit", prefix="unit", error=UnknownUnitError)
for _u in _build().values():
    UNITS.register(_u.name, _u)


def available_units() -> list[str]:
    """The names accepted by :func:`get_unit`."""
    return sorted(UNITS.names())


def is_preset(unit: MatrixUnit) -> bool:
    """Whether ``unit`` is a registered unit, field for field."""
    return UNITS.find(unit.name) == unit


def unit_to_dict(unit: MatrixUnit) -> dict[str, Any]:
    """Every field of ``unit`` as plain JSON/YAML values (formats by name, enums by value);
    :func:`unit_from_dict` rebuilds the same unit."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(unit):
        v = getattr(unit, f.name)
        if isinstance(v, FloatFormat | IntFormat):
            v = v.name
        elif isinstance(v, enum.Enum):
            v = v.value
        if f.name == "description" and not v:
            continue
        out[f.name] = v
    return out


def unit_from_dict(spec: Mapping[str, Any], where: str = "unit") -> MatrixUnit:
    """A matrix unit from a mapping: ``base`` (a preset name) plus the fields to change, or
    every field of :class:`MatrixUnit` (``name`` required). E.g. an H100 FP8 datapath with
    16-product blocks for NVFP4: ``{"base": "h100-e4m3", "name": "fp4-acc13", "block_size":
    16}``. Unknown keys and bad values raise ``ValueError`` naming them."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a mapping of MatrixUnit fields (or a preset name), "
                         f"got {type(spec).__name__} {spec!r}")
    from .specs import check_keys

    allowed = ["base"] + [f.name for f in dataclasses.fields(MatrixUnit)]
    check_keys(spec, allowed, where, error=ValueError)
    fields = {k: v for k, v in spec.items() if k != "base"}
    base = None
    try:
        if spec.get("base") is not None:
            base = get_unit(str(spec["base"]))
            fields.setdefault("name", f"{base.name}+custom")
            fields.setdefault("description", f"{base.name} with " + ", ".join(
                f"{k}={v}" for k, v in spec.items() if k not in ("base", "name")))
            # defaults derived from a changed field (acc_overflow from acc_format...) are
            # derived again: MatrixUnit.with_
            return base.with_(**fields)
        if "name" not in fields:
            raise ValueError("a unit without 'base' needs a 'name'")
        return MatrixUnit(**fields)
    except KeyError as e:
        raise ValueError(f"{where}: {e.args[0]}") from None
    except (ValueError, TypeError, FormatError) as e:
        hint = ""
        if base is not None:
            kept = [f"{f.name}={_plain(getattr(base, f.name))}"
                    for f in dataclasses.fields(MatrixUnit)
                    if f.name not in fields and f.name != "description"
                    and f.name in str(e) and getattr(base, f.name) is not None]
            if kept:
                hint = (f" ({', '.join(kept)} is taken from base {base.name!r}; give it in the "
                        "mapping to change it, null for none)")
        raise ValueError(f"{where}: {e}{hint}") from None


def _plain(v: Any) -> Any:
    if isinstance(v, FloatFormat | IntFormat):
        return v.name
    return v.value if isinstance(v, enum.Enum) else v


def get_unit(name: str | MatrixUnit) -> MatrixUnit:
    """A preset by name (case-insensitive; ``_`` and ``-`` are interchangeable)."""
    if isinstance(name, MatrixUnit):
        return name
    if not isinstance(name, str):
        raise TypeError(f"unit must be a name or a MatrixUnit, got {type(name).__name__}")
    return UNITS.get(name)
