"""Sweeps shared between worker processes through the run store (eval/sweep.py, eval/store.py):
cells are claimed with expiring leases, so no cell is evaluated twice at once nor stored twice,
and the cell of a worker killed mid-way is taken over by another; nothing is lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from precisim.eval.store import RunStore
from precisim.eval.sweep import run_sweep

SPEC = {"name": "shared", "models": ["m"], "recipes": [f"r{i}" for i in range(8)],
        "datasets": ["d"]}

#: a worker process: evaluates cells slowly, logs start/end lines, and dies (os._exit, no
#: clean-up: as a killed process) when it starts its ``die_at``-th cell
WORKER = textwrap.dedent("""
    import os, sys, time
    from precisim.eval.sweep import run_sweep
    store, log, name, die_at, lease = sys.argv[1:6]
    spec = {"name": "shared", "models": ["m"], "recipes": [f"r{i}" for i in range(8)],
            "datasets": ["d"]}
    n = 0
    def evaluate(cell):
        global n
        n += 1
        with open(log, "a") as f:
            f.write(f"start {cell.key} {name}\\n")
        if n == int(die_at):
            os._exit(9)
        time.sleep(0.4)
        with open(log, "a") as f:
            f.write(f"end {cell.key} {name}\\n")
        return {"value": len(cell.recipe), "by": name}
    recs = run_sweep(spec, store, evaluate, progress=False, worker=name,
                     lease=float(lease), poll=0.2)
    print(len(recs))
""")


def _start(tmp: Path, name: str, die_at: int = 0, lease: float = 2.0) -> subprocess.Popen:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), str(tmp / "runs.sqlite"),
                             str(tmp / "log.txt"), name, str(die_at), str(lease)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _log(tmp: Path) -> list[tuple[str, str, str]]:
    return [tuple(line.split()) for line in (tmp / "log.txt").read_text().splitlines()]


def test_two_workers_share_a_sweep_without_duplicates(tmp_path) -> None:
    a, b = _start(tmp_path, "A"), _start(tmp_path, "B")
    outs = [p.communicate(timeout=120) for p in (a, b)]
    assert a.returncode == b.returncode == 0, outs
    assert [o[0].strip() for o in outs] == ["8", "8"]  # every worker returns every cell
    log = _log(tmp_path)
    starts = Counter(k for ev, k, _ in log if ev == "start")
    assert len(starts) == 8 and set(starts.values()) == {1}  # each cell evaluated once
    assert {w for *_, w in log} == {"A", "B"}  # and the work was shared
    with RunStore(tmp_path / "runs.sqlite") as st:
        assert len(st) == 8 and st.claims() == {}


def test_a_worker_killed_mid_cell_loses_and_duplicates_nothing(tmp_path) -> None:
    a = _start(tmp_path, "A", die_at=2)  # dies when it starts its 2nd cell, holding its lease
    time.sleep(0.3)
    b = _start(tmp_path, "B")
    a.communicate(timeout=120)
    out, err = b.communicate(timeout=120)
    assert a.returncode == 9 and b.returncode == 0, err
    assert out.strip() == "8"
    log = _log(tmp_path)
    killed = [k for ev, k, w in log if ev == "start" and w == "A"][-1]
    ends = Counter(k for ev, k, _ in log if ev == "end")
    assert len(ends) == 8 and set(ends.values()) == {1}  # every cell finished exactly once
    assert ("start", killed, "B") in log and ("end", killed, "B") in log  # taken over
    with RunStore(tmp_path / "runs.sqlite") as st:
        assert len(st) == 8 and len(set(st.keys())) == 8
        assert st.get(killed)["by"] == "B" and st.claims() == {}
    # a third worker finds the sweep complete: it evaluates nothing
    c = _start(tmp_path, "C", die_at=1)  # would die on any evaluation
    out, err = c.communicate(timeout=120)
    assert c.returncode == 0 and out.strip() == "8", err


def test_leases(tmp_path) -> None:
    with RunStore(tmp_path / "s.sqlite") as st:
        assert st.claim("k", "A", lease=60)
        assert not st.claim("k", "B", lease=60)  # held
        assert st.claim("k", "A", lease=60)  # its own: extended
        assert st.renew("k", "A", lease=0.05) and not st.renew("k", "B", lease=1)
        time.sleep(0.1)
        assert st.claims()["k"][1] < 0  # expired
        assert st.claim("k", "B", lease=60)  # taken over
        assert not st.renew("k", "A", lease=1)
        st.put("k", {"x": 1})
        assert st.claims() == {} and not st.claim("k", "A", lease=60)  # stored: done
        assert st.claim("j", "A", lease=60)
        st.release("j", "B")  # not its lease: nothing happens
        assert "j" in st.claims()
        st.release("j", "A")
        assert st.claims() == {}
        for bad in (0, -1, True, "60"):
            with pytest.raises(ValueError, match=f"lease={bad!r} is not valid"):
                st.claim("k2", "A", lease=bad)
        with pytest.raises(ValueError, match="owner='' is not valid"):
            st.claim("k2", "", lease=1)


def test_a_failed_cell_releases_its_lease(tmp_path) -> None:
    def evaluate(cell):
        if cell.recipe == "r3":
            raise RuntimeError("boom")
        return {"v": 1}

    store = tmp_path / "s.sqlite"
    recs = run_sweep(SPEC, store, evaluate, progress=False, on_error="skip")
    assert len([r for r in recs if "error" not in r]) == 7
    with RunStore(store) as st:
        assert st.claims() == {}  # another worker (or a re-run) may take r3 at once
    with pytest.raises(RuntimeError, match="boom"):
        run_sweep(SPEC, store, evaluate, progress=False)
    with RunStore(store) as st:
        assert st.claims() == {}
    for kw, msg in (({"lease": 0}, "lease=0 is not valid"), ({"poll": -1}, "poll=-1"),
                    ({"worker": ""}, "worker='' is not valid")):
        with pytest.raises(ValueError, match=msg):
            run_sweep(SPEC, store, evaluate, progress=False, **kw)
