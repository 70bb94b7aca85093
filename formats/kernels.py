"""Fast rounding kernels on float32 bit patterns (int32 tensor arithmetic only).

The kernel rounds each float32 value x to the grid of an element format whose exponent range
may be shifted per element by an integer ``k`` (a power-of-two block scale 2^k): the result is
the *dequantized* value ``2^k * Q(x / 2^k)`` computed without any float division, so a block
scale never causes a second rounding. Every step is integer arithmetic on the float32 bits
(plus exact int -> float conversions of integers below 2^25), so the eager and the
torch.compile'd versions are bit-identical, and neither depends on the CPU's denormal mode.

Round-to-nearest-even, the default, has a shorter path (:func:`round_bits_nearest`, an
add-and-mask on the bits, about a third of the operations) used wherever the format allows it;
it is tested bit for bit against the general kernel (tests/test_kernels_speedpaths.py).

Speed notes for the torch.compile'd CPU kernels (inductor, torch 2.13): they load float32 vectors
directly but int32 vectors through a stack copy, and reduce float32 vectors with SIMD shuffles
but int32 vectors lane by lane. Callers therefore pass float32 tensors and view them as int32
inside the compiled function, flatten element-wise work to one dimension (one compiled kernel
for every shape), and take block maxima as float maxima.

Conventions (shared with :mod:`precisim.formats.reference`): "even" and "odd" refer to the last
kept bit of the significand including the hidden bit, as in ml_dtypes (so for a format with no
mantissa bits, such as E8M0, a tie between two normal powers of two rounds up).
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from .descriptor import FloatFormat, IntFormat
from .rounding import BitsRemainder, Overflow, Rounding, round_up

INT32_MIN = -(2**31)
F32_INF = 0x7F800000
F32_NAN = 0x7FC00000
F32_MAX = 0x7F7FFFFF
_BIG_EMIN = 1 << 20  # "no normal range" (integer formats)


@dataclass(frozen=True)
class KernelParams:
    """Static description of one rounding: everything the kernel needs, as plain ints."""

    m: int  # kept fraction bits in the normal range (23 for integer grids)
    emin: int  # exponent of the smallest normal (integer grids: grid exponent + 23)
    max_pos_sig: int  # +max = max_pos_sig * 2^max_pos_exp (max_pos_sig < 2^24)
    max_pos_exp: int
    max_neg_sig: int  # |most negative| = max_neg_sig * 2^max_neg_exp (0: unsigned)
    max_neg_exp: int
    has_inf: bool
    has_nan: bool
    neg_zero: bool
    has_zero: bool
    signed: bool
    is_int: bool
    # float32 bits of max_pos, |max_neg|, 2^emin and 2^(emin - m), precomputed in Python: under
    # torch.compile(dynamic=True) the int fields above are symbolic, and bit twiddling on them
    # must not be traced
    thr_pos_bits: int = 0
    thr_neg_bits: int = 0
    min_norm_bits: int = 0
    min_step_bits: int = 0
    # the round-to-nearest-even fast path (:func:`round_bits_nearest`): None where it does not
    # apply (without / with a block scale k)
    nearest: NearestParams | None = None
    nearest_scaled: NearestParams | None = None

    def __post_init__(self) -> None:
        bits = {
            "thr_pos_bits": _py_ldexp_bits(self.max_pos_sig, self.max_pos_exp),
            "thr_neg_bits": _py_ldexp_bits(self.max_neg_sig, self.max_neg_exp),
            "min_norm_bits": _py_ldexp_bits(1, self.emin),
            "min_step_bits": _py_ldexp_bits(1, self.emin - self.m),
        }
        for name, value in bits.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "nearest", NearestParams.of(self, scaled=False))
        object.__setattr__(self, "nearest_scaled", NearestParams.of(self, scaled=True))

    @staticmethod
    def of(fmt: FloatFormat | IntFormat) -> KernelParams:
        """The parameters of a format (cached: formats are frozen and hashable)."""
        return _params_of(fmt)

    @staticmethod
    def _build(fmt: FloatFormat | IntFormat) -> KernelParams:
        if isinstance(fmt, IntFormat):
            u = -fmt.frac_bits
            return KernelParams(
                m=23, emin=u + 23, max_pos_sig=fmt.qmax, max_pos_exp=u,
                max_neg_sig=-fmt.qmin, max_neg_exp=u, has_inf=False, has_nan=False,
                neg_zero=False, has_zero=True, signed=fmt.signed, is_int=True,
            )
        mx = fmt.max
        exp = fmt.emax - fmt.man_bits
        sig = mx / (2**exp) if exp < 0 else mx / 2**exp
        sig_int = int(sig)
        assert sig_int == sig and sig_int < 2**24
        return KernelParams(
            m=fmt.man_bits, emin=fmt.emin, max_pos_sig=sig_int, max_pos_exp=exp,
            max_neg_sig=sig_int if fmt.signed else 0, max_neg_exp=exp,
            has_inf=fmt.has_inf, has_nan=fmt.has_nan, neg_zero=fmt.has_negative_zero,
            has_zero=fmt.has_zero, signed=fmt.signed, is_int=False,
        )


@lru_cache(maxsize=512)
def _params_of(fmt: FloatFormat | IntFormat) -> KernelParams:
    return KernelParams._build(fmt)


@dataclass(frozen=True)
class NearestParams:
    """Constants of the round-to-nearest-even fast path, precomputed as plain ints (under
    torch.compile(dynamic=True) they become symbolic scalars; no bit twiddling on them is traced).

    The fast path applies to signed float formats with zero and subnormals and 1..22 mantissa
    bits; without a block scale, to those whose smallest normal is at least 2^-126; with a block
    scale 2^k (-127 <= k <= 128 - emax, as every scale rule gives; NaN blocks use k = 0), to
    those whose grid step 2^(emin - m) is at least 2^-21 and whose max is at least 2: then every
    shift is in 1..30 and max * 2^k is a float32 normal (or orders above the float32 range).
    """

    s0: int  # dropped bits in the normal range: 23 - m
    t: int  # emin - m + 150: the dropped bits of an element are t + k - max(E, 1) below it
    thr: int  # float32 bits of max
    lead: int  # 127 + m (with a block scale: a subnormal input's leading bit)
    bias0: int  # 2^(s0 - 1) - 1 (constant-shift variant)
    notmask0: int  # -(2^s0)
    wide: bool  # emin == -126: the shift is s0 for every float32 input (bf16, tf32, e8mX)
    neg_zero: bool
    has_inf: bool
    #: -126 - emin: from this block scale exponent up, the leading bit of a float32 subnormal
    #: input never bounds the step (:func:`round_bits_nearest` with ``subnormal_lead=False``)
    k_no_lead: int = 0

    @staticmethod
    def of(p: KernelParams, scaled: bool) -> NearestParams | None:
        if p.is_int or not p.signed or not p.has_zero or not 1 <= p.m <= 22:
            return None
        if p.max_neg_sig != p.max_pos_sig or p.max_neg_exp != p.max_pos_exp:
            return None  # pragma: no cover - signed formats are symmetric
        if scaled:
            if p.emin - p.m < -21 or p.thr_pos_bits < 0x40000000:
                return None
        elif p.emin < -126:
            return None  # pragma: no cover - float32 subnormals would need normalising
        s0 = 23 - p.m
        return NearestParams(
            s0=s0, t=p.emin - p.m + 150, thr=p.thr_pos_bits, lead=127 + p.m,
            bias0=(1 << (s0 - 1)) - 1, notmask0=-(1 << s0), wide=(p.emin == -126 and not scaled),
            neg_zero=p.neg_zero, has_inf=p.has_inf, k_no_lead=-126 - p.emin,
        )


def round_bits_nearest(b: torch.Tensor, k: torch.Tensor | None, c: NearestParams,
                       overflow: Overflow, subnormal_lead: bool = True) -> torch.Tensor:
    """Round-to-nearest-even fast path of :func:`round_bits` (same bits, about a third of the
    integer operations): round the magnitude bits by adding half an ulp minus one plus the kept
    last bit, then clear the dropped bits.

    With x = sig * 2^(E - 150) (sig = 2^23 + F, or F for a float32 subnormal), the format's grid
    step at x (scaled by 2^k) is 2^(s + E - 150) with s = max(23 - m, t + k - max(E, 1)) dropped
    bits of sig; s >= 25 leaves 0 (below half the smallest step). The carry of a round-up moves
    into the exponent by itself. Without a block scale and with emin == -126 (``wide``), s is
    the constant 23 - m for every input (float32 subnormals too: their grid is fixed-point), and
    the add-and-mask works on the magnitude bits directly.

    ``subnormal_lead=False`` (with a block scale): the caller guarantees k >= ``c.k_no_lead``
    (-126 - emin) wherever an input is a float32 subnormal. Then t + k - 1 >= 23 - m exceeds
    the leading-bit bound of every subnormal (at most 22 - m), so s = max(23 - m, t + k -
    max(E, 1)) for every input, without that bound's int -> float conversion and bit cast
    (which compiled CPU code does element by element: about 40% of the fused MX kernel).
    """
    mag = b & 0x7FFFFFFF
    if c.wide and k is None:
        res = (mag + c.bias0 + ((mag >> c.s0) & 1)) & c.notmask0
    else:
        e1 = torch.clamp(mag >> 23, min=1)
        base = (e1 - 1) << 23
        sig = mag - base
        if k is None or not subnormal_lead:
            s = torch.clamp((c.t if k is None else k + c.t) - e1, c.s0, 30)
        else:
            # with a block scale the normal range may start below 2^-126: the leading bit of a
            # float32 subnormal (exact int -> float conversion) then bounds the step; for a
            # normal input (clamped to 2^23) this term is 23 - m
            lead = ((torch.clamp(mag, max=1 << 23).to(torch.float32).view(torch.int32) >> 23)
                    - c.lead)
            s = torch.clamp(torch.maximum((k + c.t) - e1, lead), max=30)
        half_m1 = 0x3FFFFFFF >> (31 - s)  # 2^(s - 1) - 1
        r = ((sig + half_m1 + ((sig >> s) & 1)) >> s) << s
        res = torch.where(r == 0, 0, r + base)
    thr = c.thr if k is None else k * (1 << 23) + c.thr
    if overflow is Overflow.SATURATE:
        res = torch.minimum(res, thr) if k is not None else torch.clamp(res, max=thr)
    else:
        inf_in = mag == F32_INF
        ovf = (res > thr) | inf_in
        if overflow is Overflow.INF:
            res = torch.where(ovf, F32_INF, res)
        else:  # NAN: an infinite input stays infinite where the format has inf
            res = torch.where(ovf, F32_NAN, res)
            if c.has_inf:
                res = torch.where(inf_in, F32_INF, res)
    sign = b & INT32_MIN
    # formats without -0 (fnuz) give +0 for every zero result
    res = res | sign if c.neg_zero else torch.where(res == 0, 0, res | sign)
    return torch.where(mag > F32_INF, F32_NAN, res)


def split_f32(E: torch.Tensor, F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponent e = floor(log2 x) and the 23-bit fraction of the normalised significand of
    non-zero float32 magnitudes with exponent field E and fraction field F (subnormals too:
    the exact int -> float conversion of F finds their leading bit)."""
    fF = F.to(torch.float32).view(torch.int32)
    sub = E == 0
    return torch.where(sub, (fF >> 23) - 276, E - 127), torch.where(sub, fF & 0x7FFFFF, F)


