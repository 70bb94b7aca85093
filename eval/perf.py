"""A roofline performance model: per-op time and bound, prefill time, decode tokens/s, memory
footprint, for a (model, accelerator, precision, workload).

**It is a model**: every op runs at the accelerator's dense peak for its compute class or at
its main-memory (or network) bandwidth, whichever is slower: ``time = max(flops / peak, bytes /
bandwidth)`` (``max(..., net_bytes / link bandwidth + latency)`` for collectives). Measured
systems reach a fraction of these peaks, so the results are bounds (docs/cost-perf.md section
7 compares them with published measurements and states the error).

Inputs, each a frozen description:

* :class:`~precisim.eval.models.ModelSpec` (from a Hugging Face config or a preset);
* :class:`~precisim.eval.accelerators.Accelerator` (presets from datasheets, or YAML);
* :class:`Precision`: bits per stored weight, GEMM input and KV-cache element (block scales
  included) and the compute class of each GEMM, per module: :meth:`Precision.uniform` from
  format names, :meth:`Precision.from_recipe` from a recipe (rules resolved per module);
* :class:`Workload`: prefill length, batch, decode context, tensor / pipeline / data parallel
  degrees, the dtype of what stays in high precision.

Ops per decoder layer (Llama family): the seven linear layers (MoE: router and experts), the
attention matmuls (QK^T and PV, FlashAttention-style: no S x S traffic), the KV cache (written
in prefill, read every decode step) and, with tensor parallelism, two all-reduces; then
lm_head (the last position only) and, with pipeline parallelism, the stage-to-stage sends.
Element-wise ops (norms, activations, RoPE, residuals) are assumed fused and not modelled.

    from precisim.eval.perf import roofline, Precision, Workload
    r = roofline("llama-2-7b", "h100-sxm", Precision.uniform("bf16"), Workload(batch=1))
    r.decode.tokens_per_s, r.prefill.latency, r.memory.fits
    print(r.table())

This module imports neither torch's model stack nor the emulation layer unless a recipe is
given (``precisim perf`` stays light).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .accelerators import Accelerator, AcceleratorError, get_accelerator
from .models import LinearModule, ModelSpec, get_model_spec

__all__ = ["MODEL_NOTE", "GemmNumerics", "Generation", "Memory", "OpTime", "PerfError",
           "PerfReport", "Phase", "Precision", "Workload", "compute_class", "format_facts",
           "gemm_time", "generation", "max_batch", "roofline"]

#: what every output of the performance model says about itself
MODEL_NOTE = ("modelled by precisim's roofline (docs/cost-perf.md): every op at the dense peak "
              "or the bandwidth, whichever bounds it; measured systems reach a fraction of this")

_WIDTH = {"fp4": 4, "int4": 4, "fp6": 6, "fp8": 8, "int8": 8, "bf16": 16, "fp16": 16,
          "tf32": 19, "fp32": 32}


class PerfError(ValueError):
    """A performance-model input that does not fit (the message names the values)."""


# ---------------------------------------------------------------------------------------------
# numbers formats -> bits and compute classes

def format_facts(name: Any) -> tuple[float, str]:
    """``(storage bits per element incl. block scales, compute class)`` of a format name (an
    element format such as ``e4m3``/``bf16``/``int8``, or a block-scaled one such as
    ``mxfp4``/``nvfp4``/``fp8_1x128``), a format object, or a recipe's tensor spec."""
    from precisim.formats import FloatFormat, FormatError, IntFormat, get_format
    from precisim.formats.scaling import ScaledFormat, get_scaled_format

    fmt = name
    if hasattr(name, "resolve") and hasattr(name, "bits_per_element"):  # a TensorSpec
        fmt = name.resolve(-1)
    elif isinstance(name, str):
        try:
            fmt = get_scaled_format(name)
        except FormatError:
            try:
                fmt = get_format(name)
            except FormatError as e:
                raise PerfError(str(e)) from None
    if isinstance(fmt, ScaledFormat):
        return fmt.bits_per_element, _element_class(fmt.element)
    if isinstance(fmt, FloatFormat | IntFormat):
        return float(fmt.bits), _element_class(fmt)
    raise PerfError(f"not a number format: {name!r}")


