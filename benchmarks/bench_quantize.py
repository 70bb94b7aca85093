"""Quantize throughput on a 4096x4096 float32 CPU tensor (issue: formats speed).

Prints Melem/s per format and ratios against baselines measured in the same run:
``x.clone()`` (same bytes in and out as a fake-quantization) and, where torch has a native
cast, torch's own fake-quantization round trip ``x.to(dtype).to(float32)`` and the one-way
cast ``x.to(dtype)``. Targets (issue 2): every ratio to clone >= 0.5, and at least torch's
round trip where it has one.

Each repetition times the baselines and the format back to back, and a ratio is the median
over the repetitions of the ratio within one repetition: on a shared, busy machine the load
drifts from one second to the next, and ratios taken this way follow it much better than a
ratio of two medians measured apart. The warm-up (first call, including torch.compile's
one-off compilation) is reported separately.

Most of a 4096x4096 fake-quantization, like of a clone, is the first touch of the fresh 64 MB
output (page faults), so a ratio near 1 means the kernel's arithmetic is hidden behind it.

    python benchmarks/bench_quantize.py [--size 4096] [--repeats 9] [--backend auto|eager]
                                        [--threads N] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from precisim.formats import quantize, set_backend
from precisim.formats.scaling import quantize_scaled


def once(fn: Callable[[], object]) -> float:
    """Seconds for one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cases(x: torch.Tensor) -> list[tuple[str, Callable[[], object], torch.dtype | None]]:
    """(name, fake-quantization, torch dtype with a native cast or None)."""
    return [
        ("fp8 e4m3", lambda: quantize(x, "e4m3"), torch.float8_e4m3fn),
        ("fp8 e5m2", lambda: quantize(x, "e5m2"), torch.float8_e5m2),
        ("fp6 e3m2", lambda: quantize(x, "e3m2"), None),
        ("fp4 e2m1", lambda: quantize(x, "e2m1"), None),
        ("e5m7", lambda: quantize(x, "e5m7"), None),
        ("bf16", lambda: quantize(x, "bf16"), torch.bfloat16),
        ("mxfp8", lambda: quantize_scaled(x, "mxfp8"), None),
        ("mxfp6", lambda: quantize_scaled(x, "mxfp6"), None),
        ("mxfp4", lambda: quantize_scaled(x, "mxfp4"), None),
        ("nvfp4", lambda: quantize_scaled(x, "nvfp4"), None),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--backend", default="auto", choices=["auto", "eager", "compile"])
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch default)")
    ap.add_argument("--only", nargs="*", default=None, help="format names to run (default all)")
    args = ap.parse_args()
    set_backend(args.backend)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.size, args.size)
    n = x.numel()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, backend "
          f"{args.backend}, tensor {args.size}x{args.size} float32, median of {args.repeats} "
          "interleaved repetitions")
    clone = x.clone
    for _ in range(2):
        clone()
    header = (f"{'format':10} {'ms':>7} {'Melem/s':>8} {'vs clone':>9} {'vs torch':>9} "
              f"{'vs cast':>8} {'compile s':>9}")
    print(header)
    print("-" * len(header))
    clone_times = []
    for name, fn, native in cases(x):
        if args.only and name not in args.only:
            continue
        warm = once(fn)
        fn()
        rt = (lambda native=native: x.to(native).to(torch.float32)) if native else None
        cast = (lambda native=native: x.to(native)) if native else None
        t_fn, r_clone, r_rt, r_cast = [], [], [], []
        for _ in range(args.repeats):
            tc = once(clone)
            tq = once(fn)
            t_fn.append(tq)
            clone_times.append(tc)
            r_clone.append(tc / tq)
            if native is not None:
                r_rt.append(once(rt) / tq)
                r_cast.append(once(cast) / tq)
        t = statistics.median(t_fn)
        rt_s = f"{statistics.median(r_rt):8.2f}x" if r_rt else ""
        cast_s = f"{statistics.median(r_cast):7.2f}x" if r_cast else ""
        print(f"{name:10} {t * 1e3:7.1f} {n / t / 1e6:8.0f} {statistics.median(r_clone):8.2f}x "
              f"{rt_s:>9} {cast_s:>8} {warm:9.1f}")
    if clone_times:
        tc = statistics.median(clone_times)
        print(f"\nbaseline x.clone(): {tc * 1e3:.1f} ms ({n / tc / 1e6:.0f} Melem/s), median over "
              "all repetitions")
    print("'vs clone' = time(x.clone()) / time(quantize): 1.0 means as fast as a copy.")
    print("'vs torch' = time(x.to(dtype).to(fp32)) / time(quantize): torch's fake-quant round "
          "trip.")
    print("'vs cast'  = time(x.to(dtype)) / time(quantize): torch's one-way cast (narrow "
          "output).")


if __name__ == "__main__":
    main()
