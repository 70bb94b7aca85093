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

Allocation: the unit and the clone both return a fresh 4096x4096 float32 tensor (64 MiB). glibc
serves such a request by ``mmap`` (it is above the largest dynamic mmap threshold, 32 MiB), so
its first touch page-faults every 4 KiB page (16385 minor faults, about 20-25 ms of kernel
time zeroing pages: most of a clone's cost) -- unless a free region of the heap left by earlier
frees happens to be large enough, in which case the memory is reused warm and the clone takes
3-6 ms instead (the clone-time outliers seen before; which case occurs depended on the
allocation history of the previous unit). To measure both under the same conditions, the bench
fixes glibc's mmap threshold at 1 MiB (``mallopt(M_MMAP_THRESHOLD)``, which also turns off its
dynamic adjustment): every large allocation, of the clone and of the unit alike, is then a
fresh mapping, as a first allocation of this size always is. The ``faults`` column gives the
minor page faults of one unit call (a unit that writes only its output: the clone's 16385); the
``copy ms`` column is ``out.copy_(x)`` into a warm preallocated tensor (no allocation: the
memory-bandwidth floor, for reference; the ratio is to the clone).

Inputs: ``randn * 4`` (rsqrt: its absolute value), so exp and the activations see their
whole interesting range.

``--clock process`` times with ``time.process_time`` (CPU time of this process, all its threads):
on a loaded machine it follows the work done rather than the share of the cores obtained; use it
with ``--threads 1``.

    python benchmarks/bench_functions.py [--size 4096] [--repeats 5] [--only NAME ...]
        [--threads N] [--clock wall|process] [--no-mallopt]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import resource
import statistics
import time
from collections.abc import Callable

import torch
from precisim.emulation.functions import FUNCTION_UNITS
from precisim.emulation.rounded_ops import Rounded
from precisim.formats import kernels

CLOCK = time.perf_counter


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fresh_allocations(threshold: int = 1 << 20) -> bool:
    """Make every allocation of at least ``threshold`` bytes a fresh mmap (glibc's mallopt;
    see the module docstring). False where the C library has no mallopt (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def once(fn: Callable[[], object]) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def faults(fn: Callable[[], object]) -> int:
    """Minor page faults of one call."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


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
    ap.add_argument("--no-mallopt", action="store_true",
                    help="leave glibc's mmap threshold dynamic (clone times then vary 3-30 ms)")
    args = ap.parse_args()
    fresh = False if args.no_mallopt else fresh_allocations()
    global CLOCK
    if args.clock == "process":
        CLOCK = time.process_time
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.size, args.size, generator=g) * 4
    y = torch.randn(args.size, args.size, generator=g) * 4
    print(f"{args.size}x{args.size} float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, "
          f"{'fresh allocations (mmap threshold 1 MiB)' if fresh else 'default allocator'}")
    out = torch.empty_like(x)
    print(f"{'unit':22} {'warm-up s':>9} {'ms':>8} {'clone ms':>9} {'copy ms':>8} "
          f"{'ratio':>7} {'faults':>7} {'bits':>6}")
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
            ratios, ts, tcs, tws = [], [], [], []
            for _ in range(args.repeats):
                tc = once(x.clone)
                t = once(fn)
                tws.append(once(lambda: out.copy_(x)))
                ratios.append(t / tc)
                ts.append(t)
                tcs.append(tc)
            nf = faults(fn)
        finally:
            kernels.set_backend("auto")
        diff = _differ(eager, compiled)
        r = statistics.median(ratios)
        worst = max(worst, r)
        print(f"{name:22} {warm:9.1f} {statistics.median(ts) * 1e3:8.1f} "
              f"{statistics.median(tcs) * 1e3:9.1f} {statistics.median(tws) * 1e3:8.1f} "
              f"{r:6.2f}x {nf:7d} {'same' if diff == 0 else diff:>6}")
    print(f"\nworst ratio {worst:.2f}x (target <= 2x); ratio = time(unit) / time(x.clone()), "
          "median of per-repetition ratios")


if __name__ == "__main__":
    main()
