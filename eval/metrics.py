"""The accuracy metrics of an evaluation, as a registry: one :class:`Metric` per summary number.

A metric says

* how it is computed **per token** (``token``): from a window's reference and emulated
  log-probabilities and its target tokens (a :class:`TokenBatch`) to one float64 value per
  predicted token, the metric's *series* (``nll``, ``kl``, ``top1`` today). Metrics that read
  the same series (``ppl_ref``, ``ppl`` and ``delta_ppl`` all read ``nll``) name it in
  ``series`` and share one computation; ``reference=True`` also computes the series on the
  reference (the reference scored against itself) for paired statistics;
* how it is **aggregated** into its number (``aggregate``): ``ppl = exp(mean nll)``, the mean
  for ``kl`` and ``top1``, ``delta_ppl`` as the paired difference to the reference, the
  telemetry rates from the emulation's counters, ``delta_ppl_rel`` from other metrics'
  numbers (``requires``);
* its **confidence interval** (``ci``, a :class:`CIMethod` over :mod:`precisim.eval.stats`;
  the summary then holds ``<name>_low`` and ``<name>_high`` too), whether higher is better,
  and how tables show it (``label``, number format ``fmt``, which ``tables``, ``show_ci``).

Every metric is registered in :data:`METRICS` (a :class:`~precisim.formats.registry.Registry`,
qualified spelling ``metric:<name>``). :func:`precisim.eval.evaluate`, the spec sheet
(``metric_definitions``), :func:`precisim.eval.vendor_rows` / ``VENDOR_COLUMNS``, the CLI's
summary and report tables and the sweep records all take their metrics from it, so a new metric
is one registration::

    from precisim.eval.metrics import BLOCK_BOOTSTRAP_MEAN, Metric, register_metric

    def abs_logprob_error(b):   # |log p(target) - log p_ref(target)| per token
        return (b.lp - b.ref_lp).gather(-1, b.tgt[:, None])[:, 0].abs()

    register_metric(Metric(
        "target_lp_err", "absolute error of the target's log-probability", token=abs_logprob_error,
        aggregate=lambda x: float(x.test["target_lp_err"].mean()),
        formula="mean over tokens of |log p(target) - log p_ref(target)|",
        ci=BLOCK_BOOTSTRAP_MEAN, label="|Δ log p|", tables=("summary", "vendor", "report")))
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from precisim.formats.registry import Registry, UnknownNameError

from .stats import Interval, mean_ci, ppl_delta

__all__ = ["BLOCK_BOOTSTRAP_MEAN", "BUILTIN_METRICS", "CI_LEVEL", "CIMethod", "METRICS",
           "Metric", "MetricInputs", "PAIRED_BLOCK_BOOTSTRAP", "RESERVED_KEYS", "RUN_KEYS",
           "TABLES", "TokenBatch", "UnknownMetricError", "available_metrics", "definitions",
           "get_metric", "kl_series", "nll_series", "register_metric", "resolve_metrics",
           "table_cells", "table_columns", "telemetry_rate", "token_kl", "token_nll",
           "top1_series"]

#: the tables a metric can appear in: the CLI's summary (``precisim eval``), the vendor spec
#: table (:func:`precisim.eval.vendor_rows`) and the run-store report (``precisim report``)
TABLES = ("summary", "vendor", "report")

#: coverage of every confidence interval (the 2.5% and 97.5% bootstrap percentiles)
CI_LEVEL = 0.95

#: keys of a recipe's summary that are facts of the run, not metrics: tokens evaluated, seconds
RUN_KEYS = ("tokens", "seconds")

#: keys that summaries, sweep records and vendor rows use for other things; no metric (nor its
#: ``_low`` / ``_high`` / ``_ci`` keys) may take them
RESERVED_KEYS = frozenset(RUN_KEYS + (
    "recipe", "recipe_name", "content_hash", "cost", "bits_per_element", "model", "dataset",
    "sweep", "key", "params", "elapsed_s", "weights", "activations", "attention", "kv_cache",
    "scale", "rounding", "overflow", "unit", "acc_bits", "bits_w", "bits_a", "mem_w", "mem_kv",
    "dp_energy", "dp_area"))

_KEY_RE = re.compile(r"^[a-z][a-z0-9_]*$")


# ---------------------------------------------------------------------------------------------
# per-token computation

def token_nll(lp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of ``tgt`` under log-probabilities ``lp``."""
    return -lp.gather(-1, tgt[:, None])[:, 0]


