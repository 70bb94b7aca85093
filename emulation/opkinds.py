"""Op kinds: the registry of what a recipe can give a spec to (docs/extending.md).

An :class:`OpKind` describes one kind of op of a model, in one place:

* its ``name`` (a recipe's top-level key and a rule's override key: ``linear: mxfp8``);
* how its modules are **found**: ``match(qualified name, module, model)``, by type and
  behaviour, never by class name; ``family`` and ``priority`` make the choice exclusive (a
  module gets at most one kind of a family: the matching kind of highest priority, so the
  lm_head is not also a linear layer);
* its **spec type** (:class:`~precisim.emulation.specs.GemmSpec`,
  :class:`~precisim.emulation.specs.AttentionSpec`, :class:`~precisim.emulation.specs.TensorSpec`
  or any class with ``parse(value, where)``, ``to_dict()``, ``describe()`` and
  ``is_identity``);
* how it is **installed**: ``install(installer, entries)`` changes the model only through the
  :class:`Installer` (module swaps, attribute changes, hooks), which records every change so
  that :meth:`~precisim.emulation.Emulation.restore` undoes them exactly, in reverse order,
  also when a later install raises;
* its **telemetry roles** (``input``, ``weight``, ``output``; ``qk.input`` = role ``input``
  reported under ``<module>.qk``);
* ``default_on``: True = every plan lists its modules (in high precision where the recipe
  gives no spec); False = an opt-in kind, planned only where a recipe or a rule names it (so
  registering it leaves every other plan unchanged).

The registry :data:`OP_KINDS` holds the built-in kinds ``linear``, ``attention``,
``embedding`` and ``lm_head``; ``OP_KINDS.register(kind.name, kind)`` adds one and
``OP_KINDS.unregister(name)`` removes it. Recipes, rules, :func:`~precisim.emulation.plan`
and :class:`~precisim.emulation.Emulation` iterate the registry.
"""

from __future__ import annotations

import dis
import functools
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from precisim.formats.registry import Registry, UnknownNameError

from .specs import AttentionSpec, GemmSpec, RecipeError

if TYPE_CHECKING:
    from torch import nn

    from .patch import Emulation, PlanEntry

__all__ = [
    "OP_KINDS", "EmulationError", "Found", "Installer", "OpKind", "UnknownOpKindError",
    "dispatches_attention", "eager_attention_of", "find_ops", "is_linear", "linear_layout",
    "output_embeddings",
]

#: keys of recipes and rules that an op kind may not be called
RESERVED = frozenset({"name", "description", "rules", "ops", "match", "kind", "pattern"})

Matcher = Callable[[str, "nn.Module", "nn.Module"], bool]
Suspect = Callable[[str, "nn.Module", "nn.Module"], "str | None"]
Install = Callable[["Installer", Sequence["PlanEntry"]], None]


class UnknownOpKindError(UnknownNameError, RecipeError):
    """An op kind that is not registered (also a :class:`RecipeError`)."""


class EmulationError(RuntimeError):
    """The model cannot be emulated as asked (the message names the module)."""


