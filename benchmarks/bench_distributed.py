"""Distributed evaluation, reproducible mode and large checkpoints (docs/reproducibility.md).

    python benchmarks/bench_distributed.py [--tokens 1024] [--window 128] [--recipe mxfp8]
        [--skip-memory] [--out docs/bench-distributed.md]

Three measurements, each a ratio against a baseline measured in the same run:

1. **Scaling**: evaluation windows per second of ``precisim.eval.perplexity.evaluate`` on
   SmolLM2-135M (WikiText-2, the reference plus one recipe), one process vs two torchrun ranks
   (gloo), one thread per rank, model loading excluded (timed between barriers). Target >= 1.7x.
2. **Reproducible mode**: the same single-process evaluation with the pins of
   :data:`precisim.eval.numerics.PINS` vs native code paths (alternating, best of 2 each).
   Target <= 1.3x.
3. **Memory of a large checkpoint**: a randomly initialised 1.1B-parameter Llama (TinyLlama-1.1B
   shape) in bf16, one forward of 128 tokens under the recipe; peak resident memory (VmHWM, reset
   after the model is built) minus the resident size before the model, over the model's bf16
   size: with the quantized-weight cache unbounded and with a budget of a quarter of the
   model's size. Target <= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
DATA = HERE.parents[1] / "../shared/data/wikitext-2-raw/wiki.test.raw"


# -- workers (run in their own processes) ------------------------------------------------------

def _eval_worker(args: argparse.Namespace) -> None:
    import torch
    from precisim.emulation import load_model
    from precisim.eval import load_text, tokenize
    from precisim.eval.distributed import current, init_from_env
    from precisim.eval.numerics import pinned
    from precisim.eval.perplexity import evaluate

    torch.set_num_threads(1)
    grp = init_from_env()
    model, tok = load_model("smollm2")
    ids = tokenize(tok, load_text(args.data).text, args.tokens)
    if grp.active:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    res = evaluate(model, ids, [args.recipe], window=args.window, bootstrap=0, group=current(),
                   telemetry=False)
    if grp.active:
        torch.distributed.barrier()
    sec = time.perf_counter() - t0
    if grp.rank == 0:
        print(json.dumps({"seconds": sec, "windows": -(-len(ids) // args.window),
                          "world": grp.world_size, "pinned": pinned(),
                          "kl": float(res.results[0].metrics["kl"])}))


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_worker(args: argparse.Namespace) -> None:
    import torch
    import transformers
    from precisim.emulation import emulate

    torch.set_num_threads(2)
    base = _rss_kib("VmRSS")
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                   num_hidden_layers=22, num_attention_heads=32,
                                   num_key_value_heads=4, max_position_embeddings=2048)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
        model.model.rotary_emb.__init__(cfg)  # its buffers (meta until now)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = None if args.budget < 0 else int(args.budget * model_bytes)
    ids = torch.randint(0, cfg.vocab_size, (1, 128), generator=g)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    with torch.no_grad(), emulate(model, args.recipe, weight_cache_bytes=budget,
                                  telemetry=False) as em:
        model(ids)
        cached = em.cache_bytes()
    peak = _rss_kib("VmHWM")
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()),
                      "model_bytes": model_bytes, "peak_over_model":
                      (peak - base) * 1024 / model_bytes, "cache_bytes": cached,
                      "budget": budget}))


# -- driver -----------------------------------------------------------------------------------

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str]) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _env(pinned: bool) -> dict[str, str]:
    from precisim.eval.numerics import PINS

    env = {k: v for k, v in os.environ.items() if k not in PINS}
    env["OMP_NUM_THREADS"] = "1"
    if pinned:
        env.update(PINS)
    return env


def _eval(args: argparse.Namespace, world: int, pinned: bool) -> dict:
    worker = [str(HERE), "--worker", "eval", "--tokens", str(args.tokens), "--window",
              str(args.window), "--recipe", args.recipe, "--data", str(args.data)]
    if world == 1:
        return _run([sys.executable, *worker], _env(pinned))
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                 "--master-addr", "127.0.0.1", "--master-port", str(_port()), *worker],
                _env(pinned))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--recipe", default="mxfp8")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", choices=("eval", "memory"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "eval":
        _eval_worker(args)
        return 0
    if args.worker == "memory":
        _memory_worker(args)
        return 0

    rows = []
    one, two = _eval(args, 1, True), _eval(args, 2, True)
    assert one["kl"] == two["kl"], (one, two)  # same bits at any world size
    rate1, rate2 = one["windows"] / one["seconds"], two["windows"] / two["seconds"]
    rows.append(("windows/s, 2 ranks vs 1 (1 thread each, pinned)",
                 f"{rate1:.2f} -> {rate2:.2f}", f"{rate2 / rate1:.2f}x", ">= 1.7x"))
    times = {True: [], False: []}
    for _ in range(2):
        for pin in (False, True):
            times[pin].append(_eval(args, 1, pin)["seconds"])
    ratio = min(times[True]) / min(times[False])
    rows.append(("reproducible vs native (1 process, 1 thread)",
                 f"{min(times[False]):.1f} s -> {min(times[True]):.1f} s", f"{ratio:.2f}x",
                 "<= 1.3x"))
    if not args.skip_memory:
        for budget, label in ((-1, "cache unbounded"), (0.25, "cache budget 1/4 of the model")):
            m = _run([sys.executable, str(HERE), "--worker", "memory", "--recipe", args.recipe,
                      "--budget", str(budget)], dict(os.environ))
            rows.append((f"1.1B Llama bf16, {args.recipe}, peak memory over model size "
                         f"({label})", f"{m['model_bytes'] / 1e9:.2f} GB model, cache "
                         f"{m['cache_bytes'] / 1e9:.2f} GB", f"{m['peak_over_model']:.2f}x",
                         "<= 1.5x"))
    head = (f"bench_distributed: SmolLM2-135M, {args.tokens} tokens, window {args.window}, "
            f"{args.recipe}; {os.cpu_count()} CPUs")
    table = "\n".join([head, "", "| measurement | values | ratio | target |", "|---|---|---:|---|",
                       *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
