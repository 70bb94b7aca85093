"""The op kinds ``softmax``, ``normalization`` and ``activation`` (docs/arithmetic.md section
7.8, docs/extending.md): the softmax inside each attention function, every RMSNorm/LayerNorm
and every activation module run through the emulated units of
:mod:`precisim.emulation.functions`.

All three are opt-in (planned only where a recipe or a rule names them), so a recipe without
these keys plans and runs exactly as before. They change a model only through the
:class:`~precisim.emulation.opkinds.Installer`: norms and activations get an instance
``forward`` (deleted at restore), attention modules a forward pre-hook and post-hook that
enter and leave a :class:`~torch.overrides.TorchFunctionMode` replacing the softmax calls
made during their forward, off torch's stack while their linear projections run
(:func:`~precisim.emulation.modes.scope_mode`). Telemetry (role ``output``) compares each
emulated output with the module's own output: ``saturated`` (the own value beyond the output
format's range) and ``flushed`` (a non-zero own value that became zero).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .functions import Activation, Fn, Norm, NormKind, Softmax
from .modes import ScopedMode, scope_mode
from .opkinds import EmulationError, dispatches_attention, is_linear
from .telemetry import count_events

if TYPE_CHECKING:
    from .opkinds import Installer
    from .patch import PlanEntry

__all__ = ["activation_of", "emulated_softmax", "install_activation", "install_normalization",
           "needs_grad", "with_own_backward",
           "install_softmax", "is_activation", "is_norm", "norm_kind_of"]

_PROBE = torch.linspace(-6.0, 6.0, 97)


# ---------------------------------------------------------------------------------------------
# recognition (by behaviour, never by class name)

def norm_kind_of(m: nn.Module) -> NormKind | None:
    """RMS or LAYER for a leaf module with a 1-D weight and a float epsilon whose forward
    matches the exact RMSNorm / LayerNorm of its input (probe rows, rtol 1e-4), else None."""
    w = getattr(m, "weight", None)
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or not isinstance(eps, float) \
            or next(m.children(), None) is not None or not w.is_floating_point():
        return None
    b = getattr(m, "bias", None)
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    with torch.no_grad():
        try:
            y = type(m).forward(m, x.to(w)).float()
        except Exception:  # noqa: BLE001 - not a norm of this shape
            return None
        wf = w.detach().float()
        bf = b.detach().float() if isinstance(b, torch.Tensor) else None
        cands = {NormKind.RMS: torch.nn.functional.rms_norm(x, (w.shape[0],), wf, eps=eps),
                 NormKind.LAYER: torch.nn.functional.layer_norm(x, (w.shape[0],), wf, bf,
                                                                eps=eps)}
    if bf is not None:
        cands.pop(NormKind.RMS)
    for kind, ref in cands.items():
        if y.shape == ref.shape and torch.allclose(y, ref, rtol=1e-4, atol=1e-5):
            return kind
    return None


def is_norm(name: str, m: nn.Module, model: nn.Module) -> bool:
    return norm_kind_of(m) is not None


_ACTS = {
    Fn.SILU: torch.nn.functional.silu,
    Fn.GELU: lambda x: torch.nn.functional.gelu(x),
    Fn.GELU_TANH: lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    Fn.GELU_SIGMOID: lambda x: x * torch.sigmoid(1.702 * x),
}


def activation_of(m: nn.Module) -> Fn | None:
    """The activation a parameter-free leaf module computes (SiLU, GELU erf / tanh /
    sigmoid forms), recognised on a probe vector (atol 1e-5), else None."""
    if next(m.children(), None) is not None or next(m.parameters(), None) is not None \
            or isinstance(m, nn.Dropout | nn.Identity):
        return None
    try:
        with torch.no_grad():
            y = m(_PROBE.clone())
    except Exception:  # noqa: BLE001 - not an elementwise module
        return None
    if not isinstance(y, torch.Tensor) or y.shape != _PROBE.shape:
        return None
    for fn, f in _ACTS.items():
        if torch.allclose(y.float(), f(_PROBE), rtol=0, atol=1e-5):
            return fn
    return None


def is_activation(name: str, m: nn.Module, model: nn.Module) -> bool:
    return activation_of(m) is not None


def is_attention(name: str, m: nn.Module, model: nn.Module) -> bool:
    return dispatches_attention(m)


# ---------------------------------------------------------------------------------------------
# telemetry

def _count(installer: Installer, name: str, own: torch.Tensor, y: torch.Tensor,
           dtype: torch.dtype, spec_fmt: Any) -> None:
    tel = installer.emulation.telemetry
    if tel is None:
        return
    from precisim.formats import get_format

    fmt = spec_fmt if spec_fmt is not None else get_format(dtype)
    tel.add(name, "output", count_events(own.detach().float(), y, fmt))


# ---------------------------------------------------------------------------------------------
# training: the backward is the module's own (docs/training.md section 1c)

def needs_grad(*ts: Any) -> bool:
    """Whether autograd records now and any of ``ts`` (tensors or None) requires a gradient."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def with_own_backward(y: torch.Tensor, ref: torch.Tensor | None, name: str,
                       kind: str) -> torch.Tensor:
    """The emulated ``y`` with the backward of ``ref``, the module's own operation on the
    unquantized inputs (straight through the unit's roundings), or ``y`` when no gradient is
    needed (``ref`` None)."""
    if ref is None:
        return y
    from .training.autograd import own_backward

    return own_backward(y, ref, name, kind)


