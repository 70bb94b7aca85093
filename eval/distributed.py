"""Evaluation spread over processes with torch.distributed (docs/reproducibility.md).

``torchrun --nproc-per-node N -m precisim.eval.cli eval ...`` (or ``accelerate launch``; gloo
on CPU, nccl on GPU) starts N ranks. :func:`evaluate` gives window ``i`` to rank
``i % world_size``; every window is still its own forward of batch size one, so what a window
computes does not depend on which rank runs it or on which windows run beside it. The
per-window results are then gathered and put back in window order on every rank, and the
summaries (bootstrap CIs included) are computed from exactly the arrays a single process
would have: every metric is bit-identical for any world size (tests/test_distributed.py).
Telemetry counters are integer sums, equal in any order.

A rank that fails or dies makes the others' gather fail after ``PRECISIM_DIST_TIMEOUT``
seconds (default 600) with an error; nothing is written as if complete (only rank 0 writes,
after the gather).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

__all__ = ["DistributedError", "Group", "current", "init_from_env", "timeout"]


class DistributedError(RuntimeError):
    """A distributed evaluation could not start or finish (the message says why)."""


def timeout() -> timedelta:
    """How long a rank waits for the others (``PRECISIM_DIST_TIMEOUT`` seconds, default 600)."""
    raw = os.environ.get("PRECISIM_DIST_TIMEOUT", "600")
    try:
        sec = float(raw)
    except ValueError:
        raise DistributedError(f"PRECISIM_DIST_TIMEOUT={raw!r} is not valid: accepted a number "
                               "of seconds") from None
    if not sec > 0:
        raise DistributedError(f"PRECISIM_DIST_TIMEOUT={raw!r} is not valid: accepted a "
                               "positive number of seconds")
    return timedelta(seconds=sec)


class Group:
    """This process's place in a torch.distributed group (rank 0 of 1 without one)."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> list[int]:
        """The indices of ``n`` items this rank computes (every world_size-th)."""
        return list(range(self.rank, n, self.world_size))

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj)
        except Exception as exc:  # a rank failed, died or timed out
            raise DistributedError(f"rank {self.rank}: gathering the results of the "
                                   f"{self.world_size} ranks failed ({exc!r:.300}); no "
                                   "results are written") from None
        return out


def current() -> Group:
    """The initialised default group, or a single-process one."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return Group()
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def init_from_env() -> Group:
    """Join the group that ``torchrun`` / ``accelerate launch`` describe in the environment
    (``WORLD_SIZE`` > 1; gloo on CPU, nccl when CUDA is there), or stay single-process.
    An unreachable rendezvous raises :class:`DistributedError` after :func:`timeout`."""
    world = os.environ.get("WORLD_SIZE")
    if world is None or int(world) <= 1:
        return Group()
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return current()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend, timeout=timeout())
    except Exception as exc:
        where = (f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}")
        raise DistributedError(f"could not join the {world}-rank group at {where} "
                               f"({backend}): {exc!r:.300}") from None
    return current()
