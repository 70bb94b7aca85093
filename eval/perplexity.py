"""Perplexity, KL divergence and top-1 agreement of emulated models against their reference.

Windows (rolling log-likelihood, the semantics of lm-evaluation-harness'
``loglikelihood_rolling`` / ``get_rolling_token_windows``): the token sequence is prefixed with
one ``prefix_token`` (BOS/EOS) so that its first token is predicted too; every token is
predicted exactly once, by a forward pass over at most ``window`` tokens; windows advance by
``stride`` predicted tokens, so each window (after the first) sees ``window - stride`` tokens of
extra context (``stride = window``: disjoint windows, lm-eval's default context of one token).

In the same pass, for every window, the unpatched model's log-probabilities are the reference
and every recipe is run on the same input (an :class:`~precisim.emulation.Emulation` handle per
recipe, entered per window; its weights are quantized once): per token the series the metrics
read (:mod:`precisim.eval.metrics`: by default the NLL, the KL divergence KL(reference ||
emulated) over the vocabulary, and whether the top-1 tokens agree), summarised per recipe by
every metric (:func:`summarize`). Deltas get paired bootstrap confidence intervals
(:mod:`precisim.eval.stats`, block bootstrap over token positions).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from precisim.emulation import Emulation, Recipe, Telemetry, WeightCache, get_recipe

from .distributed import Group
from .distributed import current as current_group
from .metrics import (
    Metric,
    MetricInputs,
    TokenBatch,
    TokenFn,
    nll_series,
    resolve_metrics,
    token_kl,
    token_nll,
)

__all__ = ["EvalResult", "RecipeResult", "evaluate", "prefixed", "rolling_windows", "summarize",
           "token_kl", "token_nll", "window_logprobs"]


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


@dataclass
class RecipeResult:
    """Per-token series (by series name: ``nll``, ``kl``, ``top1``...) and summary metrics of
    one recipe."""

    recipe: Recipe
    series: dict[str, np.ndarray]
    seconds: float = 0.0
    telemetry: dict[str, float] = field(default_factory=dict)
    telemetry_records: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def nll(self) -> np.ndarray:
        """Per-token negative log-likelihood (the ``nll`` series)."""
        return self.series["nll"]

    @property
    def kl(self) -> np.ndarray:
        """Per-token KL(reference || emulated) (the ``kl`` series)."""
        return self.series["kl"]

    @property
    def top1(self) -> np.ndarray:
        """Per-token top-1 agreement with the reference, 0.0 or 1.0 (the ``top1`` series)."""
        return self.series["top1"]


@dataclass
class EvalResult:
    """The reference's NLL per token, one :class:`RecipeResult` per recipe, the reference's
    series that paired metrics read (``ref_series``) and the metrics every recipe was
    summarised with (``metrics_used``, in order)."""

    ref_nll: np.ndarray
    results: list[RecipeResult]
    n_tokens: int
    window: int
    stride: int
    ref_seconds: float = 0.0
    ref_series: dict[str, np.ndarray] = field(default_factory=dict)
    metrics_used: tuple[Metric, ...] = ()

    @property
    def ref_ppl(self) -> float:
        return math.exp(float(self.ref_nll.mean()))

    def records(self) -> list[dict[str, Any]]:
        return [{"recipe": r.recipe.name, **r.metrics} for r in self.results]


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids[None], use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0])[0]


def _series_functions(metrics: Sequence[Metric]) -> tuple[dict[str, TokenFn], dict[str, TokenFn]]:
    """The token functions of every series the metrics read, and of those also computed on the
    reference."""
    fns: dict[str, TokenFn] = {}
    ref: dict[str, TokenFn] = {}
    for m in metrics:
        if m.series is not None and m.token is not None:
            fns.setdefault(m.series, m.token)
            if m.reference:
                ref.setdefault(m.series, m.token)
    return fns, ref


def evaluate(model: torch.nn.Module, tokens: Sequence[int] | torch.Tensor,
             recipes: Sequence[Recipe | str], *, window: int = 1024, stride: int | None = None,
             prefix_token: int | None = None, bootstrap: int = 1000, block: int = 32,
             seed: int = 0, telemetry: bool = True, progress: bool = False,
             weight_cache_bytes: int = 4 << 30,
             metrics: Sequence[str | Metric] | None = None, batch: int = 1,
             group: Group | None = None, progress_interval: float = 30.0,
             weight_cache: WeightCache | None = None) -> EvalResult:
    """Evaluate ``recipes`` on ``tokens`` against the unpatched ``model`` (see module doc).

    ``prefix_token``: the token prepended to the sequence (default: the model config's BOS,
    else EOS, else 0). ``metrics``: names in :data:`~precisim.eval.metrics.METRICS` (or
    :class:`~precisim.eval.metrics.Metric` objects) to compute per recipe, with those they
    require; default every registered metric: ``ppl``, ``delta_ppl`` (paired bootstrap CI),
    ``kl`` and ``top1`` (mean with CI), telemetry rates...

    Each recipe's quantized weights are kept from one window to the next while all recipes'
    caches together hold at most ``weight_cache_bytes``; beyond that a recipe's weights are
    quantized again for every window (same numbers, less memory). ``weight_cache``: a
    :class:`~precisim.emulation.WeightCache` shared with other evaluations of the model (a
    search's points reuse the weights quantized for the earlier ones; same numbers).

    In a torch.distributed group (``group``, default the initialised one) the windows are
    shared out between the ranks and gathered back in order (:mod:`.distributed`); ``batch``
    windows are computed between progress updates, each by its own forward (stacking windows
    into one forward would change BLAS shapes and per-tensor scales): no number depends on the
    world size or the batch size.

    ``progress``: a progress bar on a terminal; when stderr is not a terminal (a batch job's
    log) a line ``windows 3/16 (19%), 2.1 s/window, elapsed 6 s, ETA 27 s`` after a window, at
    most one every ``progress_interval`` seconds (and after the first and the last window).
    """
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch={batch!r} is not valid: accepted a positive integer")
    mets = resolve_metrics(metrics)
    fns, ref_fns = _series_functions(mets)
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
    grp = group or current_group()
    if grp.world_size > len(wins):
        raise ValueError(f"world size {grp.world_size} exceeds the {len(wins)} windows to "
                         f"evaluate: use at most {len(wins)} ranks (or more tokens)")
    recs = [get_recipe(r) if isinstance(r, str) else r for r in recipes]
    if isinstance(weight_cache_bytes, bool) or not isinstance(weight_cache_bytes, int) \
            or weight_cache_bytes < 0:
        raise ValueError(f"weight_cache_bytes={weight_cache_bytes!r} is not valid: accepted a "
                         "number of bytes >= 0")
    # the recipes' caches share the budget (each holds at most its part, at every moment)
    handles = [Emulation(model, r, telemetry=telemetry,
                         weight_cache_bytes=weight_cache_bytes // max(1, len(recs)),
                         weight_cache=weight_cache)
               for r in recs]
    mine = grp.shard(len(wins))
    local: dict[int, tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]] = {}
    secs = [0.0] * len(recs)
    ref_secs = 0.0
    steps = [mine[i:i + batch] for i in range(0, len(mine), batch)]
    it: Any = steps
    if progress:
        import sys

        if sys.stderr.isatty():
            from tqdm import tqdm

            it = tqdm(steps, desc="windows", unit=f"x{batch} win" if batch > 1 else "win")
        else:  # a log (batch job, redirected stderr): plain lines at a bounded rate
            it = LogProgress(steps, "windows", unit=f"x{batch} windows" if batch > 1
                             else "window", interval=progress_interval)
    with torch.no_grad():
        for step in it:
            for wi in step:
                w = wins[wi]
                ids = seq[w.start:w.end]
                t0 = time.perf_counter()
                ref_logits = logits_of(model, ids)
                ref_secs += time.perf_counter() - t0
                ref_lp, tgt = window_logprobs(ref_logits, seq, w)
                ref = TokenBatch(ref_lp, ref_lp, tgt)
                ref_nll_w = token_nll(ref_lp, tgt)
                ref_out = {"nll": ref_nll_w.numpy()}
                for s, fn in ref_fns.items():
                    ref_out[s] = (ref_nll_w if fn is nll_series else fn(ref)).numpy()
                outs = []
                for i, h in enumerate(handles):
                    t0 = time.perf_counter()
                    with h:
                        logits = logits_of(model, ids)
                    secs[i] += time.perf_counter() - t0
                    lp, _ = window_logprobs(logits, seq, w)
                    b = TokenBatch(ref_lp, lp, tgt, ref.ref_p, ref.ref_top)
                    outs.append({s: fn(b).numpy() for s, fn in fns.items()})
                local[wi] = (ref_out, outs)
    tel_local = [None if h.telemetry is None else h.telemetry.state() for h in handles]
    gathered = grp.gather((local, secs, ref_secs, tel_local))
    per_window: dict[int, Any] = {}
    for part in gathered:
        per_window.update(part[0])
    order = range(len(wins))
    ref_nll = np.concatenate([per_window[i][0]["nll"] for i in order])
    ref_arrays = {s: np.concatenate([per_window[i][0][s] for i in order]) for s in ref_fns}
    results = []
    for i, (r, h) in enumerate(zip(recs, handles)):
        series = {s: np.concatenate([per_window[w][1][i][s] for w in order]) for s in fns}
        rr = RecipeResult(r, series, sum(part[1][i] for part in gathered))
        if h.telemetry is not None:
            tel = Telemetry.merged([part[3][i] for part in gathered])
            rr.telemetry = tel.totals()
            rr.telemetry_records = tel.records()
        rr.metrics = summarize(ref_nll, rr, bootstrap=bootstrap, block=block, seed=seed,
                               metrics=mets, ref_series=ref_arrays)
        h.clear_cache()
        results.append(rr)
    return EvalResult(ref_nll, results, n_tokens, window, stride or window,
                      sum(part[2] for part in gathered), ref_arrays, mets)


class LogProgress:
    """Progress of a long loop as plain lines on stderr (for logs, where a progress bar's
    carriage returns are noise): after an item, ``<what> 3/16 (19%), 2.1 s/<unit>, elapsed 6 s,
    ETA 27 s``, at most one line every ``interval`` seconds, always after the first and the
    last item."""

    def __init__(self, items: Sequence[Any], what: str, *, unit: str = "item",
                 interval: float = 30.0, stream: Any = None) -> None:
        import sys

        self.items, self.what, self.unit = items, what, unit
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr

    def __iter__(self):  # noqa: ANN204
        n = len(self.items)
        t0 = last = time.perf_counter()
        for i, item in enumerate(self.items, 1):
            yield item
            now = time.perf_counter()
            if i == 1 or i == n or now - last >= self.interval:
                last = now
                rate = (now - t0) / i
                print(f"{self.what} {i}/{n} ({100 * i // n}%), {rate:.3g} s/{self.unit}, "
                      f"elapsed {now - t0:.0f} s, ETA {rate * (n - i):.0f} s",
                      file=self.stream, flush=True)


def summarize(ref_nll: np.ndarray, rr: RecipeResult, *, bootstrap: int = 1000,
              block: int = 32, seed: int = 0, metrics: Sequence[str | Metric] | None = None,
              ref_series: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """A recipe's summary: ``tokens``, every metric's number (in registry order) with its
    confidence interval (``<name>_low`` / ``<name>_high``) where it has one and ``bootstrap``
    resamples are asked for, and ``seconds``.

    ``metrics`` as in :func:`evaluate`; ``ref_series``: the reference's series by name (default
    ``{"nll": ref_nll}``). The bootstrap block is ``block`` tokens, at most a quarter of them.
    """
    mets = resolve_metrics(metrics)
    n = len(ref_nll)
    blk = max(1, min(block, n // 4 or 1))
    m: dict[str, Any] = {"tokens": n}
    inputs = MetricInputs(rr.series, {"nll": ref_nll} if ref_series is None else ref_series,
                          rr.telemetry, m)
    for met in mets:
        if met.ci is not None and bootstrap > 0 and n >= 2:
            ci = met.ci(met, inputs, n_resamples=bootstrap, block=blk, seed=seed)
            m.update(ci.to_dict(met.name))
        else:
            v = met.aggregate(inputs)
            if v is not None:
                m[met.name] = v
    m["seconds"] = rr.seconds
    return m
