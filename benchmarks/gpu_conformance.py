"""GPU conformance: precisim on CUDA gives the same bits as on the CPU (docs/reproducibility.md).

    python benchmarks/gpu_conformance.py [--backend eager|compile] [--out report.md]

Checks, each CPU result against the CUDA result of the same call, bit for bit (float32 bit
patterns, so NaN payloads and signed zeros count):

- every format of the catalog: ``quantize`` of random values over the format's whole range,
  its specials and values around its subnormals, under every rounding mode;
- every scaled format: ``quantize_scaled`` (values, codes and scales), including blocks whose
  E8M0 scale is 2^-127 (a float32 subnormal: Triton flushes such values, pytorch/pytorch#125557)
  and inputs near the block maxima;
- every matrix-unit preset: ``matmul`` of operands in its input format, at both fidelities;
- one model forward: each emulated layer of a tiny Llama under MXFP8, NVFP4 and deepseek-fp8,
  replayed on CUDA with the inputs it saw on the CPU (the unemulated parts - softmax, norms,
  exp - are the device's own kernels and are not compared).

It also measures ``quantize_scaled(x, "mxfp8")`` throughput on a 8192x8192 float32 tensor against
``x.clone()`` (a copy reads and writes every byte once: the memory-bandwidth baseline) in the
same run. Exit status 0 when everything agrees, 1 otherwise; 2 without CUDA (nothing checked).
``tests/test_gpu_readiness.py`` runs the same checks on a CUDA machine and skips them elsewhere.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

ROUNDINGS = ("rne", "rtz", "up", "down", "rna")


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.float().view(torch.int32) if t.is_floating_point() else t.to(torch.int64)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (float32 bit patterns; shapes equal)."""
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _values(fmt: Any, n: int = 1 << 14, seed: int = 0) -> torch.Tensor:
    """Random values over ``fmt``'s range (log-uniform magnitudes, both signs), its subnormal
    region, its maximum and beyond, and the specials."""
    g = torch.Generator().manual_seed(seed)
    hi = float(getattr(fmt, "max_value", 1e4) or 1e4)
    lo = float(getattr(fmt, "min_subnormal", 0.0) or getattr(fmt, "min_normal", 1e-6) or 1e-6)
    e = torch.empty(n).uniform_(torch.log2(torch.tensor(lo)).item() - 2,
                                torch.log2(torch.tensor(hi)).item() + 2, generator=g)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    x = sign * torch.exp2(e)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), hi, -hi,
                             lo, -lo, lo / 2, 1.0, -1.0])
    return torch.cat([x, specials]).float()


def check_formats(device: str = "cuda") -> Iterator[tuple[str, bool]]:
    from precisim.formats import quantize
    from precisim.formats.catalog import catalog

    for fmt in catalog():
        x = _values(fmt)
        for r in ROUNDINGS:
            try:
                cpu = quantize(x, fmt, r)
            except (ValueError, TypeError):
                continue  # a rounding this format does not take: refused on both devices
            yield f"format {fmt.name} {r}", same(cpu, quantize(x.to(device), fmt, r))


