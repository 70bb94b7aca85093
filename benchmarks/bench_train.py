"""One training step under training recipes vs unpatched PyTorch (docs/training.md).

    python benchmarks/bench_train.py [--recipes bf16-train,mxfp8-ceil-train,...] [--repeat 3]
        [--layers 2] [--hidden 256] [--tokens 512] [--json out.json]

Each configuration runs in its own process (one thread): a randomly initialised Llama
(vocabulary 4096, so the high-precision lm_head does not hide the linear layers; MLP width
3 x hidden, a multiple of the 128x128 DeepSeek weight blocks), one warm-up
step, then ``--repeat`` timed steps (forward, backward, AdamW) on ``--tokens`` tokens (batches
of 128); the median step time and the peak resident memory (VmHWM after the model is built
and warmed up, minus the resident size before the model) are reported, and each recipe's
ratio to the unpatched step of the same run. Kernels of at least ``--compile-min-numel``
elements run compiled (default 2^16, what ``precisim.eval.train`` uses in training).
``fp8-attention-train`` adds the attention matmuls' FP8 forward and their four backward GEMMs
(docs/training.md section 1b) to ``fp8-tensor-train``. Targets (the issue): fake-quant
recipes <= 3x, bit-exact accumulator recipes
(``deepseek-fp8-train``) <= 25x. Do not time while other heavy jobs share the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

DEFAULT = ("bf16-train,fp8-tensor-train,mxfp8-floor-train,mxfp8-ceil-train,nvfp4-train,"
           "fp8-attention-train,deepseek-fp8-train")


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _worker(args: argparse.Namespace) -> None:
    import torch
    import transformers
    from precisim.emulation import emulate
    from precisim.emulation.training import seed_scope
    from precisim.formats import kernels

    torch.set_num_threads(1)
    kernels.COMPILE_MIN_NUMEL = args.compile_min_numel
    base = _rss("VmRSS")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=args.hidden,
                                   intermediate_size=args.hidden * 3,
                                   num_hidden_layers=args.layers, num_attention_heads=4,
                                   max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 4096, (args.tokens // 128, 128))
    em = emulate(model, args.worker, warn=False) if args.worker != "unpatched" else None
    if em is not None:
        em.apply()
    times = []
    for step in range(args.repeat + 1):
        t0 = time.perf_counter()
        with seed_scope(0, step):
            model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"recipe": args.worker, "seconds": statistics.median(times),
                      "peak_bytes": _rss("VmHWM") - base}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", default=DEFAULT)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--json", default=None)
    p.add_argument("--compile-min-numel", type=int, default=1 << 16,
                   help="compile kernels from this many elements (default 65536, as "
                   "precisim.eval.train.TRAIN_COMPILE_MIN_NUMEL; the inference default is 262144)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    rows = []
    for r in ["unpatched", *args.recipes.split(",")]:
        cmd = [sys.executable, __file__, "--worker", r, "--repeat", str(args.repeat),
               "--layers", str(args.layers), "--hidden", str(args.hidden), "--tokens",
               str(args.tokens), "--compile-min-numel", str(args.compile_min_numel)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    print("| recipe | step (s) | ratio | peak memory (MiB) | memory ratio |\n|---|---|---|---|---|")
    for row in rows:
        row["ratio"] = row["seconds"] / base["seconds"]
        row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"]
        print(f"| {row['recipe']} | {row['seconds']:.3f} | {row['ratio']:.2f}x | "
              f"{row['peak_bytes'] / 2**20:.0f} | {row['memory_ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
