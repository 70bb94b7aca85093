"""Per-op-kind cost of the ``+units`` / ``+stream`` recipes of benchmarks/bench_model.py (issue 15):
one SmolLM2 forward under a recipe that sets only one op kind (softmax-exact, rmsnorm, silu,
glu bf16, residual bf16; docs/arithmetic.md sections 7.8 and 7.9), each repetition interleaved
with the unpatched forward. Prints the median of the per-repetition extra cost as a multiple of
the unpatched forward (ratios only: ``time.process_time`` with one thread, so a loaded machine
changes the work measured little).

    python benchmarks/bench_model_units.py [--tokens 512] [--repeats 2] [--data PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_model import DEFAULT_DATA
from precisim.emulation import Emulation, Recipe, load_model
from precisim.eval import load_text, tokenize

CASES = [("softmax-exact", {"softmax": "softmax-exact"}),
         ("rmsnorm", {"normalization": "rmsnorm"}), ("silu", {"activation": "silu"}),
         ("glu bf16", {"glu": "bf16"}), ("residual bf16", {"residual": "bf16"})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", default=os.environ.get("PRECISIM_DATA", str(DEFAULT_DATA)))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("smollm2")
    ids = torch.tensor(tokenize(tok, load_text(args.data).text, max_tokens=args.tokens))[None]
    clock = time.process_time

    def forward() -> None:
        model(ids, use_cache=False)

    with torch.no_grad():
        forward()
        for name, kinds in CASES:
            em = Emulation(model, Recipe("p-" + name.replace(" ", "-"), **kinds),
                           telemetry=False)
            with em:
                forward()  # warm-up (compilation)
            ratios = []
            for _ in range(args.repeats):
                t0 = clock()
                forward()
                base = clock() - t0
                t0 = clock()
                with em:
                    forward()
                ratios.append((clock() - t0) / base)
            print(f"{name:15} +{statistics.median(ratios) - 1:5.2f}x the unpatched forward "
                  f"(unpatched {base:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