def _element_class(f: Any) -> str:
    from precisim.formats import FloatFormat

    if isinstance(f, FloatFormat):
        if f.bits <= 4:
            return "fp4"
        if f.bits <= 6:
            return "fp6"
        if f.bits <= 8:
            return "fp8"
        if f.bits <= 16:
            return "fp16" if f.exp_bits == 5 else "bf16"
        return "tf32" if f.bits <= 19 else "fp32"
    if f.bits <= 4:
        return "int4"
    if f.bits <= 8:
        return "int8"
    return "fp32"


def compute_class(a: str, b: str) -> str:
    """The class a GEMM of operands of classes ``a`` and ``b`` needs: the wider one (integer
    only when both are integers; a float of at least that width otherwise)."""
    for c in (a, b):
        if c not in _WIDTH:
            raise PerfError(f"unknown compute class {c!r}; accepted: {', '.join(_WIDTH)}")
    w = max(_WIDTH[a], _WIDTH[b])
    if a.startswith("int") and b.startswith("int"):
        return "int4" if w <= 4 else "int8" if w <= 8 else "fp32"
    if w <= 4:
        return "fp4"
    if w <= 6:
        return "fp6"
    if w <= 8:
        return "fp8"
    if w <= 16:
        return "fp16" if "fp16" in (a, b) and "bf16" not in (a, b) else "bf16"
    return "tf32" if w <= 19 else "fp32"


