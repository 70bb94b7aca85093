"""Block-scaled formats: OCP MX, NVFP4, and per-tensor / channel / token / group / tile scaling.

A :class:`ScaledFormat` is an element format, a :class:`Granularity` (which elements share a
scale), a scale format and a :class:`ScaleRule`. ``quantize_scaled`` returns the dequantized
tensor and, on request, the element codes, the scales (E8M0 / E4M3 bytes or fp32) and the
packed codes.

Semantics (docs/arithmetic.md section 2):

* **Power-of-two scales** (E8M0, and fp32 power-of-two scales), OCP MX v1.0 section 6.3. With
  e = floor(log2 amax) and emax the exponent of the element format's largest value, the block
  scale is X = 2^k with
  FLOOR (the spec): k = e - emax (the block max can saturate: 957 in MXFP8-E4M3 -> 896);
  CEIL: k = ceil(log2 amax) - emax;
  RCEIL (cuBLAS / TransformerEngine): the smallest k with amax <= elem_max * 2^k, computed
  exactly (never saturates; no double rounding of amax / elem_max, cf. pytorch/ao PR 4725);
  EVEN (torchao ``ScaleCalculationMode.EVEN`` / AMD Quark): amax's float32 bits plus half an
  element ulp, mantissa dropped, then floor.
  k below -127 clamps to -127 (an all-zero block gets 2^-127); k above 127 gives a NaN scale.
  Elements are P_i = Q(V_i / X), clamped to +-elem_max. The division by X is exact: the kernel
  shifts the element format's exponent range by k instead of dividing (no double rounding).
* **Float scales** (``ScaleRule.AMAX``; fp32 for per-tensor/1x128/128x128 FP8, E4M3 for NVFP4):
  s = fl32(amax / elem_max), rounded to nearest-even into the scale format with saturation. With a
  second-level tensor scale (NVFP4): g = fl32((scale_max * elem_max) / tensor_amax),
  bs = RNE_scale(min(fl32(fl32(block_amax / elem_max) * g), scale_max)),
  v = fl32(fl32(x * g) / bs), q = Q(clamp(v)), dequant = fl32(fl32(q * bs) / g)
  (TransformerEngine ``NVFP4BlockScaling``). Without a tensor scale g = 1 and the same formulas
  hold. A float32 scale below 2^-126 is clamped to 2^-126; a block whose scale is 0 (an all-zero
  block, or an E4M3 scale that underflows) dequantizes to 0; a zero tensor amax gives g = 1.
* **Non-finite values**: a block holding NaN or +-inf dequantizes to NaN in every element (its
  scale is NaN: E8M0 code 0xFF), as in torchao; with a tensor scale a non-finite value makes the
  whole tensor NaN.
* **Range**: a dequantized value beyond the float32 range (possible only under CEIL for an amax
  near 2^128) is returned as +-inf, as a float32 multiply of element and scale would give.
* **Padding**: an axis whose length is not a multiple of the block is padded with zeros to the
  next multiple (zeros never change a block's amax); outputs are cropped back, scales cover
  ceil(n / block) blocks.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from . import kernels
from .catalog import get_format
from .descriptor import FloatFormat, FormatError, IntFormat
from .events import ELEMENT_EVENTS, count, element_events, overflow_ratio
from .kernels import F32_NAN, KernelParams, round_bits, round_bits_nearest, split_f32
from .quantize import (
    check_tensor,
    flush_threshold_bits,
    is_subset,
    values_to_codes,
)
from .registry import Registry, UnknownNameError
from .rounding import Overflow, Rounding

E8M0 = get_format("e8m0")
FP32 = get_format("fp32")


class ScaleRule(enum.Enum):
    """How a block's scale is derived from its absolute maximum (see module docstring)."""

    FLOOR = "floor"  #: OCP MX v1.0 section 6.3
    CEIL = "ceil"
    RCEIL = "rceil"  #: cuBLAS / TransformerEngine: amax / elem_max rounded up to 2^k
    EVEN = "even"  #: AMD Quark / torchao EVEN
    AMAX = "amax"  #: float scale amax / elem_max rounded into the scale format

    @classmethod
    def parse(cls, value: ScaleRule | str) -> ScaleRule:
        if isinstance(value, ScaleRule):
            return value
        key = str(value).strip().lower()
        for m in cls:
            if key in (m.value, m.name.lower()):
                return m
        raise ValueError(f"unknown scale rule {value!r}: accepted "
                         f"{', '.join(m.value for m in cls)}")

    @property
    def power_of_two(self) -> bool:
        return self is not ScaleRule.AMAX


