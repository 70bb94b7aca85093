"""Compiled bit-exact block chain for FP8-class inputs (the float chain of :mod:`.matmul`, fused).

The bit-exact float chain (:func:`precisim.emulation.matmul._chunk_float`) forms, for every
block of ``k`` products and every output, the alignment exponent ``E`` (the largest product
exponent of the block, or the running sum's exponent if larger), truncates every product to
``F`` fraction bits below ``E`` and sums the integers (docs/arithmetic.md section 4, steps 2-4).
Eagerly that is six passes over ``k*M*N`` elements per block. This module computes the same
bits with two changes of method:

* **the exponent maximum as a matrix product.** For alignment exponents ``e`` of the inputs
  and ``c = bitlen(k)`` (so ``2^c > k``), ``P = sum_i 2^(c*ea_i) * 2^(c*eb_i)`` lies in
  ``[2^(c*Emax), k*2^(c*Emax)]`` with ``Emax = max_i (ea_i + eb_i)``, hence
  ``Emax = floor(floor(log2 P) / c)``. ``P`` is one ordinary float matmul of two tensors of
  powers of two (BLAS speed). Its rounding cannot move ``floor(log2 P)`` out of
  ``[c*Emax, c*Emax + c - 1]``: every term is positive, so every rounded partial sum stays at
  or above the largest term ``2^(c*Emax)``; the exact sum is at most ``k*2^(c*Emax)``, a
  factor ``2^c/k >= 1 + 1/k`` below ``2^(c*Emax + c)``, far more than the float sum's
  relative error (below ``k*2^-24``). Zeros contribute 0 (an all-zero block gives ``P = 0``).
  The dtype is float32 when ``c*(emin_a+emin_b) >= -126`` and ``c*(emax_a+emax_b+1) <= 127``
  (E4M3 pairs with ``k <= 63``), else float64 (E5M2).
* **the truncated sum and the block rounding as one compiled kernel** (torch.compile, inductor
  C++ on CPU): the scaled products ``a_i*b_i*2^(F-E)`` are converted to int32 (truncation
  toward zero) and summed in registers, then the block sum is rounded to the block format in
  the same kernel with int32 arithmetic (bit length from the exponent of float32(S), shifts)
  and float32 powers of two built from their bits. The power of two ``2^(F-E)`` is an input
  of that kernel, computed by a small one before it, so that the inner loop is multiply,
  multiply, convert, add. Inductor's CPU code runs int64, float64, table lookups and bool
  outputs lane by lane, so the kernels use none of them on the outputs (the two masks come
  back as bits of one int32 tensor).

A third kernel (:func:`promote`) adds a partial sum to the fp32 promotion register. The
rare cases stay eager: an overflowed block result, and the IEEE sign of a zero sum where a
running sum is -0.

The result is bit-identical to ``_chunk_float`` (tests/test_emulation_fused_chain.py compares
them, and both with the exact reference, on adversarial data); it is used by
:func:`precisim.emulation.matmul.matmul` and ``scaled_matmul`` where ``matmul._fused_ok``
holds (H100 E4M3 / E5M2 and DeepSeek FP8 units and their variants) unless
``PRECISIM_BACKEND=eager``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..formats.descriptor import FloatFormat

NEG_BIG_32 = -(1 << 20)  # exponent of an all-zero block (below everything)


def _pow2_32(n: torch.Tensor) -> torch.Tensor:
    """2.0**n in float32, exactly, for integer n in [-126, 127]."""
    return ((n.to(torch.int32) + 127) << 23).view(torch.float32)


def _pow2_64(n: torch.Tensor) -> torch.Tensor:
    """2.0**n in float64, exactly, for integer n in [-1022, 1023]."""
    return ((n.to(torch.int64) + 1023) << 52).view(torch.float64)


def _fexp64(x: torch.Tensor) -> torch.Tensor:
    """floor(log2|x|) of nonzero normal float64 values."""
    return ((x.view(torch.int64) >> 52) & 0x7FF) - 1023


def _fexp32(x: torch.Tensor) -> torch.Tensor:
    """floor(log2|x|) of nonzero normal float32 values."""
    return ((x.view(torch.int32) >> 23) & 0xFF) - 127


def pow_dtype(fa: FloatFormat, fb: FloatFormat, k: int) -> torch.dtype | None:
    """dtype of the exponent-maximum matmul for these input formats and block size (None: the
    powers 2^(c*e) do not fit float64)."""
    c = k.bit_length()
    lo, hi = c * (fa.emin + fb.emin), c * (fa.emax + fb.emax + 1)
    if lo >= -126 and hi <= 127:
        return torch.float32
    if lo >= -1022 and hi <= 1023:
        return torch.float64
    return None


def exponent_powers(e: torch.Tensor, zero: torch.Tensor, k: int, dtype: torch.dtype
                    ) -> torch.Tensor:
    """2^(c*e) (0 where ``zero``) in ``dtype``, c = bitlen(k): the operands of
    :func:`block_max_exponent`."""
    c = k.bit_length()
    ce = e.to(torch.int32) * c
    p = _pow2_32(ce) if dtype == torch.float32 else _pow2_64(ce)
    return torch.where(zero, 0.0, p).to(dtype)


def exponent_of_sum(P: torch.Tensor, c: int) -> torch.Tensor:
    """Emax from the exponent-maximum matmul ``P`` (> 0; the result is meaningless where
    P == 0): floor(log2 P) lies in [c*Emax, c*Emax + c - 1], so Emax = floor((floor(log2 P)
    + 0.5) / c), taken in float32 (exact enough: the margin is 0.5/c) because inductor's CPU
    code divides integers lane by lane. int32 (B, M, N)."""
    x = _fexp32(P) if P.dtype == torch.float32 else _fexp64(P).to(torch.int32)
    return torch.floor((x.to(torch.float32) + 0.5) * (1.0 / c)).to(torch.int32)


def block_max_exponent(pa: torch.Tensor, pb: torch.Tensor, k: int) -> torch.Tensor:
    """max_i (ea_i + eb_i) over one block, for every output: (B, M, N) int32 (NEG_BIG_32
    where every product of the block is zero). pa: (B, M, kb) powers from
    :func:`exponent_powers`, pb: (B, kb, N) likewise, kb <= k. (The block kernels do the
    same from the matmul, in :func:`make_kernels`' ``prepare``.)"""
    P = torch.matmul(pa, pb)
    return torch.where(P == 0, NEG_BIG_32, exponent_of_sum(P, k.bit_length()))


# ---------------------------------------------------------------------------------------------
# the compiled block kernels

def _p2(n: torch.Tensor) -> torch.Tensor:
    """2.0**n in float32 for int32 n, exact for n in [-126, 127] (n is clamped to it)."""
    return _pow2_32(n.clamp(-126, 127))


def _times_pow2(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """x * 2^n in float32 in two steps of at most 2^±64 each: exact whenever the result is
    representable (x a float32 value; |n| <= 252)."""
    h = n >> 1  # floor(n / 2)
    return (x * _p2(h)) * _p2(n - h)


def make_kernels(F: int, c: int, acc_emin: int, floor: int | None, use_floor: bool, m: int,
                 bemin: int, max_val: float, rne: bool, saturate: bool
                 ) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(prepare, block) kernels of one unit; the unit's constants are closed over (one
    compilation per unit, dynamic shapes). Only int32 and float32 arithmetic (and bit casts)
    on the outputs: no int64, no float64, no table lookups, which inductor's CPU code runs
    lane by lane. The running sum of the block chain is carried as ``part`` (float32: every
    block result of the units :func:`precisim.emulation.matmul._fused_ok` admits is a
    float32 value) with ``pe``, its alignment exponent (int32: max(floor(log2|part|),
    acc_emin), NEG_BIG_32 for 0), which the block kernel derives from its integer sum.

    ``prepare(P, part, pe, es, sz)`` -> (E, mult, ct): from the exponent-maximum matmul
    ``P`` (:func:`block_max_exponent`'s operand powers summed), the block's alignment
    exponent E (the products' maximum plus the scale exponent ``es``, against ``pe``), the
    float32 factor 2^(F-E+es) of the products (0 where no product is nonzero) and the running
    sum aligned to E and truncated (int32). ``es``/``sz``: None, or the exponents and zero
    mask of in-block power-of-two scales.

    ``block(a, bt, mult, ct, E)`` -> (part, pe, flags): the integer block sum
    S = sum_i trunc(a_i*b_i*mult) + ct, its value S*2^(E-F) rounded to the block format
    (``m`` fraction bits, minimum exponent ``bemin``; toward zero, or to nearest-even if
    ``rne``), the new alignment exponent, and int32 flags: bit 0 where S == 0 (the result is
    +0; the caller gives the zero its IEEE sign where that can be -0), bit 1 where the result
    overflowed (above ``max_val``; with ``saturate`` it is clamped instead). a: (B, M, kb)
    float32, bt: (B, kb, N) float32.
    """
    lim = 1 << (m + 1)
    e_max = math.frexp(max_val)[1] - 1

    def prepare(P, part, pe, es=None, sz=None):
        zero_blk = P == 0
        Ep = exponent_of_sum(P, c)
        if es is not None:
            zero_blk = zero_blk | sz
            Ep = Ep + es
        Ep = torch.where(zero_blk, NEG_BIG_32, Ep)
        E = torch.maximum(Ep, pe)
        if floor is not None:
            E = torch.clamp(E, min=floor)
        d = F - E
        dt = d if es is None else d + es
        mult = torch.where(zero_blk, 0.0, _p2(dt))
        cv = _times_pow2(part, d.clamp(-252, 252))  # |part * 2^d| < 2^(F+1): exact
        ct = cv.to(torch.int32)
        if use_floor:
            ct = ct - (ct.to(cv.dtype) > cv).to(torch.int32)
        return E, mult, ct

    def block(a, bt, mult, ct, E):
        v = a[:, :, :, None] * bt[:, None, :, :] * mult[:, :, None, :]
        t = v.to(torch.int32)
        if use_floor:
            t = t - (t.to(v.dtype) > v).to(torch.int32)
        S = t.sum(2, dtype=torch.int32) + ct
        n = S.abs()
        # bit length from the exponent of float32(n) (exact: n < 2^24)
        L = torch.where(n == 0, 0, (n.to(torch.float32).view(torch.int32) >> 23) - 126)
        base = E - F
        e = base + L - 1
        g = torch.maximum(e, torch.full_like(e, bemin)) - m
        sh = g - base
        shc = sh.clamp(0, 31)
        q = torch.where(sh > 0, n >> shc, n)
        carry = torch.zeros_like(sh > 0)
        if rne:
            rem = n - (q << shc)
            half = 1 << (shc - 1).clamp(min=0)
            up = (sh > 0) & (sh <= 31) & ((rem > half) | ((rem == half) & ((q & 1) == 1)))
            q = q + up.to(torch.int32)
            carry = (sh > 0) & (q >= lim)
        gq = torch.where(sh > 0, g, base).clamp(-252, 252)
        val = _times_pow2(q.to(torch.float32), gq)
        ovf = val > max_val
        pe = torch.where(q == 0, NEG_BIG_32,
                         torch.maximum(e + carry.to(torch.int32), torch.full_like(e, acc_emin)))
        if saturate:
            val = torch.where(ovf, max_val, val)
            pe = torch.where(ovf, e_max, pe)
            ovf = torch.zeros_like(ovf)
        part = torch.where(S < 0, -val, val)
        # the two masks as one int32 tensor (bool outputs are stored lane by lane)
        flags = (S == 0).to(torch.int32) | (ovf.to(torch.int32) << 1)
        return part, pe, flags

    return prepare, block


def promote(reg: torch.Tensor, part: torch.Tensor, s: torch.Tensor | None = None
            ) -> torch.Tensor:
    """The promotion register RNE_fp32(reg + s*part) of finite float32 ``reg`` and ``part``
    (``s``: float64 scale products holding float32 values, or None for 1): one correctly
    rounded addition. With a scale, s*part is exact in float64 and the float64 sum is made
    round-to-odd from the exact error of TwoSum before the rounding to float32 (53 >= 24 + 2
    bits: the double rounding is innocuous), as in ``matmul._sum_to_f32``."""
    if s is None:
        return reg + part
    x = reg.to(torch.float64)
    y = s * part.to(torch.float64)
    t = x + y
    bb = t - x
    err = (x - (t - bb)) + (y - bb)
    bits = t.view(torch.int64)
    fix = (err != 0) & ((bits & 1) == 0)
    step = torch.where((err > 0) == (t > 0), 1, -1)
    return torch.where(fix, bits + step, bits).view(torch.float64).to(torch.float32)
