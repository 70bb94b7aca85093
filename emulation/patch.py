"""Plan, then patch: run any PyTorch / Hugging Face model, unchanged, under a :class:`Recipe`.

``plan(model, recipe)`` resolves which module gets which spec (printable as a table), warns
about rules that matched nothing and lists what stays in high precision. ``emulate(model,
recipe)`` applies that plan inside a ``with`` block (or ``apply()`` / ``restore()``) and
restores the model exactly on exit, also when the forward raises.

Both iterate the op kinds of :data:`~precisim.emulation.opkinds.OP_KINDS`: each kind finds its
modules (by type and behaviour) and installs its emulation through an
:class:`~precisim.emulation.opkinds.Installer` that records every change for the restore. The
built-in kinds' installers are here:

* linear layers (``nn.Linear``, modules that behave like transformers' ``Conv1D``) and the
  lm_head are swapped for
  :class:`EmulatedLinear` wrappers that hold the *same* Parameter objects (no copies, same
  state-dict names); the weight is quantized once per emulation and cached (bit-identical to
  quantizing on every call, invalidated if the parameter changes in place);
* embeddings are swapped for :class:`EmulatedEmbedding` (the table quantized once);
* the attention matmuls QK^T and PV of every module whose forward dispatches through
  transformers' attention interface run the model's own eager attention function under a
  scoped ``TorchFunctionMode`` that routes its two matmuls through :func:`gemm`; the model's
  ``config._attn_implementation`` is set to ``"precisim"`` (registered in transformers'
  ``AttentionInterface`` / ``AttentionMaskInterface``, eager-style masks) for the duration;
* keys and values are rounded to the ``kv_cache`` format as they are written into the cache
  (the cache object's ``update`` is wrapped for that call only), or, when the forward runs
  without a cache, as they enter the attention function.

No ``torch.*`` function is rewritten globally. Telemetry (saturation, flush-to-zero, inf/NaN,
scale clamps per module and role) is collected in :attr:`Emulation.telemetry`.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from precisim.formats import Rounding
from torch import nn
from torch.overrides import TorchFunctionMode

from .attention import KeyEnds, chunkable, chunked_attention, is_standard_eager
from .gemm import Operand, gemm, needs_parts, quantize_operand
from .opkinds import (
    OP_KINDS,
    EmulationError,
    Installer,
    eager_attention_of,
    find_ops,
    linear_layout,
)
from .recipe import AttentionSpec, GemmSpec, Recipe, RecipeError, Rule, get_recipe
from .telemetry import LayerErrors, Telemetry
from .weight_cache import WeightCache, operand_bytes

__all__ = ["Emulation", "EmulationError", "Plan", "PlanEntry", "active_emulation", "emulate",
           "plan"]

ATTN_IMPL = "precisim"

#: GEMM modules no op kind covers: reported as unsupported
_GEMM_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Bilinear, nn.MultiheadAttention,
               nn.ConvTranspose1d, nn.ConvTranspose2d, nn.RNNBase)


@dataclass(frozen=True)
class PlanEntry:
    """One op of the model and the spec it gets (None = high precision); ``op`` is the name
    of its :class:`~precisim.emulation.opkinds.OpKind`."""

    module: str
    module_type: str
    op: str
    spec: Any
    rule: str  # "default" or the pattern of the last rule that set it

    @property
    def emulated(self) -> bool:
        return self.spec is not None and not self.spec.is_identity

    def describe(self) -> str:
        s = self.spec
        return "high precision" if s is None or s.is_identity else s.describe()


@dataclass
class Plan:
    """The resolved plan; ``str(plan)`` / :meth:`table` print it."""

    recipe: Recipe
    entries: list[PlanEntry]
    unmatched_rules: list[Rule] = field(default_factory=list)
    unsupported: list[tuple[str, str, str]] = field(default_factory=list)

    def emulated(self, op: str | None = None) -> list[PlanEntry]:
        return [e for e in self.entries if e.emulated and (op is None or e.op == op)]

    def high_precision(self) -> list[PlanEntry]:
        return [e for e in self.entries if not e.emulated]

    def table(self) -> str:
        lines = [f"plan for recipe {self.recipe.name!r}: {len(self.emulated())} of "
                 f"{len(self.entries)} ops emulated", "",
                 "| module | type | op | spec | rule |", "|---|---|---|---|---|"]
        for e in self.entries:
            lines.append(f"| {e.module} | {e.module_type} | {e.op} | {e.describe()} | "
                         f"{e.rule} |")
        if self.unmatched_rules:
            lines += ["", "rules that matched no module: "
                      + ", ".join(repr(r.pattern) for r in self.unmatched_rules)]
        if self.unsupported:
            lines += ["", "not emulated (unsupported): "
                      + "; ".join(f"{n} ({t}): {why}" for n, t, why in self.unsupported)]
        return "\n".join(lines)

    __str__ = table

    def records(self) -> list[dict[str, str]]:
        return [{"module": e.module, "type": e.module_type, "op": e.op, "spec": e.describe(),
                 "rule": e.rule} for e in self.entries]

    def telemetry_keys(self) -> dict[tuple[str, str], PlanEntry]:
        """Every (module, role) key the emulated ops may report in
        :class:`~precisim.emulation.Telemetry`, with the entry that reports it (roles are
        declared by the op kinds)."""
        out: dict[tuple[str, str], PlanEntry] = {}
        for e in self.emulated():
            for key in OP_KINDS.get(e.op).telemetry_keys(e.module):
                out[key] = e
        return out


def plan(model: nn.Module, recipe: Recipe | str, *, warn: bool = True) -> Plan:
    """Resolve ``recipe`` on ``model``: which op of which module gets which spec.

    The modules of every registered op kind (:data:`~precisim.emulation.opkinds.OP_KINDS`;
    opt-in kinds only where the recipe names them) get the recipe's spec of their kind; rules
    override it in order (the last matching rule wins). Warns (``UserWarning``) about rules
    that matched no module and about modules that hold an op precisim does not emulate.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"recipe must be a Recipe or a name, got {type(recipe).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    active = active_emulation(model)
    if active is not None:  # its wrappers would be planned instead of the model's own ops
        raise EmulationError(
            f"cannot plan recipe {recipe.name!r}: the model is under emulation "
            f"{active.recipe.name!r} ({active!r}); plan or emulate it before applying that one "
            "or after restoring it (emulations do not nest)")
    kinds = [k for k in OP_KINDS.kinds() if k.default_on or recipe.mentions(k.name)]
    used = [False] * len(recipe.rules)
    entries: list[PlanEntry] = []
    unsupported: list[tuple[str, str, str]] = []
    modules = dict(model.named_modules())
    for found in find_ops(model, kinds):
        name, m, op = found.name, found.module, found.kind.name
        spec = recipe.spec(op)
        who = "default"
        for i, r in enumerate(recipe.rules):
            if r.overrides(op) and r.matches(name, type(m)):
                spec, who, used[i] = r.get(op), r.pattern, True
        suspect = found.suspect
        if suspect is None and found.kind.family == "module":
            suspect = _read_by_parent(name, modules)
        if suspect is not None:  # looks like the kind but is not: report, skip
            if spec is not None and not spec.is_identity:
                unsupported.append((name, type(m).__name__, suspect))
            continue
        if spec is not None and found.kind.validate is not None:
            found.kind.validate(name, spec)
        entries.append(PlanEntry(name, type(m).__name__, op, spec, who))
    covered = {e.module for e in entries}
    for name, m in model.named_modules():
        if name in covered or any(name.startswith(c + ".") for c in covered if c):
            continue
        if isinstance(m, _GEMM_TYPES):
            unsupported.append((name, type(m).__name__, "a GEMM module precisim does not "
                                "emulate; left in high precision"))
    unmatched = [r for r, u in zip(recipe.rules, used) if not u]
    p = Plan(recipe, entries, unmatched, unsupported)
    if warn:
        for r in unmatched:
            warnings.warn(f"recipe {recipe.name!r}: rule {r.pattern!r} ({r.kind}) matched no "
                          "module", UserWarning, stacklevel=2)
        for n, t, why in unsupported:
            warnings.warn(f"module {n!r} ({t}) is not emulated: {why}", UserWarning,
                          stacklevel=2)
    return p


