"""``precisim eval``, ``precisim sweep``, ``precisim report`` and ``precisim layers``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from precisim.formats.cli import int_arg

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .sheet import SpecSheet

__all__ = ["DEFAULT_RECIPES", "OutputError", "add_parsers", "check_out_dir", "check_out_file"]

DEFAULT_RECIPES = "bf16,fp8-e4m3,mxfp8,mxfp4,nvfp4,deepseek-fp8"
SETTINGS = ("tokens", "window", "stride", "fidelity", "dtype", "bootstrap", "block", "seed",
            "threads")


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


class OutputError(ValueError):
    """An output location that cannot be written (checked before any work starts)."""


def check_out_dir(path: str | Path, what: str = "--out") -> Path:
    """``path`` as a directory the command can write into, checked before any work starts: it
    is created if missing (and removed again, with the parents made for it, if it stays
    empty), and a probe file is written and removed. Raises :class:`OutputError` naming the
    path for a file where a directory is needed or a place that cannot be written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {str(p)!r} is a file; give a directory")
    made: list[Path] = []
    try:
        anc = p
        while not anc.exists():
            made.append(anc)
            anc = anc.parent
        if not anc.is_dir():
            raise OutputError(f"{what} {str(p)!r}: {str(anc)!r} is a file, not a directory")
        p.mkdir(parents=True, exist_ok=True)
        import tempfile

        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise OutputError(f"{what} {str(p)!r} cannot be written: {e.strerror or e}") from None
    finally:
        for d in made:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break
    return p


