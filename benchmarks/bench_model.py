"""A real model's forward pass, unpatched vs emulated (issue: emulate real LLMs).

SmolLM2-135M (the test model) on one 1024-token WikiText-2 sequence: the unpatched forward
(the model's own attention, sdpa) against the same forward under ``mxfp8``, ``mxfp4``,
``nvfp4`` (fake-quant GEMMs) and ``deepseek-fp8`` with its accumulator model in both
fidelities. Targets (issues 4 and 12): fake-quant recipes <= 1.5x the unpatched forward,
telemetry on or off; bit-exact accumulator recipes <= 10x (issue 4 asked <= 20x). ``attn:NAME``
rows run every attention call through the attention datapath NAME
(docs/attention-datapath.md; its QK/PV GEMMs fake-quant, P quantized): target <= 3x;
``attn:NAME@exact`` puts both GEMMs on the bit-exact ``h100-e4m3`` matrix unit:
target <= 25x (issue 16).

Each repetition runs the unpatched forward and then every recipe back to back; a recipe's
ratio is the median over repetitions of its time divided by the unpatched time of the same
repetition (on a shared machine the load drifts; ratios taken this way follow it). The first
call of each recipe (quantizing and caching the weights, torch.compile's one-off compilation)
is reported separately as the warm-up. Telemetry is off unless ``--telemetry``; with it, one
more row per recipe reports the cost of the counters.

Timed forwards run back to back on the heap the previous forwards left, as in an evaluation
loop. Peak memory is measured in one more forward per row after the timings: the largest
resident-set size sampled (every 2 ms) during it, minus the resident size just before it,
after returning freed heap to the OS (``malloc_trim``): the forward's own working memory,
plus, under emulation, the quantized weight cache on its first call. (Until 2026-12-04 every
timed forward was also the memory run, trimmed first and sampled, so it faulted its whole
working memory in again: deepseek-fp8 bit-exact measured 21.2 s that way against 19.1 s
with glibc's own trimming turned off, the unpatched forward 1.99 s and 1.98 s.)

    python benchmarks/bench_model.py [--model smollm2] [--data PATH] [--tokens 1024]
        [--repeats 3] [--exact-repeats 1] [--threads N] [--clock wall|process|thread]
        [--recipes mxfp8,...] [--telemetry]
        [--out docs/bench-model.md]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from precisim.emulation import Emulation, Recipe, get_recipe, load_model
from precisim.eval import load_text, tokenize

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / \
    "wikitext-2-raw" / "wiki.test.raw"
DEFAULT_RECIPES = ("mxfp8,mxfp4,nvfp4,deepseek-fp8@fast,deepseek-fp8,mxfp8+units,"
                   "mxfp8+units+stream,attn:fa3-fp8,attn:fa4-fp8-fixed,attn:fa3-fp8@exact")
#: attn:NAME@exact: the datapath's QK and PV GEMMs on this bit-exact matrix unit (E4M3 operands)
EXACT_ATTN = {"input": "e4m3", "weight": "e4m3", "unit": "h100-e4m3"}
#: NAME+units: the recipe plus correctly rounded softmax, RMSNorm and SiLU units
#: (docs/arithmetic.md section 7.8; issue 15's target: <= 2x the unpatched forward)
UNITS = {"softmax": "softmax-exact", "normalization": "rmsnorm", "activation": "silu"}
#: NAME+stream: the SwiGLU product and the residual adds rounded to bf16 (section 7.9)
STREAM = {"glu": "bf16", "residual": "bf16"}
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _trim() -> None:
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Largest resident size above the starting one while the block runs (sampled)."""

    def __enter__(self) -> PeakRSS:
        _trim()
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


#: the clock of :func:`timed` (``--clock process``: time.process_time, the CPU time of this
#: process, which on a loaded machine follows the work done rather than the cores obtained;
#: ``--clock thread``: time.thread_time, the same for the main thread alone)
CLOCK = time.perf_counter


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call, on the heap as the previous calls left it (no trim, no sampler)."""
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def timed_peak(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds, peak extra MiB) of one call after returning freed heap to the OS."""
    with PeakRSS() as m:
        t0 = CLOCK()
        fn()
        dt = CLOCK() - t0
    return dt, m.extra_mb