# ---------------------------------------------------------------------------------------------
# installers

def install_normalization(installer: Installer, entries: Sequence[PlanEntry]) -> None:
    """Each norm's forward becomes the :class:`Norm` of its spec (its own weight, bias and
    epsilon); the spec's kind must be the module's."""
    for e in entries:
        m = installer.modules[e.module]
        spec: Norm = e.spec
        kind = norm_kind_of(m)
        if kind is not spec.kind:
            raise EmulationError(f"{e.module}: normalization {spec.name!r} is a "
                                 f"{spec.kind.value} norm, the module computes a "
                                 f"{kind.value if kind else 'different'} norm")
        eps = float(getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))
        own = type(m).forward

        def forward(x: torch.Tensor, *a: Any, m: nn.Module = m, spec: Norm = spec,
                    eps: float = eps, name: str = e.module, own: Any = own) -> torch.Tensor:
            b = getattr(m, "bias", None)
            b = b if isinstance(b, torch.Tensor) else None
            y = spec(x, m.weight, b, eps=eps)
            ref = own(m, x, *a) if needs_grad(x, m.weight, b) else None
            if installer.emulation.telemetry is not None:
                _count(installer, name, own(m, x, *a) if ref is None else ref.detach(), y,
                       x.dtype, spec.output_format)
            return with_own_backward(y.to(x.dtype), ref, name, "normalization")

        installer.setattr(m, "forward", forward)


def install_activation(installer: Installer, entries: Sequence[PlanEntry]) -> None:
    """Each activation module's forward becomes the :class:`Activation` of its spec (the
    spec's function must be the module's)."""
    for e in entries:
        m = installer.modules[e.module]
        spec: Activation = e.spec
        fn = activation_of(m)
        if fn is not spec.function:
            raise EmulationError(f"{e.module}: activation {spec.name!r} computes "
                                 f"{spec.function.value}, the module computes "
                                 f"{fn.value if fn else 'something else'}")
        own = type(m).forward

        def forward(x: torch.Tensor, m: nn.Module = m, spec: Activation = spec,
                    name: str = e.module, own: Any = own) -> torch.Tensor:
            y = spec(x)
            ref = own(m, x) if needs_grad(x) else None
            if installer.emulation.telemetry is not None:
                _count(installer, name, own(m, x) if ref is None else ref.detach(), y,
                       x.dtype, spec.output_format)
            return with_own_backward(y.to(x.dtype), ref, name, "activation")

        installer.setattr(m, "forward", forward)


_SOFTMAXES = {torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax}

#: attention modules whose softmax an applied emulation replaces, and the unit
_EMULATED: weakref.WeakKeyDictionary[nn.Module, Softmax] = weakref.WeakKeyDictionary()


def emulated_softmax(module: nn.Module) -> Softmax | None:
    """The :class:`Softmax` that an applied emulation runs inside ``module``'s attention
    function, or None (the chunked attention path, emulation/attention.py, reads it)."""
    return _EMULATED.get(module)


class _SoftmaxMode(ScopedMode):
    """Replaces the softmax calls of one attention forward by an emulated :class:`Softmax`
    (off torch's stack while the module's linear children, its projections, run)."""

    def __init__(self, installer: Installer, name: str, spec: Softmax):
        super().__init__()
        self.installer, self.name, self.spec = installer, name, spec

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func not in _SOFTMAXES:
            return func(*args, **kwargs)
        x = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        dtype = kwargs.get("dtype", None)
        if dim is None:
            return func(*args, **kwargs)
        xt = x if dtype is None else x.to(dtype)
        y = self.spec(xt, dim=dim)
        ref = func(*args, **kwargs) if needs_grad(x) else None
        if self.installer.emulation.telemetry is not None:
            _count(self.installer, self.name, func(*args, **kwargs) if ref is None
                   else ref.detach(), y, xt.dtype, self.spec.output_format)
        return with_own_backward(y.to(xt.dtype), ref, self.name, "softmax")


def _is_projection(m: nn.Module) -> bool:
    """A linear layer, or the emulated wrapper of one (the ``linear`` kind installs first)."""
    return is_linear(getattr(m, "original", m))


def install_softmax(installer: Installer, entries: Sequence[PlanEntry]) -> None:
    """Every attention function runs eagerly (an sdpa / flash implementation becomes
    ``eager``; the ``attention`` op kind's ``precisim`` implementation is kept) and the
    softmax calls during each attention module's forward go through its :class:`Softmax`."""
    for cfg in {id(m.config): m.config for m in installer.model.modules()
                if getattr(m, "config", None) is not None
                and hasattr(m.config, "_attn_implementation_internal")}.values():
        if cfg._attn_implementation_internal not in ("eager", "precisim"):
            installer.setattr(cfg, "_attn_implementation_internal", "eager")
    for e in entries:
        m = installer.modules[e.module]
        _EMULATED[m] = e.spec
        installer.on_restore(lambda m=m: _EMULATED.pop(m, None))

        def enter(args: tuple, kwargs: dict, name: str = e.module,
                  spec: Softmax = e.spec) -> _SoftmaxMode:
            return _SoftmaxMode(installer, name, spec)

        scope_mode(installer, m, enter, suspend_in=_is_projection)