@dataclass(frozen=True)
class Granularity:
    """Which elements share a scale.

    ``blocks`` maps an axis to the block length along it (``None`` = the whole axis); axes not
    listed have blocks of length 1. ``keep_axis`` (per-channel): every axis except this one is
    reduced whole.
    """

    blocks: tuple[tuple[int, int | None], ...] = ()
    keep_axis: int | None = None
    name: str = "custom"

    @staticmethod
    def per_tensor() -> Granularity:
        return Granularity((), keep_axis=None, name="tensor")

    @staticmethod
    def per_channel(axis: int = 0) -> Granularity:
        """One scale per index of ``axis`` (e.g. axis 0 = output channels of a weight)."""
        return Granularity((), keep_axis=axis, name=f"channel(axis={axis})")

    @staticmethod
    def per_token(axis: int = -1) -> Granularity:
        """One scale per token: ``axis`` (the hidden dimension) is reduced whole."""
        return Granularity(((axis, None),), name=f"token(axis={axis})")

    @staticmethod
    def per_group(size: int, axis: int = -1) -> Granularity:
        """Blocks of ``size`` consecutive elements along ``axis`` (MX: 32, NVFP4: 16, 1x128)."""
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"group size {size!r} must be a positive integer")
        return Granularity(((axis, size),), name=f"group({size}, axis={axis})")

    @staticmethod
    def tile(rows: int, cols: int) -> Granularity:
        """2-D blocks over the last two axes (e.g. 128x128 weight blocks)."""
        for v in (rows, cols):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"tile size {v!r} must be a positive integer")
        return Granularity(((-2, rows), (-1, cols)), name=f"tile({rows}x{cols})")

    def is_per_tensor(self) -> bool:
        return self.name == "tensor"

    def block_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Block length along each axis of a tensor of ``shape`` (validated)."""
        nd = len(shape)
        if self.is_per_tensor():
            return tuple(max(d, 1) for d in shape)
        if self.keep_axis is not None:
            ax = _axis(self.keep_axis, nd, self.name)
            return tuple(1 if i == ax else max(d, 1) for i, d in enumerate(shape))
        out = [1] * nd
        for axis, size in self.blocks:
            ax = _axis(axis, nd, self.name)
            out[ax] = max(shape[ax], 1) if size is None else size
        return tuple(out)


def _axis(axis: int, nd: int, what: str) -> int:
    if not -nd <= axis < nd:
        raise ValueError(f"{what}: axis {axis} is out of range for a tensor with {nd} dims "
                         f"(accepted {-nd}..{nd - 1})")
    return axis % nd


@dataclass(frozen=True)
class ScaledFormat:
    """An element format with shared scales. Presets: :func:`get_scaled_format`."""

    name: str
    element: FloatFormat | IntFormat
    granularity: Granularity
    scale: FloatFormat = E8M0
    rule: ScaleRule = ScaleRule.FLOOR
    tensor_scale: bool = False
    rounding: Rounding = Rounding.NEAREST_EVEN

    def __post_init__(self) -> None:
        if self.rule.power_of_two and self.scale not in (E8M0, FP32):
            raise FormatError(f"{self.name}: rule {self.rule.value} gives power-of-two scales; "
                              f"the scale format must be e8m0 or fp32, not {self.scale.name}")
        if not self.rule.power_of_two and self.scale == E8M0:
            raise FormatError(f"{self.name}: an e8m0 scale needs a power-of-two rule "
                              "(floor, ceil, rceil, even), not 'amax'")
        if self.tensor_scale and self.rule.power_of_two:
            raise FormatError(f"{self.name}: a second-level tensor scale needs rule='amax'")

    @property
    def bits_per_element(self) -> float:
        """Storage bits per element including the block scale (not the tensor scale)."""
        g = self.granularity
        if g.is_per_tensor() or g.keep_axis is not None:
            return float(self.element.bits)
        n = math.prod(s for _, s in g.blocks if s is not None)
        if any(s is None for _, s in g.blocks):
            return float(self.element.bits)
        return self.element.bits + self.scale.bits / n

    def with_rule(self, rule: ScaleRule | str) -> ScaledFormat:
        return replace(self, rule=ScaleRule.parse(rule))

    def __str__(self) -> str:
        return self.name


def _mx(name: str, elem: str, rule: ScaleRule, block: int = 32, axis: int = -1) -> ScaledFormat:
    return ScaledFormat(name, get_format(elem), Granularity.per_group(block, axis), E8M0, rule)


class UnknownScaledFormatError(UnknownNameError, FormatError):
    """An unknown block-scaled format name."""


#: builders of the named block-scaled formats: ``build(rule, axis) -> ScaledFormat`` with
#: ``rule`` None (the format's own rule) or a :class:`ScaleRule` (docs/naming.md)
SCALED_FORMATS: Registry[Callable[[ScaleRule | None, int], ScaledFormat]] = Registry(
    "scaled format", prefix="scaled", error=UnknownScaledFormatError,
    materialize=lambda build: build(None, -1),
    hint="element formats (e4m3, e2m1, ...) are looked up by precisim.formats.get_format")


def _pow2_builder(name: str, elem: str) -> Callable[[ScaleRule | None, int], ScaledFormat]:
    def build(rule: ScaleRule | None, axis: int) -> ScaledFormat:
        if rule is not None and not rule.power_of_two:
            raise FormatError(f"{name}: scale rule {rule.value!r} is not possible for an E8M0 "
                              "scale; accepted floor, ceil, rceil, even")
        return _mx(name, elem, rule or ScaleRule.FLOOR, 32, axis)
    return build


def _amax_builder(name: str, elem: str, gran: Callable[[int], Granularity],
                  axes: tuple[int, ...] | None = None
                  ) -> Callable[[ScaleRule | None, int], ScaledFormat]:
    """``axes``: the block axes the format accepts (None: any; its granularity follows the
    axis); a format whose granularity is fixed refuses the others rather than ignore them."""
    def build(rule: ScaleRule | None, axis: int) -> ScaledFormat:
        if axes is not None and axis not in axes:
            raise FormatError(f"{name}: axis={axis} is not possible: its scales are "
                              f"{gran(-1).name}, which fixes the axes; accepted axis "
                              f"{' or '.join(map(str, axes))}")
        return ScaledFormat(name, get_format(elem), gran(axis), FP32, rule or ScaleRule.AMAX)
    return build


def _nvfp4(rule: ScaleRule | None, axis: int) -> ScaledFormat:
    if rule is not None and rule is not ScaleRule.AMAX:
        raise FormatError(f"nvfp4: scale rule {rule.value!r} is not possible: NVFP4's E4M3 "
                          "block scales follow the amax rule (accepted: amax)")
    return ScaledFormat("nvfp4", get_format("e2m1"), Granularity.per_group(16, axis),
                        get_format("e4m3"), ScaleRule.AMAX, tensor_scale=True)


for _name, _elem in (("mxfp8", "e4m3"), ("mxfp8_e4m3", "e4m3"), ("mxfp8_e5m2", "e5m2"),
                     ("mxfp6", "e3m2"), ("mxfp6_e3m2", "e3m2"), ("mxfp6_e2m3", "e2m3"),
                     ("mxfp4", "e2m1"), ("mxint8", "mxint8")):
    SCALED_FORMATS.register(_name, _pow2_builder(_name, _elem))
SCALED_FORMATS.register("nvfp4", _nvfp4)
for _name, _elem, _gran, _axes in (
        # per tensor: one scale whatever the axis
        ("fp8_tensor", "e4m3", lambda axis: Granularity.per_tensor(), None),
        ("fp8_e5m2_tensor", "e5m2", lambda axis: Granularity.per_tensor(), None),
        ("fp8_1x128", "e4m3", lambda axis: Granularity.per_group(128, axis), None),
        # square tiles over the last two axes: K may be either of them
        ("fp8_128x128", "e4m3", lambda axis: Granularity.tile(128, 128), (-1, -2)),
        # one scale per index of axis 0 (a weight's output channels), reducing the K axis -1
        ("int8_channel", "int8", lambda axis: Granularity.per_channel(0), (-1,)),
        ("int8_token", "int8", lambda axis: Granularity.per_token(axis), None),
        ("int4_group128", "int4", lambda axis: Granularity.per_group(128, axis), None)):
    SCALED_FORMATS.register(_name, _amax_builder(_name, _elem, _gran, _axes))


def get_scaled_format(name: str | ScaledFormat, rule: ScaleRule | str | None = None,
                      axis: int = -1) -> ScaledFormat:
    """A named block-scaled format (:data:`SCALED_FORMATS`). ``rule`` overrides the scale rule
    (MX formats: FLOOR by default, as in the OCP spec; rules a format cannot take raise);
    ``axis`` is the axis the blocks run along (the GEMM's K)."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise FormatError(f"axis={axis!r} is not valid: accepted an integer (the block axis, "
                          "-1 = the last)")
    if isinstance(name, ScaledFormat):
        if axis != -1:
            raise FormatError(f"{name.name}: axis={axis} is not applied to a ScaledFormat "
                              "object (it carries its granularity); pass the format's name, "
                              "or build the Granularity with the axis")
        return name if rule is None else name.with_rule(rule)
    try:
        r = ScaleRule.parse(rule) if rule is not None else None
    except ValueError as e:
        raise FormatError(str(e)) from None
    return SCALED_FORMATS.get(name)(r, axis)


