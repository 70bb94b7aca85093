"""``precisim demo``: quantization error of every headline format on a heavy-tailed tensor.

On a 1024x4096 weight-like tensor (Student-t, 4 degrees of freedom, the heavy tails LLM weights
and activations have) it shows the storage cost and the error of each element and block-scaled
format (the README's "Demo" table). Formats only: no model, no matrix unit.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from .catalog import get_format
from .quantize import quantize
from .scaling import get_scaled_format, quantize_scaled

ROWS: list[tuple[str, str, str | None]] = [
    # label, kind, rule
    ("bf16", "elem", None),
    ("e4m3", "elem", None),
    ("fp8_tensor", "scaled", None),
    ("fp8_1x128", "scaled", None),
    ("mxfp8", "scaled", "floor"),
    ("mxfp8", "scaled", "rceil"),
    ("mxfp6_e2m3", "scaled", "floor"),
    ("mxfp4", "scaled", "floor"),
    ("mxfp4", "scaled", "rceil"),
    ("mxfp4", "scaled", "even"),
    ("nvfp4", "scaled", None),
    ("int8_channel", "scaled", None),
    ("int4_group128", "scaled", None),
]


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``y`` as an approximation of ``x``, in dB (inf
    when they are equal)."""
    err = (x - y).double().pow(2).sum().item()
    sig = x.double().pow(2).sum().item()
    return math.inf if err == 0 else 10 * math.log10(sig / err)


def demo_table(rows: int = 1024, cols: int = 4096, seed: int = 0) -> str:
    """The demo's Markdown table (format, bits/element, SQNR, relative error, saturation)."""
    torch.manual_seed(seed)
    x = (torch.distributions.StudentT(4.0).sample((rows, cols)) * 0.02).float()
    lines = ["| format | scale rule | bits/elem | SQNR dB | rel. error | max abs error |",
             "|---|---|---|---|---|---|"]
    for name, kind, rule in ROWS:
        if kind == "elem":
            y = quantize(x, name)
            bits = float(get_format(name).bits)
            rule_s = "-"
        else:
            f = get_scaled_format(name, rule)
            y = quantize_scaled(x, f)
            bits = f.bits_per_element
            rule_s = f.rule.value
        rel = ((x - y).norm() / x.norm()).item()
        lines.append(f"| {name} | {rule_s} | {bits:g} | {sqnr_db(x, y):.2f} | {rel:.3e} | "
                     f"{(x - y).abs().max().item():.3e} |")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``precisim demo``."""
    p = sub.add_parser("demo", help="quantization error of the headline formats (formats demo)")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``precisim demo``: print the table and the time it took."""
    t0 = time.perf_counter()
    print(f"Quantization of a {args.rows}x{args.cols} Student-t(4) tensor (seed {args.seed}):\n")
    print(demo_table(args.rows, args.cols, args.seed))
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    return 0