def token_kl(ref_lp: torch.Tensor, lp: torch.Tensor, ref_p: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Per-token KL(reference || emulated) over the vocabulary (``ref_p`` = ``ref_lp.exp()``
    when the caller already has it)."""
    return ((ref_lp.exp() if ref_p is None else ref_p) * (ref_lp - lp)).sum(-1)


@dataclass(frozen=True)
class TokenBatch:
    """The predicted positions of one window: reference and emulated log-probabilities
    ``(n, vocab)`` (float64), the ``n`` target tokens, and two things every recipe of the window
    shares, computed once: ``ref_p = ref_lp.exp()`` and ``ref_top = ref_lp.argmax(-1)``."""

    ref_lp: torch.Tensor
    lp: torch.Tensor
    tgt: torch.Tensor
    ref_p: torch.Tensor = None  # type: ignore[assignment]  # filled in by __post_init__
    ref_top: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.ref_p is None:
            object.__setattr__(self, "ref_p", self.ref_lp.exp())
        if self.ref_top is None:
            object.__setattr__(self, "ref_top", self.ref_lp.argmax(-1))

    def reference(self) -> TokenBatch:
        """The reference scored against itself (``lp = ref_lp``): what a series is on the
        reference, for paired statistics."""
        return TokenBatch(self.ref_lp, self.ref_lp, self.tgt, self.ref_p, self.ref_top)


TokenFn = Callable[[TokenBatch], torch.Tensor]


def nll_series(b: TokenBatch) -> torch.Tensor:
    """Per-token negative log-likelihood of the target under the emulated model (nats)."""
    return token_nll(b.lp, b.tgt)


def kl_series(b: TokenBatch) -> torch.Tensor:
    """Per-token KL(reference || emulated) over the vocabulary (nats), clamped at 0 (rounding
    can make a zero divergence slightly negative)."""
    return token_kl(b.ref_lp, b.lp, b.ref_p).clamp_min(0)


def top1_series(b: TokenBatch) -> torch.Tensor:
    """1.0 where the emulated model's most likely next token is the reference's, else 0.0."""
    return (b.lp.argmax(-1) == b.ref_top).double()


# ---------------------------------------------------------------------------------------------
# aggregation and confidence intervals

@dataclass(frozen=True)
class MetricInputs:
    """What a metric's number is aggregated from: per-token series by series name (of the
    recipe, ``test``, and of the reference, ``ref``), the recipe's telemetry totals (empty when
    telemetry was off) and the numbers of the metrics computed before this one (``summary``)."""

    test: Mapping[str, np.ndarray]
    ref: Mapping[str, np.ndarray]
    telemetry: Mapping[str, float] = field(default_factory=dict)
    summary: Mapping[str, Any] = field(default_factory=dict)


Aggregate = Callable[[MetricInputs], float | None]


@dataclass(frozen=True)
class CIMethod:
    """How a metric's confidence interval is computed.

    ``interval(metric, inputs, n_resamples=, block=, seed=, level=)`` returns an
    :class:`~precisim.eval.stats.Interval` whose estimate becomes the metric's number.
    """

    name: str
    description: str
    interval: Callable[..., Interval]

    def __call__(self, metric: Metric, inputs: MetricInputs, *, n_resamples: int, block: int,
                 seed: int | None, level: float = CI_LEVEL) -> Interval:
        return self.interval(metric, inputs, n_resamples=n_resamples, block=block, seed=seed,
                             level=level)


def _paired_ppl(metric: Metric, x: MetricInputs, **kw: Any) -> Interval:
    assert metric.series is not None
    return ppl_delta(x.ref[metric.series], x.test[metric.series], **kw)


def _block_mean(metric: Metric, x: MetricInputs, **kw: Any) -> Interval:
    assert metric.series is not None
    return mean_ci(x.test[metric.series], **kw)


#: paired circular moving-block bootstrap of exp(mean test) - exp(mean reference)
PAIRED_BLOCK_BOOTSTRAP = CIMethod(
    "paired_block_bootstrap",
    "paired circular moving-block bootstrap over token positions (the reference's and the "
    "recipe's per-token NLL resampled at the same positions), percentile interval of "
    "exp(mean NLL) - exp(mean reference NLL) (precisim.eval.stats.ppl_delta)", _paired_ppl)

#: circular moving-block bootstrap of the mean of the metric's series
BLOCK_BOOTSTRAP_MEAN = CIMethod(
    "block_bootstrap_mean",
    "circular moving-block bootstrap over token positions, percentile interval of the mean of "
    "the per-token series (precisim.eval.stats.mean_ci)", _block_mean)


def telemetry_rate(counter: str, denominator: str) -> Aggregate:
    """An aggregate: ``counter / denominator`` of the telemetry totals (0.0 when the
    denominator is 0; None, i.e. no number, when telemetry was off)."""

    def rate(x: MetricInputs) -> float | None:
        if counter not in x.telemetry or denominator not in x.telemetry:
            return None
        d = x.telemetry[denominator]
        return x.telemetry[counter] / d if d else 0.0

    return rate


# ---------------------------------------------------------------------------------------------
# the description

@dataclass(frozen=True)
class Metric:
    """One summary number of an evaluation (see the module docstring).

    Args:
        name: its key in a recipe's summary (lower-case letters, digits and ``_``); with a
            ``ci`` also ``<name>_low`` and ``<name>_high``.
        description: what it measures, in words (recorded in spec sheets).
        aggregate: ``aggregate(inputs) -> float`` (None: no number, the key is left out). With
            a ``ci`` and bootstrap resamples, the interval's estimate is the number instead.
        formula: the aggregation as a short formula (recorded in spec sheets).
        token: the per-token computation of its series (None: not computed from tokens).
        series: the name of that series (default: ``name``); metrics that share a series share
            its ``token`` function.
        reference: the series is also computed on the reference (paired statistics).
        ci: how its confidence interval is computed (None: no interval).
        higher_is_better: its direction (None: none, e.g. a property of the reference).
        label: its column header in tables (default ``name``).
        fmt: the format spec of its number in tables (and of the ``show_ci`` cell).
        tables: the tables that show it (:data:`TABLES`).
        show_ci: tables show it as ``estimate [low, high]`` (one cell; the report: low and
            high columns).
        requires: metrics whose numbers ``aggregate`` reads from ``inputs.summary``; they are
            computed first (registered metrics only).
    """

    name: str
    description: str
    aggregate: Aggregate
    formula: str
    token: TokenFn | None = None
    series: str | None = None
    reference: bool = False
    ci: CIMethod | None = None
    higher_is_better: bool | None = False
    label: str = ""
    fmt: str = ".4g"
    tables: tuple[str, ...] = ()
    show_ci: bool = False
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _KEY_RE.match(self.name):
            raise ValueError(f"metric name {self.name!r} is not valid: accepted lower-case "
                             "letters, digits and '_', starting with a letter (it is a key of "
                             "the summary)")
        if not callable(self.aggregate):
            raise ValueError(f"metric {self.name!r}: aggregate must be callable (inputs) -> "
                             f"float, got {type(self.aggregate).__name__}")
        if self.token is not None and not callable(self.token):
            raise ValueError(f"metric {self.name!r}: token must be callable (TokenBatch) -> "
                             f"tensor or None, got {type(self.token).__name__}")
        if self.token is None and (self.series is not None or self.reference):
            raise ValueError(f"metric {self.name!r}: series / reference need a token function")
        if self.token is not None and self.series is None:
            object.__setattr__(self, "series", self.name)
        if self.series is not None and not _KEY_RE.match(self.series):
            raise ValueError(f"metric {self.name!r}: series name {self.series!r} is not valid: "
                             "accepted lower-case letters, digits and '_'")
        if self.ci is not None and not isinstance(self.ci, CIMethod):
            raise ValueError(f"metric {self.name!r}: ci must be a CIMethod or None, got "
                             f"{type(self.ci).__name__}")
        if self.ci is not None and self.token is None:
            raise ValueError(f"metric {self.name!r}: a confidence interval needs a per-token "
                             "series (token)")
        if self.show_ci and self.ci is None:
            raise ValueError(f"metric {self.name!r}: show_ci needs a ci method")
        if self.higher_is_better not in (True, False, None):
            raise ValueError(f"metric {self.name!r}: higher_is_better={self.higher_is_better!r}"
                             " is not valid: accepted True, False or None")
        bad = [t for t in self.tables if t not in TABLES]
        if isinstance(self.tables, str) or bad:
            raise ValueError(f"metric {self.name!r}: tables={self.tables!r} is not valid: "
                             f"accepted a tuple of {', '.join(TABLES)}")
        try:
            format(1.0, self.fmt)
        except (TypeError, ValueError):
            raise ValueError(f"metric {self.name!r}: fmt={self.fmt!r} is not a format spec for "
                             "a float (e.g. '.4g', '+.3f')") from None
        if isinstance(self.requires, str):
            raise ValueError(f"metric {self.name!r}: requires must be a tuple of names, not a "
                             "string")
        if not self.label:
            object.__setattr__(self, "label", self.name)
        object.__setattr__(self, "tables", tuple(self.tables))
        object.__setattr__(self, "requires", tuple(self.requires))
        taken = set(self.row_keys) & RESERVED_KEYS
        if taken:
            raise ValueError(f"metric {self.name!r}: its keys {sorted(taken)} are reserved "
                             f"({', '.join(sorted(RESERVED_KEYS))})")

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys it takes in a summary: its name, and with a ``ci`` the bounds."""
        ci = (f"{self.name}_low", f"{self.name}_high") if self.ci is not None else ()
        return (self.name, *ci)

    @property
    def row_keys(self) -> tuple[str, ...]:
        """The keys it takes in a table row: :attr:`keys` and, ``show_ci``, ``<name>_ci``."""
        return self.keys + ((f"{self.name}_ci",) if self.show_ci else ())

    @property
    def direction(self) -> str:
        """``"higher is better"``, ``"lower is better"`` or ``"no direction"``."""
        return {True: "higher is better", False: "lower is better",
                None: "no direction"}[self.higher_is_better]

    def to_dict(self) -> dict[str, Any]:
        """Its definition as recorded in a spec sheet (``metric_definitions``)."""
        return {
            "description": self.description, "formula": self.formula, "series": self.series,
            "reference": self.reference, "higher_is_better": self.higher_is_better,
            "ci": None if self.ci is None else {"method": self.ci.name, "level": CI_LEVEL,
                                                "description": self.ci.description},
            "keys": list(self.keys), "label": self.label,
            "format": self.fmt, "tables": list(self.tables), "show_ci": self.show_ci,
        }