def ldexp_bits(n: torch.Tensor, u: torch.Tensor | int) -> torch.Tensor:
    """float32 bits of ``n * 2^u`` for int32 n in [0, 2^25) (exact, or inf bits on overflow).

    Requires ``n * 2^u`` to be a multiple of 2^-149 (true for every value of a valid format).
    """
    fb = n.to(torch.float32).view(torch.int32)
    ex = (fb >> 23) + u
    normal = fb + u * (1 << 23)
    sub = n << (min(max(u + 149, 0), 30) if isinstance(u, int) else torch.clamp(u + 149, 0, 30))
    out = torch.where(ex >= 1, normal, sub)
    out = torch.where(ex >= 255, F32_INF, out)
    return torch.where(n == 0, 0, out)


def round_bits(
    b: torch.Tensor,
    k: torch.Tensor | None,
    p: KernelParams,
    rounding: Rounding,
    overflow: Overflow,
    flush_in_below: int,
    flush_out: bool,
    rand: torch.Tensor | None,
    sr_bits: int,
    unit_normal: bool = False,
) -> torch.Tensor:
    """Round float32 bit patterns ``b`` (int32) to the format, scaled by 2^k; returns int32 bits.

    ``unit_normal``: the caller guarantees that the format's smallest step 2^(emin + k - m) is a
    float32 normal for every element that is not zero (always true without k when
    emin - m >= -126). The result bits are then assembled with integer adds only; otherwise
    through :func:`ldexp_bits`. Without a block scale, round-to-nearest-even without flushing
    goes through :func:`round_bits_nearest` where the format allows it (bit-identical, tested);
    with one, callers that know k's range call it themselves (the fused MX kernel).
    """
    if (k is None and rounding is Rounding.NEAREST_EVEN and not flush_in_below and not flush_out
            and overflow is not Overflow.WRAP and p.nearest is not None):
        return round_bits_nearest(b, None, p.nearest, overflow)
    return round_bits_generic(b, k, p, rounding, overflow, flush_in_below, flush_out, rand,
                              sr_bits, unit_normal)