def _attention_case(model: torch.nn.Module, spec: str
                    ) -> tuple[str, Emulation, bool]:
    """``NAME`` or ``NAME@exact``: a recipe whose every attention call runs the attention
    datapath NAME (docs/attention-datapath.md), with @exact its QK and PV on a bit-exact unit."""
    name, _, fid = spec.partition("@")
    if fid not in ("", "exact"):
        raise SystemExit(f"error: attn:{spec}: the suffix must be @exact, got @{fid}")
    att: dict[str, object] = {"datapath": name}
    if fid:
        att.update(qk=EXACT_ATTN, pv=EXACT_ATTN)
    r = Recipe(f"attn-{name}{'-exact' if fid else ''}", attention=att)
    label = (f"attention datapath {name} "
             f"({'QK/PV bit-exact h100-e4m3' if fid else 'QK/PV fake quant'})")
    return label, Emulation(model, r, telemetry=False), bool(fid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=os.environ.get("PRECISIM_DATA", str(DEFAULT_DATA)))
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--exact-repeats", type=int, default=1,
                    help="repetitions of recipes with a bit-exact matrix unit (slow)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--recipes", default=DEFAULT_RECIPES,
                    help="comma-separated; NAME@fast runs the recipe's matrix units fast; "
                    "NAME+units adds emulated softmax, RMSNorm and SiLU units; +stream "
                    "rounds the SwiGLU product and the residual adds to bf16; attn:DATAPATH "
                    "runs attention through an attention datapath (attn:DATAPATH@exact: its "
                    "QK/PV on the bit-exact h100-e4m3 unit)")
    ap.add_argument("--telemetry", action="store_true", help="also time with telemetry on")
    ap.add_argument("--out", help="also write the table (Markdown) to this file")
    ap.add_argument("--clock", choices=("wall", "process", "thread"), default="wall",
                    help="process: time.process_time, thread: time.thread_time (the main "
                    "thread's CPU time, without the memory sampler's; use with --threads 1 on "
                    "a loaded machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock != "wall":
        global CLOCK
        CLOCK = time.process_time if args.clock == "process" else time.thread_time

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    load_s = time.perf_counter() - t0
    ids = torch.tensor(tokenize(tok, load_text(args.data).text, max_tokens=args.tokens))[None]
    print(f"model {args.model} loaded in {load_s:.1f} s; {ids.shape[1]} tokens from "
          f"{args.data}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"attention {model.config._attn_implementation}\n")

    cases: list[tuple[str, Emulation, bool]] = []
    for spec in args.recipes.split(","):
        if spec.strip().startswith("attn:"):
            cases.append(_attention_case(model, spec.strip()[5:]))
            continue
        spec, *extras = spec.strip().split("+")
        bad = [e for e in extras if e not in ("units", "stream")]
        if bad:
            ap.error(f"--recipes: unknown suffix '+{bad[0]}'; accepted +units, +stream")
        name, _, fid = spec.partition("@")
        r = get_recipe(name)
        if fid:
            r = r.with_fidelity(fid)
        exact = r.with_fidelity("fast") != r  # some matrix unit runs bit-exact
        label = f"{name} ({'bit-exact' if exact else 'fast' if fid else 'fake quant'})"
        if "units" in extras:
            r = r.with_(name=f"{r.name}+units", **UNITS)
            label += " + softmax/norm/SiLU units"
        if "stream" in extras:
            r = r.with_(name=f"{r.name}+stream", **STREAM)
            label += " + bf16 SwiGLU product/residual adds"
        cases.append((label, Emulation(model, r, telemetry=False), exact))
        if args.telemetry:
            cases.append((label + " +telemetry", Emulation(model, r, telemetry=True), exact))

    def forward() -> None:
        model(ids, use_cache=False)

    def under(em: Emulation) -> Callable[[], None]:
        def run() -> None:
            with em:
                forward()
        return run

    times: dict[str, list[float]] = {c[0]: [] for c in cases}
    ratios: dict[str, list[float]] = {c[0]: [] for c in cases}
    mem: dict[str, float] = {}
    warm: dict[str, float] = {}
    base: list[float] = []
    with torch.no_grad():
        forward()  # warm the unpatched path
        for label, em, _ in cases:
            warm[label], mem[label + " (first call)"] = timed_peak(under(em))
            print(f"  warm-up {label}: {warm[label]:.1f} s", flush=True)
        for rep in range(args.repeats):
            b = timed(forward)
            base.append(b)
            for label, em, exact in cases:
                if exact and rep >= args.exact_repeats:
                    continue
                t = timed(under(em))
                times[label].append(t)
                ratios[label].append(t / b)
            print(f"  repetition {rep + 1}/{args.repeats} done (unpatched {b:.2f} s)", flush=True)
        # peak memory: one more forward each, after the timings, from a trimmed heap
        mem["unpatched"] = timed_peak(forward)[1]
        for label, em, _ in cases:
            mem[label] = timed_peak(under(em))[1]

    lines = [
        f"SmolLM2-135M ({args.model}), one {ids.shape[1]}-token forward, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; {args.repeats} interleaved "
        f"repetitions ({args.exact_repeats} for bit-exact recipes)",
        "",
        "| forward | seconds (median) | x unpatched (median of per-repetition ratios) | "
        "target | peak extra MiB | first call s |",
        "|---|---|---|---|---|---|",
        f"| unpatched ({model.config._attn_implementation}) | {statistics.median(base):.2f} | "
        f"1.00 | | {mem['unpatched']:.0f} | |"]
    for label, _, exact in cases:
        # issue 12: fake quant <= 1.5x (telemetry on or off), bit-exact units <= 10x (issue 4
        # had 20x; a unit's fast model: no target);
        # issue 15: fake quant plus the emulated softmax / norm / activation units <= 2x
        # issue 16: attention datapath with fake-quant QK/PV <= 3x, bit-exact QK/PV <= 25x
        if label.startswith("attention datapath"):
            target = 25.0 if exact else 3.0
        else:
            target = 10.0 if exact else None if "(fast)" in label else \
                2.0 if "units" in label or "residual" in label else 1.5
        r = statistics.median(ratios[label])
        goal = "" if target is None else f"<= {target:g} {'ok' if r <= target else 'MISSED'}"
        lines.append(f"| {label} | {statistics.median(times[label]):.2f} | {r:.2f} | {goal} | "
                     f"{mem[label]:.0f} | {warm[label]:.1f} |")
    lines += ["", "peak extra MiB on the first call (weights quantized): " + ", ".join(
        f"{k.removesuffix(' (first call)')} {v:.0f}" for k, v in mem.items()
        if k.endswith("(first call)"))]
    text = "\n".join(lines) + "\n"
    print("\n" + text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"written to {args.out}")

if __name__ == "__main__":
    main()