# ---------------------------------------------------------------------------------------------
# the registry

class UnknownMetricError(UnknownNameError):
    """An unknown metric name (a ``KeyError`` and a ``ValueError``)."""


#: the metrics of an evaluation, in the order they are computed and shown
METRICS: Registry[Metric] = Registry("metric", error=UnknownMetricError)


def register_metric(metric: Metric, *, replace: bool = False) -> Metric:
    """Register ``metric`` in :data:`METRICS` (see the module docstring); returns it.

    Its ``requires`` must be registered already, and none of its keys may be another registered
    metric's key; ``replace=True`` replaces a metric of the same name (in its place).
    """
    if not isinstance(metric, Metric):
        raise ValueError(f"register_metric takes a Metric, got {type(metric).__name__}")
    for r in metric.requires:
        if METRICS.find(r) is None:
            raise ValueError(f"metric {metric.name!r} requires {r!r}, which is not registered; "
                             f"registered: {', '.join(METRICS.names())}")
    mine = set(metric.row_keys)
    for name, other in METRICS.items():
        if name == metric.name:
            continue  # the registry says whether it may be replaced
        clash = mine & set(other.row_keys)
        if clash:
            raise ValueError(f"metric {metric.name!r} would take the key(s) {sorted(clash)} of "
                             f"the registered metric {name!r}")
    return METRICS.register(metric.name, metric, replace=replace)


