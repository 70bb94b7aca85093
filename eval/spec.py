"""Evaluation runs, machine-readable spec sheets and the vendor spec table.

:func:`run_eval` evaluates a model on a text under several recipes (the metrics of
:mod:`precisim.eval.metrics`: perplexity, KL, top-1 with paired-bootstrap CIs, telemetry
rates...) and returns a **spec sheet** (:class:`~precisim.eval.sheet.SpecSheet`) that records
exactly what was emulated (model source and file hash, data source and text hash, token budget,
windows, every recipe in full with its resolved formats and matrix units, bootstrap settings,
threads, library versions) with a ``content_hash`` over those inputs, plus the metrics and their
definitions. ``run_eval(EvalConfig.from_sheet(sheet))`` re-runs it, and :func:`compare_metrics`
checks that the metrics are reproduced exactly (CPU runs are deterministic at a fixed thread
count).

:func:`vendor_rows` turns a sheet into the table a co-design team hands a chip vendor: per
recipe the element formats and encodings, scale format and rule, rounding, overflow and
subnormal policies, matrix-unit parameters, the cost axis (bits per element incl. scales,
weight / KV-cache memory relative to bf16, accumulator width) and the accuracy (the metrics the
sheet's definitions put in the vendor table: ppl, delta with CI, KL, top-1, saturation rates).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from precisim.emulation import OP_KINDS, Recipe, TensorSpec, get_recipe, get_unit
from precisim.emulation.presets import unit_from_dict, unit_to_dict
from precisim.formats import IntFormat
from precisim.formats.scaling import ScaledFormat

from .distributed import current as current_group
from .metrics import definitions, resolve_metrics, table_cells, table_columns
from .noise import noise_band
from .numerics import environment
from .sheet import SCHEMA_VERSION, SpecSheet, SpecSheetError, as_sheet

__all__ = ["EvalConfig", "SpecSheet", "compare_metrics", "content_hash", "run_eval",
           "vendor_columns", "vendor_rows", "write_outputs", "VENDOR_COLUMNS"]

#: the schema version of the sheets :func:`run_eval` returns (see :mod:`precisim.eval.sheet`)
SHEET_VERSION = SCHEMA_VERSION


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: the bootstrap block length by default (at most a quarter of the tokens evaluated)
DEFAULT_BLOCK = 32


@dataclass(frozen=True)
class EvalConfig:
    """Everything that determines an evaluation's numbers."""

    model: str
    data: str
    recipes: tuple[str | Recipe | dict[str, Any], ...]
    tokens: int | None = 4096
    window: int = 1024
    stride: int | None = None
    fidelity: str | None = None  # override every matrix unit's fidelity
    dtype: str = "float32"
    bootstrap: int = 1000
    block: int = 32  # DEFAULT_BLOCK
    seed: int = 0
    threads: int | None = None
    #: the metrics to compute (names in :data:`~precisim.eval.metrics.METRICS`; None: every
    #: registered one). Not part of the content hash: it selects what is reported, not how
    #: any number comes out.
    metrics: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        """Every setting is checked here (type and range, naming the bad one), so that a bad
        configuration fails before a model is loaded or any window evaluated."""
        for name in ("model", "data"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{name}={v!r} is not valid: accepted a non-empty string")
        if isinstance(self.recipes, str | Recipe | dict) or not isinstance(
                self.recipes, tuple | list):
            raise ValueError(f"recipes={self.recipes!r} is not valid: accepted a tuple of "
                             "recipe names, files, Recipe objects or dicts")
        object.__setattr__(self, "recipes", tuple(self.recipes))
        for r in self.recipes:
            if not isinstance(r, str | Recipe | dict):
                raise ValueError(f"recipes holds {r!r} ({type(r).__name__}): accepted recipe "
                                 "names, files, Recipe objects or dicts")
        _check_setting("tokens", self.tokens, 1, none_ok=True)
        _check_setting("window", self.window, 1)
        _check_setting("stride", self.stride, 1, hi=self.window, none_ok=True,
                       hint=" (at most the window)")
        if self.fidelity is not None and self.fidelity not in ("bit-exact", "fast"):
            raise ValueError(f"fidelity={self.fidelity!r} is not valid: accepted 'bit-exact', "
                             "'fast' or None")
        if not isinstance(self.dtype, str):
            raise ValueError(f"dtype={self.dtype!r} is not valid: accepted float32, bfloat16, "
                             "float16")
        from precisim.emulation.loader import LoadError, check_dtype

        try:
            check_dtype(self.dtype)
        except LoadError as e:
            raise ValueError(str(e)) from None
        _check_setting("bootstrap", self.bootstrap, 0, hi=1_000_000)
        _check_setting("block", self.block, 1)
        _check_setting("seed", self.seed, 0, hi=2**63 - 1)
        _check_setting("threads", self.threads, 1, hi=4096, none_ok=True)
        if self.metrics is not None:
            if isinstance(self.metrics, str) or not all(isinstance(m, str)
                                                        for m in self.metrics):
                raise ValueError(f"metrics={self.metrics!r} is not valid: accepted a tuple of "
                                 "metric names or None")
            object.__setattr__(self, "metrics", tuple(self.metrics))

    def resolved_recipes(self) -> list[Recipe]:
        out = []
        for r in self.recipes:
            rec = Recipe.from_dict(r) if isinstance(r, dict) else get_recipe(r)
            if self.fidelity is not None:
                rec = rec.with_fidelity(self.fidelity)
            out.append(rec)
        names = [r.name for r in out]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"recipe names must be unique, repeated: {', '.join(sorted(dup))}")
        return out

    def resolved_metrics(self) -> tuple[str, ...]:
        """The names of the metrics to compute (with those they require); raises the metric
        registry's error on an unknown name."""
        return tuple(m.name for m in resolve_metrics(self.metrics))

    @classmethod
    def from_sheet(cls, sheet: SpecSheet | Mapping[str, Any] | str | Path) -> EvalConfig:
        """The configuration recorded in a spec sheet (a :class:`SpecSheet`, its JSON object or
        its file; any readable schema version), computing the metrics it defines."""
        sh = as_sheet(sheet)
        inp = sh.inputs
        s = inp["settings"]
        return cls(model=inp["model"]["source"], data=inp["data"]["source"],
                   recipes=tuple(inp["recipes"]),
                   tokens=s["tokens"], window=s["window"], stride=s["stride"],
                   fidelity=None, dtype=s["dtype"], bootstrap=s["bootstrap"],
                   block=s["block"], seed=s["seed"], threads=s["threads"],
                   metrics=tuple(sh.metric_definitions))


