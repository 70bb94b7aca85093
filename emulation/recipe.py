"""Recipes: which arithmetic every GEMM, the attention matmuls and the KV cache of a model use.

A :class:`Recipe` is a frozen description, independent of any model:

* per **op kind** (the registry :data:`~precisim.emulation.opkinds.OP_KINDS`) a spec; the
  built-in kinds are ``linear`` (every linear / Conv1D layer), ``attention`` (the two attention
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
  rule wins, op kind by op kind.

A recipe's keys are ``name``, ``description``, ``rules`` and the registered op kinds, each
parsed by its kind's spec type; ``recipe.linear`` / ``Recipe(name, linear=...)`` work for every
registered kind (:meth:`Recipe.spec` by name). Recipes round-trip through dicts, YAML and JSON
(:meth:`Recipe.to_yaml`, :meth:`Recipe.load`). Named presets: :func:`get_recipe` /
:func:`available_recipes`. The spec classes live in :mod:`precisim.emulation.specs`.

For a GEMM ``y = a @ b`` the blocks of a block-scaled role run along the reduction axis K
(the last axis of the input, K of the weight), so MX blocks of 32 are 32 consecutive products,
as the OCP MX v1.0 spec (section 6) and the hardware mean them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precisim.formats.registry import Registry, UnknownNameError

from .matrix_unit import MatrixUnit
from .opkinds import OP_KINDS, UnknownOpKindError
from .specs import (
    FIDELITIES,
    AttentionSpec,
    GemmSpec,
    RecipeError,
    TensorSpec,
    check_keys,
)

__all__ = [
    "AttentionSpec", "GemmSpec", "Recipe", "RecipeError", "Rule", "TensorSpec",
    "available_recipes", "get_recipe",
]

_MISSING: Any = object()
RULE_KINDS = ("glob", "regex", "type")


def _ops(given: Mapping[str, Any] | Iterable[tuple[str, Any]], where: str, *,
         keep_none: bool) -> tuple[tuple[str, Any], ...]:
    """``(op kind, spec)`` pairs in registry order, each value parsed by its kind's spec type
    (``None`` dropped unless ``keep_none``: a rule's explicit high precision)."""
    out: dict[str, Any] = {}
    for key, value in (given.items() if isinstance(given, Mapping) else given):
        if value is _MISSING:
            continue
        try:
            kind = OP_KINDS.get(key)
        except UnknownOpKindError as e:
            raise UnknownOpKindError(f"{where}: {e}") from None
        spec = kind.parse(value, f"{where}.{kind.name}")
        if spec is not None or keep_none:
            out[kind.name] = spec
    order = {n: i for i, n in enumerate(OP_KINDS.names())}
    return tuple(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


def _op_attr(obj: Any, attr: str, missing: Any) -> Any:
    """``obj.<op kind>``: the op's spec (``missing`` when not given); AttributeError for a
    name that is not a registered op kind."""
    if not attr.startswith("_"):
        kind = OP_KINDS.find(attr)
        if kind is not None and kind.name == attr:
            return dict(vars(obj).get("ops", ())).get(attr, missing)
    raise AttributeError(f"{type(obj).__name__!r} object has no attribute {attr!r} (op kinds: "
                         f"{', '.join(OP_KINDS.names())})")


def _ops_repr(ops: tuple[tuple[str, Any], ...]) -> str:
    return "".join(f", {k}={v!r}" for k, v in ops)


@dataclass(frozen=True, init=False, repr=False)
class Rule:
    """Override of op specs for the modules whose qualified name (glob / regex) or class name
    (type) matches ``pattern``. Only the op kinds given are overridden (``None`` given
    explicitly = high precision for that op); the last matching rule wins.

    ``Rule("model.*.q_proj", linear=None)``; any registered op kind is a keyword (or pass
    ``ops={"linear": ...}``); ``rule.linear`` is the override, or a sentinel when the rule
    does not override ``linear`` (see :meth:`overrides`).
    """

    pattern: str
    kind: str = "glob"
    ops: tuple[tuple[str, Any], ...] = ()

    def __init__(self, pattern: str, kind: str = "glob", *,
                 ops: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), **specs: Any):
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "kind", kind)
        where = f"rule {pattern!r}"
        object.__setattr__(self, "ops", _ops({**dict(ops), **specs}, where, keep_none=True))
        if self.kind not in RULE_KINDS:
            raise RecipeError(f"rule {self.pattern!r}: kind {self.kind!r} does not exist; "
                              f"accepted: {', '.join(RULE_KINDS)}")
        if self.kind == "regex":
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise RecipeError(f"rule {self.pattern!r}: bad regex ({e})") from None

    def __getattr__(self, attr: str) -> Any:
        return _op_attr(self, attr, _MISSING)

    def __repr__(self) -> str:
        return f"Rule(pattern={self.pattern!r}, kind={self.kind!r}{_ops_repr(self.ops)})"

    @classmethod
    def parse(cls, value: Rule | Mapping[str, Any], where: str) -> Rule:
        if isinstance(value, Rule):
            return value
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: a rule must be a mapping, got {type(value).__name__}")
        check_keys(value, ("match", "kind", *OP_KINDS.names()), where, UnknownOpKindError)
        if "match" not in value:
            raise RecipeError(f"{where}: a rule needs 'match' (a glob, 're:<regex>' or a "
                              "module type with kind: type)")
        pat, kind = str(value["match"]), str(value.get("kind", "glob"))
        if pat.startswith("re:") and "kind" not in value:
            pat, kind = pat[3:], "regex"
        given = {k: v for k, v in value.items() if k not in ("match", "kind")}
        if not given:
            raise RecipeError(f"{where}: rule {pat!r} overrides nothing; give one of "
                              f"{', '.join(OP_KINDS.names())}")
        return cls(pat, kind, ops=_ops(given, where, keep_none=True))

    def matches(self, name: str, module_type: type) -> bool:
        if self.kind == "glob":
            import fnmatch

            return fnmatch.fnmatchcase(name, self.pattern)
        if self.kind == "regex":
            return re.fullmatch(self.pattern, name) is not None
        return any(t.__name__ == self.pattern for t in module_type.__mro__)

    def overrides(self, op: str) -> bool:
        """True when the rule gives ``op`` (an op kind name) a spec or None."""
        return OP_KINDS.canonical(op) in dict(self.ops)

    def get(self, op: str, default: Any = _MISSING) -> Any:
        """The rule's spec for ``op`` (None = high precision), or ``default`` when it does
        not override ``op``."""
        return dict(self.ops).get(OP_KINDS.canonical(op), default)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"match": self.pattern}
        if self.kind != "glob":
            d["kind"] = self.kind
        for op, v in self.ops:
            d[op] = None if v is None else v.to_dict()
        return d


