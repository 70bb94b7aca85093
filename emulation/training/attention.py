"""Training roles of the attention matmuls' backward GEMMs (docs/training.md section 1b).

The attention ``O = P V`` with ``P = softmax(S)``, ``S = scaling * Q K^T + mask`` runs four
backward GEMMs, each a :class:`~precisim.emulation.specs.GemmSpec` whose operands are blocked
along that GEMM's own reduction axis (the last axis of the operand as listed):

* ``dp``: ``dP = dO V^T``, reduction over the head dimension d; ``input`` = dO (q, d),
  ``weight`` = V (k, d);
* ``dv``: ``dV = P^T dO``, reduction over the queries; ``input`` = P^T (k, q), ``weight`` =
  dO^T (d, q);
* ``dq``: ``dQ = scaling * dS K``, reduction over the keys; ``input`` = dS (q, k),
  ``weight`` = K^T (d, k);
* ``dk``: ``dK = scaling * dS^T Q``, reduction over the queries; ``input`` = dS^T (k, q),
  ``weight`` = Q^T (d, q).

P is recomputed from the unquantized q and k in fp32 (as FlashAttention's backward recomputes
it), the softmax backward ``dS = P * (dP - rowsum(dP * P))`` runs in fp32, ``scaling`` is
applied to the GEMM outputs, and with grouped-query attention the per-head dK and dV are
summed over each key/value head's group in fp32. The variants the inference path supports
(docs/attention-datapath.md section 1) are modelled too (docs/training.md section 1b): an
ALiBi or other finite bias in the additive mask; Gemma-2's soft cap
``S = cap * tanh(scaling * Q K^T / cap) + mask``, whose derivative ``1 - tanh^2`` multiplies
dS (fp32) before the dq / dk GEMMs, so their ``input`` is the gradient of the capped
product; attention sinks (gpt-oss's ``s_aux``: one logit per head in the softmax
denominator, V = 0), whose gradient ``-sum_(b, q) P_sink * rowsum(dP * P)`` is summed in fp32.
The sliding window arrives in the mask (the model's eager function ignores its
``sliding_window`` argument), so it needs a mask. ``None`` (``high``) is the fp32 GEMM on the
unquantized operands. Stochastic rounding draws replayable counter bits keyed by (seed, step,
module, ``<gemm>.<role>``, element position in the operand's natural (b, h, rows, cols)
layout). A :class:`AttentionTrainingSpec` is the spec of the opt-in ``train_attention`` op
kind (registered by :mod:`.layer`, after ``train_linear``); a recipe without it keeps the
high-precision eager backward bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from ..flash import check_extras
from ..opkinds import EmulationError, Installer, OpKind
from ..specs import AttentionSpec, GemmSpec, RecipeError
from .autograd import GRAD_PROBES, is_sr, quantize_role, role_bits
from .roles import check_blocks, is_high, parse_gemm_roles

__all__ = ["ATTN_GEMMS", "TRAIN_ATTENTION", "AttentionGrads", "AttentionTrainGrad",
           "AttentionTrainingSpec", "attach_attention_train_grad", "attention_backward",
           "attention_grads", "SINK_ARGS", "sink_args"]

ATTN_GEMMS = ("dq", "dk", "dp", "dv")
_UNSET: Any = object()
#: attention-function arguments that carry sink logits (gpt-oss passes ``s_aux``)
SINK_ARGS = ("s_aux", "sinks")
#: stands for a sequence axis in install-time block checks (its partial last block is padded)
_ANY = 1 << 20


@dataclass(frozen=True)
class AttentionTrainingSpec:
    """The attention's forward (an :class:`AttentionSpec`, None = high precision) and its four
    backward GEMMs (see the module docstring); every backward GEMM must be given (None =
    high precision)."""

    forward: AttentionSpec | None = None
    dq: GemmSpec | None = _UNSET
    dk: GemmSpec | None = _UNSET
    dp: GemmSpec | None = _UNSET
    dv: GemmSpec | None = _UNSET

    def __post_init__(self) -> None:
        if self.forward is not None and not isinstance(self.forward, AttentionSpec):
            raise RecipeError(f"attention training spec: forward={self.forward!r} is not an "
                              "AttentionSpec or None")
        for g in ATTN_GEMMS:
            v = getattr(self, g)
            if v is _UNSET:
                raise RecipeError(f"attention training spec: the {g!r} GEMM has no spec; every "
                                  f"backward GEMM ({', '.join(ATTN_GEMMS)}) must be given: a "
                                  "format, a mapping of roles, or None / 'high'")
            if v is not None and not isinstance(v, GemmSpec):
                raise RecipeError(f"attention training spec: {g}={v!r} is not a GemmSpec or "
                                  "None")

    @property
    def is_identity(self) -> bool:
        # never identity: even all-high roles replace the eager backward by the GEMM-level one
        return False

    @classmethod
    def parse(cls, value: Any, where: str = "train_attention") -> AttentionTrainingSpec | None:
        if value is None or isinstance(value, AttentionTrainingSpec):
            return value
        kw: dict[str, Any] = parse_gemm_roles(value, ATTN_GEMMS, "forward", where,
                                              "backward GEMM")
        f = value.get("forward")
        kw["forward"] = None if is_high(f) else AttentionSpec.parse(f, f"{where}.forward")
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"forward": "high" if self.forward is None
                             else self.forward.to_dict()}
        d.update({g: "high" if getattr(self, g) is None else getattr(self, g).to_dict()
                  for g in ATTN_GEMMS})
        return d

    def describe(self) -> str:
        fwd = "high" if self.forward is None else self.forward.describe()
        return f"forward[{fwd}] " + " ".join(
            f"{g}[{'high' if getattr(self, g) is None else getattr(self, g).describe()}]"
            for g in ATTN_GEMMS)


def _role_gemm(spec: GemmSpec | None, a: torch.Tensor, b: torch.Tensor, nat_a: torch.Tensor,
               nat_b: torch.Tensor, tr_a: bool, tr_b: bool, name: str, which: str,
               handle: Any) -> torch.Tensor:
    """``a @ b^T`` (batched, reduction over the last axis) under ``spec`` (None: fp32 on the
    unquantized operands); SR bits are drawn on the natural tensors ``nat_*`` and transposed
    like the operand when ``tr_*``."""
    from ..gemm import gemm

    g = spec or GemmSpec()
    rand = []
    for ts, nat, tr, role in ((g.input, nat_a, tr_a, "input"), (g.weight, nat_b, tr_b,
                                                                   "weight")):
        r = None
        if is_sr(ts):
            r = role_bits(ts, tuple(nat.shape), name, f"{which}.{role}", batch=True,
                      device=nat.device)
            r = r.transpose(-1, -2) if tr else r
        rand.append(r)
    qa = quantize_role(a.contiguous(), g.input, g, rand[0], handle, f"{name}.{which}", "input")
    qb = quantize_role(b.contiguous(), g.weight, g, rand[1], handle, f"{name}.{which}", "weight")
    out = gemm(qa, qb, g, out_dtype=torch.float32)
    if GRAD_PROBES and spec is not None:
        ref = torch.matmul(a.float(), b.float().transpose(-1, -2))
        for p in GRAD_PROBES:
            p.add(name, which, out, ref)
    return out


class AttentionGrads(NamedTuple):
    """The gradients of one attention call: dQ, dK, dV in their operands' dtypes and the
    sinks' gradient (h,) in theirs (None without sinks)."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dsinks: torch.Tensor | None


