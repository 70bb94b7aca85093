"""Op specs: how the operands of one op are represented and which matrix unit adds them.

* :class:`TensorSpec`: one operand (a *role*): element or block-scaled format, rounding, scale
  rule and granularity, overflow and subnormal policies (docs/arithmetic.md sections 2 and 3);
* :class:`GemmSpec`: one GEMM, a :class:`TensorSpec` per role (``input``, ``weight``,
  ``output``) and the matrix unit that sums the products (docs/arithmetic.md section 4);
* :class:`AttentionSpec`: the attention block, ``qk`` and ``pv`` GEMMs and the ``kv_cache``.

Every spec class is frozen and has the interface an op kind's spec type needs
(:class:`precisim.emulation.opkinds.OpKind`): ``parse(value, where)`` (from YAML/JSON values:
a name, a mapping or null), ``to_dict()``, ``describe()`` and ``is_identity``. Recipes
(:mod:`precisim.emulation.recipe`) hold one spec per op kind.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from precisim.formats import FloatFormat, FormatError, IntFormat, Overflow, Rounding, get_format
from precisim.formats.quantize import MAX_SR_BITS, check_overflow
from precisim.formats.scaling import (
    SCALED_FORMATS,
    Granularity,
    ScaledFormat,
    ScaleRule,
    get_scaled_format,
)

from .matrix_unit import MatrixUnit

__all__ = ["AttentionSpec", "GemmSpec", "RecipeError", "TensorSpec"]

ROLES = ("input", "weight", "output")
FIDELITIES = ("bit-exact", "fast")


class RecipeError(ValueError):
    """A recipe (or its YAML/JSON) is malformed; the message names the bad value."""


def check_keys(d: Mapping[str, Any], allowed: Sequence[str], where: str,
               error: type[ValueError] = RecipeError) -> None:
    """Raise ``error`` naming every key of ``d`` not in ``allowed`` (with the closest allowed
    name) and listing the allowed ones."""
    bad = [k for k in d if k not in allowed]
    if bad:
        hints = []
        for k in bad:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise error(f"{where}: unknown key(s) {', '.join(hints)}; accepted: "
                    f"{', '.join(allowed)}")


def _scaling_granularity(text: str, where: str) -> Granularity:
    """``tensor``, ``channel``, ``token``, ``group:N`` or ``tile:RxC`` (K axis = -1)."""
    t = text.strip().lower()
    if t in ("tensor", "per_tensor"):
        return Granularity.per_tensor()
    if t in ("channel", "per_channel"):
        return Granularity.per_channel(0)
    if t in ("token", "per_token"):
        return Granularity.per_token(-1)
    m = re.fullmatch(r"(?:group|per_group):(\d+)", t)
    if m:
        return Granularity.per_group(int(m.group(1)), -1)
    m = re.fullmatch(r"tile:(\d+)x(\d+)", t)
    if m:
        return Granularity.tile(int(m.group(1)), int(m.group(2)))
    raise RecipeError(f"{where}: unknown scaling {text!r}; accepted: tensor, channel, token, "
                      "group:N, tile:RxC")


@dataclass(frozen=True)
class TensorSpec:
    """How one operand (role) of a GEMM is represented.

    ``format``: an element format name (``e4m3``, ``bf16``, ``e2m1``, ``int8``, any name
    :func:`precisim.formats.get_format` accepts) or a block-scaled format name (``mxfp8``,
    ``mxfp4``, ``nvfp4``, ``fp8_tensor``, ``fp8_1x128``, ``fp8_128x128``, ``int8_channel``...,
    see :func:`precisim.formats.scaling.get_scaled_format`). ``scaling`` turns an element
    format into a scaled one: ``tensor``, ``channel``, ``token``, ``group:N`` or ``tile:RxC``
    with ``scale_format`` (``e8m0`` for power-of-two rules, else ``fp32``; docs/arithmetic.md
    section 2) and ``scale_rule`` (``floor``, ``ceil``, ``rceil``, ``even`` or ``amax``).
    ``rounding``/``overflow`` as in docs/arithmetic.md section 3; ``sr_bits``/``seed`` for
    stochastic rounding; ``flush_subnormals`` flushes input and output subnormals.
    """

    format: str
    rounding: str = "rne"
    overflow: str = "saturate"
    scaling: str | None = None
    scale_rule: str | None = None
    scale_format: str | None = None
    flush_subnormals: bool = False
    sr_bits: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        """Every field is checked here, types and combinations, so that a recipe fails when it
        is parsed (naming the field and what is accepted), never at the first forward."""
        if not isinstance(self.format, str) or not self.format.strip():
            raise RecipeError(f"tensor spec: format must be a non-empty name, got "
                              f"{self.format!r}")
        where = f"tensor spec {self.format!r}"
        for name in ("rounding", "overflow"):
            if not isinstance(getattr(self, name), str):
                raise RecipeError(f"{where}: {name}={getattr(self, name)!r} is not valid: "
                                  "accepted a name (e.g. rounding 'rne', overflow 'saturate')")
        for name in ("scaling", "scale_rule", "scale_format"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise RecipeError(f"{where}: {name}={v!r} is not valid: accepted a name or "
                                  "null")
        if not isinstance(self.flush_subnormals, bool):
            raise RecipeError(f"{where}: flush_subnormals={self.flush_subnormals!r} is not "
                              "valid: accepted true or false (a YAML boolean, not a string)")
        try:
            rnd = Rounding.parse(self.rounding)
            ovf = Overflow.parse(self.overflow)
            if self.scale_rule is not None:
                ScaleRule.parse(self.scale_rule)
        except (ValueError, KeyError) as e:
            raise RecipeError(f"{where}: {e}") from None
        stochastic = rnd is Rounding.STOCHASTIC
        if self.sr_bits is not None:
            if not stochastic:
                raise RecipeError(f"{where}: sr_bits={self.sr_bits!r} needs rounding='sr', "
                                  f"not {self.rounding!r}")
            if isinstance(self.sr_bits, bool) or not isinstance(self.sr_bits, int) \
                    or not 1 <= self.sr_bits <= MAX_SR_BITS:
                raise RecipeError(f"{where}: sr_bits={self.sr_bits!r} is not valid: accepted "
                                  f"an integer in 1..{MAX_SR_BITS}")
        if self.seed is not None:
            if not stochastic:
                raise RecipeError(f"{where}: seed={self.seed!r} needs rounding='sr' (only "
                                  f"stochastic rounding draws random bits), not "
                                  f"{self.rounding!r}")
            if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                    or not 0 <= self.seed < 2**63:
                raise RecipeError(f"{where}: seed={self.seed!r} is not valid: accepted an "
                                  "integer in 0..2^63-1")
        if self.scale_format is not None and self.scaling is None:
            raise RecipeError(f"{where}: scale_format={self.scale_format!r} needs 'scaling' "
                              "(a named block-scaled format has its own scale format)")
        fmt = self.resolve()  # validates the format names now, not at the first forward
        if isinstance(fmt, ScaledFormat):
            if ovf is not Overflow.SATURATE:
                raise RecipeError(f"{where}: overflow={self.overflow!r} is not possible for "
                                  f"the block-scaled {fmt.name}: its elements saturate at the "
                                  "element format's max (OCP MX); accepted 'saturate'")
        else:
            try:
                check_overflow(fmt, ovf)
            except FormatError as e:
                raise RecipeError(f"{where}: {e}") from None

    @classmethod
    def parse(cls, value: TensorSpec | str | Mapping[str, Any] | None, where: str = "spec"
              ) -> TensorSpec | None:
        """A spec from a name (``"mxfp8"``), a dict of fields, a spec, or None (high precision)."""
        if value is None or isinstance(value, TensorSpec):
            return value
        if isinstance(value, str):
            if value.strip().lower() in ("none", "high", "off"):
                return None
            return cls(format=value)
        if isinstance(value, Mapping):
            names = tuple(f.name for f in fields(cls))
            check_keys(value, names, where)
            if "format" not in value:
                raise RecipeError(f"{where}: a tensor spec needs a 'format'")
            return cls(**dict(value))
        raise RecipeError(f"{where}: expected a format name, a mapping or null, got "
                          f"{type(value).__name__} {value!r}")

    def resolve(self, axis: int = -1) -> FloatFormat | IntFormat | ScaledFormat:
        """The format object, block axis ``axis`` (the GEMM's K axis for this operand)."""
        where = f"tensor spec {self.format!r}"
        try:
            if self.scaling is not None:
                elem = get_format(self.format)
                gran = _scaling_granularity(self.scaling, where)
                if gran.blocks and not gran.is_per_tensor():
                    gran = _with_axis(gran, axis)
                rule = ScaleRule.parse(self.scale_rule or "amax")
                sfmt = self.scale_format or ("e8m0" if rule.power_of_two else "fp32")
                return ScaledFormat(f"{self.format}/{self.scaling}", elem, gran,
                                    get_format(sfmt), rule)
            if self.format in SCALED_FORMATS:
                return get_scaled_format(self.format, self.scale_rule, axis=axis)
            if self.scale_rule is not None:
                raise RecipeError(f"{where}: scale_rule={self.scale_rule!r} needs a "
                                  "block-scaled format or a 'scaling'")
            return get_format(self.format)
        except FormatError as e:
            raise RecipeError(f"{where}: {e}") from None

    @property
    def is_identity(self) -> bool:
        """Always False: a tensor spec always quantizes (even to the model's own format)."""
        return False

    def bits_per_element(self) -> float:
        """Storage bits per element including block scales (docs/arithmetic.md section 2)."""
        f = self.resolve()
        return f.bits_per_element if isinstance(f, ScaledFormat) else float(f.bits)

    def to_dict(self) -> dict[str, Any] | str:
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if getattr(self, f.name) != f.default}
        return self.format if list(d) == ["format"] else d

    def describe(self) -> str:
        parts = [self.format]
        if self.scaling:
            parts.append(self.scaling)
        if self.scale_rule:
            parts.append(f"rule={self.scale_rule}")
        if self.rounding != "rne":
            parts.append(self.rounding + (f"{self.sr_bits}" if self.sr_bits else ""))
        if self.overflow != "saturate":
            parts.append(f"ovf={self.overflow}")
        if self.flush_subnormals:
            parts.append("ftz")
        return " ".join(parts)


