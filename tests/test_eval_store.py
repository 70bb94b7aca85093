"""precisim.eval.store: the SQLite run store."""

from __future__ import annotations

import csv
import json
import math
import sqlite3

import numpy as np
import pytest
from precisim.eval.stats import Interval
from precisim.eval.store import DEFAULT_STORE, RunStore, flatten


def test_put_get_has_records_roundtrip(tmp_path):
    path = tmp_path / "sub" / "runs.sqlite"
    with RunStore(path) as store:
        assert not store.has("a") and store.get("a") is None and len(store) == 0
        store.put("a", {"sweep": "s1", "ppl": 12.5, "params": {"window": 512}})
        store.put("b", {"ppl": np.float32(3.5), "tokens": np.int64(7),
                        "nll": np.array([1.0, 2.0])}, sweep="s2")
        store.put("c", {"ppl": float("nan"), "ci": Interval(1.0, 0.5, 1.5, 0.95, 10)},
                  sweep="s1")
        assert store.has("a") and "b" in store and len(store) == 3
        assert store.get("a") == {"sweep": "s1", "ppl": 12.5, "params": {"window": 512}}
        assert store.get("b") == {"ppl": 3.5, "tokens": 7, "nll": [1.0, 2.0]}
        assert math.isnan(store.get("c")["ppl"])
        assert store.get("c")["ci"] == {"estimate": 1.0, "low": 0.5, "high": 1.5,
                                        "level": 0.95, "n": 10}
        assert store.keys() == ["a", "b", "c"]
        assert store.keys("s1") == ["a", "c"]
        assert [r.get("ppl") for r in store.records("s2")] == [3.5]
        meta = store.records("s2", meta=True)[0]
        assert meta["_key"] == "b" and meta["_sweep"] == "s2" and meta["_created"].endswith(
            "+00:00")
    # persisted, reopened
    with RunStore(path) as store:
        assert store.keys() == ["a", "b", "c"]
        store.put("a", {"ppl": 1.0})  # replaces
        assert store.get("a") == {"ppl": 1.0} and len(store) == 3
        assert store.delete("a") and not store.delete("a")


def test_default_name_and_closed_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = RunStore()
    store.put("k", {"x": 1})
    store.close()
    store.close()
    assert (tmp_path / DEFAULT_STORE).is_file()
    with pytest.raises(ValueError, match="closed"):
        store.get("k")


def test_bad_records_write_nothing(tmp_path):
    with RunStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(ValueError, match="record for 'k' is not JSON-serialisable"):
            store.put("k", {"x": object()})
        with pytest.raises(ValueError, match="must be a dict"):
            store.put("k", [1, 2])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="key=''"):
            store.put("", {"x": 1})
        with pytest.raises(ValueError, match="sweep=3"):
            store.put("k", {"x": 1}, sweep=3)  # type: ignore[arg-type]
        assert len(store) == 0


def test_not_a_store(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_text("this is not a database, just some text " * 100)
    with pytest.raises(ValueError, match="not a precisim run store"):
        RunStore(bad)
    with pytest.raises(ValueError, match="is a folder"):
        RunStore(tmp_path)


def test_one_row_per_key_in_sqlite(tmp_path):
    path = tmp_path / "r.sqlite"
    with RunStore(path) as store:
        for i in range(3):
            store.put("same", {"i": i})
    con = sqlite3.connect(path)
    assert con.execute("SELECT COUNT(*), MAX(key) FROM runs").fetchone() == (1, "same")
    con.close()


def test_export_csv_flattens_and_json(tmp_path):
    with RunStore(tmp_path / "r.sqlite") as store:
        store.put("a", {"model": "m", "recipe": "fp8",
                        "metrics": {"ppl": 10.0, "kl": {"mean": 0.1}},
                        "key": "shadow", "layers": [1, 2]}, sweep="s")
        store.put("b", {"model": "m", "recipe": "mxfp4, \"quoted\"", "metrics": {"ppl": 11.0},
                        "extra": None}, sweep="s")
        store.put("c", {"model": "other"}, sweep="t")
        out = store.export(tmp_path / "out" / "runs.csv", sweep="s")
        rows = list(csv.DictReader(out.open()))
        assert list(rows[0]) == ["key", "sweep", "created", "model", "recipe", "metrics.ppl",
                                 "metrics.kl.mean", "record.key", "layers", "extra"]
        assert rows[0]["key"] == "a" and rows[0]["record.key"] == "shadow"
        assert rows[0]["metrics.kl.mean"] == "0.1" and rows[0]["layers"] == "[1, 2]"
        assert rows[1]["recipe"] == 'mxfp4, "quoted"' and rows[1]["metrics.kl.mean"] == ""
        assert len(rows) == 2
        js = json.loads(store.export(tmp_path / "runs.json").read_text())
        assert [r["key"] for r in js] == ["a", "b", "c"]
        assert js[0]["record"]["metrics"]["kl"] == {"mean": 0.1} and js[2]["sweep"] == "t"
        assert store.export(tmp_path / "runs.txt", fmt="csv").is_file()
        with pytest.raises(ValueError, match=r"suffix: accepted \.csv, \.json"):
            store.export(tmp_path / "runs.xlsx")
        with pytest.raises(ValueError, match="fmt='xml'"):
            store.export(tmp_path / "runs.csv", fmt="xml")
    assert not list(tmp_path.glob("**/*.tmp"))


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}, "f": 3}) == {
        "a.b": 1, "a.c.d": 2, "e": {}, "f": 3}
