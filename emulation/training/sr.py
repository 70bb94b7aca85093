"""Replayable random bits for stochastic rounding of gradients (docs/training.md section 3).

The bits of one element are a counter-based hash of ``(seed, step, module, role, position)``:
nothing is drawn from a generator state, so a run replays bit for bit whatever the thread
count, and a batch split into pieces gets, element for element, the bits the whole batch gets
(the piece's ``row_offset`` places it in the batch). The position is the element's index in
the gradient tensor's own layout ``(batch, ..., features)``, flattened in C order, with the
batch index counted from the step's first sample.

The hash is Chris Wellons' ``lowbias32`` (xor-shift-multiply, a 32-bit bijection with low
bias), chained over the key words, then over the two halves of the 64-bit position; every
multiplication is done on 16-bit halves in int64, so no intermediate overflows (torch's int64
overflow behaviour never matters). The top ``bits`` of the 32-bit result are the random bits
(1..30, :data:`precisim.formats.quantize.MAX_SR_BITS`).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["SeedSource", "SRSeedError", "active_seed", "element_bits", "key_of", "reference_bits",
           "seed_scope"]

_M32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x846CA68B


class SRSeedError(ValueError):
    """Stochastic rounding of a gradient was asked for without a seed source."""


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return ((x * lo) + (((x * hi) & 0xFFFF) << 16)) & _M32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 hash of int64 values in [0, 2^32) (a bijection on 32-bit words)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def _h(v: int) -> int:
    return int(lowbias32(torch.tensor([v & _M32], dtype=torch.int64))[0])


def key_of(seed: int, step: int, module: str, role: str) -> tuple[int, int]:
    """The two 32-bit key words of one (seed, step, module, role) stream."""
    k = 0x9E3779B9
    for word in (seed & _M32, (seed >> 32) & _M32, step & _M32, (step >> 32) & _M32,
                 zlib.crc32(module.encode()), zlib.crc32(role.encode())):
        k = _h(k ^ word)
    return k, _h(k ^ 0x85EBCA6B)


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """In place: x = (x * c) mod 2^32 for int64 x in [0, 2^32) (as :func:`_mul32`)."""
    lo, hi = c & 0xFFFF, c >> 16
    t = (x * hi).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(lo).add_(t).bitwise_and_(_M32)


def _lowbias32_(x: torch.Tensor) -> torch.Tensor:
    """In place: the lowbias32 hash of ``x`` (as :func:`lowbias32`, fewer temporaries)."""
    x.bitwise_xor_(x >> 16)
    _mul32_(x, _C1)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, _C2)
    return x.bitwise_xor_(x >> 16)


def _hash_positions(pos: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                    shift: int) -> torch.Tensor:
    """The bits of the positions ``pos`` (int64) under the key words ``k1``, ``k2`` (0-d int64
    tensors, so a compiled kernel is not specialised on them): two chained lowbias32 rounds,
    the top ``32 - shift`` bits of the result, int32. Eager: in place on temporaries."""
    h = _lowbias32_(pos.bitwise_and(_M32).bitwise_xor_(k1))
    h = _lowbias32_(h.bitwise_xor_(pos.bitwise_right_shift(32)).bitwise_xor_(k2))
    return h.bitwise_right_shift_(shift).to(torch.int32)


def element_bits(shape: tuple[int, ...], bits: int, key: tuple[int, int], *,
                 row_offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Random bits (int32 in [0, 2^bits)) for every element of a tensor of ``shape`` whose
    first axis starts at batch index ``row_offset``; a function of the key and the element's
    global position only.

    Large tensors run the hash as one compiled kernel (:func:`precisim.formats.kernels.run`,
    checked bit for bit against the eager kernel at first use); small ones run it eagerly in
    place (tests/test_training.py checks both against the reference :func:`lowbias32` chain).
    """
    from precisim.formats import kernels

    if not isinstance(bits, int) or not 1 <= bits <= 30:
        raise ValueError(f"bits={bits!r} is not valid: accepted 1..30")
    n_rows = shape[0] if shape else 1
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    # the positions of consecutive rows are consecutive: one arange
    pos = torch.arange(row_offset * per_row, (row_offset + n_rows) * per_row,
                       dtype=torch.int64, device=device)
    k1, k2 = (torch.tensor(k, dtype=torch.int64, device=device) for k in key)
    out = kernels.run(_hash_positions, ("sr_element_bits", 32 - bits), pos.numel(), pos, k1, k2,
                      32 - bits)
    return out.reshape(shape)


def reference_bits(shape: tuple[int, ...], bits: int, key: tuple[int, int], *,
                   row_offset: int = 0) -> torch.Tensor:
    """:func:`element_bits` written out plainly (out-of-place :func:`lowbias32`, positions
    from row and column indices): the reference of the tests."""
    n_rows = shape[0] if shape else 1
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    rows = torch.arange(row_offset, row_offset + n_rows, dtype=torch.int64)
    pos = (rows[:, None] * per_row
           + torch.arange(per_row, dtype=torch.int64)[None, :]).reshape(shape)
    k1, k2 = key
    h = lowbias32((pos & _M32) ^ k1)
    h = lowbias32(h ^ ((pos >> 32) & _M32) ^ k2)
    return (h >> (32 - bits)).to(torch.int32)


@dataclass(frozen=True)
class SeedSource:
    """Where gradient SR bits come from: ``seed`` and the optimizer ``step``;
    ``row_offset`` is the first sample's index in the step's batch (for a split batch)."""

    seed: int
    step: int = 0
    row_offset: int = 0

    def __post_init__(self) -> None:
        for name in ("seed", "step", "row_offset"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"seed source: {name}={v!r} is not valid: accepted an "
                                 "integer >= 0")


_ACTIVE: list[SeedSource] = []


@contextlib.contextmanager
def seed_scope(seed: int, step: int = 0, row_offset: int = 0) -> Iterator[SeedSource]:
    """``with seed_scope(seed, step): loss.backward()``: the seed source of the gradient
    roles' stochastic rounding inside the block (a training loop opens one per step)."""
    src = SeedSource(seed, step, row_offset)
    _ACTIVE.append(src)
    try:
        yield src
    finally:
        _ACTIVE.pop()


def active_seed() -> SeedSource | None:
    """The innermost :func:`seed_scope`'s source, or None."""
    return _ACTIVE[-1] if _ACTIVE else None
