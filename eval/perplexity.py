"""Perplexity, KL divergence and top-1 agreement of emulated models against their reference.

Windows (rolling log-likelihood, the semantics of lm-evaluation-harness'
``loglikelihood_rolling`` / ``get_rolling_token_windows``): the token sequence is prefixed with
one ``prefix_token`` (BOS/EOS) so that its first token is predicted too; every token is
predicted exactly once, by a forward pass over at most ``window`` tokens; windows advance by
``stride`` predicted tokens, so each window (after the first) sees ``window - stride`` tokens of
extra context (``stride = window``: disjoint windows, lm-eval's default context of one token).

In the same pass, for every window, the unpatched model's log-probabilities are the reference
and every recipe is run on the same input (an :class:`~precisim.emulation.Emulation` handle per
recipe, entered per window; its weights are quantized once): per token the NLL, the KL
divergence KL(reference || emulated) over the vocabulary, and whether the top-1 tokens agree.
Deltas get paired bootstrap confidence intervals (:mod:`precisim.eval.stats`, block bootstrap
over token positions).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from precisim.emulation import Emulation, Recipe, get_recipe

from .stats import Interval, mean_ci, ppl_delta

__all__ = ["EvalResult", "RecipeResult", "evaluate", "prefixed", "rolling_windows", "token_kl",
           "token_nll", "window_logprobs"]


@dataclass(frozen=True)
class Window:
    """Input ``seq[start:end]`` predicts ``seq[pred_start:end]`` (positions in the prefixed
    sequence; ``seq[0]`` is the prefix token)."""

    start: int
    end: int
    pred_start: int


def rolling_windows(n_tokens: int, window: int, stride: int | None = None) -> list[Window]:
    """The windows that predict each of ``n_tokens`` tokens once (see the module docstring)."""
    stride = window if stride is None else stride
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 1 and 1 <= stride <= window, got window={window}, "
                         f"stride={stride}")
    if n_tokens < 1:
        raise ValueError("no tokens to evaluate")
    out: list[Window] = []
    first = 1  # seq position of the first token not yet predicted
    while first <= n_tokens:
        last = min(first + stride, n_tokens + 1)  # exclusive
        start = max(0, last - 1 - window)
        out.append(Window(start, last - 1, first))
        first = last
    return out


def prefixed(tokens: Sequence[int] | torch.Tensor, prefix_token: int) -> torch.Tensor:
    """The sequence the windows index: ``[prefix_token, *tokens]`` (int64)."""
    toks = torch.as_tensor(list(tokens) if not isinstance(tokens, torch.Tensor) else tokens,
                           dtype=torch.long).flatten()
    return torch.cat([torch.tensor([prefix_token]), toks])


def window_logprobs(logits: torch.Tensor, seq: torch.Tensor, w: Window
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (float64) of the predicted positions of ``w`` from the window's
    logits, and the target tokens they predict."""
    k = w.pred_start - w.start - 1  # logit row predicting seq[pred_start]
    return torch.log_softmax(logits[k:].double(), dim=-1), seq[w.pred_start:w.end + 1]


def token_nll(lp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of ``tgt`` under log-probabilities ``lp``."""
    return -lp.gather(-1, tgt[:, None])[:, 0]


def token_kl(ref_lp: torch.Tensor, lp: torch.Tensor, ref_p: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Per-token KL(reference || emulated) over the vocabulary (``ref_p`` = ``ref_lp.exp()``
    when the caller already has it)."""
    return ((ref_lp.exp() if ref_p is None else ref_p) * (ref_lp - lp)).sum(-1)


@dataclass
class RecipeResult:
    """Per-token series and summary metrics of one recipe."""

    recipe: Recipe
    nll: np.ndarray
    kl: np.ndarray
    top1: np.ndarray
    seconds: float = 0.0
    telemetry: dict[str, float] = field(default_factory=dict)
    telemetry_records: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    """The reference's NLL per token and one :class:`RecipeResult` per recipe."""

    ref_nll: np.ndarray
    results: list[RecipeResult]
    n_tokens: int
    window: int
    stride: int
    ref_seconds: float = 0.0

    @property
    def ref_ppl(self) -> float:
        return math.exp(float(self.ref_nll.mean()))

    def records(self) -> list[dict[str, Any]]:
        return [{"recipe": r.recipe.name, **r.metrics} for r in self.results]


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids[None], use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0])[0]