def _blocks(seed: int = 1, lo: int = -126, hi: int = 100) -> torch.Tensor:
    """(256, 256) float32 rows whose block maxima span 2^lo .. 2^hi (the smallest scales
    included), with normal values only (subnormal inputs are a separate matter)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(lo, hi, (256, 1), generator=g).float()
    x = torch.randn(256, 256, generator=g) * torch.exp2(e)
    return torch.where(x.abs() < 2.0 ** -126, torch.zeros_like(x), x)


def check_scaled(device: str = "cuda") -> Iterator[tuple[str, bool]]:
    from precisim.formats.scaling import SCALED_FORMATS, get_scaled_format, quantize_scaled

    for what, x in (("wide", _blocks()), ("tiny", _blocks(lo=-126, hi=-110))):
        for name in SCALED_FORMATS:
            fmt = get_scaled_format(name)
            cpu = quantize_scaled(x, fmt, return_parts=True)
            gpu = quantize_scaled(x.to(device), fmt, return_parts=True)
            ok = all(same(a, b) for a, b in ((cpu.dequantized, gpu.dequantized),
                                             (cpu.codes, gpu.codes), (cpu.scales, gpu.scales)))
            yield f"scaled {name} ({what} blocks)", ok


def check_units(device: str = "cuda") -> Iterator[tuple[str, bool]]:
    from precisim.emulation import available_units, get_unit, matmul
    from precisim.formats import get_format, quantize

    g = torch.Generator().manual_seed(2)
    for name in available_units():
        unit = get_unit(name)
        fa = get_format(unit.a_format)
        fb = get_format(unit.b_format or unit.a_format)
        a = quantize(torch.randn(2, 64, 256, generator=g), fa)
        b = quantize(torch.randn(2, 256, 48, generator=g), fb)
        for fid in ("bit-exact", "fast"):
            cpu = matmul(a, b, unit, fidelity=fid)
            yield f"unit {name} {fid}", same(cpu, matmul(a.to(device), b.to(device), unit,
                                                         fidelity=fid))


def check_model(device: str = "cuda") -> Iterator[tuple[str, bool]]:
    import transformers
    from precisim.emulation import emulate

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 64))
    for recipe in ("mxfp8", "nvfp4", "deepseek-fp8"):
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(name: str, into: dict = seen) -> Callable[..., None]:
            return lambda m, i, o: into.__setitem__(name, (i[0].clone(), o.clone()))

        with torch.no_grad(), emulate(model, recipe) as em:
            hooks = [m.register_forward_hook(keep(n)) for n, m in model.named_modules()
                     if type(m).__name__ == "EmulatedLinear"]
            model(ids)
            for h in hooks:
                h.remove()
            model.to(device)
            try:
                ok = all(same(out, model.get_submodule(n)(inp.to(device)))
                         for n, (inp, out) in seen.items())
            finally:
                model.cpu()
        yield f"model forward {recipe} ({len(seen)} layers, {len(em.plan.emulated())} ops)", \
            ok and len(seen) > 0


def throughput(n: int = 8192, repeats: int = 10) -> dict[str, float]:
    """mxfp8 quantization vs a copy of the same tensor on the GPU (GB/s, read + write)."""
    from precisim.formats.scaling import get_scaled_format, quantize_scaled

    x = torch.randn(n, n, device="cuda")
    fmt = get_scaled_format("mxfp8")

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    nbytes = 2 * x.numel() * x.element_size()
    t_copy = timed(lambda: x.clone())
    t_q = timed(lambda: quantize_scaled(x, fmt))
    return {"copy_GBps": nbytes / t_copy / 1e9, "mxfp8_GBps": nbytes / t_q / 1e9,
            "mxfp8_vs_copy": t_q / t_copy}


CHECKS = {"formats": check_formats, "scaled": check_scaled, "units": check_units,
          "model": check_model}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("eager", "compile"), default="eager")
    p.add_argument("--device", default="cuda",
                   help="the device compared with the CPU (default cuda; 'cpu' checks the "
                   "script itself, or with --backend compile the compiled kernels)")
    p.add_argument("--out", default=None, help="also write the report (markdown) here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device: nothing was checked", file=sys.stderr)
        return 2
    from precisim.emulation.precision import ieee_matmuls
    from precisim.formats import set_backend

    set_backend(args.backend)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    lines = [f"# GPU conformance ({name}, torch {torch.__version__}, backend {args.backend})",
             "", "| check | CPU == device |", "|---|---|"]
    bad = 0
    with ieee_matmuls():
        for fn in CHECKS.values():
            for what, ok in fn(args.device):
                bad += not ok
                lines.append(f"| {what} | {'yes' if ok else '**NO**'} |")
    if args.device.startswith("cuda"):
        tp = throughput()
        lines += ["", f"mxfp8 quantization {tp['mxfp8_GBps']:.0f} GB/s vs x.clone() "
                  f"{tp['copy_GBps']:.0f} GB/s: {tp['mxfp8_vs_copy']:.2f}x the copy's time"]
    lines += ["", f"{bad} mismatches"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
