"""The op kinds ``glu`` and ``residual`` (docs/arithmetic.md section 7.9): the gated product
``act(gate) * up`` of every gated MLP and the residual adds of every decoder layer, each
computed exactly and rounded once by a :class:`Rounded` spec (a format, a rounding, an
overflow policy, flush-to-zero), as hardware that rounds these results does.

Both are opt-in (planned only where a recipe or a rule names them), so a recipe without these
keys plans and runs exactly as before. Modules are recognised by behaviour, never by class
name:

* ``glu``: a module with one activation child (:func:`~precisim.emulation.datapath_ops.
  activation_of`) and linear children whose forward, on a probe input, feeds the activation
  with one linear's output and another linear (the down projection) with the product of the
  activation's output and a third linear's output (the up projection), bit for bit;
* ``residual``: a module with a child that dispatches through transformers' attention
  interface and a norm child (a decoder layer); at run time, an add made by the module's own
  forward whose operands are its input (or an earlier emulated residual sum) and the output
  of one of its children is a residual add.

The product is ``Q(a u)`` with ``a`` the activation module's output (emulated if the recipe
also sets ``activation``) and ``u`` the up projection's output; the residual add is
``Q(r + h)``. Both are exact in float64 before the one rounding (the product of two values of
at most 24 bits is exact; the sum is rounded to odd, :func:`~precisim.emulation.functions.
core.add_ro`), so the result is correctly rounded; it is held in the model's dtype afterwards.
Telemetry (role ``output``) compares the exact result with the rounded one: ``saturated``
(beyond the format's range) and ``flushed`` (non-zero, became zero).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from precisim.formats import FloatFormat, Overflow, Rounding, kernels
from precisim.formats.events import plain_events
from precisim.formats.kernels import KernelParams, round_bits
from precisim.formats.quantize import MAX_SR_BITS
from torch import nn

from .datapath_ops import needs_grad, with_own_backward
from .functions import exact as ex
from .functions.core import Rq, Value, add_ro, check_format, default_overflow, parse_enum
from .modes import ScopedMode, scope_mode
from .opkinds import EmulationError, dispatches_attention, is_linear
from .specs import RecipeError, check_keys
from .telemetry import count_events, count_op_events, event_bound, plain_counts

if TYPE_CHECKING:
    from .opkinds import Installer
    from .patch import PlanEntry

__all__ = ["GluRoles", "Rounded", "glu_roles", "install_glu", "install_residual", "is_glu",
           "is_residual_block"]


# ---------------------------------------------------------------------------------------------
# the spec

@dataclass(frozen=True)
class Rounded:
    """One rounding of an exact result (docs/arithmetic.md section 7.9): ``format`` (a float
    format name), ``rounding`` (rne, rna, rtz, ru, rd, rto), ``overflow`` (None: inf where the
    format has it, else saturate; ``saturate``; ``nan``) and ``flush`` (results below the
    smallest normal become zero). In a recipe: a format name or a mapping of these fields."""

    format: FloatFormat | str
    rounding: Rounding | str = Rounding.NEAREST_EVEN
    overflow: Overflow | str | None = None
    flush: bool = False
    rq: Rq = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s = object.__setattr__
        try:
            fmt = check_format(self.format, "format")
            rnd = parse_enum(Rounding, self.rounding, "rounding")
            ovf = default_overflow(fmt) if self.overflow is None else parse_enum(
                Overflow, self.overflow, "overflow")
            if not isinstance(self.flush, bool):
                raise ValueError(f"flush={self.flush!r} is not valid: accepted true or false")
            s(self, "rq", Rq(fmt, rnd, ovf, self.flush))
        except (ValueError, KeyError) as e:
            raise RecipeError(f"rounded result {self.format!r}: {e}") from None
        s(self, "format", fmt)
        s(self, "rounding", rnd)
        s(self, "overflow", ovf)

    @classmethod
    def parse(cls, value: Any, where: str = "spec") -> Rounded | None:
        """A spec from a format name, a mapping of fields, a spec or None (not emulated)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value)
            except RecipeError as e:
                raise RecipeError(f"{where}: {e}") from None
        if isinstance(value, Mapping):
            check_keys(value, ("format", "rounding", "overflow", "flush"), where)
            if "format" not in value:
                raise RecipeError(f"{where}: a rounded result needs a 'format'")
            try:
                return cls(**dict(value))
            except RecipeError as e:
                raise RecipeError(f"{where}: {e}") from None
        raise RecipeError(f"{where}: expected a format name, a mapping (format, rounding, "
                          f"overflow, flush) or null, got {type(value).__name__} {value!r}")

    @property
    def is_identity(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any] | str:
        d: dict[str, Any] = {"format": self.format.name}  # type: ignore[union-attr]
        if self.rounding is not Rounding.NEAREST_EVEN:
            d["rounding"] = self.rounding.value  # type: ignore[union-attr]
        if self.overflow is not default_overflow(self.format):  # type: ignore[arg-type]
            d["overflow"] = self.overflow.value  # type: ignore[union-attr]
        if self.flush:
            d["flush"] = True
        return d["format"] if len(d) == 1 else d

    def describe(self) -> str:
        return self.rq.describe()

    # -- the arithmetic ------------------------------------------------------------------
    def add(self, a: torch.Tensor, b: torch.Tensor,
            exact: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``Q(a + b)`` of two float tensors of at most 24-bit values (float32 result).
        ``exact``: see :meth:`mul`."""
        return self._run("add", a, b, exact)

    def mul(self, a: torch.Tensor, b: torch.Tensor,
            exact: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``Q(a b)`` of two float tensors of at most 24-bit values (float32 result).
        ``exact`` (a list): where the rounding goes through the exact result rounded to odd
        at float32, that tensor is appended; it compares with zero and with the format's
        overflow threshold as the exact result does (its 24 bits are two more than the
        format's), so telemetry counts its events from it (section 3.6)."""
        return self._run("mul", a, b, exact)

    def _run(self, op: str, a: torch.Tensor, b: torch.Tensor,
             exact: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The exact result rounded to odd in float64 (one compiled kernel for large operands,
        :func:`precisim.formats.kernels.run`), then rounded by the spec. For a format of at
        most 22 bits of precision whose smallest subnormal is at least 2^-147, the exact value
        is first rounded to odd at float32 (:func:`_rto32`; two or more bits finer than the
        format everywhere, so the result is unchanged, Boldo and Melquiond 2008) and rounded
        to the format in the same kernel (:func:`_fused`; with an ``exact`` list the float32
        value is written out and :func:`precisim.formats.quantize` rounds it); otherwise
        :meth:`Rq.fast` rounds the float64 value."""
        a, b = torch.broadcast_tensors(a.detach(), b.detach())
        f = self.format
        if f.man_bits + 1 <= 22 and f.min_subnormal >= 2.0 ** -147:  # type: ignore[union-attr]
            from precisim.formats import quantize

            shape, n = a.shape, a.numel()
            a, b = a.reshape(-1), b.reshape(-1)  # one compiled kernel for every shape
            fast_mul = op == "mul"  # float32 arithmetic unless an operand is outside its range
            if exact is None or isinstance(exact, _Counted):
                # the round to odd and the rounding in one kernel (and the counts of a
                # _Counted): no float32 intermediate written out (a mul whose float32 error
                # may not be exact goes the two-kernel way, with the float64 product)
                counted = exact is not None
                args = (a, b, event_bound(f, torch.float32, a.device)) if counted else (a, b)
                y, *more = kernels.run(_fused(op, self.rq, counted),
                                       ("rounded-fused", op, self.rq, counted), n, *args)
                if not (fast_mul and more[-1]):
                    if counted:
                        exact.sums = more[0]  # type: ignore[union-attr]
                    return y.reshape(shape)
                fast_mul = False
            s32 = None
            if fast_mul:
                s32, unsafe = kernels.run(_mul_rto32_fast, ("rounded-mul-rto32-f32",), n, a, b)
                s32 = None if unsafe else s32
            if s32 is None:
                s32 = kernels.run(_RTO32[op], (f"rounded-{op}-rto32",), n, a, b)
            s32 = s32.reshape(shape)
            if exact is not None:
                exact.append(s32)  # (a _Counted takes its counts from this value)
            return quantize(s32, f, self.rounding, self.overflow,  # type: ignore[arg-type]
                            flush_output=self.flush)
        return kernels.run(_kernel(op, self.rq), (f"rounded-{op}", self.rq), a.numel(), a,
                           b).float()

    def add_reference(self, a: float, b: float) -> Value:
        """The exact ``Q(a + b)`` of two floats (Fractions; signed zeros and infinities as
        IEEE 754)."""
        return self.rq.exact(ex.add(ex.value(a), ex.value(b)))

    def mul_reference(self, a: float, b: float) -> Value:
        """The exact ``Q(a b)`` of two floats (Fractions; signed zeros and infinities as
        IEEE 754)."""
        return self.rq.exact(ex.mul(ex.value(a), ex.value(b)))


def _exact_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` rounded to odd at 53 bits, in float64 (its comparisons with zero and with
    any float64 value of at most 52 bits are those of the exact sum)."""
    return add_ro(a.double(), b.double())


def _exact_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact ``a b`` of two float tensors of at most 24-bit values, in float64."""
    return a.double() * b.double()


_EXACT = {"add": _exact_add, "mul": _exact_mul}


_F32_MAX = torch.finfo(torch.float32).max


def _rto32(s: torch.Tensor, err: torch.Tensor, a: torch.Tensor,
           b: torch.Tensor) -> torch.Tensor:
    """The exact ``s + err`` rounded to odd at float32, from ``s`` (float32, its rounding to
    nearest even) and ``err`` (any float tensor whose sign is that of the exact error; 0 where
    ``s`` is exact), for finite or non-finite operands ``a`` and ``b``. A finite result beyond
    float32's range becomes its largest value (whose last bit is odd). Float arithmetic only
    (no int32 view: inductor copies int32 vectors through the stack): ``n``, the float32
    neighbour of ``s`` towards the exact value, and ``s`` bracket it; the even one of the two is
    ``fl((s + n) / 2)`` (a tie, rounded to even; from magnitude 2^126 on as ``s / 2 + n / 2``,
    whose halves are exact there and whose sum cannot overflow as ``s + n`` would), and the
    result is the odd one."""
    # |s| == inf, not isinf(s): inductor vectorizes the comparison, not isinf
    s = torch.where((s.abs() == float("inf")) & torch.isfinite(a) & torch.isfinite(b),
                    torch.copysign(torch.full_like(s, _F32_MAX), s), s)
    n = torch.nextafter(s, torch.where(err > 0, float("inf"), float("-inf")))
    even = torch.where(s.abs() >= 2.0 ** 126, s * 0.5 + n * 0.5, (s + n) * 0.5)
    fix = (err != 0) & torch.isfinite(s) & (even == s)
    return torch.where(fix, n, s)


def _add_rto32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` rounded to odd at float32: the float32 sum and its exact error (Knuth's
    TwoSum, exact without overflow; a float32 sum in the subnormal range is exact)."""
    a, b = a.float(), b.float()
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    return _rto32(s, err, a, b)


_SPLIT = 4097.0  # 2^12 + 1: Veltkamp's split of a float32 into two 12-bit halves
# Dekker's product error is exact in float32 for operands and products in these ranges (no
# overflow in the split, every partial product a multiple of 2^-149)
_SAFE_MIN, _SAFE_MAX, _SAFE_PROD = 2.0 ** -100, 2.0 ** 100, 2.0 ** -96


def _mul_rto32_fast(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a b`` rounded to odd at float32 in float32 arithmetic (Dekker's TwoProduct with
    Veltkamp's split; Dekker 1971), and whether any finite non-zero operand pair lies outside
    the ranges where that error is exact (then :func:`_mul_rto32` computes the call)."""
    a, b = a.float(), b.float()
    p = a * b
    t = a * _SPLIT
    ah = t - (t - a)
    al = a - ah
    t = b * _SPLIT
    bh = t - (t - b)
    bl = b - bh
    err = (((ah * bh - p) + ah * bl) + al * bh) + al * bl
    ma, mb, mp = a.abs(), b.abs(), p.abs()
    live = (ma != 0) & (mb != 0) & (ma < float("inf")) & (mb < float("inf"))
    unsafe = live & ((ma < _SAFE_MIN) | (mb < _SAFE_MIN) | (ma >= _SAFE_MAX)
                     | (mb >= _SAFE_MAX) | (mp < _SAFE_PROD) | (mp >= 2.0 ** 120))
    return _rto32(p, err, a, b), unsafe.any()


def _mul_rto32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a b`` rounded to odd at float32: the exact float64 product against its rounding."""
    p = a.double() * b.double()
    s = p.float()
    return _rto32(s, p - s.double(), a, b)


_RTO32 = {"add": _add_rto32, "mul": _mul_rto32}


class _Counted(list):
    """The ``exact`` argument of :meth:`Rounded.add` / :meth:`Rounded.mul` when only the
    telemetry counts are wanted: ``sums`` receives ``[flushed, nonfinite, saturated]`` of the
    exact result (:func:`precisim.formats.events.plain_events` of its round to odd at
    float32), computed in the rounding's own kernel; where the rounding goes another way the
    list receives the exact value as a plain ``exact`` list does."""

    sums: torch.Tensor | None = None


@lru_cache(maxsize=64)
def _fused(op: str, r: Rq, counted: bool):  # noqa: ANN202 - a closure over the rounding
    """The kernel of :meth:`Rounded._run` for formats of at most 22 bits: the round to odd
    at float32 (:func:`_add_rto32`, :func:`_mul_rto32_fast`) and the format's rounding of its
    bits (:func:`precisim.formats.kernels.round_bits`, as :func:`precisim.formats.quantize`
    rounds them) in one pass, the float32 value never written out; with ``counted``, also
    the events of the rounding against that value (:func:`plain_events`, as
    :func:`~precisim.emulation.telemetry.count_events` counts them; ``bound`` its third
    argument); a mul also returns whether an operand pair was outside the fast product's
    exact range."""
    p = KernelParams.of(r.fmt)

    def run(a: torch.Tensor, b: torch.Tensor, bound: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, ...]:
        """(y, [sums with ``counted``], [unsafe for a mul])"""
        if op == "add":
            s, more = _add_rto32(a, b), ()
        else:
            s, unsafe = _mul_rto32_fast(a, b)
            more = (unsafe,)
        y = round_bits(s.view(torch.int32), None, p, r.rounding, r.overflow, 0, r.flush,
                       None, MAX_SR_BITS).view(torch.float32)
        return (y, plain_events(s, y, bound), *more) if counted else (y, *more)

    return run


@lru_cache(maxsize=64)
def _kernel(op: str, r: Rq):  # noqa: ANN202 - a closure over the rounding
    def run(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return r.fast(_EXACT[op](a, b))
    return run


def _rounded(installer: Installer, name: str, spec: Rounded, op: str, a: torch.Tensor,
             b: torch.Tensor) -> torch.Tensor:
    """``y = Q(a op b)`` by ``spec``, and under telemetry its counts against the exact
    ``a op b``: from the rounding's own round to odd at float32 where it made one (see
    :meth:`Rounded.mul`), else from the float64 value computed inside the counting kernel."""
    tel = installer.emulation.telemetry
    exact: _Counted | None = None if tel is None else _Counted()
    y = spec._run(op, a, b, exact)
    if tel is None:
        return y
    if exact is not None and exact.sums is not None:
        counts = plain_counts(y.numel(), exact.sums)
    elif exact:
        counts = count_events(exact[0], y, spec.format)  # type: ignore[arg-type]
    else:
        a, b = torch.broadcast_tensors(a.detach(), b.detach())
        counts = count_op_events(_EXACT[op], f"rounded-{op}", a, b, y,
                                 spec.format)  # type: ignore[arg-type]
    tel.add(name, "output", counts)
    return y


# ---------------------------------------------------------------------------------------------
# glu: recognition

@dataclass(frozen=True)
class GluRoles:
    """The children of a gated MLP: ``act`` (the activation), ``gate``, ``up``, ``down``."""

    act: str
    gate: str
    up: str
    down: str


_ROLES: weakref.WeakKeyDictionary[nn.Module, GluRoles | None] = weakref.WeakKeyDictionary()


def _in_features(m: nn.Module) -> int:
    w = m.weight
    return int(w.shape[1] if isinstance(m, nn.Linear) else w.shape[0])


def glu_roles(m: nn.Module) -> GluRoles | None:
    """The roles of ``m``'s children if ``m`` computes ``down(act(gate(x)) * up(x))`` on a
    probe input (bit for bit), else None (cached per module)."""
    if m in _ROLES:
        return _ROLES[m]
    _ROLES[m] = roles = _probe_glu(m)
    return roles


def _probe_glu(m: nn.Module) -> GluRoles | None:
    from .datapath_ops import activation_of

    if m._parameters or next(m.children(), None) is None:
        return None
    kids = dict(m.named_children())
    acts = [n for n, c in kids.items() if activation_of(c) is not None]
    lins = {n: c for n, c in kids.items() if is_linear(c)}
    if len(acts) != 1 or len(lins) < 3:
        return None
    w0 = next(iter(lins.values())).weight
    if w0.device.type == "meta" or not w0.is_floating_point():
        return None
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for n in [acts[0], *lins]:
        def hook(mod: nn.Module, args: tuple, out: Any, n: str = n) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                seen[n] = (args[0], out)
        handles.append(kids[n].register_forward_hook(hook))
    try:
        for d in sorted({_in_features(c) for c in lins.values()}):
            seen.clear()
            x = torch.randn(3, d, generator=torch.Generator().manual_seed(0)).to(w0)
            try:
                with torch.no_grad():
                    type(m).forward(m, x)
            except Exception:  # noqa: BLE001 - not this input width (or not an MLP)
                continue
            roles = _roles_from(seen, acts[0], list(lins))
            if roles is not None:
                return roles
    finally:
        for h in handles:
            h.remove()
    return None


def _roles_from(seen: dict[str, tuple[torch.Tensor, torch.Tensor]], act: str,
                lins: list[str]) -> GluRoles | None:
    if act not in seen:
        return None
    a_in, a_out = seen[act]
    gate = next((n for n in lins if n in seen and seen[n][1] is a_in), None)
    if gate is None:
        return None
    for down in lins:
        for up in lins:
            if len({gate, up, down}) < 3 or down not in seen or up not in seen:
                continue
            d_in, u_out = seen[down][0], seen[up][1]
            if d_in.shape == a_out.shape == u_out.shape and torch.equal(d_in, a_out * u_out):
                return GluRoles(act, gate, up, down)
    return None


def is_glu(name: str, m: nn.Module, model: nn.Module) -> bool:
    return glu_roles(m) is not None


# ---------------------------------------------------------------------------------------------
# glu: install

def install_glu(installer: Installer, entries: Sequence[PlanEntry]) -> None:
    """Forward hooks keep the activation's and the up projection's outputs of each gated MLP;
    a pre-hook on its down projection replaces the model's product by ``Q(a u)``."""
    for e in entries:
        m = installer.modules[e.module]
        roles = glu_roles(m)
        if roles is None:  # pragma: no cover - the plan matched it
            raise EmulationError(f"{e.module}: not a gated MLP (down(act(gate(x)) * up(x)))")
        kids = dict(m.named_children())
        kept: dict[str, torch.Tensor] = {}

        def keep(key: str, kept: dict[str, torch.Tensor]):  # noqa: ANN202
            def hook(mod: nn.Module, args: tuple, out: Any) -> None:
                kept[key] = out
            return hook

        def pre(mod: nn.Module, args: tuple, spec: Rounded = e.spec, name: str = e.module,
                kept: dict[str, torch.Tensor] = kept) -> tuple | None:
            a, u = kept.pop("a", None), kept.pop("u", None)
            p = args[0] if args else None
            if a is None or u is None or not isinstance(p, torch.Tensor) \
                    or p.shape != torch.broadcast_shapes(a.shape, u.shape):
                raise EmulationError(f"{name}: the down projection's input is not the product "
                                     "of the activation's and the up projection's outputs of "
                                     "this call; the glu op kind cannot emulate it")
            y = _rounded(installer, name, spec, "mul", a, u)
            # training: the backward is the model's own product's (docs/training.md 1c)
            return (with_own_backward(y.to(p.dtype), p if needs_grad(p) else None, name,
                                       "glu"), *args[1:])

        for key, child in (("a", roles.act), ("u", roles.up)):
            installer.on_restore(kids[child].register_forward_hook(keep(key, kept)).remove)
        installer.on_restore(kids[roles.down].register_forward_pre_hook(pre).remove)


# ---------------------------------------------------------------------------------------------
# residual

def is_residual_block(name: str, m: nn.Module, model: nn.Module) -> bool:
    """A module with a child that dispatches through transformers' attention interface and a
    norm child (a decoder layer)."""
    from .datapath_ops import norm_kind_of

    kids = list(m.children())
    return any(dispatches_attention(c) for c in kids) \
        and any(norm_kind_of(c) is not None for c in kids)


_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_IN_PLACE = {torch.Tensor.add_, torch.Tensor.__iadd__}


class _ResidualMode(ScopedMode):
    """Active during one forward of a decoder layer, off torch's stack while its children run
    (only the layer's own code makes residual adds; :func:`~precisim.emulation.modes.
    scope_mode`): emulates the adds of a stream tensor (the layer's input or an emulated
    residual sum) and a child's output."""

    def __init__(self, installer: Installer, name: str, spec: Rounded, x: Any):
        super().__init__()
        self.installer, self.name, self.spec = installer, name, spec
        self.stream: list[torch.Tensor] = [x] if isinstance(x, torch.Tensor) else []
        self.outs: list[torch.Tensor] = []
        self.adds = 0

    def child_output(self, out: Any) -> None:
        t = out[0] if isinstance(out, tuple | list) and out else out
        if isinstance(t, torch.Tensor):
            self.outs.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if (func not in _ADDS and func not in _IN_PLACE) or len(args) != 2 or kwargs:
            return func(*args, **kwargs)
        a, b = args
        is_s = [any(t is s for s in self.stream) for t in (a, b)]
        is_o = [any(t is o for o in self.outs) for t in (a, b)]
        if not ((is_s[0] and is_o[1]) or (is_o[0] and is_s[1])) \
                or not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) \
                or not a.is_floating_point() or a.dtype != b.dtype or a.shape != b.shape:
            return func(*args, **kwargs)
        y = _rounded(self.installer, self.name, self.spec, "add", a, b)
        # training: the backward is the model's own add's (docs/training.md section 1c)
        grad = needs_grad(a, b)
        if func in _IN_PLACE:  # r += h: the sum is written into r (a stream tensor already)
            if grad:  # the own add in autograd's graph, then its value replaced
                func(a, b).register_hook(_noting(self.name))
            with torch.no_grad():
                out = a.copy_(y)
        else:
            out = with_own_backward(y.to(a.dtype), func(a, b) if grad else None, self.name,
                                     "residual")
        self.stream.append(out)
        self.adds += 1
        return out


def _noting(name: str):  # noqa: ANN202 - a gradient hook
    def hook(g: torch.Tensor) -> None:
        from .training.autograd import GRAD_PROBES

        for p in GRAD_PROBES:
            p.note_straight_through(name, "residual")
    return hook


def install_residual(installer: Installer, entries: Sequence[PlanEntry]) -> None:
    """Each decoder layer's forward runs under a :class:`_ResidualMode`, off the stack while
    its children run (they record their outputs). A layer whose forward makes no residual
    add raises :class:`EmulationError`."""
    for e in entries:
        def enter(args: tuple, kwargs: dict, name: str = e.module,
                  spec: Rounded = e.spec) -> _ResidualMode:
            x = args[0] if args else kwargs.get("hidden_states")
            return _ResidualMode(installer, name, spec, x)

        def left(mode: ScopedMode, name: str = e.module) -> None:
            if isinstance(mode, _ResidualMode) and mode.adds == 0:
                raise EmulationError(f"{name}: its forward made no residual add (its input "
                                     "plus a sub-module's output); the residual op kind "
                                     "cannot emulate it")

        scope_mode(installer, installer.modules[e.module], enter, left)