def get_metric(name: str | Metric) -> Metric:
    """A registered metric by name (``metric:<name>`` too); a Metric is returned as it is."""
    return name if isinstance(name, Metric) else METRICS.get(name)


def available_metrics() -> list[str]:
    """The registered metrics' names, in their order."""
    return METRICS.names()


def resolve_metrics(metrics: Iterable[str | Metric] | None = None) -> tuple[Metric, ...]:
    """The metrics to compute, in registry order (unregistered :class:`Metric` objects last, in
    the order given), with the metrics they require; None: every registered metric.

    Raises the registry's :class:`UnknownMetricError` on an unknown name, ValueError when two
    metrics share a series with different token functions or a requirement is missing.
    """
    if metrics is None:
        chosen = [m for _, m in METRICS.items()]
    else:
        if isinstance(metrics, str):
            raise ValueError(f"metrics={metrics!r} is not valid: accepted a list of metric names "
                             "(or None for every registered metric), not one string")
        chosen = [get_metric(m) for m in metrics]
    by_name: dict[str, Metric] = {}
    todo = list(chosen)
    while todo:
        m = todo.pop(0)
        prev = by_name.setdefault(m.name, m)
        if prev is not m:
            raise ValueError(f"two different metrics are named {m.name!r}")
        todo += [METRICS.get(r) for r in m.requires if r not in by_name]
    pos = {n: i for i, n in enumerate(METRICS.names())}
    out = sorted(by_name.values(),
                 key=lambda m: pos[m.name] if METRICS.find(m.name) is m else len(pos))
    series: dict[str, Metric] = {}
    for i, m in enumerate(out):
        missing = [r for r in m.requires if r not in {x.name for x in out[:i]}]
        if missing:
            raise ValueError(f"metric {m.name!r} requires {missing}, computed after it")
        if m.series is not None:
            first = series.setdefault(m.series, m)
            if first.token is not m.token:
                raise ValueError(f"metrics {first.name!r} and {m.name!r} both read the series "
                                 f"{m.series!r} but compute it differently (token functions "
                                 "differ); give one of them another series name")
    return tuple(out)