# ---------------------------------------------------------------------------------------------
# scale computation on float32 bit patterns

def _elem_emax_and_mant(elem: FloatFormat | IntFormat) -> tuple[int, int, int]:
    """(emax, 23-bit fraction field of elem_max, element mantissa bits for EVEN)."""
    mx = elem.max
    emax = elem.emax
    frac = mx / (2**emax) - 1 if emax >= 0 else mx * 2**-emax - 1
    mant = int(frac * (1 << 23))
    m = elem.man_bits if isinstance(elem, FloatFormat) else elem.qmax.bit_length() - 1
    return emax, mant, m


def pow2_scale_exponent(amax_bits: torch.Tensor, elem: FloatFormat | IntFormat | tuple,
                        rule: ScaleRule) -> torch.Tensor:
    """Block scale exponent k (int32) from the float32 bits of amax; NaN scale -> 255.

    ``elem`` may be the precomputed ``_elem_emax_and_mant(elem)`` (inside compiled code).
    """
    emax, max_mant, m = elem if isinstance(elem, tuple) else _elem_emax_and_mant(elem)
    A = amax_bits
    E = A >> 23
    F = A & 0x7FFFFF
    e, mant = split_f32(E, F)
    if rule is ScaleRule.FLOOR:
        k = e - emax
    elif rule is ScaleRule.CEIL:
        k = e - emax + (mant != 0).to(torch.int32)
    elif rule is ScaleRule.RCEIL:
        k = e - emax + (mant > max_mant).to(torch.int32)
    elif rule is ScaleRule.EVEN:
        Ev = (A + (1 << (22 - m))) >> 23
        k = torch.where(Ev == 0, -1000, Ev - 127 - emax)
    else:  # pragma: no cover
        raise AssertionError(rule)
    k = torch.where(A == 0, -127, k)
    k = torch.clamp(k, min=-127)
    k = torch.where((k > 127) | (A >= 0x7F800000), 255, k)
    return k


