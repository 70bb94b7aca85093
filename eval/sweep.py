"""Sweeps: a grid of models x datasets x recipes declared in YAML, run cell by cell into a
:class:`~precisim.eval.store.RunStore` so that a killed sweep resumes and loses no finished cell.

A sweep file::

    name: fp4-study                  # the sweep's name (records are grouped by it)
    models: [smollm2-135m]           # a list, or a single string
    recipes: [bf16, fp8, mxfp4, nvfp4]
    datasets: [wikitext2]
    params:                          # optional, passed to every cell
      tokens: 4096
      window: 512
      stride: 256
    cost:                            # optional: the modelled cost as a dimension
      coefficients: [horowitz-45nm, my-7nm.yaml]  # every record carries the cost under each
      max: {dp_energy: 0.35, bits_per_element: 8} # cells costing more are not evaluated

The cost section (docs/cost-perf.md section 4c) needs a ``cost(cell) -> {key: value}``
function (:func:`run_sweep`'s ``cost``; ``precisim sweep`` passes the datapath cost model's):
every cell is costed before the first one runs, cells above a ``max`` are left out (returned as
``{"key", "skipped", "cost"}`` records, never stored), and the others' records carry the cost
keys.

Several workers may share a sweep and its store (``precisim sweep`` started more than once,
on one host or on hosts sharing the file system): cells are claimed with expiring leases, so
none is evaluated twice and a killed worker's cell is taken over (:func:`run_sweep`).

The evaluation of one cell is injected (``evaluate_cell(cell) -> dict``), so this module knows
nothing about models; :func:`run_sweep` only orders, skips, times and stores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import RunStore

__all__ = ["COST_LIMITS", "Cell", "SweepError", "SweepSpec", "cost_filter", "latest_records",
           "load_sweep", "run_sweep"]

#: the keys a sweep file accepts (``params`` is optional)
SPEC_KEYS = ("name", "models", "recipes", "datasets", "params", "cost")
#: the keys of a sweep's ``cost`` section, and the costs ``max`` may bound
COST_KEYS = ("coefficients", "max")
COST_LIMITS = ("bits_per_element", "bits_a", "dp_energy", "dp_area")
REQUIRED_KEYS = ("name", "models", "recipes", "datasets")
AXES = ("models", "recipes", "datasets")

ParamValue = str | int | float | bool | None


class SweepError(ValueError):
    """A malformed sweep declaration."""


def _param_value(name: str, v: Any) -> ParamValue | tuple:
    """A hashable, JSON-compatible parameter value (lists become tuples)."""
    if v is None or isinstance(v, str | bool | int | float):
        return v
    if isinstance(v, list | tuple):
        return tuple(_param_value(name, x) for x in v)
    raise SweepError(f"params.{name}={v!r} is not valid: accepted a string, number, boolean, "
                     "null or a list of those")


def _axis(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise SweepError(f"{name} must be a list of names (or one name), got "
                         f"{type(value).__name__} {value!r}")
    if not value:
        raise SweepError(f"{name} is empty: give at least one name")
    out = []
    for v in value:
        if not isinstance(v, str) or not v.strip():
            raise SweepError(f"{name} holds {v!r}: every entry must be a non-empty string")
        out.append(v.strip())
    dups = sorted({v for v in out if out.count(v) > 1})
    if dups:
        raise SweepError(f"{name} lists {', '.join(map(repr, dups))} more than once")
    return tuple(out)


@dataclass(frozen=True)
class Cell:
    """One point of a sweep's grid: a model, a recipe and a dataset with the sweep's params."""

    sweep: str
    model: str
    recipe: str
    dataset: str
    params: tuple[tuple[str, Any], ...] = ()  #: sorted (name, value) pairs
    #: sorted (input, hash) pairs: the content of what the names point to (the recipe's
    #: definition, the data file, the model files); empty when the caller gives none
    content: tuple[tuple[str, str], ...] = ()

    @property
    def param_dict(self) -> dict[str, Any]:
        """The params as a dict (tuples shown as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.params}

    def names(self) -> dict[str, Any]:
        """The fields a person names the cell by (no content hashes)."""
        return {"sweep": self.sweep, "model": self.model, "recipe": self.recipe,
                "dataset": self.dataset, "params": self.param_dict}

    def identity(self) -> dict[str, Any]:
        """The fields that define the cell, as a JSON-compatible dict: its names and, when
        known, the content hashes of its inputs."""
        out = self.names()
        if self.content:
            out["content"] = dict(self.content)
        return out

    @property
    def key(self) -> str:
        """A stable key: ``sweep/model/recipe/dataset/<hash>``, the hash (sha256, 12 hex digits)
        of the canonical JSON of :meth:`identity`. Same cell, same key, in every run; a cell
        whose recipe, data or model changed (same names, other content) gets another key, so a
        stale result is never reused. Cells without content hashes keep the keys of stores
        written before content was hashed."""
        canon = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(canon.encode("utf-8")).hexdigest()[:12]
        return f"{self.sweep}/{self.model}/{self.recipe}/{self.dataset}/{digest}"

    def __str__(self) -> str:
        return f"{self.model} | {self.recipe} | {self.dataset}"