def _check_setting(name: str, v: Any, lo: int, *, hi: int | None = None,
                   none_ok: bool = False, hint: str = "") -> None:
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name}={v!r} is not valid: accepted an integer {rng}{hint}"
                         + (" or null" if none_ok else ""))


def effective_block(block: int, n_tokens: int) -> int:
    """The bootstrap block length used for ``n_tokens`` tokens: ``block``, at most a quarter of
    the tokens (and at least 1)."""
    return max(1, min(block, n_tokens // 4 or 1))


# ---------------------------------------------------------------------------------------------
# fingerprints of the inputs (sweep cells are keyed by them)

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (memoised per path, size and modification time)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = _sha256_file(p)
    return _FILE_HASHES[key]


def model_fingerprint(source: str) -> str:
    """A hash of what ``source`` loads: the GGUF file's bytes, or every file of a model
    directory (names and bytes); a hub id that is not a local path is its name (``hub:``).
    Raises :class:`~precisim.emulation.LoadError` for a source that cannot be a model."""
    from precisim.emulation.loader import resolve_model_path

    path = resolve_model_path(source)
    if path is None:
        return f"hub:{source}"
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)):
        h.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def recipe_fingerprint(recipe: Recipe) -> str:
    """sha256 of a recipe's full content (its canonical JSON), not of its name."""
    return hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def content_hash(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a sheet's inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def _format_info(spec: TensorSpec | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    f = spec.resolve()
    d: dict[str, Any] = {"spec": spec.to_dict(), "rounding": spec.rounding,
                         "overflow": spec.overflow,
                         "subnormals": "flushed" if spec.flush_subnormals else "kept"}
    if isinstance(f, ScaledFormat):
        d["element"] = f.element.properties()
        d["scale"] = {"format": f.scale.name, "rule": f.rule.value,
                      "granularity": f.granularity.name,
                      "tensor_scale": "fp32" if f.tensor_scale else None}
        d["bits_per_element"] = f.bits_per_element
    else:
        d["element"] = f.properties()
        d["bits_per_element"] = float(f.bits)
    return d


#: the op kinds of the units beyond the GEMM that a spec sheet describes
DATAPATH_KINDS = ("softmax", "normalization", "activation", "glu", "residual")


def _recipe_info(r: Recipe, model: torch.nn.Module | None = None) -> dict[str, Any]:
    lin = r.linear
    att = r.attention
    info: dict[str, Any] = {"name": r.name, "description": r.description,
                            "recipe": r.to_dict(), "bits_per_element": r.bits_per_element()}
    if lin is not None:
        info["linear"] = {role: _format_info(getattr(lin, role))
                          for role in ("input", "weight", "output")}
    if att is not None:
        info["attention"] = {k: (None if getattr(att, k) is None else
                                 {role: _format_info(getattr(getattr(att, k), role))
                                  for role in ("input", "weight")}) for k in ("qk", "pv")}
        info["kv_cache"] = _format_info(att.kv_cache)
    info["units"] = {u.name: {"summary": u.summary(), "description": u.description,
                              "params": unit_to_dict(u)} for u in r.matrix_units()}
    info["cost"] = _cost_info(r, model)
    # the units beyond the GEMM (docs/arithmetic.md sections 7.8, 7.9), where the recipe names
    # them (the one-rounding kinds glu / residual are labelled, their spec is a bare format)
    dp = {k: (f"{k} {r.spec(k).describe()}" if k in ("glu", "residual")
              else r.spec(k).describe()) for k in DATAPATH_KINDS
          if k in OP_KINDS and r.spec(k) is not None}
    if dp:
        info["datapath"] = dp
    return info


def _cost_info(r: Recipe, model: torch.nn.Module | None = None) -> dict[str, Any] | None:
    """The modelled datapath cost of a recipe's linear GEMMs (precisim.eval.cost,
    docs/cost-perf.md section 4), or None when the linear layers stay in high precision. A
    recipe with rules, given the model, is priced per module (each module's spec weighted by
    its products per token, :func:`~precisim.eval.cost.recipe_module_cost`); otherwise its
    default linear spec is."""
    from .cost import MODEL_NOTE, recipe_cost, recipe_module_cost

    if r.rules and model is not None:
        rc = recipe_module_cost(r, model)
        if rc is not None:
            coeffs = rc.by_spec[0][2].datapath.coefficients.name
            return {"energy": rc.energy, "area": rc.area, "datapath": rc.describe(),
                    "bits": rc.bits, "coefficients": coeffs, "note": MODEL_NOTE,
                    "priced": "per module (rules resolved, MAC-weighted)"}
    g = recipe_cost(r)
    if g is None:
        return None
    return {"energy": g.energy, "area": g.area, "datapath": g.datapath.description,
            "bits": g.bits, "coefficients": g.datapath.coefficients.name, "note": MODEL_NOTE}


def _row_cost(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """A recipe's cost from its sheet entry; sheets written before the cost model get it from
    the recorded recipe (None when that cannot be rebuilt)."""
    if "cost" in info:
        return info["cost"]
    try:
        return _cost_info(Recipe.from_dict(info["recipe"]))
    except (KeyError, TypeError, ValueError):
        return None


def _model_info(source: str, dtype: str) -> dict[str, Any]:
    from precisim.emulation.loader import SMOLLM2_ALIASES, smollm2_gguf

    d: dict[str, Any] = {"source": source, "dtype": dtype}
    p = smollm2_gguf() if source.lower() in SMOLLM2_ALIASES else Path(source)
    if p.is_file():
        d["file"] = p.name
        d["sha256"] = _sha256_file(p)
    return d


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("precisim", "transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def run_eval(cfg: EvalConfig, *, progress: bool = False, model_and_tokenizer: Any = None,
             batch: int = 1, noise: int = 0) -> SpecSheet:
    """Evaluate ``cfg`` and return its spec sheet (see the module docstring).

    Everything that can fail on bad input (model, data, recipes, settings) is checked before the
    long part starts; nothing is written here (see :func:`write_outputs`). In a
    torch.distributed group the windows are shared out (:mod:`.distributed`; every rank returns
    the same sheet). The sheet records the numeric environment (:mod:`.numerics`); ``noise``
    > 0 also measures each metric's numerical-noise band with that many perturbed summation
    orders (:mod:`.noise`; ``noise`` more evaluations).
    """
    from precisim.emulation import load_model

    from .data import load_text, prefix_token, tokenize
    from .perplexity import evaluate, rolling_windows

    recipes = cfg.resolved_recipes()
    if not recipes:
        raise ValueError("no recipes to evaluate")
    metrics = resolve_metrics(cfg.metrics)
    rolling_windows(1, cfg.window, cfg.stride)  # validates window / stride
    text = load_text(cfg.data)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model, tok = model_and_tokenizer or load_model(cfg.model, dtype=cfg.dtype)
    ids = tokenize(tok, text.text, cfg.tokens)
    prefix = prefix_token(tok)
    block = effective_block(cfg.block, len(ids))
    if block != cfg.block and cfg.block != DEFAULT_BLOCK:  # (the default adapts quietly)
        import warnings

        warnings.warn(f"block={cfg.block} is longer than a quarter of the {len(ids)} tokens "
                      f"evaluated: the bootstrap uses blocks of {block} tokens (the spec sheet "
                      "records the block used)", UserWarning, stacklevel=2)
    grp = current_group()
    res = evaluate(model, ids, recipes, window=cfg.window, stride=cfg.stride,
                   prefix_token=prefix, bootstrap=cfg.bootstrap, block=block,
                   seed=cfg.seed, progress=progress and grp.rank == 0, metrics=metrics,
                   batch=batch, group=grp)
    inputs = {
        "model": _model_info(cfg.model, cfg.dtype),
        "data": {"source": cfg.data, "text_sha256": text.sha256,
                 "tokens_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()},
        "settings": {"tokens": cfg.tokens, "tokens_evaluated": len(ids), "window": cfg.window,
                     "stride": cfg.stride, "prefix_token": prefix, "dtype": cfg.dtype,
                     "bootstrap": cfg.bootstrap, "block": block, "seed": cfg.seed,
                     "threads": cfg.threads,  # (as asked: what ran is in the numerics)
                     "semantics": "rolling log-likelihood (lm-evaluation-harness)"},
        "recipes": [r.to_dict() for r in recipes],
    }
    return SpecSheet(
        content_hash=content_hash(inputs),
        inputs=inputs,
        recipes_resolved=[_recipe_info(r, model) for r in recipes],
        versions=_versions(),
        reference={"ppl": res.ref_ppl, "seconds": res.ref_seconds},
        metric_definitions=definitions(res.metrics_used),
        metrics={r.recipe.name: r.metrics for r in res.results},
        telemetry={r.recipe.name: r.telemetry for r in res.results},
        numerics={**environment(), "world_size": grp.world_size, "batch": batch},
        noise=None if not noise else noise_band(
            model, ids, recipes, seeds=noise, window=cfg.window, stride=cfg.stride,
            prefix_token=prefix, baseline=res),
    )


def _same(x: Any, y: Any) -> bool:
    """Equal, counting NaN equal to NaN (a sheet read back holds NaN where it wrote "nan")."""
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return bool(x == y)


def compare_metrics(a: SpecSheet | Mapping[str, Any], b: SpecSheet | Mapping[str, Any]
                    ) -> list[str]:
    """Differences between two sheets' accuracy metrics (timings ignored); [] = reproduced.

    The sheets may be :class:`SpecSheet` objects or their JSON objects (any readable version).
    """
    sa, sb = as_sheet(a), as_sheet(b)
    diffs = []
    if sa.content_hash != sb.content_hash:
        diffs.append(f"content hash {sa.content_hash} != {sb.content_hash}")
    ma, mb = sa.metrics, sb.metrics
    for name in sorted(set(ma) | set(mb)):
        ra, rb = ma.get(name, {}), mb.get(name, {})
        for k in sorted(set(ra) | set(rb)):
            if k == "seconds":  # timings are not reproduced
                continue
            if not _same(ra.get(k), rb.get(k)):
                diffs.append(f"{name}.{k}: {ra.get(k)} != {rb.get(k)}")
    return diffs


# ---------------------------------------------------------------------------------------------
# vendor table

#: the vendor table's columns that describe a recipe (its metrics' columns follow)
DESIGN_COLUMNS: list[tuple[str, str] | tuple[str, str, str]] = [
    ("recipe", "recipe"), ("weights", "weights"), ("activations", "activations"),
    ("attention", "attention QK/PV"), ("kv_cache", "KV cache"), ("scale", "scale (rule)"),
    ("rounding", "rounding"), ("overflow", "overflow / subnormals"),
    ("unit", "matrix unit"), ("acc_bits", "accumulator"),
    ("bits_w", "bits/elem W"), ("bits_a", "bits/elem A"), ("mem_w", "W mem vs bf16"),
    ("mem_kv", "KV mem vs bf16"),
]
#: shown after :data:`DESIGN_COLUMNS` when a recipe of the sheet names the units beyond the GEMM
DATAPATH_COLUMN = ("datapath", "softmax / norm / activation / glu / residual")

#: modelled, not measured (precisim.eval.cost, docs/cost-perf.md): the linear layers' GEMM
#: datapath per product, relative to a bf16 multiply with fp32 accumulation. Shown for sheets
#: that record it (written since the cost model); the tables of older sheets stay as they were
#: (their rows still carry ``dp_energy`` / ``dp_area``, computed from the recorded recipes).
COST_COLUMNS: list[tuple[str, str, str]] = [
    ("dp_energy", "datapath energy/MAC (model)", ".3g"),
    ("dp_area", "datapath area/MAC (model)", ".3g"),
]


def vendor_columns(sheet: SpecSheet | Mapping[str, Any] | None = None
                   ) -> list[tuple[str, str] | tuple[str, str, str]]:
    """The vendor table's columns: :data:`DESIGN_COLUMNS`, the datapath column (when a recipe of
    the sheet names units beyond the GEMM), :data:`COST_COLUMNS` (when the sheet records the
    modelled cost, or for None), then the ``(key, label, format)`` columns of the metrics the
    vendor table shows, as a sheet defines them (None: as the registered metrics do)."""
    if sheet is None:
        return [*DESIGN_COLUMNS, *COST_COLUMNS, *table_columns("vendor", None)]
    sh = as_sheet(sheet)
    cost = any("cost" in info for info in sh.recipes_resolved)
    dp = any(i.get("datapath") for i in sh.recipes_resolved)
    return [*DESIGN_COLUMNS, *([DATAPATH_COLUMN] if dp else []),
            *(COST_COLUMNS if cost else []), *table_columns("vendor", sh.metric_definitions)]


class _VendorColumns(Sequence[tuple[str, ...]]):
    """A live view of :func:`vendor_columns` of the registered metrics."""

    def __getitem__(self, i: Any) -> Any:
        return vendor_columns()[i]

    def __len__(self) -> int:
        return len(vendor_columns())

    def __repr__(self) -> str:
        return f"VENDOR_COLUMNS({vendor_columns()!r})"


#: the vendor table's columns for the registered metrics (a live view: a metric registered later
#: appears in it); ``vendor_columns(sheet)`` gives those of a sheet's metrics
VENDOR_COLUMNS: Sequence[tuple[str, ...]] = _VendorColumns()


def _fmt_name(info: dict[str, Any] | None) -> str:
    if info is None:
        return "model dtype"
    e = info["element"]
    if "exp_bits" in e:
        enc = f"E{e['exp_bits']}M{e['man_bits']}"
        special = "" if e["inf"] == "none" and e["nan"] == "none" else \
            f", inf {e['inf']}, NaN {e['nan']}"
        body = f"{enc} (bias {e['bias']}{special})"
    else:
        body = f"INT{e['bits']}" + (f" (2^-{e['frac_bits']})" if e.get("frac_bits") else "")
    sc = info.get("scale")
    if sc:
        body += f" / {sc['format']} per {sc['granularity']}"
        if sc.get("tensor_scale"):
            body += " + fp32 tensor scale"
    return body


def _unit_cell(info: dict[str, Any]) -> tuple[str, str]:
    units = info.get("units", {})
    if not units:
        return "fp32 matmul of dequantized operands", "fp32 (24-bit significand)"
    name, u = next(iter(units.items()))
    unit = unit_from_dict(u["params"]) if "params" in u else get_unit(name)
    acc = unit.acc_format
    bits = f"{acc.name}" if isinstance(acc, IntFormat) else \
        f"{acc.name} ({acc.man_bits + 1}-bit significand)"
    if unit.alignment_bits is not None:
        bits += f"; {unit.alignment_bits} fraction bits after alignment"
    if unit.block_result_bits is not None:
        bits += f"; block result {unit.block_result_bits} bits"
    if unit.promotion_interval:
        bits += f"; fp32 promotion every {unit.promotion_interval}"
    return u["summary"], bits


def vendor_rows(sheet: SpecSheet | Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per recipe of a spec sheet, with the columns of :func:`vendor_columns` (and every
    metric of the sheet, with its interval bounds)."""
    sheet = as_sheet(sheet)
    rows = []
    for i, info in enumerate(sheet.recipes_resolved):
        try:
            rows.append(_vendor_row(sheet, info))
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
            what = info.get("name", i) if isinstance(info, Mapping) else i
            raise SpecSheetError(f"spec sheet: recipes_resolved entry {what!r} is malformed: "
                                 f"a field is missing or of the wrong type ({type(e).__name__}"
                                 f": {e})") from None
    return rows


def _vendor_row(sheet: SpecSheet, info: Mapping[str, Any]) -> dict[str, Any]:
    name = info["name"]
    m = sheet.metrics.get(name, {})
    lin = info.get("linear") or {}
    att = info.get("attention") or {}
    w, a = lin.get("weight"), lin.get("input")
    qk = (att.get("qk") or {}).get("input")
    scales = sorted({f"{x['scale']['format']} ({x['scale']['rule']})"
                     for x in (w, a, qk) if x and x.get("scale")})
    roundings = sorted({x["rounding"] for x in (w, a, qk) if x})
    ovf = sorted({f"{x['overflow']} / {x['subnormals']}" for x in (w, a, qk) if x})
    unit, acc = _unit_cell(info)
    cost = _row_cost(info) or {}
    bpe = info["bits_per_element"]
    kv_bits = bpe.get("kv_cache")
    return {
        "recipe": name, "weights": _fmt_name(w), "activations": _fmt_name(a),
        "attention": _fmt_name(qk) if att.get("qk") else "model dtype",
        "kv_cache": _fmt_name(info.get("kv_cache")) if info.get("kv_cache") else
        ("as attention operands" if att.get("qk") else "model dtype"),
        "scale": "; ".join(scales) or "-", "rounding": ", ".join(roundings) or "-",
        "overflow": ", ".join(ovf) or "-", "unit": unit, "acc_bits": acc,
        "bits_w": bpe.get("weight") or 32.0, "bits_a": bpe.get("input") or 32.0,
        "mem_w": (bpe.get("weight") or 32.0) / 16, "mem_kv": (kv_bits or 32.0) / 16,
        "dp_energy": cost.get("energy"), "dp_area": cost.get("area"),
        **table_cells(m, sheet.metric_definitions),
        "bits_per_element": bpe.get("weight") or 32.0,
        "datapath": "; ".join((info.get("datapath") or {}).values()) or "model (torch)",
    }


def write_outputs(sheet: SpecSheet | Mapping[str, Any], out_dir: str | Path, *,
                  plot: bool = True) -> dict[str, Path]:
    """Write the spec sheet (JSON, the current schema version), the vendor table (md, csv, tex,
    html) and the Pareto plot."""
    from .plots import pareto_plot
    from .store import write_atomic
    from .tables import render_table

    sheet = as_sheet(sheet)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = vendor_rows(sheet)
    paths = {"sheet": sheet.save(out / "spec_sheet.json")}
    for fmt, suffix in (("markdown", "md"), ("csv", "csv"), ("latex", "tex"), ("html", "html")):
        paths[suffix] = write_atomic(out / f"spec_table.{suffix}",
                                     render_table(rows, vendor_columns(sheet), fmt=fmt))
    if plot:
        pts = [r for r in rows if r.get("delta_ppl") is not None]
        if pts:
            paths["pareto"] = pareto_plot(
                pts, out / "pareto.png", x="bits_per_element", y="delta_ppl", label="recipe",
                title=f"{sheet.inputs['model']['source']}: perplexity delta vs weight "
                f"bits/element ({sheet.inputs['settings']['tokens_evaluated']} tokens)")
    return paths

