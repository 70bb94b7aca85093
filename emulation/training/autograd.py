"""Emulated linear layers as autograd functions: forward and backward under a recipe
(docs/training.md sections 1-4).

:class:`LinearGrad` attaches a backward to the output of an emulated linear layer (the forward
value is computed by the wrapper as in inference, so it is bit-identical to it):

* a backward GEMM in high precision (``dgrad`` / ``wgrad`` None, no Hadamard transform on it)
  is what PyTorch computes: the layer's plain forward is recomputed on the *unquantized*
  operands and differentiated by autograd, so a recipe with every backward role in high
  precision trains bit-identically to plain PyTorch (tests/test_training.py);
* an emulated backward GEMM quantizes its operands to its :class:`GemmSpec` roles along its
  own reduction axis (dgrad: ``dy`` (M, N) and ``W^T`` (K, N) blocked along N; wgrad: ``dy^T``
  (N, M) and ``x^T`` (K, M) blocked along the tokens M), optionally after a random Hadamard
  transform (:mod:`.hadamard`), and runs :func:`precisim.emulation.gemm.gemm` (its matrix
  unit, or fp32 matmul); stochastic rounding draws replayable counter bits (:mod:`.sr`) keyed
  by (seed, step, module, role, element position of ``dy`` / ``x`` / ``W``);
* the bias gradient is the high-precision sum of ``dy`` (a reduction, not a GEMM).

:class:`AttentionGrad` gives the emulated attention (its QK^T and PV matmuls and KV-cache
rounding) the high-precision backward of the model's own eager attention on the unquantized
q, k, v (straight through); before it, no gradient reached the q/k/v projections. The
``train_attention`` op kind replaces it by backward GEMMs under their own specs
(:mod:`.attention`, docs/training.md section 1b).

A :class:`GradProbe` (``with GradProbe() as p``) records, per module and backward GEMM, the
emulated gradient's SQNR, relative bias and noise-to-gradient-norm ratio against the
high-precision gradient of the same batch (docs/training.md section 6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from precisim.formats.scaling import ScaledFormat
from torch import nn

from ..gemm import Operand, gemm, needs_parts, quantize_operand
from ..specs import GemmSpec, RecipeError, TensorSpec
from .hadamard import random_hadamard, rht
from .roles import TrainingSpec, check_blocks
from .sr import SRSeedError, active_seed, element_bits, key_of

__all__ = ["AttentionGrad", "GradProbe", "LinearGrad", "OwnBackward", "attach_attention_grad",
           "attach_linear_grad", "check_layer", "own_backward", "plain_linear",
           "straight_through"]


# ---------------------------------------------------------------------------------------------
# gradient probes

@dataclass
class GradStat:
    """One backward GEMM's gradient against high precision (accumulated over calls)."""

    err2: float = 0.0  # sum (q - g)^2
    ref2: float = 0.0  # sum g^2
    diff_sum: float = 0.0  # sum (q - g)
    abs_sum: float = 0.0  # sum |g|
    n: int = 0

    def add(self, q: torch.Tensor, g: torch.Tensor) -> None:
        d = q.double() - g.double()
        self.err2 += float((d * d).sum())
        self.ref2 += float((g.double() ** 2).sum())
        self.diff_sum += float(d.sum())
        self.abs_sum += float(g.double().abs().sum())
        self.n += g.numel()

    def summary(self) -> dict[str, float]:
        sqnr = math.inf if self.err2 == 0 else 10 * math.log10(self.ref2 / self.err2) \
            if self.ref2 > 0 else -math.inf
        return {"sqnr_db": sqnr,
                "bias": self.diff_sum / self.abs_sum if self.abs_sum else 0.0,
                "noise_ratio": math.sqrt(self.err2 / self.ref2) if self.ref2 else 0.0}


@dataclass
class GradProbe:
    """Collects :class:`GradStat` per (module, gemm) while active (``with GradProbe() as p``)."""

    stats: dict[tuple[str, str], GradStat] = field(default_factory=dict)
    #: (module, op kind) -> backward calls that ran straight through an emulated unit (the
    #: op kinds softmax, normalization, activation, glu, residual: docs/training.md 1c)
    straight_through: dict[tuple[str, str], int] = field(default_factory=dict)

    def __enter__(self) -> GradProbe:
        GRAD_PROBES.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        GRAD_PROBES.remove(self)

    def note_straight_through(self, module: str, kind: str) -> None:
        key = (module, kind)
        self.straight_through[key] = self.straight_through.get(key, 0) + 1

    def add(self, module: str, gemm_name: str, q: torch.Tensor, g: torch.Tensor) -> None:
        self.stats.setdefault((module, gemm_name), GradStat()).add(q, g)

    def by_gemm(self) -> dict[str, dict[str, float]]:
        """Stats pooled over modules, per backward GEMM (``dgrad``, ``wgrad``)."""
        pooled: dict[str, GradStat] = {}
        for (_, g), s in self.stats.items():
            p = pooled.setdefault(g, GradStat())
            p.err2 += s.err2
            p.ref2 += s.ref2
            p.diff_sum += s.diff_sum
            p.abs_sum += s.abs_sum
            p.n += s.n
        return {g: s.summary() for g, s in sorted(pooled.items())}