def check_out_file(path: str | Path, what: str = "--out") -> Path:
    """``path`` as a file the command can write (its folder checked as
    :func:`check_out_dir`), before any work starts."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{what} {str(p)!r} is a directory; give a file name")
    check_out_dir(p.parent if str(p.parent) else ".", what=f"{what} {str(p)!r}: folder")
    return p


def _recipes(args: argparse.Namespace) -> tuple[str, ...]:
    names = [r.strip() for r in (args.recipes or "").split(",") if r.strip()]
    return tuple(names + list(args.recipe_file or []))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="hub id, local HF directory, .gguf file, or 'smollm2' (default)")
    p.add_argument("--data", default=None,
                   help="text/jsonl/parquet file or hub dataset (default: $PRECISIM_DATA)")
    p.add_argument("--tokens", type=int_arg(1), default=2048, help="token budget (default 2048)")
    p.add_argument("--window", type=int_arg(1), default=512, help="window length (default 512)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16")
    p.add_argument("--threads", type=int_arg(1), default=None, help="torch intra-op threads")


def _numerics(p: argparse.ArgumentParser) -> None:
    p.add_argument("--numerics", choices=("reproducible", "native"), default="reproducible",
                   help="reproducible (default): pin the CPU code paths of ATen, MKL and oneDNN "
                   "so the metrics are the same bits on every x86-64 machine with AVX2 (the "
                   "command restarts itself with the pins); native: the machine's fastest "
                   "code paths (docs/reproducibility.md)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model under recipes: ppl, KL, top-1, spec table",
                       description="Evaluate a causal LM on a text under one or more recipes "
                       "against the unpatched model; print the vendor spec table and write "
                       "the spec sheet, tables and Pareto plot.")
    _common(p)
    p.add_argument("--recipes", default=DEFAULT_RECIPES,
                   help=f"comma-separated preset names (default {DEFAULT_RECIPES})")
    p.add_argument("--recipe-file", action="append", help="a recipe YAML/JSON (repeatable)")
    p.add_argument("--stride", type=int_arg(1), default=None,
                   help="window stride (default = window)")
    p.add_argument("--fidelity", choices=("bit-exact", "fast"), default=None,
                   help="run every matrix unit at this fidelity")
    p.add_argument("--bootstrap", type=int_arg(0), default=1000, help="bootstrap resamples")
    p.add_argument("--block", type=int_arg(1), default=32,
                   help="bootstrap block length in tokens (at most a quarter of the tokens "
                   "evaluated; the sheet records the length used)")
    p.add_argument("--seed", type=int_arg(0), default=0)
    p.add_argument("--out", default="precisim-results", help="output directory")
    p.add_argument("--spec", default=None,
                   help="re-run the evaluation recorded in a spec sheet and check its metrics "
                   "(the sheet is never overwritten: outputs that would replace it go to "
                   "OUT/rerun)")
    p.add_argument("--no-plot", action="store_true")
    _numerics(p)
    p.add_argument("--noise", type=int_arg(0, 1000), default=0, metavar="N",
                   help="also measure each metric's numerical-noise band: N more evaluations "
                   "with the fp32 sums in permuted orders (shown beside the bootstrap CI)")
    p.add_argument("--batch", type=int_arg(1, 4096), default=1,
                   help="windows per step (each still its own forward: no number depends on it)")
    p.set_defaults(func=run_eval_cmd)

    s = sub.add_parser("sweep", help="run a YAML grid of models x recipes x datasets",
                       description="Run a sweep declared in YAML (name, models, recipes, "
                       "datasets, params); every finished cell is stored in a SQLite file at "
                       "once, so a killed sweep resumes.")
    s.add_argument("spec", help="sweep YAML")
    s.add_argument("--store", default=None, help="SQLite run store (default precisim-runs.sqlite)")
    s.add_argument("--export", default=None, help="also export the sweep to .csv or .json")
    s.add_argument("--lease", type=float, default=120.0, metavar="SECONDS",
                   help="lease on the cell a worker evaluates (default 120; renewed while it "
                   "runs): start the same command several times, on one store, to share a "
                   "sweep between workers; a killed worker's cell is retried by another")
    _numerics(s)
    s.set_defaults(func=run_sweep_cmd)

    r = sub.add_parser("report", help="tables and plots from a run store or a spec sheet")
    r.add_argument("--store", default=None, help="SQLite run store")
    r.add_argument("--sweep", default=None, help="only this sweep's records")
    r.add_argument("--sheet", default=None, help="a spec_sheet.json written by precisim eval")
    r.add_argument("--out", default="precisim-report", help="output directory")
    r.add_argument("--cost-axis", default="bits_per_element",
                   help="the Pareto plot's cost axis: bits_per_element (storage bits), or the "
                   "modelled datapath dp_energy / dp_area per MAC, or dp_energy@NAME / "
                   "dp_area@NAME under a sweep's coefficient set NAME (docs/cost-perf.md)")
    r.set_defaults(func=run_report_cmd)

    layer = sub.add_parser("layers", help="per-layer error and sensitivity of a recipe")
    _common(layer)
    layer.add_argument("--recipe", default="mxfp4")
    layer.add_argument("--by", choices=("layer", "op", "module"), default="layer")
    layer.add_argument("--out", default="precisim-layers", help="output directory")
    _numerics(layer)
    layer.set_defaults(func=run_layers_cmd, tokens=512)


def summary_table(sheet: SpecSheet | Mapping[str, Any]) -> str:
    """The short accuracy table ``precisim eval`` prints (and writes as ``summary.md``): the
    recipe's design columns, then the metrics the sheet's definitions put in the summary, and
    which of them are better higher or lower."""
    from .metrics import table_columns
    from .sheet import as_sheet
    from .spec import vendor_rows
    from .tables import render_table

    sheet = as_sheet(sheet)
    defs = sheet.metric_definitions
    cols = [("recipe", "recipe"), ("weights", "weights"), ("unit", "matrix unit"),
            ("bits_w", "bits/W"), *table_columns("summary", defs)]
    s = sheet.inputs["settings"]
    head = (f"{sheet.inputs['model']['source']}, {s['tokens_evaluated']} tokens of "
            f"{Path(sheet.inputs['data']['source']).name}, window {s['window']}: reference "
            f"(unpatched) ppl {sheet.reference['ppl']:.4f}")
    legend = []
    for word, higher in (("lower", False), ("higher", True)):
        labels = [d.get("label") or n for n, d in defs.items()
                  if "summary" in d.get("tables", ()) and d.get("higher_is_better") is higher]
        if labels:
            legend.append(f"{word} is better: {', '.join(labels)}")
    rows = vendor_rows(sheet)
    if sheet.noise:  # the numerical-noise band beside the bootstrap CI
        cols.insert(next(i for i, c in enumerate(cols) if c[0] == "delta_ppl_ci") + 1,
                    ("noise", "noise ±"))
        for row in rows:
            b = sheet.noise.get(row["recipe"], {}).get("delta_ppl")
            row["noise"] = f"{b['half_range']:.2g}" if b else ""
        legend.append(f"noise ±: half the range of Δppl over {sheet.noise['runs']} runs with "
                      "the fp32 sums in permuted orders")
    table = render_table(rows, cols, fmt="markdown", floatfmt=".4g")
    return head + "\n\n" + table + ("\n" + "; ".join(legend) + "\n" if legend else "")


def _pin_or_restart(args: argparse.Namespace) -> int | None:
    """In reproducible mode, restart this command in a pinned environment unless it runs in one
    already (None: carry on here); an error exit status if the machine cannot be pinned."""
    from .numerics import PINS, can_pin, pinned, pinned_env

    if args.numerics != "reproducible" or pinned():
        return None
    why = can_pin()
    if why is not None:
        return _err(f"{why}; run with --numerics native (the metrics then depend on this "
                    "machine's code paths)")
    if os.environ.get("PRECISIM_PINNED_RESTART"):
        return _err("the restart in reproducible mode did not take effect (is "
                    f"{', '.join(PINS)} overridden?); run with --numerics native")
    argv = getattr(args, "argv", None)
    if argv is None:  # called from Python: no process to restart
        print("warning: reproducible mode needs its pins set before Python starts ("
              + " ".join(f"{k}={v}" for k, v in PINS.items()) + "); this run uses the "
              "machine's own code paths, and its sheet says so", file=sys.stderr)
        return None
    env = pinned_env()
    env["PRECISIM_PINNED_RESTART"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "precisim.eval.cli", *argv], env)
    return None  # pragma: no cover - execve does not return


def run_eval_cmd(args: argparse.Namespace) -> int:
    from .data import data_source
    from .numerics import comparable
    from .sheet import SpecSheet
    from .spec import EvalConfig, compare_metrics, run_eval

    status = _pin_or_restart(args)
    if status is not None:
        return status
    from .distributed import DistributedError, init_from_env

    try:
        grp = init_from_env()
    except DistributedError as e:
        return _err(str(e))
    old = None
    out = Path(args.out)
    if args.spec:
        old = SpecSheet.load(args.spec)
        cfg = EvalConfig.from_sheet(old)
        target = out / "spec_sheet.json"
        if target.exists() and target.resolve() == Path(args.spec).resolve():
            out = out / "rerun"  # never overwrite the sheet being checked
            if grp.rank == 0:
                print(f"note: {args.spec} is the sheet being checked; this run's outputs go "
                      f"to {out}", file=sys.stderr)
    else:
        cfg = EvalConfig(model=args.model, data=data_source(args.data),
                         recipes=_recipes(args), **{k: getattr(args, k) for k in SETTINGS})
    if grp.rank == 0:
        check_out_dir(out)  # before the work, not after it
    t0 = time.perf_counter()
    args.interrupt_hint = "nothing was written"
    try:
        sheet = run_eval(cfg, progress=grp.rank == 0, batch=args.batch, noise=args.noise)
        if old is not None and sheet.noise is None and old.noise is None and compare_metrics(
                old, sheet) and comparable(old.numerics, sheet.numerics) is not None:
            # another environment, different bits, no band recorded: measure one to compare
            sheet = run_eval(cfg, batch=args.batch, noise=2)
    except DistributedError as e:
        return _err(str(e))
    args.interrupt_hint = None
    if grp.rank != 0:  # rank 0 reports and writes
        return 0
    table = summary_table(sheet)
    print(f"evaluated in {time.perf_counter() - t0:.0f} s\n\n{table}")
    # compare before writing (the verdict never depends on what the outputs replace)
    status = _check_reproduction(old, sheet, args.spec) if old is not None else 0
    paths = _write_eval_outputs(sheet, out, table, plot=not args.no_plot)
    if paths is None:
        return 2
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return status


def _check_reproduction(old: SpecSheet, new: SpecSheet, path: str = "the sheet") -> int:
    """Compare a re-run with its sheet: exactly where both ran pinned alike, else within the
    numerical-noise band; say which. Exit status 0 reproduced, 1 not. The checked sheet is
    never changed."""
    from .noise import within_band
    from .numerics import comparable
    from .spec import compare_metrics

    why = comparable(old.numerics, new.numerics)
    diffs = compare_metrics(old, new)
    if not diffs:
        print(f"reproduced exactly: content hash {new.content_hash[:16]}, every metric "
              "identical" + (" (both in reproducible mode with the same libraries)"
                             if why is None else f"; exactness was not guaranteed: {why}"))
        return 0
    if why is None:
        print(f"NOT reproduced ({path} is unchanged; exact comparison: both ran in "
              "reproducible mode with the same libraries):\n  " + "\n  ".join(diffs))
        return 1
    if old.content_hash != new.content_hash:
        print(f"NOT reproduced ({path} is unchanged): content hash {old.content_hash} != "
              f"{new.content_hash} (not the same inputs)")
        return 1
    band = old.noise or new.noise
    if band is None:  # (measured by the re-run unless asked otherwise)
        print(f"not compared: {why}, and neither sheet has a noise band (--noise N)")
        return 1
    diffs = within_band(old.metrics, new.metrics, band,
                        (old.reference["ppl"], new.reference["ppl"]))
    if diffs:
        print(f"NOT reproduced within the numerical-noise band ({path} is unchanged; {why}):"
              "\n  " + "\n  ".join(diffs))
        return 1
    print(f"reproduced within the numerical-noise band ({why}; {band['runs']} runs with "
          "permuted fp32 summation orders): every metric moved less than its band's width")
    return 0


def _write_eval_outputs(sheet: SpecSheet, out: Path, table: str, *, plot: bool
                        ) -> dict[str, Path] | None:
    """Write the outputs of an evaluation; if that fails after the run (disk full, the folder
    removed meanwhile), save the spec sheet to a temporary file and say where, so the finished
    work is not lost; None then."""
    from .spec import write_outputs
    from .store import write_atomic

    try:
        paths = write_outputs(sheet, out, plot=plot)
        paths["summary"] = write_atomic(out / "summary.md", table + "\n")
        return paths
    except OSError as e:
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix="precisim-spec_sheet-", suffix=".json")
        with open(fd, "w", encoding="utf-8") as f:
            f.write(sheet.to_json())
        _err(f"could not write the outputs to {str(out)!r} ({e}); the spec sheet is saved in "
             f"{tmp} (precisim report --sheet {tmp} --out DIR writes the tables)")
        return None


def run_sweep_cmd(args: argparse.Namespace) -> int:
    from .data import load_text
    from .spec import (
        EvalConfig,
        model_fingerprint,
        recipe_fingerprint,
        run_eval,
        vendor_rows,
    )
    from .store import DEFAULT_STORE, EXPORT_FORMATS, RunStore
    from .sweep import load_sweep, run_sweep

    status = _pin_or_restart(args)
    if status is not None:
        return status
    spec = load_sweep(args.spec)
    bad = [k for k in spec.params if k not in SETTINGS]
    if bad:
        return _err(f"sweep {spec.name!r}: unknown params {', '.join(bad)}; accepted: "
                    f"{', '.join(SETTINGS)}")
    if args.export:
        check_out_file(args.export, "--export")
        if Path(args.export).suffix.lower() not in EXPORT_FORMATS:
            return _err(f"--export {args.export!r}: accepted suffixes "
                        f"{', '.join(EXPORT_FORMATS)}")
    texts: dict[str, str] = {}

    def content(cell: Any) -> dict[str, str]:
        """The whole grid is checked here before the first cell runs (settings, recipes,
        data, model sources), and each cell keyed by the content of its inputs."""
        where = f"sweep {spec.name!r}, cell {cell}"
        try:
            cfg = EvalConfig(model=cell.model, data=cell.dataset, recipes=(cell.recipe,),
                             **cell.param_dict)
            recipe = cfg.resolved_recipes()[0]
            if cell.dataset not in texts:
                texts[cell.dataset] = load_text(cell.dataset).sha256
            model = model_fingerprint(cell.model)
        except (ValueError, RuntimeError, OSError) as e:  # the same error, naming the cell
            try:
                err = type(e)(f"{where}: {e}")
            except Exception:  # pragma: no cover - an error type with another signature
                raise e from None
            raise err from None
        return {"recipe": recipe_fingerprint(recipe), "data": texts[cell.dataset],
                "model": model}

    models: dict[tuple[str, str], Any] = {}

    def evaluate_cell(cell: Any) -> dict[str, Any]:
        from precisim.emulation import load_model

        params = cell.param_dict
        dtype = params.get("dtype", "float32")
        if (cell.model, dtype) not in models:
            models.clear()
            models[(cell.model, dtype)] = load_model(cell.model, dtype=dtype)
        cfg = EvalConfig(model=cell.model, data=cell.dataset, recipes=(cell.recipe,), **params)
        sheet = run_eval(cfg, model_and_tokenizer=models[(cell.model, dtype)])
        name = cfg.resolved_recipes()[0].name
        row = vendor_rows(sheet)[0]
        return {"recipe_name": name, "ppl_ref": sheet.reference["ppl"],
                "content_hash": sheet.content_hash, **sheet.metrics[name],
                "cost": {k: row[k] for k in ("bits_w", "bits_a", "mem_w", "mem_kv",
                                             "acc_bits", "dp_energy", "dp_area")},
                "bits_per_element": row["bits_per_element"],
                # modelled datapath cost (docs/cost-perf.md): a cost axis of the report
                "dp_energy": row["dp_energy"], "dp_area": row["dp_area"]}

    cost_fn = None
    if spec.cost:
        from .cost import cost_record, resolve_coefficients

        sets = [resolve_coefficients(c) for c in spec.cost.get("coefficients",
                                                               ("horowitz-45nm",))]

        def cost_fn(cell: Any) -> dict[str, Any]:
            """The cell's modelled cost (docs/cost-perf.md section 4c): a recipe with rules
            is priced per module on the model (loaded once, as for its evaluation)."""
            from precisim.emulation import load_model

            params = cell.param_dict
            cfg = EvalConfig(model=cell.model, data=cell.dataset, recipes=(cell.recipe,),
                             **params)
            recipe = cfg.resolved_recipes()[0]
            model = None
            if recipe.rules:
                dtype = params.get("dtype", "float32")
                if (cell.model, dtype) not in models:
                    models.clear()
                    models[(cell.model, dtype)] = load_model(cell.model, dtype=dtype)
                model = models[(cell.model, dtype)][0]
            return cost_record(recipe, sets, model)

    path = args.store or DEFAULT_STORE
    args.interrupt_hint = (f"every finished cell is kept in {path}; run the same command again "
                           "to resume")
    with RunStore(path) as store:
        recs = run_sweep(spec, store, evaluate_cell, progress=True, content=content,
                         lease=args.lease, cost=cost_fn)
        args.interrupt_hint = None
        if args.export:
            store.export(args.export, sweep=spec.name)
    skipped = [r for r in recs if "skipped" in r]
    for r in skipped:
        print(f"left out {r['key']}: {r['skipped']}")
    print(f"sweep {spec.name!r}: {len(recs) - len(skipped)} cells in {path}"
          + (f", {len(skipped)} left out by cost.max" if skipped else ""))
    return 0


def run_report_cmd(args: argparse.Namespace) -> int:
    from .metrics import table_columns
    from .plots import pareto_plot
    from .sheet import SpecSheet, SpecSheetError
    from .spec import write_outputs
    from .store import RunStore
    from .sweep import latest_records
    from .tables import write_table

    out = Path(args.out)
    if args.sheet:
        sheet = SpecSheet.load(args.sheet)
        check_out_dir(out)
        try:
            paths = write_outputs(sheet, out)
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            raise SpecSheetError(f"spec sheet {args.sheet!r} is malformed: a field is missing "
                                 f"or of the wrong type ({type(e).__name__}: {e})") from None
        print("wrote " + ", ".join(str(x) for x in paths.values()))
        return 0
    if not args.store or not Path(args.store).is_file():
        return _err(f"run store {args.store!r} does not exist (give --store FILE or --sheet)")
    with RunStore(args.store, readonly=True) as st:  # report never writes to the store
        recs = st.records(args.sweep)
    if not recs:
        return _err(f"no records in {args.store!r}" + (f" for sweep {args.sweep!r}"
                                                       if args.sweep else ""))
    recs, older = latest_records(recs)
    if older:
        print(f"note: {older} older record(s) of the same cells (computed from other "
              "inputs) are not shown", file=sys.stderr)
    check_out_dir(out)
    from .spec import COST_COLUMNS

    cost_cols = COST_COLUMNS if any(r.get("dp_energy") is not None for r in recs) else []
    cols = [("model", "model"), ("dataset", "data"), ("recipe", "recipe"),
            ("bits_per_element", "bits/W"), *cost_cols, *table_columns("report")]
    written = [write_table(recs, out / f"report.{s}", cols) for s in ("md", "csv", "tex",
                                                                       "html")]
    x = args.cost_axis
    base_axis = x.split("@", 1)[0]
    if x != "bits_per_element" and (base_axis not in ("dp_energy", "dp_area")
                                    or ("@" in x and not x.split("@", 1)[1])):
        return _err(f"--cost-axis {x!r} is not valid: accepted bits_per_element, dp_energy, "
                    "dp_area, dp_energy@NAME, dp_area@NAME")
    pts = [r for r in recs if r.get("delta_ppl") is not None and r.get(x) is not None]
    if x != "bits_per_element" and not pts and any(r.get("delta_ppl") is not None
                                                    for r in recs):
        return _err(f"--cost-axis {x}: the records carry no {x} (sweeps run before the cost "
                    "model): use bits_per_element or run the sweep again")
    if pts:
        xlabel = {"bits_per_element": None,
                  "dp_energy": "datapath energy per MAC (modelled, bf16 FMA = 1)",
                  "dp_area": "datapath area per MAC (modelled, bf16 FMA = 1)"}[base_axis]
        if xlabel and "@" in x:
            xlabel += f", coefficients {x.split('@', 1)[1]}"
        written.append(pareto_plot(pts, out / "pareto.png", x=x, y="delta_ppl",
                                   label="recipe", xlabel=xlabel))
    print("wrote " + ", ".join(str(x) for x in written))
    return 0


def run_layers_cmd(args: argparse.Namespace) -> int:
    from precisim.emulation import get_recipe, load_model
    from precisim.emulation.loader import check_dtype, resolve_model_path

    from .data import load_text, prefix_token, tokenize
    from .layers import layer_errors, sensitivity
    from .plots import sensitivity_plot
    from .tables import write_table

    status = _pin_or_restart(args)
    if status is not None:
        return status
    # everything that can be wrong with the input is checked before the model loads
    recipe = get_recipe(args.recipe)
    check_dtype(args.dtype)
    resolve_model_path(args.model)
    text = load_text(args.data)
    out = check_out_dir(args.out)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype)
    ids = tokenize(tok, text.text, args.tokens)
    prefix = prefix_token(tok)
    out.mkdir(parents=True, exist_ok=True)
    errs = layer_errors(model, ids, recipe, window=args.window, prefix_token=prefix)
    sens = sensitivity(model, ids, recipe, by=args.by, window=args.window, prefix_token=prefix)
    paths = [write_table(errs, out / "layer_errors.csv"),
             write_table(errs, out / "layer_errors.md"),
             write_table(sens, out / "sensitivity.csv"),
             write_table(sens, out / "sensitivity.md"),
             sensitivity_plot(sens, out / "sensitivity.png", x="group", y="delta_ppl",
                              title=f"{args.model} under {recipe.name}: one {args.by} at a time")]
    from .tables import render_table

    print(render_table(sens[:10], fmt="markdown", floatfmt=".4g"))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
