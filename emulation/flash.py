"""The attention datapath: FlashAttention-style online softmax over KV tiles
(docs/attention-datapath.md).

:class:`AttentionDatapath` is a frozen description of one kernel's arithmetic. For every query
row, the keys are visited tile by tile (``tile`` keys, ``order`` forward or reverse) and each
tile runs these steps, every one rounded once (docs/attention-datapath.md section 2):

1. ``S = Q K_j^T`` (the ``qk`` GEMM: a :class:`GemmSpec` with any matrix unit, or the fp32
   product); ``t = fp32(S * c)`` with ``c = fp32(scaling * log2 e)``; masked keys are -inf.
2. ``m' = max_format(max(m, max_j t))``; the rescale is *taken* when ``m = -inf`` or
   ``fp32(m' - m) > rescale_threshold``; otherwise the stale ``m`` stays (FlashAttention-4's
   conditional rescale). ``alpha = alpha_format(exp2(fp32(m - m')))`` when taken, else 1.
3. ``x = fp32(t - fp32(m - max_offset))``; ``P = exp2(x)`` by the ``exp2`` function unit.
4. ``Pq = cast(P)``: ``p_format`` (an element float format, saturating; or any
   :class:`TensorSpec`: NVFP4 blocks of 16 along the keys, int8, ...); None keeps P.
5. ``l = sum_format(alpha * l + reduce(P or Pq))`` (``row_sum``: unquantized or quantized P;
   the tile sum is a :class:`Reduction` in ``sum_format``).
6. ``O = acc_format(alpha * O + Pq V_j)`` (the ``pv`` GEMM, then one rounding of the
   accumulator update).

At the end ``out = fp32(O / l)`` (``normalize="divide"``) or ``fp32(O * fp32(1 / l))``
(``"reciprocal"``); a row with ``l = 0`` (every key masked) gives 0.

:func:`flash_attention` is the fast path (torch, vectorised over batch, heads and rows, a loop
over tiles); :func:`flash_attention_reference` is the direct step-by-step reference (Python
loops over rows, tiles and elements, exact Fractions with one rounding per step through
:class:`~precisim.emulation.functions.core.Rq`); the two are bit-identical. Both call the
same GEMMs and the same block quantizer of P on the same tile tensors (those components are
checked against their own exact references elsewhere).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from precisim.formats import FloatFormat, FormatError, Overflow, Rounding, get_format, kernels
from precisim.formats.registry import Registry, UnknownNameError

from .functions import exact as ex
from .functions.core import FN_DEFS, Fn, Rq, add_ro, check_format, div_ro, parse_enum, rq
from .functions.datapath import SpecBase, function_unit
from .functions.reduction import Reduction
from .functions.units import FunctionUnit
from .gemm import quantize_operand
from .specs import GemmSpec, TensorSpec

__all__ = ["AttentionDatapath", "DATAPATHS", "FlashStats", "Normalize", "Order", "RowSum",
           "UnknownDatapathError", "available_datapaths", "flash_attention",
           "flash_attention_reference", "get_datapath"]

LOG2E = 1.4426950408889634
LOG2E32 = float(np.float32(LOG2E))  #: fp32(log2 e): scales a soft-capped or biased score
MAX_OFFSET = 126


class Order(enum.Enum):
    FORWARD = "forward"
    REVERSE = "reverse"


class RowSum(enum.Enum):
    UNQUANTIZED = "unquantized"  #: the row sum adds P before its cast (FA2/3/4)
    QUANTIZED = "quantized"  #: the row sum adds the cast P that the PV GEMM sees


class Normalize(enum.Enum):
    DIVIDE = "divide"
    RECIPROCAL = "reciprocal"


def _fp32_exact(v: float) -> bool:
    return math.isfinite(v) and float(np.float32(v)) == v


@dataclass(frozen=True)
class AttentionDatapath(SpecBase):
    """One online-softmax attention datapath (see the module docstring for the steps)."""

    name: str
    tile: int = 128  #: keys per KV tile
    order: Order | str = Order.FORWARD
    max_format: FloatFormat | str = "fp32"  #: running max
    sum_format: FloatFormat | str = "fp32"  #: running row sum (and its tile reductions)
    alpha_format: FloatFormat | str = "fp32"  #: the rescale factor exp2(m_old - m_new)
    acc_format: FloatFormat | str = "fp32"  #: the PV accumulator O
    rescale_threshold: float = 0.0  #: log2 units; 0: rescale whenever the max grows
    max_offset: int = 0  #: P = exp2(x + max_offset) before the cast
    p_format: str | TensorSpec | None = None  #: P's format for the PV GEMM (None: fp32)
    row_sum: RowSum | str = RowSum.UNQUANTIZED
    qk: GemmSpec | str | None = None  #: None: fp32 product of the operands
    pv: GemmSpec | str | None = None
    exp2: FunctionUnit | str = "exp2-exact"
    tanh: FunctionUnit | str = "tanh-exact"  #: the soft cap's tanh (when a model has one)
    normalize: Normalize | str = Normalize.DIVIDE
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        s = object.__setattr__
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name={self.name!r} is not valid: accepted a non-empty string")
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1:
            raise ValueError(f"tile={self.tile!r} is not valid: accepted an integer >= 1 "
                             "(keys per KV tile)")
        s(self, "order", parse_enum(Order, self.order, "order"))
        s(self, "row_sum", parse_enum(RowSum, self.row_sum, "row_sum"))
        s(self, "normalize", parse_enum(Normalize, self.normalize, "normalize"))
        for what in ("max_format", "sum_format", "alpha_format", "acc_format"):
            s(self, what, check_format(getattr(self, what), what))
        t = self.rescale_threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not _fp32_exact(float(t)) \
                or t < 0:
            raise ValueError(f"rescale_threshold={t!r} cannot be represented: accepted a "
                             "finite value >= 0 that is a float32 value (the kernel compares "
                             "fp32(m_new - m_old) with it), e.g. 0, 4.0, 8.0")
        s(self, "rescale_threshold", float(t))
        o = self.max_offset
        if isinstance(o, float) and o.is_integer():
            o = int(o)
        if isinstance(o, bool) or not isinstance(o, int) or not 0 <= o <= MAX_OFFSET:
            raise ValueError(f"max_offset={self.max_offset!r} cannot be represented: accepted "
                             f"an integer 0..{MAX_OFFSET} (2^max_offset must be an exact fp32 "
                             "power of two)")
        s(self, "max_offset", o)
        s(self, "p_format", _p_spec(self.p_format))
        for what in ("qk", "pv"):
            g = getattr(self, what)
            if g is not None and not isinstance(g, GemmSpec):
                s(self, what, GemmSpec.parse(g, what))
        u = function_unit(self.exp2, "exp2")
        if u.function is not Fn.EXP2:
            raise ValueError(f"exp2={u.name!r} is not valid: accepted a function unit of exp2 "
                             f"(its function is {u.function.value!r})")
        s(self, "exp2", u)
        u = function_unit(self.tanh, "tanh")
        if u.function is not Fn.TANH:
            raise ValueError(f"tanh={u.name!r} is not valid: accepted a function unit of tanh "
                             f"(its function is {u.function.value!r})")
        s(self, "tanh", u)

    # -- derived -------------------------------------------------------------------------
    @property
    def p_element(self) -> FloatFormat | None:
        """P's element float format when P is cast element by element (saturating)."""
        p = self.p_format
        if p is None or p.scaling is not None or p.scale_rule is not None:
            return None
        try:
            f = get_format(p.format)
        except FormatError:
            return None
        return f if isinstance(f, FloatFormat) else None

    @property
    def p_max(self) -> float:
        """The largest P the datapath can produce: 2^(max_offset + rescale_threshold)."""
        return 2.0 ** (self.max_offset + self.rescale_threshold)

    def with_(self, **changes: Any) -> AttentionDatapath:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        parts = [f"tile {self.tile} {self.order.value}",
                 f"max {self.max_format.name}, sum {self.sum_format.name}, "
                 f"alpha {self.alpha_format.name}, acc {self.acc_format.name}"]
        if self.rescale_threshold:
            parts.append(f"rescale if > {self.rescale_threshold:g}")
        if self.max_offset:
            parts.append(f"offset {self.max_offset}")
        parts.append("P " + ("fp32" if self.p_format is None else self.p_format.describe())
                     + f", row sum of {self.row_sum.value} P")
        for k in ("qk", "pv"):
            g = getattr(self, k)
            if g is not None:
                parts.append(f"{k} {g.describe()}")
        parts.append(f"exp2 {self.exp2.name}, tanh {self.tanh.name}, {self.normalize.value}")
        return "; ".join(parts)

    @classmethod
    def _registry(cls) -> Registry[AttentionDatapath]:
        """``parse`` and ``to_dict`` (:class:`~precisim.emulation.functions.datapath.SpecBase`):
        a preset name or a mapping of fields (``base: <preset>`` plus changes)."""
        return DATAPATHS


