"""The command line under misuse (issue 14): bad input gives one ``error:`` line naming it and
exit status 2 (never a traceback), before any long work starts; outputs and stores are checked
first and never corrupted; stale sweep cells are never reused; logs show progress. Runs on a
tiny local checkpoint (a randomly initialised Llama with its own tokenizer)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from precisim.eval.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = ("the quick brown fox jumps over the lazy dog . " * 40
        + "a stitch in time saves nine . " * 30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from _tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), TEXT, hidden=32,
                                 intermediate=48, layers=1, heads=2, kv_heads=1)


@pytest.fixture
def data(tmp_path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``precisim argv``; argparse's exits included."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _bad(capsys, *argv: str, match: str) -> str:
    rc, out, err = _run(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err + out
    assert match in err, err
    return err


@pytest.fixture
def no_eval(monkeypatch):
    """Fail the test if an evaluation starts (bad input must be refused before)."""
    from precisim.eval import spec

    def boom(*a, **k):
        raise AssertionError("an evaluation started")
    monkeypatch.setattr(spec, "run_eval", boom)
    monkeypatch.setattr(spec, "evaluate", boom, raising=False)


# ---------------------------------------------------------------------------------------------
# 1, 2, 15: formats and vectors

def test_formats_and_vectors_refuse_bad_input(capsys) -> None:
    _bad(capsys, "formats", "e4m3b1000000000", match="bias")
    _bad(capsys, "vectors", "fp32", "--all-codes", match="up to 16 bits")
    _bad(capsys, "formats", "e2m1", "--columns", "0", match="--columns")
    _bad(capsys, "formats", "e2m1", "--columns", "-3", match="accepted an integer in 1..256")
    _bad(capsys, "formats", "--p3109", "0", match="accepted an integer in 2..16")
    _bad(capsys, "vectors", "e4m3", "--n", "-1", match="--n")


# ---------------------------------------------------------------------------------------------
# 15: settings refused at parse time, before any model loads

def test_bad_settings_are_refused_before_the_model_loads(capsys, no_eval, data) -> None:
    for cmd in ("eval", "layers"):
        _bad(capsys, cmd, "--tokens", "0", "--data", data, match="--tokens")
    _bad(capsys, "eval", "--window", "0", "--data", data, match="--window")
    _bad(capsys, "eval", "--block", "0", "--data", data, match="--block")
    _bad(capsys, "eval", "--stride", "600", "--data", data, match="stride=600")
    _bad(capsys, "eval", "--dtype", "int8", "--data", data, match="int8")


@pytest.mark.parametrize("content, match", [
    (b"", "is empty"),
    (b"\x00\x01\x02binary\x00", "NUL byte"),
    ("caf\u00e9 na\u00efve".encode("latin-1"), "not UTF-8"),
])
def test_unreadable_data_files(capsys, tmp_path, content, match) -> None:
    p = tmp_path / "data.txt"
    p.write_bytes(content)
    _bad(capsys, "eval", "--data", p, "--recipes", "bf16", "--out", tmp_path / "o",
         match=match)
    _bad(capsys, "layers", "--data", p, "--out", tmp_path / "o", match=match)


def test_block_actually_used_is_recorded(capsys, checkpoint, data, tmp_path) -> None:
    out = tmp_path / "o"
    rc, _, err = _run(capsys, "eval", "--model", checkpoint, "--data", data, "--recipes",
                      "bf16", "--tokens", "64", "--window", "32", "--bootstrap", "20",
                      "--block", "40", "--no-plot", "--out", out)
    assert rc == 0, err
    assert "warning: block=40" in err and "blocks of 16" in err
    sheet = json.loads((out / "spec_sheet.json").read_text())
    assert sheet["inputs"]["settings"]["block"] == 16


# ---------------------------------------------------------------------------------------------
# 15: report on malformed sheets and on files that are not run stores

def test_report_on_bad_sheets_and_stores(capsys, tmp_path) -> None:
    out = tmp_path / "rep"
    bad = tmp_path / "bad.json"
    for text in ("nonsense{", "[1, 2]", '{"a": 1}', "\u00ff\u00fe"):
        bad.write_text(text, encoding="latin-1")
        _bad(capsys, "report", "--sheet", bad, "--out", out, match="spec sheet")
    sheet = json.loads(Path("docs/main-job/spec_sheet.json").read_text())
    del sheet["recipes_resolved"][0]["bits_per_element"]
    bad.write_text(json.dumps(sheet))
    _bad(capsys, "report", "--sheet", bad, "--out", out, match="malformed")
    # not a SQLite file
    _bad(capsys, "report", "--store", bad, "--out", out, match="not a precisim run store")
    # another program's SQLite database: refused and left byte for byte as it was
    db = tmp_path / "other.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE people (name TEXT)")
    con.execute("INSERT INTO people VALUES ('ada')")
    con.commit()
    con.close()
    before = db.read_bytes()
    _bad(capsys, "report", "--store", db, "--out", out, match="not a precisim run store")
    assert db.read_bytes() == before
    tables = sqlite3.connect(db).execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("people",)]
    # ... and a sweep does not write its runs into it either
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nmodels: [x]\nrecipes: [bf16]\ndatasets: [d]\n")
    from precisim.eval.store import RunStore

    with pytest.raises(ValueError, match="not a precisim run store"):
        RunStore(db)
    assert db.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# 8: outputs are checked before the work starts

def test_output_locations_are_checked_first(capsys, no_eval, data, tmp_path) -> None:
    f = tmp_path / "a-file"
    f.write_text("x")
    _bad(capsys, "eval", "--data", data, "--recipes", "bf16", "--out", f, match="is a file")
    _bad(capsys, "eval", "--data", data, "--recipes", "bf16", "--out", f / "sub",
         match="is a file")
    _bad(capsys, "report", "--sheet", "docs/main-job/spec_sheet.json", "--out", f,
         match="is a file")
    _bad(capsys, "layers", "--data", data, "--out", f, match="is a file")
    _bad(capsys, "vectors", "e4m3", "--out", f / "v.csv", match="is a file")
    # nothing was left behind by the checks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "text.txt"]
    import os

    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes everywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            _bad(capsys, "eval", "--data", data, "--recipes", "bf16", "--out", ro / "o",
                 match="cannot be written")
        finally:
            ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# 6: a spec sheet being checked is never overwritten

def test_spec_check_never_overwrites_the_sheet(capsys, checkpoint, data, tmp_path) -> None:
    out = tmp_path / "res"
    common = ["--bootstrap", "20", "--no-plot"]
    rc, _, err = _run(capsys, "eval", "--model", checkpoint, "--data", data, "--recipes",
                      "mxfp4", "--tokens", "48", "--window", "24", "--out", out, *common)
    assert rc == 0, err
    sheet = out / "spec_sheet.json"
    # a sheet whose numbers the re-run does not reproduce (as if edited, or from elsewhere)
    d = json.loads(sheet.read_text())
    d["metrics"]["mxfp4"]["ppl"] += 1.0
    sheet.write_text(json.dumps(d, indent=2))
    checked = sheet.read_bytes()
    rc, printed, err = _run(capsys, "eval", "--spec", sheet, "--out", out, "--no-plot")
    assert rc == 1 and "NOT reproduced" in printed and "mxfp4.ppl" in printed
    assert sheet.read_bytes() == checked  # untouched
    assert (out / "rerun" / "spec_sheet.json").is_file() and "rerun" in err
    # the default --out is the same folder in the README's command: same protection
    rc, printed, _ = _run(capsys, "eval", "--spec", out / "rerun" / "spec_sheet.json",
                          "--out", out / "rerun", "--no-plot")
    assert rc == 0 and "reproduced exactly" in printed


# ---------------------------------------------------------------------------------------------
# 7, 5: the grid is validated before the first cell; cells are keyed by content

def _sweep(tmp_path, models, recipes, datasets, params="{tokens: 48, window: 24, "
           "bootstrap: 20}") -> Path:
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"name: t\nmodels: {json.dumps(models)}\nrecipes: {json.dumps(recipes)}\n"
                    f"datasets: {json.dumps(datasets)}\nparams: {params}\n")
    return spec


@pytest.mark.parametrize("what", ["recipe", "data", "model", "tokens", "list"])
def test_sweep_grid_is_validated_before_the_first_cell(capsys, no_eval, checkpoint, data,
                                                       tmp_path, what) -> None:
    models, recipes, datasets = [checkpoint], ["bf16", "mxfp4"], [str(data)]
    params = "{tokens: 48, window: 24}"
    match = {"recipe": "mxfp5", "data": "nope.txt", "model": "no-such-dir",
             "tokens": "tokens='lots'", "list": "window=[24, 48]"}[what]
    if what == "recipe":
        recipes.append("mxfp5")
    elif what == "data":
        datasets.append(str(tmp_path / "nope.txt"))
    elif what == "model":
        models.append(str(tmp_path / "no-such-dir"))
    elif what == "tokens":
        params = "{tokens: lots}"
    else:
        params = "{window: [24, 48]}"
    store = tmp_path / "runs.sqlite"
    _bad(capsys, "sweep", _sweep(tmp_path, models, recipes, datasets, params), "--store",
         store, match=match)
    from precisim.eval.store import RunStore

    if store.exists():
        with RunStore(store) as st:
            assert len(st) == 0


def test_sweep_cells_are_keyed_by_content(capsys, checkpoint, data, tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: mine\nlinear: mxfp8\n")
    store = tmp_path / "runs.sqlite"
    spec = _sweep(tmp_path, [checkpoint], [str(recipe)], [str(data)])

    def ppls() -> list[float]:
        from precisim.eval.store import RunStore

        with RunStore(store) as st:
            return [r["ppl"] for r in st.records()]

    rc, out, err = _run(capsys, "sweep", spec, "--store", store)
    assert rc == 0, err
    assert len(ppls()) == 1
    rc, out, _ = _run(capsys, "sweep", spec, "--store", store)  # unchanged: reused
    assert rc == 0 and len(ppls()) == 1
    recipe.write_text("name: mine\nlinear: e2m1\n")  # same name, other content
    rc, out, err = _run(capsys, "sweep", spec, "--store", store)
    assert rc == 0 and "evaluated again" in err
    first, second = ppls()
    assert first != second
    data.write_text(TEXT.replace("fox", "cat"))  # the data changes
    rc, out, err = _run(capsys, "sweep", spec, "--store", store)
    assert rc == 0 and len(ppls()) == 3
    # the report shows the newest record of each cell
    rc, out, err = _run(capsys, "report", "--store", store, "--out", tmp_path / "rep")
    assert rc == 0 and "2 older record(s)" in err
    assert (tmp_path / "rep" / "report.csv").read_text().count("\n") == 2


def test_model_fingerprint_follows_the_files(checkpoint, tmp_path) -> None:
    import shutil

    from precisim.eval.spec import model_fingerprint

    d = tmp_path / "m"
    shutil.copytree(checkpoint, d)
    a = model_fingerprint(str(d))
    assert model_fingerprint(str(d)) == a
    cfg = json.loads((d / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (d / "config.json").write_text(json.dumps(cfg))
    assert model_fingerprint(str(d)) != a


# ---------------------------------------------------------------------------------------------
# 15: Ctrl-C in a sweep

def test_interrupted_sweep_keeps_finished_cells(capsys, monkeypatch, checkpoint, data,
                                                tmp_path) -> None:
    from precisim.eval import spec as spec_mod

    real = spec_mod.run_eval

    def interrupt_second(cfg, **kw):
        if cfg.recipes[0] == "mxfp4":
            raise KeyboardInterrupt
        return real(cfg, **kw)

    monkeypatch.setattr(spec_mod, "run_eval", interrupt_second)
    store = tmp_path / "runs.sqlite"
    rc, out, err = _run(capsys, "sweep", _sweep(tmp_path, [checkpoint], ["bf16", "mxfp4"],
                                                [str(data)]), "--store", store)
    assert rc == 130 and "Traceback" not in err
    assert "error: interrupted" in err and "run the same command again" in err
    from precisim.eval.store import RunStore

    with RunStore(store) as st:
        assert [r["recipe"] for r in st.records()] == ["bf16"]


# ---------------------------------------------------------------------------------------------
# 16: progress in logs

def test_eval_reports_progress_when_stderr_is_not_a_terminal(capsys, checkpoint, data,
                                                             tmp_path) -> None:
    rc, _, err = _run(capsys, "eval", "--model", checkpoint, "--data", data, "--recipes",
                      "bf16", "--tokens", "64", "--window", "16", "--bootstrap", "0",
                      "--no-plot", "--out", tmp_path / "o")
    assert rc == 0, err
    lines = [x for x in err.splitlines() if x.startswith("windows ")]
    assert lines[0].startswith("windows 1/4 (25%)") and "ETA" in lines[0]
    assert lines[-1].startswith("windows 4/4 (100%)")
    assert not any("\r" in x for x in lines)
