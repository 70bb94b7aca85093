"""The spec sheet of an evaluation as a typed object, and its JSON schema versions.

A :class:`SpecSheet` records exactly what was emulated and what came out: the inputs (model,
data, settings, recipes; their ``content_hash``), every recipe resolved in full, library
versions, the reference's perplexity, the definitions of the metrics (name, formula, direction,
confidence-interval method), every recipe's metrics and telemetry. It is written as JSON by
:meth:`SpecSheet.to_json` and read back by :meth:`SpecSheet.load` / :meth:`SpecSheet.from_dict`,
and it reads like the JSON object (``sheet["metrics"]["mxfp4"]["kl"]``) as well as by attribute
(``sheet.metrics``).

Schema versions (the JSON key ``precisim_spec_sheet``):

* **1** (precisim <= 0.2.0): ``content_hash, inputs, recipes_resolved, versions, reference,
  metrics, telemetry``. Read and converted to version 2: the definitions of the built-in
  metrics it holds are added, and a note in ``notes`` says so.
* **2**: version 1 plus ``metric_definitions`` (per metric: description, formula, the per-token
  series it reads, ``higher_is_better``, the CI method and level, its keys, table label and
  number format) and optional ``notes`` (e.g. a conversion). Non-finite numbers are written as
  the strings ``"nan"``, ``"inf"``, ``"-inf"`` and read back as floats. Optional since
  precisim 0.2: ``numerics`` (the numeric environment: reproducible mode's pins, library
  versions, CPU capability, threads, world size) and ``noise`` (each recipe's numerical-noise
  band); neither enters the content hash.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["READABLE_VERSIONS", "SCHEMA_VERSION", "SpecSheet", "SpecSheetError", "VERSION_KEY",
           "as_sheet"]

#: the schema version this precisim writes
SCHEMA_VERSION = 2

#: the schema versions it reads (older ones are converted)
READABLE_VERSIONS = (1, 2)

#: the JSON key holding the schema version
VERSION_KEY = "precisim_spec_sheet"

#: JSON key -> attribute, in the order the JSON is written
_FIELDS = {VERSION_KEY: "schema_version", "content_hash": "content_hash", "inputs": "inputs",
           "recipes_resolved": "recipes_resolved", "versions": "versions",
           "reference": "reference", "metric_definitions": "metric_definitions",
           "metrics": "metrics", "telemetry": "telemetry"}

_OBJ, _LIST, _STR, _INT, _NUM = "object", "array", "string", "integer", "number"

#: (dotted path, accepted JSON types) every sheet of a version must have
_SHAPE_V1: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("content_hash", (_STR,)),
    ("inputs", (_OBJ,)), ("inputs.model", (_OBJ,)), ("inputs.model.source", (_STR,)),
    ("inputs.data", (_OBJ,)), ("inputs.data.source", (_STR,)), ("inputs.settings", (_OBJ,)),
    ("inputs.settings.tokens", (_INT, "null")), ("inputs.settings.tokens_evaluated", (_INT,)),
    ("inputs.settings.window", (_INT,)), ("inputs.settings.stride", (_INT, "null")),
    ("inputs.settings.dtype", (_STR,)), ("inputs.settings.bootstrap", (_INT,)),
    ("inputs.settings.block", (_INT,)), ("inputs.settings.seed", (_INT,)),
    ("inputs.settings.threads", (_INT, "null")), ("inputs.recipes", (_LIST,)),
    ("recipes_resolved", (_LIST,)), ("versions", (_OBJ,)), ("reference", (_OBJ,)),
    ("reference.ppl", (_NUM,)), ("metrics", (_OBJ,)), ("telemetry", (_OBJ,)),
)
_SHAPE = {1: _SHAPE_V1, 2: _SHAPE_V1 + (("metric_definitions", (_OBJ,)),)}
_OPTIONAL = {1: (), 2: ("notes", "numerics", "noise")}

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class SpecSheetError(ValueError):
    """A spec sheet that cannot be read: not JSON, not an object, an unknown schema version, or
    a missing / wrongly typed field (the message names which, and what is accepted)."""


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return _INT
    if isinstance(v, float):
        return _NUM
    if isinstance(v, str):
        return _STR
    if isinstance(v, Mapping):
        return _OBJ
    if isinstance(v, list | tuple):
        return _LIST
    return type(v).__name__


def _accepts(kinds: tuple[str, ...], v: Any) -> bool:
    t = _json_type(v)
    return t in kinds or (t == _INT and _NUM in kinds) or (
        _NUM in kinds and isinstance(v, str) and v in _NONFINITE)


def _shape_problems(d: Mapping[str, Any], version: int) -> list[str]:
    """What is missing or of the wrong type in a sheet of ``version`` (empty: well formed)."""
    problems: list[str] = []
    for path, kinds in _SHAPE[version]:
        cur: Any = d
        parts = path.split(".")
        for i, part in enumerate(parts):
            if not isinstance(cur, Mapping):
                break  # the parent's problem is reported already
            if part not in cur:
                problems.append(f"missing {path!r}")
                break
            cur = cur[part]
            if i == len(parts) - 1 and not _accepts(kinds, cur):
                problems.append(f"{path!r} is {_json_type(cur)} {_short(cur)}, expected "
                                + " or ".join(kinds))
    for key in ("metrics", "telemetry", "metric_definitions"):
        sub = d.get(key)
        if isinstance(sub, Mapping):
            problems += [f"'{key}.{k}' is {_json_type(v)} {_short(v)}, expected object"
                         for k, v in sub.items() if not isinstance(v, Mapping)]
    for i, r in enumerate(d.get("recipes_resolved") or ()):
        if not isinstance(r, Mapping) or not isinstance(r.get("name"), str):
            problems.append(f"'recipes_resolved[{i}]' is not an object with a 'name'")
    if "notes" in d and (not isinstance(d["notes"], list)
                         or not all(isinstance(n, str) for n in d["notes"])):
        problems.append(f"'notes' is {_json_type(d['notes'])}, expected array of strings")
    return problems


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return f"({s[:40]}...)" if len(s) > 43 else f"({s})"


def _numbers(d: Mapping[str, Any]) -> dict[str, Any]:
    """A flat mapping with ``"nan"`` / ``"inf"`` / ``"-inf"`` read back as floats."""
    return {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in d.items()}


def json_safe(x: Any) -> Any:
    """``x`` with non-finite floats as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict
    JSON has no such numbers) and tuples as lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, Mapping):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def _v1_to_v2(d: Mapping[str, Any]) -> dict[str, Any]:
    from precisim import __version__

    from .metrics import BUILTIN_METRICS

    present = {k for rec in d["metrics"].values() for k in rec}
    out = dict(d)
    out[VERSION_KEY] = 2
    out["metric_definitions"] = {m.name: m.to_dict() for m in BUILTIN_METRICS
                                 if m.name in present}
    out["notes"] = [*d.get("notes", []),
                    f"converted from schema version 1 by precisim {__version__}: "
                    "metric_definitions added (the definitions of the built-in metrics it holds; "
                    "version 1 did not record them)"]
    return out


