"""The ``precisim`` command line: light commands stay light; ``vectors`` and ``demo`` end to end.

``precisim formats`` and ``precisim --help`` must not import the evaluation stack
(transformers, datasets, matplotlib, precisim.eval.perplexity / spec, model patching): the
parser is built from light modules and each command imports what it runs when it runs.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import precisim
import pytest
from precisim.eval.cli import main

#: modules that only the evaluation commands may import
HEAVY = ("transformers", "datasets", "matplotlib", "precisim.eval.perplexity",
         "precisim.eval.spec", "precisim.emulation.patch")

_PROBE = """
import contextlib, io, json, sys
import precisim
from precisim.eval.cli import main

runs = {}
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:  # --help
            rc = e.code
    runs[" ".join(argv)] = {"rc": rc, "stdout": out.getvalue()}
heavy = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
print(json.dumps({"file": precisim.__file__, "runs": runs, "heavy": heavy}))
"""


def _probe(tmp_path: Path, *argvs: list[str]) -> dict:
    """Run the CLI's ``main`` on each argv in one fresh interpreter; what it imported."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(list(argvs)), json.dumps(HEAVY)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.splitlines()[-1])
    # the subprocess ran this checkout's code, not another installed copy
    assert Path(res["file"]).resolve() == Path(precisim.__file__).resolve()
    return res


def test_light_commands_do_not_import_the_evaluation_stack(tmp_path) -> None:
    res = _probe(tmp_path, ["--help"], ["formats"], ["formats", "e4m3"], ["eval", "--help"],
                 ["vectors", "e2m1", "--n", "0", "--out", str(tmp_path / "e2m1.csv")])
    runs = res["runs"]
    assert all(r["rc"] == 0 for r in runs.values()), {k: r["rc"] for k, r in runs.items()}
    assert "formats" in runs["--help"]["stdout"] and "vectors" in runs["--help"]["stdout"]
    assert "| float8_e4m3fn | 8 | 4 | 3 | 7 | 448 |" in runs["formats"]["stdout"]
    assert "| 0x70 | 128 |" in runs["formats e4m3"]["stdout"]
    assert "--recipes" in runs["eval --help"]["stdout"]
    assert (tmp_path / "e2m1.csv").is_file()
    assert res["heavy"] == [], f"light commands imported {res['heavy']}"


def test_importing_precisim_eval_is_light(tmp_path) -> None:
    code = ("import json, sys, precisim.eval, precisim.eval.tables\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_precisim_eval_exports_resolve() -> None:
    import precisim.eval as ev

    for name in ev.__all__:
        assert getattr(ev, name) is not None, name
    assert set(ev.__all__) <= set(dir(ev))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ev.nope  # noqa: B018


def test_demo(capsys) -> None:
    assert main(["demo", "--rows", "16", "--cols", "256", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "Quantization of a 16x256 Student-t(4) tensor (seed 1)" in out
    assert "| format | scale rule | bits/elem | SQNR dB |" in out
    for label in ("| bf16 | - | 16 |", "| mxfp4 | rceil | 4.25 |", "| nvfp4 | amax | 4.5 |"):
        assert label in out


def test_vectors(tmp_path, capsys) -> None:
    out = tmp_path / "e4m3.json"
    assert main(["vectors", "e4m3", "--rounding", "rtz", "--n", "10", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["header"]["rounding"] == "rtz"
    assert "wrote" in capsys.readouterr().out
    assert main(["vectors", "--unit", "h100-e4m3", "--n", "1", "--k", "8",
                 "--out", str(tmp_path / "u.csv")]) == 0
    back = list(csv.DictReader((tmp_path / "u.csv").open()))
    assert len(back[0]["a"].split()) == 8
    capsys.readouterr()
    assert main(["vectors", "e2m1", "--n", "0"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("case,input_bits,input,expected_code,expected\n")
    for argv, msg in [
        (["vectors", "e9m9x"], "error: "),
        (["vectors", "--unit", "nope"], "unknown matrix unit 'nope'"),
        (["vectors"], "exactly one"),
        (["vectors", "e4m3", "--unit", "h100-e4m3"], "exactly one"),
        (["vectors", "e4m3", "--rounding", "sr"], "rounding='sr'"),
        (["vectors", "e4m3", "--out", str(tmp_path / "x.xml")], ".csv, .json"),
    ]:
        assert main(argv) == 2, argv
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x.xml").exists()