def round_bits_generic(
    b: torch.Tensor,
    k: torch.Tensor | None,
    p: KernelParams,
    rounding: Rounding,
    overflow: Overflow,
    flush_in_below: int,
    flush_out: bool,
    rand: torch.Tensor | None,
    sr_bits: int,
    unit_normal: bool = False,
) -> torch.Tensor:
    """:func:`round_bits` for every rounding, overflow and flush mode (see there)."""
    neg = b < 0
    mag = b & 0x7FFFFFFF
    E = mag >> 23
    F = mag & 0x7FFFFF
    is_nan = mag > F32_INF
    is_inf = mag == F32_INF
    is_zero = mag < flush_in_below if flush_in_below else mag == 0
    unit_normal = unit_normal or (k is None and p.emin - p.m >= -126)
    if unit_normal or (k is None and p.emin > -126):
        # every float32 subnormal lies below the format's normal range, where the grid step is
        # fixed: read it as 0.F * 2^-126 (no normalisation needed)
        e = torch.clamp(E, min=1) - 127
        sig = torch.where(E == 0, F, F | 0x800000)
    else:
        # normalise float32 subnormals: x = sig * 2^(e - 23), sig in [2^23, 2^24)
        e, frac = split_f32(E, F)
        sig = frac | 0x800000
    kk = 0 if k is None else k
    emin = p.emin + kk
    # number of dropped bits (negative: integer grid overflow)
    s_real = (23 - p.m) + torch.clamp(emin - e, min=0)
    s = torch.clamp(s_real, 0, 30)
    q = sig >> s
    rem = sig & ((1 << s) - 1)
    half = (1 << s) >> 1
    t = None
    if rounding is Rounding.STOCHASTIC:
        assert rand is not None
        t_shift = s_real - sr_bits
        t = torch.where(t_shift >= 0, rem >> torch.clamp(t_shift, 0, 30),
                        rem << torch.clamp(-t_shift, 0, 30))
    up = round_up(rounding, BitsRemainder(q, rem, half, neg, t, rand, sr_bits))
    if up is None:
        up = torch.zeros_like(neg)
    n = q + up.to(torch.int32)
    if unit_normal:
        # x = sig * 2^(E - 150) for E >= 1. With s <= 23 the rounded significand n << s lies in
        # [2^23, 2^24] and adding it to (E - 1) << 23 carries into the exponent by itself; with
        # s >= 24 (or a float32 subnormal x) n is 0 or 1: zero or one grid step.
        unit = (emin - p.m + 127) * (1 << 23)
        res = torch.where((s <= 23) & (E >= 1), (E - 1) * (1 << 23) + (n << s),
                          (n != 0).to(torch.int32) * unit)
    else:
        g = e - 23 + s_real  # exponent of the grid step
        res = ldexp_bits(n, g)
    # overflow thresholds (per sign, shifted by the block scale)
    thr_pos = _const_ldexp(p.thr_pos_bits, p.max_pos_sig, p.max_pos_exp, kk, unit_normal)
    thr_neg = _const_ldexp(p.thr_neg_bits, p.max_neg_sig, p.max_neg_exp, kk, unit_normal)
    if p.max_neg_sig != p.max_pos_sig:
        thr = torch.where(neg, thr_neg, thr_pos).to(torch.int32)
    else:
        thr = thr_pos
    ovf = (res > thr) | is_inf
    if overflow is Overflow.SATURATE:
        ovf_val = thr if isinstance(thr, torch.Tensor) else torch.full_like(b, thr)
    elif overflow is Overflow.INF:
        ovf_val = torch.full_like(b, F32_INF)
    else:  # NAN (WRAP is handled outside the kernel)
        ovf_val = torch.full_like(b, F32_NAN)
    if p.has_inf and overflow is not Overflow.SATURATE:
        ovf_val = torch.where(is_inf, F32_INF, ovf_val)
    out = torch.where(ovf, ovf_val, res)
    zero = is_zero | (n == 0)
    if flush_out:
        min_norm = _const_ldexp(p.min_norm_bits, 1, p.emin, kk, unit_normal)
        # (res, not out: a negative value of an unsigned format is flagged as an overflow,
        # but flushes to zero like any other result below the smallest normal)
        zero = zero | ((res < min_norm) & ~is_inf)
    if p.has_zero:
        out = torch.where(zero, 0, out)
    else:  # E8M0-style: no zero; tiny values become the smallest value, zero becomes NaN
        out = torch.where(n == 0, _const_ldexp(p.min_step_bits, 1, p.emin - p.m, kk), out)
        out = torch.where(is_zero, F32_NAN, out)
    # sign
    if p.signed:
        sign_ok = neg & ~zero if not p.neg_zero else neg
        out = out | (sign_ok.to(torch.int32) << 31)
    elif not p.has_zero:  # negative values and zero have no code (E8M0)
        out = torch.where(neg, F32_NAN, out)
    else:  # unsigned: a negative value is NaN unless it rounds to zero
        out = torch.where(neg & ~zero, F32_NAN if p.has_nan else 0, out)
        out = torch.where(neg & zero, 0, out)
    nan_out = (out & 0x7FFFFFFF) > F32_INF
    out = torch.where(is_nan | nan_out, F32_NAN, out)
    return out