def _with_axis(g: Granularity, axis: int) -> Granularity:
    if len(g.blocks) == 1:
        (_, size), = g.blocks
        return Granularity(((axis, size),), g.keep_axis, g.name)
    return g


@dataclass(frozen=True)
class GemmSpec:
    """One GEMM: a :class:`TensorSpec` per role (None = left in the model's precision) and the
    matrix unit that sums the products (a name from
    :func:`precisim.emulation.available_units`, a :class:`~precisim.emulation.MatrixUnit`
    (in YAML/JSON: a mapping, see :func:`~precisim.emulation.presets.unit_from_dict`), or None
    for an fp32 ``torch.matmul`` of the dequantized operands). ``fidelity``: ``bit-exact`` or
    ``fast`` (see :func:`precisim.emulation.matmul`)."""

    input: TensorSpec | None = None
    weight: TensorSpec | None = None
    output: TensorSpec | None = None
    unit: str | MatrixUnit | None = None
    fidelity: str = "bit-exact"

    def __post_init__(self) -> None:
        if self.fidelity not in FIDELITIES:
            raise RecipeError(f"gemm spec: fidelity {self.fidelity!r} is not one of "
                              f"{', '.join(FIDELITIES)}")
        if self.unit is None and self.fidelity != "bit-exact":
            raise RecipeError(f"gemm spec: fidelity={self.fidelity!r} needs a matrix unit "
                              "('unit'); without one the dequantized operands are multiplied "
                              "in fp32 and there is no fidelity to choose")
        for role in ROLES:
            v = getattr(self, role)
            if v is not None and not isinstance(v, TensorSpec):
                raise RecipeError(f"gemm spec: {role}={v!r} is not valid: accepted a "
                                  "TensorSpec or None (GemmSpec.parse reads names and "
                                  "mappings)")
        if self.unit is not None:
            from .presets import get_unit

            try:
                unit = get_unit(self.unit)
            except (KeyError, TypeError) as e:
                raise RecipeError(f"gemm spec: {e.args[0]}") from None
            self._check_unit_operands(unit)

    def _check_unit_operands(self, unit: MatrixUnit) -> None:
        """The operand formats a matrix unit can take, checked when the spec is built (not at
        the first forward): every element value must be a value of the unit's input format,
        block-scaled operands come in pairs, and their scale blocks along K must fit the
        unit's block FMA (or promotion interval)."""
        from .scaled import accepts_elements

        scaled: dict[str, ScaledFormat] = {}
        for role, container in (("input", unit.a_format), ("weight", unit.b_format)):
            ts = getattr(self, role)
            if ts is None:
                continue
            f = ts.resolve()
            elem = f.element if isinstance(f, ScaledFormat) else f
            if not accepts_elements(elem, container):
                raise RecipeError(
                    f"gemm spec: {role} format {ts.format!r} ({elem.name} values) cannot be fed "
                    f"to matrix unit {unit.name!r}: its input format {container.name} does not "
                    f"hold every {elem.name} value; accepted: an {role} format whose values "
                    f"are all {container.name} values, or a unit whose input format contains "
                    f"{elem.name} ('exact-fp32' takes every format)")
            if isinstance(f, ScaledFormat):
                scaled[role] = f
        if len(scaled) == 1 and self.input is not None and self.weight is not None:
            (role, f), = scaled.items()
            other = "weight" if role == "input" else "input"
            raise RecipeError(f"gemm spec: matrix unit {unit.name!r} takes block-scaled operands "
                              f"in pairs: the {role} is {f.name} but the {other} "
                              f"{getattr(self, other).format!r} is not block-scaled")
        for role, f in scaled.items():
            kb = next((size for axis, size in f.granularity.blocks
                       if axis == -1 and size is not None), None)
            if kb is None or f.granularity.keep_axis is not None:
                continue  # one scale for all of K (per tensor / token / channel)
            if unit.promotion_interval is not None:
                n, what = unit.promotion_interval, "applies the scales at promotion every"
            elif unit.alignment_bits is not None:
                n, what = unit.block_size, "sums block FMAs (one scale each) of"
            else:
                continue  # exact block sums take any scale blocks
            if kb % n:
                raise RecipeError(
                    f"gemm spec: the {role} format {f.name} has scale blocks of {kb} along K, "
                    f"but matrix unit {unit.name!r} {what} {n} products: {n} must divide "
                    f"{kb} (e.g. MX 32 with k = 16 or 32, NVFP4 16 with k = 16, 1x128 / "
                    "128x128 with promotion every 128)")

    @property
    def unit_name(self) -> str | None:
        """The matrix unit's name (None: fp32 matmul of the dequantized operands)."""
        return self.unit if self.unit is None or isinstance(self.unit, str) else self.unit.name

    def matrix_unit(self) -> MatrixUnit | None:
        """The matrix unit object (None: fp32 matmul of the dequantized operands)."""
        from .presets import get_unit

        return None if self.unit is None else get_unit(self.unit)

    @classmethod
    def parse(cls, value: GemmSpec | str | Mapping[str, Any] | None, where: str
              ) -> GemmSpec | None:
        """From a dict of roles (+ unit, fidelity), a single format name for input and weight,
        a spec, or None (high precision)."""
        if value is None or isinstance(value, GemmSpec):
            return value
        if isinstance(value, str):
            ts = TensorSpec.parse(value, where)
            return None if ts is None else cls(input=ts, weight=ts)
        if isinstance(value, Mapping):
            check_keys(value, ("input", "weight", "output", "unit", "fidelity"), where)
            kw: dict[str, Any] = {r: TensorSpec.parse(value.get(r), f"{where}.{r}")
                                  for r in ROLES}
            u = value.get("unit")
            if isinstance(u, Mapping):
                from .presets import unit_from_dict

                try:
                    kw["unit"] = unit_from_dict(u, f"{where}.unit")
                except ValueError as e:
                    raise RecipeError(str(e)) from None
            elif isinstance(u, MatrixUnit | str):
                kw["unit"] = u
            elif u is not None:
                raise RecipeError(f"{where}.unit: expected a preset name or a mapping of "
                                  f"MatrixUnit fields, got {type(u).__name__} {u!r}")
            if value.get("fidelity") is not None:
                kw["fidelity"] = str(value["fidelity"])
            return cls(**kw)
        raise RecipeError(f"{where}: expected a mapping, a format name or null, got "
                          f"{type(value).__name__} {value!r}")

    @property
    def is_identity(self) -> bool:
        """True when nothing is emulated (every role high precision and no unit)."""
        return self.unit is None and all(getattr(self, r) is None for r in ROLES)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for r in ROLES:
            s = getattr(self, r)
            if s is not None:
                d[r] = s.to_dict()
        if self.unit is not None:
            from .presets import is_preset, unit_to_dict

            u = self.unit
            d["unit"] = u if isinstance(u, str) else u.name if is_preset(u) else unit_to_dict(u)
            d["fidelity"] = self.fidelity
        return d

    def describe(self) -> str:
        parts = [f"{r[0]}={getattr(self, r).describe()}" for r in ROLES
                 if getattr(self, r) is not None]
        parts.append(f"unit={self.unit_name}/{self.fidelity}" if self.unit
                     else "unit=fp32-matmul")
        return " ".join(parts)


