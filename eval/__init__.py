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

The names below are imported from their submodules on first use (PEP 562), so that importing a
light submodule (the command line, :mod:`.tables`, :mod:`.stats`) does not load the model
patching and evaluation machinery.
"""

from __future__ import annotations

import importlib
from typing import Any

#: submodule -> the public names it defines, re-exported here
_EXPORTS: dict[str, tuple[str, ...]] = {
    "data": ("DataError", "data_source", "load_text", "prefix_token", "tokenize"),
    "layers": ("layer_errors", "module_groups", "sensitivity"),
    "metrics": ("METRICS", "Metric", "get_metric", "register_metric"),
    "perplexity": ("EvalResult", "RecipeResult", "evaluate", "rolling_windows"),
    "plots": ("pareto_frontier", "pareto_plot", "sensitivity_plot"),
    "sheet": ("SpecSheet", "SpecSheetError"),
    "spec": ("VENDOR_COLUMNS", "EvalConfig", "compare_metrics", "run_eval", "vendor_rows",
             "write_outputs"),
    "stats": ("Interval", "mean_ci", "paired_bootstrap", "ppl_delta"),
    "store": ("RunStore",),
    "sweep": ("SweepError", "SweepSpec", "load_sweep", "run_sweep"),
    "tables": ("render_table", "write_table"),
}
_SOURCE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_SOURCE)


def __getattr__(name: str) -> Any:
    module = _SOURCE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