def evaluate(model: torch.nn.Module, tokens: Sequence[int] | torch.Tensor,
             recipes: Sequence[Recipe | str], *, window: int = 1024, stride: int | None = None,
             prefix_token: int | None = None, bootstrap: int = 1000, block: int = 32,
             seed: int = 0, telemetry: bool = True, progress: bool = False,
             weight_cache_bytes: int = 4 << 30) -> EvalResult:
    """Evaluate ``recipes`` on ``tokens`` against the unpatched ``model`` (see module doc).

    ``prefix_token``: the token prepended to the sequence (default: the model config's BOS,
    else EOS, else 0). Metrics per recipe: ``ppl``, ``delta_ppl`` (paired bootstrap CI),
    ``kl`` and ``top1`` (mean with CI), telemetry rates.

    Each recipe's quantized weights are kept from one window to the next while all recipes'
    caches together hold at most ``weight_cache_bytes``; beyond that a recipe's weights are
    quantized again for every window (same numbers, less memory).
    """
    if prefix_token is None:
        cfg = getattr(model, "config", None)
        prefix_token = next((t for t in (getattr(cfg, "bos_token_id", None),
                                         getattr(cfg, "eos_token_id", None))
                             if isinstance(t, int)), 0)
    seq = prefixed(tokens, prefix_token)
    n_tokens = seq.numel() - 1
    if n_tokens == 0:
        raise ValueError("no tokens to evaluate (empty text?)")
    wins = rolling_windows(n_tokens, window, stride)
    recs = [get_recipe(r) if isinstance(r, str) else r for r in recipes]
    handles = [Emulation(model, r, telemetry=telemetry) for r in recs]
    ref_parts: list[torch.Tensor] = []
    parts: list[dict[str, list[torch.Tensor]]] = [{"nll": [], "kl": [], "top1": []}
                                                  for _ in recs]
    secs = [0.0] * len(recs)
    ref_secs = 0.0
    it: Any = wins
    if progress:
        from tqdm import tqdm

        it = tqdm(wins, desc="windows", unit="win")
    with torch.no_grad():
        for w in it:
            ids = seq[w.start:w.end]
            t0 = time.perf_counter()
            ref_logits = logits_of(model, ids)
            ref_secs += time.perf_counter() - t0
            ref_lp, tgt = window_logprobs(ref_logits, seq, w)
            ref_parts.append(token_nll(ref_lp, tgt))
            ref_top = ref_lp.argmax(-1)
            ref_p = ref_lp.exp()
            for i, h in enumerate(handles):
                t0 = time.perf_counter()
                with h:
                    logits = logits_of(model, ids)
                if sum(x.cache_bytes() for x in handles) > weight_cache_bytes:
                    h.clear_cache()
                secs[i] += time.perf_counter() - t0
                lp, _ = window_logprobs(logits, seq, w)
                parts[i]["nll"].append(token_nll(lp, tgt))
                parts[i]["kl"].append(token_kl(ref_lp, lp, ref_p).clamp_min(0))
                parts[i]["top1"].append((lp.argmax(-1) == ref_top).double())
    ref_nll = torch.cat(ref_parts).numpy()
    results = []
    for i, (r, h) in enumerate(zip(recs, handles)):
        rr = RecipeResult(r, torch.cat(parts[i]["nll"]).numpy(),
                          torch.cat(parts[i]["kl"]).numpy(),
                          torch.cat(parts[i]["top1"]).numpy(), secs[i])
        if h.telemetry is not None:
            rr.telemetry = h.telemetry.totals()
            rr.telemetry_records = h.telemetry.records()
        rr.metrics = summarize(ref_nll, rr, bootstrap=bootstrap, block=block, seed=seed)
        h.clear_cache()
        results.append(rr)
    return EvalResult(ref_nll, results, n_tokens, window, stride or window, ref_secs)


def summarize(ref_nll: np.ndarray, rr: RecipeResult, *, bootstrap: int = 1000,
              block: int = 32, seed: int = 0) -> dict[str, Any]:
    """Summary metrics with confidence intervals (``*_low`` / ``*_high``)."""
    n = len(ref_nll)
    blk = max(1, min(block, n // 4 or 1))
    m: dict[str, Any] = {"tokens": n, "ppl_ref": math.exp(float(ref_nll.mean())),
                         "ppl": math.exp(float(rr.nll.mean()))}
    cis: dict[str, Interval] = {}
    if bootstrap > 0 and n >= 2:
        cis["delta_ppl"] = ppl_delta(ref_nll, rr.nll, n_resamples=bootstrap, block=blk,
                                     seed=seed)
        cis["kl"] = mean_ci(rr.kl, n_resamples=bootstrap, block=blk, seed=seed)
        cis["top1"] = mean_ci(rr.top1, n_resamples=bootstrap, block=blk, seed=seed)
        for k, ci in cis.items():
            m.update(ci.to_dict(k))
    else:
        m["delta_ppl"] = m["ppl"] - m["ppl_ref"]
        m["kl"] = float(rr.kl.mean())
        m["top1"] = float(rr.top1.mean())
    m["delta_ppl_rel"] = m["delta_ppl"] / m["ppl_ref"]
    for k in ("saturated_rate", "flushed_rate", "nonfinite_rate", "scale_clamped_rate"):
        if k in rr.telemetry:
            m[k] = rr.telemetry[k]
    m["seconds"] = rr.seconds
    return m
