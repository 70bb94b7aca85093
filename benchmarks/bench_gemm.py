"""GEMM benchmark for the matrix-unit emulation (issue 3).

Times ``precisim.emulation.matmul`` on a 512x512 by 512x4096 product (1.07e9 products) under
the H100-FP8 (E4M3) and H100-bf16 units, in both fidelities, and ``torch.matmul`` in fp32 on
the same inputs in the same run; prints products/s and the ratio to the fp32 matmul, plus
the fast mode's divergence from bit-exact (fraction of outputs that differ, max ulp).

    python benchmarks/bench_gemm.py [--m 512 --k 512 --n 4096 --threads 0 --repeat 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from precisim.emulation.matmul import matmul
from precisim.emulation.presets import get_unit
from precisim.formats import quantize


def _time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=512)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--units", default="h100-e4m3,h100-bf16")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    products = args.m * args.k * args.n
    print(f"A {args.m}x{args.k} @ B {args.k}x{args.n}: {products:.3g} products, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(0)
    for name in args.units.split(","):
        unit = get_unit(name)
        a = quantize(torch.randn(args.m, args.k, generator=g), unit.a_format)
        b = quantize(torch.randn(args.k, args.n, generator=g), unit.b_format)
        torch.matmul(a, b)
        t32 = _time(lambda a=a, b=b: torch.matmul(a, b), max(3, args.repeat))
        print(f"{name:12s} torch.matmul fp32: {t32:8.4f} s  {products / t32:10.3g} products/s")
        results = {}
        for fid in ("bit-exact", "fast"):
            matmul(a[:8], b, unit, fidelity=fid)  # warm-up
            out = {}

            def run(fid=fid, out=out, a=a, b=b, unit=unit):
                out["d"] = matmul(a, b, unit, fidelity=fid)

            t = _time(run, args.repeat)
            results[fid] = out["d"]
            print(f"{name:12s} {fid:9s}: {t:8.2f} s  {products / t:10.3g} products/s  "
                  f"{t / t32:8.1f}x the fp32 matmul time")
        ex, fa = results["bit-exact"], results["fast"]
        differ = float((ex != fa).float().mean())
        m = unit.block_result_bits if unit.block_result_bits is not None else (
            unit.out_format.man_bits)
        e = torch.frexp(ex.double().abs())[1].to(torch.float64) - 1
        ulp = torch.ldexp(torch.ones_like(e), e - m)
        max_ulp = float(((fa.double() - ex.double()).abs() / ulp).max())
        rel = float((fa.double() - ex.double()).norm() / ex.double().norm())
        print(f"{name:12s} fast vs bit-exact: {differ:.4f} of outputs differ, max {max_ulp:.3g} "
              f"ulp, normwise relative difference {rel:.3g}")


if __name__ == "__main__":
    main()