#: parents whose forward reads a child's parameters directly instead of calling it: a module
#: swapped in for the child would never run
_READS_CHILDREN = (nn.MultiheadAttention,)


def _read_by_parent(name: str, modules: dict[str, nn.Module]) -> str | None:
    """Why module ``name`` cannot be emulated by swapping it (its parent reads its weight
    directly, as ``nn.MultiheadAttention`` does with ``out_proj.weight`` in
    ``F.multi_head_attention_forward``), or None."""
    if not name:
        return None
    parent_name = name.rpartition(".")[0]
    parent = modules.get(parent_name)
    if isinstance(parent, _READS_CHILDREN):
        return (f"its parent {parent_name or 'the model'} ({type(parent).__name__}) reads its "
                "weight directly instead of calling it, so a swapped-in emulation would never "
                "run; left in high precision")
    return None


# ---------------------------------------------------------------------------------------------
# wrappers

class _Recorder:
    """Keeps the last telemetry counts (to repeat them for a reused input, or to store them
    with a shared cached weight) and forwards them to ``telemetry`` if any."""

    def __init__(self, telemetry: Any) -> None:
        self.telemetry = telemetry
        self.counts: dict[str, torch.Tensor] | None = None

    def add(self, module: str, role: str, counts: dict[str, torch.Tensor]) -> None:
        self.counts = counts
        if self.telemetry is not None:
            self.telemetry.add(module, role, counts)