GRAD_PROBES: list[GradProbe] = []

#: the backward of an inference-recipe layer (the ``linear`` op kind): both backward GEMMs in
#: high precision on the unquantized operands (straight-through the forward quantization)
_HIGH = TrainingSpec(None, None, None)


# ---------------------------------------------------------------------------------------------
# the autograd function

def is_sr(ts: TensorSpec | None) -> bool:
    return ts is not None and ts.rounding.lower() in ("sr", "stochastic")


def role_bits(ts: TensorSpec, natural_shape: tuple[int, ...], module: str, role: str, *,
          batch: bool, device: torch.device) -> torch.Tensor:
    """Counter bits for an operand in its natural layout (``batch``: its first axis is the
    batch, offset by the seed source's ``row_offset``)."""
    src = active_seed()
    if src is None:
        if ts.seed is None:
            raise SRSeedError(
                f"{module}: role {role!r} uses stochastic rounding ({ts.describe()}) but no seed "
                "source is active: run the backward inside "
                "precisim.emulation.training.seed_scope(seed, step) (what train() does), or "
                "give the tensor spec a 'seed'")
        seed, step, off = ts.seed, 0, 0
    else:
        seed, step, off = src.seed, src.step, src.row_offset
    return element_bits(natural_shape, ts.sr_bits or 30, key_of(seed, step, module, role),
                        row_offset=off if batch else 0, device=device)


def quantize_role(x: torch.Tensor, ts: TensorSpec | None, spec: GemmSpec, rand: torch.Tensor | None,
           handle: Any, module: str, role: str) -> Operand:
    # saturation / underflow counts of backward operands only while a GradProbe is active
    # (counting them costs about as much as quantizing them)
    tel = getattr(handle, "telemetry", None) if GRAD_PROBES else None
    return quantize_operand(x, ts, axis=-1, need_parts=needs_parts(spec), telemetry=tel,
                            where=(module, role), rand=rand)


def _transpose_invariant(ts: TensorSpec | None) -> bool:
    """True when quantizing an operand to ``ts`` commutes with transposing it: an element
    format, a per-tensor scale, or square 2-D tiles, with deterministic rounding (so the
    forward's quantized W serves as dgrad's W^T, and dgrad's quantized dy as wgrad's dy^T,
    bit for bit: tests/test_training.py)."""
    if ts is None or is_sr(ts):
        return False
    fmt = ts.resolve(-1)
    if not isinstance(fmt, ScaledFormat):
        return True
    g = fmt.granularity
    if g.keep_axis is not None:
        return False
    sizes = [size for _, size in g.blocks]
    return not sizes or (len(sizes) == 2 and sizes[0] == sizes[1] and sizes[0] is not None)


def _forward_weight(layer: Any, weight: torch.Tensor, g: GemmSpec) -> Operand | None:
    """The forward's quantized weight (N, K) from the emulation's weight cache, when dgrad's
    weight role has the same transposition-invariant spec and no block-scaled unit (else
    None: dgrad quantizes W^T itself)."""
    fwd = getattr(layer, "spec", None)
    if (fwd is None or fwd.weight != g.weight or not _transpose_invariant(g.weight)
            or needs_parts(g) or needs_parts(fwd) or GRAD_PROBES):
        return None
    return layer._handle._weight(layer._name, weight, fwd, layer.transposed)


def plain_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                  transposed: bool) -> torch.Tensor:
    """The layer's own forward on plain tensors (nn.Linear, or transformers' Conv1D)."""
    if not transposed:
        return nn.functional.linear(x, w, b)
    out = x.reshape(-1, x.shape[-1])
    out = torch.mm(out, w) if b is None else torch.addmm(b, out, w)
    return out.reshape(*x.shape[:-1], w.shape[-1])


