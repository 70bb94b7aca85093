"""Speed of the cost and performance models (issue: from accuracy to cost; docs/cost-perf.md).

Targets: one roofline query (model, accelerator, precision, workload) answers in under a second;
the mixed-precision search on SmolLM2 with a 2048-token evaluation finishes within 30 minutes on
a 2-core CPU.

* ``perf``: the median wall time of ``roofline`` over ``--repeats`` queries for each preset
  accelerator, for Llama-2-7B under NVFP4 and for a per-module recipe on SmolLM2 (its rules
  resolved per module), plus the datapath cost of every preset unit;
* ``--search``: also times :func:`precisim.eval.search.search` on SmolLM2 (NVFP4 / MXFP8 per
  decoder layer, budget Δppl <= 1 on the CI's upper end; ``--search-tokens`` for the search
  set, as many held out) and prints its stages.

    python benchmarks/bench_cost_perf.py [--repeats 50] [--search] [--search-tokens 2048]
                                         [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

from precisim.emulation import available_units
from precisim.eval.accelerators import available_accelerators
from precisim.eval.cost import unit_cost
from precisim.eval.perf import Precision, Workload, roofline


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_perf(repeats: int) -> None:
    w = Workload(batch=8, prefill_tokens=2048, tp=1)
    nv = Precision.uniform("nvfp4")
    for acc in available_accelerators():
        t = _median_time(lambda acc=acc: roofline("llama-2-7b", acc, nv, w), repeats)
        print(f"roofline llama-2-7b nvfp4 on {acc:9s}: {t * 1e3:7.2f} ms (target < 1000 ms)")
    from precisim.emulation import Recipe, Rule

    mix = Recipe("mix", linear={"input": "mxfp8", "weight": "mxfp8"},
                 rules=tuple(Rule(f"model.layers.{i}.*", "glob",
                                  linear={"input": "nvfp4", "weight": "nvfp4"})
                             for i in range(0, 30, 2)))
    t = _median_time(lambda: roofline("smollm2", "b200", Precision.from_recipe(mix, "smollm2"),
                                      w), repeats)
    print(f"roofline smollm2, 15-rule recipe, incl. resolving it: {t * 1e3:7.2f} ms")
    units = available_units()
    t0 = time.perf_counter()
    for u in units:
        unit_cost(u)
    print(f"datapath cost of {len(units)} preset units: "
          f"{(time.perf_counter() - t0) * 1e3:.1f} ms")


def bench_search(tokens: int) -> None:
    import contextlib
    import io
    import os

    from precisim.emulation import load_model
    from precisim.eval.search import Budget, SearchProblem, search

    data = os.environ.get("PRECISIM_DATA") or "../shared/data/wikitext-2-raw/wiki.test.raw"
    with contextlib.redirect_stderr(io.StringIO()):
        model, tok = load_model("smollm2")
    p = SearchProblem(candidates=("nvfp4", "mxfp8"), budget=Budget("delta_ppl", 1.0),
                      search_tokens=tokens, heldout_tokens=tokens)
    t0 = time.perf_counter()
    r = search(model, tok, data, p)
    total = time.perf_counter() - t0
    print(f"search on SmolLM2, {tokens} search + {tokens} held-out tokens: {total:.0f} s "
          f"(target < 1800 s): " + ", ".join(f"{k} {v:.0f} s" for k, v in r.seconds.items()))
    print(r.table())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--search", action="store_true")
    ap.add_argument("--search-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    bench_perf(a.repeats)
    if a.search:
        bench_search(a.search_tokens)


if __name__ == "__main__":
    main()