def _p_spec(value: Any) -> TensorSpec | None:
    if value is None or isinstance(value, TensorSpec):
        return value
    try:
        spec = TensorSpec.parse(value, "p_format")
    except ValueError as e:
        raise ValueError(f"p_format={value!r} is not valid: {e}") from None
    return spec


# ---------------------------------------------------------------------------------------------
# registry

class UnknownDatapathError(UnknownNameError):
    """An unknown attention-datapath name."""


#: the named attention datapaths (qualified spelling ``datapath:<name>``)
DATAPATHS: Registry[AttentionDatapath] = Registry(
    "attention datapath", prefix="datapath", error=UnknownDatapathError,
    hint="or give a mapping of AttentionDatapath fields (base: <preset> plus changes)")


def available_datapaths() -> list[str]:
    return DATAPATHS.names()


def get_datapath(name: str | AttentionDatapath) -> AttentionDatapath:
    if isinstance(name, AttentionDatapath):
        return name
    return DATAPATHS.get(name)


def _presets() -> list[AttentionDatapath]:
    D = AttentionDatapath
    bf16 = GemmSpec.parse("bf16", "pv")
    return [
        D("exact-online", tile=128,
          description="every knob at full precision: fp32 statistics, P and accumulator"),
        D("fa2-bf16", tile=128, p_format="bf16", qk=bf16, pv=bf16,
          description="FlashAttention-2 style: bf16 Q, K, V and P, fp32 running max, row sum "
                      "and accumulator, rescale whenever the max grows (arXiv 2307.08691)"),
        D("fa3-fp8", tile=128, max_offset=8, p_format="e4m3",
          qk=GemmSpec.parse("e4m3", "qk"), pv=GemmSpec.parse("e4m3", "pv"),
          description="FlashAttention-3 FP8 style: E4M3 Q, K, V and P, P scaled into (0, 256] "
                      "by exp2(x + 8) before the cast, fp32 statistics (arXiv 2407.08608)"),
        D("fa4-fp8-saturating", tile=128, max_offset=8, rescale_threshold=4.0,
          p_format="e4m3", qk=GemmSpec.parse("e4m3", "qk"), pv=GemmSpec.parse("e4m3", "pv"),
          description="Blackwell FP8 forward before Dao-AILab/flash-attention PR #2717: "
                      "offset 8 and rescale threshold 4 let P reach 2^12, E4M3 saturates at "
                      "448 while the row sum adds the unclipped fp32 P"),
        D("fa4-fp8-fixed", tile=128, max_offset=4, rescale_threshold=4.0,
          p_format="e4m3", qk=GemmSpec.parse("e4m3", "qk"), pv=GemmSpec.parse("e4m3", "pv"),
          description="the fix of Dao-AILab/flash-attention PR #2717: max_offset + "
                      "rescale_threshold <= log2(448), so P <= 256 never saturates"),
        D("sage2-fp16-acc", tile=64, max_offset=7, p_format="e4m3", acc_format="fp16",
          pv=GemmSpec.parse("e4m3", "pv"),
          description="SageAttention2 style: E4M3 P and V, P within (0, 128], the PV "
                      "accumulator rounded to fp16 after every tile (arXiv 2411.10958; "
                      "thu-ml/SageAttention issues #93, #388)"),
    ]


for _d in _presets():
    DATAPATHS.register(_d.name, _d)


# ---------------------------------------------------------------------------------------------
# shared pieces (the same calls on both sides)

@dataclass
class FlashStats:
    """Telemetry of one datapath call: P values that exceeded P's largest value (clipped),
    non-zero P flushed to zero by the cast, rescales taken (a finite running max replaced),
    row sums that overflowed ``sum_format``, accumulator entries that overflowed
    ``acc_format``; ``p_numel``: P values computed (visible keys)."""

    p_numel: int = 0
    p_saturated: int = 0
    p_flushed: int = 0
    rescales: int = 0
    row_sum_overflow: int = 0
    acc_overflow: int = 0

    def add(self, other: FlashStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _matmul(a: torch.Tensor, b: torch.Tensor, g: GemmSpec | None, unrounded: bool = False
            ) -> torch.Tensor:
    """``a @ b^T`` (b: (..., N, K)) under ``g``, or the fp32 product (float64 accumulation
    rounded once to fp32) when g is None; float32. ``unrounded``: the fp32 product's float64
    accumulation is returned before its rounding (the caller's kernel rounds it with
    ``.float()``, saving a pass)."""
    if g is None or g.is_identity:
        y = torch.matmul(a.double(), b.double().transpose(-1, -2))
        return y if unrounded else y.float()
    from .gemm import gemm

    return gemm(a.float(), b.float(), g, out_dtype=torch.float32).float()


def _is_identity(g: GemmSpec | None) -> bool:
    """True when :func:`_matmul` under ``g`` is the fp32 product through float64."""
    return g is None or g.is_identity


#: grouped-query attention per key/value head: K and V quantized once per kv head where that
#: is bit-identical (:func:`~precisim.emulation.attention.kv_operand`) and the QK^T / PV GEMMs
#: run per kv head with the rows of its query heads stacked (:func:`_gqa_matmul`). False: K
#: and V repeated per query head before anything else (the previous behaviour;
#: tests/test_flash_datapath.py compares the two bit for bit)
GQA_PER_KV_HEAD = True


def _groups(h: int, k: torch.Tensor, v: torch.Tensor) -> int:
    """Query heads per key/value head (a ValueError naming the shapes when they do not
    match)."""
    hk = k.shape[1]
    if hk > 0 and h % hk == 0 and v.shape[1] == hk:
        return h // hk
    raise ValueError(f"k and v of shapes {tuple(k.shape)} and {tuple(v.shape)} are not valid "
                     f"for {h} query heads: accepted the same number of key/value heads, a "
                     "divisor of the query heads (grouped-query attention)")


def _operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dp: AttentionDatapath
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, int], tuple[torch.Tensor, int]]:
    """Q, K, V quantized once to the GEMMs' operand formats (float32); K and V (b, h_kv, n,
    d) with the groups each still stands for: ``(kq, gk)``, ``kq`` repeated ``gk`` times per
    head is K repeated per query head and quantized (likewise V, returned as (b, h', n, dv))."""
    from .attention import kv_operand, repeat_kv

    qk, pv = dp.qk, dp.pv
    groups = _groups(q.shape[1], k, v)
    if not GQA_PER_KV_HEAD:
        k, v, groups = repeat_kv(k, groups), repeat_kv(v, groups), 1
    qq = quantize_operand(q, qk.input if qk is not None else None).values
    kq = kv_operand(k, groups, qk.weight if qk is not None else None)
    vq, gv = kv_operand(v.transpose(-1, -2), groups, pv.weight if pv is not None else None)
    return qq, kq, (vq.transpose(-1, -2), gv)