@dataclass(frozen=True)
class OpKind:
    """One kind of op a recipe gives a spec to (see the module docstring).

    ``match(name, module, model)``: True for the modules of this kind. ``install(installer,
    entries)``: emulate the plan entries of this kind (emulated ones only). ``roles``: the
    telemetry roles its ops report. ``suspect(name, module, model)``: for a module that
    ``match`` rejects but that looks like this kind, the reason it cannot be emulated (the
    plan reports it when the recipe asks to emulate it). ``validate(module name, spec)``:
    raises :class:`RecipeError` for a spec the module cannot run.
    """

    name: str
    spec_type: type
    match: Matcher
    install: Install
    roles: tuple[str, ...]
    priority: int = 0
    family: str = "module"
    default_on: bool = True
    suspect: Suspect | None = None
    validate: Callable[[str, Any], None] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier() \
                or self.name != self.name.lower():
            raise ValueError(f"op kind name {self.name!r} must be a lower-case Python "
                             "identifier (it is a recipe key and an attribute of recipes)")
        if self.name in RESERVED:
            raise ValueError(f"op kind name {self.name!r} is reserved; reserved: "
                             f"{', '.join(sorted(RESERVED))}")
        missing = [a for a in ("parse", "to_dict", "describe", "is_identity")
                   if not hasattr(self.spec_type, a)]
        if missing:
            raise TypeError(f"op kind {self.name!r}: spec type {self.spec_type.__name__} lacks "
                            f"{', '.join(missing)} (a spec type needs parse(value, where), "
                            "to_dict(), describe() and is_identity)")
        for f in ("match", "install"):
            if not callable(getattr(self, f)):
                raise TypeError(f"op kind {self.name!r}: {f} must be callable")
        if isinstance(self.roles, str) or not self.roles \
                or not all(isinstance(r, str) and r for r in self.roles):
            raise ValueError(f"op kind {self.name!r}: roles must be a non-empty tuple of "
                             f"names, got {self.roles!r}")

    def parse(self, value: Any, where: str) -> Any:
        """A spec of this kind from a spec, a YAML/JSON value or None."""
        if value is None or isinstance(value, self.spec_type):
            return value
        return self.spec_type.parse(value, where)

    def telemetry_keys(self, module: str) -> list[tuple[str, str]]:
        """The (module, role) keys of :class:`~precisim.emulation.Telemetry` an op of this
        kind in ``module`` may report (``qk.input`` -> ``(module + ".qk", "input")``)."""
        out = []
        for r in self.roles:
            sub, _, role = r.rpartition(".")
            out.append((f"{module}.{sub}" if sub else module, role))
        return out


class _OpKindRegistry(Registry[OpKind]):
    def register(self, name: str, entry: OpKind, *, aliases: tuple[str, ...] = (),
                 replace: bool = False) -> OpKind:
        if not isinstance(entry, OpKind):
            raise TypeError(f"op kind {name!r}: expected an OpKind, got "
                            f"{type(entry).__name__}")
        if name != entry.name or aliases:
            raise ValueError(f"op kind {entry.name!r} must be registered under its own name "
                             f"(got {name!r}{' and aliases' if aliases else ''})")
        return super().register(name, entry, replace=replace)

    def kinds(self) -> list[OpKind]:
        """The registered kinds, in registration order."""
        return [k for _, k in self.items()]


#: every op kind, in registration order (the order of recipe keys and of installs)
OP_KINDS: _OpKindRegistry = _OpKindRegistry(
    "op kind", prefix="op", error=UnknownOpKindError,
    hint="register one with OP_KINDS.register (docs/extending.md)")


# ---------------------------------------------------------------------------------------------
# recording what an install changes

