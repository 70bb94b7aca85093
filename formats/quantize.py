"""Element-wise fake quantization, encoding to integer codes and decoding.

``quantize(x, fmt)`` returns, in x's dtype, the value of the format nearest to x under the
chosen rounding (docs/arithmetic.md section 3); ``encode`` returns the format's codes and ``decode``
maps codes back to values. The slow exact twin of every path is in
:mod:`precisim.formats.reference`.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import torch

from . import kernels
from .catalog import UnknownFormatError, get_format
from .descriptor import FloatFormat, FormatError, IntFormat, Nan
from .kernels import F32_NAN, KernelParams, round_bits, split_f32
from .rounding import Overflow, Rounding

FormatLike = FloatFormat | IntFormat | str | torch.dtype

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_SR_BITS = 30

_DTYPE_FORMAT = {dt: get_format(dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}


def check_tensor(x: object, what: str = "x") -> torch.Tensor:
    """Raise a clear error unless ``x`` is a float32/bfloat16/float16 tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{what} has dtype {x.dtype}; accepted float32, bfloat16, float16 "
            "(convert integer or float64 tensors explicitly)"
        )
    return x


def _element_format(fmt: FormatLike) -> FloatFormat | IntFormat:
    """get_format, naming quantize_scaled when ``fmt`` is a block-scaled format's name."""
    try:
        return get_format(fmt)
    except UnknownFormatError:
        from .scaling import SCALED_FORMATS

        if isinstance(fmt, str) and fmt in SCALED_FORMATS:
            raise UnknownFormatError(
                f"{fmt!r} is a block-scaled format, not an element format: call "
                f"precisim.formats.scaling.quantize_scaled(x, {fmt!r})") from None
        raise


def is_subset(fmt: FloatFormat | IntFormat, container: FloatFormat) -> bool:
    """True when every value of ``fmt`` is exactly a value of ``container``."""
    if isinstance(fmt, IntFormat):
        bits_needed = max(abs(fmt.qmin), fmt.qmax).bit_length()
        return (bits_needed <= container.precision and fmt.max <= container.max
                and -fmt.frac_bits >= container.emin - container.man_bits)
    return (
        fmt.man_bits <= container.man_bits
        and fmt.max <= container.max
        and fmt.emin - fmt.man_bits >= container.emin - container.man_bits
        and (not fmt.has_inf or container.has_inf)
    )


def check_overflow(fmt: FloatFormat | IntFormat, overflow: Overflow | str) -> Overflow:
    """``overflow`` parsed and checked against ``fmt`` (``inf`` needs an infinity, ``nan`` a NaN
    code, ``wrap`` an integer format); raises :class:`FormatError` naming what is accepted."""
    ovf = Overflow.parse(overflow)
    _check_policy(fmt, ovf)
    return ovf


def _check_policy(fmt: FloatFormat | IntFormat, overflow: Overflow) -> None:
    if overflow is Overflow.INF and not fmt.has_inf:
        raise FormatError(f"overflow='inf' is not possible: {fmt.name} has no infinity; "
                          "accepted 'saturate'" + (" or 'nan'" if fmt.has_nan else ""))
    if overflow is Overflow.NAN and not fmt.has_nan:
        raise FormatError(f"overflow='nan' is not possible: {fmt.name} has no NaN; "
                          "accepted 'saturate'" + (" or 'inf'" if fmt.has_inf else ""))
    if overflow is Overflow.WRAP and not isinstance(fmt, IntFormat):
        raise FormatError(f"overflow='wrap' is for integer formats, not {fmt.name}")


def check_sr_bits(rounding: Rounding, sr_bits: int | None) -> int:
    """The random bits per value a rounding draws: ``sr_bits`` checked (only stochastic
    rounding takes it; 1..MAX_SR_BITS), or MAX_SR_BITS when it is None. Raises ValueError naming
    the bad value."""
    if sr_bits is None:
        return MAX_SR_BITS
    if rounding is not Rounding.STOCHASTIC:
        raise ValueError(f"sr_bits={sr_bits!r} is only meaningful with rounding='sr'")
    if isinstance(sr_bits, bool) or not isinstance(sr_bits, int) \
            or not 1 <= sr_bits <= MAX_SR_BITS:
        raise ValueError(f"sr_bits={sr_bits!r} is not valid: accepted 1..{MAX_SR_BITS}")
    return sr_bits


def check_flags(**flags: object) -> None:
    """Raise ValueError naming any flag that is not a bool (a string such as 'no' is truthy:
    it would switch the flag on silently)."""
    for name, v in flags.items():
        if not isinstance(v, bool):
            raise ValueError(f"{name}={v!r} is not valid: accepted True or False")


