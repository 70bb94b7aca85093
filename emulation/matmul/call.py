"""One GEMM call as every matrix-unit kernel sees it: :class:`GemmCall`, built by :func:`prepare`.

:func:`prepare` checks the operands (types, shapes, devices, that every value is a value of the
unit's formats), broadcasts them to (B, M, K) x (B, K, N), computes the special-value masks of
the model (docs/arithmetic.md section 5: NaN, +-inf) and replaces non-finite inputs by 0, flushes
input subnormals when the unit does, and draws the random bits of a stochastic accumulator. A
kernel then only ever sees finite values; :meth:`GemmCall.finish` puts the special values back
and restores the output shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache, cached_property

import torch
from precisim.formats import FloatFormat, IntFormat, Overflow, Rounding

from ..matrix_unit import MatrixUnit
from .floatarith import all_finite, any_true
from .intarith import align_exponents, emin_of

__all__ = ["FIDELITIES", "GemmCall", "Scales", "prepare"]

FIDELITIES = ("bit-exact", "fast")


# ---------------------------------------------------------------------------------------------
# scales of block-scaled GEMMs (built by :mod:`precisim.emulation.scaled`)

@dataclass
class Scales:
    """The scales of a block-scaled GEMM as the kernels apply them (docs/arithmetic.md
    section 2).

    ``a``: (B, M, nA) float64, the scale of K-block ``i // a_blk`` of each row of A (None: no
    K-blocked scales on A); ``b``: (B, N, nB) likewise for the columns of B. ``exact``: the
    scale product s_a*s_b is exact (E8M0 pairs, the exponents add), else it is rounded once
    to fp32 (RNE). ``pow2``: every K-blocked scale is a power of two or zero.
    Epilogue (whole-K scales): ``ep_a`` (B, M) and ``ep_b`` (B, N) float64 fp32 values and
    ``ep_g`` = fl32(g_a*g_b) (NVFP4 tensor scales; 1.0 if none); alpha =
    fl32(fl32(ep_a*ep_b) / ep_g) multiplies the final accumulator once (fp32 RNE).
    """

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    a_blk: int = 1
    b_blk: int = 1
    exact: bool = True
    pow2: bool = True
    ep_a: torch.Tensor | None = None
    ep_b: torch.Tensor | None = None
    ep_g: float | None = None

    @property
    def has_k(self) -> bool:
        return self.a is not None or self.b is not None

    @property
    def has_epilogue(self) -> bool:
        return self.ep_a is not None or self.ep_b is not None or self.ep_g is not None

    def epilogue_only(self) -> Scales:
        """The same scales without the K-blocked ones (once those are folded elsewhere)."""
        return Scales(ep_a=self.ep_a, ep_b=self.ep_b, ep_g=self.ep_g)

    def _product(self, sa, sb) -> torch.Tensor:
        s = sa * sb  # exact in float64: two float32 values
        return s if self.exact else s.to(torch.float32).to(torch.float64)

    def factors(self, lo: int, ns: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The scales of the K-range starting at product ``lo`` unmultiplied: A's (B, M, 1) and
        B's (B, 1, Nc) float64 (a missing one is 1.0), whose product :meth:`at` forms (as
        :meth:`_product`: exact, or rounded once to fp32 unless ``exact``)."""
        one = torch.ones((1, 1, 1), dtype=torch.float64)
        sa = one if self.a is None else self.a[:, :, lo // self.a_blk, None]
        sb = one if self.b is None else self.b[:, ns, lo // self.b_blk][:, None, :]
        return sa, sb

    def at(self, lo: int, ns: slice, shape: tuple[int, int, int]) -> torch.Tensor:
        """(B, M, Nc) scale products of the K-range starting at product ``lo``."""
        return self._product(*self.factors(lo, ns)).expand(shape)

    def at32(self, lo: int, ns: slice) -> torch.Tensor:
        """:meth:`at` in float32 arithmetic (fast mode): fl32(s_a*s_b), broadcastable."""
        one = torch.ones((), dtype=torch.float32)
        sa = one if self.a is None else self.a[:, :, lo // self.a_blk, None].float()
        sb = one if self.b is None else self.b[:, ns, lo // self.b_blk][:, None, :].float()
        return sa * sb

    def terms(self, lo: int, hi: int, ns: slice) -> torch.Tensor:
        """(B, M, Nc, hi-lo) scale product of every product of the K-range [lo, hi)."""
        one = torch.ones((), dtype=torch.float64)
        idx = torch.arange(lo, hi)
        sa = one if self.a is None else self.a[:, :, idx // self.a_blk][:, :, None, :]
        sb = one if self.b is None else self.b[:, ns][:, :, idx // self.b_blk][:, None, :, :]
        return self._product(sa, sb)

    def expanded(self, K: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-element scales: A's (B, M, K) and B's (B, K, N) (None where unscaled)."""
        idx = torch.arange(K)
        sa = None if self.a is None else self.a[:, :, idx // self.a_blk]
        sb = None if self.b is None else self.b[:, :, idx // self.b_blk].transpose(1, 2)
        return sa, sb

    def alpha(self, ns: slice, shape: tuple[int, int, int]) -> torch.Tensor:
        """(B, M, Nc) epilogue factors (float64 holding fp32 values)."""
        one = torch.ones((), dtype=torch.float64)
        pa = one if self.ep_a is None else self.ep_a[:, :, None]
        pb = one if self.ep_b is None else self.ep_b[:, None, ns]
        p = (pa * pb).to(torch.float32).to(torch.float64)  # fl32(p_a*p_b)
        if self.ep_g is not None:
            # a float64 quotient of float32 values rounded to float32 is the correctly rounded
            # float32 quotient (53 >= 2*24 + 2: the double rounding is innocuous)
            p = (p / self.ep_g).to(torch.float32).to(torch.float64)
        return p.expand(shape)


# ---------------------------------------------------------------------------------------------
# the call

@dataclass
class GemmCall:
    """A prepared GEMM ``D = A @ B + C`` under ``unit`` (see the module docstring).

    ``a`` (B, M, K) and ``b`` (B, K, N) float32 finite values of the unit's input formats (or
    of ``elem_formats``, narrower block-scaled element formats); ``c`` (B, M, N) float32 or None
    (+0); ``scales``: the block scales of :func:`precisim.emulation.scaled_matmul`; ``rand``:
    (B, M, N, blocks) random integers of a stochastic accumulator.
    """

    unit: MatrixUnit
    fidelity: str
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor | None
    out_shape: tuple[int, ...]
    scales: Scales | None = None
    elem_formats: tuple | None = None
    rand: torch.Tensor | None = None
    max_chunk_elements: int = 1 << 21
    specials: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, M, K, N)."""
        B, M, K = self.a.shape
        return B, M, K, self.b.shape[-1]

    @property
    def c_format(self) -> FloatFormat | IntFormat:
        """The format of c: the promotion register's when the unit promotes."""
        u = self.unit
        return u.promotion_format if u.promotion_interval else u.acc_format

    @property
    def has_k_scales(self) -> bool:
        return self.scales is not None and self.scales.has_k

    def c_or_zero(self) -> torch.Tensor:
        """c, or +0 of the output shape."""
        if self.c is not None:
            return self.c
        B, M, _, N = self.shape
        return torch.zeros((B, M, N), dtype=torch.float32, device=self.a.device)

    @cached_property
    def exponent_dtype(self) -> tuple[torch.dtype, int, int]:
        """(dtype, zero marker, threshold) of the alignment exponents in the float block
        kernels: int8 when every exponent of the input formats lies in [-15, 15] (FP8 and
        narrower), else int16. A zero's exponent is the marker; a sum of two exponents below
        the threshold involves a zero."""
        lim = max(abs(emin_of(f)) if isinstance(f, IntFormat) else max(abs(f.emin), abs(f.emax))
                  for f in (self.unit.a_format, self.unit.b_format))
        if lim <= 15:
            return torch.int8, -64, -40
        return torch.int16, -(1 << 14), -(1 << 13)

    @cached_property
    def exponents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Alignment exponents of a and b in :attr:`exponent_dtype` (computed once)."""
        edt, zero, _ = self.exponent_dtype
        return (align_exponents(self.a, self.unit.a_format, zero).to(edt),
                align_exponents(self.b, self.unit.b_format, zero).to(edt))

    def exponent_range(self, which: int) -> tuple[int, int] | None:
        """(min, max) alignment exponent of the nonzero elements of a (0) or b (1); None
        when all are zero."""
        key = ("range", which)
        if key not in self._cache:
            e = self.exponents[which]
            zero = self.exponent_dtype[1]
            r = None
            if e.numel():
                hi = int(e.max())
                if hi != zero:
                    r = (int(torch.where(e == zero, hi, e).min()), hi)
            self._cache[key] = r
        return self._cache[key]

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """The kernel's (B, M, N) result with the special values put back, in the output
        shape."""
        return apply_specials(self.unit, out, self.specials).reshape(self.out_shape)


@cache
def _check_consts(fmt: FloatFormat) -> tuple[int, int, int, float]:
    m = min(fmt.man_bits, 23)
    max_bits = int(torch.tensor(float(fmt.max), dtype=torch.float32).view(torch.int32))
    normal_bits = 0 if m >= 23 else (max(fmt.emin, -126) + 127) << 23
    return (1 << (23 - m)) - 1, max_bits, normal_bits, 2.0 ** (fmt.emin - m + 23)


def check_values(x: torch.Tensor, fmt: FloatFormat | IntFormat, what: str) -> bool:
    """Raise ``ValueError`` unless every finite element of x is a value of ``fmt``; returns
    True when it found every element finite (False: not known).

    For float formats a few passes on the float32 bits look for suspects (magnitudes above
    the format's max, inf and NaN included; bits below the format's precision; values below
    its smallest normal that are not multiples of its smallest subnormal, tested as
    (|x| + C) - C == |x| with ulp(C) that step, |x| clamped to the smallest normal); only if
    there are any does the exact check run.
    """
    if isinstance(fmt, FloatFormat) and x.dtype == torch.float32 and x.numel():
        low, max_bits, normal_bits, C = _check_consts(fmt)
        bits = x.view(torch.int32)
        mag = bits & 0x7FFFFFFF
        suspect = int(mag.max()) > max_bits or (not fmt.signed and int(bits.min()) < 0)
        if not suspect and low:
            suspect = int((mag & low).max()) > 0
        if not suspect and normal_bits and any_true(mag < normal_bits):
            v = mag.clamp_(max=normal_bits).view(torch.float32)  # (2^emin itself is valid)
            suspect = any_true((v + C) - C != v)
        if not suspect:
            return True
    _check_values_exact(x, fmt, what)
    return False


def _check_values_exact(x: torch.Tensor, fmt: FloatFormat | IntFormat, what: str) -> None:
    if not fmt.has_inf and torch.isinf(x).any():
        raise ValueError(f"{what} holds infinities, which {fmt.name} cannot represent")
    ax = torch.where(torch.isfinite(x), x, 0.0).abs().to(torch.float64)
    if isinstance(fmt, IntFormat):
        k = torch.ldexp(ax, torch.tensor(float(fmt.frac_bits), dtype=torch.float64))
        k = torch.where(torch.signbit(x), -k, k)
        bad = (k != torch.floor(k)) | (k > fmt.qmax) | (k < fmt.qmin)
    else:
        _, ex = torch.frexp(ax)
        e = torch.clamp(ex.to(torch.float64) - 1, min=fmt.emin)
        sig = torch.ldexp(ax, fmt.man_bits - e)
        bad = (sig != torch.floor(sig)) | (ax > float(fmt.max))
        if not fmt.signed:
            bad |= torch.signbit(x) & (ax != 0)
    bad &= ~torch.isnan(x)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{what} holds values that are not {fmt.name} values (first: {float(x[idx])!r} at "
            f"index {idx}); round them first, e.g. precisim.formats.quantize({what}, "
            f"{fmt.name!r})")


def _specials(a, b, c, finite_ab: bool = False):
    """(nan, +inf, -inf) masks of the outputs per the model's special-value rule, or None
    when every input is finite (c may be None: +0; finite_ab: a and b are known finite)."""
    if (finite_ab or (all_finite(a) and all_finite(b))) and (c is None or all_finite(c)):
        return None

    def mm(x, y):
        return (x.to(torch.float64) @ y.to(torch.float64)) > 0

    an, bn = torch.isnan(a), torch.isnan(b)
    ai, bi = torch.isinf(a), torch.isinf(b)
    az, bz = a == 0, b == 0
    ap, am = a > 0, a < 0
    bp, bm = b > 0, b < 0
    nan = mm(an, torch.ones_like(bn)) | mm(torch.ones_like(an), bn) | mm(ai, bz) | mm(az, bi)
    pos = mm(ai & ap, bp) | mm(ai & am, bm) | mm(ap, bi & bp) | mm(am, bi & bm)
    neg = mm(ai & ap, bm) | mm(ai & am, bp) | mm(ap, bi & bm) | mm(am, bi & bp)
    if c is not None:
        nan = nan | torch.isnan(c)
        pos = pos | (c == math.inf)
        neg = neg | (c == -math.inf)
    nan = nan | (pos & neg)
    return nan, pos & ~nan, neg & ~nan


def apply_specials(unit: MatrixUnit, out: torch.Tensor, specials) -> torch.Tensor:
    """Put the special values of :func:`_specials` into a kernel's result."""
    if specials is None:
        return out
    nan, pos, neg = specials
    if not any_true(nan | pos | neg):
        return out
    fmt = unit.out_format
    big = math.inf if fmt.has_inf and unit.output_overflow is not Overflow.SATURATE else float(
        fmt.max)
    out = torch.where(pos, big, out)
    out = torch.where(neg, -big, out)
    return torch.where(nan, math.nan, out)


def _operands(a, b):
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} has dtype {t.dtype}; accepted float32 (or float16 / "
                            "bfloat16, read exactly)")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., rows, cols), got "
                             f"shape {tuple(t.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"shapes do not match: a is {tuple(a.shape)} (K={a.shape[-1]}) and b "
                         f"is {tuple(b.shape)} (K={b.shape[-2]})")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} and b on {b.device}")
    try:
        return torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise ValueError(f"batch dimensions do not broadcast: a {tuple(a.shape)}, b "
                         f"{tuple(b.shape)}") from None


def prepare(a, b, unit: MatrixUnit, c, fidelity: str, *, seed: int | None = None,
            max_chunk_elements: int = 1 << 21, scales: Scales | None = None,
            elem_formats: tuple | None = None, check: bool = True) -> GemmCall:
    """Validate and normalise one GEMM (module docstring). ``check=False`` skips the input
    value checks (the caller guarantees them: :func:`precisim.emulation.scaled_matmul`)."""
    if fidelity not in FIDELITIES:
        raise ValueError(f"fidelity={fidelity!r} is not valid: accepted {FIDELITIES}")
    if not isinstance(max_chunk_elements, int) or max_chunk_elements < 1:
        raise ValueError(f"max_chunk_elements={max_chunk_elements!r} is not valid: accepted a "
                         "positive integer")
    batch = _operands(a, b)
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    B = math.prod(batch)
    a = a.float().expand(*batch, M, K).reshape(B, M, K)
    b = b.float().expand(*batch, K, N).reshape(B, K, N)
    if K == 0:
        # no products: one zero product each, which takes no part in the alignment (docs/
        # arithmetic.md section 4, padding), so D = c through the unit's roundings
        a = a.new_zeros((B, M, 1))
        b = b.new_zeros((B, 1, N))
    out_shape = (*batch, M, N)
    c_fmt = unit.promotion_format if unit.promotion_interval else unit.acc_format
    if c is not None:
        if not isinstance(c, torch.Tensor):
            if isinstance(c, bool) or not isinstance(c, int | float):
                raise TypeError(f"c={c!r} is not valid: accepted a tensor, a number or None")
            c = torch.as_tensor(c, dtype=torch.float32, device=a.device)
        try:
            c = c.float().to(a.device).expand(out_shape)
        except RuntimeError:
            raise ValueError(f"c of shape {tuple(c.shape)} does not broadcast to the output "
                             f"shape {out_shape}") from None
        check_values(c, c_fmt, "c")
        c = c.reshape(B, M, N).contiguous()
    finite = False
    if check:
        finite = check_values(a, unit.a_format, "a") & check_values(b, unit.b_format, "b")
    specials = _specials(a, b, c, finite)
    if specials is not None:
        a = torch.where(torch.isfinite(a), a, 0.0)
        b = torch.where(torch.isfinite(b), b, 0.0)
        if c is not None:
            c = torch.where(torch.isfinite(c), c, 0.0)
    if unit.flush_input_subnormals:
        if isinstance(unit.a_format, FloatFormat):
            a = torch.where(a.abs() < float(unit.a_format.min_normal), 0.0 * a, a)
        if isinstance(unit.b_format, FloatFormat):
            b = torch.where(b.abs() < float(unit.b_format.min_normal), 0.0 * b, b)
    rand = None
    if unit.acc_rounding is Rounding.STOCHASTIC:
        Bt = a.shape[0]
        nblk = max(1, -(-K // unit.block_size))
        gen = torch.Generator(device=a.device)
        gen.manual_seed(0 if seed is None else int(seed))
        rand = torch.randint(0, 1 << unit.acc_sr_bits, (Bt, M, N, nblk), generator=gen,
                             device=a.device, dtype=torch.int64)
    return GemmCall(unit, fidelity, a, b, c, out_shape, scales, elem_formats, rand,
                    max_chunk_elements, specials)