def _hf_pre(hook: Any, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run an accelerate hook's ``pre_forward`` on the original module (a model placed with
    ``device_map`` or offloaded: the hook puts the weights on the execution device, and the
    input beside them) and return the input it moved; ``post_forward`` is run on the output."""
    args, _ = hook.pre_forward(module, x)
    return args[0]


def _offloaded(hook: Any) -> bool:
    """Whether an accelerate hook brings the module's weights in only for each forward (then
    caching their quantized values would undo the offload)."""
    if hook is None:
        return False
    hooks = getattr(hook, "hooks", (hook,))  # a SequentialHook holds several
    return any(getattr(k, "offload", False) for k in hooks)


class _Static:
    """Telemetry of a parameter's quantization: counted once (see :class:`Telemetry`)."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def add(self, module: str, role: str, counts: dict[str, torch.Tensor]) -> None:
        self.telemetry.add(module, role, counts, static=True)


class EmulatedLinear(nn.Module):
    """A linear / Conv1D layer under a :class:`GemmSpec`; shares the original parameters."""

    def __init__(self, orig: nn.Module, spec: GemmSpec, handle: Emulation, name: str):
        super().__init__()
        self.weight = orig.weight  # the same Parameter objects: no copies, same names
        self.bias = orig.bias
        self.spec = spec
        self.transposed = linear_layout(orig) == "in_out"  # Conv1D stores (in, out)
        object.__setattr__(self, "_orig", orig)
        # a strong reference: an applied handle lives as long as the model holds its wrappers
        # (a collected handle must never leave the model broken)
        object.__setattr__(self, "_handle", handle)
        self._name = name

    @property
    def original(self) -> nn.Module:
        """The linear / Conv1D module this wrapper stands in for (restored at restore)."""
        return self._orig

    def extra_repr(self) -> str:
        return f"{self._name}: {self.spec.describe()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._handle
        o = self._orig
        hook = getattr(o, "_hf_hook", None)  # accelerate (device_map, offload): see _hf_pre
        if hook is not None:
            x = _hf_pre(hook, o, x)
        w = h._weight(self._name, o.weight, self.spec, self.transposed,
                      cache=not _offloaded(hook))
        qx = h._input(self._name, x, self.spec)
        y = gemm(qx, w, self.spec, bias=o.bias, telemetry=h.telemetry, name=self._name,
                 out_dtype=x.dtype)
        y = _attach_grad(y, x, self)  # backward under the layer's training roles
        if h.errors is not None:  # (the original's own forward: its hooks fire on this one)
            ref = (o._old_forward if hook is not None else o.forward)(x)
            h.errors.add(self._name, ref, y)
        return y if hook is None else hook.post_forward(o, y)


def _attach_grad(y: torch.Tensor, x: torch.Tensor, layer: EmulatedLinear) -> torch.Tensor:
    """``y`` with the layer's backward (docs/training.md section 1; high-precision backward
    GEMMs unless the layer has training roles) when autograd needs one."""
    from .training.autograd import attach_linear_grad

    return attach_linear_grad(y, x, layer)


class EmulatedEmbedding(nn.Module):
    """An embedding whose table is quantized to the spec's weight format (once)."""

    def __init__(self, orig: nn.Embedding, spec: GemmSpec, handle: Emulation, name: str):
        super().__init__()
        self.weight = orig.weight
        self.spec = spec
        object.__setattr__(self, "_orig", orig)
        object.__setattr__(self, "_handle", handle)  # strong: see EmulatedLinear
        self._name = name

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        o: nn.Embedding = self._orig
        h = self._handle
        hook = getattr(o, "_hf_hook", None)
        if hook is not None:
            ids = _hf_pre(hook, o, ids)
        table = h._weight(self._name, o.weight, self.spec, False,
                          cache=not _offloaded(hook)).values
        if torch.is_grad_enabled() and o.weight.requires_grad:  # straight through to the table
            from .training.autograd import straight_through

            table = straight_through(table, o.weight)
        y = nn.functional.embedding(ids, table, o.padding_idx, o.max_norm, o.norm_type,
                                    o.scale_grad_by_freq, o.sparse)
        if self.spec.output is not None:
            y = quantize_operand(y, self.spec.output, telemetry=h.telemetry,
                                 where=(self._name, "output")).values
        y = y.to(o.weight.dtype)
        return y if hook is None else hook.post_forward(o, y)


