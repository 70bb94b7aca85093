"""A quantized-weight cache shared by several emulations of one model (docs/cost-perf.md
section 8: a mixed-precision search quantizes each (layer, format) once).

An :class:`~precisim.emulation.Emulation` keeps its own weights quantized from one forward to
the next; a :class:`WeightCache` passed to several of them (``Emulation(...,
weight_cache=cache)``, :func:`~precisim.eval.evaluate` and
:func:`~precisim.eval.layers.sensitivity` take one too) keeps them across emulations, so the
recipes of a search, which give the same layer the same spec again and again, share one
quantization per (layer, spec).

The key is the module name, the parameter (held by a weak reference, so a replaced parameter
never matches a new tensor that reuses its address), its in-place version counter and data
pointer, shape and dtype, the weight's :class:`~precisim.emulation.TensorSpec`, whether the
matrix unit needs codes and scales, and the layout: an entry is used only for a weight that is
unchanged since it was quantized. A stochastic-rounding spec without a seed draws new bits at
each quantization and is never shared. The static telemetry counts of the quantization are
kept with the entry and counted into every emulation that reads it, as a quantization would.

The cache is bounded: at most ``max_bytes`` of values, codes and scales (least recently used
entries are dropped first; an entry larger than the budget is not stored). ``hits``,
``misses`` and ``quantizations`` (per ``(module, spec)``) count what happened.
"""

from __future__ import annotations

import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import torch
from precisim.formats import Rounding

from .gemm import Operand
from .recipe import TensorSpec

__all__ = ["WeightCache", "operand_bytes"]


def operand_bytes(op: Operand) -> int:
    """Bytes held by a quantized operand (its values, and codes and scales)."""
    n = op.values.numel() * op.values.element_size()
    if op.parts is not None:
        n += sum(t.numel() * t.element_size() for t in (op.parts.codes, op.parts.scales))
    return n


def _label(spec: TensorSpec) -> str:
    """A short label of a weight spec: its format and the fields that differ from the
    defaults."""
    extra = [f"{f.name}={getattr(spec, f.name)}" for f in fields(spec)[1:]
             if getattr(spec, f.name) != f.default]
    return spec.format + (f" ({', '.join(extra)})" if extra else "")


@dataclass
class _Entry:
    ref: weakref.ref
    stamp: tuple[int, int, tuple[int, ...], torch.dtype]
    op: Operand
    counts: dict[str, torch.Tensor] | None
    size: int


class WeightCache:
    """Quantized weights shared by emulations (module docstring). ``max_bytes``: the budget
    (None: no limit)."""

    def __init__(self, max_bytes: int | None = 2 << 30) -> None:
        if max_bytes is not None and (isinstance(max_bytes, bool) or
                                      not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"max_bytes={max_bytes!r} is not valid: accepted a number of bytes "
                             ">= 0, or None (no limit)")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
        self.total_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        #: quantizations per ``(module, spec description)``: what the cache did not save
        self.quantizations: Counter[tuple[str, str]] = Counter()

    @staticmethod
    def shareable(spec: TensorSpec) -> bool:
        """Whether a weight quantized to ``spec`` gives the same bits every time (not a
        stochastic rounding without a seed)."""
        return not (Rounding.parse(spec.rounding) is Rounding.STOCHASTIC and spec.seed is None)

    @staticmethod
    def _key(name: str, w: torch.Tensor, spec: TensorSpec, need_parts: bool,
             transposed: bool) -> tuple[Any, ...]:
        return (name, id(w), spec, bool(need_parts), bool(transposed))

    @staticmethod
    def _stamp(w: torch.Tensor) -> tuple[int, int, tuple[int, ...], torch.dtype]:
        return (w._version, w.data_ptr(), tuple(w.shape), w.dtype)

    def get(self, name: str, w: torch.Tensor, spec: TensorSpec, need_parts: bool,
            transposed: bool) -> tuple[Operand, dict[str, torch.Tensor] | None] | None:
        """The stored operand and telemetry counts of ``w`` under ``spec``, or None (a miss:
        the caller quantizes and :meth:`put` s the result)."""
        key = self._key(name, w, spec, need_parts, transposed)
        e = self._entries.get(key)
        if e is not None and (e.ref() is not w or e.stamp != self._stamp(w)):
            self._drop(key)
            e = None
        if e is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return e.op, e.counts

    def put(self, name: str, w: torch.Tensor, spec: TensorSpec, need_parts: bool,
            transposed: bool, op: Operand, counts: dict[str, torch.Tensor] | None) -> bool:
        """Store a quantization of ``w`` (counted in :attr:`quantizations`); False when it is
        larger than the budget (then not stored)."""
        self.quantizations[(name, _label(spec))] += 1
        key = self._key(name, w, spec, need_parts, transposed)
        if key in self._entries:
            self._drop(key)
        size = operand_bytes(op)
        if self.max_bytes is not None and size > self.max_bytes:
            return False
        while self.max_bytes is not None and self.total_bytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1
        self._entries[key] = _Entry(weakref.ref(w), self._stamp(w), op, counts, size)
        self.total_bytes += size
        return True

    def _drop(self, key: tuple[Any, ...]) -> None:
        e = self._entries.pop(key)
        self.total_bytes -= e.size

    def clear(self) -> None:
        """Drop every entry (the counters are kept)."""
        self._entries.clear()
        self.total_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        """``entries``, ``bytes``, ``hits``, ``misses``, ``evictions`` and the largest number of
        quantizations of one (module, spec) (``max_quantizations``)."""
        return {"entries": len(self), "bytes": self.total_bytes, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions,
                "max_quantizations": max(self.quantizations.values(), default=0)}

    def __repr__(self) -> str:
        s = self.stats()
        return (f"<WeightCache {s['entries']} entries, {s['bytes']} bytes, {s['hits']} hits, "
                f"{s['misses']} misses>")