def definitions(metrics: Iterable[str | Metric] | None = None) -> dict[str, dict[str, Any]]:
    """``{name: Metric.to_dict()}`` of :func:`resolve_metrics` (a spec sheet's
    ``metric_definitions``)."""
    return {m.name: m.to_dict() for m in resolve_metrics(metrics)}


# ---------------------------------------------------------------------------------------------
# tables

def _defs(defs: Mapping[str, Mapping[str, Any]] | None) -> Mapping[str, Mapping[str, Any]]:
    return definitions() if defs is None else defs


def table_columns(table: str, defs: Mapping[str, Mapping[str, Any]] | None = None
                  ) -> list[tuple[str, str, str]]:
    """The ``(key, header, number format)`` columns of the metrics a table shows, from metric
    definitions (a spec sheet's ``metric_definitions``; None: the registered metrics).

    The summary and vendor tables show a ``show_ci`` metric as one ``<name>_ci`` cell
    (``"Δppl [95% CI]"``); the report shows its number and ``low`` / ``high`` columns.
    """
    if table not in TABLES:
        raise ValueError(f"table={table!r} is not valid: accepted {', '.join(TABLES)}")
    out = []
    for name, d in _defs(defs).items():
        if table not in d.get("tables", ()):
            continue
        label, fmt, ci = d.get("label") or name, d.get("format") or ".4g", d.get("ci")
        if d.get("show_ci") and ci:
            if table == "report":
                out += [(name, label, fmt), (f"{name}_low", f"{label} low", fmt),
                        (f"{name}_high", f"{label} high", fmt)]
            else:
                out.append((f"{name}_ci", f"{label} [{ci.get('level', CI_LEVEL):.0%} CI]", fmt))
        else:
            out.append((name, label, fmt))
    return out