def _const_ldexp(bits0: int, sig: int, exp: int, kk: torch.Tensor | int,
                 normal: bool = False) -> torch.Tensor | int:
    """float32 bits of sig * 2^(exp + kk), where ``bits0`` are the (precomputed) bits for kk = 0.

    A Python int when kk is the int 0. ``normal``: sig * 2^(exp + kk) is known to be a float32
    normal (or beyond the float32 range, where the bits still order correctly) for every kk.
    """
    if isinstance(kk, int):
        assert kk == 0
        return bits0
    if normal:
        return bits0 + kk * (1 << 23)
    return ldexp_bits(torch.full_like(kk, sig), kk + exp)


def _py_ldexp_bits(sig: int, exp: int) -> int:
    """float32 bits of sig * 2^exp (0 <= sig < 2^25) as a Python int, as :func:`ldexp_bits`."""
    if sig == 0:
        return 0
    lead = sig.bit_length() - 1
    e = lead + exp  # exponent of the value
    if e >= 128:
        return F32_INF
    if e >= -126:
        assert lead <= 23 or sig % (1 << (lead - 23)) == 0
        mant = (sig << (23 - lead)) if lead <= 23 else sig >> (lead - 23)
        return ((e + 127) << 23) | (mant & 0x7FFFFF)
    return sig << (exp + 149)