@dataclass(frozen=True)
class GemmNumerics:
    """How one GEMM stores and computes: bits per input (activation) element and per weight
    element (scales included) and the compute class; ``label`` says where it came from."""

    a_bits: float
    w_bits: float
    compute: str
    label: str = ""

    def __post_init__(self) -> None:
        for f in ("a_bits", "w_bits"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 64:
                raise PerfError(f"{f}={v!r} is not valid: accepted bits per element in (0, 64]")
        if self.compute not in _WIDTH:
            raise PerfError(f"compute={self.compute!r} is not valid: accepted "
                            f"{', '.join(_WIDTH)}")

    @classmethod
    def of(cls, activations: Any, weights: Any, label: str = "") -> GemmNumerics:
        a_bits, a_cls = format_facts(activations)
        w_bits, w_cls = format_facts(weights)
        return cls(a_bits, w_bits, compute_class(a_cls, w_cls),
                   label or f"W {_name(weights)} / A {_name(activations)}")


def _name(x: Any) -> str:
    return x if isinstance(x, str) else getattr(x, "format", None) or getattr(x, "name", str(x))


@dataclass(frozen=True)
class Precision:
    """Numerics of a model's GEMMs and KV cache for the roofline.

    ``linear``: every linear layer's :class:`GemmNumerics` unless ``modules`` overrides it
    (``(module name, numerics)`` pairs, e.g. from a recipe's rules); ``lm_head``;
    ``attention``: QK^T and PV (``w_bits`` is the K/V operand); ``kv_bits``: bits per cached
    key/value element; ``act_bits``: activations between ops and in collectives.
    """

    linear: GemmNumerics
    lm_head: GemmNumerics
    attention: GemmNumerics
    kv_bits: float
    act_bits: float = 16.0
    modules: tuple[tuple[str, GemmNumerics], ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        for f in ("kv_bits", "act_bits"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 64:
                raise PerfError(f"{f}={v!r} is not valid: accepted bits per element in (0, 64]")
        object.__setattr__(self, "modules", tuple(self.modules))

    def numerics(self, module: LinearModule) -> GemmNumerics:
        """The numerics of one linear module (its override, else lm_head / linear)."""
        for name, n in self.modules:
            if name == module.name:
                return n
        return self.lm_head if module.op == "lm_head" else self.linear

    @classmethod
    def uniform(cls, weights: str = "bf16", activations: str | None = None,
                kv_cache: str | None = None, *, dtype: str = "bf16",
                lm_head: str | None = None, attention: str | None = None) -> Precision:
        """Every linear layer with ``weights`` and ``activations`` (default: the weights'
        format for block-scaled or float formats of 8 bits or more, else ``dtype``:
        weight-only quantization), lm_head in ``lm_head`` (default ``dtype``), the KV cache
        in ``kv_cache`` (default ``dtype``), attention matmuls in ``attention`` (default: the
        KV-cache format's class against ``dtype`` queries)."""
        acts = activations if activations is not None else weights
        kv = kv_cache or dtype
        lin = GemmNumerics.of(acts, weights)
        head = GemmNumerics.of(dtype, lm_head or dtype)
        att = GemmNumerics.of(attention or dtype, attention or kv)
        return cls(lin, head, att, format_facts(kv)[0], format_facts(dtype)[0],
                   name=f"W {weights} / A {acts} / KV {kv}")

    @classmethod
    def from_recipe(cls, recipe: Any, model: ModelSpec | str | None = None, *,
                    dtype: str = "bf16") -> Precision:
        """The numerics of a :class:`~precisim.emulation.Recipe` (or its name / file): each
        role's format (high-precision roles: ``dtype``), per linear module of ``model`` when
        the recipe has rules (resolved as :func:`precisim.emulation.plan` does, by module
        name; rules by module type match the class names ``Linear`` and ``LlamaAttention``)."""
        from precisim.emulation import get_recipe

        r = get_recipe(recipe)

        def gemm(spec: Any, default: GemmNumerics | None = None) -> GemmNumerics:
            if spec is None or spec.is_identity:
                return default or GemmNumerics.of(dtype, dtype, f"{dtype} (high precision)")
            a = spec.input if spec.input is not None else dtype
            w = spec.weight if spec.weight is not None else dtype
            return GemmNumerics.of(a, w, spec.describe())

        lin_spec = r.spec("linear")
        lin = gemm(lin_spec)
        head = gemm(r.spec("lm_head"))
        att = r.spec("attention")
        kv = None
        qk = None
        if att is not None:
            kv = att.kv_cache if att.kv_cache is not None else (
                att.qk.weight if att.qk is not None else None)
            qk = att.qk
        kv_bits = format_facts(kv)[0] if kv is not None else format_facts(dtype)[0]
        att_num = gemm(qk, GemmNumerics.of(dtype, kv if kv is not None else dtype,
                                           "attention in high precision"))
        modules: list[tuple[str, GemmNumerics]] = []
        if r.rules:
            if model is None:
                raise PerfError(f"recipe {r.name!r} has rules: give the model so that they "
                                "can be resolved per module")
            spec_m = get_model_spec(model)
            linear_t = type("Linear", (), {})
            for m in spec_m.linear_modules():
                op = m.op
                s = r.spec(op)
                for rule in r.rules:
                    if rule.overrides(op) and rule.matches(m.name, linear_t):
                        s = rule.get(op)
                n = gemm(s, None)
                if n != (head if op == "lm_head" else lin):
                    modules.append((m.name, n))
        return cls(lin, head, att_num, kv_bits, format_facts(dtype)[0], tuple(modules),
                   name=r.name)

    def describe(self) -> str:
        extra = f"; {len(self.modules)} modules overridden" if self.modules else ""
        return (f"{self.name or 'precision'}: linear {self.linear.label} ({self.linear.w_bits:g}"
                f"/{self.linear.a_bits:g} bits W/A, {self.linear.compute}), KV {self.kv_bits:g} "
                f"bits{extra}")


def _precision(p: Any, model: ModelSpec, dtype: str) -> Precision:
    if p is None:
        return Precision.uniform(dtype, dtype=dtype)
    if isinstance(p, Precision):
        return p
    return Precision.from_recipe(p, model, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# workload

@dataclass(frozen=True)
class Workload:
    """What runs: ``batch`` sequences per model replica, each with ``prefill_tokens`` prompt
    tokens; decode steps attend to ``context`` cached tokens (default: the prompt) and
    ``output_tokens`` are generated (for :func:`generation`); ``tp`` / ``pp`` / ``dp``: tensor,
    pipeline and data parallel degrees (a replica is tp x pp devices; with pp > 1 the batch is
    split into pp micro-batches that keep the pipeline full); ``dtype``: what stays in high
    precision (activations, the KV cache unless the precision says otherwise);
    ``prefill_chunk``: the most tokens one prefill step holds activations for (the activation
    workspace of the memory footprint; serving engines chunk long prefills)."""

    batch: int = 1
    prefill_tokens: int = 2048
    context: int | None = None
    output_tokens: int = 128
    tp: int = 1
    pp: int = 1
    dp: int = 1
    dtype: str = "bf16"
    prefill_chunk: int = 8192

    def __post_init__(self) -> None:
        for f in ("batch", "prefill_tokens", "tp", "pp", "dp", "prefill_chunk"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PerfError(f"workload {f}={v!r} is not valid: accepted a positive integer")
        for f in ("context", "output_tokens"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise PerfError(f"workload {f}={v!r} is not valid: accepted a non-negative "
                                "integer")
        if self.batch % self.pp:
            raise PerfError(f"workload batch={self.batch} is not a multiple of pp={self.pp}: "
                            "the batch is split into pp micro-batches")

    @property
    def decode_context(self) -> int:
        return self.prefill_tokens if self.context is None else self.context

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp

    def with_(self, **changes: Any) -> Workload:
        return dataclasses.replace(self, **changes)

    def check(self, model: ModelSpec, acc: Accelerator) -> None:
        """Raise :class:`PerfError` naming the values when the parallel degrees do not divide
        the model (heads, KV heads, MLP width, layers) or no network tier connects them."""
        bad = []
        for what, n in (("num_attention_heads", model.n_heads),
                        ("num_key_value_heads", model.n_kv_heads),
                        ("intermediate_size", model.intermediate
                         if not model.is_moe else model.expert_intermediate)):
            if n % self.tp:
                bad.append(f"tp={self.tp} does not divide {what}={n}")
        if model.n_layers % self.pp:
            bad.append(f"pp={self.pp} does not divide num_hidden_layers={model.n_layers}")
        if bad:
            raise PerfError(f"model {model.name!r}: " + "; ".join(bad))
        if self.tp * self.pp > 1:
            try:
                acc.tier(self.tp * self.pp)
            except AcceleratorError as e:
                raise PerfError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# ops

@dataclass(frozen=True)
class OpTime:
    """One op of a step on one device: its work per occurrence (flops, main-memory bytes,
    network bytes), how often it occurs in a step (``count``), its compute class, and the time
    and bound of one occurrence (``compute``, ``memory`` or ``network``)."""

    name: str
    kind: str
    count: int
    flops: float
    bytes: float
    net_bytes: float
    compute: str
    time: float
    bound: str

    @property
    def total(self) -> float:
        """Time of all its occurrences in a step (s)."""
        return self.count * self.time

    @property
    def intensity(self) -> float:
        """Flops per main-memory byte."""
        return self.flops / self.bytes if self.bytes else math.inf


def gemm_time(flops: float, nbytes: float, acc: Accelerator, cls: str) -> tuple[float, str,
                                                                                str]:
    """``(time, bound, class)`` of a GEMM: ``max(flops / peak(class), bytes / bandwidth)``,
    in the class the accelerator runs it in (a narrower one it lacks falls back)."""
    run = acc.resolve_class(cls)
    tc = flops / acc.peak_ops(run)
    tm = nbytes / acc.bandwidth
    return (tc, "compute", run) if tc >= tm else (tm, "memory", run)


def _collective(name: str, nbytes: float, group: int, acc: Accelerator, count: int,
                kind: str = "all-reduce") -> OpTime:
    tier = acc.tier(group)
    if kind == "all-reduce":  # ring: 2 (n - 1) steps of size X / n
        steps = 2 * (group - 1)
        moved = 2 * (group - 1) / group * nbytes
    else:  # point to point
        steps = 1
        moved = nbytes
    t = moved / tier.bandwidth + steps * tier.latency
    return OpTime(name, "collective", count, 0.0, 0.0, moved, "-", t, "network")


def _op(name: str, kind: str, count: int, flops: float, nbytes: float, acc: Accelerator,
        cls: str) -> OpTime:
    t, bound, run = gemm_time(flops, nbytes, acc, cls)
    return OpTime(name, kind, count, flops, nbytes, 0.0, run, t, bound)


def _short(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[3:]) if module.startswith("model.layers.") else module


def _step_ops(model: ModelSpec, acc: Accelerator, prec: Precision, w: Workload, *,
              tokens: int, context: int, phase: str, batch: int) -> list[OpTime]:
    """The ops of one forward step of ``batch`` sequences with ``tokens`` new tokens each,
    attending to ``context`` tokens (prefill: causal over the new tokens), on one device of a
    tp group; every layer's ops (all pipeline stages, for the latency)."""
    tp = w.tp
    m_rows = batch * tokens
    act_b = prec.act_bits / 8
    groups: dict[tuple[str, GemmNumerics], list[LinearModule]] = {}
    for mod in model.linear_modules():
        if mod.op == "lm_head":
            continue
        groups.setdefault((_short(mod.name), prec.numerics(mod)), []).append(mod)
    ops: list[OpTime] = []
    for (short, num), mods in groups.items():
        mod = mods[0]
        k = mod.in_features if mod.column_parallel else mod.in_features // tp
        n = mod.out_features // tp if mod.column_parallel else mod.out_features
        if "block_sparse_moe.gate" in mod.name:  # the router is small: replicated
            k, n = mod.in_features, mod.out_features
        if mod.experts > 1:
            pairs = m_rows * model.experts_per_token
            touched = mod.experts * (1 - (1 - 1 / mod.experts) ** pairs)
            flops = 2.0 * pairs * k * n
            nbytes = touched * k * n * num.w_bits / 8 + pairs * (k * num.a_bits / 8 + n * act_b)
        else:
            flops = 2.0 * m_rows * k * n
            nbytes = k * n * num.w_bits / 8 + m_rows * (k * num.a_bits / 8 + n * act_b)
        label = short if not prec.modules else f"{short} [{num.label}]"
        ops.append(_op(label, "gemm", len(mods), flops, nbytes, acc, num.compute))
    h_d = model.n_heads // tp
    kv_d = model.n_kv_heads // tp
    d = model.head_dim
    att = prec.attention
    kv_b = prec.kv_bits / 8
    if phase == "prefill":
        pairs = tokens * (tokens + 1) / 2 + tokens * max(0, context - tokens)
        a_flops = 4.0 * batch * h_d * d * pairs
        a_bytes = batch * tokens * (h_d * d * (att.a_bits / 8 + act_b) + 2 * kv_d * d * kv_b)
        kv_bytes = batch * tokens * 2 * kv_d * d * kv_b  # written to the cache
        kv_name = "kv_cache (write)"
    else:
        a_flops = 4.0 * batch * h_d * d * context * tokens
        a_bytes = batch * tokens * h_d * d * (att.a_bits / 8 + act_b)
        kv_bytes = batch * (context + tokens) * 2 * kv_d * d * kv_b  # read, and the new token
        kv_name = "kv_cache (read)"
    ops.append(_op("attention (QK^T, PV)", "attention", model.n_layers, a_flops, a_bytes, acc,
                   att.compute))
    ops.append(OpTime(kv_name, "kv_cache", model.n_layers, 0.0, kv_bytes, 0.0, "-",
                      kv_bytes / acc.bandwidth, "memory"))
    # lm_head: the last position of each sequence
    head = next(x for x in model.linear_modules() if x.op == "lm_head")
    hn = prec.numerics(head)
    n = head.out_features // tp
    ops.append(_op("lm_head", "gemm", 1, 2.0 * batch * head.in_features * n,
                   head.in_features * n * hn.w_bits / 8 + batch * (head.in_features * hn.a_bits
                                                                    / 8 + n * act_b),
                   acc, hn.compute))
    if tp > 1:
        ops.append(_collective(f"all-reduce (tp={tp})", m_rows * model.hidden * act_b, tp, acc,
                               2 * model.n_layers))
    if w.pp > 1:
        ops.append(_collective(f"send to next stage (pp={w.pp})", m_rows * model.hidden * act_b,
                               w.tp * w.pp, acc, w.pp - 1, kind="p2p"))
    return ops


@dataclass(frozen=True)
class Phase:
    """One phase (``prefill`` or ``decode``) of a workload: its ops on one device and what
    they add up to. ``latency``: one step through every pipeline stage (s); prefill:
    ``tokens_per_s`` is prompt tokens per second; decode: generated tokens per second over all
    replicas (the pipeline kept full), ``per_sequence_tokens_per_s`` what one sequence sees."""

    name: str
    ops: tuple[OpTime, ...]
    batch: int
    tokens: int
    context: int
    pp: int
    dp: int

    @property
    def latency(self) -> float:
        return sum(o.total for o in self.ops)

    @property
    def stage_time(self) -> float:
        """One pipeline stage's time for one micro-batch (s)."""
        return self.latency / self.pp

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second over all replicas: micro-batch tokens / stage time x dp."""
        return self.batch * self.tokens / self.stage_time * self.dp

    @property
    def per_sequence_tokens_per_s(self) -> float:
        return self.tokens / self.latency

    def bound_shares(self) -> dict[str, float]:
        """Fraction of the step time bound by compute, memory and network."""
        out = {"compute": 0.0, "memory": 0.0, "network": 0.0}
        for o in self.ops:
            out[o.bound] += o.total
        tot = sum(out.values()) or 1.0
        return {k: v / tot for k, v in out.items()}

    def records(self) -> list[dict[str, Any]]:
        tot = self.latency or 1.0
        return [{"phase": self.name, "op": o.name, "kind": o.kind, "count": o.count,
                 "gflops": o.flops / 1e9, "mbytes": o.bytes / 1e6,
                 "net_mbytes": o.net_bytes / 1e6, "class": o.compute,
                 "intensity": o.intensity, "us_each": o.time * 1e6, "ms_total": o.total * 1e3,
                 "share": o.total / tot, "bound": o.bound} for o in self.ops]


@dataclass(frozen=True)
class Memory:
    """Bytes per device: weights, KV cache, activation workspace; the capacity and whether
    they fit."""

    weights: float
    kv_cache: float
    activations: float
    capacity: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def headroom(self) -> float:
        """Capacity minus the total (negative: it does not fit)."""
        return self.capacity - self.total


def _memory(model: ModelSpec, acc: Accelerator, prec: Precision, w: Workload, batch: int,
            max_context: int) -> Memory:
    tp, pp = w.tp, w.pp
    layer_bytes = 0.0
    head_bytes = 0.0
    for m in model.linear_modules():
        b = m.params * prec.numerics(m).w_bits / 8
        if m.op == "lm_head":
            head_bytes = 0.0 if model.tie_embeddings and prec.numerics(m).w_bits == \
                prec.act_bits else b
        else:
            layer_bytes += b
    embed = model.embedding_params * prec.act_bits / 8
    norms = (2 * model.n_layers + 1) * model.hidden * prec.act_bits / 8
    ends = embed + head_bytes if pp == 1 else max(embed, head_bytes)
    weights = (layer_bytes + norms) / (tp * pp) + ends / tp
    kv = (batch * max_context * 2 * model.kv_dim * model.n_layers * prec.kv_bits / 8
          / (tp * pp))
    width = model.q_dim + 2 * model.kv_dim + model.mlp_matrices * (
        model.expert_intermediate if model.is_moe else model.intermediate)
    step_tokens = min(batch // pp * w.prefill_tokens, w.prefill_chunk)
    acts = step_tokens * (model.hidden + width / tp) * prec.act_bits / 8
    return Memory(weights, kv, acts, acc.capacity)


@dataclass(frozen=True)
class PerfReport:
    """The roofline of one (model, accelerator, precision, workload): the ``prefill`` and
    ``decode`` phases and the ``memory`` per device. ``note`` says it is a model."""

    model: ModelSpec
    accelerator: Accelerator
    precision: Precision
    workload: Workload
    prefill: Phase
    decode: Phase
    memory: Memory
    note: str = MODEL_NOTE

    def summary(self) -> dict[str, Any]:
        w, m = self.workload, self.memory
        return {
            "model": self.model.name, "accelerator": self.accelerator.name,
            "precision": self.precision.name, "devices": w.devices, "tp": w.tp, "pp": w.pp,
            "dp": w.dp, "batch": w.batch, "prefill_tokens": w.prefill_tokens,
            "decode_context": w.decode_context,
            "prefill_s": self.prefill.latency,
            "prefill_tokens_per_s": self.prefill.tokens_per_s,
            "decode_step_s": self.decode.latency,
            "decode_tokens_per_s": self.decode.tokens_per_s,
            "decode_tokens_per_s_per_sequence": self.decode.per_sequence_tokens_per_s,
            "weights_gb": m.weights / 1e9, "kv_cache_gb": m.kv_cache / 1e9,
            "activations_gb": m.activations / 1e9, "memory_gb": m.total / 1e9,
            "capacity_gb": m.capacity / 1e9, "fits": m.fits,
            "prefill_bound": max(self.prefill.bound_shares().items(), key=lambda kv: kv[1])[0],
            "decode_bound": max(self.decode.bound_shares().items(), key=lambda kv: kv[1])[0],
        }

    def records(self) -> list[dict[str, Any]]:
        return self.prefill.records() + self.decode.records()

    def table(self) -> str:
        """Markdown: the headline numbers, then every op of both phases."""
        from .tables import render_table

        s = self.summary()
        w = self.workload
        head = [
            f"**{self.model.name} on {w.devices} x {self.accelerator.name}** (tp {w.tp}, pp "
            f"{w.pp}, dp {w.dp}), {self.precision.describe()}",
            "",
            f"_{self.note}_",
            "",
            f"- prefill: batch {w.batch} x {w.prefill_tokens} tokens in "
            f"{s['prefill_s'] * 1e3:.4g} ms ({s['prefill_tokens_per_s']:.4g} tokens/s; "
            f"{s['prefill_bound']} bound)",
            f"- decode: batch {w.batch} at context {w.decode_context}: step "
            f"{s['decode_step_s'] * 1e3:.4g} ms, {s['decode_tokens_per_s']:.4g} tokens/s "
            f"({s['decode_tokens_per_s_per_sequence']:.4g} per sequence; "
            f"{s['decode_bound']} bound)",
            f"- memory per device: weights {s['weights_gb']:.4g} GB + KV cache "
            f"{s['kv_cache_gb']:.4g} GB + activations {s['activations_gb']:.3g} GB = "
            f"{s['memory_gb']:.4g} GB of {s['capacity_gb']:.4g} GB: "
            + ("fits" if s["fits"] else "DOES NOT FIT"),
            "",
        ]
        cols = [("phase", "phase"), ("op", "op"), ("count", "count"), ("class", "class"),
                ("gflops", "GFLOP each"), ("mbytes", "MB each"), ("net_mbytes", "net MB each"),
                ("us_each", "us each"), ("ms_total", "ms total"), ("share", "share", ".1%"),
                ("bound", "bound")]
        return "\n".join(head) + "\n" + render_table(self.records(), cols)

    def to_dict(self) -> dict[str, Any]:
        return {"note": self.note, "summary": self.summary(), "model": self.model.to_dict(),
                "accelerator": self.accelerator.to_dict(), "workload":
                dataclasses.asdict(self.workload), "precision": self.precision.describe(),
                "ops": self.records()}


def _resolve(model: Any, accelerator: Any, precision: Any, workload: Workload | None,
             ) -> tuple[ModelSpec, Accelerator, Precision, Workload]:
    m = get_model_spec(model)
    a = get_accelerator(accelerator)
    w = workload or Workload()
    if not isinstance(w, Workload):
        raise PerfError(f"workload must be a Workload, got {type(w).__name__}")
    w.check(m, a)
    return m, a, _precision(precision, m, w.dtype), w


def roofline(model: Any, accelerator: Any, precision: Any = None,
             workload: Workload | None = None) -> PerfReport:
    """The roofline of ``model`` (a :class:`ModelSpec`, preset name or HF config) on
    ``accelerator`` (preset name, YAML file or :class:`Accelerator`) with ``precision`` (a
    :class:`Precision`, a recipe or its name; None: everything in the workload's dtype) for
    ``workload`` (default :class:`Workload`)."""
    m, a, p, w = _resolve(model, accelerator, precision, workload)
    mb = w.batch // w.pp
    pre = Phase("prefill", tuple(_step_ops(m, a, p, w, tokens=w.prefill_tokens,
                                           context=w.prefill_tokens, phase="prefill",
                                           batch=mb)), mb, w.prefill_tokens,
                w.prefill_tokens, w.pp, w.dp)
    dec = Phase("decode", tuple(_step_ops(m, a, p, w, tokens=1, context=w.decode_context,
                                          phase="decode", batch=mb)), mb, 1,
                w.decode_context, w.pp, w.dp)
    ctx = max(w.decode_context + 1, w.prefill_tokens + w.output_tokens)
    return PerfReport(m, a, p, w, pre, dec, _memory(m, a, p, w, w.batch, ctx))


@dataclass(frozen=True)
class Generation:
    """Serving ``batch`` requests of ``prefill_tokens`` in and ``output_tokens`` out per
    replica: time to the first token (the prefill), mean time per output token, the total and
    the output tokens per second over every replica (per device: divided by the devices)."""

    ttft: float
    tpot: float
    total: float
    output_tokens_per_s: float
    devices: int
    memory: Memory
    note: str = MODEL_NOTE

    @property
    def output_tokens_per_s_per_device(self) -> float:
        return self.output_tokens_per_s / self.devices


def generation(model: Any, accelerator: Any, precision: Any = None,
               workload: Workload | None = None, *, points: int = 17) -> Generation:
    """Serve ``workload.batch`` requests (``prefill_tokens`` in, ``output_tokens`` out) per
    replica: the prefill, then one decode step per output token at a growing context (the
    step time is integrated over ``points`` contexts by the trapezoid rule; it is piecewise
    linear in the context)."""
    m, a, p, w = _resolve(model, accelerator, precision, workload)
    mb = w.batch // w.pp
    pre = sum(o.total for o in _step_ops(m, a, p, w, tokens=w.prefill_tokens,
                                         context=w.prefill_tokens, phase="prefill", batch=mb))
    n_out = w.output_tokens
    if n_out < 1:
        raise PerfError("generation needs output_tokens >= 1")

    def step(ctx: float) -> float:
        return sum(o.total for o in _step_ops(m, a, p, w, tokens=1, context=int(round(ctx)),
                                              phase="decode", batch=mb))

    if n_out == 1:
        dec_total = 0.0
    else:
        k = max(2, min(points, n_out))
        xs = [w.prefill_tokens + i * (n_out - 2) / (k - 1) for i in range(k)]
        ys = [step(x) for x in xs]
        mean = sum((ys[i] + ys[i + 1]) / 2 for i in range(k - 1)) / (k - 1)
        dec_total = mean * (n_out - 1)
    # the pp micro-batches advance together: each round of the pipeline moves every one of
    # them one step, in one micro-batch's latency
    total = pre + dec_total
    tput = w.batch * n_out * w.dp / total
    mem = _memory(m, a, p, w, w.batch, w.prefill_tokens + n_out)
    return Generation(pre, dec_total / max(1, n_out - 1), total, tput, w.devices, mem)


def max_batch(model: Any, accelerator: Any, precision: Any = None,
              workload: Workload | None = None, *, limit: int = 1 << 16,
              memory_fraction: float = 1.0) -> int:
    """The largest batch per replica (a multiple of pp) whose weights, KV cache (at prompt +
    output tokens) and activations fit in ``memory_fraction`` of each device's memory; 0 when
    not even one sequence fits."""
    m, a, p, w = _resolve(model, accelerator, precision, workload)
    if not 0 < memory_fraction <= 1:
        raise PerfError(f"memory_fraction={memory_fraction!r} is not valid: accepted (0, 1]")
    ctx = w.prefill_tokens + w.output_tokens

    def fits(b: int) -> bool:
        mem = _memory(m, a, p, w.with_(batch=b), b, ctx)
        return mem.total <= memory_fraction * mem.capacity

    lo, hi = 0, limit // w.pp
    if not fits(w.pp):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * w.pp):
            lo = mid
        else:
            hi = mid - 1
    return lo * w.pp

