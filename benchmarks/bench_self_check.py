"""The cost of the compiled kernels' first-use self-check (docs/errors.md section 3).

Each compiled kernel is compared with its eager twin on its first batch in a process
(``precisim.formats.kernels.self_check``). This runs ``bench_model.py``'s emulated forward
(SmolLM2-135M, one 1024-token WikiText-2 sequence) under each recipe in one process: the
recipe's first call, whose self-check seconds are read from ``kernels.self_check_stats()``
before and after it, then ``--repeats`` steady forwards. The ratio is the self-check seconds
over the median steady emulated forward of the same recipe, both measured in this run (so a
busy machine slows both); the target is under 1%. A kernel shared by two recipes is checked
once, under the first recipe that uses it.

    python benchmarks/bench_self_check.py [--model smollm2] [--data PATH] [--tokens 1024]
        [--repeats 2] [--threads N] [--recipes mxfp8,mxfp4,nvfp4,deepseek-fp8@fast]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_model import DEFAULT_DATA
from precisim.emulation import Emulation, get_recipe, load_model
from precisim.eval import load_text, tokenize
from precisim.formats import kernels

DEFAULT_RECIPES = "mxfp8,mxfp4,nvfp4,deepseek-fp8@fast,deepseek-fp8"
TARGET = 0.01


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=os.environ.get("PRECISIM_DATA", str(DEFAULT_DATA)))
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--recipes", default=DEFAULT_RECIPES,
                    help="comma-separated; NAME@fast runs the recipe's matrix units fast")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not kernels.SELF_CHECK:
        raise SystemExit("error: PRECISIM_KERNEL_SELF_CHECK=0 switches the check off")

    model, tok = load_model(args.model)
    ids = torch.tensor(tokenize(tok, load_text(args.data).text, max_tokens=args.tokens))[None]
    rows = []
    with torch.no_grad():
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        base = time.perf_counter() - t0
        for spec in args.recipes.split(","):
            name, _, fid = spec.strip().partition("@")
            r = get_recipe(name)
            if fid:
                r = r.with_fidelity(fid)
            em = Emulation(model, r, telemetry=False)
            before = kernels.self_check_stats()
            t0 = time.perf_counter()
            with em:
                model(ids, use_cache=False)
            first = time.perf_counter() - t0
            after = kernels.self_check_stats()
            steady = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                with em:
                    model(ids, use_cache=False)
                steady.append(time.perf_counter() - t0)
            fwd = statistics.median(steady)
            check = after["seconds"] - before["seconds"]
            rows.append((spec.strip(), int(after["checked"] - before["checked"]),
                         int(after["failed"] - before["failed"]), check, first, fwd))
            print(f"  {spec.strip()}: done", flush=True)

    load = os.getloadavg()[0]
    print(f"\n{args.model}, {ids.shape[1]} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, backend {kernels.get_backend()}; unpatched "
          f"forward {base:.2f} s; load average {load:.1f} on {os.cpu_count()} CPUs\n")
    print("| recipe | kernels checked | failed | self-check s | first call s | "
          "emulated forward s (median) | self-check / forward | target < 1% |")
    print("|---|---|---|---|---|---|---|---|")
    for spec, n, failed, check, first, fwd in rows:
        ratio = check / fwd
        print(f"| {spec} | {n} | {failed} | {check:.4f} | {first:.2f} | {fwd:.2f} | "
              f"{100 * ratio:.2f}% | {'ok' if ratio < TARGET else 'MISSED'} |")
    total_check = sum(r[3] for r in rows)
    total_fwd = sum(r[5] for r in rows)
    print(f"\nall recipes: {total_check:.4f} s of self-checks for one forward of each "
          f"({total_fwd:.2f} s): {100 * total_check / total_fwd:.2f}%")


if __name__ == "__main__":
    main()