# ---------------------------------------------------------------------------------------------
# compilation management

_COMPILED: dict[tuple, object] = {}
_BACKEND = os.environ.get("PRECISIM_BACKEND", "auto")
COMPILE_MIN_NUMEL = int(os.environ.get("PRECISIM_COMPILE_MIN_NUMEL", str(1 << 18)))
#: under ``"auto"``, a kernel already compiled (for a tensor of at least COMPILE_MIN_NUMEL
#: elements) also runs compiled for tensors down to this size: below COMPILE_MIN_NUMEL only
#: the one-off compilation is not worth it (the eager kernel is ~5x slower per element, and a
#: compiled call costs tens of microseconds)
REUSE_MIN_NUMEL = 1 << 13
RECOMPILE_LIMIT = 64

#: the first-use self-check of compiled kernels (see :func:`run`); ``PRECISIM_KERNEL_SELF_CHECK=0``
#: switches it off (for measuring its cost; results may then depend on the compile cache);
#: ``PRECISIM_KERNEL_SELF_CHECK=all`` checks every call, not only the first (a diagnostic for a
#: compiled kernel suspected of differing on a later batch: slow, every call also runs eagerly)
_SELF_CHECK_ENV = os.environ.get("PRECISIM_KERNEL_SELF_CHECK", "1")
if _SELF_CHECK_ENV not in ("0", "1", "all"):
    raise ValueError(f"PRECISIM_KERNEL_SELF_CHECK={_SELF_CHECK_ENV!r}: accepted '0' (off), "
                     "'1' (the first call of each kernel) and 'all' (every call)")
