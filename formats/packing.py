"""Packing of sub-byte codes (FP4/INT4, FP6, ...) into bytes, along the last dimension.

Layout: the codes of one row form a little-endian bit stream. Code ``i`` (``bits`` wide)
occupies stream bits ``bits*i .. bits*i + bits - 1``; stream bit ``k`` is bit ``k % 8`` (bit 0
= least significant) of byte ``k // 8``. Hence:

* ``bits=4``: two codes per byte, code ``2j`` in the LOW nibble and code ``2j+1`` in the high
  nibble of byte ``j``: ``byte = c[2j] | c[2j+1] << 4``. This is the layout of
  ``torch.float4_e2m1fn_x2`` (torch's own ``unpack_float4x2_as_uint8`` reads element 0 from the
  low nibble) and the OCP MX / NVIDIA FP4 convention.
* ``bits=6``: four codes in three bytes: ``w = c0 | c1 << 6 | c2 << 12 | c3 << 18`` stored as
  the bytes ``w & 0xFF, (w >> 8) & 0xFF, w >> 16``.
* ``bits=8``: the identity (codes as uint8).
* any other width 1..8 follows the same rule (``bits=2``: four codes per byte, code 0 in bits
  0-1).

Padding: a row of ``n`` codes packs into ``ceil(n * bits / 8)`` bytes; when ``n * bits`` is not
a multiple of 8 the unused high bits of the row's last byte are zero. Several counts give the
same number of bytes (4-bit: 3 and 4 codes both take 2 bytes; 6-bit: 3 and 4 codes both take
3), so :func:`unpack` takes the number of codes per row, ``count``.

Codes are the unsigned bit patterns produced by :func:`precisim.formats.encode` (uint8 for
formats of up to 8 bits).
"""

from __future__ import annotations

import math

import torch

__all__ = ["pack", "packed_size", "unpack"]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.uint16, torch.uint32, torch.uint64)


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is not supported: accepted 1..8 (4 for FP4/INT4, 6 for "
                         "FP6, 8 for 8-bit formats)")
    return bits


def _group(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte group: lcm(bits, 8) bits."""
    lcm = bits * 8 // math.gcd(bits, 8)
    return lcm // bits, lcm // 8


def packed_size(count: int, bits: int) -> int:
    """Number of bytes that ``count`` codes of ``bits`` bits pack into: ceil(count*bits/8)."""
    _check_bits(bits)
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count={count!r} must be a non-negative integer")
    return (count * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` in ``[0, 2^bits)`` along the last dimension into uint8 bytes.

    Returns a uint8 tensor of shape ``(*codes.shape[:-1], ceil(n * bits / 8))`` on the same
    device. Raises ``TypeError`` for non-integer tensors and ``ValueError`` for codes out of
    range (naming the first bad code and its position) or an unsupported ``bits``.
    """
    bits = _check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype not in _INT_DTYPES:
        raise TypeError(f"codes must be an integer tensor (e.g. uint8 from encode()); got dtype "
                        f"{codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension (packing is along the last)")
    c = codes.to(torch.int64)
    bad = (c < 0) | (c >= (1 << bits))
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"code {int(c[idx])} at index {idx} is out of range for {bits}-bit "
                         f"packing: accepted 0..{(1 << bits) - 1}")
    n = c.shape[-1]
    nbytes = packed_size(n, bits)
    if bits == 8:
        return c.to(torch.uint8)
    gc, gb = _group(bits)
    pad = (-n) % gc
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], c.shape[-1] // gc, gc)
    shifts = torch.arange(gc, device=c.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(dim=-1)  # disjoint bit fields: the sum is an OR
    bshift = torch.arange(gb, device=c.device, dtype=torch.int64) * 8
    out = ((word.unsqueeze(-1) >> bshift) & 0xFF).reshape(*c.shape[:-2], c.shape[-2] * gb)
    return out[..., :nbytes].to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``count`` codes of each row, as uint8.

    ``count`` defaults to ``floor(nbytes * 8 / bits)`` (all whole codes the bytes hold). Raises
    ``TypeError`` unless ``packed`` is uint8 (or viewable as uint8: ``torch.float4_e2m1fn_x2``)
    and ``ValueError`` when the rows hold fewer than ``count`` codes.
    """
    bits = _check_bits(bits)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype == getattr(torch, "float4_e2m1fn_x2", None):
        packed = packed.view(torch.uint8)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor (as returned by pack); got dtype "
                        f"{packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dimension")
    nbytes = packed.shape[-1]
    if count is None:
        count = nbytes * 8 // bits
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count={count!r} must be a non-negative integer")
    need = packed_size(count, bits)
    if need > nbytes:
        raise ValueError(f"{count} codes of {bits} bits need {need} bytes per row; the last "
                         f"dimension has {nbytes}")
    b = packed[..., :need].to(torch.int64)
    if bits == 8:
        return b.to(torch.uint8)
    gc, gb = _group(bits)
    pad = (-need) % gb
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    b = b.reshape(*b.shape[:-1], b.shape[-1] // gb, gb)
    bshift = torch.arange(gb, device=b.device, dtype=torch.int64) * 8
    word = (b << bshift).sum(dim=-1)
    shifts = torch.arange(gc, device=b.device, dtype=torch.int64) * bits
    codes = ((word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(
        *b.shape[:-2], b.shape[-2] * gc)
    return codes[..., :count].to(torch.uint8)
