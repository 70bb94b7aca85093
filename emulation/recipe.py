"""Recipes: which arithmetic every GEMM, the attention matmuls and the KV cache of a model use.

A :class:`Recipe` is a frozen description, independent of any model:

* per **op kind**: ``linear`` (every linear / Conv1D layer), ``attention`` (the two attention
  matmuls ``qk`` = Q K^T and ``pv`` = P V, and the ``kv_cache``), ``embedding`` (the token
  embedding table) and ``lm_head`` (the output projection). Embeddings and lm_head stay in high
  precision unless the recipe says otherwise (the usual practice, e.g. torchao's float8
  training, DeepSeek-V3 section 3.3);
* per **role** of a GEMM (``input``, ``weight``, ``output``) a :class:`TensorSpec`: a format
  (element format, or block-scaled format as in docs/arithmetic.md section 2), rounding, scale rule,
  scaling granularity, overflow and subnormal policies;
* the **matrix unit** that adds the products (docs/arithmetic.md section 4; ``None`` = the
  dequantized operands are multiplied by ``torch.matmul`` in fp32, i.e. exact products and an
  fp32 accumulator in an unspecified order: the "fake-quant" convention of every public tool);
* **rules** that override the defaults per module, matched by glob (default), regex (``re:``
  prefix or ``kind: regex``) or module type (``kind: type``, the class name); the last matching
  rule wins, field by field.

Recipes round-trip through dicts, YAML and JSON (:meth:`Recipe.to_yaml`, :meth:`Recipe.load`).
Named presets: :func:`get_recipe` / :func:`available_recipes`.

For a GEMM ``y = a @ b`` the blocks of a block-scaled role run along the reduction axis K
(the last axis of the input, K of the weight), so MX blocks of 32 are 32 consecutive products,
as the OCP MX v1.0 spec (section 6) and the hardware mean them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from precisim.formats import FloatFormat, FormatError, IntFormat, Overflow, Rounding, get_format
from precisim.formats.registry import Registry, UnknownNameError
from precisim.formats.scaling import (
    Granularity,
    ScaledFormat,
    ScaleRule,
    get_scaled_format,
)

from .matrix_unit import MatrixUnit

__all__ = [
    "AttentionSpec", "GemmSpec", "Recipe", "RecipeError", "Rule", "TensorSpec",
    "available_recipes", "get_recipe",
]

ROLES = ("input", "weight", "output")
OP_KINDS = ("linear", "attention", "embedding", "lm_head")
FIDELITIES = ("bit-exact", "fast")


class RecipeError(ValueError):
    """A recipe (or its YAML/JSON) is malformed; the message names the bad value."""


def _unknown_keys(d: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    bad = [k for k in d if k not in allowed]
    if bad:
        hints = []
        for k in bad:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise RecipeError(f"{where}: unknown key(s) {', '.join(hints)}; accepted: "
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
        where = f"tensor spec {self.format!r}"
        if not isinstance(self.format, str) or not self.format.strip():
            raise RecipeError(f"tensor spec: format must be a non-empty name, got "
                              f"{self.format!r}")
        try:
            Rounding.parse(self.rounding)
            Overflow.parse(self.overflow)
            if self.scale_rule is not None:
                ScaleRule.parse(self.scale_rule)
        except (ValueError, KeyError) as e:
            raise RecipeError(f"{where}: {e}") from None
        if self.sr_bits is not None and Rounding.parse(self.rounding) != Rounding.STOCHASTIC:
            raise RecipeError(f"{where}: sr_bits={self.sr_bits} needs rounding='sr', "
                              f"not {self.rounding!r}")
        self.resolve()  # validates the format names now, not at the first forward

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
            _unknown_keys(value, names, where)
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
            try:
                return get_scaled_format(self.format, self.scale_rule, axis=axis)
            except FormatError:
                if self.scale_rule is not None:
                    raise RecipeError(f"{where}: scale_rule={self.scale_rule!r} needs a "
                                      "block-scaled format or a 'scaling'") from None
                return get_format(self.format)
        except FormatError as e:
            raise RecipeError(f"{where}: {e}") from None

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
        if self.unit is not None:
            from .presets import get_unit

            try:
                get_unit(self.unit)
            except (KeyError, TypeError) as e:
                raise RecipeError(f"gemm spec: {e.args[0]}") from None

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
            _unknown_keys(value, ("input", "weight", "output", "unit", "fidelity"), where)
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
    as they are written to the cache)."""

    qk: GemmSpec | None = None
    pv: GemmSpec | None = None
    kv_cache: TensorSpec | None = None

    @classmethod
    def parse(cls, value: AttentionSpec | Mapping[str, Any] | str | None, where: str
              ) -> AttentionSpec | None:
        if value is None or isinstance(value, AttentionSpec):
            return value
        if isinstance(value, str):
            g = GemmSpec.parse(value, where)
            return None if g is None else cls(qk=g, pv=g)
        if isinstance(value, Mapping):
            _unknown_keys(value, ("qk", "pv", "kv_cache"), where)
            return cls(GemmSpec.parse(value.get("qk"), f"{where}.qk"),
                       GemmSpec.parse(value.get("pv"), f"{where}.pv"),
                       TensorSpec.parse(value.get("kv_cache"), f"{where}.kv_cache"))
        raise RecipeError(f"{where}: expected a mapping or null, got {type(value).__name__}")

    @property
    def is_identity(self) -> bool:
        return ((self.qk is None or self.qk.is_identity)
                and (self.pv is None or self.pv.is_identity) and self.kv_cache is None)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.qk is not None:
            d["qk"] = self.qk.to_dict()
        if self.pv is not None:
            d["pv"] = self.pv.to_dict()
        if self.kv_cache is not None:
            d["kv_cache"] = self.kv_cache.to_dict()
        return d