SELF_CHECK = _SELF_CHECK_ENV != "0"
SELF_CHECK_EVERY_CALL = _SELF_CHECK_ENV == "all"
#: the largest first batch the self-check compares whole; past it, a leading slice of every
#: tensor argument that shares the batch's length (element-wise kernels) is compared, else the
#: whole batch
SELF_CHECK_MAX_NUMEL = 1 << 20
_CHECKED: set[tuple] = set()
_CHECK_STATS = {"checked": 0, "failed": 0, "seconds": 0.0}


def set_backend(backend: str) -> None:
    """Choose how kernels run: ``"eager"``, ``"compile"`` (torch.compile, also for small tensors)
    or ``"auto"`` (compile for tensors of at least ``COMPILE_MIN_NUMEL`` elements, and for
    those of at least ``REUSE_MIN_NUMEL`` once the kernel is compiled; falling back to eager
    if compilation fails). Results are bit-identical in every mode."""
    global _BACKEND
    if backend not in ("eager", "compile", "auto"):
        raise ValueError(f"unknown backend {backend!r}: accepted 'eager', 'compile', 'auto'")
    _BACKEND = backend


def get_backend() -> str:
    return _BACKEND


@contextlib.contextmanager
def compile_from(min_numel: int) -> Iterator[None]:
    """Inside the block, ``"auto"`` compiles kernels from ``min_numel`` elements on (or from
    :data:`COMPILE_MIN_NUMEL` if that is lower): for callers whose tensors are small and
    many (a datapath's per-tile tensors, a training step). Restored on exit."""
    global COMPILE_MIN_NUMEL
    old = COMPILE_MIN_NUMEL
    COMPILE_MIN_NUMEL = min(old, min_numel)
    try:
        yield
    finally:
        COMPILE_MIN_NUMEL = old