def install_linear(installer: Installer, entries: Sequence[PlanEntry]) -> None:
    """The ``linear`` and ``lm_head`` op kinds: swap in :class:`EmulatedLinear` wrappers."""
    em = installer.emulation
    for e in entries:
        orig = installer.modules[e.module]
        installer.swap(e.module, EmulatedLinear(orig, e.spec, em, e.module))


def install_embedding(installer: Installer, entries: Sequence[PlanEntry]) -> None:
    """The ``embedding`` op kind: swap in :class:`EmulatedEmbedding` wrappers."""
    em = installer.emulation
    for e in entries:
        orig = installer.modules[e.module]
        installer.swap(e.module, EmulatedEmbedding(orig, e.spec, em, e.module))


# ---------------------------------------------------------------------------------------------
# attention

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
            torch.Tensor.bmm}


@dataclass
class _AttnState:
    name: str
    spec: AttentionSpec
    handle: Emulation
    original_impl: str
    key_ends: KeyEnds  # visible key range of the current attention mask (shared by layers)
    caches: list[Any]  # cache objects whose update is wrapped for the current call
    kv_in_cache: bool = False
    training: Any = None  # an AttentionTrainingSpec (the train_attention op kind) or None


ACTIVE_ATTENTION: weakref.WeakKeyDictionary[nn.Module, _AttnState] = \
    weakref.WeakKeyDictionary()


class _AttentionMatmuls(TorchFunctionMode):
    """Routes the eager attention function's two matmuls (QK^T, then PV) through :func:`gemm`.

    Active only for the duration of one attention call of one module."""

    def __init__(self, st: _AttnState):
        super().__init__()
        self.st = st
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func not in _MATMULS:
            return func(*args, **kwargs)
        self.calls += 1
        if self.calls > 2:
            raise EmulationError(f"{self.st.name}: the attention function issued more than two "
                                 "matmuls; precisim expects QK^T then PV")
        op = "qk" if self.calls == 1 else "pv"
        g: GemmSpec | None = getattr(self.st.spec, op)
        if g is None or g.is_identity:
            return func(*args, **kwargs)
        a, b = args[0], args[1]
        h = self.st.handle
        y = gemm(a, b.transpose(-1, -2), g, telemetry=h.telemetry,
                 name=f"{self.st.name}.{op}", out_dtype=a.dtype)
        if h.errors is not None:
            h.errors.add(f"{self.st.name}.{op}", func(*args, **kwargs), y)
        return y


def _precisim_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None,
                        *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The ``"precisim"`` entry of transformers' AttentionInterface."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    st = ACTIVE_ATTENTION.get(module)
    eager = eager_attention_of(module)
    if st is None or eager is None:  # a module this emulation does not cover
        impl = st.original_impl if st is not None else "eager"
        fn = eager if impl == "eager" or impl is None else ALL_ATTENTION_FUNCTIONS[impl]
        return fn(module, query, key, value, attention_mask, *args, **kwargs)
    out = _emulated_attention(st, eager, module, query, key, value, attention_mask, *args,
                              **kwargs)
    if torch.is_grad_enabled() and isinstance(out, tuple) and out and st.training is not None:
        # backward GEMMs under their own formats (docs/training.md section 1)
        from .training.attention import attach_attention_train_grad

        grad_out = attach_attention_train_grad(out[0], query, key, value, module,
                                               attention_mask, args, kwargs, st.training,
                                               st.name, st.handle)
        return (grad_out, *out[1:])
    if torch.is_grad_enabled() and isinstance(out, tuple) and out:
        # the high-precision backward of the model's own attention (docs/training.md s. 1)
        # (sink logits, gpt-oss's s_aux, get theirs through the same recomputation)
        from .training.attention import sink_args
        from .training.autograd import attach_attention_grad

        def ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return eager(module, q, k, v, attention_mask, *args, **kwargs)[0]

        given = sink_args(kwargs)
        sinks = kwargs[given[0]] if given else None
        out = (attach_attention_grad(out[0], query, key, value, ref, sinks), *out[1:])
    return out


