"""Reductions (sum, max) along an axis in a format and an order (docs/arithmetic.md section
7.3).

A :class:`Reduction` first rounds its inputs to ``format`` and then combines them with one
rounding per addition: ``sequential`` (``acc = Q(acc + x_i)``, left to right), ``pairwise``
(a balanced tree: neighbours added level by level, an odd last element carried up), or
``chunked`` (sequential sums of ``chunk`` consecutive elements, then a pairwise tree over the
chunk sums, as a warp-shuffle reduction does). ``max`` is exact in any order (then rounded;
NaN propagates; a zero maximum is +0).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from precisim.formats import FloatFormat, Rounding

from . import exact as ex
from .core import Rq, Value, add_ro, check_format, parse_enum, rq
from .exact import value as _value

__all__ = ["Order", "ReduceOp", "Reduction"]


class ReduceOp(enum.Enum):
    SUM = "sum"
    MAX = "max"


class Order(enum.Enum):
    SEQUENTIAL = "sequential"
    PAIRWISE = "pairwise"
    CHUNKED = "chunked"


@dataclass(frozen=True)
class Reduction:
    """A sum or max along the last axis: ``format`` (every partial result rounded to it with
    ``rounding``), ``order`` and ``chunk`` (the chunk length of ``chunked``)."""

    op: ReduceOp | str = ReduceOp.SUM
    format: FloatFormat | str = "fp32"
    rounding: Rounding | str = Rounding.NEAREST_EVEN
    order: Order | str = Order.PAIRWISE
    chunk: int = 32

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "op", parse_enum(ReduceOp, self.op, "op"))
        s(self, "format", check_format(self.format, "format"))
        s(self, "rounding", parse_enum(Rounding, self.rounding, "rounding"))
        s(self, "order", parse_enum(Order, self.order, "order"))
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"chunk={self.chunk!r} is not valid: accepted an integer >= 1")
        s(self, "_rq", rq(self.format, self.rounding, what="format"))

    @property
    def rq(self) -> Rq:
        return self._rq  # type: ignore[attr-defined]

    @classmethod
    def parse(cls, value: Any, where: str = "reduction") -> Reduction:
        """A reduction from itself, a format name (pairwise sum) or a mapping of fields."""
        if isinstance(value, Reduction):
            return value
        if isinstance(value, str):
            value = {"format": value}
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a format name or a mapping of "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}; got "
                             f"{value!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        bad = [k for k in value if k not in names]
        if bad:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, bad))}; accepted: "
                             f"{', '.join(names)}")
        try:
            return cls(**value)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"op": self.op.value, "format": self.format.name,
                             "order": self.order.value}
        if self.rounding is not Rounding.NEAREST_EVEN:
            d["rounding"] = self.rounding.value
        if self.order is Order.CHUNKED:
            d["chunk"] = self.chunk
        return d

    def describe(self) -> str:
        o = self.order.value + (f" {self.chunk}" if self.order is Order.CHUNKED else "")
        return f"{self.op.value} {self.rq.describe()} {o}"

    # -- fast ----------------------------------------------------------------------------
    def fast(self, x: torch.Tensor) -> torch.Tensor:
        """Reduce the last axis of float64 ``x`` (values of formats within float32); float64."""
        Q = self.rq.fast
        if self.op is ReduceOp.MAX:
            if x.shape[-1] == 0:
                return torch.full(x.shape[:-1], -math.inf, dtype=x.dtype, device=x.device)
            m = Q(torch.amax(x, dim=-1))
            return torch.where(m == 0, 0.0, m)
        if x.shape[-1] == 0:
            return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        v = Q(x)
        if self.order is Order.SEQUENTIAL:
            return self._seq(v)
        if self.order is Order.PAIRWISE:
            return self._tree(v)
        n, c = v.shape[-1], self.chunk
        k = n // c
        parts = []
        if k:
            parts.append(self._seq(v[..., :k * c].reshape(*v.shape[:-1], k, c)))
        if n - k * c:
            parts.append(self._seq(v[..., k * c:])[..., None])
        return self._tree(torch.cat(parts, dim=-1))

    def fast32(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`fast` for a float32 ``x``, with a float32 result. When the format rounds like
        float32 (fp32, RNE, overflow to inf, no flush: :attr:`Rq.is_f32`), every partial sum
        is an IEEE 754 float32 addition, which is that rounding of the exact sum (signed
        zeros, infinities and NaN included), so the reduction runs in float32 directly."""
        if not self.rq.is_f32:
            return self.fast(x.double()).float()
        if self.op is ReduceOp.MAX:
            if x.shape[-1] == 0:
                return torch.full(x.shape[:-1], -math.inf, dtype=x.dtype, device=x.device)
            m = torch.amax(x, dim=-1)
            return torch.where(m == 0, 0.0, m)
        if x.shape[-1] == 0:
            return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        if self.order is Order.SEQUENTIAL:
            return self._seq(x, f32=True)
        if self.order is Order.PAIRWISE:
            return self._tree(x, f32=True)
        n, c = x.shape[-1], self.chunk
        k = n // c
        parts = []
        if k:
            parts.append(self._seq(x[..., :k * c].reshape(*x.shape[:-1], k, c), f32=True))
        if n - k * c:
            parts.append(self._seq(x[..., k * c:], f32=True)[..., None])
        return self._tree(torch.cat(parts, dim=-1), f32=True)

    def _seq(self, v: torch.Tensor, f32: bool = False) -> torch.Tensor:
        if f32:
            acc = v[..., 0]
            for i in range(1, v.shape[-1]):
                acc = acc + v[..., i]
            return acc
        Q = self.rq.fast
        acc = v[..., 0]
        for i in range(1, v.shape[-1]):
            acc = Q(add_ro(acc, v[..., i]))
        return acc

    def _tree(self, v: torch.Tensor, f32: bool = False) -> torch.Tensor:
        Q = self.rq.fast
        while v.shape[-1] > 1:
            n = v.shape[-1]
            a, b = v[..., 0:n - 1:2], v[..., 1:n:2]
            pair = a + b if f32 else Q(add_ro(a, b))
            v = torch.cat([pair, v[..., n - 1:]], dim=-1) if n % 2 else pair
        return v[..., 0]

    def __call__(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The reduction of ``x`` (a float tensor) along ``dim``; float32."""
        return self.fast(x.detach().movedim(dim, -1).double()).float()

    # -- exact ---------------------------------------------------------------------------
    def reference(self, values: Sequence[Value | float]) -> Value:
        """The exact result for one row of values (floats or Fractions)."""
        Q = self.rq.exact
        vals = [_value(v) for v in values]
        if self.op is ReduceOp.MAX:
            if not vals:
                return -math.inf
            m = vals[0]
            for v in vals[1:]:
                m = ex.vmax(m, v)
            m = Q(m)
            return Fraction(0) if m == 0 else m
        if not vals:
            return Fraction(0)
        vals = [Q(v) for v in vals]
        if self.order is Order.SEQUENTIAL:
            return self._seq_exact(vals)
        if self.order is Order.PAIRWISE:
            return self._tree_exact(vals)
        c = self.chunk
        return self._tree_exact([self._seq_exact(vals[i:i + c])
                                 for i in range(0, len(vals), c)])

    def _seq_exact(self, vals: list[Value]) -> Value:
        acc = vals[0]
        for v in vals[1:]:
            acc = self.rq.exact(ex.add(acc, v))
        return acc

    def _tree_exact(self, vals: list[Value]) -> Value:
        while len(vals) > 1:
            nxt = [self.rq.exact(ex.add(vals[i], vals[i + 1]))
                   for i in range(0, len(vals) - 1, 2)]
            if len(vals) % 2:
                nxt.append(vals[-1])
            vals = nxt
        return vals[0]