class LinearGrad(torch.autograd.Function):
    """``LinearGrad.apply(y, x, weight, bias, layer)``: returns ``y`` (the emulated forward
    value) with the backward of ``layer``'s :class:`TrainingSpec` (see the module docstring).
    ``layer`` has ``_name``, ``transposed``, ``_handle`` and ``training_spec``."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, layer: Any) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.layer = layer
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, bias = ctx.saved_tensors
        layer = ctx.layer
        spec: TrainingSpec = getattr(layer, "training_spec", None) or _HIGH
        name, tr, handle = layer._name, layer.transposed, layer._handle
        need_x, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_b = bias is not None and ctx.needs_input_grad[3]
        rht_on = set(spec.hadamard.gemms) if spec.hadamard is not None else set()
        emu_d = need_x and (spec.dgrad is not None or "dgrad" in rht_on)
        emu_w = need_w and (spec.wgrad is not None or "wgrad" in rht_on)
        probing = bool(GRAD_PROBES)
        ref = [None, None, None]
        if (need_x and not emu_d) or (need_w and not emu_w) or need_b or (
                probing and (emu_d or emu_w)):
            with torch.enable_grad():
                xd = x.detach().requires_grad_(need_x)
                wd = weight.detach().requires_grad_(need_w)
                bd = None if bias is None else bias.detach().requires_grad_(need_b)
                y = plain_linear(xd, wd, bd, tr)
                ins = [t for t, n in ((xd, need_x), (wd, need_w), (bd, need_b)) if n]
                got = list(torch.autograd.grad(y, ins, gy))
            for i, n in enumerate((need_x, need_w, need_b)):
                if n:
                    ref[i] = got.pop(0)
        gx, gw, gb = ref
        w_nk = weight.t() if tr else weight  # (N, K) in nn.Linear layout
        n_out, k_in = w_nk.shape
        gy2 = gy.reshape(-1, n_out)
        step_src = active_seed()
        step = step_src.step if step_src is not None else 0
        shared_dy: Operand | None = None
        if emu_d:
            g = spec.dgrad or GemmSpec()
            a, b_t = gy2, w_nk.t()  # (M, N), (K, N): reduction over N
            if "dgrad" in rht_on:
                t = random_hadamard(spec.hadamard.size, spec.hadamard.seed, step, name)
                a, b_t = rht(a, t), rht(b_t, t)
            ra = role_bits(g.input, tuple(gy.shape), name, "dgrad.input", batch=True,
                       device=gy.device).reshape(a.shape) if is_sr(g.input) else None
            rb = role_bits(g.weight, tuple(b_t.shape), name, "dgrad.weight", batch=False,
                       device=gy.device) if is_sr(g.weight) else None
            qa = quantize_role(a, g.input, g, ra, handle, f"{name}.dgrad", "input")
            fw = None if "dgrad" in rht_on else _forward_weight(layer, weight, g)
            qb = Operand(fw.values.t()) if fw is not None else quantize_role(
                b_t, g.weight, g, rb, handle, f"{name}.dgrad", "weight")
            if (emu_w and spec.wgrad is not None and spec.wgrad.input == g.input
                    and not rht_on and _transpose_invariant(g.input) and not needs_parts(g)
                    and not needs_parts(spec.wgrad) and not GRAD_PROBES):
                shared_dy = qa  # wgrad's dy^T is this quantized dy, transposed
            out = gemm(qa, qb, g, out_dtype=gy.dtype).reshape(x.shape).to(x.dtype)
            for p in GRAD_PROBES:
                p.add(name, "dgrad", out, gx)
            gx = out
        if emu_w:
            g = spec.wgrad or GemmSpec()
            x2 = x.reshape(-1, k_in)
            # (N, M), (K, M): reduction over the tokens M (a partial last block is padded)
            a, b_t = gy2.t(), x2.t()
            if "wgrad" in rht_on:
                t = random_hadamard(spec.hadamard.size, spec.hadamard.seed, step, name)
                a, b_t = rht(a, t), rht(b_t, t)
            ra = role_bits(g.input, tuple(gy.shape), name, "wgrad.input", batch=True,
                       device=gy.device).reshape(-1, n_out).t() if is_sr(g.input) else None
            rb = role_bits(g.weight, tuple(x.shape), name, "wgrad.weight", batch=True,
                       device=gy.device).reshape(-1, k_in).t() if is_sr(g.weight) else None
            qa = Operand(shared_dy.values.t()) if shared_dy is not None else quantize_role(
                a, g.input, g, ra, handle, f"{name}.wgrad", "input")
            qb = quantize_role(b_t, g.weight, g, rb, handle, f"{name}.wgrad", "weight")
            out = gemm(qa, qb, g, out_dtype=torch.float32)  # (N, K)
            out = (out.t() if tr else out).to(weight.dtype)
            for p in GRAD_PROBES:
                p.add(name, "wgrad", out, gw)
            gw = out
        return None, gx, gw, gb, None


def attach_linear_grad(y: torch.Tensor, x: torch.Tensor, layer: Any) -> torch.Tensor:
    """``y`` (computed without autograd) with :class:`LinearGrad`'s backward when autograd
    needs one (grad enabled and x or a parameter requires grad); else ``y`` unchanged."""
    o = layer._orig
    if not torch.is_grad_enabled() or not (
            x.requires_grad or o.weight.requires_grad
            or (o.bias is not None and o.bias.requires_grad)):
        return y
    return LinearGrad.apply(y.detach(), x, o.weight, o.bias, layer)


def check_layer(name: str, module: nn.Module, spec: TrainingSpec, transposed: bool) -> None:
    """Checks of a layer's weight-side blocks done when the emulation is applied: the forward
    weight (N, K) and the dgrad weight W^T (K, N) (a block that does not divide the
    transposed axis raises :class:`RecipeError` naming it)."""
    w = module.weight
    n, k = (w.shape[1], w.shape[0]) if transposed else tuple(w.shape)
    if spec.forward is not None:
        check_blocks(spec.forward.weight, (n, k), f"{name}: forward weight (W)")
    if spec.dgrad is not None:
        check_blocks(spec.dgrad.weight, (k, n), f"{name}: dgrad weight (W^T)")
    h = spec.hadamard
    if h is not None and "dgrad" in h.gemms and n % h.size:
        raise RecipeError(f"{name}: random Hadamard transform of size {h.size} on dgrad: the "
                          f"reduction axis N={n} is not a multiple of {h.size}")


class AttentionGrad(torch.autograd.Function):
    """``AttentionGrad.apply(out, q, k, v, sinks, fn)``: the emulated attention output ``out``
    with the high-precision backward of ``fn(q, k, v)`` (the model's own eager attention,
    recomputed on the unquantized q, k, v: straight through the emulated matmuls and KV-cache
    rounding). ``sinks``: the sink logits the call passed (gpt-oss's ``s_aux``) or None; their
    gradient is autograd's through the same recomputation (the eager softmax over
    ``[scores, sink]``: ``-sum_(b, q) P_sink * rowsum(dP * P)``, docs/training.md section 1),
    so it reaches the sinks parameter as in plain PyTorch."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                sinks: torch.Tensor | None, fn: Any) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        # the tensor itself (not detached, not saved): fn's graph reaches it (the eager
        # attention reads it, or the module parameter it is), and its gradient is taken there
        ctx.sinks = sinks
        ctx.fn = fn
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        q, k, v = ctx.saved_tensors
        need = ctx.needs_input_grad[1:5]
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), need[:3])]
            ref = ctx.fn(*ins)
            wanted = [t for t, n in zip((*ins, ctx.sinks), need) if n]
            # (allow_unused: an eager function that ignores the sinks gives them no gradient)
            got = list(torch.autograd.grad(ref, wanted, gy, allow_unused=True)) if wanted \
                else []
        grads = [got.pop(0) if n else None for n in need]
        return (None, *grads, None)


