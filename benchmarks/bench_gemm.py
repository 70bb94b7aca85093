"""GEMM benchmark for the matrix-unit emulation (issue 3).

Times ``precisim.emulation.matmul`` on a 512x512 by 512x4096 product (1.07e9 products) under
the H100-FP8 (E4M3) and H100-bf16 units, in both fidelities, and ``torch.matmul`` in fp32 on
the same inputs in the same run; prints products/s and the ratio to the fp32 matmul, plus
the fast mode's divergence from bit-exact (fraction of outputs that differ, max ulp,
normwise relative difference, mean relative bias; :func:`precisim.emulation.matmul.divergence`).
With ``--scaled`` it also times ``scaled_matmul`` on an LLM-shaped linear layer
(activations 1x1024x576 against a 1536x576 weight) for MXFP8 on the H100-FP8 unit and
DeepSeek 1x128 / 128x128 FP8 on ``deepseek-fp8``.

    python benchmarks/bench_gemm.py [--m 512 --k 512 --n 4096 --threads 0 --repeat 3]
                                    [--units h100-e4m3,h100-bf16 | --all-units] [--scaled]
                                    [--no-slower] [--clock wall|cpu]

Each bit-exact row names the kernel that computed it (:func:`precisim.emulation.explain`)
and is followed by every slower bit-exact kernel that also computes the call, timed on the same
inputs (its time, the speed-up, and whether the bits agree); ``--no-slower`` skips those
timings (what makes a run over every unit long). ``--all-units`` times every preset unit
(``precisim.emulation.presets.UNITS``), the inputs rounded to each unit's input formats, and
ends with a summary table (products/s of the bit-exact kernel, its name, the time over the
fp32 matmul's). ``--clock cpu`` times with ``time.process_time`` (CPU time of this process:
steadier than wall time on a loaded machine; use it with ``--threads 1``).

Targets on the 2-core CPU (issue 3): bit-exact >= 1e8 products/s; fast within 3x of the fp32
matmul. Timings are the best of ``--repeat`` runs (the machine is shared: medians drift).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from precisim.emulation import (
    available_kernels,
    available_units,
    divergence,
    explain,
    get_unit,
    matmul,
    scaled_matmul,
    use_kernels,
)
from precisim.emulation.scaled import scaled_explain
from precisim.formats import quantize
from precisim.formats.scaling import quantize_scaled

#: the clock of :func:`_time` (``--clock``)
_CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = _clock()
        fn()
        best = min(best, _clock() - t)
    return best


def _other_kernels(name: str, run, out: dict, t_best: float, repeat: int, explain) -> None:
    """Time ``run`` again with each slower bit-exact kernel that also computes this call
    (same run, same inputs; the exact reference is left out) and check the bits agree.
    ``explain(kernel)``: the :class:`~precisim.emulation.Explanation` of the call, restricted
    to ``kernel`` (None: every kernel)."""
    chosen = out["d"]
    best = explain(None).kernel
    print(f"{name:14s} bit-exact kernel: {best}")
    for k in available_kernels("bit-exact"):
        # (a kernel after the chosen one is asked on its own: it may refuse the call)
        if k in (best, "reference") or explain(k).kernel is None:
            continue
        with use_kernels(k):
            t = _time(run, repeat)
        same = torch.equal(out["d"].view(torch.int32), chosen.view(torch.int32))
        print(f"{name:14s} bit-exact, kernel {k}: {t:8.3f} s; {best} is "
              f"{t / t_best:.2f}x faster, {'bit-identical' if same else 'DIFFERENT BITS'}")


def _report(name: str, ex: torch.Tensor, fa: torch.Tensor, unit) -> None:
    r = divergence(ex, fa, unit)
    print(f"{name:14s} fast vs bit-exact: {r['fraction_differ']:.4f} of outputs differ, max "
          f"{r['max_ulp']:.3g} ulp, normwise relative difference {r['normwise_relative']:.3g}, "
          f"mean relative bias {r['mean_relative_bias']:.2g}")


def _gemms(args) -> list[tuple[str, str, float, float]]:
    """Time every unit of ``args``; returns (unit, bit-exact kernel, bit-exact products/s,
    bit-exact time / fp32 matmul time) per unit."""
    products = args.m * args.k * args.n
    g = torch.Generator().manual_seed(0)
    names = available_units() if args.all_units else args.units.split(",")
    rows = []
    for name in names:
        unit = get_unit(name)
        a = quantize(torch.randn(args.m, args.k, generator=g), unit.a_format)
        b = quantize(torch.randn(args.k, args.n, generator=g), unit.b_format)
        torch.matmul(a, b)
        t32 = _time(lambda a=a, b=b: torch.matmul(a, b), max(5, args.repeat))
        print(f"{name:14s} torch.matmul fp32: {t32:8.4f} s  {products / t32:10.3g} products/s")
        results = {}
        for fid in ("bit-exact", "fast"):
            # warm-up on the timed shape: the compiled kernels are built (and self-checked)
            # on their first call of a large batch, not on a small slice
            matmul(a, b, unit, fidelity=fid)
            out = {}

            def run(fid=fid, out=out, a=a, b=b, unit=unit):
                out["d"] = matmul(a, b, unit, fidelity=fid)

            t = _time(run, args.repeat if fid == "bit-exact" else max(5, args.repeat))
            results[fid] = out["d"]
            print(f"{name:14s} {fid:9s}: {t:8.3f} s  {products / t:10.3g} products/s  "
                  f"{t / t32:8.2f}x the fp32 matmul time")
            if fid == "bit-exact":
                kern = explain(a, b, unit).kernel
                rows.append((name, kern, products / t, t / t32))
                if args.no_slower:
                    print(f"{name:14s} bit-exact kernel: {kern}")
                else:
                    _other_kernels(name, run, out, t, args.repeat,
                                   lambda k, a=a, b=b, unit=unit: explain(a, b, unit,
                                                                          kernel=k))
        _report(name, results["bit-exact"], results["fast"], unit)
    return rows


def _summary(rows: list[tuple[str, str, float, float]], target: float) -> None:
    """The bit-exact rows as a markdown table (``target``: the products/s to reach)."""
    print(f"\n| unit | bit-exact kernel | products/s | x fp32 matmul time | >= {target:.0e} |")
    print("|---|---|---:|---:|:---:|")
    for name, kern, rate, ratio in rows:
        print(f"| {name} | {kern} | {rate:.3g} | {ratio:.1f} | "
              f"{'yes' if rate >= target else 'NO'} |")


def _scaled(args) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1024, 576, generator=g)
    w = torch.randn(1536, 576, generator=g) * 0.05
    products = 1024 * 576 * 1536
    xd, wd = x[0], w.T.contiguous()
    t32 = _time(lambda: torch.matmul(xd, wd), max(5, args.repeat))
    print(f"\nscaled_matmul, (1, 1024, 576) x (1536, 576)^T: {products:.3g} products; torch.matmul "
          f"fp32: {t32:.4f} s")
    for fa, fw, unit in (("mxfp8", "mxfp8", "h100-e4m3"),
                         ("fp8_1x128", "fp8_128x128", "deepseek-fp8")):
        a = quantize_scaled(x, fa, return_parts=True)
        b = quantize_scaled(w, fw, return_parts=True)
        res = {}
        for fid in ("bit-exact", "fast"):
            out = {}

            def run(fid=fid, out=out, a=a, b=b, unit=unit):
                out["d"] = scaled_matmul(a, b, unit, fidelity=fid)

            run()  # warm-up: the compiled kernels are built on the first full-size call
            t = _time(run, args.repeat if fid == "bit-exact" else max(5, args.repeat))
            res[fid] = out["d"]
            print(f"{fa + '/' + unit:24s} {fid:9s}: {t:8.3f} s  {products / t:10.3g} products/s"
                  f"  {t / t32:8.2f}x the fp32 matmul time")
            if fid == "bit-exact":
                _other_kernels(unit, run, out, t, args.repeat,
                               lambda k, a=a, b=b, unit=unit: scaled_explain(a, b, unit,
                                                                             kernel=k))
        _report(unit, res["bit-exact"], res["fast"], get_unit(unit))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=512)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=1, help="runs per timing (best is kept)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--units", default="h100-e4m3,h100-bf16")
    p.add_argument("--all-units", action="store_true",
                   help="every preset unit (overrides --units) and a summary table")
    p.add_argument("--no-slower", action="store_true",
                   help="do not time the slower bit-exact kernels")
    p.add_argument("--clock", choices=sorted(_CLOCK), default="wall",
                   help="wall: perf_counter; cpu: process_time (CPU time of the process)")
    p.add_argument("--target", type=float, default=1e9,
                   help="bit-exact products/s marked as reached in the summary")
    p.add_argument("--scaled", action="store_true", help="also time scaled_matmul")
    args = p.parse_args()
    global _clock
    _clock = _CLOCK[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"A {args.m}x{args.k} @ B {args.k}x{args.n}: {args.m * args.k * args.n:.3g} products, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    rows = _gemms(args)
    if args.all_units:
        _summary(rows, args.target)
    if args.scaled:
        _scaled(args)


if __name__ == "__main__":
    main()