def random_bits(shape: torch.Size, bits: int, device: torch.device, seed: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform integers in [0, 2^bits) (int32) for stochastic rounding, reproducible by seed."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not -(2**63) <= seed < 2**64):
        raise ValueError(f"seed={seed!r} is not valid: accepted an integer in -2^63..2^64-1")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator={generator!r} is not valid: accepted a torch.Generator")
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
    return torch.randint(0, 1 << bits, tuple(shape), generator=generator, dtype=torch.int32,
                         device=device)


def check_rand(rand: torch.Tensor, shape: tuple[int, ...], rounding: Rounding, bits: int,
               seed: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """Explicit random bits checked: stochastic rounding only, no seed/generator beside
    them, int32 of ``shape`` with values in [0, 2^bits). Returns them contiguous."""
    if rounding is not Rounding.STOCHASTIC:
        raise ValueError(f"rand is only used with rounding='sr', not {rounding.value!r}")
    if seed is not None or generator is not None:
        raise ValueError("pass either rand or seed/generator, not both")
    if not isinstance(rand, torch.Tensor) or rand.dtype != torch.int32 \
            or tuple(rand.shape) != shape:
        got = (f"{rand.dtype} {tuple(rand.shape)}" if isinstance(rand, torch.Tensor)
               else type(rand).__name__)
        raise ValueError(f"rand must be an int32 tensor of shape {shape}, got {got}")
    return rand.contiguous()


def flush_threshold_bits(dtype: torch.dtype) -> int:
    """float32 bits of the source dtype's smallest normal (inputs below it are flushed)."""
    return (127 + _DTYPE_FORMAT[dtype].emin) << 23


def round_f32_bits(
    bits: torch.Tensor,
    fmt: FloatFormat | IntFormat,
    rounding: Rounding,
    overflow: Overflow,
    *,
    k: torch.Tensor | None = None,
    flush_in_below: int = 0,
    flush_output: bool = False,
    rand: torch.Tensor | None = None,
    sr_bits: int = MAX_SR_BITS,
) -> torch.Tensor:
    """Round float32 bit patterns to ``fmt`` scaled by 2^k (int32 in, int32 out)."""
    p = KernelParams.of(fmt)
    if overflow is Overflow.WRAP:
        return _wrap_int(bits, fmt, rounding, k, flush_in_below, rand, sr_bits)

    def fn(b, kk, rr):
        # the int32 bits as the kernel's input: a float32 -> int32 view inside a compiled CPU
        # kernel copies every vector through the stack
        return round_bits(b, kk, p, rounding, overflow, flush_in_below, flush_output, rr,
                          sr_bits)

    key = ("round", p, rounding, overflow, flush_in_below, flush_output, sr_bits,
           k is None, rand is None)
    if k is None:  # one dimension: one compiled kernel for every shape
        flat = bits.reshape(-1)
        rflat = None if rand is None else rand.reshape(-1)
        out = kernels.run(fn, key, flat.numel(), flat, None, rflat)
        return out.view(bits.shape)
    return kernels.run(fn, key, bits.numel(), bits, k, rand)


def _wrap_int(bits, fmt: IntFormat, rounding, k, flush_in_below, rand, sr_bits):
    """Two's-complement wrap-around: round on an unbounded grid, keep the low ``bits`` bits."""
    p = KernelParams(m=23, emin=-fmt.frac_bits + 23, max_pos_sig=(1 << 24) - 1, max_pos_exp=104,
                     max_neg_sig=(1 << 24) - 1, max_neg_exp=104, has_inf=False, has_nan=False,
                     neg_zero=False, has_zero=True, signed=True, is_int=True)
    y = round_bits(bits, k, p, rounding, Overflow.NAN, flush_in_below, False, rand, sr_bits)
    nonfinite = (y & 0x7FFFFFFF) >= 0x7F800000
    mag = (y & 0x7FFFFFFF).to(torch.int64)
    E = mag >> 23
    sig = torch.where(E == 0, mag, (mag & 0x7FFFFF) | 0x800000)
    e = torch.where(E == 0, torch.full_like(E, -126), E - 127)
    u = -fmt.frac_bits + (0 if k is None else k.to(torch.int64))
    sh = e - 23 - u
    code = torch.where(sh >= 0, sig << torch.clamp(sh, 0, 40), sig >> torch.clamp(-sh, 0, 40))
    code = torch.where(y < 0, -code, code) & ((1 << fmt.bits) - 1)
    if fmt.signed:
        code = torch.where(code >= (1 << (fmt.bits - 1)), code - (1 << fmt.bits), code)
        code = torch.clamp(code, min=fmt.qmin)
    val = code.to(torch.float32) * (2.0 ** -fmt.frac_bits)
    if k is not None:
        val = torch.ldexp(val, k.to(torch.float32))
    out = val.view(torch.int32)
    return torch.where(nonfinite, F32_NAN, out)


def quantize(
    x: torch.Tensor,
    fmt: FormatLike,
    rounding: Rounding | str = Rounding.NEAREST_EVEN,
    overflow: Overflow | str = Overflow.SATURATE,
    *,
    flush_input: bool = False,
    flush_output: bool = False,
    sr_bits: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    rand: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` to ``fmt``; returns a tensor of x's dtype holding format values.

    Args:
        x: float32, bfloat16 or float16 tensor of any shape, on any device.
        fmt: a :class:`FloatFormat` / :class:`IntFormat`, a name (``"e4m3"``, ``"binary8p3se"``,
            ``"e5m7"``...) or a torch float8 dtype.
        rounding: see :class:`Rounding`; ``"sr"`` draws random bits (``seed`` / ``generator``
            make it reproducible; ``sr_bits`` sets how many, default 30).
        overflow: see :class:`Overflow`. ``"saturate"`` (default) clamps to +-max, including
            +-inf inputs; ``"inf"`` / ``"nan"`` need the format to have that value.
        flush_input: read inputs below x.dtype's smallest normal as zero (DAZ).
        flush_output: results below the format's smallest normal become zero (FTZ).
        rand: explicit random bits for ``"sr"`` (int32 in [0, 2^sr_bits), x's shape), e.g.
            counter-based bits that replay (:mod:`precisim.emulation.training.sr`); then
            ``seed``/``generator`` must not be given.

    NaN inputs give NaN, also for formats without a NaN code (their codes cannot hold it:
    :func:`encode` then raises). Unsigned formats give NaN (or 0 without a NaN code) for negative
    values that do not round to zero. The result must be representable in x.dtype: quantizing
    a bfloat16 tensor to fp16, say, raises an error (convert to float32 first).
    """
    x = check_tensor(x)
    f = _element_format(fmt)
    rnd = Rounding.parse(rounding)
    ovf = Overflow.parse(overflow)
    check_flags(flush_input=flush_input, flush_output=flush_output)
    _check_policy(f, ovf)
    bits_sr = check_sr_bits(rnd, sr_bits)
    container = _DTYPE_FORMAT[x.dtype]
    if x.dtype != torch.float32 and not is_subset(f, container):
        raise FormatError(
            f"{f.name} values are not all representable in {x.dtype}; quantize a float32 copy "
            "(x.float()) instead"
        )
    if rand is not None:
        rand = check_rand(rand, tuple(x.shape), rnd, bits_sr, seed, generator)
    elif rnd is Rounding.STOCHASTIC:
        rand = random_bits(x.shape, bits_sr, x.device, seed, generator)
    elif seed is not None or generator is not None:
        raise ValueError("seed/generator are only used with rounding='sr'")
    xf = x.to(torch.float32).contiguous()
    out = round_f32_bits(
        xf.view(torch.int32), f, rnd, ovf,
        flush_in_below=flush_threshold_bits(x.dtype) if flush_input else 0,
        flush_output=flush_output, rand=rand, sr_bits=bits_sr,
    ).view(torch.float32)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# codes

def code_dtype(fmt: FloatFormat | IntFormat) -> torch.dtype:
    """The integer dtype that holds the format's codes (uint8 up to 8 bits, else int32)."""
    return torch.uint8 if fmt.bits <= 8 else torch.int32


def values_to_codes(y: torch.Tensor, fmt: FloatFormat | IntFormat) -> torch.Tensor:
    """Codes of float32 values that are exact values of ``fmt`` (as returned by quantize).
    One compiled kernel for large tensors (:func:`precisim.formats.kernels.run`)."""
    y = y.to(torch.float32).contiguous()
    if isinstance(fmt, IntFormat):
        if torch.isnan(y).any():
            raise ValueError(f"{fmt.name} has no code for NaN")
        q = torch.ldexp(y, torch.tensor(float(fmt.frac_bits))).to(torch.int64)
        return (q & ((1 << fmt.bits) - 1)).to(code_dtype(fmt))
    if fmt.nan is Nan.NONE and torch.isnan(y).any():
        raise ValueError(f"{fmt.name} has no NaN code: the input holds NaN")
    flat = y.reshape(-1)  # one compiled kernel for every shape
    return kernels.run(_codes_kernel(fmt), ("codes", fmt), flat.numel(), flat).reshape(y.shape)


@lru_cache(maxsize=64)
def _codes_kernel(fmt: FloatFormat):  # noqa: ANN202 - a closure over the format's constants
    m, emin, bias, bits = fmt.man_bits, fmt.emin, fmt.bias, fmt.bits
    inf_code = fmt.inf_magnitude_code if fmt.inf_magnitude_code is not None else 0
    neg_zero, nan_code, signed = fmt.has_negative_zero, fmt.nan_code, fmt.signed
    out_dtype = code_dtype(fmt)

    def codes(y: torch.Tensor) -> torch.Tensor:
        b = y.view(torch.int32)
        neg = b < 0
        mag = b & 0x7FFFFFFF
        E = mag >> 23
        F = mag & 0x7FFFFF
        e, frac = split_f32(E, F)
        sig = frac | 0x800000
        code_n = ((e + bias) << m) | ((sig >> (23 - m)) & ((1 << m) - 1))
        code_s = sig >> torch.clamp(23 - m + emin - e, 0, 30)
        code = torch.where(e >= emin, code_n, code_s)
        code = torch.where(mag == 0, 0, code)
        code = torch.where(mag == 0x7F800000, inf_code, code)
        if signed:
            keep_sign = neg & ((mag != 0) | neg_zero)
            code = code | torch.where(keep_sign, 1 << (bits - 1), 0)
        if nan_code is not None:
            code = torch.where(mag > 0x7F800000, nan_code, code)
        return code.to(out_dtype)
    return codes


def encode(
    x: torch.Tensor,
    fmt: FormatLike,
    rounding: Rounding | str = Rounding.NEAREST_EVEN,
    overflow: Overflow | str = Overflow.SATURATE,
    **kwargs,
) -> torch.Tensor:
    """Round ``x`` to ``fmt`` (as :func:`quantize`) and return the codes (uint8 or int32)."""
    x = check_tensor(x)  # float64 would be rounded twice (through float32), ints silently cast
    f = get_format(fmt)
    return values_to_codes(quantize(x.float() if x.dtype != torch.float32 else x, f, rounding,
                                    overflow, **kwargs), f)


@lru_cache(maxsize=64)
def _decode_table(fmt: FloatFormat | IntFormat) -> torch.Tensor:
    """float32 value of every code (built with the bit formula; tested against the reference)."""
    c = torch.arange(1 << fmt.bits, dtype=torch.int32)
    if isinstance(fmt, IntFormat):
        k = torch.where(c >= (1 << (fmt.bits - 1)), c - (1 << fmt.bits), c) if fmt.signed else c
        vals = torch.ldexp(k.to(torch.float32), torch.tensor(float(-fmt.frac_bits)))
        if fmt.symmetric:
            vals = torch.where(k < fmt.qmin, float("nan"), vals)
        return vals
    m = fmt.man_bits
    mag_mask = (1 << (fmt.exp_bits + m)) - 1
    mag = c & mag_mask
    E = mag >> m
    M = mag & ((1 << m) - 1)
    if fmt.subnormals:
        sub = E == 0
        n = torch.where(sub, M, M | (1 << m))
        g = torch.where(sub, 1 - fmt.bias - m, E - fmt.bias - m)
    else:
        n = M | (1 << m)
        g = E - fmt.bias - m
    bits = kernels.ldexp_bits(n, g)
    if fmt.inf_magnitude_code is not None:
        bits = torch.where(mag == fmt.inf_magnitude_code, 0x7F800000, bits)
    reserved = torch.zeros_like(c, dtype=torch.bool)
    if fmt.nan is Nan.IEEE:
        reserved = ((1 << fmt.exp_bits) - 1 == E) & (M != 0)
    elif fmt.nan is Nan.TOP:
        reserved = mag == mag_mask
    if fmt.signed:
        neg = (c >> (fmt.bits - 1)) == 1
        bits = bits | (neg.to(torch.int32) << 31)
        if fmt.nan is Nan.NEG_ZERO:
            reserved = reserved | (c == (1 << (fmt.bits - 1)))
    bits = torch.where(reserved, F32_NAN, bits)
    return bits.view(torch.float32)


def decode(codes: torch.Tensor, fmt: FormatLike, dtype: torch.dtype = torch.float32
           ) -> torch.Tensor:
    """Values of integer ``codes`` of ``fmt`` (codes outside 0..2^bits-1 raise an error)."""
    f = get_format(fmt)
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got "
                        f"{getattr(codes, 'dtype', type(codes).__name__)}")
    if f.bits > 16:
        raise FormatError(f"decode supports formats of up to 16 bits, not {f.name}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << f.bits)):
        raise ValueError(f"codes must lie in 0..{(1 << f.bits) - 1} for {f.name}; got "
                         f"{int(c.min())}..{int(c.max())}")
    table = _decode_table(f).to(codes.device)
    return table[c].to(dtype)


def exact_values(fmt: FloatFormat | IntFormat) -> list[Fraction | float]:
    """Exact value of every code (reference, for tables and tests)."""
    return [v for _, v in fmt.value_table()]
