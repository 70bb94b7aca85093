"""Elementwise function units on a 4096x4096 float32 CPU tensor (issue 15: "elementwise units
run within 2x of x.clone(), compiled and bit-identical to eager").

For every function-unit preset (docs/arithmetic.md section 7.2) and the one-rounding sum and
product of the ``residual`` and ``glu`` op kinds (section 7.9), prints the time of the unit
(its compiled kernel, :func:`precisim.formats.kernels.run`) and its ratio to ``x.clone()``
measured in the same run: each repetition times the clone and the unit back to back and the
ratio reported is the median of the per-repetition ratios (on a shared machine the load drifts
and ratios taken this way follow it; see benchmarks/bench_quantize.py). ``ratio`` =
time(unit) / time(clone): the target is <= 2. The warm-up (first call, including
torch.compile's one-off compilation) is reported separately, and every compiled result is
compared with the eager kernel's bit for bit (``bits`` column: ``same`` or the number of
differing elements).

Inputs: ``randn * 4`` (rsqrt: its absolute value), so exp and the activations see their
whole interesting range.

``--clock process`` times with ``time.process_time`` (CPU time of this process, all its threads):
on a loaded machine it follows the work done rather than the share of the cores obtained; use it
with ``--threads 1``.

    python benchmarks/bench_functions.py [--size 4096] [--repeats 5] [--only NAME ...]
        [--threads N] [--clock wall|process]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from precisim.emulation.functions import FUNCTION_UNITS
from precisim.emulation.rounded_ops import Rounded
from precisim.formats import kernels

CLOCK = time.perf_counter


def once(fn: Callable[[], object]) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def cases(x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    out: list[tuple[str, Callable[[], torch.Tensor]]] = []
    xa = x.abs()
    for name, u in FUNCTION_UNITS.items():
        arg = xa if u.function.value == "rsqrt" else x
        out.append((name, lambda u=u, arg=arg: u(arg)))
    for fmt in ("bf16", "e4m3"):
        r = Rounded(fmt)
        out.append((f"residual-add {fmt}", lambda r=r: r.add(x, y)))
        out.append((f"glu-mul {fmt}", lambda r=r: r.mul(x, y)))
    return out


def _differ(a: torch.Tensor, b: torch.Tensor) -> int:
    a, b = a.double(), b.double()
    same = (a == b) & (torch.signbit(a) == torch.signbit(b)) | (a.isnan() & b.isnan())
    return int((~same).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="names of the cases to run")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "process":
        CLOCK = time.process_time
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.size, args.size, generator=g) * 4
    y = torch.randn(args.size, args.size, generator=g) * 4
    print(f"{args.size}x{args.size} float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock")
    print(f"{'unit':22} {'warm-up s':>9} {'ms':>8} {'clone ms':>9} {'ratio':>7} {'bits':>6}")
    worst = 0.0
    for name, fn in cases(x, y):
        if args.only and name not in args.only:
            continue
        kernels.set_backend("eager")
        try:
            eager = fn()
        finally:
            kernels.set_backend("compile")
        try:
            warm = once(fn)
            compiled = fn()
            ratios, ts, tcs = [], [], []
            for _ in range(args.repeats):
                tc = once(x.clone)
                t = once(fn)
                ratios.append(t / tc)
                ts.append(t)
                tcs.append(tc)
        finally:
            kernels.set_backend("auto")
        diff = _differ(eager, compiled)
        r = statistics.median(ratios)
        worst = max(worst, r)
        print(f"{name:22} {warm:9.1f} {statistics.median(ts) * 1e3:8.1f} "
              f"{statistics.median(tcs) * 1e3:9.1f} {r:6.2f}x "
              f"{'same' if diff == 0 else diff:>6}")
    print(f"\nworst ratio {worst:.2f}x (target <= 2x); ratio = time(unit) / time(x.clone()), "
          "median of per-repetition ratios")


if __name__ == "__main__":
    main()