_MISSING = object()
RULE_KINDS = ("glob", "regex", "type")


@dataclass(frozen=True)
class Rule:
    """Override of op specs for the modules whose qualified name (glob / regex) or class name
    (type) matches ``pattern``. Only the fields given are overridden (``None`` given
    explicitly = high precision for that op); the last matching rule wins."""

    pattern: str
    kind: str = "glob"
    linear: GemmSpec | None | object = _MISSING
    attention: AttentionSpec | None | object = _MISSING
    embedding: GemmSpec | None | object = _MISSING
    lm_head: GemmSpec | None | object = _MISSING

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise RecipeError(f"rule {self.pattern!r}: kind {self.kind!r} does not exist; "
                              f"accepted: {', '.join(RULE_KINDS)}")
        if self.kind == "regex":
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise RecipeError(f"rule {self.pattern!r}: bad regex ({e})") from None

    @classmethod
    def parse(cls, value: Rule | Mapping[str, Any], where: str) -> Rule:
        if isinstance(value, Rule):
            return value
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: a rule must be a mapping, got {type(value).__name__}")
        _unknown_keys(value, ("match", "kind", *OP_KINDS), where)
        if "match" not in value:
            raise RecipeError(f"{where}: a rule needs 'match' (a glob, 're:<regex>' or a "
                              "module type with kind: type)")
        pat, kind = str(value["match"]), str(value.get("kind", "glob"))
        if pat.startswith("re:") and "kind" not in value:
            pat, kind = pat[3:], "regex"
        kw: dict[str, Any] = {}
        for op in ("linear", "embedding", "lm_head"):
            if op in value:
                kw[op] = GemmSpec.parse(value[op], f"{where}.{op}")
        if "attention" in value:
            kw["attention"] = AttentionSpec.parse(value["attention"], f"{where}.attention")
        if not kw:
            raise RecipeError(f"{where}: rule {pat!r} overrides nothing; give one of "
                              f"{', '.join(OP_KINDS)}")
        return cls(pat, kind, **kw)

    def matches(self, name: str, module_type: type) -> bool:
        if self.kind == "glob":
            import fnmatch

            return fnmatch.fnmatchcase(name, self.pattern)
        if self.kind == "regex":
            return re.fullmatch(self.pattern, name) is not None
        return any(t.__name__ == self.pattern for t in module_type.__mro__)

    def overrides(self, op: str) -> bool:
        return getattr(self, op) is not _MISSING

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"match": self.pattern}
        if self.kind != "glob":
            d["kind"] = self.kind
        for op in OP_KINDS:
            v = getattr(self, op)
            if v is not _MISSING:
                d[op] = None if v is None else v.to_dict()  # type: ignore[union-attr]
        return d


