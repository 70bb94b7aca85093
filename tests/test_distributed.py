"""Distributed evaluation on torch.distributed (gloo, CPU): ``torchrun --nproc-per-node N -m
precisim.eval.cli eval ...`` on a real (tiny, local) Hugging Face checkpoint gives the same
metric bits, telemetry and spec-sheet content hash at world size 1, 2 and 3 and batch size 1
and 4 (docs/reproducibility.md); bad set-ups fail with a clear error and write nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="torchrun with gloo is exercised on Linux")

RECIPES = "mxfp8,nvfp4"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", "PRECISIM_DIST_TIMEOUT": "60", **extra})
    return env


def _torchrun(n: int, args: list[str], *, module: bool = True, timeout: int = 600,
              **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "--master-addr", "127.0.0.1", "--master-port", str(_port())]
    cmd += ["-m", "precisim.eval.cli", *args] if module else args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(**env))


@pytest.fixture(scope="module")
def data(tiny_text, tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("dist") / "text.txt"
    p.write_text(tiny_text)
    return str(p)


def _eval_args(ckpt: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", ckpt, "--data", data, "--tokens", "192", "--window", "32",
            "--recipes", RECIPES, "--bootstrap", "200", "--no-plot", "--out", str(out), *extra]


def _numbers(sheet: dict) -> dict:
    """Everything a sheet says about the model under the recipes: metrics (bit patterns, as
    JSON floats round-trip exactly), reference ppl, telemetry, content hash; not timings."""
    metrics = {r: {k: v for k, v in m.items() if k != "seconds"}
               for r, m in sheet["metrics"].items()}
    return {"metrics": metrics, "ppl_ref": sheet["reference"]["ppl"],
            "telemetry": sheet["telemetry"], "content_hash": sheet["content_hash"]}


@pytest.mark.parametrize("world,batch", [(2, 1), (3, 4)])
def test_metrics_identical_for_any_world_and_batch_size(tiny_checkpoint, data, tmp_path, world,
                                                        batch) -> None:
    one = tmp_path / "one"
    r = _torchrun(1, _eval_args(tiny_checkpoint, data, one, "--batch", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    many = tmp_path / "many"
    r = _torchrun(world, _eval_args(tiny_checkpoint, data, many, "--batch", str(batch)))
    assert r.returncode == 0, r.stderr[-3000:]
    a = json.loads((one / "spec_sheet.json").read_text())
    b = json.loads((many / "spec_sheet.json").read_text())
    assert _numbers(a) == _numbers(b)
    assert a["metrics"]["nvfp4"]["kl"] > a["metrics"]["mxfp8"]["kl"] > 0  # a real evaluation
    assert a["telemetry"]["nvfp4"]["numel"] > 0
    assert (a["numerics"]["world_size"], b["numerics"]["world_size"]) == (1, world)
    assert b["numerics"]["batch"] == batch
    # only rank 0 printed the table and wrote the outputs
    assert r.stdout.count("| recipe |") == 1


def test_world_size_larger_than_the_windows_is_refused(tiny_checkpoint, data, tmp_path) -> None:
    out = tmp_path / "out"
    args = _eval_args(tiny_checkpoint, data, out, "--numerics", "native")
    args[args.index("--tokens") + 1] = "64"  # two windows of 32
    r = _torchrun(3, args)
    assert r.returncode != 0
    assert "world size 3 exceeds the 2 windows" in r.stderr
    assert not out.exists()


def test_unreachable_rendezvous_is_a_clear_error(tiny_checkpoint, data, tmp_path) -> None:
    out = tmp_path / "out"
    env = _env(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_port()), PRECISIM_DIST_TIMEOUT="3")
    r = subprocess.run([sys.executable, "-m", "precisim.eval.cli",
                        *_eval_args(tiny_checkpoint, data, out, "--numerics", "native")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2
    assert "error: could not join the 2-rank group at 127.0.0.1:" in r.stderr
    assert not out.exists()


def test_bad_timeout_is_named() -> None:
    from precisim.eval.distributed import DistributedError, timeout

    os.environ["PRECISIM_DIST_TIMEOUT"] = "soon"
    try:
        with pytest.raises(DistributedError, match="PRECISIM_DIST_TIMEOUT='soon'.*number"):
            timeout()
    finally:
        del os.environ["PRECISIM_DIST_TIMEOUT"]


# rank 1 dies (as if killed) in the middle of its windows; rank 0 must not write a sheet
_DYING_RANK = """
import os, sys
import precisim.eval.perplexity as P
_orig = P.window_logprobs
_n = [0]
def _dying(*a, **k):
    _n[0] += 1
    if os.environ["RANK"] == "1" and _n[0] == 3:
        os._exit(9)
    return _orig(*a, **k)
P.window_logprobs = _dying
from precisim.eval.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_dying_mid_run_leaves_no_results(tiny_checkpoint, data, tmp_path) -> None:
    script = tmp_path / "dying.py"
    script.write_text(_DYING_RANK)
    out = tmp_path / "out"
    r = _torchrun(2, [str(script), *_eval_args(tiny_checkpoint, data, out, "--numerics",
                                                "native")], module=False,
                  PRECISIM_DIST_TIMEOUT="20")
    assert r.returncode != 0
    assert not (out / "spec_sheet.json").exists() and not (out / "summary.md").exists()
