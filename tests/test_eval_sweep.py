"""precisim.eval.sweep: YAML sweeps, stable cell keys, resumable runs (incl. a SIGKILL test)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from precisim.eval.store import RunStore
from precisim.eval.sweep import Cell, SweepError, SweepSpec, run_sweep

SPEC = {"name": "s", "models": ["m1", "m2"], "recipes": ["bf16", "fp8", "mxfp4"],
        "datasets": ["wiki"], "params": {"tokens": 256, "window": 128, "stride": 64}}


def test_cells_grid_order_and_stable_keys():
    spec = SweepSpec.from_dict(SPEC)
    cells = spec.cells()
    assert [(c.model, c.dataset, c.recipe) for c in cells] == [
        ("m1", "wiki", "bf16"), ("m1", "wiki", "fp8"), ("m1", "wiki", "mxfp4"),
        ("m2", "wiki", "bf16"), ("m2", "wiki", "fp8"), ("m2", "wiki", "mxfp4")]
    assert cells[0].params == (("stride", 64), ("tokens", 256), ("window", 128))
    # same cell -> same key, whatever the order the params were declared in
    again = SweepSpec.from_dict({**SPEC, "params": {"window": 128, "stride": 64, "tokens": 256}})
    assert [c.key for c in again.cells()] == [c.key for c in cells]
    assert cells[0].key.startswith("s/m1/bf16/wiki/") and len({c.key for c in cells}) == 6
    # the key is pinned: it must not change between releases (stores are long-lived)
    assert Cell("s", "m", "r", "d", (("a", 1),)).key == "s/m/r/d/39674f42b869"
    other = SweepSpec.from_dict({**SPEC, "params": {**SPEC["params"], "tokens": 512}}).cells()
    assert other[0].key != cells[0].key
    assert cells[0].identity() == {"sweep": "s", "model": "m1", "recipe": "bf16",
                                   "dataset": "wiki",
                                   "params": {"stride": 64, "tokens": 256, "window": 128}}


def test_from_yaml_and_roundtrip(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent("""\
        name: fp4-study
        models: smollm2-135m
        recipes: [bf16, mxfp4]
        datasets: [wikitext2]
        params:
          tokens: 4096
          layers: [0, 1]
    """))
    spec = SweepSpec.from_yaml(path)
    assert spec.models == ("smollm2-135m",) and spec.recipes == ("bf16", "mxfp4")
    assert spec.params == {"tokens": 4096, "layers": (0, 1)}
    assert SweepSpec.from_dict(spec.to_dict()) == spec
    assert len(spec.cells()) == 2


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name: x\nmodels: [a\n", "malformed YAML"),
        ("", "empty"),
        ("- a\n- b\n", "expected a mapping"),
        ("name: x\nmodels: [a]\nrecipes: [r]\n", "missing key.*'datasets'"),
        ("name: x\nmodels: [a]\nrecipes: [r]\ndatasets: [d]\nmodel: a\nrecipe: b\n",
         r"unknown key\(s\) 'model', 'recipe'; accepted name, models, recipes, datasets, "
         "params"),
        ("name: x\nmodels: []\nrecipes: [r]\ndatasets: [d]\n", "models is empty"),
        ("name: x\nmodels: [a]\nrecipes: [r, 3]\ndatasets: [d]\n", "recipes holds 3"),
        ("name: x\nmodels: [a]\nrecipes: [r, r]\ndatasets: [d]\n", "'r' more than once"),
        ("name: x\nmodels: {a: 1}\nrecipes: [r]\ndatasets: [d]\n", "models must be a list"),
        ("name: ''\nmodels: [a]\nrecipes: [r]\ndatasets: [d]\n", "name=''"),
        ("name: x\nmodels: [a]\nrecipes: [r]\ndatasets: [d]\nparams: [1]\n",
         "params must be a mapping"),
        ("name: x\nmodels: [a]\nrecipes: [r]\ndatasets: [d]\nparams: {w: {a: 1}}\n",
         "params.w="),
    ],
)
def test_malformed_yaml(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SweepError, match=match):
        SweepSpec.from_yaml(path)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(SweepError, match="does not exist"):
        SweepSpec.from_yaml(tmp_path / "nope.yaml")


def test_run_sweep_skips_stored_cells(tmp_path):
    calls: list[str] = []

    def evaluate(cell: Cell) -> dict:
        calls.append(cell.key)
        return {"ppl": float(len(calls)), "recipe": "ignored", "key": "ignored"}

    store = RunStore(tmp_path / "r.sqlite")
    spec = SweepSpec.from_dict(SPEC)
    recs = run_sweep(spec, store, evaluate, progress=False)
    assert len(calls) == 6 and [r["key"] for r in recs] == [c.key for c in spec.cells()]
    assert recs[0]["recipe"] == "bf16" and recs[0]["ppl"] == 1.0 and recs[0]["elapsed_s"] >= 0
    assert recs[0]["params"] == {"stride": 64, "tokens": 256, "window": 128}
    # a larger grid: only the new cells run
    bigger = SweepSpec.from_dict({**SPEC, "recipes": [*SPEC["recipes"], "nvfp4"]})
    recs = run_sweep(bigger, store, evaluate, progress=True)
    assert len(calls) == 8 and len(recs) == 8 and len(store.records("s")) == 8
    assert run_sweep(bigger, store, evaluate, progress=False) == recs and len(calls) == 8
    store.close()


def test_run_sweep_errors(tmp_path):
    def evaluate(cell: Cell) -> dict:
        if cell.recipe == "fp8":
            raise RuntimeError("boom")
        return {"ok": 1}

    path = tmp_path / "r.sqlite"
    with pytest.raises(RuntimeError, match="boom"):
        run_sweep(SPEC, path, evaluate, progress=False)
    with RunStore(path) as store:
        assert len(store) == 1  # the cell before the failure is kept
    recs = run_sweep(SPEC, path, evaluate, progress=False, on_error="skip")
    assert [r.get("error") for r in recs[-2:]] == ["RuntimeError: boom"] * 2
    assert len(recs) == 6 and all("ok" in r for r in recs[:4])
    with pytest.raises(TypeError, match="expected a dict"):
        run_sweep({**SPEC, "name": "t"}, path, lambda c: [1], progress=False)
    with pytest.raises(ValueError, match="on_error='ignore'"):
        run_sweep(SPEC, path, evaluate, on_error="ignore")


DRIVER = """
import sys, time
from precisim.eval.sweep import SweepSpec, run_sweep