@dataclass(frozen=True)
class SweepSpec:
    """A sweep: the grid ``models x datasets x recipes`` and the params every cell gets."""

    name: str
    models: tuple[str, ...]
    recipes: tuple[str, ...]
    datasets: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise SweepError(f"name={self.name!r} is not valid: accepted a non-empty string")
        if "/" in self.name:
            raise SweepError(f"name={self.name!r} is not valid: it must not contain '/'")
        object.__setattr__(self, "name", self.name.strip())
        for axis in AXES:
            object.__setattr__(self, axis, _axis(axis, getattr(self, axis)))
        params = {} if self.params is None else self.params
        if not isinstance(params, Mapping):
            raise SweepError(f"params must be a mapping of name: value, got "
                             f"{type(params).__name__} {params!r}")
        for k in params:
            if not isinstance(k, str) or not k:
                raise SweepError(f"params has the key {k!r}: accepted non-empty strings")
        object.__setattr__(self, "params", {k: _param_value(k, v) for k, v in params.items()})
        object.__setattr__(self, "cost", _cost_section(self.cost))

    def cells(self) -> list[Cell]:
        """The grid in a deterministic order: model (slowest), then dataset, then recipe, so
        that each model and dataset is loaded once per run."""
        params = tuple(sorted(self.params.items()))
        return [Cell(self.name, m, r, d, params)
                for m, d, r in itertools.product(self.models, self.datasets, self.recipes)]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "sweep") -> SweepSpec:
        """A spec from a mapping with the keys of :data:`SPEC_KEYS` (``params`` optional)."""
        if not isinstance(d, Mapping):
            raise SweepError(f"{source}: expected a mapping with keys {', '.join(SPEC_KEYS)}, "
                             f"got {type(d).__name__}")
        unknown = [k for k in d if k not in SPEC_KEYS]
        if unknown:
            raise SweepError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"accepted {', '.join(SPEC_KEYS)}")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise SweepError(f"{source}: missing key(s) {', '.join(map(repr, missing))}; "
                             f"required {', '.join(REQUIRED_KEYS)}")
        try:
            return cls(name=d["name"], models=d["models"], recipes=d["recipes"],
                       datasets=d["datasets"], params=d.get("params") or {},
                       cost=d.get("cost") or {})
        except SweepError as exc:
            raise SweepError(f"{source}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepSpec:
        """A spec from a YAML file (see the module docstring for the layout)."""
        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SweepError(f"sweep file {str(path)!r} does not exist") from None
        except OSError as exc:
            raise SweepError(f"cannot read sweep file {str(path)!r}: {exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SweepError(f"{path}: malformed YAML: {exc}") from None
        if data is None:
            raise SweepError(f"{path}: the file is empty; expected the keys "
                             f"{', '.join(SPEC_KEYS)}")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The spec as a YAML/JSON-compatible dict (``from_dict`` reads it back)."""
        out = {"name": self.name, "models": list(self.models), "recipes": list(self.recipes),
               "datasets": list(self.datasets),
               "params": {k: list(v) if isinstance(v, tuple) else v
                          for k, v in self.params.items()}}
        if self.cost:
            out["cost"] = {k: list(v) if isinstance(v, tuple) else dict(v)
                           for k, v in self.cost.items()}
        return out


def _cost_section(c: Any) -> dict[str, Any]:
    """The validated ``cost`` section: ``coefficients`` (names or files, a tuple) and ``max``
    (cost key -> positive number)."""
    if c is None:
        return {}
    if not isinstance(c, Mapping):
        raise SweepError(f"cost must be a mapping with keys {', '.join(COST_KEYS)}, got "
                         f"{type(c).__name__} {c!r}")
    bad = [k for k in c if k not in COST_KEYS]
    if bad:
        raise SweepError(f"cost: unknown key(s) {', '.join(map(repr, bad))}; accepted "
                         f"{', '.join(COST_KEYS)}")
    out: dict[str, Any] = {}
    if "coefficients" in c:
        out["coefficients"] = _axis("cost.coefficients", c["coefficients"])
    if "max" in c:
        m = c["max"]
        if not isinstance(m, Mapping) or not m:
            raise SweepError(f"cost.max={m!r} is not valid: accepted a mapping of "
                             f"{', '.join(COST_LIMITS)} to numbers")
        for k, v in m.items():
            if k not in COST_LIMITS:
                raise SweepError(f"cost.max: unknown cost {k!r}; accepted "
                                 f"{', '.join(COST_LIMITS)}")
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise SweepError(f"cost.max.{k}={v!r} is not valid: accepted a positive number")
        out["max"] = {k: float(v) for k, v in m.items()}
    return out


def cost_filter(spec: SweepSpec, costs: Mapping[str, Any]) -> str | None:
    """Why a cell of ``spec`` with modelled ``costs`` is left out (its first cost above the
    spec's ``cost.max``), or None when it is evaluated. A bounded cost the cell lacks (e.g. no
    datapath cost for a high-precision recipe) does not exclude it."""
    for k, limit in spec.cost.get("max", {}).items():
        v = costs.get(k)
        if v is not None and v > limit:
            return f"modelled {k} {v:.4g} > cost.max {limit:g}"
    return None


def load_sweep(spec: SweepSpec | Mapping[str, Any] | str | Path) -> SweepSpec:
    """A :class:`SweepSpec` from a spec, a dict or a YAML file path."""
    if isinstance(spec, SweepSpec):
        return spec
    if isinstance(spec, Mapping):
        return SweepSpec.from_dict(spec)
    return SweepSpec.from_yaml(spec)


def run_sweep(
    spec: SweepSpec | Mapping[str, Any] | str | Path,
    store: RunStore | str | Path,
    evaluate_cell: Callable[[Cell], Mapping[str, Any]],
    *,
    progress: bool = True,
    on_error: str = "raise",
    content: Callable[[Cell], Mapping[str, str]] | None = None,
    worker: str | None = None,
    lease: float = 120.0,
    poll: float = 5.0,
    cost: Callable[[Cell], Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run every cell of ``spec`` not yet in ``store``; return the records of all its cells.

    Cells already stored (same :attr:`Cell.key`) are skipped. The others run one at a time, in
    :meth:`SweepSpec.cells` order; each record is written to the store (one committed
    transaction) as soon as its cell finishes, so a sweep killed at any point loses no finished
    cell and re-running it resumes where it stopped.

    Args:
        spec: the sweep (a spec, a dict, or a YAML path).
        store: a :class:`RunStore` or the path of one.
        evaluate_cell: ``evaluate_cell(cell) -> dict`` of JSON-serialisable results. The stored
            record is the cell's identity (``sweep, model, recipe, dataset, params`` and
            ``key``, which win over the same names in the result), the result's fields, and
            ``elapsed_s`` (the cell's wall time, unless the result has one).
        progress: show a tqdm progress bar (on stderr).
        on_error: ``"raise"`` (default): an exception in a cell stops the sweep (earlier cells
            are kept); ``"skip"``: the cell is left out of the store (a re-run retries it) and
            the sweep goes on; the error is reported on the progress bar and in the returned
            list as ``{"key", "error"}``-only records at the end.
        content: ``content(cell) -> {input: hash}``, the content hashes of a cell's inputs
            (recipe definition, data, model files), made part of its key. It is called for
            every cell before the first one runs, so it also validates the whole grid: an
            exception there stops the sweep before any work (nothing is stored).
        worker: this worker's name in the store's leases (default ``host:pid``).
        lease: seconds a cell's lease lasts; renewed every ``lease / 3`` seconds while its cell
            runs, so it expires only when the worker is killed (or hangs with the GIL held).
        poll: seconds between looks at cells other workers hold.
        cost: ``cost(cell) -> {key: value}``, the cell's modelled cost (cheap: no evaluation),
            called for every cell before the first one runs; its keys are added to the cell's
            record, and cells above the spec's ``cost.max`` (:func:`cost_filter`) are left out
            (returned as ``{"key", "skipped", "cost"}`` records, never stored).

    **Several workers** (processes, on one host or sharing the store's file system) may run
    the same sweep on the same store at once: each claims a cell before evaluating it
    (:meth:`RunStore.claim`), so no cell is evaluated by two workers at once nor stored twice;
    a worker that finds every remaining cell claimed waits for them, and takes over the cell
    of a killed worker when its lease expires. Every worker returns every cell's record.

    Returns:
        The stored records of the spec's cells, in cells() order (plus error entries).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r} is not valid: accepted 'raise', 'skip'")
    if not callable(evaluate_cell):
        raise TypeError("evaluate_cell must be callable (cell) -> dict")
    for name, v in (("lease", lease), ("poll", poll)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name}={v!r} is not valid: accepted a positive number of seconds")
    if worker is not None and (not isinstance(worker, str) or not worker):
        raise ValueError(f"worker={worker!r} is not valid: accepted a non-empty string")
    spec = load_sweep(spec)
    cells = spec.cells()
    if content is not None:
        cells = [_with_content(c, content(c)) for c in cells]
    if spec.cost and cost is None:
        raise ValueError(f"sweep {spec.name!r} has a cost section: run_sweep needs cost=")
    costs: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, Any]] = []
    if cost is not None:
        kept = []
        for c in cells:
            cc = dict(cost(c))
            why = cost_filter(spec, cc)
            if why is None:
                costs[c.key] = cc
                kept.append(c)
            else:
                skipped.append({"key": c.key, "skipped": why, "cost": cc})
        cells = kept
    if costs:
        inner = evaluate_cell

        def evaluate_cell(cell: Cell) -> Mapping[str, Any]:
            return {**inner(cell), **costs[cell.key]}
    own_store = not isinstance(store, RunStore)
    st = RunStore(store) if own_store else store
    try:
        return _run(spec, cells, st, evaluate_cell, progress, on_error, worker, lease,
                    poll) + skipped
    finally:
        if own_store:
            st.close()


def _with_content(cell: Cell, hashes: Mapping[str, str]) -> Cell:
    if not isinstance(hashes, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()):
        raise TypeError(f"content({cell}) must return a dict of str -> str, got {hashes!r}")
    return dataclasses.replace(cell, content=tuple(sorted(hashes.items())))


def _run(spec: SweepSpec, cells: list[Cell], store: RunStore,
         evaluate_cell: Callable[[Cell], Mapping[str, Any]], progress: bool,
         on_error: str, worker: str | None, lease: float, poll: float
         ) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    todo = [c for c in cells if not store.has(c.key)]
    if todo and any(c.content for c in todo):
        named = {json.dumps(_names(r), sort_keys=True) for r in store.records(spec.name)}
        stale = [c for c in todo if json.dumps(c.names(), sort_keys=True) in named]
        if stale and progress:
            import sys

            print(f"{spec.name}: {len(stale)} stored cell(s) were computed from other inputs "
                  "(recipe, data or model changed since); they are evaluated again",
                  file=sys.stderr)
    errors: list[dict[str, Any]] = []
    owner = worker or f"{socket.gethostname()}:{os.getpid()}"
    pending = list(todo)
    with tqdm(total=len(cells), initial=len(cells) - len(todo), desc=spec.name, unit="cell",
              disable=not progress, dynamic_ncols=True) as bar:
        while pending:
            waiting = []
            for cell in pending:
                if store.has(cell.key):  # finished by another worker
                    bar.update(1)
                    continue
                if not store.claim(cell.key, owner, lease=lease):
                    waiting.append(cell)  # another worker holds it
                    continue
                bar.set_postfix_str(str(cell), refresh=True)
                t0 = time.perf_counter()
                try:
                    with _Heartbeat(store.path, cell.key, owner, lease):
                        result = evaluate_cell(cell)
                    if not isinstance(result, Mapping):
                        raise TypeError(f"evaluate_cell returned {type(result).__name__} for "
                                        f"{cell.key}; expected a dict")
                except BaseException as exc:
                    store.release(cell.key, owner)  # others may take it at once
                    if on_error == "raise" or not isinstance(exc, Exception):
                        raise
                    errors.append({"key": cell.key, "error": f"{type(exc).__name__}: {exc}"})
                    bar.write(f"cell {cell.key} failed: {type(exc).__name__}: {exc}")
                    bar.update(1)
                    continue
                ident = cell.identity()
                record = {**ident, "key": cell.key,
                          **{k: v for k, v in result.items() if k not in ident and k != "key"}}
                record.setdefault("elapsed_s", round(time.perf_counter() - t0, 6))
                store.put(cell.key, record, sweep=spec.name)  # (ends the lease)
                bar.update(1)
            if waiting:  # until their workers store them or their leases expire
                bar.set_postfix_str(f"waiting for {len(waiting)} cell(s) of other workers",
                                    refresh=True)
                time.sleep(min(poll, lease / 4))
            pending = waiting
    records = [r for r in (store.get(c.key) for c in cells) if r is not None]
    return records + errors


class _Heartbeat:
    """Renews a cell's lease every ``lease / 3`` seconds from a thread (with its own SQLite
    connection) while the cell is evaluated."""

    def __init__(self, path: Path, key: str, owner: str, lease: float) -> None:
        self.args = (path, key, owner, lease)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="precisim-lease", daemon=True)

    def _beat(self) -> None:
        path, key, owner, lease = self.args
        with RunStore(path) as st:
            while not self.stop.wait(lease / 3):
                st.renew(key, owner, lease=lease)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _names(record: Mapping[str, Any]) -> dict[str, Any]:
    """The naming fields of a stored record (see :meth:`Cell.names`)."""
    return {k: record.get(k) for k in ("sweep", "model", "recipe", "dataset", "params")}


def latest_records(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The newest record of every cell name (sweep, model, recipe, dataset, params), in store
    order, and how many older ones (computed from other inputs) were left out."""
    last: dict[str, int] = {}
    for i, r in enumerate(records):
        last[json.dumps(_names(r), sort_keys=True, default=str)] = i
    keep = sorted(last.values())
    return [records[i] for i in keep], len(records) - len(keep)
