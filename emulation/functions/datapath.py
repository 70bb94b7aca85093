"""Softmax, normalisation and activation units built from function units and reductions
(docs/arithmetic.md sections 7.4 to 7.6). Each is a frozen description with a fast torch path
(``__call__``) and an exact reference per row (``reference``), bit-identical; each is also the
spec type of its op kind (``parse``, ``to_dict``, ``describe``, ``is_identity``).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Any

import torch
from precisim.formats import FloatFormat

from . import exact as ex
from .core import Fn, Rq, Value, add_ro, check_format, div_ro, parse_enum, rq
from .exact import value as _value
from .presets import get_function_unit
from .reduction import Reduction
from .units import FunctionUnit, Method, unit_from_dict

__all__ = ["Activation", "Cast", "MaxOf", "Norm", "NormKind", "Softmax", "SpecBase", "Via",
           "function_unit"]


class MaxOf(enum.Enum):
    INPUT = "input"  #: the maximum of the unquantized inputs
    QUANTIZED = "quantized"  #: the maximum of the inputs rounded to input_format


class Division(enum.Enum):
    DIVIDE = "divide"  #: y = Q(e / s), one rounding
    RECIPROCAL = "reciprocal"  #: y = Q(e * rcp(s)), the reciprocal from the rcp unit


class NormKind(enum.Enum):
    RMS = "rms"
    LAYER = "layer"


class Cast(enum.Enum):
    HF = "hf"  #: Hugging Face Llama: cast to the output format, then multiply by the weight
    TE = "te"  #: TransformerEngine: multiply in the working format, then cast


class Via(enum.Enum):
    UNIT = "unit"  #: one function unit computes the activation
    EXP_RCP = "exp-rcp"  #: x * rcp(1 + exp(-z)) from an exp and an rcp unit


def function_unit(value: Any, what: str) -> FunctionUnit:
    """A function unit from itself, a preset name or a mapping (``unit_from_dict``); errors
    name ``what``."""
    if isinstance(value, FunctionUnit):
        return value
    if isinstance(value, str):
        try:
            return get_function_unit(value)
        except KeyError as e:
            raise ValueError(f"{what}: {e.args[0]}") from None
    return unit_from_dict(value, what)


def _fmt_or_none(value: Any, what: str) -> FloatFormat | None:
    return None if value is None else check_format(value, what)


def _rq_of(fmt: FloatFormat | None, dtype: torch.dtype) -> Rq:
    from precisim.formats import get_format

    return rq(fmt if fmt is not None else get_format(dtype))


def _rq_exact_of(fmt: FloatFormat | None) -> Rq:
    return rq(fmt if fmt is not None else "fp32")


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float()


@lru_cache(maxsize=64)
def _const(expr: str, r: Rq) -> Fraction:
    """An irrational constant (an mpmath expression) correctly rounded by ``r``."""
    import mpmath

    with mpmath.workprec(300):
        v = eval(expr, {"mp": mpmath})  # noqa: S307 - fixed expressions of this module
        man, exp = int(v.man), int(v.exp)
    vf = Fraction(man << exp) if exp >= 0 else Fraction(man, 1 << -exp)
    lo, hi = r.exact(vf * (1 - Fraction(1, 2**250))), r.exact(vf * (1 + Fraction(1, 2**250)))
    assert lo == hi
    return Fraction(lo)


class SpecBase:
    """Shared ``parse`` / ``to_dict`` of the frozen datapath descriptions (Softmax, Norm,
    Activation here; :class:`~precisim.emulation.flash.AttentionDatapath`): a preset name
    (looked up in the class's :meth:`_registry`) or a mapping of fields, ``base: <preset>``
    plus changes (docs/naming.md); a registered preset serialises as its name."""

    @classmethod
    def parse(cls, value: Any, where: str = "spec") -> Any:
        if isinstance(value, cls):
            return value
        reg = cls._registry()
        if isinstance(value, str):
            return reg.get(value)
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a {reg.kind} name or a mapping of fields "
                             f"(base: <name> plus changes); got {value!r}")
        names = ["base"] + [f.name for f in dataclasses.fields(cls)]
        bad = [k for k in value if k not in names]
        if bad:
            import difflib
            hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(
                str(k), names, n=1)) else "") for k in bad]
            raise ValueError(f"{where}: unknown key(s) {', '.join(hints)}; accepted: "
                             f"{', '.join(names)}")
        fields = {k: v for k, v in value.items() if k != "base"}
        name_f = next(f for f in dataclasses.fields(cls) if f.name == "name")  # type: ignore[arg-type]
        if name_f.default is dataclasses.MISSING and value.get("base") is None:
            fields.setdefault("name", "custom")
        try:
            if value.get("base") is not None:
                base = reg.get(str(value["base"]))
                fields.setdefault("name", f"{base.name}+custom")
                return dataclasses.replace(base, **fields)
            return cls(**fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def _registry(cls) -> Any:
        """The registry of the class's presets (a :class:`~precisim.formats.registry.
        Registry`)."""
        raise NotImplementedError

    @property
    def is_identity(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any] | str:
        """The preset's name for a registered preset, else every field that differs from its
        default."""
        try:
            if self._registry().get(self.name) == self:  # type: ignore[attr-defined]
                return self.name  # type: ignore[attr-defined]
        except KeyError:
            pass
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if f.name == "description":
                continue
            d = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
                else None)
            if isinstance(d, enum.Enum):
                d = d.value
            if isinstance(v, FloatFormat):
                v = v.name
            elif isinstance(v, enum.Enum):
                v = v.value
            elif isinstance(v, FunctionUnit):
                v = v.name if _is_preset(v) else {"name": v.name, **v.to_dict()}
            elif hasattr(v, "to_dict"):  # Reduction, GemmSpec, TensorSpec
                v = v.to_dict()
                d = d.to_dict() if hasattr(d, "to_dict") else d
            if f.name != "name" and (v == d or (isinstance(d, str) and isinstance(v, str)
                                                and v == d)):
                continue
            out[f.name] = v
        return out


class _Spec(SpecBase):
    @classmethod
    def _registry(cls) -> Any:
        from . import presets

        return {"Softmax": presets.SOFTMAXES, "Norm": presets.NORMS,
                "Activation": presets.ACTIVATION_UNITS}[cls.__name__]


def _is_preset(u: FunctionUnit) -> bool:
    from .presets import FUNCTION_UNITS

    try:
        return FUNCTION_UNITS.get(u.name) == u
    except KeyError:
        return False


# ---------------------------------------------------------------------------------------------
# softmax

_MAX32 = Reduction(op="max")

@dataclass(frozen=True)
class Softmax(_Spec):
    """Softmax along the last axis (docs/arithmetic.md section 7.4): ``xq = Q_in(x)``;
    ``m`` = the maximum of x (``max_of="input"``) or of xq; ``d = Q_sub(xq - m)``;
    ``e = exp(d)`` (a function unit); ``s`` = the ``sum`` reduction of e; ``y = Q_out(e / s)``
    (``division="divide"``) or ``Q_out(e * rcp(s))`` (``"reciprocal"``)."""

    name: str = "softmax"
    input_format: FloatFormat | str = "fp32"
    max_of: MaxOf | str = MaxOf.QUANTIZED
    sub_format: FloatFormat | str = "fp32"
    exp: FunctionUnit | str = "exp-exact"
    sum: Reduction | Any = field(default_factory=Reduction)
    division: Division | str = Division.DIVIDE
    rcp: FunctionUnit | str = "rcp-exact"
    output_format: FloatFormat | str | None = None  #: None: the input's dtype
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "input_format", check_format(self.input_format, "input_format"))
        s(self, "sub_format", check_format(self.sub_format, "sub_format"))
        s(self, "output_format", _fmt_or_none(self.output_format, "output_format"))
        s(self, "max_of", parse_enum(MaxOf, self.max_of, "max_of"))
        s(self, "division", parse_enum(Division, self.division, "division"))
        s(self, "exp", function_unit(self.exp, "exp"))
        s(self, "rcp", function_unit(self.rcp, "rcp"))
        s(self, "sum", Reduction.parse(self.sum, "sum"))
        if self.exp.function not in (Fn.EXP,):
            raise ValueError(f"exp={self.exp.name!r} is not valid: its function is "
                             f"{self.exp.function.value!r}; accepted an exp unit")
        if self.rcp.function is not Fn.RCP:
            raise ValueError(f"rcp={self.rcp.name!r} is not valid: its function is "
                             f"{self.rcp.function.value!r}; accepted an rcp unit")

    def describe(self) -> str:
        div = "/" if self.division is Division.DIVIDE else f"* {self.rcp.name}"
        return (f"{self.name}: in {self.input_format.name}, max of {self.max_of.value}, "
                f"sub {self.sub_format.name}, {self.exp.name}, {self.sum.describe()}, {div}, "
                f"out {self.output_format.name if self.output_format else 'dtype'}")

    def __call__(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Softmax of ``x`` along ``dim``, as a float32 tensor of output-format values."""
        xt = x.detach().movedim(dim, -1)
        Qo = _rq_of(self.output_format, x.dtype)
        if self._f32(x.dtype, Qo):
            return self._call32(xt.float()).movedim(-1, dim)
        x64 = xt.double()
        xq = rq(self.input_format).fast(x64)
        m = torch.amax(x64 if self.max_of is MaxOf.INPUT else xq, dim=-1, keepdim=True)
        m = torch.where(m == 0, 0.0, m)  # a zero maximum is +0 (exact.vmax)
        d = rq(self.sub_format).fast(add_ro(xq, -m))
        e = self.exp(d.float()).double()
        s = self.sum.fast(e)[..., None]
        if self.division is Division.DIVIDE:
            y = Qo.fast(div_ro(e, s))
        else:
            y = Qo.fast(e * self.rcp(s.float()).double())
        return y.float().movedim(-1, dim)

    def _f32(self, dtype: torch.dtype, Qo: Rq) -> bool:
        """Whether every rounding outside the units is float32's own (:attr:`Rq.is_f32`):
        then each step is one IEEE 754 float32 operation, which is that rounding of the
        exact result, and :meth:`_call32` computes the softmax in float32 bit for bit."""
        return (dtype in (torch.float32, torch.bfloat16, torch.float16) and Qo.is_f32
                and rq(self.input_format).is_f32 and rq(self.sub_format).is_f32
                and self.division is Division.DIVIDE)

    def _call32(self, x: torch.Tensor) -> torch.Tensor:
        m = _MAX32.fast32(x)[..., None]  # max of x = max of xq (fp32 values)
        d = x - m  # Q_sub(xq - m): one float32 subtraction
        e = self.exp(d)
        s = self.sum.fast32(e)[..., None]
        return e / s  # Q_out(e / s): one float32 division

    @property
    def drop_gap(self) -> float | None:
        """:data:`DROP_GAP` where entries that far below their row's maximum drop out of the
        softmax, else None (:func:`_drop_gap`)."""
        return _drop_gap(self)

    def reference(self, row: Sequence[float]) -> list[Value]:
        """The exact softmax of one row (Python floats)."""
        Qo = _rq_exact_of(self.output_format)
        xs = [_value(v) for v in row]
        xq = [rq(self.input_format).exact(v) for v in xs]
        src = xs if self.max_of is MaxOf.INPUT else xq
        m = src[0]
        for v in src[1:]:
            m = ex.vmax(m, v)
        d = [rq(self.sub_format).exact(ex.add(v, ex.neg(m))) for v in xq]
        e = [self.exp.reference(v) for v in d]
        s = self.sum.reference(e)
        if self.division is Division.DIVIDE:
            return [Qo.exact(ex.div(v, s)) for v in e]
        r = self.rcp.reference(s)
        return [Qo.exact(ex.mul(v, r)) for v in e]


#: see :func:`_drop_gap`
DROP_GAP = 1024.0


@lru_cache(maxsize=64)
def _drop_gap(sm: Softmax) -> float | None:
    """``DROP_GAP`` when every entry ``x <= m - DROP_GAP`` of a row whose maximum is ``m`` (and
    every -inf entry) is a *dropped* entry: its probability is +0, and cutting a trailing run
    of them off the row leaves every other probability unchanged (so an attention may skip the
    last keys where its mask sends them that far down; docs/arithmetic.md section 7.4), else
    None. (Only a trailing run: a zero inside the row moves the pairwise tree's pairs.) It
    holds when

    * the input and subtraction roundings are float32's own (:attr:`Rq.is_f32`): ``xq = x``,
      the maximum is attained by a kept entry (a dropped one is below it), and
      ``d = fl32(x - m) <= -DROP_GAP`` (a rounding is monotonic);
    * the exp unit is monotonic with +0 at ``-DROP_GAP`` and at -inf: a correctly rounded
      exp (method exact, no log2(e) rounding: a rounding of an increasing function, never
      below +0), or the bound model (its correctly rounded exp, whose zeros it keeps), checked
      on the unit itself; so ``e = +0`` for every dropped entry;
    * the sum is a sum: a +0 addend leaves a partial sum unchanged (``Q(acc + 0) = acc``),
      and the pairwise tree of a row with zeros appended is the tree of the row (an odd
      level's carried last element meets a zero), as are the sequential and chunked orders.

    Then ``m``, ``s`` and every kept ``e / s`` (or ``e * rcp(s)``) are those of the cut row."""
    u = sm.exp
    if not (rq(sm.input_format).is_f32 and rq(sm.sub_format).is_f32
            and sm.sum.op.value == "sum"
            and (u.method is Method.BOUND or u.method is Method.EXACT
                 and u.log2e_format is None)):
        return None
    y = u(torch.tensor([-DROP_GAP, -math.inf]))
    return DROP_GAP if bool((y.view(torch.int32) == 0).all()) else None


# ---------------------------------------------------------------------------------------------
# normalisation

@dataclass(frozen=True)
class Norm(_Spec):
    """RMSNorm or LayerNorm along the last axis (docs/arithmetic.md section 7.5), every step
    rounded to ``working_format`` (``Q_w``) unless said otherwise.

    RMS: ``ss = R(Q_w(x_i^2))``, ``v = Q_w(Q_w(ss / n) + eps)``, ``r = rsqrt(v)``,
    ``h_i = Q_w(x_i r)``. Layer: ``mu = Q_w(R(x) / n)``, ``d_i = Q_w(x_i - mu)``,
    ``v = Q_w(Q_w(R(Q_w(d_i^2)) / n) + eps)``, ``h_i = Q_w(d_i rsqrt(v))``. Then the weight
    (and bias): ``cast="hf"``: ``y = Q_o(w Q_o(h))`` (``+ b`` rounded by ``Q_o``), ``"te"``:
    ``y = Q_o(Q_w(h w))`` (``Q_o(Q_w(Q_w(h w) + b))``). R is the ``reduction``; eps is the
    module's (or ``eps``) rounded to the working format."""

    name: str = "rmsnorm"
    kind: NormKind | str = NormKind.RMS
    working_format: FloatFormat | str = "fp32"
    reduction: Reduction | Any = field(default_factory=Reduction)
    rsqrt: FunctionUnit | str = "rsqrt-exact"
    eps: float | None = None  #: None: the module's epsilon
    cast: Cast | str = Cast.HF
    output_format: FloatFormat | str | None = None  #: None: the input's dtype
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "kind", parse_enum(NormKind, self.kind, "kind"))
        s(self, "working_format", check_format(self.working_format, "working_format"))
        s(self, "reduction", Reduction.parse(self.reduction, "reduction"))
        s(self, "rsqrt", function_unit(self.rsqrt, "rsqrt"))
        s(self, "cast", parse_enum(Cast, self.cast, "cast"))
        s(self, "output_format", _fmt_or_none(self.output_format, "output_format"))
        if self.rsqrt.function is not Fn.RSQRT:
            raise ValueError(f"rsqrt={self.rsqrt.name!r} is not valid: its function is "
                             f"{self.rsqrt.function.value!r}; accepted an rsqrt unit")
        if self.reduction.op.value != "sum":
            raise ValueError("reduction: op='max' is not valid for a norm; accepted 'sum'")
        if self.eps is not None and (not isinstance(self.eps, int | float)
                                     or not 0 <= self.eps < 1):
            raise ValueError(f"eps={self.eps!r} is not valid: accepted a number in [0, 1) or "
                             "None (the module's)")

    def describe(self) -> str:
        return (f"{self.name}: {self.kind.value}, work {self.working_format.name}, "
                f"{self.reduction.describe()}, {self.rsqrt.name}, cast {self.cast.value}"
                + (f", eps {self.eps:g}" if self.eps is not None else "")
                + f", out {self.output_format.name if self.output_format else 'dtype'}")

    def __call__(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
        """The norm of ``x`` over its last axis; a float32 tensor of output-format values."""
        Qo = _rq_of(self.output_format, x.dtype)
        if self._f32(x, weight, bias, Qo):
            return self._call32(x, weight, bias, eps)
        W = rq(self.working_format).fast
        x64 = x.detach().double()
        n = float(x64.shape[-1])
        e = float(W(torch.tensor(self.eps if self.eps is not None else eps,
                                 dtype=torch.float64)))
        R = self.reduction.fast
        if self.kind is NormKind.RMS:
            d = x64
        else:
            mu = W(div_ro(R(x64), torch.full_like(x64[..., 0], n)))[..., None]
            d = W(add_ro(x64, -mu))
        ms = W(div_ro(R(W(d * d)), torch.full_like(d[..., 0], n)))
        v = W(add_ro(ms, torch.full_like(ms, e)))
        r = self.rsqrt(v.float()).double()[..., None]
        h = W(d * r)
        w = None if weight is None else weight.detach().double()
        b = None if bias is None else bias.detach().double()
        if self.cast is Cast.HF:
            y = Qo.fast(h)
            if w is not None:
                y = Qo.fast(y * w)
            if b is not None:
                y = Qo.fast(add_ro(y, b.expand_as(y)))
        else:
            y = h
            if w is not None:
                y = W(y * w)
            if b is not None:
                y = W(add_ro(y, b.expand_as(y)))
            y = Qo.fast(y)
        return y.float()

    def _f32(self, *args: Any) -> bool:
        """Whether the working and output roundings are float32's own (:attr:`Rq.is_f32`)
        and every tensor holds float32 values: each step of :meth:`__call__` is then one IEEE
        754 float32 operation, which is that rounding of its exact result, and
        :meth:`_call32` computes the norm in float32 bit for bit."""
        *ts, Qo = args
        return (Qo.is_f32 and rq(self.working_format).is_f32 and all(
            t is None or t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in ts))

    def _call32(self, x: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        x32 = x.detach().float()
        n = float(x32.shape[-1])  # (exact in float32: rows shorter than 2^24)
        e = float(torch.tensor(self.eps if self.eps is not None else eps,
                               dtype=torch.float64).float())
        R = self.reduction.fast32

        def mean(t: torch.Tensor) -> torch.Tensor:  # a true division (a scalar divisor may
            s = R(t)  # be applied as a product with its reciprocal)
            return s / torch.full_like(s, n)

        d = x32 if self.kind is NormKind.RMS else x32 - mean(x32)[..., None]
        v = mean(d * d) + e
        h = d * self.rsqrt(v)[..., None]
        if weight is not None:
            h = h * weight.detach().float()
        if bias is not None:
            h = h + bias.detach().float()
        return h  # (hf and te agree when both roundings are float32's)

    def reference(self, row: Sequence[float], weight: Sequence[float] | None = None,
                  bias: Sequence[float] | None = None, eps: float = 1e-6) -> list[Value]:
        """The exact norm of one row."""
        W = rq(self.working_format).exact
        Qo = _rq_exact_of(self.output_format)
        xs = [_value(v) for v in row]
        n = Fraction(len(xs))
        e = W(Fraction(self.eps if self.eps is not None else eps))
        R = self.reduction.reference
        if self.kind is NormKind.RMS:
            d = xs
        else:
            mu = W(ex.div(R(xs), n))
            d = [W(ex.add(v, ex.neg(mu))) for v in xs]
        ms = W(ex.div(R([W(ex.mul(v, v)) for v in d]), n))
        r = self.rsqrt.reference(W(ex.add(ms, e)))
        h = [W(ex.mul(v, r)) for v in d]
        ws = [_value(v) for v in weight] if weight is not None else None
        bs = [_value(v) for v in bias] if bias is not None else None
        out = []
        for i, hi in enumerate(h):
            if self.cast is Cast.HF:
                y = Qo.exact(hi)
                if ws is not None:
                    y = Qo.exact(ex.mul(y, ws[i]))
                if bs is not None:
                    y = Qo.exact(ex.add(y, bs[i]))
            else:
                y = hi
                if ws is not None:
                    y = W(ex.mul(y, ws[i]))
                if bs is not None:
                    y = W(ex.add(y, bs[i]))
                y = Qo.exact(y)
            out.append(y)
        return out


# ---------------------------------------------------------------------------------------------
# activations

_MP_C1 = "2 * mp.sqrt(2 / mp.pi)"
_MP_C2 = "2 * mp.sqrt(2 / mp.pi) * mp.mpf(44715) / 10**6"
_MP_K = "mp.mpf(1702) / 1000"


@dataclass(frozen=True)
class Activation(_Spec):
    """An activation unit (docs/arithmetic.md section 7.6). ``via="unit"``: ``y = Q_o(u(x))``
    with ``unit`` a function unit of the activation (exact, table, polynomial...).
    ``via="exp-rcp"`` (SiLU and the sigmoid / tanh GELU forms): ``z = x`` (SiLU),
    ``Q_w(k x)`` (k = 1.702 rounded; gelu_sigmoid) or ``Q_w(x Q_w(c1 + Q_w(c2 Q_w(x x))))``
    (c1 = 2 sqrt(2/pi), c2 = c1 0.044715 rounded; gelu_tanh, as tanh(u) = 2 sigmoid(2u) - 1);
    ``y = Q_o(x rcp(Q_w(1 + exp(-z))))``. :meth:`glu` is the SwiGLU / GeGLU product
    ``Q_o(Q_o(act(g)) u)``."""

    name: str = "silu"
    function: Fn | str = Fn.SILU
    via: Via | str = Via.UNIT
    unit: FunctionUnit | str | None = None  #: via unit: None = the exact unit of the function
    exp: FunctionUnit | str = "exp-exact"
    rcp: FunctionUnit | str = "rcp-exact"
    working_format: FloatFormat | str = "fp32"
    output_format: FloatFormat | str | None = None  #: None: the input's dtype
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        s = object.__setattr__
        fn = parse_enum(Fn, self.function, "function")
        if not fn.activation:
            raise ValueError(f"function={fn.value!r} is not valid: accepted silu, gelu, "
                             "gelu_tanh, gelu_sigmoid")
        s(self, "function", fn)
        s(self, "via", parse_enum(Via, self.via, "via"))
        s(self, "working_format", check_format(self.working_format, "working_format"))
        s(self, "output_format", _fmt_or_none(self.output_format, "output_format"))
        s(self, "exp", function_unit(self.exp, "exp"))
        s(self, "rcp", function_unit(self.rcp, "rcp"))
        if self.via is Via.UNIT:
            u = self.unit if self.unit is not None else FunctionUnit(
                f"{fn.value.replace('_', '-')}-exact", fn)
            u = function_unit(u, "unit")
            if u.function is not fn:
                raise ValueError(f"unit={u.name!r} is not valid: it computes "
                                 f"{u.function.value!r}, not {fn.value!r}")
            s(self, "unit", u)
        else:
            if fn is Fn.GELU:
                raise ValueError("via='exp-rcp' is not valid for function 'gelu' (the erf "
                                 "form); accepted silu, gelu_tanh, gelu_sigmoid")
            if self.exp.function is not Fn.EXP or self.rcp.function is not Fn.RCP:
                raise ValueError(f"exp={self.exp.name!r} / rcp={self.rcp.name!r}: accepted an "
                                 "exp unit and an rcp unit")

    def describe(self) -> str:
        core = self.unit.name if self.via is Via.UNIT else (  # type: ignore[union-attr]
            f"x * {self.rcp.name}(1 + {self.exp.name}(-z)), work {self.working_format.name}")
        return (f"{self.name}: {self.function.value} via {core}, "
                f"out {self.output_format.name if self.output_format else 'dtype'}")

    def _consts(self) -> tuple[float, float, float]:
        r = rq(self.working_format)
        return (float(_const(_MP_C1, r)), float(_const(_MP_C2, r)), float(_const(_MP_K, r)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The activation of every element of ``x``; float32 tensor of output-format values."""
        Qo = _rq_of(self.output_format, x.dtype)
        xd = x.detach()
        if self.via is Via.UNIT:
            y = self.unit(xd)  # type: ignore[misc]
            return y if Qo.is_f32 else Qo.fast(y.double()).float()
        W = rq(self.working_format).fast
        x64 = xd.double()
        c1, c2, k = self._consts()
        fn = self.function
        if fn is Fn.SILU:
            z = x64
        elif fn is Fn.GELU_SIGMOID:
            z = W(x64 * k)
        else:
            z = W(x64 * W(add_ro(torch.full_like(x64, c1), c2 * W(x64 * x64))))
        e = self.exp((-z).float()).double()
        d = W(add_ro(torch.ones_like(e), e))
        r = self.rcp(d.float()).double()
        return Qo.fast(x64 * r).float()

    def glu(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``Q_o(Q_o(act(g)) * u)`` (SwiGLU with SiLU)."""
        Qo = _rq_of(self.output_format, g.dtype)
        if Qo.is_f32 and u.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return self(g) * u.detach().float()  # one float32 product: Q_o of the exact one
        return Qo.fast(self(g).double() * u.detach().double()).float()

    def reference(self, x: float) -> Value:
        """The exact activation of one value."""
        Qo = _rq_exact_of(self.output_format)
        xv = _value(x)
        if self.via is Via.UNIT:
            return Qo.exact(self.unit.reference(xv))  # type: ignore[union-attr]
        W = rq(self.working_format).exact
        wr = rq(self.working_format)
        c1, c2, k = (_const(e, wr) for e in (_MP_C1, _MP_C2, _MP_K))
        fn = self.function
        if fn is Fn.SILU:
            z = xv
        elif fn is Fn.GELU_SIGMOID:
            z = W(ex.mul(xv, k))
        else:
            z = W(ex.mul(xv, W(ex.add(c1, ex.mul(c2, W(ex.mul(xv, xv)))))))
        e = self.exp.reference(ex.neg(z))
        d = W(ex.add(Fraction(1), e))
        return Qo.exact(ex.mul(xv, self.rcp.reference(d)))

    def glu_reference(self, g: float, u: float) -> Value:
        Qo = _rq_exact_of(self.output_format)
        return Qo.exact(ex.mul(Qo.exact(self.reference(g)), _value(u)))


# ---------------------------------------------------------------------------------------------
# presets (docs/arithmetic.md section 7.7)

def _datapath_presets() -> None:
    from .presets import ACTIVATION_UNITS, NORMS, SOFTMAXES

    seq = {"order": "sequential"}
    for sm in (
        Softmax("softmax-exact", description="every step correctly rounded in fp32, "
                "pairwise sum"),
        Softmax("softmax-bf16", input_format="bf16", sub_format="bf16", exp="exp-mx-bf16",
                sum={"format": "bf16", **seq}, output_format="bf16",
                description="every vector op in bfloat16 (microxcaling's softmax with "
                "vec_use_exp2), sequential bf16 sum, division"),
        Softmax("softmax-poly3-rcp", exp="exp-poly3", sum={"order": "chunked", "chunk": 32},
                division="reciprocal", rcp="rcp-newton1",
                description="exp from a degree-3 polynomial on FMA units, warp-style fp32 sum "
                "(chunks of 32, then a tree), reciprocal from a seed table + 1 Newton step"),
        Softmax("softmax-lut16", exp="exp-lut16", description="exp from a 16-entry table "
                "with linear interpolation, otherwise fp32"),
    ):
        SOFTMAXES.register(sm.name, sm)
    for nm in (
        Norm("rmsnorm", description="RMSNorm, every step correctly rounded in fp32, pairwise "
             "sum of squares, Hugging Face cast order"),
        Norm("rmsnorm-te", cast="te", description="RMSNorm in fp32, TransformerEngine cast "
             "order (weight multiplied in fp32, then cast)"),
        Norm("rmsnorm-bf16-seq", working_format="bf16", reduction={"format": "bf16", **seq},
             description="RMSNorm with every step in bfloat16 and a sequential bf16 sum of "
             "squares (tl.sum over a bf16 tensor)"),
        Norm("rmsnorm-warp-newton", reduction={"order": "chunked", "chunk": 32},
             rsqrt="rsqrt-newton1", description="RMSNorm, fp32 warp-style sum (chunks of 32 "
             "then a tree), rsqrt from a 128-entry seed table + 1 Newton step"),
        Norm("layernorm", kind="layer", description="LayerNorm, every step correctly "
             "rounded in fp32, pairwise sums"),
    ):
        NORMS.register(nm.name, nm)
    for a in (
        Activation("silu", description="SiLU correctly rounded"),
        Activation("silu-sfu", via="exp-rcp", description="SiLU as x * rcp(1 + exp(-x)) "
                   "with correctly rounded fp32 exp and rcp units"),
        Activation("silu-sfu-fast", via="exp-rcp", exp="expf-fast-bound", rcp="rcp-newton1",
                   description="SiLU from the __expf bound model and a 1-step Newton rcp"),
        Activation("silu-table64", unit="silu-lut64", description="SiLU from a 64-entry "
                   "table on [-8, 8) with linear interpolation"),
        Activation("silu-table16", unit="silu-lut16", description="SiLU from a 16-entry "
                   "table on [-8, 8) with linear interpolation"),
        Activation("gelu", function="gelu", description="GELU (erf form) correctly rounded"),
        Activation("gelu-tanh", function="gelu_tanh", description="GELU (tanh form) "
                   "correctly rounded"),
        Activation("gelu-tanh-sfu", function="gelu_tanh", via="exp-rcp",
                   description="GELU tanh form as x * sigmoid(2u) from exp and rcp units"),
        Activation("gelu-table64", function="gelu", unit="gelu-lut64",
                   description="GELU (erf) from a 64-entry table with linear interpolation"),
    ):
        ACTIVATION_UNITS.register(a.name, a)


_datapath_presets()