def table_cells(values: Mapping[str, Any], defs: Mapping[str, Mapping[str, Any]] | None = None
                ) -> dict[str, Any]:
    """A recipe's metric cells for a table row: every metric's number (None when absent), its
    interval bounds, and for ``show_ci`` metrics the ``<name>_ci`` text ``"+1.234 [+1.100,
    +1.350]"`` in the metric's format (``""`` without a number)."""
    row: dict[str, Any] = {}
    for name, d in _defs(defs).items():
        row[name] = values.get(name)
        if d.get("ci"):
            row[f"{name}_low"] = values.get(f"{name}_low")
            row[f"{name}_high"] = values.get(f"{name}_high")
        if d.get("show_ci"):
            fmt, v = d.get("format") or ".4g", values.get(name)
            lo, hi = values.get(f"{name}_low"), values.get(f"{name}_high")
            row[f"{name}_ci"] = ("" if v is None else f"{v:{fmt}}" if lo is None or hi is None
                                 else f"{v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]")
    return row


# ---------------------------------------------------------------------------------------------
# the built-in metrics

def _exp_mean(x: np.ndarray) -> float:
    return math.exp(float(x.mean()))


def _mean(series: str) -> Aggregate:
    return lambda x: float(x.test[series].mean())


#: the metrics precisim defines (registered at import, in this order); spec sheets of schema
#: version 1 recorded exactly these
BUILTIN_METRICS: tuple[Metric, ...] = (
    Metric("ppl_ref", "perplexity of the reference (the unpatched model) on the same tokens",
           lambda x: _exp_mean(x.ref["nll"]), "exp(mean over tokens of the reference's NLL)",
           token=nll_series, series="nll", reference=True, higher_is_better=None,
           label="ppl ref", tables=("report",)),
    Metric("ppl", "perplexity of the emulated model", lambda x: _exp_mean(x.test["nll"]),
           "exp(mean over tokens of NLL), NLL = -log p(target) in nats", token=nll_series,
           series="nll", label="ppl", tables=TABLES),
    Metric("delta_ppl", "perplexity change against the reference on the same tokens (paired)",
           lambda x: x.summary["ppl"] - x.summary["ppl_ref"],
           "exp(mean NLL) - exp(mean reference NLL)", token=nll_series, series="nll",
           reference=True, ci=PAIRED_BLOCK_BOOTSTRAP, label="Δppl", fmt="+.3f",
           tables=TABLES, show_ci=True, requires=("ppl_ref", "ppl")),
    Metric("kl", "KL divergence of the emulated next-token distribution from the reference's "
           "(nats per token)", _mean("kl"),
           "mean over tokens of sum over the vocabulary of p_ref * (log p_ref - log p), "
           "clamped at 0", token=kl_series, ci=BLOCK_BOOTSTRAP_MEAN, label="KL",
           tables=TABLES),
    Metric("top1", "agreement of the most likely next token with the reference's",
           _mean("top1"), "mean over tokens of [argmax p == argmax p_ref]", token=top1_series,
           ci=BLOCK_BOOTSTRAP_MEAN, higher_is_better=True, label="top-1", tables=TABLES),
    Metric("delta_ppl_rel", "relative perplexity change against the reference",
           lambda x: x.summary["delta_ppl"] / x.summary["ppl_ref"], "delta_ppl / ppl_ref",
           label="Δppl rel", requires=("ppl_ref", "delta_ppl")),
    Metric("saturated_rate", "fraction of quantized elements beyond the format's (or their "
           "block's) overflow threshold: clamped, or inf/NaN under other overflow policies",
           telemetry_rate("saturated", "numel"),
           "saturated / numel, telemetry counters summed over every emulated operand",
           label="saturated", tables=TABLES),
    Metric("flushed_rate", "fraction of quantized elements that were non-zero and became zero "
           "(underflow, also relative to a block scale)", telemetry_rate("flushed", "numel"),
           "flushed / numel, telemetry counters summed over every emulated operand",
           label="flushed to 0", tables=("vendor",)),
    Metric("nonfinite_rate", "fraction of finite quantized elements that became inf or NaN",
           telemetry_rate("nonfinite", "numel"),
           "nonfinite / numel, telemetry counters summed over every emulated operand",
           label="inf/NaN"),
    Metric("scale_clamped_rate", "fraction of scale blocks whose scale hit the scale format's "
           "limit", telemetry_rate("scale_clamped", "blocks"),
           "scale_clamped / blocks, telemetry counters summed over every emulated operand",
           label="scale clamped"),
)

for _m in BUILTIN_METRICS:
    register_metric(_m)
