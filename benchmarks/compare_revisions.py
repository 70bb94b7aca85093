"""Before/after speed of two revisions of precisim, measured in the same run.

A git worktree of ``--base`` (a commit, branch or tag) is made in a temporary directory and
imported through a path shim; the current checkout is the "after". The same workloads (the
rows of bench_quantize.py, bench_gemm.py and bench_model.py, written against the public API
both revisions share) run in fresh processes, alternating base and head ``--repeats`` times
(the machine is shared: alternation lets both see the same drift); each process times the
second call of each workload (the first compiles). The table reports the median time of each
side and the median of the per-round ratios head/base (below 1: the head is faster).

    python benchmarks/compare_revisions.py --base 18c0584 [--repeats 3]
        [--suites quantize,gemm,model] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

# run in a fresh interpreter: prints {"workload": seconds, ...} as JSON on its last line
WORKLOADS = r'''
import json, sys, time, torch
suites = sys.argv[1].split(",")
data = sys.argv[2]
out = {}

def best(fn, n=3):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return min(ts)

g = torch.Generator().manual_seed(0)
if "quantize" in suites:
    from precisim.formats import quantize
    from precisim.formats.scaling import quantize_scaled
    x = torch.randn(4096, 4096, generator=g)
    for f in ("e4m3", "e2m1", "bf16"):
        out[f"quantize {f}"] = best(lambda f=f: quantize(x, f))
    for f in ("mxfp8", "mxfp4", "nvfp4"):
        out[f"quantize_scaled {f}"] = best(lambda f=f: quantize_scaled(x, f))
if "gemm" in suites:
    from precisim.emulation import matmul, scaled_matmul
    from precisim.formats import quantize
    from precisim.formats.scaling import quantize_scaled
    for unit, fmt in (("h100-e4m3", "e4m3"), ("h100-bf16", "bf16"), ("a100-fp16", "fp16")):
        a = quantize(torch.randn(512, 512, generator=g), fmt)
        b = quantize(torch.randn(512, 4096, generator=g), fmt)
        out[f"matmul {unit} 512x512x4096"] = best(lambda a=a, b=b, u=unit: matmul(a, b, u), 1)
    xs = torch.randn(1, 1024, 576, generator=g)
    ws = torch.randn(1536, 576, generator=g) * 0.05
    for fa, fw, unit in (("mxfp8", "mxfp8", "h100-e4m3"),
                         ("fp8_1x128", "fp8_128x128", "deepseek-fp8")):
        qa = quantize_scaled(xs, fa, return_parts=True)
        qw = quantize_scaled(ws, fw, return_parts=True)
        out[f"scaled_matmul {fa} {unit}"] = best(lambda qa=qa, qw=qw, u=unit:
                                                 scaled_matmul(qa, qw, u), 1)
if "model" in suites:
    from precisim.emulation import Emulation, load_model
    from precisim.eval import load_text, tokenize
    model, tok = load_model("smollm2")
    ids = torch.tensor(tokenize(tok, load_text(data).text, 1024))[None]
    with torch.no_grad():
        out["model unpatched"] = best(lambda: model(ids, use_cache=False), 2)
        for rec, tel in (("mxfp8", False), ("mxfp8", True), ("nvfp4", True),
                         ("deepseek-fp8", False)):
            em = Emulation(model, rec, telemetry=tel)
            def fwd(em=em):
                with em:
                    model(ids, use_cache=False)
            n = 1 if rec == "deepseek-fp8" else 2
            out[f"model {rec}{' +telemetry' if tel else ''}"] = best(fwd, n)
print(json.dumps(out))
'''


def _run(code_dir: Path | None, suites: str, data: str) -> dict[str, float]:
    env = dict(os.environ)
    if code_dir is not None:  # the base: import precisim from its worktree
        env["PYTHONPATH"] = str(code_dir) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", WORKLOADS, suites, data], env=env,
                         capture_output=True, text=True, cwd=ROOT, check=False)
    if res.returncode != 0:
        raise SystemExit(f"workloads failed ({'base' if code_dir else 'head'}):\n"
                         f"{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the 'before' revision (commit, branch, tag)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--suites", default="quantize,gemm,model")
    ap.add_argument("--data", default=os.environ.get("PRECISIM_DATA", str(DATA)))
    ap.add_argument("--out", help="also write the table (Markdown) to this file")
    args = ap.parse_args()
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="precisim-base-") as tmp:
        wt = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(wt), args.base], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            shim = Path(tmp) / "shim"
            shim.mkdir()
            if (wt / "__init__.py").is_file():  # the root is the package precisim
                (shim / "precisim").symlink_to(wt)
            else:  # older layout: a namespace package of the top-level folders
                (shim / "precisim").mkdir()
                for sub in ("formats", "emulation", "eval"):
                    (shim / "precisim" / sub).symlink_to(wt / sub)
            rounds = []
            for i in range(args.repeats):
                base = _run(shim, args.suites, args.data)
                head = _run(None, args.suites, args.data)
                rounds.append((base, head))
                print(f"round {i + 1}/{args.repeats} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT,
                           check=False, capture_output=True)
    import torch

    lines = [f"precisim {head_rev} (head) against {args.base} (base), torch {torch.__version__}"
             f", {torch.get_num_threads()} threads, {args.repeats} alternating rounds of fresh "
             "processes; seconds are medians, the ratio is the median of per-round ratios",
             "", "| workload | base s | head s | head / base |", "|---|---:|---:|---:|"]
    for key in rounds[0][0]:
        b = statistics.median(r[0][key] for r in rounds)
        h = statistics.median(r[1][key] for r in rounds)
        ratio = statistics.median(r[1][key] / r[0][key] for r in rounds)
        lines.append(f"| {key} | {b:.3f} | {h:.3f} | {ratio:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