@dataclass(frozen=True)
class Recipe:
    """A complete arithmetic proposal for a model (see the module docstring)."""

    name: str
    linear: GemmSpec | None = None
    attention: AttentionSpec | None = None
    embedding: GemmSpec | None = None
    lm_head: GemmSpec | None = None
    rules: tuple[Rule, ...] = ()
    description: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        if not isinstance(d, Mapping):
            raise RecipeError(f"a recipe must be a mapping, got {type(d).__name__}")
        _unknown_keys(d, ("name", "description", *OP_KINDS, "rules"), "recipe")
        name = str(d.get("name", "custom"))
        rules = d.get("rules") or []
        if not isinstance(rules, list):
            raise RecipeError(f"recipe {name!r}: 'rules' must be a list, got "
                              f"{type(rules).__name__}")
        return cls(
            name=name,
            linear=GemmSpec.parse(d.get("linear"), f"recipe {name!r}.linear"),
            attention=AttentionSpec.parse(d.get("attention"), f"recipe {name!r}.attention"),
            embedding=GemmSpec.parse(d.get("embedding"), f"recipe {name!r}.embedding"),
            lm_head=GemmSpec.parse(d.get("lm_head"), f"recipe {name!r}.lm_head"),
            rules=tuple(Rule.parse(r, f"recipe {name!r}.rules[{i}]")
                        for i, r in enumerate(rules)),
            description=str(d.get("description", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.description:
            d["description"] = self.description
        for op in OP_KINDS:
            v = getattr(self, op)
            if v is not None:
                d[op] = v.to_dict()
        if self.rules:
            d["rules"] = [r.to_dict() for r in self.rules]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        import yaml

        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"malformed recipe YAML: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"malformed recipe JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, source: str | Path | Recipe) -> Recipe:
        """A recipe from a preset name, or a ``.yaml``/``.yml``/``.json`` file."""
        if isinstance(source, Recipe):
            return source
        p = Path(source)
        if p.suffix.lower() in (".yaml", ".yml", ".json"):
            if not p.is_file():
                raise RecipeError(f"recipe file {str(p)!r} does not exist")
            text = p.read_text()
            return cls.from_json(text) if p.suffix.lower() == ".json" else cls.from_yaml(text)
        return get_recipe(str(source))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        if p.suffix.lower() not in (".yaml", ".yml", ".json"):
            raise RecipeError(f"recipe file {str(p)!r}: use a .yaml, .yml or .json suffix")
        p.write_text(self.to_json() if p.suffix.lower() == ".json" else self.to_yaml())
        return p

    def with_(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def with_fidelity(self, fidelity: str) -> Recipe:
        """The same recipe with every matrix unit run at ``fidelity`` (``bit-exact``/``fast``);
        the name gets a ``@fast`` suffix when it changes anything."""
        if fidelity not in FIDELITIES:
            raise RecipeError(f"fidelity {fidelity!r} is not one of {', '.join(FIDELITIES)}")
        changed = False

        def g(x: Any) -> Any:
            nonlocal changed
            if isinstance(x, GemmSpec) and x.unit is not None and x.fidelity != fidelity:
                changed = True
                return dataclasses.replace(x, fidelity=fidelity)
            if isinstance(x, AttentionSpec):
                return dataclasses.replace(x, qk=g(x.qk), pv=g(x.pv))
            return x

        new = {op: g(getattr(self, op)) for op in OP_KINDS}
        rules = tuple(dataclasses.replace(r, **{op: g(getattr(r, op)) for op in OP_KINDS
                                                if r.overrides(op)}) for r in self.rules)
        if not changed:
            return self
        suffix = "" if fidelity == "bit-exact" else f"@{fidelity}"
        return dataclasses.replace(self, name=self.name.split("@")[0] + suffix, rules=rules,
                                   **new)

    def units(self) -> list[str]:
        """The names of the matrix units the recipe uses (defaults and rules)."""
        return [u.name for u in self.matrix_units()]

    def matrix_units(self) -> list[MatrixUnit]:
        """The matrix units the recipe uses (defaults and rules), as objects."""
        out: list[MatrixUnit] = []

        def add(x: Any) -> None:
            if isinstance(x, GemmSpec) and x.unit is not None:
                u = x.matrix_unit()
                if u not in out:
                    out.append(u)
            if isinstance(x, AttentionSpec):
                add(x.qk)
                add(x.pv)

        for op in OP_KINDS:
            add(getattr(self, op))
        for r in self.rules:
            for op in OP_KINDS:
                if r.overrides(op):
                    add(getattr(r, op))
        return out

    # -- cost axis (used by eval's spec tables) -------------------------------------------
    def bits_per_element(self) -> dict[str, float | None]:
        """Storage bits per element of the linear layers' weights and inputs and of the KV
        cache, scale overhead included (MXFP4 4.25, NVFP4 4.5: docs/arithmetic.md section 2);
        None = the model's own precision."""
        lin = self.linear
        att = self.attention
        kv = att.kv_cache if att is not None else None
        if kv is None and att is not None and att.qk is not None:
            kv = att.qk.weight
        return {
            "weight": lin.weight.bits_per_element() if lin and lin.weight else None,
            "input": lin.input.bits_per_element() if lin and lin.input else None,
            "kv_cache": kv.bits_per_element() if kv is not None else None,
        }


# ---------------------------------------------------------------------------------------------
# presets

def _gemm(fmt_in: str, fmt_w: str | None = None, unit: str | None = None, **kw: Any) -> GemmSpec:
    return GemmSpec(TensorSpec(fmt_in, **kw), TensorSpec(fmt_w or fmt_in, **kw), unit=unit)


def _attention(fmt: str) -> AttentionSpec:
    return AttentionSpec(qk=_gemm(fmt), pv=_gemm(fmt))


def _presets() -> dict[str, Recipe]:
    r = [
        Recipe("fp32", description="nothing emulated: the model as loaded (reference)"),
        Recipe("bf16", linear=_gemm("bf16"),
               attention=AttentionSpec(_gemm("bf16"), _gemm("bf16"), TensorSpec("bf16")),
               description="bf16 operands for every GEMM and the KV cache; fp32 accumulation"),
        Recipe("fp8-e4m3", linear=_gemm("fp8_tensor"), attention=_attention("fp8_tensor"),
               description="E4M3 with per-tensor current scaling (amax/448, fp32 scale) for "
               "every GEMM operand; fp32 accumulation"),
        Recipe("deepseek-fp8", linear=_gemm("fp8_1x128", "fp8_128x128", unit="deepseek-fp8"),
               attention=_attention("bf16"),
               description="DeepSeek-V3 FP8: E4M3 activations per 1x128 tile, weights per "
               "128x128 block, fp32 scales; H100 FP8 tensor core (13-bit block result, RTZ) "
               "with promotion to fp32 every 128 products; attention in bf16"),
        Recipe("mxfp8", linear=_gemm("mxfp8"), attention=_attention("mxfp8"),
               description="OCP MXFP8 (E4M3, 32-element blocks, E8M0 FLOOR scale) for every "
               "GEMM operand; fp32 accumulation"),
        Recipe("mxfp6", linear=_gemm("mxfp6_e2m3"), attention=_attention("mxfp8"),
               description="OCP MXFP6 E2M3 linear layers, MXFP8 attention matmuls; fp32 "
               "accumulation"),
        Recipe("mxfp4", linear=_gemm("mxfp4"), attention=_attention("mxfp8"),
               description="OCP MXFP4 (E2M1, 32-element blocks, E8M0 FLOOR scale) linear "
               "layers, MXFP8 attention matmuls; fp32 accumulation"),
        Recipe("nvfp4", linear=_gemm("nvfp4"), attention=_attention("mxfp8"),
               description="NVFP4 (E2M1, 16-element blocks, E4M3 scale, fp32 tensor scale) "
               "linear layers, MXFP8 attention matmuls; fp32 accumulation"),
    ]
    return {x.name: x for x in r}


class UnknownRecipeError(UnknownNameError, RecipeError):
    """An unknown recipe name."""


#: the named recipes (docs/naming.md; qualified spelling ``recipe:<name>``)
RECIPES: Registry[Recipe] = Registry(
    "recipe", error=UnknownRecipeError, hint="or give a .yaml/.json recipe file")
for _r in _presets().values():
    RECIPES.register(_r.name, _r)


def available_recipes() -> list[str]:
    """The preset names :func:`get_recipe` accepts."""
    return RECIPES.names()


def get_recipe(name: str | Recipe) -> Recipe:
    """A preset recipe by name (case-insensitive; ``_`` = ``-``), or a recipe file path."""
    if isinstance(name, Recipe):
        return name
    if not isinstance(name, str):
        raise RecipeError(f"recipe must be a name, a path or a Recipe, got "
                          f"{type(name).__name__}")
    if Path(name).suffix.lower() in (".yaml", ".yml", ".json"):
        return Recipe.load(name)
    return RECIPES.get(name)