@dataclass(frozen=True, init=False, repr=False)
class Recipe:
    """A complete arithmetic proposal for a model (see the module docstring).

    ``Recipe("x", linear=GemmSpec(...), attention="mxfp8")``: any registered op kind is a
    keyword (a spec, a value its spec type parses, or None), or pass ``ops={...}``;
    ``recipe.linear`` is that kind's spec (None = high precision).
    """

    name: str
    ops: tuple[tuple[str, Any], ...] = ()
    rules: tuple[Rule, ...] = ()
    description: str = ""

    def __init__(self, name: str, *, rules: Iterable[Rule] = (), description: str = "",
                 ops: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), **specs: Any):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "ops", _ops({**dict(ops), **specs}, f"recipe {name!r}",
                                             keep_none=False))
        object.__setattr__(self, "rules", tuple(rules))
        object.__setattr__(self, "description", description)

    def __getattr__(self, attr: str) -> Any:
        return _op_attr(self, attr, None)

    def __repr__(self) -> str:
        return (f"Recipe(name={self.name!r}{_ops_repr(self.ops)}, rules={self.rules!r}, "
                f"description={self.description!r})")

    def spec(self, op: str) -> Any:
        """The recipe's default spec of op kind ``op`` (None = high precision); an unknown
        op kind raises the registry's error."""
        return dict(self.ops).get(OP_KINDS.canonical(op))

    def mentions(self, op: str) -> bool:
        """True when the recipe's defaults or a rule give op kind ``op`` a spec."""
        return self.spec(op) is not None or any(r.overrides(op) for r in self.rules)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        if not isinstance(d, Mapping):
            raise RecipeError(f"a recipe must be a mapping, got {type(d).__name__}")
        check_keys(d, ("name", "description", *OP_KINDS.names(), "rules"), "recipe",
                      UnknownOpKindError)
        name = str(d.get("name", "custom"))
        rules = d.get("rules") or []
        if not isinstance(rules, list):
            raise RecipeError(f"recipe {name!r}: 'rules' must be a list, got "
                              f"{type(rules).__name__}")
        return cls(
            name=name,
            ops=_ops({k: v for k, v in d.items() if k not in ("name", "description", "rules")},
                     f"recipe {name!r}", keep_none=False),
            rules=tuple(Rule.parse(r, f"recipe {name!r}.rules[{i}]")
                        for i, r in enumerate(rules)),
            description=str(d.get("description", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.description:
            d["description"] = self.description
        for op, v in self.ops:
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
        """A copy with fields or op kinds changed (``with_(name=..., linear=None)``)."""
        return dataclasses.replace(self, **changes)

    def with_fidelity(self, fidelity: str) -> Recipe:
        """The same recipe with every matrix unit run at ``fidelity`` (``bit-exact``/``fast``);
        the name gets a ``@fast`` suffix when it changes anything."""
        if fidelity not in FIDELITIES:
            raise RecipeError(f"fidelity {fidelity!r} is not one of {', '.join(FIDELITIES)}")
        changed = False

        def g(x: GemmSpec) -> GemmSpec:
            nonlocal changed
            if x.unit is not None and x.fidelity != fidelity:
                changed = True
                return dataclasses.replace(x, fidelity=fidelity)
            return x

        ops = tuple((op, _map_gemms(v, g)) for op, v in self.ops)
        rules = tuple(dataclasses.replace(r, ops=tuple((op, _map_gemms(v, g))
                                                       for op, v in r.ops))
                      for r in self.rules)
        if not changed:
            return self
        suffix = "" if fidelity == "bit-exact" else f"@{fidelity}"
        return dataclasses.replace(self, name=self.name.split("@")[0] + suffix, rules=rules,
                                   ops=ops)

    def units(self) -> list[str]:
        """The names of the matrix units the recipe uses (defaults and rules)."""
        return [u.name for u in self.matrix_units()]

    def matrix_units(self) -> list[MatrixUnit]:
        """The matrix units the recipe uses (defaults and rules), as objects."""
        out: list[MatrixUnit] = []

        def add(x: GemmSpec) -> GemmSpec:
            if x.unit is not None:
                u = x.matrix_unit()
                if u not in out:
                    out.append(u)
            return x

        for _, v in self.ops:
            _map_gemms(v, add)
        for r in self.rules:
            for _, v in r.ops:
                _map_gemms(v, add)
        return out

    # -- cost axis (used by eval's spec tables) -------------------------------------------
    def bits_per_element(self) -> dict[str, float | None]:
        """Storage bits per element of the linear layers' weights and inputs and of the KV
        cache, scale overhead included (MXFP4 4.25, NVFP4 4.5: docs/arithmetic.md section 2);
        None = the model's own precision."""
        lin = self.spec("linear")
        att = self.spec("attention")
        kv = att.kv_cache if att is not None else None
        if kv is None and att is not None and att.qk is not None:
            kv = att.qk.weight
        return {
            "weight": lin.weight.bits_per_element() if lin and lin.weight else None,
            "input": lin.input.bits_per_element() if lin and lin.input else None,
            "kv_cache": kv.bits_per_element() if kv is not None else None,
        }


def _map_gemms(x: Any, fn: Any) -> Any:
    """``x`` with ``fn`` applied to every :class:`GemmSpec` in it (``x`` itself or a field of
    a spec dataclass, recursively); unchanged objects are returned as they are."""
    if isinstance(x, GemmSpec):
        return fn(x)
    if not dataclasses.is_dataclass(x) or isinstance(x, type | MatrixUnit | TensorSpec):
        return x
    new = {f.name: _map_gemms(getattr(x, f.name), fn) for f in dataclasses.fields(x)}
    if all(new[k] is getattr(x, k) for k in new):
        return x
    return dataclasses.replace(x, **new)


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