def attach_attention_grad(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, fn: Any, sinks: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """``out`` with :class:`AttentionGrad`'s backward when autograd needs one (``sinks``: the
    call's sink logits, or None)."""
    if sinks is not None and not isinstance(sinks, torch.Tensor):
        sinks = None
    leaves = (q, k, v) if sinks is None else (q, k, v, sinks)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in leaves):
        return out
    return AttentionGrad.apply(out.detach(), q, k, v, sinks, fn)


class StraightThrough(torch.autograd.Function):
    """``StraightThrough.apply(q, x)``: the rounded ``q`` forward, the gradient passed to ``x``
    unchanged (a quantizer's straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return q.view_as(q)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        return None, gy


def straight_through(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``q`` (``x`` rounded) with the gradient of ``x`` when autograd needs one."""
    if not torch.is_grad_enabled() or not x.requires_grad:
        return q
    return StraightThrough.apply(q.detach(), x)


class OwnBackward(torch.autograd.Function):
    """``OwnBackward.apply(y, own, module, kind)``: the emulated value ``y`` forward; the
    gradient goes to ``own``, the module's own operation on the unquantized inputs (already
    in autograd's graph), so the backward is PyTorch's (docs/training.md section 1c). Each
    backward call is recorded in every active :class:`GradProbe`."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, own: torch.Tensor, module: str,
                kind: str) -> torch.Tensor:
        ctx.where = (module, kind)
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        for p in GRAD_PROBES:
            p.note_straight_through(*ctx.where)
        return None, gy, None, None


def own_backward(y: torch.Tensor, own: torch.Tensor, module: str, kind: str) -> torch.Tensor:
    """``y`` (the emulated result, ``own``'s dtype and shape) with the backward of ``own``
    (docs/training.md section 1c); ``y`` itself when ``own`` needs no gradient."""
    if not (torch.is_grad_enabled() and own.requires_grad):
        return y
    if y.shape != own.shape or y.dtype != own.dtype:
        raise ValueError(f"{module}: emulated result {tuple(y.shape)} {y.dtype} does not "
                         f"match the module's own {tuple(own.shape)} {own.dtype}")
    return OwnBackward.apply(y.detach(), own, module, kind)