def _emulated_attention(st: _AttnState, eager: Callable, module: nn.Module,
                        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, *args: Any,
                        **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The attention function under the module's :class:`AttentionSpec` (no backward)."""
    kv = st.spec.kv_cache
    if kv is not None and not st.kv_in_cache:
        tel = st.handle.telemetry
        key = quantize_operand(key, kv, telemetry=tel, where=(st.name, "k_cache")
                               ).values.to(key.dtype)
        value = quantize_operand(value, kv, telemetry=tel, where=(st.name, "v_cache")
                                 ).values.to(value.dtype)
    if st.spec.datapath is not None:  # an online-softmax datapath (docs/attention-datapath.md)
        return _datapath_attention(st, module, query, key, value, attention_mask, *args,
                                   **kwargs)
    # the standard eager function under fake quant: chunked, skipping the masked triangle
    align = chunkable(st.spec) if st.handle.errors is None else None
    scaling = kwargs.get("scaling", args[0] if args else None)
    dropout = kwargs.get("dropout", args[1] if len(args) > 1 else 0.0)
    if align is not None and scaling is not None and is_standard_eager(eager) \
            and query.dim() == 4 and not (module.training and dropout) \
            and (attention_mask is None or (attention_mask.is_floating_point()
                                            and attention_mask.dim() == 4
                                            and attention_mask.shape[-2:] == (query.shape[-2],
                                                                              key.shape[-2]))):
        from .datapath_ops import emulated_softmax

        # an emulated softmax: keys skipped only where it drops them (and the chunk's scores
        # are certified far enough down)
        sm = emulated_softmax(module)
        gap = None if sm is None else sm.drop_gap
        return chunked_attention(module, query, key, value, attention_mask, float(scaling),
                                 st.spec, align, name=st.name, telemetry=st.handle.telemetry,
                                 key_ends=st.key_ends, skip_keys=sm is None or gap is not None,
                                 drop_gap=gap)
    mode = _AttentionMatmuls(st)
    with mode:
        out = eager(module, query, key, value, attention_mask, *args, **kwargs)
    if mode.calls != 2 and not (st.spec.qk is None and st.spec.pv is None):
        raise EmulationError(f"{st.name}: the eager attention of {type(module).__name__} issued "
                             f"{mode.calls} matmul(s); precisim expects exactly two (QK^T, PV), "
                             "so its attention matmuls cannot be emulated")
    return out


def _datapath_attention(st: _AttnState, module: nn.Module, query: torch.Tensor,
                        key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, *args: Any,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention of ``module`` by the spec's :class:`~precisim.emulation.flash.
    AttentionDatapath` (grouped-query heads per key/value head; the mask read as visible /
    masked, so causal and sliding-window masks apply, its finite values as a bias; a ``softcap`` and
    sink logits ``s_aux`` from the model, docs/attention-datapath.md section 1); output
    (b, q, h, d) in the query's dtype."""
    from .flash import FlashStats, flash_attention

    scaling = kwargs.get("scaling", args[0] if args else None)
    if scaling is None:
        scaling = getattr(module, "scaling", None)
    if scaling is None or query.dim() != 4:
        raise EmulationError(f"{st.name}: the attention datapath needs 4-D (b, h, q, d) "
                             "queries and the softmax scaling")
    dp = st.spec.datapath
    changes = {k: g for k, g in (("qk", st.spec.qk), ("pv", st.spec.pv)) if g is not None}
    if changes:
        dp = dp.with_(**changes)
    k, v = key, value  # (b, h_kv, n, d): the datapath handles grouped-query heads itself
    mask = attention_mask
    if mask is not None:
        mask = mask[..., :k.shape[-2]]
    stats = FlashStats()
    try:  # Gemma-2's soft cap, gpt-oss's sink logits (s_aux); ALiBi arrives in the mask
        out = flash_attention(query, k, v, mask, float(scaling), dp, stats,
                              softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"))
    except ValueError as e:
        raise EmulationError(f"{st.name}: {e}") from None
    tel = st.handle.telemetry
    if tel is not None:
        z = torch.zeros((), dtype=torch.int64)
        tel.add(f"{st.name}.softmax", "p", {
            "numel": z + stats.p_numel, "saturated": z + stats.p_saturated,
            "flushed": z + stats.p_flushed})
        tel.add(f"{st.name}.softmax", "state", {
            "numel": z + stats.p_numel,
            "nonfinite": z + stats.row_sum_overflow + stats.acc_overflow,
            "rescales": z + stats.rescales, "row_sum_overflow": z + stats.row_sum_overflow,
            "acc_overflow": z + stats.acc_overflow})
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, _precisim_attention)
    if ATTN_IMPL not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        type(ALL_MASK_ATTENTION_FUNCTIONS).register(ATTN_IMPL, eager_mask)


def install_attention(installer: Installer, entries: Sequence[PlanEntry]) -> None:
    """The ``attention`` op kind: every config's attention implementation becomes
    ``"precisim"`` (registered in transformers' AttentionInterface), each attention module
    gets its state (and, with a ``kv_cache`` format, the hooks that round keys and values as
    they enter the cache)."""
    _register_attention()
    em = installer.emulation
    configs = {id(m.config): m.config for m in installer.model.modules()
               if getattr(m, "config", None) is not None
               and hasattr(m.config, "_attn_implementation_internal")}
    original = None
    for cfg in configs.values():
        original = original or cfg._attn_implementation_internal
        installer.setattr(cfg, "_attn_implementation_internal", ATTN_IMPL)
    key_ends = KeyEnds()
    installer.on_restore(key_ends.clear)
    caches: list[Any] = []
    installer.on_restore(lambda: _unpatch_caches(caches))
    for e in entries:
        m = installer.modules[e.module]
        st = _AttnState(e.module, e.spec, em, original or "eager", key_ends, caches)
        ACTIVE_ATTENTION[m] = st
        installer.on_restore(lambda m=m: ACTIVE_ATTENTION.pop(m, None))
        if e.spec.kv_cache is not None:
            installer.on_restore(m.register_forward_pre_hook(
                _kv_pre_hook(st), with_kwargs=True).remove)
            installer.on_restore(m.register_forward_hook(_kv_post_hook(st),
                                                         always_call=True).remove)


def _kv_pre_hook(st: _AttnState):  # noqa: ANN202
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values")
        if cache is None:
            st.kv_in_cache = False
            return
        target = getattr(cache, "self_attention_cache", cache)
        inner = type(target).update
        spec = st.spec.kv_cache
        tel = st.handle.telemetry

        def update(k: torch.Tensor, v: torch.Tensor, *a: Any, **kw: Any):  # noqa: ANN202
            from .training.autograd import straight_through  # (gradients pass unchanged)

            k = straight_through(quantize_operand(k, spec, telemetry=tel,
                                                  where=(st.name, "k_cache")).values.to(k.dtype),
                                 k)
            v = straight_through(quantize_operand(v, spec, telemetry=tel,
                                                  where=(st.name, "v_cache")).values.to(v.dtype),
                                 v)
            return inner(target, k, v, *a, **kw)

        target.update = update
        st.caches.append(target)
        st.kv_in_cache = True
    return hook


def _kv_post_hook(st: _AttnState):  # noqa: ANN202
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        _unpatch_caches(st.caches)
        st.kv_in_cache = False
    return hook


def _unpatch_caches(caches: list[Any]) -> None:
    while caches:
        c = caches.pop()
        if "update" in vars(c):
            del c.update


# ---------------------------------------------------------------------------------------------
# one emulation per model at a time

#: the applied emulation each module belongs to: every module of an emulated model (wrappers
#: included) while the emulation is applied
_OWNER: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Emulation]] = \
    weakref.WeakKeyDictionary()


def active_emulation(model: nn.Module) -> Emulation | None:
    """The applied :class:`Emulation` that covers ``model`` or any of its modules, or None.

    Emulations do not nest: :meth:`Emulation.apply` refuses a model that one of them covers
    (docs: README "Emulating a model"); this returns that one, e.g. to restore it."""
    for m in model.modules():
        ref = _OWNER.get(m)
        em = ref() if ref is not None else None
        if em is not None and em.active:
            return em
    return None


def _claim(em: Emulation) -> None:
    for m in em.model.modules():
        _OWNER[m] = weakref.ref(em)


def _release(em: Emulation) -> None:
    for m, ref in list(_OWNER.items()):
        if ref() is em or ref() is None:
            _OWNER.pop(m, None)


# ---------------------------------------------------------------------------------------------
# the handle

class Emulation:
    """A reversible application of a plan to a model (see :func:`emulate`).

    ``with emulate(model, recipe) as em: ...`` or ``em.apply()`` ... ``em.restore()``. A handle
    can be applied again after a restore; its weight cache survives, so re-entering costs no
    re-quantization. Applying runs the ``install`` of each op kind of the plan (in registry
    order) through one :class:`~precisim.emulation.opkinds.Installer`, which records every
    change; restoring undoes them, last first.
    """

    def __init__(self, model: nn.Module, recipe: Recipe | str, *, telemetry: bool = True,
                 errors: bool = False, only: Callable[[str], bool] | None = None,
                 warn: bool = True, weight_cache_bytes: int | None = None,
                 weight_cache: WeightCache | None = None):
        if weight_cache is not None and not isinstance(weight_cache, WeightCache):
            raise ValueError(f"weight_cache={weight_cache!r} is not valid: accepted a "
                             "WeightCache or None")
        #: quantized weights shared with other emulations (None: this handle's own only)
        self.weight_cache = weight_cache
        if weight_cache_bytes is not None and (
                isinstance(weight_cache_bytes, bool) or not isinstance(weight_cache_bytes, int)
                or weight_cache_bytes < 0):
            raise ValueError(f"weight_cache_bytes={weight_cache_bytes!r} is not valid: accepted "
                             "a number of bytes >= 0, or None (no limit)")
        #: the quantized-weight cache's budget in bytes (None: no limit); see :meth:`_weight`
        self.weight_cache_bytes = weight_cache_bytes
        self._cache_total = 0
        self.model = model
        self.plan = plan(model, recipe, warn=warn)
        if only is not None:  # emulate a subset of the plan (sensitivity studies)
            self.plan = dataclasses.replace(self.plan, entries=[
                e if only(e.module) else dataclasses.replace(e, spec=None, rule="excluded")
                for e in self.plan.entries])
        self.recipe = self.plan.recipe
        self.telemetry: Telemetry | None = Telemetry() if telemetry else None
        self.errors: LayerErrors | None = LayerErrors() if errors else None
        self._installer: Installer | None = None
        self._wcache: dict[str, tuple[tuple[int, int, int], Operand]] = {}
        # the last quantized linear input (q/k/v and gate/up projections share theirs)
        self._last_input: tuple | None = None
        self.active = False

    # -- weight cache --------------------------------------------------------------------
    def _weight(self, name: str, w: torch.Tensor, spec: GemmSpec, transposed: bool, *,
                cache: bool = True) -> Operand:
        """The weight ``w`` quantized to ``spec.weight``, from the cache when it is unchanged.

        The cache keeps a bf16/fp16 model's quantized weights in the model's dtype when every
        value is exact in it (the dequantized values of MX and FP8 formats with power-of-two
        scales are), so a large checkpoint gains no fp32 copy of its weights; it holds at most
        :attr:`weight_cache_bytes` (weights past the budget are quantized again at each
        forward: the same numbers, less memory). ``cache=False``: neither read nor stored (an
        offloaded module's weights are brought in for each forward)."""
        key = (id(w), w._version, w.data_ptr())
        hit = self._wcache.get(name) if cache else None
        if hit is not None and hit[0] == key:
            op = hit[1]
            return op if op.values.dtype == torch.float32 else Operand(op.values.float(),
                                                                        op.parts)
        if hit is not None:
            self._cache_total -= operand_bytes(hit[1])
            del self._wcache[name]
        need = needs_parts(spec)
        shared = self.weight_cache if cache and spec.weight is not None and \
            WeightCache.shareable(spec.weight) else None
        got = None if shared is None else shared.get(name, w, spec.weight, need, transposed)
        if got is not None:  # quantized by an earlier emulation: same bits, same counts
            stored, counts = got
            if counts is not None and self.telemetry is not None:
                self.telemetry.add(name, "weight", counts, static=True)
            op = stored if stored.values.dtype == torch.float32 else \
                Operand(stored.values.float(), stored.parts)
        else:
            wt = w.t() if transposed else w
            tel = None if self.telemetry is None else _Static(self.telemetry)
            rec = _Recorder(tel) if shared is not None else tel
            op = quantize_operand(wt, spec.weight, axis=-1, need_parts=need,
                                  telemetry=rec, where=(name, "weight"))
            stored = op
            if w.dtype in (torch.bfloat16, torch.float16):
                compact = op.values.to(w.dtype)
                if torch.equal(compact.float(), op.values):
                    stored = Operand(compact, op.parts)
            if shared is not None:
                shared.put(name, w, spec.weight, need, transposed, stored,
                           rec.counts if isinstance(rec, _Recorder) else None)
        size = operand_bytes(stored)
        budget = self.weight_cache_bytes
        if cache and (budget is None or self._cache_total + size <= budget):
            self._wcache[name] = (key, stored)
            self._cache_total += size
        return op

    def _input(self, name: str, x: torch.Tensor, spec: GemmSpec) -> Operand:
        """``x`` quantized to ``spec.input``: once for the linear layers that read the same
        tensor one after another (the attention's q/k/v projections, the MLP's gate and up
        projections), whose telemetry counts are repeated for each of them. Stochastic
        rounding without a fixed seed draws for each layer (no reuse)."""
        ts = spec.input
        need = needs_parts(spec)
        reusable = ts is not None and not (Rounding.parse(ts.rounding) is Rounding.STOCHASTIC
                                           and ts.seed is None)
        key = (x._version, x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, ts, need)
        hit = self._last_input
        if reusable and hit is not None and hit[0] is x and hit[1] == key:
            if hit[3] is not None and self.telemetry is not None:
                self.telemetry.add(name, "input", hit[3])
            return hit[2]
        rec = _Recorder(self.telemetry) if self.telemetry is not None else None
        op = quantize_operand(x, ts, axis=-1, need_parts=need, telemetry=rec,
                              where=(name, "input"))
        self._last_input = (x, key, op, None if rec is None else rec.counts) if reusable \
            else None
        return op

    def cache_bytes(self) -> int:
        """Bytes held by the quantized-weight cache (values, and codes and scales)."""
        return sum(operand_bytes(op) for _, op in self._wcache.values())

    def clear_cache(self) -> None:
        """Drop the quantized weights (they are recomputed at the next forward)."""
        self._wcache.clear()
        self._cache_total = 0
        self._last_input = None

    # -- apply / restore -----------------------------------------------------------------
    def apply(self) -> Emulation:
        """Install the plan on the model (see :func:`emulate`).

        Emulations do not nest or overlap: if the model, a module of it or a model containing
        it is under another applied emulation, this raises :class:`EmulationError` naming that
        emulation and changes nothing (restore it first)."""
        if self.active:
            raise EmulationError("this emulation is already applied")
        other = active_emulation(self.model)
        if other is None:
            other = next((em for m in self.model.modules()
                          if isinstance(m, EmulatedLinear | EmulatedEmbedding)
                          for em in (m._handle,)), None)
        if other is not None:
            raise EmulationError(
                f"cannot apply recipe {self.recipe.name!r}: the model is under emulation "
                f"{other.recipe.name!r} ({other!r}); emulations do not nest or overlap, so the "
                f"result would be neither recipe. Restore {other.recipe.name!r} first (leave its "
                "with-block or call .restore(); precisim.emulation.active_emulation(model) "
                "returns it)")
        todo: dict[str, list[PlanEntry]] = {}
        for e in self.plan.entries:
            if e.emulated:
                todo.setdefault(e.op, []).append(e)
        order = {n: i for i, n in enumerate(OP_KINDS.names())}
        installer = self._installer = Installer(self, dict(self.model.named_modules()))
        self.active = True  # (claimed before installing: a failed install is released too)
        _claim(self)
        try:
            for op in sorted(todo, key=lambda o: order.get(o, len(order))):
                OP_KINDS.get(op).install(installer, todo[op])
            _claim(self)  # the wrappers too
        except BaseException:
            self.restore()
            raise
        return self

    def restore(self) -> None:
        """Put every module, config and hook back exactly as it was (a no-op when the
        emulation is not applied)."""
        installer, self._installer = self._installer, None
        self.active = False
        try:
            if installer is not None:
                installer.undo()
        finally:
            _release(self)

    def __enter__(self) -> Emulation:
        return self.apply()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def __repr__(self) -> str:
        state = "applied" if self.active else "not applied"
        return f"<Emulation {self.recipe.name!r} on {type(self.model).__name__} ({state})>"


def emulate(model: nn.Module, recipe: Recipe | str, *, telemetry: bool = True,
            errors: bool = False, only: Callable[[str], bool] | None = None,
            warn: bool = True, weight_cache_bytes: int | None = None,
            weight_cache: WeightCache | None = None) -> Emulation:
    """Run ``model`` under ``recipe``: ``with emulate(model, "mxfp4") as em: model(ids)``.

    Returns an :class:`Emulation` (a context manager; ``em.plan`` is the resolved plan,
    ``em.telemetry`` the counters). The model is restored exactly on exit, exceptions
    included. Nothing is changed until the handle is entered / applied.

    ``errors=True`` also runs every emulated op in high precision on the same inputs and
    records its output error (``em.errors``: SQNR, relative RMS error per op); ``only``
    restricts the plan to the modules whose name it accepts (the rest stay high precision).
    ``weight_cache_bytes`` bounds the cache of quantized weights (default: no bound; see
    :meth:`Emulation._weight`): a large checkpoint's peak memory is then its own size, the
    budget and one layer's temporaries. ``weight_cache``: a
    :class:`~precisim.emulation.WeightCache` shared with other emulations of the model (their
    quantized weights are reused when the layer, its weight and its spec are the same).
    """
    return Emulation(model, recipe, telemetry=telemetry, errors=errors, only=only, warn=warn,
                     weight_cache_bytes=weight_cache_bytes, weight_cache=weight_cache)
