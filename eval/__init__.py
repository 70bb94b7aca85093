"""precisim.eval: accuracy of real checkpoints under a proposed arithmetic.

Public API::

    from precisim.emulation import load_model
    from precisim.eval import load_text, tokenize, evaluate, sensitivity, run_eval, EvalConfig

    model, tok = load_model("smollm2")                      # or a hub id / HF dir / .gguf
    ids = tokenize(tok, load_text("wiki.test.raw").text, max_tokens=2048)
    res = evaluate(model, ids, ["mxfp8", "nvfp4"], window=512)
    res.records()                                           # ppl, delta_ppl (+CI), kl, top1

    sheet = run_eval(EvalConfig(model="smollm2", data="wiki.test.raw", recipes=("mxfp4",)))
    write_outputs(sheet, "out/")    # spec_sheet.json, spec_table.{md,csv,tex,html}, pareto.png
    SpecSheet.load("out/spec_sheet.json").metrics["mxfp4"]["kl"]   # also sheet["metrics"]...

Perplexity uses lm-evaluation-harness' rolling log-likelihood semantics
(:func:`rolling_windows`); confidence intervals are paired block bootstraps (:mod:`.stats`).
"""

from .data import DataError, data_source, load_text, prefix_token, tokenize
from .layers import layer_errors, module_groups, sensitivity
from .metrics import METRICS, Metric, get_metric, register_metric
from .perplexity import EvalResult, RecipeResult, evaluate, rolling_windows
from .plots import pareto_frontier, pareto_plot, sensitivity_plot
from .sheet import SpecSheet, SpecSheetError
from .spec import VENDOR_COLUMNS, EvalConfig, compare_metrics, run_eval, vendor_rows, write_outputs
from .stats import Interval, mean_ci, paired_bootstrap, ppl_delta
from .store import RunStore
from .sweep import SweepError, SweepSpec, load_sweep, run_sweep
from .tables import render_table, write_table
from .vectors import format_vectors, unit_vectors, write_vectors

__all__ = [
    "DataError", "EvalConfig", "EvalResult", "Interval", "RecipeResult", "RunStore",
    "SweepError", "SweepSpec", "VENDOR_COLUMNS", "compare_metrics", "data_source", "evaluate",
    "format_vectors", "layer_errors", "load_sweep", "load_text", "mean_ci", "module_groups",
    "paired_bootstrap", "pareto_frontier", "pareto_plot", "ppl_delta", "prefix_token",
    "render_table", "rolling_windows", "run_eval", "run_sweep", "sensitivity",
    "sensitivity_plot", "tokenize", "unit_vectors", "vendor_rows", "write_outputs",
    "write_table", "write_vectors",
    "METRICS", "Metric", "SpecSheet", "SpecSheetError", "get_metric", "register_metric",
]