def attention_grads(spec: AttentionTrainingSpec, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                    d_out: torch.Tensor, *, name: str, handle: Any = None,
                    softcap: float | None = None, sinks: torch.Tensor | None = None
                    ) -> AttentionGrads:
    """dQ, dK, dV (and the sinks' gradient) of the standard eager attention (q: (b, h, q, d);
    k, v: (b, h_kv, k, d); ``d_out``: (b, q, h, d), the gradient of its transposed output;
    ``mask``: additive, its finite values a bias such as ALiBi; ``softcap``: Gemma-2's cap;
    ``sinks``: (h,) logits) under ``spec``'s backward GEMMs (module docstring)."""
    from ..attention import repeat_kv

    b, h, n_q, d = q.shape
    groups = h // k.shape[1]
    softcap, sinks = check_extras(softcap, sinks, h)
    qf = q.float()
    kr, vr = repeat_kv(k.float(), groups), repeat_kv(v.float(), groups)
    s = torch.matmul(qf, kr.transpose(-1, -2)) * scaling
    th = None
    if softcap is not None:  # the cap's tanh, kept for its derivative
        th = torch.tanh(s / softcap)
        s = th * softcap
    if mask is not None:
        s = s + mask[..., :kr.shape[-2]].float()
    p_sink = None
    if sinks is None:
        p = torch.softmax(s, dim=-1)  # (b, h, q, k), fp32
    else:  # the sink: one more logit per row, dropped after the softmax
        col = sinks.detach().float().reshape(1, h, 1, 1).expand(b, h, n_q, 1)
        full = torch.softmax(torch.cat([s, col], dim=-1), dim=-1)
        p, p_sink = full[..., :-1], full[..., -1]
    do = d_out.float().transpose(1, 2)  # (b, h, q, d)
    dv_r = _role_gemm(spec.dv, p.transpose(-1, -2), do.transpose(-1, -2), p, do, True, True,
                      name, "dv", handle)
    dp = _role_gemm(spec.dp, do, vr, do, vr, False, False, name, "dp", handle)
    rs = (dp * p).sum(-1, keepdim=True)  # the sink's dP is 0 (its V is 0)
    ds = p * (dp - rs)  # the softmax backward, fp32
    if th is not None:  # through the cap: d(cap * tanh(x / cap)) / dx = 1 - tanh^2
        ds = ds * (1 - th * th)
    dq = _role_gemm(spec.dq, ds, kr.transpose(-1, -2), ds, kr, False, True, name, "dq",
                    handle) * scaling
    dk_r = _role_gemm(spec.dk, ds.transpose(-1, -2), qf.transpose(-1, -2), ds, qf, True, True,
                      name, "dk", handle) * scaling

    def fold(t: torch.Tensor) -> torch.Tensor:  # GQA: sum each kv head's group
        return t.reshape(b, h // groups, groups, *t.shape[-2:]).sum(2)

    dsinks = None
    if sinks is not None and p_sink is not None:  # dS_sink = P_sink * (0 - rowsum(dP * P))
        dsinks = (-(p_sink * rs[..., 0])).sum((0, 2)).reshape(sinks.shape).to(sinks.dtype)
    return AttentionGrads(dq.to(q.dtype), fold(dk_r).to(k.dtype), fold(dv_r).to(v.dtype),
                          dsinks)


def attention_backward(spec: AttentionTrainingSpec, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                       d_out: torch.Tensor, *, name: str, handle: Any = None,
                       softcap: float | None = None, sinks: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV of :func:`attention_grads` (the sinks' gradient left out)."""
    g = attention_grads(spec, q, k, v, mask, scaling, d_out, name=name, handle=handle,
                        softcap=softcap, sinks=sinks)
    return g.dq, g.dk, g.dv


class AttentionTrainGrad(torch.autograd.Function):
    """``AttentionTrainGrad.apply(out, q, k, v, sinks, ctxinfo)``: the emulated attention
    output with :func:`attention_grads`'s gradients (``sinks``: the (h,) logits or None);
    ``ctxinfo`` = (spec, mask, scaling, name, handle, softcap)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, sinks: torch.Tensor | None, info: tuple) -> torch.Tensor:
        ctx.save_for_backward(q, k, v, sinks)
        ctx.info = info
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, sinks = ctx.saved_tensors
        spec, mask, scaling, name, handle, softcap = ctx.info
        g = attention_grads(spec, q, k, v, mask, scaling, gy, name=name, handle=handle,
                            softcap=softcap, sinks=sinks)
        need = ctx.needs_input_grad[1:5]
        return (None, *(t if n else None for t, n in zip(g, need)), None)


def sink_args(kwargs: dict) -> list[str]:
    """The names of the attention call's arguments that carry sink logits (of
    :data:`SINK_ARGS`, in that order)."""
    return [a for a in SINK_ARGS if kwargs.get(a) is not None]


def attach_attention_train_grad(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                v: torch.Tensor, module: torch.nn.Module,
                                mask: torch.Tensor | None, args: tuple, kwargs: dict,
                                spec: AttentionTrainingSpec, name: str, handle: Any
                                ) -> torch.Tensor:
    """``out`` with :class:`AttentionTrainGrad`'s backward when autograd needs one; raises
    :class:`EmulationError` for an attention call the GEMM-level backward does not model."""
    given = sink_args(kwargs)
    sinks = kwargs[given[0]] if given else None
    leaves = (q, k, v) if sinks is None else (q, k, v, sinks)
    if not torch.is_grad_enabled() or not any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in leaves):
        return out
    scaling = kwargs.get("scaling", args[0] if args else None)
    dropout = kwargs.get("dropout", args[1] if len(args) > 1 else 0.0)
    window = kwargs.get("sliding_window")
    if scaling is None or q.dim() != 4 or (module.training and dropout) or (
            mask is not None and (not mask.is_floating_point() or mask.dim() != 4)):
        raise EmulationError(
            f"{name}: train_attention models the standard eager attention (4-D q/k/v, a float "
            f"additive mask, a scaling, no dropout); this call has q of {q.dim()} dims, "
            f"scaling={scaling!r}, dropout={dropout if module.training else 0!r}: use the "
            "'attention' op kind (high-precision backward) here")
    if len(given) > 1:
        raise EmulationError(f"{name}: train_attention got sink logits twice ({given[0]!r} "
                             f"and {given[1]!r}): accepted one of {', '.join(SINK_ARGS)}")
    if window is not None and mask is None:
        raise EmulationError(f"{name}: train_attention got sliding_window={window!r} without "
                             "an attention mask: the window is read from the mask (as the "
                             "model's eager attention does); pass the model's mask")
    try:
        softcap, sinks = check_extras(kwargs.get("softcap"), sinks, q.shape[1])
    except ValueError as e:
        raise EmulationError(f"{name}: train_attention: {e}") from None
    info = (spec, mask, float(scaling), name, handle, softcap)
    return AttentionTrainGrad.apply(out.detach(), q, k, v, sinks, info)


def check_attention_module(name: str, module: torch.nn.Module, spec: AttentionTrainingSpec
                           ) -> None:
    """Install-time checks: blocks along the head dimension must divide it (dp's operands,
    and the transposed dq / dk / dv weights); sequence axes are padded."""
    d = getattr(module, "head_dim", None)
    if d is None:
        return
    shapes = {"dp": ((_ANY, d), (_ANY, d)), "dq": ((_ANY, _ANY), (d, _ANY)),
              "dk": ((_ANY, _ANY), (d, _ANY)), "dv": ((_ANY, _ANY), (d, _ANY))}
    for g in ATTN_GEMMS:
        gs = getattr(spec, g)
        if gs is None:
            continue
        for role, shape in zip(("input", "weight"), shapes[g]):
            check_blocks(getattr(gs, role), shape, f"{name}: {g} {role}")


def _validate(module: str, spec: AttentionTrainingSpec) -> None:
    from ..opkinds import check_attention, check_gemm

    if spec.forward is not None:
        check_attention(module, spec.forward)
    for g in ATTN_GEMMS:
        check_gemm(f"{module}.{g}", getattr(spec, g))


def install_train_attention(installer: Installer, entries: Sequence[Any]) -> None:
    """The ``train_attention`` op kind: the ``attention`` installer with each entry's forward
    spec, then the training spec on each module's attention state."""
    from ..patch import ACTIVE_ATTENTION, install_attention

    for e in entries:
        check_attention_module(e.module, installer.modules[e.module], e.spec)
    install_attention(installer, [replace(e, spec=e.spec.forward or AttentionSpec())
                                  for e in entries])
    for e in entries:
        ACTIVE_ATTENTION[installer.modules[e.module]].training = e.spec


def _is_attention(name: str, m: torch.nn.Module, model: torch.nn.Module) -> bool:
    from ..opkinds import dispatches_attention

    return dispatches_attention(m)


TRAIN_ATTENTION = OpKind(
    "train_attention", AttentionTrainingSpec, _is_attention, install_train_attention,
    tuple(f"{g}.{r}" for g in ("qk", "pv") for r in ("input", "weight", "output"))
    + ("k_cache", "v_cache") + tuple(f"{g}.{r}" for g in ATTN_GEMMS for r in ("input",
                                                                                "weight")),
    priority=5, default_on=False, validate=_validate,
    description="attention in training: its forward (an attention spec) and the backward "
    "GEMMs dq, dk, dp, dv each under its own spec (docs/training.md)")


