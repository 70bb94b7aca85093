"""Quantize throughput on a 4096x4096 float32 CPU tensor (issue: formats speed).

Prints Melem/s per format and ratios against baselines measured in the same run:
``x.clone()`` (same bytes in and out as a fake-quantization) and, where torch has a native
cast, torch's own fake-quantization round trip ``x.to(float8).to(float32)`` and the one-way
cast ``x.to(float8)``. Each timing is the median of ``--repeats`` runs after warm-up
(the warm-up includes torch.compile's one-off compilation, reported separately).

    python benchmarks/bench_quantize.py [--size 4096] [--repeats 7] [--backend auto|eager]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from precisim.formats import quantize, set_backend
from precisim.formats.scaling import quantize_scaled


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backend", default="auto", choices=["auto", "eager", "compile"])
    args = ap.parse_args()
    set_backend(args.backend)
    torch.manual_seed(0)
    x = torch.randn(args.size, args.size)
    n = x.numel()
    cases = [
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
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, backend "
          f"{args.backend}, tensor {args.size}x{args.size} float32")
    for _ in range(2):
        x.clone()
    t_clone = timed(lambda: x.clone(), args.repeats)
    print(f"baseline x.clone(): {t_clone * 1e3:.1f} ms ({n / t_clone / 1e6:.0f} Melem/s)")
    header = (f"{'format':10} {'ms':>7} {'Melem/s':>8} {'vs clone':>9} {'vs torch':>9} "
              f"{'vs cast':>8} {'compile s':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    for name, fn, native in cases:
        t0 = time.perf_counter()
        fn()
        warm = time.perf_counter() - t0
        fn()
        t = timed(fn, args.repeats)
        t_clone = timed(lambda: x.clone(), 3)  # re-measured beside each case: noisy machine
        rt = cast = ""
        if native is not None:
            t_rt = timed(lambda native=native: x.to(native).to(torch.float32), args.repeats)
            t_cast = timed(lambda native=native: x.to(native), args.repeats)
            rt = f"{t_rt / t:8.2f}x"
            cast = f"{t_cast / t:7.2f}x"
        rows.append((name, t, t_clone))
        print(f"{name:10} {t * 1e3:7.1f} {n / t / 1e6:8.0f} {t_clone / t:8.2f}x {rt:>9} "
              f"{cast:>8} {warm:9.1f}")
    print("\n'vs clone' = time(x.clone()) / time(quantize): 1.0 means as fast as a copy.")
    print("'vs torch' = time(x.to(fp8).to(fp32)) / time(quantize): torch's fake-quant round trip.")
    print("'vs cast'  = time(x.to(fp8)) / time(quantize): torch's one-way cast (1-byte output).")


if __name__ == "__main__":
    main()
