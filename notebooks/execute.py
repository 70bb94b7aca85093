"""Execute notebooks in place so that their committed outputs come from a real run.

    python notebooks/execute.py                       # every notebooks/*.ipynb
    python notebooks/execute.py 01_formats_tour.ipynb # some of them

Each notebook runs with nbclient in a fresh ``python3`` kernel with ``notebooks/`` as the
working directory (as in ``tests/test_notebooks.py``); the executed notebook, outputs
included, is written back and its wall time printed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def execute(path: Path, timeout: int = 1800) -> float:
    """Run ``path`` top to bottom, write it back with outputs; returns the wall time (s)."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE)}})
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str]) -> int:
    paths = [HERE / a for a in argv] if argv else sorted(HERE.glob("*.ipynb"))
    for p in paths:
        elapsed = execute(p)
        print(f"{p.name}: {elapsed:.1f} s, {p.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
