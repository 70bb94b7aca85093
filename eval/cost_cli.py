"""``precisim cost``, ``precisim perf`` and ``precisim search``.

Building their parsers imports nothing beyond the standard library; ``perf`` with format names
(``--weights nvfp4``) imports only :mod:`precisim.formats` and the light performance-model
modules; ``cost``, ``perf --recipe`` and ``search`` import the emulation layer when they run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_parsers"]

DEFAULT_COST = ("bf16,fp8-e4m3,mxfp8,mxfp6,mxfp4,nvfp4,deepseek-fp8,h100-bf16,h100-e4m3,"
                "fn:exp-lut64,fn:rcp-newton1,fn:rsqrt-newton1")


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def add_parsers(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "cost", help="modelled datapath area and energy of matrix units and recipes",
        description="A first-order datapath cost model (docs/cost-perf.md): relative area and "
        "energy per product of matrix units (and of recipes' GEMMs: block-scale application, "
        "storage bits) and per evaluated element of function units (exp, rcp, rsqrt...: "
        "tables and FMAs) and of softmax, norm and activation units (docs/cost-perf.md "
        "section 4b), a bf16 multiply with fp32 "
        "accumulation = 1. A model, not a measurement.")
    c.add_argument("names", nargs="*", help=f"units, recipes, function, softmax, norm or "
                   f"activation units (unit:NAME / recipe:NAME / fn:NAME / softmax:NAME / "
                   f"norm:NAME / activation:NAME when a name is several; .yaml recipe files "
                   f"too); "
                   f"default {DEFAULT_COST}")
    c.add_argument("--detail", action="store_true", help="print every term of each datapath")
    c.add_argument("--coefficients", default=None,
                   help="YAML/JSON file of cost coefficients (default Horowitz ISSCC 2014)")
    c.add_argument("--json", action="store_true", help="print JSON instead of tables")
    c.set_defaults(func=run_cost_cmd)

    p = sub.add_parser(
        "perf", help="roofline: prefill time, decode tokens/s, memory per device",
        description="A roofline performance model (docs/cost-perf.md): per-op time and bound "
        "(compute, memory, network) of a model on an accelerator under a precision and "
        "workload. A model, not a measurement: measured systems reach a fraction of it.")
    p.add_argument("--model", default="llama-2-7b",
                   help="a model preset (precisim.eval.models) or a Hugging Face config.json / "
                   "its directory (default llama-2-7b)")
    p.add_argument("--accelerator", default="h100-sxm",
                   help="presets (comma-separated to compare) or an accelerator YAML file")
    p.add_argument("--recipe", default=None, help="a recipe name or file (its formats, "
                   "per module); or give --weights/--activations/--kv")
    p.add_argument("--weights", default="bf16", help="weight format, e.g. nvfp4, mxfp8, e4m3")
    p.add_argument("--activations", default=None,
                   help="GEMM input format (default: the weights' format)")
    p.add_argument("--kv", default=None, help="KV-cache format (default: --dtype)")
    p.add_argument("--dtype", default="bf16", help="what stays in high precision")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill", type=int, default=2048, help="prompt tokens per sequence")
    p.add_argument("--context", type=int, default=None,
                   help="decode context (default: --prefill)")
    p.add_argument("--output", type=int, default=128, help="generated tokens per sequence")
    for par in ("tp", "pp", "dp"):
        p.add_argument(f"--{par}", type=int, default=1, help=f"{par} degree")
    p.add_argument("--ops", action="store_true", help="print every op (default: a summary)")
    p.add_argument("--generation", action="store_true",
                   help="also serve batch x (prefill in, output out): tokens/s per device")
    p.add_argument("--max-batch", action="store_true",
                   help="use the largest batch that fits in 90%% of the memory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_perf_cmd)

    s = sub.add_parser(
        "search", help="the cheapest per-layer mix of specs within an accuracy budget",
        description="Mixed-precision search (docs/cost-perf.md section 8): per-layer KL "
        "sensitivities on a search set, a greedy cost-per-KL path, real evaluations of its ends "
        "and of the predicted budget edge, a back-off promoting the most sensitive layers until "
        "the held-out check is predicted to pass (--verify-confidence) within the budget minus "
        "--margin, and a verification on held-out tokens "
        "(the first --heldout-tokens of the text, what "
        "`precisim eval --tokens N` evaluates). Writes recipe.yaml, search.md/csv and "
        "pareto.png.")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--data", default=None, help="text file (default: $PRECISIM_DATA)")
    s.add_argument("--candidates", default="nvfp4,mxfp8",
                   help="comma-separated candidate specs for the linear layers (recipe or "
                   "format names; default nvfp4,mxfp8)")
    s.add_argument("--template", default=None,
                   help="a recipe whose other op kinds (attention, KV cache) every point keeps")
    s.add_argument("--budget", default="delta_ppl:1",
                   help="METRIC:LIMIT, METRIC one of delta_ppl, kl (at most), top1 (at least)")
    s.add_argument("--use", choices=("upper", "estimate"), default="upper",
                   help="judge the budget on the bad end of the 95%% CI (default) or the "
                   "estimate")
    s.add_argument("--margin", type=float, default=0.0,
                   help="the search set must meet the budget tightened by this much (same unit "
                   "as the limit; default 0)")
    s.add_argument("--verify-confidence", default="0.95",
                   help="accept a point on the search set when the held-out check is predicted "
                   "to pass with this probability (from the point's estimate and interval; "
                   "docs/cost-perf.md section 8); 'none': when the search set's own budget "
                   "value meets the budget minus --margin (default 0.95)")
    s.add_argument("--rank-by", choices=("kl", "budget"), default="kl",
                   help="per-layer sensitivity measure: KL to the reference (default) or the "
                   "budget's metric")
    s.add_argument("--against", choices=("reference", "base"), default="reference",
                   help="sensitivities with the other layers unquantized (default) or in the "
                   "most expensive candidate")
    s.add_argument("--objective", choices=("bits", "energy", "area", "time"), default="bits")
    s.add_argument("--accelerator", default="h200", help="for --objective time")
    s.add_argument("--batch", type=int, default=1, help="for --objective time (decode batch)")
    s.add_argument("--by", choices=("layer", "op", "module"), default="layer")
    s.add_argument("--search-tokens", type=int, default=2048)
    s.add_argument("--heldout-tokens", type=int, default=2048)
    s.add_argument("--window", type=int, default=512)
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--name", default="searched", help="the found recipe's name")
    s.add_argument("--detail", action="store_true",
                   help="also print each group's candidate, cost in every candidate and "
                   "sensitivities (written to groups.csv either way)")
    s.add_argument("--out", default="precisim-search", help="output directory")
    s.set_defaults(func=run_search_cmd)


# ---------------------------------------------------------------------------------------------

#: the element-wise datapaths ``precisim cost`` prices per element (docs/cost-perf.md 4b)
_SPEC_KINDS = ("softmax", "norm", "activation")


def _spec_registries() -> dict[str, Any]:
    from precisim.emulation.functions import ACTIVATION_UNITS, NORMS, SOFTMAXES

    return {"softmax": SOFTMAXES, "norm": NORMS, "activation": ACTIVATION_UNITS}


def _cost_subject(name: str) -> tuple[str, Any]:
    """``("unit", MatrixUnit)``, ``("recipe", Recipe)``, ``("function", FunctionUnit)`` or
    ``("softmax" | "norm" | "activation", spec)`` for a name."""
    from precisim.emulation import get_recipe, get_unit
    from precisim.emulation.functions import get_function_unit
    from precisim.formats.registry import UnknownNameError

    kind, sep, rest = name.partition(":")
    if sep and kind in _SPEC_KINDS:
        return kind, _spec_registries()[kind].get(rest)
    if sep and kind in ("unit", "recipe", "fn"):
        if kind == "fn":
            return "function", get_function_unit(rest)
        return (kind, get_unit(rest) if kind == "unit" else get_recipe(rest))
    if Path(name).suffix.lower() in (".yaml", ".yml", ".json"):
        return "recipe", get_recipe(name)
    unit = recipe = None
    with contextlib.suppress(UnknownNameError):
        unit = get_unit(name)
    with contextlib.suppress(UnknownNameError):
        recipe = get_recipe(name)
    if unit is not None and recipe is not None:
        # a recipe named after its unit (deepseek-fp8): the recipe includes its scales
        return "recipe", recipe
    if unit is not None:
        return "unit", unit
    if recipe is not None:
        return "recipe", recipe
    with contextlib.suppress(UnknownNameError):
        return "function", get_function_unit(name)
    for k, reg in _spec_registries().items():
        with contextlib.suppress(KeyError):
            return k, reg.get(name)
    raise ValueError(f"{name!r} is neither a matrix unit nor a recipe nor a function unit "
                     "nor a softmax, norm or activation unit (precisim cost takes unit, "
                     "recipe, fn:, softmax:, norm: and activation: names, or recipe files)")


def run_cost_cmd(args: argparse.Namespace) -> int:
    from precisim.emulation import RecipeError

    from .cost import MODEL_NOTE, CostCoefficients, CostError, recipe_cost, unit_cost
    from .tables import render_table

    try:
        coeffs = CostCoefficients.load(args.coefficients) if args.coefficients else None
        names = [n.strip() for n in (",".join(args.names) or DEFAULT_COST).split(",")
                 if n.strip()]
        rows, details = [], []
        for n in names:
            kind, obj = _cost_subject(n)
            if kind == "function" or kind in _SPEC_KINDS:
                from .cost_units import TableGeometry

                dp = unit_cost(obj, coeffs)
                geo = f"; {TableGeometry.of(obj).describe()}" if kind == "function" else ""
                rows.append({"name": n, "kind": kind, "datapath": f"{dp.description}{geo}",
                             "energy": dp.energy, "area": dp.area, "energy_pj": dp.energy_pj})
                details.append(dp)
                continue
            if kind == "unit":
                dp = unit_cost(obj, coeffs)
                bits = {"input": float(obj.a_format.bits), "weight": float(obj.b_format.bits)}
            else:
                g = recipe_cost(obj, coefficients=coeffs)
                if g is None:
                    rows.append({"name": n, "kind": "recipe", "datapath": "high precision"})
                    continue
                dp, bits = g.datapath, g.bits
            rows.append({"name": n, "kind": kind, "datapath": dp.description or dp.name,
                         "energy": dp.energy, "area": dp.area, "energy_pj": dp.energy_pj,
                         "bits_a": bits["input"], "bits_w": bits["weight"]})
            details.append(dp)
    except (CostError, RecipeError, ValueError, KeyError, FileNotFoundError) as e:
        return _err(str(e.args[0]) if isinstance(e, KeyError) else str(e))
    if args.json:
        print(json.dumps({"note": MODEL_NOTE, "rows": rows,
                          "detail": [d.to_dict() for d in details] if args.detail else []},
                         indent=2))
        return 0
    cols = [("name", "name"), ("kind", "kind"), ("datapath", "datapath"),
            ("energy", "energy/op", ".3g"), ("area", "area/op", ".3g"),
            ("energy_pj", "pJ (45 nm)", ".3g"), ("bits_a", "bits A"), ("bits_w", "bits W")]
    print(f"_{MODEL_NOTE}_\n")
    print("op: one product (units, recipes), one evaluated element (function units) or one "
          "element of a row (softmax, norm and activation units)\n")
    print(render_table(rows, cols))
    if args.detail:
        for d in details:
            print("\n" + d.table())
    return 0


def run_perf_cmd(args: argparse.Namespace) -> int:
    from .accelerators import AcceleratorError
    from .models import ModelSpecError
    from .perf import (
        MODEL_NOTE,
        PerfError,
        Precision,
        Workload,
        generation,
        max_batch,
        roofline,
    )
    from .tables import render_table

    accs = [a.strip() for a in args.accelerator.split(",") if a.strip()]
    out: list[dict[str, Any]] = []
    reports = []
    try:
        if args.recipe:
            from precisim.emulation import RecipeError

            try:
                prec: Any = Precision.from_recipe(args.recipe, args.model, dtype=args.dtype)
            except RecipeError as e:
                return _err(str(e))
        else:
            prec = Precision.uniform(args.weights, args.activations, args.kv, dtype=args.dtype)
        for acc in accs:
            w = Workload(batch=args.batch, prefill_tokens=args.prefill, context=args.context,
                         output_tokens=args.output, tp=args.tp, pp=args.pp, dp=args.dp,
                         dtype=args.dtype)
            if args.max_batch:
                b = max_batch(args.model, acc, prec, w, memory_fraction=0.9)
                if b == 0:
                    return _err(f"{args.model} does not fit on {acc} with tp={args.tp}, "
                                f"pp={args.pp}")
                w = w.with_(batch=b)
            t0 = time.perf_counter()
            r = roofline(args.model, acc, prec, w)
            row = {**r.summary(), "query_ms": (time.perf_counter() - t0) * 1e3}
            if args.generation:
                g = generation(args.model, acc, prec, w)
                row.update(ttft_s=g.ttft, tpot_s=g.tpot,
                           output_tokens_per_s_per_device=g.output_tokens_per_s_per_device)
            out.append(row)
            reports.append(r)
    except (PerfError, AcceleratorError, ModelSpecError, KeyError) as e:
        return _err(str(e.args[0]) if isinstance(e, KeyError) else str(e))
    if args.json:
        print(json.dumps({"note": MODEL_NOTE, "results": out,
                          "ops": [r.records() for r in reports] if args.ops else []},
                         indent=2, default=str))
        return 0
    if args.ops:
        for r in reports:
            print(r.table() + "\n")
        return 0
    cols = [("accelerator", "accelerator"), ("devices", "devices"), ("batch", "batch"),
            ("prefill_s", "prefill s", ".4g"), ("prefill_bound", "bound"),
            ("decode_tokens_per_s", "decode tok/s", ".4g"),
            ("decode_tokens_per_s_per_sequence", "tok/s per seq", ".4g"),
            ("decode_bound", "bound"), ("memory_gb", "GB/device", ".4g"),
            ("capacity_gb", "capacity GB", ".4g"), ("fits", "fits")]
    if args.generation:
        cols.append(("output_tokens_per_s_per_device", "serving tok/s/device", ".4g"))
    print(f"{reports[0].model.summary()}\n{reports[0].precision.describe()}\n\n_{MODEL_NOTE}_\n")
    print(render_table(out, cols))
    return 0


def run_search_cmd(args: argparse.Namespace) -> int:
    from precisim.emulation import LoadError, RecipeError, load_model

    from .data import DataError, data_source
    from .search import Budget, Objective, SearchError, SearchProblem, search

    try:
        metric, _, limit = args.budget.partition(":")
        if not limit:
            return _err(f"--budget {args.budget!r}: give METRIC:LIMIT, e.g. delta_ppl:1")
        try:
            lim = float(limit)
        except ValueError:
            return _err(f"--budget {args.budget!r}: the limit {limit!r} is not a number")
        vc_text = args.verify_confidence.strip().lower()
        try:
            vc = None if vc_text == "none" else float(vc_text)
        except ValueError:
            return _err(f"--verify-confidence {args.verify_confidence!r} is not valid: accepted "
                        "a probability in [0.5, 1) or 'none'")
        problem = SearchProblem(
            candidates=tuple(c.strip() for c in args.candidates.split(",") if c.strip()),
            budget=Budget(metric.strip(), lim, args.use),
            objective=Objective(args.objective, args.accelerator, args.batch),
            by=args.by, template=args.template, search_tokens=args.search_tokens,
            heldout_tokens=args.heldout_tokens, window=args.window, bootstrap=args.bootstrap,
            name=args.name, margin=args.margin, rank_by=args.rank_by, against=args.against,
            verify_confidence=vc)
        data = data_source(args.data)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        model, tok = load_model(args.model)
        result = search(model, tok, data, problem, progress=sys.stderr.isatty())
    except (SearchError, RecipeError, LoadError, DataError, FileNotFoundError, ValueError) as e:
        return _err(str(e))
    print(result.table())
    if args.detail:
        print("\n" + result.detail())
    paths = result.save(args.out)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0
