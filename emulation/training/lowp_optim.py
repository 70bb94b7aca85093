"""Optimizer states in a low-precision format and dynamic loss scaling (docs/training.md
section 7).

* :class:`StateFormat` / :class:`LowPrecisionAdamW`: AdamW whose moments ``m`` and ``v`` are
  *stored* in a narrow format between steps (bf16, or FP8 E4M3 with a per-tensor fp32 scale
  ``amax / 448``), rounded to nearest even or stochastically with replayable bits keyed by
  (seed, step, parameter name, moment) (:mod:`.sr`). Each step reads the stored moments,
  updates them in fp32 exactly as ``torch.optim.AdamW`` does (single-tensor path), uses the
  fp32 values for this step's update, then rounds them for storage. With ``fp32`` states the
  optimizer is ``torch.optim.AdamW`` bit for bit (tests/test_training_optim.py). The stored
  moments are compact: bf16 states are ``torch.bfloat16`` tensors (2 bytes an element), FP8
  states ``torch.float8_e4m3fn`` codes (1 byte) with their per-tensor scale a Python float in
  the state (``exp_avg_scale``, ``exp_avg_sq_scale``); both hold the rounded values exactly,
  so decoding (``codes.float() * scale``) gives back the very fp32 values the step rounded
  and the trajectory is that of fp32-held rounded moments, bit for bit. :meth:`moments`
  returns them decoded.
* :class:`LossScaler`: dynamic loss scaling for low-precision gradients: the loss is
  multiplied by ``scale`` before the backward; before the step the gradients are divided by
  it and checked; a non-finite gradient skips the step and multiplies the scale by
  ``backoff`` (at least ``min_scale``); ``interval`` finite steps in a row multiply it by
  ``growth``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from precisim.formats import quantize

from .sr import element_bits, key_of

__all__ = ["ENCODE_CHUNK", "STATE_FORMATS", "LossScaler", "LossScaling", "LowPrecisionAdamW",
           "StateFormat", "peak_bytes"]

#: the accepted optimizer-state formats: name -> (element format, per-tensor scale, SR)
STATE_FORMATS: dict[str, tuple[str, bool, bool]] = {
    "fp32": ("fp32", False, False),
    "bf16": ("bf16", False, False),
    "bf16-sr": ("bf16", False, True),
    "fp8": ("e4m3", True, False),
    "fp8-sr": ("e4m3", True, True),
}
_FP8_MAX = 448.0
#: the storage dtype of each element format (holds its values exactly)
_STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn}
_MOMENTS = ("exp_avg", "exp_avg_sq")
#: elements rounded at a time when the moments are stored (bounds the step's temporaries)
ENCODE_CHUNK = 1 << 18


@dataclass(frozen=True)
class StateFormat:
    """How AdamW's moments are stored: ``name`` one of :data:`STATE_FORMATS`; ``sr_bits``
    random bits of stochastic rounding."""

    name: str = "fp32"
    sr_bits: int = 16

    def __post_init__(self) -> None:
        if self.name not in STATE_FORMATS:
            import difflib

            close = difflib.get_close_matches(str(self.name), STATE_FORMATS, n=1)
            hint = f"; did you mean {close[0]!r}" if close else ""
            raise ValueError(f"unknown optimizer-state format {self.name!r}{hint}; available: "
                             f"{', '.join(STATE_FORMATS)}")
        if isinstance(self.sr_bits, bool) or not isinstance(self.sr_bits, int) \
                or not 1 <= self.sr_bits <= 30:
            raise ValueError(f"optimizer states: sr_bits={self.sr_bits!r} is not valid: "
                             "accepted 1..30")

    @property
    def element(self) -> str:
        return STATE_FORMATS[self.name][0]

    @property
    def scaled(self) -> bool:
        return STATE_FORMATS[self.name][1]

    @property
    def stochastic(self) -> bool:
        return STATE_FORMATS[self.name][2]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the moments are stored in (it holds the format's values exactly)."""
        return _STORAGE[self.element]

    def encode(self, x: torch.Tensor, *, seed: int, step: int, name: str, moment: str,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """``x`` (float32) rounded to this format (with its per-tensor scale when ``scaled``:
        ``scale = amax / 448``, 1 for an all-zero tensor), as (codes in :attr:`dtype`,
        scale); ``decode`` of them is the rounded value. The rounding runs over slices of
        :data:`ENCODE_CHUNK` elements (it is elementwise once the scale is known; the SR bits
        are keyed by the element's position in the whole tensor), so its temporaries are
        bounded whatever the tensor's size; ``out`` (contiguous, :attr:`dtype`, ``x``'s
        shape) receives the codes in place (docs/training.md section 7)."""
        if self.name == "fp32":
            return x, 1.0
        scale = 1.0
        if self.scaled:
            amax = float(x.abs().max()) if x.numel() else 0.0
            scale = amax / _FP8_MAX if amax > 0 and math.isfinite(amax) else 1.0
        if out is None or out.shape != x.shape or out.dtype != self.dtype \
                or not out.is_contiguous():
            out = torch.empty(x.shape, dtype=self.dtype, device=x.device)
        flat, codes = x.reshape(-1), out.view(-1)
        key = key_of(seed, step, name, moment) if self.stochastic else None
        for lo in range(0, flat.numel(), ENCODE_CHUNK):
            y = flat[lo:lo + ENCODE_CHUNK]
            y = y / scale if scale != 1.0 else y
            if key is not None:
                r = element_bits((y.numel(),), self.sr_bits, key, row_offset=lo,
                                 device=y.device)
                q = quantize(y, self.element, "sr", sr_bits=self.sr_bits, rand=r)
            else:
                q = quantize(y, self.element)
            codes[lo:lo + y.numel()].copy_(q)
        return out, scale

    @staticmethod
    def decode(codes: torch.Tensor, scale: float) -> torch.Tensor:
        """The float32 values of stored ``codes`` with their per-tensor ``scale``."""
        q = codes.float()
        return q * scale if scale != 1.0 else q

    def store(self, x: torch.Tensor, *, seed: int, step: int, name: str,
              moment: str) -> torch.Tensor:
        """``x`` (float32) rounded to this format, as float32 (``decode(encode(x))``)."""
        if self.name == "fp32":
            return x
        return self.decode(*self.encode(x, seed=seed, step=step, name=name, moment=moment))


class LowPrecisionAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) with moments stored in
    ``states`` (a :class:`StateFormat` or its name); ``named_params``: (name, parameter)
    pairs (the names key the stochastic-rounding bits); ``seed``: their seed."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, states: StateFormat | str = "fp32",
                 seed: int = 0) -> None:
        named = list(named_params)
        self.states = states if isinstance(states, StateFormat) else StateFormat(states)
        self.seed = seed
        self._names = {id(p): n for n, p in named}
        super().__init__([p for _, p in named],
                         {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One AdamW step, parameter by parameter: the fp32 temporaries of one parameter (its
        decoded m and v and the update's denominator) are freed before the next parameter's
        are made, and the moments are rounded into their stored codes in place, in slices
        (:meth:`StateFormat.encode`); docs/training.md section 7."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.nn.Parameter, group: dict[str, Any]) -> None:
        lr, (beta1, beta2) = group["lr"], group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0)
            for k in _MOMENTS:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format,
                                         dtype=self.states.dtype)
                st[f"{k}_scale"] = 1.0
        grad = p.grad
        # fp32 states are updated in place; the others are decoded to fp32 copies
        m, v = (self.states.decode(st[k], st.get(f"{k}_scale", 1.0)) for k in _MOMENTS)
        st["step"] += 1
        step = float(st["step"])
        if wd != 0:
            p.mul_(1 - lr * wd)
        # the torch.optim.AdamW single-tensor update, op for op
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        # in place (the same IEEE operations as torch's out-of-place division)
        denom = v.sqrt().div_(bias_correction2 ** 0.5).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
        del denom
        if self.states.name == "fp32":
            return
        name = self._names.get(id(p), "")
        for k, x in zip(_MOMENTS, (m, v)):  # rounded into the stored codes in place
            st[k], st[f"{k}_scale"] = self.states.encode(
                x, seed=self.seed, step=int(step), name=name, moment=k, out=st[k])

    def moments(self, p: torch.nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored moments (m, v) of ``p`` decoded to float32."""
        st = self.state[p]
        return tuple(self.states.decode(st[k], st.get(f"{k}_scale", 1.0))  # type: ignore
                     for k in _MOMENTS)

    def state_bytes(self) -> int:
        """Bytes held by the optimizer's state tensors (moments and step counters)."""
        return sum(t.numel() * t.element_size() for st in self.state.values()
                   for t in st.values() if isinstance(t, torch.Tensor))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer``'s (which casts the moments to the parameter's dtype),
        then the moments back to their compact dtype (exact: they hold format values). A
        state saved before the moments were compact (no ``<moment>_scale``: fp32 tensors of
        the scaled values) is kept as it is, and compacted by the next step."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for k in _MOMENTS:
                if k in st and f"{k}_scale" in st and st[k].dtype != self.states.dtype:
                    st[k] = st[k].to(self.states.dtype)


def peak_bytes(fn: Any) -> int:
    """The peak of the CPU bytes allocated by ``fn()`` and not yet freed, over its run, from
    torch's memory profiler (allocation and free events in time order). Blocks allocated
    before the call and freed during it are not seen (the profiler records no size for
    them), so replacing a tensor counts its new allocation only."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@dataclass(frozen=True)
class LossScaling:
    """Dynamic loss scaling: initial ``scale``, ``growth`` after ``interval`` finite steps,
    ``backoff`` on a non-finite gradient, never below ``min_scale``."""

    scale: float = 2.0 ** 16
    growth: float = 2.0
    backoff: float = 0.5
    interval: int = 100
    min_scale: float = 2.0 ** -24

    def __post_init__(self) -> None:
        for name, ok, accepted in (
                ("scale", self.scale > 0 and math.isfinite(self.scale), "a finite number > 0"),
                ("growth", self.growth >= 1 and math.isfinite(self.growth), "a number >= 1"),
                ("backoff", 0 < self.backoff < 1, "0 < backoff < 1"),
                ("min_scale", 0 < self.min_scale <= self.scale, "0 < min_scale <= scale")):
            if not ok:
                raise ValueError(f"loss scaling: {name}={getattr(self, name)!r} is not valid: "
                                 f"accepted {accepted}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) \
                or self.interval < 1:
            raise ValueError(f"loss scaling: interval={self.interval!r} is not valid: accepted "
                             "an integer >= 1")


class LossScaler:
    """The state of :class:`LossScaling` over a run (checkpointed with ``state_dict``)."""

    def __init__(self, cfg: LossScaling) -> None:
        self.cfg = cfg
        self.scale = cfg.scale
        self.good = 0
        self.skipped = 0

    def unscale(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide every gradient by the scale; True when all of them are finite (else the
        gradients are left as they are and the step must be skipped)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            return False
        for g in grads:
            g.div_(self.scale)
        return True

    def update(self, finite: bool) -> None:
        """Back off after a non-finite step; grow after ``interval`` finite ones."""
        if not finite:
            self.scale = max(self.scale * self.cfg.backoff, self.cfg.min_scale)
            self.good = 0
            self.skipped += 1
            return
        self.good += 1
        if self.good == self.cfg.interval:
            self.scale *= self.cfg.growth
            self.good = 0

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "good": self.good, "skipped": self.skipped}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.scale, self.good, self.skipped = float(d["scale"]), int(d["good"]), int(d["skipped"])