def _stackable(g: GemmSpec | None) -> bool:
    """True when every output row of the GEMM ``g`` (operand formats removed) depends only on
    its own row of the first operand: the fp32 product, or a matrix unit with deterministic
    accumulation, and no output format (whose blocks or scale could span rows)."""
    if g is None or g.is_identity:
        return True
    if g.output is not None:
        return False
    if g.unit is None:
        return True
    from .presets import get_unit

    return get_unit(g.unit).acc_rounding is not Rounding.STOCHASTIC


def _gqa_matmul(a: torch.Tensor, b: torch.Tensor, groups: int, g: GemmSpec | None,
                unrounded: bool = False) -> torch.Tensor:
    """:func:`_matmul` of ``a`` (B, h, R, K) and ``b`` (B, h / groups, N, K) repeated
    ``groups`` times per head: per key/value head, the rows of its ``groups`` query heads
    stacked into one (groups * R)-row product where the GEMM allows it (:func:`_stackable`),
    else on the repeated ``b``; (B, h, R, N)."""
    if groups == 1:
        return _matmul(a, b, g, unrounded)
    from .attention import repeat_kv

    if not _stackable(g):
        return _matmul(a, repeat_kv(b, groups), g, unrounded)
    B, h, R, K = a.shape
    y = _matmul(a.reshape(B, h // groups, groups * R, K), b, g, unrounded)
    return y.reshape(B, h, R, y.shape[-1])


def _gemm_no_operands(g: GemmSpec | None) -> GemmSpec | None:
    """``g`` with the Q/K/V operand formats removed (they are applied once up front); P keeps
    its own cast (``p_format``), so the PV GEMM's input format is removed too."""
    if g is None:
        return None
    return dataclasses.replace(g, input=None, weight=None)


#: the last mask :func:`_mask_parts` read: (the tensor, its version, shape, result); every
#: layer of one forward passes a view of the same mask (held here, so that no other tensor
#: can take its address while it is cached)
_LAST_MASK: list[Any] = [None, -1, (), (None, None)]


def _mask_parts(mask: torch.Tensor | None, shape: tuple[int, ...]
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(visible, bias)`` from an additive or boolean mask: a key is masked where the mask is
    False, -inf or at most half the dtype's minimum; the finite values elsewhere are an
    additive bias (ALiBi), as float32 (None when every visible value is 0). The result for
    the last mask is reused for the same view of the same storage while it is unchanged (its
    version counter, shared by every view)."""
    if mask is None:
        return None, None
    old, version, shp, res = _LAST_MASK
    if old is not None and old.data_ptr() == mask.data_ptr() and old.device == mask.device \
            and old.dtype == mask.dtype \
            and old.shape == mask.shape and old.stride() == mask.stride() \
            and version == mask._version and shp == shape:
        return res
    res = _mask_parts_of(mask, shape)
    _LAST_MASK[:] = [mask, mask._version, shape, res]
    return res


def _mask_parts_of(mask: torch.Tensor, shape: tuple[int, ...]
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if mask.dtype == torch.bool:
        return mask.expand(shape), None
    lo = torch.finfo(mask.dtype).min / 2
    vis = mask > lo
    bias = None
    if bool(((mask != 0) & vis).any()):
        bias = torch.where(vis, mask, 0).float().expand(shape)
    return vis.expand(shape), bias


def _scores(s: torch.Tensor, c32: torch.Tensor, bias: torch.Tensor | None,
            softcap: float | None, scaling: float, tanh: FunctionUnit) -> torch.Tensor:
    """The scores in log2 units, float32 (each torch op the exact result rounded once to
    fp32): ``fp32(S * c)`` without a soft cap or bias; else ``u = fp32(S * fp32(scaling))``,
    with a cap ``u = fp32(cap * tanh(fp32(u / cap)))`` (tanh: the datapath's unit), with a
    bias ``u = fp32(u + bias)``, and ``t = fp32(u * fp32(log2 e))``."""
    if softcap is None and bias is None:
        return s * c32
    u = s * torch.tensor(float(np.float32(scaling)), dtype=torch.float32, device=s.device)
    if softcap is not None:
        cap = torch.tensor(softcap, dtype=torch.float32, device=s.device)
        u = _unit32(tanh, u / cap) * cap
    if bias is not None:
        u = u + bias
    return u * torch.tensor(LOG2E32, dtype=torch.float32, device=s.device)


def check_extras(softcap: float | None, sinks: torch.Tensor | None, h: int
                 ) -> tuple[float | None, torch.Tensor | None]:
    """The soft cap as a float > 0 and the sinks as given, after checking them (a ValueError
    naming the bad value and what is accepted): a finite number > 0, and a floating tensor of
    ``h`` finite logits. Shared by the datapath and the training attention."""
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, int | float) \
                or not math.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"softcap={softcap!r} is not valid: accepted a finite number > 0 "
                             "(or None)")
        softcap = float(softcap)
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or sinks.numel() != h \
                or not sinks.is_floating_point():
            shape = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks)
            raise ValueError(f"sinks of shape {shape} are not valid: accepted a floating "
                             f"tensor of {h} logits, one per query head")
        if not bool(torch.isfinite(sinks.detach()).all()):
            raise ValueError("sinks are not valid: accepted finite logits (got inf or NaN)")
    return softcap, sinks


def _check_extras(softcap: float | None, sinks: torch.Tensor | None, h: int
                  ) -> tuple[float | None, torch.Tensor | None]:
    """:func:`check_extras`, then the soft cap as an fp32 value > 0 and the sinks as float32
    (h,) logits."""
    softcap, sinks = check_extras(softcap, sinks, h)
    if softcap is not None:
        c = float(np.float32(softcap))
        if not math.isfinite(c) or c <= 0:  # beyond fp32's range, or below its smallest value
            raise ValueError(f"softcap={softcap!r} is not valid: accepted a finite number > 0 "
                             "in fp32 (or None)")
        softcap = c
    if sinks is not None:
        sinks = sinks.detach().reshape(-1).float()
    return softcap, sinks


def _tiles(n_k: int, dp: AttentionDatapath) -> list[tuple[int, int]]:
    t = [(j, min(n_k, j + dp.tile)) for j in range(0, n_k, dp.tile)]
    return t[::-1] if dp.order is Order.REVERSE else t


def _scale_const(scaling: float) -> float:
    return float(np.float32(scaling * LOG2E))


def _cast_p_block(p: torch.Tensor, dp: AttentionDatapath) -> torch.Tensor:
    """P (float32 values) through a non-element ``p_format`` (block scales along the keys,
    integer formats): the shared quantizer."""
    return quantize_operand(p.float(), dp.p_format, axis=-1).values


# ---------------------------------------------------------------------------------------------
# fast path

def _fast(r: Rq):  # noqa: ANN202 - a rounding function on float64 tensors
    """``r.fast``, or for fp32 with RNE, infinities and no flush the float64 -> float32
    conversion (IEEE round to nearest even with gradual underflow): the same bits for the
    exact or round-to-odd float64 values it is given (docs/arithmetic.md section 3.1)."""
    if r.fmt.name == "fp32" and r.rounding is Rounding.NEAREST_EVEN \
            and r.overflow is Overflow.INF and not r.flush:
        def q32(v: torch.Tensor) -> torch.Tensor:
            y = v.float().double()
            return torch.where(y != y, math.nan, y)  # one NaN (as Rq.fast)

        return q32
    return r.fast


def _is_fp32_rne(r: Rq) -> bool:
    """True when ``r`` is IEEE fp32 rounding (RNE, infinities, gradual underflow): what a
    float32 torch operation does to its exact result (docs/arithmetic.md section 3.1)."""
    return r.fmt.name == "fp32" and r.rounding is Rounding.NEAREST_EVEN \
        and r.overflow is Overflow.INF and not r.flush


def _tile_sum(x: torch.Tensor, r: Rq) -> torch.Tensor:
    """The pairwise sum of the last axis, every partial sum rounded by ``r`` (as
    :class:`Reduction` ``order=pairwise`` on values of the format); float64. In fp32 the
    partial sums are float32 additions (each the exact sum rounded once)."""
    if _is_fp32_rne(r):
        v = x.float()
        add = torch.add
    else:
        Q = _fast(r)
        v = Q(x.double())

        def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return Q(add_ro(a.double(), b.double()))
    while v.shape[-1] > 1:
        n = v.shape[-1]
        pair = add(v[..., 0:n - 1:2], v[..., 1:n:2])
        v = torch.cat([pair, v[..., n - 1:]], dim=-1) if n % 2 else pair
    out = v[..., 0] if v.shape[-1] else torch.zeros(v.shape[:-1], dtype=v.dtype,
                                                    device=v.device)
    return out.double()


#: P formats whose saturating RNE cast is torch's own conversion after a clamp to +-max
_TORCH_CASTS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "bf16": torch.bfloat16,
                "fp16": torch.float16}


def _torch_dtype(f: FloatFormat) -> torch.dtype | None:
    for name, dt in _TORCH_CASTS.items():
        if get_format(name) == f and float(torch.finfo(dt).max) == float(f.max):
            return dt
    return None


def _p_caster(pel: FloatFormat):  # noqa: ANN202 - float32 -> float32 cast function
    """The saturating RNE cast of float32 P to ``pel`` on float32 tensors: torch's conversion
    (RNE with subnormals) after clamping to the largest value where torch has the format
    (checked bit for bit against :class:`Rq` in tests/test_flash_datapath.py), else
    :meth:`Rq.fast` through float64."""
    r = Rq(pel, overflow=Overflow.SATURATE)
    dt = _torch_dtype(pel)
    if dt is not None:
        mx = float(pel.max)

        def cast(p: torch.Tensor) -> torch.Tensor:
            return p.clamp(-mx, mx).to(dt).float()

        return cast

    def slow(p: torch.Tensor) -> torch.Tensor:
        return r.fast(p.double()).float()

    return slow


#: the datapath compiles its kernels from this many elements on (the global threshold of
#: :func:`precisim.formats.kernels.run` is 2^18): it calls them once per tile, on tensors of
#: rows x tile elements, where an eager kernel is ~50x slower per element
TILE_COMPILE_MIN_NUMEL = 1 << 12


def _compiled(fn: Any, key: tuple, numel: int, *args: Any) -> Any:
    """``kernels.run`` with compilation from :data:`TILE_COMPILE_MIN_NUMEL` elements on (the
    datapath's per-tile tensors are small); compiled kernels are self-checked bit for bit
    against their eager twin."""
    with kernels.compile_from(TILE_COMPILE_MIN_NUMEL):
        return kernels.run(fn, key, numel, *args)


def _unit32(unit: FunctionUnit, x: torch.Tensor) -> torch.Tensor:
    """``unit(x)`` on float32 ``x``. For a correctly rounded fp32 exp2 unit (the default
    ``exp2-exact``) :func:`_exp2_fp32`; otherwise the unit (exp2, or the soft cap's tanh),
    with its kernel compiled from 2^12 elements on (the global threshold of
    :func:`precisim.formats.kernels.run` is 2^18): the datapath calls the unit once per tile,
    on tensors of rows x tile elements, where the eager kernel is ~50x slower per element.
    Compiled kernels are self-checked bit for bit against the eager ones on their first
    call."""
    with kernels.compile_from(TILE_COMPILE_MIN_NUMEL):
        if FAST_EXP2 and _is_cr_fp32_exp2(unit):
            return _exp2_fp32(unit, x)
        return unit(x)


#: use :func:`_exp2_fp32` for correctly rounded fp32 exp2 units (False: always the unit's own
#: kernel; tests/test_flash_datapath.py compares the two bit for bit)
FAST_EXP2 = True


def _is_cr_fp32_exp2(unit: FunctionUnit) -> bool:
    """True for an exact (correctly rounded) exp2 unit whose input and output are IEEE fp32
    (RNE, infinities, gradual underflow) and that flushes no input."""
    from .functions.units import Method

    r = unit.rounders
    return unit.function is Fn.EXP2 and unit.method is Method.EXACT and not unit.flush_input \
        and _is_fp32_rne(r["in"]) and _is_fp32_rne(r["out"])


def _exp2_kernel(x32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp2 of float32 ``x32`` (any shape) rounded to fp32 as the unit's exact kernel does it
    (:func:`~precisim.emulation.functions.core.cr_fast`): the float64 ``exp2`` rounded by the
    float64 -> float32 conversion, which is the fp32 RNE rounding with gradual underflow and
    overflow to inf (docs/arithmetic.md section 3.1), and the mask of elements whose certified
    error interval (the :data:`~precisim.emulation.functions.core.FN_DEFS` guard, 2^-47
    relative) straddles a rounding boundary. Integer arguments need no exact branch here (as
    cr_fast has for any format): 2^n is an fp32 value or beyond fp32's range, at least 2^-25
    (relative) away from every fp32 rounding boundary, except 2^-150, the midpoint between 0
    and 2^-149, which is flagged hard and decided by the exact reference (measured: the
    branch's float64 -> int64 conversion cost ~10% of the P kernel)."""
    d = FN_DEFS[Fn.EXP2]
    x = x32.double()
    xc = x.clamp(d.lo, d.hi)
    v = torch.exp2(xc)
    eps = d.guard(xc)
    hard = ((v * (1.0 - eps)).float() != (v * (1.0 + eps)).float()) & torch.isfinite(x)
    return v.float(), hard


def _p_kernel(t: torch.Tensor, mo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_exp2_kernel` of ``x = fp32(t - mo)`` (``t`` (..., keys), ``mo`` (...), float32;
    -inf scores give x = -inf, so P = 0): the step's subtraction and the exp2 in one pass."""
    x = torch.where(t == -math.inf, -math.inf, t - mo[..., None])
    return _exp2_kernel(x)


def _p_marked_kernel(t: torch.Tensor, mo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_p_kernel` with the hard cases marked in P itself: ``(y, n)``, ``y`` the P of
    :func:`_p_kernel` with -1 (a value exp2 never gives) at the hard elements, ``n`` their
    number. One float64 exp2 per score: compiled, a bool mask output cost more than the float64
    exp2 itself (13.1 ns per score with the mask, 7.4 ns with per-row counts,
    docs/attention-datapath.md section 5), and per-row counts of the mask made inductor
    evaluate the exp2 and its guard a second time in the row-reduction loop; counting the
    marks reads the stored P instead."""
    y, hard = _p_kernel(t, mo)
    y = torch.where(hard, -1.0, y)
    return y, (y < 0).sum()


def _marked_rows(y: torch.Tensor) -> torch.Tensor:
    """The flat indices of the rows of ``y`` (..., keys) that hold a mark of
    :func:`_p_marked_kernel` (eager; called only when the kernel counted a mark)."""
    return (y.reshape(-1, y.shape[-1]) < 0).any(-1).nonzero().reshape(-1)


def _p_rows_exact(unit: FunctionUnit, t: torch.Tensor, mo: torch.Tensor) -> torch.Tensor:
    """P of a few rows (``t`` (n, keys), ``mo`` (n,)) for a unit of :func:`_is_cr_fp32_exp2`:
    the eager :func:`_p_kernel`, its hard cases by the unit's exact reference."""
    y, hard = _p_kernel(t, mo)
    if bool(hard.any()):
        idx = hard.nonzero(as_tuple=True)
        x = t[idx] - mo[idx[0]]  # fp32(t - mo) at the hard elements only
        y[idx] = torch.tensor([float(unit.reference(v)) for v in x.tolist()],
                              dtype=torch.float32, device=y.device)
    return y


def _p_fused(unit: FunctionUnit, t: torch.Tensor, mo: torch.Tensor) -> torch.Tensor:
    """P of a tile for a unit of :func:`_is_cr_fp32_exp2`: :func:`_p_marked_kernel` compiled
    (from 2^12 elements on, self-checked), the rows that hold a marked hard case again by
    :func:`_p_rows_exact`. Bit for bit the unit applied to ``where(live, t - mo, -inf)``."""
    y, n_hard = _compiled(_p_marked_kernel, ("flash-p-marked",), t.numel(), t, mo)
    if int(n_hard):
        y = _redo_marked_rows(unit, y, t, mo)[0]
    return y


def _redo_marked_rows(unit: FunctionUnit, y: torch.Tensor, t: torch.Tensor, mo: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y`` (a fresh kernel output, written where it is a view) with the rows that hold a
    mark of :func:`_p_marked_kernel` recomputed by :func:`_p_rows_exact`; also those rows'
    flat indices, marked values and new values."""
    bad = _marked_rows(y)
    k = t.shape[-1]
    rows = y.reshape(-1, k)
    y0 = rows[bad]
    y1 = _p_rows_exact(unit, t.reshape(-1, k)[bad], mo.reshape(-1)[bad])
    rows[bad] = y1
    return rows.reshape(t.shape), bad, y0, y1


def _p_cast_kernel_for(dt: torch.dtype, mx: float, pq64: bool = False):  # noqa: ANN202
    """The kernel of :func:`_p_fused_cast` for P's torch dtype ``dt`` with largest value ``mx``
    (plain Python constants captured by the closure, not traced): :func:`_p_marked_kernel`,
    then P's saturating cast (the conversion of :func:`_p_caster`) and the tile's telemetry
    counts (visible scores, P above ``mx``, P > 0 cast to 0, marked hard cases) in the same
    compiled pass; ``pq64``: the cast P as float64 (the same values, for a float64 PV
    product). A marked P (-1) is neither above ``mx`` nor flushed; its row is redone."""
    inf = math.inf

    def kernel(t: torch.Tensor, mo: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        y, n_hard = _p_marked_kernel(t, mo)
        pq = y.clamp(-mx, mx).to(dt).float()
        counts = torch.stack([(t != -inf).sum(), (y > mx).sum(), ((pq == 0) & (y > 0)).sum(),
                              n_hard])
        return y, pq.double() if pq64 else pq, counts

    return kernel


_P_CAST_KERNELS: dict[tuple[torch.dtype, bool], Any] = {}


def _p_fused_cast(unit: FunctionUnit, pel: FloatFormat, t: torch.Tensor, mo: torch.Tensor,
                  pq64: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """``(p, pq, (visible, saturated, flushed))`` of a tile for a unit of
    :func:`_is_cr_fp32_exp2` and a P format with a torch dtype (:func:`_torch_dtype`): P as
    :func:`_p_fused`, its cast as :func:`_p_caster` and the counts in one compiled kernel (from
    2^12 elements on, self-checked bit for bit against its eager twin); the rows that hold a
    hard exp2 case (marked by :func:`_p_marked_kernel`) again by :func:`_p_rows_exact`, their
    cast and counts redone eagerly. One host sync for the counts, and one for the marked rows
    when there are any."""
    dt = _torch_dtype(pel)
    assert dt is not None
    mx = float(pel.max)
    fn = _P_CAST_KERNELS.get((dt, pq64))
    if fn is None:
        fn = _P_CAST_KERNELS[dt, pq64] = _p_cast_kernel_for(dt, mx, pq64)
    y, pq, counts = _compiled(fn, ("flash-p-cast-marked", str(dt), pq64), t.numel(), t, mo)
    n_vis, n_sat, n_fl, n_hard = (int(c) for c in counts.tolist())
    if n_hard:
        y, bad, y0, y1 = _redo_marked_rows(unit, y, t, mo)
        pq_rows = pq.reshape(-1, t.shape[-1])
        q0, q1 = pq_rows[bad].float(), y1.clamp(-mx, mx).to(dt).float()
        pq_rows[bad] = q1.to(pq.dtype)
        pq = pq_rows.reshape(t.shape)
        n_sat += int((y1 > mx).sum()) - int((y0 > mx).sum())
        n_fl += int(((q1 == 0) & (y1 > 0)).sum()) - int(((q0 == 0) & (y0 > 0)).sum())
    return y, pq, (n_vis, n_sat, n_fl)


def _t_kernel_for(c: float, masked: bool):  # noqa: ANN202 - a kernel function
    """The kernel of :func:`_scores_max`: ``t = fp32(S * c)`` (``c`` the fp32 constant of
    :func:`_scale_const`, captured as a plain Python float), -inf where the key is masked, and
    the row maxima of ``t``."""
    inf = math.inf

    def kernel(s: torch.Tensor, *vis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = s.float() * c  # (float64 S: the fp32 product's accumulation, rounded here)
        if masked:
            t = torch.where(vis[0], t, -inf)
        return t, t.amax(-1)

    return kernel


_T_KERNELS: dict[tuple[float, bool], Any] = {}


def _scores_max(s: torch.Tensor, c: float, vis: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, t.amax(-1))`` for scores without soft cap or bias: :func:`_scores` and the mask
    of the datapath's loop in one compiled pass (from 2^12 elements on, self-checked bit for
    bit against its eager twin)."""
    key = (c, vis is not None)
    fn = _T_KERNELS.get(key)
    if fn is None:
        fn = _T_KERNELS[key] = _t_kernel_for(*key)
    args = (s,) if vis is None else (s, vis)
    return _compiled(fn, ("flash-t", *key), s.numel(), *args)


def _exp2_fp32(unit: FunctionUnit, x: torch.Tensor) -> torch.Tensor:
    """``unit(x)`` bit for bit for a unit of :func:`_is_cr_fp32_exp2` (the float32 inputs
    are its fp32 input values; +inf gives inf (2^130 overflows), -inf gives 0 (2^-1000
    underflows), NaN stays NaN): one compiled elementwise kernel, ~10x faster than the generic
    unit kernel, whose rounding steps are general formats; the rare hard cases by the unit's
    exact reference."""
    flat = x.detach().reshape(-1).float()
    y, hard = kernels.run(_exp2_kernel, ("flash-exp2-fp32",), flat.numel(), flat)
    if bool(hard.any()):
        idx = hard.nonzero().reshape(-1)
        y = y.clone()
        y[idx] = torch.tensor([float(unit.reference(v)) for v in flat[idx].tolist()],
                              dtype=torch.float32, device=y.device)
    return y.reshape(x.shape)


def _sink_state(sinks: torch.Tensor, dp: AttentionDatapath, shape: tuple[int, int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The running max and row sum (float64) after the sinks, a key visited before the first
    tile whose V is 0: ``t = fp32(sink * fp32(log2 e))``, ``m = max_format(t)``,
    ``l = sum_format(exp2(fp32(t - fp32(m - max_offset))))`` (not cast: it is not in PV)."""
    b, h, n_q = shape
    t = (sinks * LOG2E32).reshape(1, h, 1).expand(b, h, n_q)
    m = _fast(rq(dp.max_format))(t.double()).contiguous()
    mo = _fast(rq("fp32"))(add_ro(m, torch.full_like(m, -float(dp.max_offset)))).float()
    p = _unit32(dp.exp2, t - mo)
    return m, _fast(rq(dp.sum_format))(p.double()).contiguous()


def _row_range(vis: torch.Tensor | None, j0: int, j1: int, n_q: int) -> tuple[int, int]:
    """The rows (queries) that see at least one key of the tile ``j0:j1``: a tile is a no-op
    for the other rows (running max, sum and accumulator unchanged), so they are skipped
    (the causal triangle)."""
    if vis is None:
        return 0, n_q
    for dim in range(vis.dim() - 2):  # a broadcast (batch, head) axis: one copy is enough
        if vis.stride(dim) == 0 and vis.shape[dim] > 1:
            vis = vis.narrow(dim, 0, 1)
    rows = vis[..., j0:j1].any(-1).reshape(-1, n_q).any(0).nonzero()
    if rows.numel() == 0:
        return 0, 0
    return int(rows[0]), int(rows[-1]) + 1


#: run the per-tile statistics (running max, rescale, row sum, accumulator) and the final
#: normalisation through the compiled kernels of :func:`_stats_kernel_for`,
#: :func:`_update_kernel_for` and :func:`_norm_kernel_for` (False: the eager per-tile code of
#: :func:`flash_attention`; tests/test_flash_datapath.py compares the two bit for bit)
FAST_STATS = True


_STAT_KERNELS: dict[tuple, Any] = {}


def _stats_kernel_for(dp: AttentionDatapath):  # noqa: ANN202 - a kernel function
    """The running-max step of a tile (module docstring, step 2) as one kernel of
    ``(m_old float64, tmax float32)``: ``(m_new, mo = fp32(m_new - max_offset) float32,
    ax = fp32(m_old - m_new) where the rescale is taken else 0 (float32), rescale, count)``;
    the same operations as the eager loop of :func:`flash_attention`."""
    rmax, q32 = _fast(rq(dp.max_format)), _fast(rq("fp32"))
    thr, off, inf = dp.rescale_threshold, float(dp.max_offset), math.inf

    def kernel(m_old: torch.Tensor, tmax: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cand = rmax(torch.maximum(m_old, tmax.double()))
        first = m_old == -inf
        diff = q32(add_ro(cand, -m_old))
        take = first | (diff > thr)
        m_new = torch.where(take, cand, m_old)
        rescale = take & ~first & (m_new != m_old)
        mo = q32(add_ro(m_new, torch.full_like(m_new, -off))).float()
        ax = torch.where(rescale, q32(add_ro(m_old, -m_new)).float(), 0.0)
        return m_new, mo, ax, rescale, rescale.sum()

    return kernel


def _update_kernel_for(dp: AttentionDatapath, acc32: bool):  # noqa: ANN202 - a kernel
    """Steps 5 and 6 of a tile as one kernel of ``(ell_old, e2, rescale, src, acc_old, pv)``
    (``e2``: the exp2 unit's value of ``ax``, ``src``: the P the row sum adds):
    ``alpha = alpha_format(e2)`` where the rescale is taken else 1, the pairwise tile sum of
    ``src`` (:func:`_tile_sum`), ``l = sum_format(alpha * l + sum)``, the accumulator update
    and the overflow counts; the same operations as the eager loop of
    :func:`flash_attention` (an fp32 accumulator: ``acc + PV`` in float32 where alpha = 1, the
    float64 round-to-odd update rounded once in the rescaled rows)."""
    ralpha, rsumf, racc = (_fast(rq(getattr(dp, f"{w}_format"), what=f"{w}_format"))
                           for w in ("alpha", "sum", "acc"))
    rsum, q32 = rq(dp.sum_format, what="sum_format"), _fast(rq("fp32"))

    def kernel(ell_old: torch.Tensor, e2: torch.Tensor, rescale: torch.Tensor,
               src: torch.Tensor, acc_old: torch.Tensor, pv: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pv = pv.float()  # (float64 PV: the fp32 product's accumulation, rounded here)
        alpha = torch.where(rescale, ralpha(e2.double()), 1.0)
        ell_new = rsumf(add_ro(alpha * ell_old, _tile_sum(src, rsum)))
        if acc32:
            resc = q32(add_ro(alpha[..., None] * acc_old.double(), pv.double())).float()
            acc_new = torch.where(rescale[..., None], resc, acc_old + pv)
        else:
            acc_new = racc(add_ro(alpha[..., None] * acc_old, pv.double()))
        counts = torch.stack([(torch.isinf(ell_new) & ~torch.isinf(ell_old)).sum(),
                              (torch.isinf(acc_new) & ~torch.isinf(acc_old)).sum()])
        return ell_new, acc_new, counts

    return kernel


def _norm_kernel_for(divide: bool):  # noqa: ANN202 - a kernel function
    """The final normalisation ``fp32(O / l)`` or ``fp32(O * fp32(1 / l))`` (0 where
    ``l = 0``) as one kernel of ``(acc, ell)``; the eager code of :func:`flash_attention`."""
    q32 = _fast(rq("fp32"))

    def kernel(acc: torch.Tensor, ell: torch.Tensor) -> torch.Tensor:
        acc = acc.double()
        if divide:
            out = q32(div_ro(acc, ell[..., None]))
        else:
            r = q32(div_ro(torch.ones_like(ell), ell))
            out = q32(acc * r[..., None])
        return torch.where((ell == 0)[..., None], 0.0, out).float()

    return kernel


def _kernel(kind: str, dp: AttentionDatapath, *extra: Any) -> tuple[Any, tuple]:
    """The cached kernel ``kind`` for the fields of ``dp`` it depends on, and its key."""
    fields = {"stats": (dp.max_format, dp.rescale_threshold, dp.max_offset),
              "update": (dp.alpha_format, dp.sum_format, dp.acc_format),
              "norm": (dp.normalize,)}[kind]
    key = (f"flash-{kind}", *fields, *extra)
    fn = _STAT_KERNELS.get(key)
    if fn is None:
        make = {"stats": lambda: _stats_kernel_for(dp),
                "update": lambda: _update_kernel_for(dp, *extra),
                "norm": lambda: _norm_kernel_for(dp.normalize is Normalize.DIVIDE)}[kind]
        fn = _STAT_KERNELS[key] = make()
    return fn, key


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None, scaling: float, dp: AttentionDatapath,
                    stats: FlashStats | None = None, *, softcap: float | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The datapath on ``q`` (b, h, n_q, d), ``k`` (b, h_kv, n_k, d), ``v`` (b, h_kv, n_k, dv)
    (grouped-query attention: ``h_kv`` divides ``h``, query head ``i`` sees key/value head
    ``i // (h / h_kv)``; the result is that of K and V repeated per query head, see
    :data:`GQA_PER_KV_HEAD`) with ``mask`` (broadcastable to
    (b, h, n_q, n_k): additive (-inf or the dtype's minimum: masked; other values: a bias such
    as ALiBi), or boolean visible) and the softmax ``scaling``; float32 (b, h, n_q, dv).
    ``softcap``: Gemma-2's ``cap * tanh(scores / cap)``; ``sinks``: one logit per head in the
    softmax denominator (gpt-oss), see :func:`_scores` and :func:`_sink_state`. Counts go to
    ``stats`` when given.

    Per score the steps run in float32, where each torch operation is the exact result
    rounded once to fp32 (the steps' own rounding); the per-row state (max, sum, alpha,
    accumulator) runs in float64 with round-to-odd and one rounding to its format (an fp32
    accumulator in float32, except in the rows being rescaled). Rows that see no key of a tile
    skip it (a no-op for them)."""
    b, h, n_q, _ = q.shape
    n_k, dv = k.shape[-2], v.shape[-1]
    vis, bias = _mask_parts(mask, (b, h, n_q, n_k))
    softcap, sinks = _check_extras(softcap, sinks, h)
    (qq, (kq, gk), (vq, gv)) = _operands(q, k, v, dp)
    gqk, gpv = _gemm_no_operands(dp.qk), _gemm_no_operands(dp.pv)
    c = _scale_const(scaling)
    c32 = torch.tensor(c, dtype=torch.float32, device=q.device)
    Q32 = _fast(rq("fp32"))
    R = {w: _fast(rq(getattr(dp, f"{w}_format"), what=f"{w}_format"))
         for w in ("max", "sum", "alpha", "acc")}
    rsum = rq(dp.sum_format, what="sum_format")
    pel = dp.p_element
    cast = _p_caster(pel) if pel is not None else None
    off = float(dp.max_offset)
    thr = dp.rescale_threshold
    quant_sum = dp.row_sum is RowSum.QUANTIZED
    fused = FAST_EXP2 and _is_cr_fp32_exp2(dp.exp2)
    dev = q.device
    m = torch.full((b, h, n_q), -math.inf, dtype=torch.float64, device=dev)
    ell = torch.zeros((b, h, n_q), dtype=torch.float64, device=dev)
    if sinks is not None:
        m, ell = _sink_state(sinks, dp, (b, h, n_q))
    acc32 = _is_fp32_rne(rq(dp.acc_format, what="acc_format"))
    acc = torch.zeros((b, h, n_q, dv), dtype=torch.float32 if acc32 else torch.float64,
                      device=dev)
    st = FlashStats()
    # the common case (a correctly rounded fp32 exp2, P cast to a torch dtype): the per-tile
    # statistics in compiled kernels, the counts summed on the device (one read at the end)
    fast = FAST_STATS and fused and cast is not None and dp.p_format is not None \
        and _torch_dtype(pel) is not None
    if fast:
        kst, kst_key = _kernel("stats", dp)
        kup, kup_key = _kernel("update", dp, acc32)
        counts = torch.zeros(3, dtype=torch.int64, device=dev)
        if _is_identity(gqk):  # the fp32 products in float64: the operands converted once
            qq, kq = qq.double(), kq.double()
        pv64 = _is_identity(gpv)  # P cast straight to float64 for the float64 PV product
        if pv64:
            vq = vq.double()
    for j0, j1 in _tiles(n_k, dp):
        r0, r1 = _row_range(vis, j0, j1, n_q)
        if r0 == r1:
            continue
        rows = slice(r0, r1)
        plain = softcap is None and bias is None  # the scores kernel rounds S itself
        s = _gqa_matmul(qq[:, :, rows], kq[:, :, j0:j1], gk, gqk, unrounded=fast and plain)
        vt = None if vis is None else vis[:, :, rows, j0:j1]
        if plain:
            t, tmax = _scores_max(s, c, vt)
        else:
            t = _scores(s, c32, None if bias is None else bias[:, :, rows, j0:j1], softcap,
                        scaling, dp.tanh)
            if vt is not None:
                t = torch.where(vt, t, -math.inf)
            tmax = t.amax(-1)
        if fast:  # steps 2-6 in three compiled kernels and the exp2 of the rescale factors
            m_old = m[:, :, rows]
            m_new, mo, ax, rescale, n_resc = _compiled(kst, kst_key, m_old.numel(), m_old,
                                                       tmax)
            p, pq, (n_vis, n_sat, n_fl) = _p_fused_cast(dp.exp2, pel, t, mo, pv64)
            st.p_numel += n_vis
            st.p_saturated += n_sat
            st.p_flushed += n_fl
            e2 = _unit32(dp.exp2, ax)
            pv = _gqa_matmul(pq, vq[:, :, j0:j1].transpose(-1, -2), gv, gpv,
                             unrounded=True)
            ell_new, acc_new, c2 = _compiled(kup, kup_key, p.numel(), ell[:, :, rows], e2,
                                             rescale, pq if quant_sum else p, acc[:, :, rows],
                                             pv)
            counts += torch.cat([n_resc.reshape(1), c2])
            m[:, :, rows], ell[:, :, rows], acc[:, :, rows] = m_new, ell_new, acc_new
            continue
        # P, its cast and the counts in one compiled kernel (fp32 CR exp2, torch-castable P)
        fcast = fused and cast is not None and dp.p_format is not None \
            and _torch_dtype(pel) is not None
        live = None
        if not fcast:
            live = t != -math.inf
            if bool(live.all()):
                live = None
        m_old = m[:, :, rows]
        cand = R["max"](torch.maximum(m_old, tmax.double()))
        first = m_old == -math.inf
        diff = Q32(add_ro(cand, -m_old))
        take = first | (diff > thr)
        m_new = torch.where(take, cand, m_old)
        rescale = take & ~first & (m_new != m_old)
        n_resc = int(torch.count_nonzero(rescale))
        st.rescales += n_resc
        mo = Q32(add_ro(m_new, torch.full_like(m_new, -off))).float()
        if fused:  # x = fp32(t - mo) and its exp2 in one compiled kernel, alpha on its own
            if fcast:
                p, pq, (n_vis, n_sat, n_fl) = _p_fused_cast(dp.exp2, pel, t, mo)
            else:
                p = _p_fused(dp.exp2, t, mo)
            alpha = torch.ones_like(m_new)
            if n_resc:
                ax = torch.where(rescale, Q32(add_ro(m_old, -m_new)).float(), 0.0)
                alpha = torch.where(rescale, R["alpha"](_unit32(dp.exp2, ax).double()), 1.0)
        else:
            x = t - mo[..., None]  # float32: fp32(t - fp32(m - offset))
            if live is not None:
                x = torch.where(live, x, -math.inf)
            if n_resc:  # P and the rescale factors through one call of the (elementwise) unit
                ax = torch.where(rescale, Q32(add_ro(m_old, -m_new)).float(), 0.0)
                both = _unit32(dp.exp2, torch.cat([x.reshape(-1), ax.reshape(-1)]))
                p = both[:x.numel()].reshape(x.shape)
                alpha = R["alpha"](both[x.numel():].reshape(ax.shape).double())
                alpha = torch.where(rescale, alpha, 1.0)
            else:
                p = _unit32(dp.exp2, x)
                alpha = torch.ones_like(m_new)
            if live is not None:
                p = torch.where(live, p, 0.0)
        if fcast:
            st.p_saturated += n_sat
            st.p_numel += n_vis
            st.p_flushed += n_fl
        else:
            if dp.p_format is None:
                pq = p
            elif cast is not None:
                pq = cast(p)
                st.p_saturated += int(torch.count_nonzero(p > float(pel.max)))
            else:
                pq = _cast_p_block(p, dp)
            st.p_numel += int(torch.count_nonzero(live)) if live is not None else p.numel()
            if dp.p_format is not None:
                st.p_flushed += int(torch.count_nonzero((pq == 0) & (p > 0)))
        tsum = _tile_sum(pq if quant_sum else p, rsum)
        ell_old = ell[:, :, rows]
        ell_new = R["sum"](add_ro(alpha * ell_old, tsum))
        st.row_sum_overflow += int(torch.count_nonzero(torch.isinf(ell_new)
                                                       & ~torch.isinf(ell_old)))
        ell[:, :, rows] = ell_new
        pv = _gqa_matmul(pq, vq[:, :, j0:j1].transpose(-1, -2), gv, gpv)
        acc_old = acc[:, :, rows]
        if acc32:  # float32: acc + PV is the exact sum rounded once where alpha = 1
            acc_new = acc_old + pv
            if n_resc:  # rescaled rows: alpha * acc exact in float64, one rounding
                a = alpha[rescale][:, None]
                acc_new[rescale] = Q32(add_ro(a * acc_old[rescale].double(),
                                              pv[rescale].double())).float()
        else:
            acc_new = R["acc"](add_ro(alpha[..., None] * acc_old, pv.double()))
        st.acc_overflow += int(torch.count_nonzero(torch.isinf(acc_new)
                                                   & ~torch.isinf(acc_old)))
        acc[:, :, rows] = acc_new
        m[:, :, rows] = m_new
    if fast:
        n_resc, n_ell, n_acc = (int(x) for x in counts.tolist())
        st.rescales += n_resc
        st.row_sum_overflow += n_ell
        st.acc_overflow += n_acc
        kn, kn_key = _kernel("norm", dp)
        out = _compiled(kn, kn_key, acc.numel(), acc, ell)
        if stats is not None:
            stats.add(st)
        return out
    acc = acc.double()
    if dp.normalize is Normalize.DIVIDE:
        out = Q32(div_ro(acc, ell[..., None]))
    else:
        r = Q32(div_ro(torch.ones_like(ell), ell))
        out = Q32(acc * r[..., None])
    out = torch.where((ell == 0)[..., None], 0.0, out)
    if stats is not None:
        stats.add(st)
    return out.float()


# ---------------------------------------------------------------------------------------------
# the direct reference

def _f(v: ex.Value) -> float:
    return float(v)


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              mask: torch.Tensor | None, scaling: float,
                              dp: AttentionDatapath, stats: FlashStats | None = None, *,
                              softcap: float | None = None,
                              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The datapath step by step (see the module docstring): loops over rows, tiles and
    elements; exact values (Fractions) with one rounding per step. Shares only the GEMMs and
    the block quantizer of P with :func:`flash_attention`. Slow: small inputs only."""
    b, h, n_q, _ = q.shape
    n_k, dv = k.shape[-2], v.shape[-1]
    vis, bias = _mask_parts(mask, (b, h, n_q, n_k))
    softcap, sinks = _check_extras(softcap, sinks, h)
    from .attention import repeat_kv

    qq, kq, vq = _operands(q, k, v, dp)
    kq, vq = repeat_kv(*kq), repeat_kv(*vq)  # per query head (the fast path stacks rows)
    gqk, gpv = _gemm_no_operands(dp.qk), _gemm_no_operands(dp.pv)
    c = Fraction(_scale_const(scaling))
    r32: Rq = rq("fp32")
    R = {w: rq(getattr(dp, f"{w}_format"), what=f"{w}_format")
         for w in ("max", "sum", "alpha", "acc")}
    red = Reduction("sum", dp.sum_format)
    pel = dp.p_element
    cast = Rq(pel, overflow=Overflow.SATURATE) if pel is not None else None
    off = Fraction(dp.max_offset)
    thr = Fraction(dp.rescale_threshold)
    unit = dp.exp2
    ninf = -math.inf
    st = FlashStats()
    # the GEMM tiles (shared calls, as on the fast side)
    # (rows that see no key of a tile take the tile's steps with T = 0: the fast path skips
    # them, and these steps check that skipping them is a no-op)
    tiles = _tiles(n_k, dp)
    rr = {j0: _row_range(vis, j0, j1, n_q) for j0, j1 in tiles}
    S = {j0: _matmul(qq[:, :, rr[j0][0]:rr[j0][1]], kq[:, :, j0:j1], gqk) for j0, j1 in tiles}
    lg = Fraction(LOG2E32)
    sc32 = Fraction(float(np.float32(scaling)))

    def score(sv: float, bi: int, hi: int, r: int, jj: int) -> ex.Value:
        if softcap is None and bias is None:
            return r32.exact(Fraction(sv) * c)
        u = r32.exact(Fraction(sv) * sc32)
        if softcap is not None:
            cap = Fraction(softcap)
            u = r32.exact(ex.mul(dp.tanh.reference(_f(r32.exact(ex.div(u, cap)))), cap))
        if bias is not None:
            u = r32.exact(ex.add(u, Fraction(float(bias[bi, hi, r, jj]))))
        return r32.exact(ex.mul(u, lg))

    m = [[[ninf] * n_q for _ in range(h)] for _ in range(b)]
    ell: list = [[[Fraction(0)] * n_q for _ in range(h)] for _ in range(b)]
    if sinks is not None:  # the sink: a key before the first tile, V = 0, P not cast
        for hi in range(h):
            ts = r32.exact(Fraction(float(sinks[hi])) * lg)
            mn = R["max"].exact(ts)
            x = r32.exact(ex.add(ts, ex.neg(r32.exact(ex.add(mn, -Fraction(dp.max_offset))))))
            lv = R["sum"].exact(unit.reference(_f(x)))
            for bi in range(b):
                m[bi][hi] = [mn] * n_q
                ell[bi][hi] = [lv] * n_q
    acc: list = [[[[Fraction(0)] * dv for _ in range(n_q)] for _ in range(h)] for _ in range(b)]
    for j0, j1 in tiles:
        P = torch.zeros(b, h, n_q, j1 - j0, dtype=torch.float32)
        Pq = torch.zeros_like(P)
        alphas: dict[tuple[int, int, int], ex.Value] = {}
        for bi in range(b):
            for hi in range(h):
                for r in range(n_q):
                    ts: list[ex.Value] = []
                    for jj in range(j0, j1):
                        if vis is not None and not bool(vis[bi, hi, r, jj]):
                            ts.append(ninf)
                        else:
                            s = S[j0][bi, hi, r - rr[j0][0], jj - j0]
                            ts.append(score(float(s), bi, hi, r, jj))
                    mo = m[bi][hi][r]
                    tmax: ex.Value = ninf
                    for t in ts:
                        tmax = ex.vmax(tmax, t)
                    cand = R["max"].exact(ex.vmax(mo, tmax))
                    first = mo == ninf
                    take = first or (r32.exact(ex.add(cand, ex.neg(mo))) > thr)
                    mn = cand if take else mo
                    resc = take and not first and mn != mo
                    if resc:
                        st.rescales += 1
                        a_in = r32.exact(ex.add(mo, ex.neg(mn)))
                        alpha = R["alpha"].exact(unit.reference(_f(a_in)))
                    else:
                        alpha = Fraction(1)
                    alphas[bi, hi, r] = alpha
                    moff = r32.exact(ex.add(mn, -off)) if mn != ninf else ninf
                    ps: list[ex.Value] = []
                    for t in ts:
                        if t == ninf:
                            ps.append(Fraction(0))
                            continue
                        st.p_numel += 1
                        x = r32.exact(ex.add(t, ex.neg(moff)))
                        ps.append(ex.value(unit.reference(_f(x))))
                    m[bi][hi][r] = mn
                    for i, pv in enumerate(ps):
                        P[bi, hi, r, i] = _f(pv)
                    if cast is not None:
                        for i, pv in enumerate(ps):
                            if pv > Fraction(pel.max):
                                st.p_saturated += 1
                            Pq[bi, hi, r, i] = _f(cast.exact(pv))
        if dp.p_format is None:
            Pq = P.clone()
        elif cast is None:
            Pq = _cast_p_block(P, dp)
        st.p_flushed += int(((P > 0) & (Pq == 0)).sum())
        r0, r1 = rr[j0]
        T = torch.zeros(b, h, n_q, dv, dtype=torch.float32)
        if r1 > r0:
            T[:, :, r0:r1] = _matmul(Pq[:, :, r0:r1], vq[:, :, j0:j1].transpose(-1, -2), gpv)
        src = Pq if dp.row_sum is RowSum.QUANTIZED else P
        for bi in range(b):
            for hi in range(h):
                for r in range(n_q):
                    alpha = alphas[bi, hi, r]
                    tsum = red.reference([Fraction(x) for x in src[bi, hi, r].tolist()])
                    old = ell[bi][hi][r]
                    new = R["sum"].exact(ex.add(ex.mul(alpha, old), tsum))
                    if isinstance(new, float) and math.isinf(new) and not (
                            isinstance(old, float) and math.isinf(old)):
                        st.row_sum_overflow += 1
                    ell[bi][hi][r] = new
                    row = acc[bi][hi][r]
                    for e in range(dv):
                        o = row[e]
                        nv = R["acc"].exact(ex.add(ex.mul(alpha, o),
                                                   ex.value(float(T[bi, hi, r, e]))))
                        if isinstance(nv, float) and math.isinf(nv) and not (
                                isinstance(o, float) and math.isinf(o)):
                            st.acc_overflow += 1
                        row[e] = nv
    out = torch.zeros(b, h, n_q, dv, dtype=torch.float32)
    for bi in range(b):
        for hi in range(h):
            for r in range(n_q):
                lv = ell[bi][hi][r]
                if lv == 0:
                    continue
                for e in range(dv):
                    o = acc[bi][hi][r][e]
                    if dp.normalize is Normalize.DIVIDE:
                        y = r32.exact(ex.div(o, lv))
                    else:
                        y = r32.exact(ex.mul(o, r32.exact(ex.div(Fraction(1), lv))))
                    out[bi, hi, r, e] = _f(y)
    if stats is not None:
        stats.add(st)
    return out