store, log = sys.argv[1], sys.argv[2]
spec = SweepSpec.from_dict({"name": "kill", "models": ["m1", "m2"],
                            "recipes": ["r1", "r2", "r3"], "datasets": ["d"],
                            "params": {"tokens": 64}})

def evaluate(cell):
    with open(log, "a") as f:
        f.write("start " + cell.key + "\\n")
    time.sleep(0.3)
    return {"value": len(cell.key)}

run_sweep(spec, store, evaluate, progress=False)
print("done")
"""


def _stored(path) -> dict[str, str]:
    if not path.exists():
        return {}
    con = sqlite3.connect(path, timeout=10)
    try:
        return dict(con.execute("SELECT key, created FROM runs").fetchall())
    except sqlite3.OperationalError:  # the table is not created yet
        return {}
    finally:
        con.close()


def test_killed_sweep_resumes_and_loses_no_cell(tmp_path):
    """SIGKILL a sweep after some cells finished; the re-run runs only the missing cells and the
    store holds every cell exactly once."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    store, log1, log2 = tmp_path / "runs.sqlite", tmp_path / "log1", tmp_path / "log2"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(driver), str(store), str(log1)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while len(_stored(store)) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    before = _stored(store)
    assert 2 <= len(before) < 6

    done = subprocess.run([sys.executable, str(driver), str(store), str(log2)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    after = _stored(store)
    with RunStore(store) as st:
        all_keys = [c.key for c in SweepSpec.from_dict(
            {"name": "kill", "models": ["m1", "m2"], "recipes": ["r1", "r2", "r3"],
             "datasets": ["d"], "params": {"tokens": 64}}).cells()]
        assert sorted(st.keys()) == sorted(all_keys) and len(st) == 6
        assert all(st.get(k)["value"] == len(k) for k in all_keys)
    # finished cells were kept as they were and not re-run; the others ran exactly once
    assert all(after[k] == before[k] for k in before)
    rerun = [line.split(" ", 1)[1] for line in log2.read_text().splitlines()]
    assert sorted(rerun) == sorted(set(all_keys) - set(before))
    started_first = [line.split(" ", 1)[1] for line in log1.read_text().splitlines()]
    assert set(before) <= set(started_first)


def test_cost_is_a_sweep_dimension(tmp_path):
    """A sweep's cost section: every cell is costed before any runs; cells whose modelled cost
    exceeds cost.max are left out (not evaluated, not stored, returned as "skipped"), the
    others' records carry the cost keys, under each coefficient set when several are given
    (the other set gives other relative numbers); a bad section is rejected, naming the
    value. precisim sweep's cost function is precisim.eval.cost.cost_record."""
    from precisim.eval.cost import HOROWITZ_2014, cost_record, recipe_cost

    coeffs = tmp_path / "hot.yaml"
    coeffs.write_text("name: hot\nint8_mult_pj: 0.4\n")
    d = {**SPEC, "recipes": ["mxfp8", "nvfp4", "bf16"],
         "cost": {"coefficients": ["horowitz-45nm", str(coeffs)],
                  "max": {"bits_per_element": 8.5, "dp_energy": 0.32}}}
    spec = SweepSpec.from_dict(d)
    assert spec.cost["max"] == {"bits_per_element": 8.5, "dp_energy": 0.32}
    assert SweepSpec.from_dict(spec.to_dict()) == spec
    sets = spec.cost["coefficients"]
    calls: list[str] = []

    def evaluate(cell: Cell) -> dict:
        calls.append(cell.recipe)
        return {"ppl": 1.0}

    store = RunStore(tmp_path / "r.sqlite")
    recs = run_sweep(spec, store, evaluate, progress=False,
                     cost=lambda c: cost_record(c.recipe, sets))
    skipped = [r for r in recs if "skipped" in r]
    # nvfp4: 4.5 bits but 0.325 energy per MAC > 0.32; bf16 stays in high precision (16-bit
    # weights of the recipe > 8.5 bits): both left out; mxfp8 (8.25 bits, 0.316) runs
    assert set(calls) == {"mxfp8"} and len(skipped) == 2 * 2
    assert all("> cost.max" in r["skipped"] for r in skipped)
    assert {r["key"] for r in skipped}.isdisjoint(r["key"] for r in store.records("s"))
    done = [r for r in recs if "skipped" not in r]
    assert len(done) == 2 and len(store.records("s")) == 2
    g = recipe_cost("mxfp8")
    for r in done:
        assert r["dp_energy"] == pytest.approx(g.energy) and r["bits_per_element"] == 8.25
        assert r["dp_energy@horowitz-45nm"] == pytest.approx(g.energy)
        hot = recipe_cost("mxfp8", coefficients=HOROWITZ_2014.with_(int8_mult_pj=0.4))
        assert r["dp_energy@hot"] == pytest.approx(hot.energy)
        assert hot.energy != pytest.approx(g.energy)  # relative to a baseline that changed too
    with pytest.raises(ValueError, match="needs cost="):
        run_sweep(spec, store, evaluate, progress=False)
    store.close()
    for bad, match in [({"max": {"flops": 1}}, "unknown cost 'flops'"),
                       ({"max": {"dp_energy": -1}}, "cost.max.dp_energy=-1"),
                       ({"speed": 1}, "unknown key"), ({"coefficients": []}, "empty")]:
        with pytest.raises(SweepError, match=match):
            SweepSpec.from_dict({**SPEC, "cost": bad})
