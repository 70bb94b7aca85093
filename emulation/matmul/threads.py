"""Thread use of the matrix-unit kernels on a CPU.

The eager kernels issue many mid-sized element-wise ops. Splitting each of them across torch's
threads costs a synchronisation per op, which on a busy (shared) machine costs a scheduler
time slice each time; so the column chunks of a GEMM run in as many Python threads as torch
has, each op single-threaded (:func:`for_chunks`), and large BLAS matmuls get every thread
back for their duration (:func:`all_threads`). Chunks write disjoint columns, so results do
not depend on the schedule.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

__all__ = ["all_threads", "for_chunks", "one_thread_per_op"]

_LOCK = threading.Lock()
_STATE = {"depth": 0, "saved": 1}


@contextmanager
def one_thread_per_op() -> Iterator[None]:
    """torch ops single-threaded for the duration (restored after; nesting and concurrent
    callers share one saved value)."""
    with _LOCK:
        if _STATE["depth"] == 0:
            _STATE["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _STATE["depth"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _STATE["depth"] -= 1
            if _STATE["depth"] == 0:
                torch.set_num_threads(_STATE["saved"])


@contextmanager
def all_threads() -> Iterator[None]:
    """Inside :func:`one_thread_per_op`: the caller's thread count again (for one big op)."""
    with _LOCK:
        n = _STATE["saved"] if _STATE["depth"] else 0
        if n > 1:
            torch.set_num_threads(n)
    try:
        yield
    finally:
        if n > 1:
            with _LOCK:
                if _STATE["depth"]:
                    torch.set_num_threads(1)


def nested() -> bool:
    """Whether the caller already runs inside :func:`one_thread_per_op`."""
    return bool(_STATE["depth"])


def for_chunks(N: int, step: int, fn: Callable[[slice], None], device: torch.device) -> None:
    """``fn(slice)`` for the column chunks [n0, n0 + step) of N columns (see the module
    docstring): in parallel Python threads on a CPU with several torch threads."""
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    if workers > 1 and -(-N // step) < 2 * workers:
        step = max(1, -(-N // (2 * workers)))
    chunks = [slice(n0, min(N, n0 + step)) for n0 in range(0, N, step)]
    if workers <= 1 or len(chunks) <= 1 or nested():
        for ns in chunks:
            fn(ns)
        return
    with one_thread_per_op(), ThreadPoolExecutor(workers) as ex:
        for f in [ex.submit(fn, ns) for ns in chunks]:
            f.result()