@dataclass(frozen=True)
class AttentionSpec:
    """The attention block: ``qk`` (input = Q, weight = K), ``pv`` (input = P, the softmax
    probabilities; weight = V) and the ``kv_cache`` format (keys and values are stored in it
    as they are written to the cache); ``datapath``: an online-softmax attention datapath
    (:class:`~precisim.emulation.flash.AttentionDatapath`, docs/attention-datapath.md) that
    computes the attention instead of the eager function (its ``qk`` / ``pv`` are replaced by
    this spec's where this spec gives them)."""

    qk: GemmSpec | None = None
    pv: GemmSpec | None = None
    kv_cache: TensorSpec | None = None
    datapath: Any = None  #: an AttentionDatapath (or None: the eager attention)

    @classmethod
    def parse(cls, value: AttentionSpec | Mapping[str, Any] | str | None, where: str
              ) -> AttentionSpec | None:
        if value is None or isinstance(value, AttentionSpec):
            return value
        if isinstance(value, str):
            g = GemmSpec.parse(value, where)
            return None if g is None else cls(qk=g, pv=g)
        if isinstance(value, Mapping):
            check_keys(value, ("qk", "pv", "kv_cache", "datapath"), where)
            dp = value.get("datapath")
            if dp is not None:
                from .flash import AttentionDatapath

                try:
                    dp = AttentionDatapath.parse(dp, f"{where}.datapath")
                except ValueError as e:  # an unknown name or a bad field
                    raise RecipeError(f"{where}.datapath: {e}") from None
            return cls(GemmSpec.parse(value.get("qk"), f"{where}.qk"),
                       GemmSpec.parse(value.get("pv"), f"{where}.pv"),
                       TensorSpec.parse(value.get("kv_cache"), f"{where}.kv_cache"), dp)
        raise RecipeError(f"{where}: expected a mapping or null, got {type(value).__name__}")

    @property
    def is_identity(self) -> bool:
        return ((self.qk is None or self.qk.is_identity)
                and (self.pv is None or self.pv.is_identity) and self.kv_cache is None
                and self.datapath is None)

    def describe(self) -> str:
        parts = [f"{k}: " + ("high" if g is None or g.is_identity else g.describe())
                 for k, g in (("qk", self.qk), ("pv", self.pv))]
        if self.kv_cache is not None:
            parts.append(f"kv: {self.kv_cache.describe()}")
        if self.datapath is not None:
            parts.append(f"datapath: {self.datapath.name}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.qk is not None:
            d["qk"] = self.qk.to_dict()
        if self.pv is not None:
            d["pv"] = self.pv.to_dict()
        if self.kv_cache is not None:
            d["kv_cache"] = self.kv_cache.to_dict()
        if self.datapath is not None:
            from .flash import DATAPATHS

            dp = self.datapath
            named = dp.name in DATAPATHS and DATAPATHS.get(dp.name) == dp
            d["datapath"] = dp.name if named else dp.to_dict()
        return d