class Installer:
    """What an op kind's ``install`` changes a model through; every change is recorded and
    :meth:`undo` reverts all of them in reverse order (also after a failed install).

    ``emulation``: the :class:`~precisim.emulation.Emulation` being applied (its
    ``telemetry``, ``errors`` and weight cache); ``modules``: the model's modules by
    qualified name, as they were before the emulation.
    """

    def __init__(self, emulation: Emulation, modules: dict[str, nn.Module]):
        self.emulation = emulation
        self.modules = modules
        self._undo: list[Callable[[], None]] = []

    @property
    def model(self) -> nn.Module:
        return self.emulation.model

    def swap(self, name: str, new: nn.Module) -> nn.Module:
        """Put ``new`` in the place of the module ``name``; returns the original.

        ``new`` shares the original's hook dictionaries (forward, pre-forward and backward
        hooks, the same dict objects): hooks registered on the original before or during the
        emulation fire on ``new`` (with ``new`` as their module argument) and stay on the
        original after the restore. Inside ``new``, call the original's ``forward``, not the
        module, or its hooks fire twice."""
        if not name:
            raise EmulationError("the model itself cannot be swapped; emulate its layers")
        parent_name, _, child = name.rpartition(".")
        parent = self.modules[parent_name]
        orig = parent._modules[child]
        parent._modules[child] = new
        _share_hooks(orig, new)

        def undo() -> None:
            parent._modules[child] = orig
        self._undo.append(undo)
        return orig

    def setattr(self, obj: Any, attr: str, value: Any) -> None:
        """``obj.attr = value``, restored (or deleted, if it was not set) by :meth:`undo`."""
        own = getattr(obj, "__dict__", None)
        had = hasattr(obj, attr) if own is None else attr in own
        old = getattr(obj, attr, None)
        setattr(obj, attr, value)

        def undo() -> None:
            if had:
                setattr(obj, attr, old)
            else:  # it was not the object's own: the class's value shows again
                delattr(obj, attr)
        self._undo.append(undo)

    def on_restore(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` at restore (e.g. a hook handle's ``remove``)."""
        self._undo.append(fn)

    def undo(self) -> None:
        """Revert every recorded change, last first; every undo runs even if one raises
        (the first error is raised afterwards)."""
        first: BaseException | None = None
        while self._undo:
            try:
                self._undo.pop()()
            except BaseException as e:  # noqa: BLE001 - restore the rest, then raise
                first = first or e
        if first is not None:
            raise first


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


def _share_hooks(orig: nn.Module, new: nn.Module) -> None:
    """Make ``new`` use ``orig``'s hook dictionaries (see :meth:`Installer.swap`)."""
    for attr in _HOOK_DICTS:
        if attr in vars(orig):
            object.__setattr__(new, attr, vars(orig)[attr])
    if "_is_full_backward_hook" in vars(orig):
        object.__setattr__(new, "_is_full_backward_hook", orig._is_full_backward_hook)


# ---------------------------------------------------------------------------------------------
# recognising modules by type and behaviour

@dataclass(frozen=True)
class _CodeFacts:
    names: frozenset[str]  # global and attribute names the code uses
    matmul_operator: bool  # uses the ``@`` operator


@functools.lru_cache(maxsize=1024)
def _code_facts(code: Any) -> _CodeFacts:
    mm = any(i.opname == "BINARY_MATRIX_MULTIPLY"
             or (i.opname == "BINARY_OP" and i.argrepr in ("@", "@="))
             for i in dis.get_instructions(code))
    return _CodeFacts(frozenset(code.co_names), mm)


def _forward_owner(m: nn.Module) -> tuple[type, _CodeFacts | None]:
    """The class in the MRO that defines ``forward``, and the facts of its code."""
    owner = next((c for c in type(m).__mro__ if "forward" in vars(c)), type(m))
    fn = inspect.unwrap(vars(owner).get("forward", type(m).forward))
    code = getattr(fn, "__code__", None)
    return owner, (_code_facts(code) if code is not None else None)


#: names whose use in a forward means the weight is not used as ``x @ W`` in (in, out) layout
_NOT_IN_OUT = frozenset({"linear", "T", "t", "mT", "transpose", "permute", "conv1d",
                         "conv2d", "embedding", "bilinear"})


def _behaves_like_conv1d(m: nn.Module) -> bool:
    """A leaf module with a 2-D weight (in, out) and a bias of size out (or none) whose forward
    computes ``x @ W + b`` (``addmm`` / ``matmul`` / ``@`` on ``self.weight``), as
    transformers' ``Conv1D`` does."""
    import torch

    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        return False
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (w.shape[1],)):
        return False
    if next(m.children(), None) is not None:
        return False
    _, facts = _forward_owner(m)
    if facts is None or "weight" not in facts.names or facts.names & _NOT_IN_OUT:
        return False
    return bool(facts.names & {"addmm", "matmul", "mm"}) or facts.matmul_operator


def linear_layout(m: nn.Module) -> str | None:
    """``"out_in"`` for an ``nn.Linear`` (weight (out, in), ``x @ W^T + b``), ``"in_out"`` for
    a module that behaves like transformers' ``Conv1D`` (weight (in, out), ``x @ W + b``),
    None for anything else."""
    from torch import nn

    if isinstance(m, nn.Linear):
        return "out_in"
    return "in_out" if _behaves_like_conv1d(m) else None


def is_linear(m: nn.Module) -> bool:
    return linear_layout(m) is not None


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's output embeddings (transformers' ``get_output_embeddings()``), or None."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        return get()
    except (AttributeError, NotImplementedError):
        return None


#: names a forward uses when it dispatches through transformers' attention interface
_INTERFACE_NAMES = frozenset({"ALL_ATTENTION_FUNCTIONS", "AttentionInterface"})


def eager_attention_of(m: nn.Module) -> Callable[..., Any] | None:
    """The ``eager_attention_forward`` of the module that defines ``m``'s forward, or None."""
    owner, _ = _forward_owner(m)
    mod = sys.modules.get(owner.__module__)
    fn = getattr(mod, "eager_attention_forward", None) if mod is not None else None
    return fn if callable(fn) else None


def dispatches_attention(m: nn.Module) -> bool:
    """True if ``m``'s forward dispatches through transformers' attention interface: it names
    ``ALL_ATTENTION_FUNCTIONS`` (or ``AttentionInterface``) and the module that defines it has
    an ``eager_attention_forward`` (the function the interface falls back to)."""
    _, facts = _forward_owner(m)
    return facts is not None and bool(facts.names & _INTERFACE_NAMES) \
        and eager_attention_of(m) is not None


# ---------------------------------------------------------------------------------------------
# finding the ops of a model

@dataclass(frozen=True)
class Found:
    """A module and the op kind it has; ``suspect``: the reason it is *not* of that kind
    although it looks like it (see :attr:`OpKind.suspect`), else None."""

    name: str
    module: nn.Module
    kind: OpKind
    suspect: str | None = None


def find_ops(model: nn.Module, kinds: Sequence[OpKind] | None = None) -> Iterator[Found]:
    """Every (module, op kind) of ``model``, in module order: per module and family, the
    matching kind of highest priority (registration order breaks ties); where no kind of a
    family matches, the suspects of that family."""
    families: dict[str, list[OpKind]] = {}
    for k in (OP_KINDS.kinds() if kinds is None else kinds):
        families.setdefault(k.family, []).append(k)
    for ks in families.values():
        ks.sort(key=lambda k: -k.priority)  # stable: registration order among equals
    for name, m in model.named_modules():
        for ks in families.values():
            hit = next((k for k in ks if k.match(name, m, model)), None)
            if hit is not None:
                yield Found(name, m, hit)
                continue
            for k in ks:
                why = k.suspect(name, m, model) if k.suspect is not None else None
                if why:
                    yield Found(name, m, k, why)


# ---------------------------------------------------------------------------------------------
# the built-in kinds (installers in emulation/patch.py, imported when an emulation applies)

def _installer(attr: str) -> Install:
    def install(installer: Installer, entries: Sequence[PlanEntry]) -> None:
        from . import patch

        getattr(patch, attr)(installer, entries)
    install.__name__ = install.__qualname__ = attr
    return install


def check_gemm(module: str, g: GemmSpec | None) -> None:
    if g is not None and g.unit is not None and (g.input is None or g.weight is None):
        raise RecipeError(f"{module}: matrix unit {g.unit!r} needs an input and a weight "
                          "format (its inputs must be values of the unit's formats)")


def check_attention(module: str, s: AttentionSpec) -> None:
    check_gemm(module, s.qk)
    check_gemm(module, s.pv)


def _is_head(name: str, m: nn.Module, model: nn.Module) -> bool:
    return is_linear(m) and m is output_embeddings(model)


def _is_embedding(name: str, m: nn.Module, model: nn.Module) -> bool:
    from torch import nn

    return isinstance(m, nn.Embedding)


def _is_attention(name: str, m: nn.Module, model: nn.Module) -> bool:
    return dispatches_attention(m)


def _looks_like_attention(name: str, m: nn.Module, model: nn.Module) -> str | None:
    # a hint for the report only (recognition is by behaviour, see dispatches_attention)
    if type(m).__name__.endswith("Attention") and hasattr(m, "config"):
        return ("its class does not dispatch through transformers' attention interface (no "
                "eager_attention_forward / ALL_ATTENTION_FUNCTIONS)")
    return None


GEMM_ROLES = ("input", "weight", "output")

for _kind in (
    OpKind("linear", GemmSpec, lambda n, m, model: is_linear(m), _installer("install_linear"),
           GEMM_ROLES, priority=10, validate=check_gemm,
           description="every nn.Linear and every module that behaves like Conv1D"),
    OpKind("attention", AttentionSpec, _is_attention, _installer("install_attention"),
           tuple(f"{g}.{r}" for g in ("qk", "pv") for r in GEMM_ROLES) + ("k_cache", "v_cache")
           + ("softmax.p", "softmax.state"),
           priority=0, suspect=_looks_like_attention, validate=check_attention,
           description="QK^T and PV of every module whose forward dispatches through "
           "transformers' attention interface, and its KV cache"),
    OpKind("embedding", GemmSpec, _is_embedding, _installer("install_embedding"),
           ("weight", "output"), priority=20, validate=check_gemm,
           description="the table of every nn.Embedding (weight role) and its output"),
    OpKind("lm_head", GemmSpec, _is_head, _installer("install_linear"), GEMM_ROLES,
           priority=30, validate=check_gemm,
           description="the model's output embeddings (get_output_embeddings())"),
):
    OP_KINDS.register(_kind.name, _kind)


def _register_datapath_kinds() -> None:
    """The opt-in kinds of the units beyond the GEMM (docs/arithmetic.md sections 7.8 and 7.9)."""
    from . import datapath_ops as d
    from . import rounded_ops as r
    from .functions import Activation, Norm, Softmax

    # (docs/training.md section 1c)
    _ST = "; backward: straight through (PyTorch's, on the unquantized inputs)"
    for kind in (
        OpKind("softmax", Softmax, d.is_attention, d.install_softmax, ("output",),
               family="softmax", default_on=False,
               description="the softmax inside every attention function (emulated Softmax "
               "unit: max, subtraction, exp unit, sum reduction, division or reciprocal)" + _ST),
        OpKind("normalization", Norm, d.is_norm, d.install_normalization, ("output",),
               family="normalization", default_on=False,
               description="every RMSNorm / LayerNorm (recognised by behaviour): reduction "
               "format and order, rsqrt unit, epsilon, cast order around the weight" + _ST),
        OpKind("activation", Activation, d.is_activation, d.install_activation, ("output",),
               family="activation", default_on=False,
               description="every SiLU / GELU activation module (recognised by behaviour): "
               "a function unit, or exp and rcp units" + _ST),
        OpKind("glu", r.Rounded, r.is_glu, r.install_glu, ("output",), family="glu",
               default_on=False,
               description="the gated product act(gate) * up of every gated MLP (recognised "
               "on a probe input), computed exactly and rounded once" + _ST),
        OpKind("residual", r.Rounded, r.is_residual_block, r.install_residual, ("output",),
               family="residual", default_on=False,
               description="the residual adds of every decoder layer (input plus a "
               "sub-module's output), computed exactly and rounded once" + _ST),
    ):
        OP_KINDS.register(kind.name, kind)


_register_datapath_kinds()