@dataclass(frozen=True)
class SpecSheet(Mapping[str, Any]):
    """A spec sheet (see the module docstring); :func:`precisim.eval.run_eval` returns one.

    It is also a read-only mapping with the JSON's top-level keys (``sheet["metrics"]`` is
    ``sheet.metrics``, ``sheet["precisim_spec_sheet"]`` is ``sheet.schema_version``).
    """

    content_hash: str
    inputs: dict[str, Any]
    recipes_resolved: list[dict[str, Any]]
    versions: dict[str, str]
    reference: dict[str, Any]
    metric_definitions: dict[str, dict[str, Any]]
    metrics: dict[str, dict[str, Any]]
    telemetry: dict[str, dict[str, float]]
    schema_version: int = SCHEMA_VERSION
    notes: tuple[str, ...] = ()
    #: the numeric environment of the run (:func:`precisim.eval.numerics.environment`, plus the
    #: world size and batch); absent in sheets written before reproducible mode
    numerics: dict[str, Any] | None = None
    #: the numerical-noise band of each recipe's metrics (:mod:`precisim.eval.noise`), if
    #: measured
    noise: dict[str, Any] | None = None
    #: top-level keys this version does not define, kept as they are
    extra: dict[str, Any] = field(default_factory=dict)

    __hash__ = None  # type: ignore[assignment]  # mutable contents

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise SpecSheetError(f"a SpecSheet is of schema version {SCHEMA_VERSION}, got "
                                 f"{self.schema_version!r}; read older sheets with "
                                 "SpecSheet.from_dict / SpecSheet.load, which convert them")
        object.__setattr__(self, "notes", tuple(self.notes))
        clash = set(self.extra) & (set(_FIELDS) | set(_OPTIONAL[SCHEMA_VERSION]))
        if clash:
            raise SpecSheetError(f"extra keys {sorted(clash)} are fields of the sheet")

    # -- the mapping view ----------------------------------------------------------------------
    def _items(self) -> dict[str, Any]:
        d = {k: getattr(self, a) for k, a in _FIELDS.items()}
        if self.notes:
            d["notes"] = list(self.notes)
        for k in ("numerics", "noise"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        d.update(self.extra)
        return d

    def __getitem__(self, key: str) -> Any:
        if key in _FIELDS:
            return getattr(self, _FIELDS[key])
        if key == "notes" and self.notes:
            return list(self.notes)
        if key in ("numerics", "noise") and getattr(self, key) is not None:
            return getattr(self, key)
        if key in self.extra:
            return self.extra[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    # -- conversion ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON object as plain Python values (a deep copy; non-finite floats kept)."""
        return copy.deepcopy(self._items())

    def to_json(self, indent: int | None = 2) -> str:
        """The JSON text (non-finite numbers as ``"nan"`` / ``"inf"`` / ``"-inf"``)."""
        return json.dumps(json_safe(self._items()), indent=indent)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically; returns the path."""
        from .store import write_atomic

        return write_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "spec sheet") -> SpecSheet:
        """A sheet from its JSON object, of any version in :data:`READABLE_VERSIONS` (older
        versions converted, with a note); :class:`SpecSheetError` names the version and what is
        accepted, or what is missing. ``source`` names the sheet in messages."""
        if isinstance(d, SpecSheet):
            return d
        accepted = ", ".join(map(str, READABLE_VERSIONS))
        if not isinstance(d, Mapping):
            raise SpecSheetError(f"{source} is {_json_type(d)}, not a JSON object; a precisim "
                                 f"spec sheet is an object with the keys {', '.join(_FIELDS)}")
        if VERSION_KEY not in d:
            raise SpecSheetError(f"{source} has no schema version (no key {VERSION_KEY!r}): is "
                                 f"it a precisim spec sheet? accepted versions: {accepted}")
        v = d[VERSION_KEY]
        if isinstance(v, bool) or not isinstance(v, int) or v not in READABLE_VERSIONS:
            from precisim import __version__

            newer = (" (written by a newer precisim? upgrade to read it)"
                     if isinstance(v, int) and not isinstance(v, bool) and v > SCHEMA_VERSION
                     else "")
            raise SpecSheetError(f"{source} has schema version {v!r}; precisim {__version__} "
                                 f"reads versions {accepted}{newer}")
        problems = _shape_problems(d, v)
        if problems:
            raise SpecSheetError(f"{source} (schema version {v}) is malformed: "
                                 + "; ".join(problems))
        if v == 1:
            d = _v1_to_v2(d)
        known = set(_FIELDS) | set(_OPTIONAL[2])
        return cls(
            content_hash=d["content_hash"], inputs=dict(d["inputs"]),
            recipes_resolved=list(d["recipes_resolved"]), versions=dict(d["versions"]),
            reference=_numbers(d["reference"]),
            metric_definitions={k: dict(x) for k, x in d["metric_definitions"].items()},
            metrics={k: _numbers(x) for k, x in d["metrics"].items()},
            telemetry={k: _numbers(x) for k, x in d["telemetry"].items()},
            notes=tuple(d.get("notes", ())),
            numerics=d.get("numerics"), noise=d.get("noise"),
            extra={k: x for k, x in d.items() if k not in known})

    @classmethod
    def from_json(cls, text: str, *, source: str = "spec sheet") -> SpecSheet:
        """A sheet from JSON text (see :meth:`from_dict`)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecSheetError(f"{source} is not valid JSON: {e}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | Path) -> SpecSheet:
        """Read a sheet file (see :meth:`from_dict`); FileNotFoundError when it is absent."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"spec sheet {str(p)!r} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SpecSheetError(f"cannot read spec sheet {str(p)!r}: {e}") from None
        return cls.from_json(text, source=f"spec sheet {str(p)!r}")


def as_sheet(sheet: SpecSheet | Mapping[str, Any] | str | Path) -> SpecSheet:
    """A :class:`SpecSheet` from a sheet, its JSON object, or the path of its file."""
    if isinstance(sheet, SpecSheet):
        return sheet
    if isinstance(sheet, Mapping):
        return SpecSheet.from_dict(sheet)
    if isinstance(sheet, str | Path):
        return SpecSheet.load(sheet)
    raise SpecSheetError(f"expected a SpecSheet, its JSON object or a file path, got "
                         f"{type(sheet).__name__}")
