"""``precisim train``: train a small Llama under recipes x seeds (docs/training.md section 8).

One run per (recipe, seed) in ``--out/<recipe>/seed<N>/`` (checkpoints: a killed command
resumes where each run left off), records in the run store (``--store``, default
``<out>/precisim-runs.sqlite``) and a summary table on stdout: final training and validation
loss per run and, per recipe, the mean validation-loss gap to the first recipe.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from precisim.formats.cli import int_arg

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``precisim train``."""
    p = sub.add_parser(
        "train", help="train a small Llama under training recipes (loss gap, gradient SQNR)",
        description="Train a Llama from a config (or fine-tune --init) for --steps steps per "
        "recipe and seed on a text file (first 90%% of its tokens train, last 10%% "
        "validation); per-step loss, validation loss, per-GEMM gradient SQNR. Results in "
        "the run store.")
    p.add_argument("--recipe", action="append", required=True,
                   help="a recipe (repeatable; the first is the baseline of the gap), e.g. "
                   "bf16-train, mxfp8-floor-train, mxfp8-ceil-train, nvfp4-train, "
                   "deepseek-fp8-train, fp32")
    p.add_argument("--seeds", type=int_arg(1), default=1, help="seeds 0..N-1 (default 1)")
    p.add_argument("--steps", type=int_arg(1), default=100, help="optimizer steps (100)")
    p.add_argument("--data", default="", help="text/jsonl/parquet file (or $PRECISIM_DATA)")
    p.add_argument("--tokenizer", default="smollm2",
                   help="'smollm2' (default) or a local tokenizer directory")
    p.add_argument("--init", default=None, help="a checkpoint to fine-tune (else a new model)")
    for name, default in (("layers", 2), ("hidden", 64), ("heads", 4)):
        p.add_argument(f"--{name}", type=int_arg(1), default=default,
                       help=f"model {name} (default {default})")
    p.add_argument("--kv-heads", type=int_arg(1), default=None, help="key/value heads")
    p.add_argument("--batch", type=int_arg(1), default=8, help="windows per step (8)")
    p.add_argument("--seq", type=int_arg(1), default=64, help="tokens per window (64)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (3e-3)")
    p.add_argument("--val-every", type=int_arg(1), default=10, help="validation interval")
    p.add_argument("--val-batches", type=int_arg(1), default=2,
                   help="validation batches (default 2)")
    p.add_argument("--probe-every", type=int_arg(0), default=0,
                   help="gradient SQNR probe interval (0: off)")
    p.add_argument("--checkpoint-every", type=int_arg(1), default=10, help="checkpoint interval")
    p.add_argument("--master", default="fp32", help="weights: fp32 (default), bf16-sr, bf16-rne")
    p.add_argument("--loss-scale", type=float, default=1.0,
                   help="loss scale (1): static, or the initial one with --dynamic-loss-scale")
    p.add_argument("--dynamic-loss-scale", action="store_true",
                   help="dynamic loss scaling: skip and halve on inf/nan, double after "
                   "--loss-scale-interval finite steps")
    p.add_argument("--loss-scale-interval", type=int_arg(1), default=100,
                   help="finite steps before the dynamic scale grows (100)")
    p.add_argument("--optimizer-states", default="fp32",
                   help="AdamW moments: fp32 (default), bf16, bf16-sr, fp8, fp8-sr")
    p.add_argument("--attention-backward", default=None, metavar="FORMAT",
                   help="the attention matmuls' four backward GEMMs (dq, dk, dp, dv) with every "
                   "operand in FORMAT (e.g. fp8_tensor, mxfp8; 'high': their fp32 GEMMs), for "
                   "every recipe; runs named <recipe>+attn-FORMAT (default: the recipe's own)")
    p.add_argument("--max-tokens", type=int_arg(1), default=None, help="token budget of the text")
    p.add_argument("--vocab", type=int_arg(1), default=None,
                   help="keep the N most frequent training tokens (others -> one id)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--store", default=None, help="run store file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train every (recipe, seed); print one line per run and the gap table."""
    from precisim.emulation import get_recipe

    from .commands import check_out_dir
    from .store import RunStore
    from .train import ModelConfig, TrainConfig, load_tokenizer, train

    for r in args.recipe:
        get_recipe(r)  # unknown names fail before any work
    out = check_out_dir(args.out)
    model = ModelConfig(layers=args.layers, hidden=args.hidden, heads=args.heads,
                        kv_heads=args.kv_heads, max_seq=max(256, args.seq))
    cfgs = [TrainConfig(recipe=r, seed=s, steps=args.steps, data=args.data,
                        tokenizer=args.tokenizer, model=model, init=args.init,
                        batch=args.batch, seq=args.seq, lr=args.lr, val_every=args.val_every,
                        val_batches=args.val_batches,
                        probe_every=args.probe_every, checkpoint_every=args.checkpoint_every,
                        master=args.master, loss_scale=args.loss_scale,
                        max_tokens=args.max_tokens, vocab=args.vocab,
                        dynamic_loss_scale=args.dynamic_loss_scale,
                        loss_scale_interval=args.loss_scale_interval,
                        optimizer_states=args.optimizer_states,
                        attention_backward=args.attention_backward)
            for r in args.recipe for s in range(args.seeds)]
    tok = load_tokenizer(args.tokenizer)
    vals: dict[str, list[float]] = {}
    with RunStore(Path(args.store) if args.store else out / "precisim-runs.sqlite") as store:
        for c in cfgs:
            rec = train(c, out=out / c.name / f"seed{c.seed}", store=store, tokenizer=tok)
            vals.setdefault(c.name, []).append(rec["final_val"])
            print(f"{c.name} seed {c.seed}: loss {rec['final_loss']:.4f} val "
                  f"{rec['final_val']:.4f}")
    first = cfgs[0].name
    base = statistics.fmean(vals[first])
    print(f"\n| recipe | mean val loss | gap to {first} |\n|---|---|---|")
    for r, v in vals.items():
        m = statistics.fmean(v)
        print(f"| {r} | {m:.4f} | {100 * (m - base) / base:+.2f}% |")
    return 0