def block_view(x: torch.Tensor, bshape: tuple[int, ...]) -> tuple[torch.Tensor, tuple, tuple]:
    """Pad ``x`` with zeros to multiples of the block shape ``bshape`` (one block length per
    dimension, as :meth:`Granularity.block_shape` gives it) and view it as (n0, b0, n1, b1,
    ...); returns that view, ``x``'s shape and the padded shape."""
    shape = tuple(x.shape)
    pads = [(-d) % b for d, b in zip(shape, bshape)]
    if any(pads):
        pad_arg: list[int] = []
        for p in reversed(pads):
            pad_arg += [0, p]
        x = torch.nn.functional.pad(x, pad_arg)
    padded = tuple(x.shape)
    inter: list[int] = []
    for d, b in zip(padded, bshape):
        inter += [d // b, b]
    return x.reshape(inter), shape, padded


def _crop(y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(y.shape) == shape:
        return y
    return y[tuple(slice(0, d) for d in shape)]


@dataclass
class ScaledTensor:
    """The parts of a block-scaled tensor.

    ``dequantized``: the values (x's dtype). ``codes``: element codes (uint8), x's shape.
    ``scales``: per block (E8M0 / E4M3 codes as uint8, or float32 values), one entry per block
    of the padded tensor, shape ``ceil(shape / block_shape)``. ``tensor_scale``: NVFP4's fp32
    global scale g (dequant = q * scale / g), else None. ``packed``: element codes packed along
    the last axis (two FP4 per byte, four FP6 per three bytes, one byte otherwise).
    """

    dequantized: torch.Tensor
    _codes: torch.Tensor | None
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None
    block_shape: tuple[int, ...]
    format: ScaledFormat
    #: the element values (x's shape, before scaling), from which ``codes`` is derived on
    #: first use when the codes were not given
    elements: torch.Tensor | None = None

    @property
    def codes(self) -> torch.Tensor:
        """Element codes (uint8), x's shape."""
        if self._codes is None:
            if self.elements is None:
                raise ValueError("a ScaledTensor needs its codes or its element values")
            self._codes = values_to_codes(self.elements, self.format.element)
            self.elements = None  # the codes hold the same information in a quarter the bytes
        return self._codes

    @property
    def packed(self) -> torch.Tensor:
        from .packing import pack

        return pack(self.codes, self.format.element.bits)


def quantize_scaled(
    x: torch.Tensor,
    fmt: ScaledFormat | str,
    *,
    rounding: Rounding | str | None = None,
    flush_input: bool = False,
    return_parts: bool = False,
    sr_bits: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    rand: torch.Tensor | None = None,
    events: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor | ScaledTensor:
    """Quantize ``x`` to a block-scaled format; returns the dequantized tensor (x's dtype), or a
    :class:`ScaledTensor` with codes and scales when ``return_parts=True``.

    Elements saturate at +-elem_max (OCP MX section 6.3). ``rounding`` overrides the element
    rounding (default the format's, RNE); stochastic rounding takes ``sr_bits``/``seed``, or
    explicit bits ``rand`` (int32 of x's shape, as :func:`~precisim.formats.quantize.quantize`).
    ``events``: a dict that receives the quantization's events (int64 0-d tensors named as in
    :mod:`precisim.formats.events`: flushed, nonfinite, saturated, scale_clamped, blocks),
    counted inside the quantization kernel (one pass over ``x``).
    """
    from .quantize import check_flags, check_rand, check_sr_bits, random_bits

    x = check_tensor(x)
    f = get_scaled_format(fmt) if isinstance(fmt, str) else fmt
    if not isinstance(f, ScaledFormat):
        raise TypeError(f"fmt must be a ScaledFormat or a name, got {type(fmt).__name__}")
    rnd = Rounding.parse(rounding) if rounding is not None else f.rounding
    bits_sr = check_sr_bits(rnd, sr_bits)
    if rand is not None:
        rand = check_rand(rand, tuple(x.shape), rnd, bits_sr, seed, generator)
    if rnd is not Rounding.STOCHASTIC and (seed is not None or generator is not None):
        raise ValueError(f"seed/generator are only used with rounding='sr' (got rounding="
                         f"{rnd.value!r}, seed={seed!r})")
    check_flags(flush_input=flush_input, return_parts=return_parts)
    if x.dtype != torch.float32 and not is_subset(f.element, get_format(x.dtype)):
        raise FormatError(f"{f.element.name} values are not all representable in {x.dtype}; "
                          "quantize a float32 copy instead")
    bshape = f.granularity.block_shape(tuple(x.shape))
    if x.numel() == 0:
        if events is not None:
            events.update(_no_events(x.device))
        return _empty_scaled(x, f, bshape, return_parts)
    xb, shape, padded = block_view(x.to(torch.float32).contiguous(), bshape)
    if events is not None and padded != shape:  # (padding is not an operand's elements)
        st = quantize_scaled(x, f, rounding=rnd, flush_input=flush_input, return_parts=True,
                             sr_bits=sr_bits, seed=seed, generator=generator, rand=rand)
        assert isinstance(st, ScaledTensor)
        events.update(events_of_parts(x, st))
        return st if return_parts else st.dequantized
    counted = events is not None
    xb = _flat_blocks(xb, bshape)
    if rand is not None:  # the explicit bits, blocked as the values are
        rand = _flat_blocks(block_view(rand, bshape)[0], bshape)
    elif rnd is Rounding.STOCHASTIC:
        rand = random_bits(xb.shape, bits_sr, x.device, seed, generator)
    flush_in = flush_threshold_bits(x.dtype) if flush_input else 0
    red_dims = tuple(range(1, xb.dim(), 2)) if xb.dim() != 2 else (1,)
    p = KernelParams.of(f.element)
    if f.rule.power_of_two:
        consts = _elem_emax_and_mant(f.element)
        rule = f.rule
        if (rnd is Rounding.NEAREST_EVEN and not flush_in and rand is None
                and p.nearest_scaled is not None):
            # one pass: block amax, scale and elements in one compiled kernel
            # FLOOR scales: the events from the input bits and the block exponents, in this
            # kernel (_floor_events); other rules: a kernel of its own over the results
            # (_pow2_events; fused into this one it ran slower)
            in_kernel = counted and _floor_events_apply(f, bshape)
            fec = _floor_event_consts(f) if in_kernel else None

            c = p.nearest_scaled

            def fused(lead: bool):
                def fused_fn(xf, b):
                    # the values twice, as float32 (the block maxima) and as their int32 bits
                    # (the rounding): compiled CPU code bitcasts a vector through the stack
                    amax = _block_amax_bits(xf, red_dims)
                    k = pow2_scale_exponent(amax, consts, rule)
                    nan_block = k == 255  # else -127 <= k <= 128 - emax, as the fast path needs
                    out = round_bits_nearest(b, torch.where(nan_block, 0, k), c,
                                             Overflow.SATURATE, subnormal_lead=lead)
                    out = torch.where(nan_block, F32_NAN, out)
                    outs = (out, k, _floor_events(b, k, amax, red_dims, fec)) if in_kernel \
                        else (out, k, amax) if counted else (out, k)
                    if lead:
                        return outs
                    # a non-zero block below k_no_lead: the step needs the subnormal lead
                    return (*outs, ((k < c.k_no_lead) & (amax != 0)).any())
                return fused_fn

            key = ("mx_fused", p, consts, rule, red_dims, counted,
                   _events_key(f) if in_kernel else None)
            xs = _static_block(xb, f.granularity)
            xi = _static_block(xs.view(torch.int32), f.granularity)
            # first without the subnormal-lead term (every block a model gives has
            # k >= -126 - emin); again with it when a block is tinier (a non-zero block
            # whose amax is below 2^(emax - emin - 126), FLOOR)
            *outs, tiny = kernels.run(fused(False), (*key, False), xb.numel(), xs, xi)
            if bool(tiny):
                outs = kernels.run(fused(True), (*key, True), xb.numel(), xs, xi)
            if counted and not in_kernel:
                q = _static_block(outs[0].view(torch.float32), f.granularity)
                ec = _event_consts(f)
                ev = kernels.run(lambda xf, qf, kk, a: _pow2_events(xf, qf, kk, a, f, ec),
                                 ("mx_events", _events_key(f)), xb.numel(), xs, q, *outs[1:])
                outs = (outs[0], outs[1], ev)
        else:
            outs = _pow2_two_pass(xb, red_dims, consts, rule, p, rnd, flush_in, bits_sr, rand,
                                  f if counted else None)
        out_bits, k = outs[0], outs[1]
        if counted:
            events.update(_named_events(outs[2], k.numel()))
        deq = out_bits.view(torch.float32)
        scale_store = k
    else:
        fused = _float_scaled_fn(f, red_dims, rnd, flush_in, bits_sr, p, return_parts, counted)
        key = ("scaled", f.element, f.scale, f.tensor_scale, red_dims, p, rnd, flush_in,
               bits_sr, rand is None, return_parts, _events_key(f) if counted else None)
        outs = kernels.run(fused, key, xb.numel(), _static_block(xb, f.granularity), rand)
        g, bs = outs[0], outs[1]
        deq, q_elems = (outs[2], outs[3]) if return_parts else (outs[2], None)
        if counted:
            events.update(_named_events(outs[-1], bs.numel()))
        scale_store = (bs, g)
    deq_full = _crop(deq.reshape(padded), shape)
    result = deq_full if x.dtype == torch.float32 else deq_full.to(x.dtype)
    if not return_parts:
        return result
    grid = tuple(d // b for d, b in zip(padded, bshape))
    if f.rule.power_of_two:
        kq = scale_store.reshape(grid)
        if f.scale == E8M0:
            scales = torch.where(kq == 255, 255, kq + 127).to(torch.uint8)
        else:
            scales = torch.where(kq == 255, float("nan"),
                                 torch.ldexp(torch.ones_like(kq, dtype=torch.float32),
                                             kq.to(torch.float32)))
        elem_vals = _element_values_pow2(deq, scale_store)
        tscale = None
    else:
        bs, g = scale_store
        scales = bs.reshape(grid)
        if f.scale.bits <= 8:
            scales = values_to_codes(scales, f.scale)
        elem_vals = q_elems
        tscale = g if f.tensor_scale else None
    elem_vals = torch.where(torch.isnan(elem_vals), 0.0, elem_vals) \
        if not f.element.has_nan else elem_vals
    # codes are derived on first use (telemetry only needs the element values)
    return ScaledTensor(result, None, scales, tscale, bshape, f,
                        _crop(elem_vals.reshape(padded), shape))


def _empty_scaled(x: torch.Tensor, f: ScaledFormat, bshape: tuple[int, ...],
                  return_parts: bool) -> torch.Tensor | ScaledTensor:
    """An empty tensor quantized: empty values, and (parts) no scales (a grid of
    ceil(shape / block) blocks, 0 along the empty axes) and a tensor scale of 1 (the zero
    tensor amax gives g = 1)."""
    result = torch.empty_like(x)
    if not return_parts:
        return result
    grid = tuple(-(-d // b) for d, b in zip(x.shape, bshape))
    scales = torch.zeros(grid, dtype=torch.uint8 if f.scale.bits <= 8 else torch.float32,
                         device=x.device)
    tscale = torch.ones((), dtype=torch.float32, device=x.device) if f.tensor_scale else None
    return ScaledTensor(result, None, scales, tscale, bshape, f,
                        torch.empty(x.shape, dtype=torch.float32, device=x.device))


def _block_amax_bits(xf: torch.Tensor, red_dims: tuple[int, ...]) -> torch.Tensor:
    """float32 bits of each block's largest magnitude (NaN: bits above 0x7F800000).

    A float max (vectorised in compiled code; an int32 max is not): it picks the largest value
    exactly, propagates NaN, and the sign bit of whatever NaN it returns is cleared. Only if the
    CPU treated subnormals as zero (DAZ, not torch's default) could a block whose largest
    magnitude is below 2^-126 report another magnitude below 2^-126 or zero; every such amax
    gives the same scale (2^-127) when the element max is at least 2, as for the fused MX path.
    """
    return xf.abs().amax(dim=red_dims, keepdim=True).view(torch.int32) & 0x7FFFFFFF


STATIC_BLOCK_MAX = 256


def _static_block(xb: torch.Tensor, gran: Granularity) -> torch.Tensor:
    """Compile the block length of a (blocks, block) view as a constant for fixed small groups
    (MX 32, NVFP4 16, 1x128): the compiler unrolls the block loop (several times faster). Lengths
    that follow the tensor's shape (per-token rows, per-channel, per-tensor) stay symbolic: one
    compiled kernel for every size."""
    fixed = (gran.keep_axis is None and bool(gran.blocks)
             and all(size is not None for _, size in gran.blocks))
    if fixed and xb.dim() == 2 and xb.shape[1] <= STATIC_BLOCK_MAX:
        xb = xb.detach()  # no view base (see kernels.run), so the mark stays on what is passed
        torch._dynamo.mark_static(xb, 1)
    return xb


def _flat_blocks(xb: torch.Tensor, bshape: tuple[int, ...]) -> torch.Tensor:
    """The block view as (blocks, block elements) where that needs no copy: blocks along the
    last axis only (MX, NVFP4, groups, tokens), or one block (per-tensor); else unchanged.
    Fewer dimensions: one compiled kernel serves every shape, with the block reduction innermost.
    """
    if all(b == 1 for b in bshape[:-1]) and bshape:
        return xb.reshape(-1, bshape[-1])
    if all(n == 1 for n in xb.shape[0::2]):
        return xb.reshape(1, -1)
    return xb


def _pow2_two_pass(xb: torch.Tensor, red_dims: tuple[int, ...], consts: tuple, rule: ScaleRule,
                   p: KernelParams, rnd: Rounding, flush_in: int, bits_sr: int,
                   rand: torch.Tensor | None, counted: ScaledFormat | None = None
                   ) -> tuple[torch.Tensor, ...]:
    """Power-of-two scales for the modes without a fused kernel (stochastic rounding, flushed
    inputs, other roundings, integer elements): the scales in one pass, then the elements
    (and, for ``counted``, its events: :func:`_pow2_events`)."""
    kmin = -126 - (p.emin - p.m)  # k >= kmin: the element grid step stays a float32 normal

    def scale_fn(xf):
        amax = (xf.view(torch.int32) & 0x7FFFFFFF).amax(dim=red_dims, keepdim=True)
        k = pow2_scale_exponent(amax, consts, rule)
        return k, ((k < kmin) & (amax != 0)).any()

    k, tiny = kernels.run(scale_fn, ("mx_scale", consts, rule, red_dims), xb.numel(), xb)
    unit_normal = not bool(tiny)
    ec = _event_consts(counted) if counted is not None else None

    def fn(xf, b, k, rr):  # (xf as float32 and as int32 bits: see the fused kernel)
        nan_block = k == 255
        kk = torch.where(nan_block, 0, k)
        out = round_bits(b, kk, p, rnd, Overflow.SATURATE, flush_in, False,
                         rr, bits_sr, unit_normal)
        out = torch.where(nan_block, F32_NAN, out)
        if counted is None:
            return out
        return out, _pow2_events(xf, out.view(torch.float32), k,
                                 _block_amax_bits(xf, red_dims), counted, ec)

    key = ("mx", p, rnd, flush_in, bits_sr, rand is None, unit_normal,
           None if counted is None else _events_key(counted), red_dims)
    outs = kernels.run(fn, key, xb.numel(), xb, xb.view(torch.int32), k, rand)
    return (outs, k) if counted is None else (outs[0], k, outs[1])


# ---------------------------------------------------------------------------------------------
# quantization events (precisim.formats.events), counted inside the quantization kernels

def _events_key(f: ScaledFormat) -> tuple:
    """What the traced event counting depends on (part of a compiled kernel's cache key)."""
    return (f.element, f.scale)


@lru_cache(maxsize=256)
def _event_consts(f: ScaledFormat) -> tuple[float, float, float]:
    """``(element max, overflow ratio, scale max)`` of ``f`` as Python floats, computed outside
    the traced kernels: traced from the formats' integer fields (symbolic under
    ``dynamic=True``), they were recomputed with pow/log2 for every vector of elements. Cached
    (formats are frozen): the Fraction arithmetic is per-call overhead on every quantization."""
    return float(f.element.max), overflow_ratio(f.element), float(f.scale.max)


def _pow2_events(xf: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 amax_bits: torch.Tensor, f: ScaledFormat,
                 consts: tuple[float, float, float]) -> torch.Tensor:
    """``[flushed, nonfinite, saturated, scale_clamped]`` of a power-of-two-scaled block
    quantization (traced into its kernel). An element is at the element format's largest
    magnitude iff |q| * 2^-k >= elem_max (exact: scaling by a power of two); an E8M0 scale is
    clamped at code 0 (k = -127) or 0xFF (NaN) in a block whose amax is non-zero and not NaN.
    ``q``: the dequantized values (float32)."""
    kk = torch.where(k == 255, 0, k)
    inv = torch.where(kk == 127, 0x400000, (127 - kk) << 23).view(torch.float32)  # 2^-k
    at_max = (q.abs() * inv) >= consts[0]
    ev = element_events(xf, q, at_max, consts[1])
    return torch.cat([ev, _pow2_scale_clamps(k, amax_bits, f.scale == E8M0).reshape(1)])


def _pow2_scale_clamps(k: torch.Tensor, amax_bits: torch.Tensor, e8m0: bool) -> torch.Tensor:
    """Blocks whose E8M0 scale is clamped: code 0 (k = -127) or 0xFF (NaN) in a block whose
    amax is non-zero and not NaN (int64 0-d; 0 for fp32 scales, ``e8m0`` False, which have no
    format limit short of fp32's own)."""
    if not e8m0:
        return torch.zeros((), dtype=torch.int64, device=k.device)
    nonzero = (amax_bits != 0) & (amax_bits <= kernels.F32_INF)
    return count(((k == -127) | (k == 255)) & nonzero)


def _floor_events_apply(f: ScaledFormat, bshape: tuple[int, ...]) -> bool:
    """Whether :func:`_floor_events` counts the events of ``f`` (with the fused
    round-to-nearest-even kernel): FLOOR scales (k <= 127 - emax, so the element grid's
    maximum and overflow threshold times 2^k are float32 normals) and blocks of fewer than
    2^24 elements (its per-block float32 sums are exact)."""
    return f.rule is ScaleRule.FLOOR and isinstance(f.element, FloatFormat) \
        and math.prod(bshape) < 2**24


@lru_cache(maxsize=256)
def _floor_event_consts(f: ScaledFormat) -> tuple[int, int, bool]:
    """``(flush exponent, overflow-threshold bits, E8M0 scales)`` of :func:`_floor_events`:
    an element of a block with scale 2^k becomes 0 iff its magnitude is at most
    2^(k + flush exponent) (half the smallest subnormal, emin - m - 1: the tie rounds to the
    even 0), and is counted saturated iff its magnitude exceeds 2^k times the float32 value
    the definition compares with, fl32(elem_max * fl32(overflow ratio))
    (:func:`~precisim.formats.events.element_events`; computed here as torch computes it,
    whose float32 bits are returned)."""
    e = f.element
    assert isinstance(e, FloatFormat)
    t = torch.tensor(float(e.max), dtype=torch.float32) * overflow_ratio(e)
    return e.emin - e.man_bits - 1, int(t.view(torch.int32)), f.scale == E8M0


def _floor_events(b: torch.Tensor, k: torch.Tensor, amax_bits: torch.Tensor,
                  red_dims: tuple[int, ...], consts: tuple[int, int, bool]) -> torch.Tensor:
    """``[flushed, nonfinite, saturated, scale_clamped]`` of a FLOOR-scaled
    round-to-nearest-even block quantization from the input's float32 bits ``b`` and the block
    exponents ``k`` alone, traced into the quantization kernel (no pass over the results): the
    counts of :func:`_pow2_events` (docs/arithmetic.md section 3.6), bit for bit.

    With FLOOR, k <= 127 - emax for a finite amax, so a non-NaN block (k != 255) has finite
    elements and finite results: nothing is ``nonfinite``; an element is ``flushed`` iff
    0 < |x| <= 2^(k + emin - m - 1) (round to nearest even: the tie gives the even 0); it is
    ``saturated`` (at elem_max * 2^k with |x| > that times the overflow ratio) iff
    |x| > fl32(elem_max * ratio) * 2^k (beyond that threshold the element rounds to, or is
    clamped at, elem_max; at or below it the definition's comparison fails). Both thresholds
    are float32 bit patterns (2^(k + emin - m - 1) >= 2^-149; the overflow threshold times
    2^k is a normal), compared with the magnitude bits. In a NaN block (k = 255) every element
    becomes NaN: its finite elements are ``nonfinite`` and none is flushed or saturated. The
    saturated and nonfinite elements share one per-block count (each block holds only one
    kind), split by block afterwards."""
    flush_exp, thr_bits, e8m0 = consts
    nan_block = k == 255
    kk = torch.where(nan_block, 0, k)
    e = kk + flush_exp  # >= -149: the threshold is a float32 subnormal or normal
    flush = torch.where(e >= -126, (e + 127) << 23,
                        torch.ones_like(e) << torch.clamp(e + 149, 0, 22))
    flush = torch.where(nan_block, -1, flush)
    mag = b & 0x7FFFFFFF
    flushed = count((mag != 0) & (mag <= flush))
    # beyond the threshold (normal blocks: saturated), finite (NaN blocks: nonfinite)
    over = torch.where(nan_block, kernels.F32_INF - 1, kk * (1 << 23) + thr_bits)
    per_block = ((mag > over) != nan_block).float().sum(dim=red_dims, keepdim=True)
    saturated = torch.where(nan_block, 0.0, per_block).double().sum().to(torch.int64)
    nonfinite = torch.where(nan_block, per_block, 0.0).double().sum().to(torch.int64)
    return torch.stack([flushed, nonfinite, saturated,
                        _pow2_scale_clamps(k, amax_bits, e8m0)])


def _float_events(xf: torch.Tensor, deq: torch.Tensor, q: torch.Tensor, bs: torch.Tensor,
                  bamax: torch.Tensor, f: ScaledFormat,
                  consts: tuple[float, float, float]) -> torch.Tensor:
    """``[flushed, nonfinite, saturated, scale_clamped]`` of a float-scaled block quantization
    (traced into its kernel): elements ``q`` at elem_max; an 8-bit scale clamped at its largest
    value or at zero in a block whose amax is positive."""
    at_max = q.abs() >= consts[0]
    ev = element_events(xf, deq, at_max, consts[1])
    if f.scale.bits <= 8:
        clamped = count(((bs == consts[2]) | (bs == 0)) & (bamax > 0))
    else:
        clamped = torch.zeros((), dtype=torch.int64, device=xf.device)
    return torch.cat([ev, clamped.reshape(1)])


def _named_events(counts: torch.Tensor, blocks: int) -> dict[str, torch.Tensor]:
    names = (*ELEMENT_EVENTS, "scale_clamped")
    out = {n: counts[i] for i, n in enumerate(names)}
    out["blocks"] = torch.tensor(blocks, dtype=torch.int64)
    return out


def _no_events(device: torch.device) -> dict[str, torch.Tensor]:
    return _named_events(torch.zeros(4, dtype=torch.int64, device=device), 0)


def scale_clamps(xf: torch.Tensor, parts: ScaledTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale_clamped, blocks)`` of a block-scaled quantization of ``xf`` (the definition:
    scale codes at the scale format's limit, in blocks holding a non-zero element; see
    :mod:`precisim.formats.events`)."""
    s = parts.scales
    nblocks = torch.tensor(s.numel(), dtype=torch.int64)
    zero = torch.zeros((), dtype=torch.int64)
    if s.dtype != torch.uint8:  # fp32 scales: no format limit short of fp32's own
        return zero, nblocks
    sc = parts.format.scale
    if sc == E8M0:
        bad = (s == 0) | (s == 0xFF)
    else:
        mag = s & 0x7F
        bad = (mag == sc.max_code_magnitude) | (mag == 0)
    if not bool(bad.any()):  # (the usual case: no pass over the operand)
        return zero, nblocks
    xb, _, _ = block_view(xf.abs(), parts.block_shape)
    red = tuple(range(1, xb.dim(), 2))
    amax = xb.amax(dim=red) if red else xb
    nonzero = amax.reshape(s.shape) > 0
    return (bad & nonzero).sum(), nblocks


def events_of_parts(x: torch.Tensor, parts: ScaledTensor) -> dict[str, torch.Tensor]:
    """The events (:mod:`precisim.formats.events`) of ``parts = quantize_scaled(x, ...,
    return_parts=True)``, in eager torch from the parts: what the counts traced into the
    kernels (``quantize_scaled(..., events=...)``) are tested against."""
    from .quantize import decode

    f = parts.format
    xf = x.detach().float()
    elems = parts.elements if parts.elements is not None else decode(parts.codes, f.element)
    at_max = elems.detach().float().abs() >= float(f.element.max)
    ev = element_events(xf, parts.dequantized.detach().float(), at_max,
                        overflow_ratio(f.element))
    clamped, blocks = scale_clamps(xf, parts)
    out = {n: ev[i] for i, n in enumerate(ELEMENT_EVENTS)}
    out["scale_clamped"], out["blocks"] = clamped, blocks
    return out


def _element_values_pow2(deq: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """P_i = dequantized / 2^k (exact: both are float32 values of the same grid)."""
    kk = torch.where(k == 255, 0, k)
    return torch.ldexp(deq, (-kk).to(torch.float32))


def _float_scaled_fn(f: ScaledFormat, red_dims, rnd, flush_in, bits_sr, p: KernelParams,
                     want_elements: bool, counted: bool = False):
    """The float-scale quantizer as one function for torch.compile: block amaxes (and the
    tensor amax), scales, then the elements. Returns (g, bs, dequantized[, elements][, events
    (:func:`_float_events`) when ``counted``])."""
    ec = _event_consts(f)
    elem_max, scale_max = ec[0], ec[2]
    ps = KernelParams.of(f.scale)
    fp32_scale = f.scale == FP32
    tensor_scale = f.tensor_scale

    def fused(xf, rr):
        bamax = xf.abs().amax(dim=red_dims, keepdim=True)
        bamax_bits = bamax.view(torch.int32) & 0x7FFFFFFF
        if tensor_scale:
            tamax = bamax.amax()
            tamax_bits = tamax.view(torch.int32) & 0x7FFFFFFF
            # tensor / tensor: torch computes `scalar / tensor` as reciprocal * scalar, which
            # rounds twice
            g = torch.where(tamax == 0, 1.0, torch.full_like(tamax, scale_max * elem_max) / tamax)
            tensor_bad = tamax_bits >= 0x7F800000
        else:
            g = torch.ones((), dtype=torch.float32, device=xf.device)
            tensor_bad = torch.zeros((), dtype=torch.bool, device=xf.device)
        raw = (bamax / elem_max) * g
        if fp32_scale:
            bs = torch.where(bamax == 0, 1.0, torch.clamp(raw, min=2.0**-126))
        else:
            bs = round_bits(raw.view(torch.int32), None, ps, Rounding.NEAREST_EVEN,
                            Overflow.SATURATE, 0, False, None, bits_sr).view(torch.float32)
        bad = (bamax_bits >= 0x7F800000) | tensor_bad
        v = (xf * g) / bs
        q = round_bits(v.view(torch.int32), None, p, rnd, Overflow.SATURATE, flush_in, False,
                       rr, bits_sr).view(torch.float32)
        q = torch.where(bs == 0, 0.0, q)
        deq = torch.where(bad, float("nan"), (q * bs) / g)
        outs = (g, bs, deq, q) if want_elements else (g, bs, deq)
        return (*outs, _float_events(xf, deq, q, bs, bamax, f, ec)) if counted else outs

    return fused