def run(fn, key: tuple, numel: int, *args):
    """Run ``fn(*args)`` eagerly or through a cached torch.compile'd version.

    Every compiled kernel of precisim goes through here (element quantization, block scaling,
    telemetry counters, the compiled matrix-unit chains). The first time a compiled kernel is
    used in a process its result is checked bit for bit against its eager twin on that first
    batch (:func:`self_check`): a kernel whose compiled code returns other bits (a compile
    cache written under another CPU capability was seen to) is not used again in the process;
    the eager kernel's result is returned, with a warning. Results therefore never depend on
    the compile cache's hygiene.
    """
    use = _BACKEND == "compile" or (_BACKEND == "auto" and (
        numel >= COMPILE_MIN_NUMEL
        or (numel >= REUSE_MIN_NUMEL and _COMPILED.get(key) not in (None, False))))
    if not use:
        return fn(*args)
    # a view's base is guarded too (its shape would be specialised: a recompile per shape);
    # detach() shares the storage without the base link
    args = tuple(a.detach() if isinstance(a, torch.Tensor) and a._base is not None else a
                 for a in args)
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _compile(fn)
        _COMPILED[key] = compiled
    if compiled is False:
        return fn(*args)
    try:
        out = _call_compiled(compiled, args)
    except Exception as exc:  # pragma: no cover - depends on the machine's compiler
        if _BACKEND == "compile":
            raise
        import warnings

        warnings.warn(f"torch.compile failed ({exc!r:.200}); using the eager kernel", stacklevel=3)
        _COMPILED[key] = False
        return fn(*args)
    if SELF_CHECK and (key not in _CHECKED or SELF_CHECK_EVERY_CALL):
        out = self_check(fn, key, args, out)
    return out


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile of a private copy of ``fn`` (see :func:`_private_copy`)."""
    # inductor's prims (prims.fma, which some kernels call while compiling) are registered
    # by this import; torch.compile imports the module anyway
    import torch._inductor.inductor_prims  # noqa: F401
    # inductor otherwise keeps some values in a wider type across a narrowing cast (seen:
    # x.to(float16).to(float32) compiled to x): precisim's kernels round through casts
    return torch.compile(_private_copy(fn), dynamic=True, fullgraph=True,
                         options={"emulate_precision_casts": True})


def self_check(fn: Callable[..., Any], key: tuple, args: tuple, out: Any) -> Any:
    """The first-use check of a compiled kernel: ``out`` (the compiled kernel's result on
    ``args``) against the eager ``fn`` on the same batch, whose result is the known answer.

    Equal bits (NaN matching NaN): the kernel is trusted for the rest of the process and ``out``
    returned. Different: a ``RuntimeWarning`` names the kernel and how many values differ, the
    kernel runs eagerly from then on, and the eager result is returned. Batches larger than
    :data:`SELF_CHECK_MAX_NUMEL` are checked on a leading slice where the kernel is element-wise
    along the first axis (every tensor argument of the batch's length cut alike), so the check
    costs at most one eager run of a small batch per kernel and process.
    """
    import time

    _CHECKED.add(key)
    t0 = time.perf_counter()
    try:
        probe, probe_out = (None if SELF_CHECK_EVERY_CALL else _probe(args)), None
        compiled = _COMPILED.get(key)
        if probe is not None and callable(compiled):
            try:
                probe_out = _call_compiled(compiled, probe)
            except Exception:  # pragma: no cover - then the whole batch is compared
                probe_out = None
        if probe_out is not None:
            ref, got = fn(*probe), probe_out
        else:
            ref, got = fn(*args), out
        differ, total = _count_differences(got, ref)
    finally:
        _CHECK_STATS["checked"] += 1
        _CHECK_STATS["seconds"] += time.perf_counter() - t0
    if not differ:
        return out
    _CHECK_STATS["failed"] += 1
    _COMPILED[key] = False
    import warnings

    which = "a" if SELF_CHECK_EVERY_CALL else "its first"
    warnings.warn(
        f"the compiled kernel {key[0]!r} returned bits that differ from its eager twin on "
        f"{which} batch in this process ({differ} of {total} values); it runs eagerly from now on. "
        "A torch.compile cache written by another machine or torch build (TORCHINDUCTOR_CACHE_DIR) "
        "is the likely cause: clear it", RuntimeWarning, stacklevel=3)
    return fn(*args) if probe_out is not None else ref


def _probe(args: tuple) -> tuple | None:
    """A leading slice of a large batch for the self-check, or None (check the whole batch):
    only for kernels whose tensor arguments are all 1-D of one length (the element-wise
    kernels work on flattened tensors), cut to :data:`SELF_CHECK_MAX_NUMEL` elements."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(t.dim() != 1 for t in tensors):
        return None
    n = tensors[0].shape[0]
    if n <= SELF_CHECK_MAX_NUMEL or any(t.shape[0] != n for t in tensors):
        return None
    return tuple(a[:SELF_CHECK_MAX_NUMEL] if isinstance(a, torch.Tensor) else a for a in args)


def _count_differences(got: Any, ref: Any) -> tuple[int, int]:
    """(values that differ, values compared) between two kernel results: tensors bit for bit
    (NaN equal to NaN whatever its payload), tuples and lists element-wise, anything else by
    ``==``; a different type, dtype or shape counts every value as different."""
    if isinstance(ref, tuple | list):
        if not isinstance(got, tuple | list) or len(got) != len(ref):
            return 1, 1
        d = t = 0
        for g, r in zip(got, ref):
            dd, tt = _count_differences(g, r)
            d, t = d + dd, t + tt
        return d, t
    if isinstance(ref, torch.Tensor):
        n = max(ref.numel(), 1)
        if not isinstance(got, torch.Tensor) or got.dtype != ref.dtype \
                or got.shape != ref.shape:
            return n, n
        if ref.is_floating_point():
            ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[ref.element_size()]
            same = (got.contiguous().view(ints) == ref.contiguous().view(ints)) \
                | (torch.isnan(got) & torch.isnan(ref))
        else:
            same = got == ref
        return int((~same).sum()), ref.numel()
    return (0 if got == ref else 1), 1


def self_check_stats() -> dict[str, float]:
    """The first-use self-checks of this process: ``checked`` kernels, ``failed`` ones (now
    eager) and the ``seconds`` the checks took."""
    return dict(_CHECK_STATS)


def _private_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own. torch.compile caches its graphs per code object
    and tells them apart by guards; the constants a kernel closes over (format parameters, the
    rounding mode...) must not depend on those guards (a mode looked up in the rounding table
    was seen to reuse another mode's graph), so each key of :data:`_COMPILED` compiles its own
    copy and the key alone decides which graph runs."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_k{len(_COMPILED)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                              fn.__closure__)


def _call_compiled(compiled: Callable[..., Any], args: tuple) -> Any:
    """Call a compiled kernel with dynamo's per-function recompile limit raised to
    ``RECOMPILE_LIMIT`` for the call: the kernels of one kind (all element formats, say) share a
    code object, and each format structure, rounding and overflow mode is one more entry (past
    torch's default of 8, fullgraph compilation would fail)."""
    cfg = torch._dynamo.config
    old = cfg.recompile_limit
    if old >= RECOMPILE_LIMIT:
        return compiled(*args)
    cfg.recompile_limit = RECOMPILE_LIMIT
    try:
        return compiled(*args)
    finally:
        cfg.recompile_limit = old
