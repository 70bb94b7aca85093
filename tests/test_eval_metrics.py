"""The metric registry (precisim.eval.metrics): every built-in metric against a hand computation,
registry errors, and a metric registered in a test reaching evaluate, the spec sheet, the vendor
table, the CLI summary and the report without any other code changing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from precisim.emulation import get_recipe
from precisim.eval.commands import summary_table
from precisim.eval.metrics import (
    BLOCK_BOOTSTRAP_MEAN,
    BUILTIN_METRICS,
    METRICS,
    PAIRED_BLOCK_BOOTSTRAP,
    Metric,
    TokenBatch,
    UnknownMetricError,
    available_metrics,
    get_metric,
    nll_series,
    register_metric,
    resolve_metrics,
    table_columns,
)
from precisim.eval.perplexity import RecipeResult, evaluate, summarize
from precisim.eval.sheet import SpecSheet
from precisim.eval.spec import VENDOR_COLUMNS, EvalConfig, run_eval, vendor_columns, vendor_rows
from precisim.eval.stats import mean_ci, ppl_delta

BUILTIN = ["ppl_ref", "ppl", "delta_ppl", "kl", "top1", "delta_ppl_rel", "saturated_rate",
           "flushed_rate", "nonfinite_rate", "scale_clamped_rate"]


# ---------------------------------------------------------------------------------------------
# hand computations on small tensors

def _log_softmax_by_hand(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


@pytest.fixture(scope="module")
def small():
    """A window of 6 predicted tokens over a vocabulary of 5: reference and emulated
    log-probabilities, targets, and the per-token values computed by hand."""
    g = torch.Generator().manual_seed(3)
    ref_logits = torch.randn(6, 5, generator=g, dtype=torch.float64)
    logits = ref_logits + 0.7 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    tgt = torch.tensor([0, 3, 1, 4, 4, 2])
    ref_rows = [_log_softmax_by_hand(r) for r in ref_logits.tolist()]
    rows = [_log_softmax_by_hand(r) for r in logits.tolist()]
    hand = {
        "nll": [-rows[i][t] for i, t in enumerate(tgt.tolist())],
        "ref_nll": [-ref_rows[i][t] for i, t in enumerate(tgt.tolist())],
        "kl": [max(0.0, sum(math.exp(a) * (a - b) for a, b in zip(ra, rb)))
               for ra, rb in zip(ref_rows, rows)],
        "top1": [float(ra.index(max(ra)) == rb.index(max(rb))) for ra, rb in zip(ref_rows, rows)],
    }
    assert 0 < sum(hand["top1"]) < 6  # both agreeing and disagreeing tokens
    batch = TokenBatch(torch.log_softmax(ref_logits, -1), torch.log_softmax(logits, -1), tgt)
    return batch, hand


TELEMETRY = {"numel": 1000.0, "saturated": 7.0, "flushed": 30.0, "nonfinite": 1.0,
             "scale_clamped": 2.0, "blocks": 40.0}


def _mean(x: list[float]) -> float:
    return sum(x) / len(x)


#: every built-in metric's number, by hand from the per-token values and the telemetry counters
HAND = {
    "ppl_ref": lambda h: math.exp(_mean(h["ref_nll"])),
    "ppl": lambda h: math.exp(_mean(h["nll"])),
    "delta_ppl": lambda h: math.exp(_mean(h["nll"])) - math.exp(_mean(h["ref_nll"])),
    "kl": lambda h: _mean(h["kl"]),
    "top1": lambda h: _mean(h["top1"]),
    "delta_ppl_rel": lambda h: (math.exp(_mean(h["nll"])) - math.exp(_mean(h["ref_nll"])))
    / math.exp(_mean(h["ref_nll"])),
    "saturated_rate": lambda h: 7 / 1000,
    "flushed_rate": lambda h: 30 / 1000,
    "nonfinite_rate": lambda h: 1 / 1000,
    "scale_clamped_rate": lambda h: 2 / 40,
}


def _series(batch: TokenBatch) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The recipe's and the reference's series of every built-in metric, through the
    metrics' own token functions."""
    test, ref = {}, {}
    for m in BUILTIN_METRICS:
        if m.token is not None:
            test[m.series] = m.token(batch).numpy()
            if m.reference:
                ref[m.series] = m.token(batch.reference()).numpy()
    return test, ref


def test_builtin_metrics_are_registered_in_order_and_each_has_a_hand_check() -> None:
    assert [m.name for m in BUILTIN_METRICS] == BUILTIN
    assert available_metrics()[:len(BUILTIN)] == BUILTIN
    assert set(HAND) == set(BUILTIN)
    assert get_metric("metric:KL") is get_metric("kl")  # the registry's grammar
    d = get_metric("delta_ppl")
    assert d.ci is PAIRED_BLOCK_BOOTSTRAP and d.keys == ("delta_ppl", "delta_ppl_low",
                                                         "delta_ppl_high")
    assert d.row_keys == (*d.keys, "delta_ppl_ci")
    assert get_metric("top1").higher_is_better is True and get_metric("kl").ci is \
        BLOCK_BOOTSTRAP_MEAN
    assert get_metric("ppl_ref").direction == "no direction"


@pytest.mark.parametrize("series", ["nll", "kl", "top1"])
def test_token_series_match_hand_computation(small, series) -> None:
    batch, hand = small
    test, ref = _series(batch)
    np.testing.assert_allclose(test[series], hand[series], rtol=1e-12, atol=1e-15)
    if series == "nll":  # the reference's own series (paired metrics)
        np.testing.assert_allclose(ref["nll"], hand["ref_nll"], rtol=1e-12)


@pytest.mark.parametrize("name", BUILTIN)
def test_metric_aggregate_matches_hand_computation(small, name) -> None:
    batch, hand = small
    test, ref = _series(batch)
    rr = RecipeResult(get_recipe("fp32"), test, seconds=1.5, telemetry=dict(TELEMETRY))
    m = summarize(ref["nll"], rr, bootstrap=0, metrics=[name], ref_series=ref)
    assert m[name] == pytest.approx(HAND[name](hand), rel=1e-12)
    assert m["tokens"] == 6 and m["seconds"] == 1.5
    # its requirements are computed too, before it; nothing else is
    names = [x.name for x in resolve_metrics([name])]
    assert names[-1] == name and [k for k in m if k not in ("tokens", "seconds")] == names
    metric = get_metric(name)
    if metric.ci is None:
        return
    # with resamples: the interval of precisim.eval.stats, its estimate the same number
    ci = summarize(ref["nll"], rr, bootstrap=200, block=2, seed=5, metrics=[name],
                   ref_series=ref)
    s = metric.series
    expect = (ppl_delta(ref[s], test[s], n_resamples=200, block=1, seed=5)
              if metric.ci is PAIRED_BLOCK_BOOTSTRAP
              else mean_ci(test[s], n_resamples=200, block=1, seed=5))  # block <= 6 // 4
    assert (ci[name], ci[f"{name}_low"], ci[f"{name}_high"]) == (expect.estimate, expect.low,
                                                                 expect.high)
    assert ci[name] == pytest.approx(HAND[name](hand), rel=1e-12)
    assert ci[f"{name}_low"] <= ci[name] <= ci[f"{name}_high"]


def test_telemetry_rates_without_telemetry_or_blocks(small) -> None:
    batch, _ = small
    test, ref = _series(batch)
    rates = ["saturated_rate", "flushed_rate", "nonfinite_rate", "scale_clamped_rate"]
    off = summarize(ref["nll"], RecipeResult(get_recipe("fp32"), test), bootstrap=0,
                    metrics=rates, ref_series=ref)
    assert off == {"tokens": 6, "seconds": 0.0}  # telemetry off: no rates, not zeros
    no_blocks = summarize(ref["nll"], RecipeResult(get_recipe("fp32"), test, telemetry={
        **TELEMETRY, "scale_clamped": 0.0, "blocks": 0.0}), bootstrap=0, metrics=rates,
        ref_series=ref)
    assert no_blocks["scale_clamped_rate"] == 0.0


def test_unknown_metric_names_give_the_registry_error() -> None:
    with pytest.raises(UnknownMetricError, match=r"unknown metric 'klx'; did you mean 'kl'"):
        get_metric("klx")
    with pytest.raises(UnknownMetricError, match="available: ppl_ref, ppl, delta_ppl"):
        resolve_metrics(["ppl", "perplexity"])
    with pytest.raises(KeyError):  # an UnknownNameError is a KeyError and a ValueError
        EvalConfig(model="m", data="d", recipes=("bf16",), metrics=("nope",)).resolved_metrics()
    with pytest.raises(ValueError, match="not one string"):
        resolve_metrics("kl")
    with pytest.raises(UnknownMetricError, match="unknown metric 'nope'"):
        evaluate(torch.nn.Linear(2, 2), [1, 2, 3], [], metrics=["nope"])


def test_metric_validation_and_registration_errors() -> None:
    def agg(x):
        return 0.0

    with pytest.raises(ValueError, match="metric name 'Bad-Name' is not valid"):
        Metric("Bad-Name", "d", agg, "f")
    with pytest.raises(ValueError, match="keys .*'seconds'.* are reserved"):
        Metric("seconds", "d", agg, "f")
    with pytest.raises(ValueError, match="tables=.*accepted a tuple of summary, vendor, report"):
        Metric("x", "d", agg, "f", tables=("vendor", "slides"))
    with pytest.raises(ValueError, match="needs a per-token series"):
        Metric("x", "d", agg, "f", ci=BLOCK_BOOTSTRAP_MEAN)
    with pytest.raises(ValueError, match="fmt='q' is not a format spec"):
        Metric("x", "d", agg, "f", fmt="q")
    with pytest.raises(ValueError, match="registered already"):
        register_metric(Metric("kl", "d", agg, "f"))
    with pytest.raises(ValueError, match=r"take the key\(s\) \['kl_low'\] of the registered "
                       "metric 'kl'"):
        register_metric(Metric("kl_low", "d", agg, "f"))
    with pytest.raises(ValueError, match="requires 'nope', which is not registered"):
        register_metric(Metric("x", "d", agg, "f", requires=("nope",)))
    other_nll = Metric("x", "d", agg, "f", token=lambda b: b.lp[:, 0], series="nll")
    with pytest.raises(ValueError, match="both read the series 'nll' but compute it "
                       "differently"):
        resolve_metrics(["ppl", other_nll])
    assert "x" not in METRICS


# ---------------------------------------------------------------------------------------------
# a new metric, registered here, everywhere

class CharTokenizer:
    """A byte-level stand-in for a Hugging Face tokenizer (ids 3..63)."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text: str, add_special_tokens: bool = False):
        return {"input_ids": [3 + (b % 61) for b in text.encode()]}


TEXT = "The quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture(scope="module")
def model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _target_lp_err(b: TokenBatch) -> torch.Tensor:
    return (b.lp - b.ref_lp).gather(-1, b.tgt[:, None])[:, 0].abs()


@pytest.fixture()
def new_metrics():
    """Two metrics registered for one test: the mean absolute error of the target's
    log-probability (its own series, a CI) and the largest per-token NLL (the ``nll`` series
    ``ppl`` reads)."""
    added = [
        register_metric(Metric(
            "target_lp_err", "absolute error of the target token's log-probability",
            lambda x: float(x.test["target_lp_err"].mean()),
            "mean over tokens of |log p(target) - log p_ref(target)|", token=_target_lp_err,
            ci=BLOCK_BOOTSTRAP_MEAN, label="|Δ log p|", fmt=".3g",
            tables=("summary", "vendor", "report"))),
        register_metric(Metric(
            "nll_max", "largest per-token NLL", lambda x: float(x.test["nll"].max()),
            "max over tokens of NLL", token=nll_series, series="nll", label="NLL max",
            tables=("summary",))),
    ]
    try:
        yield added
    finally:
        for m in added:
            METRICS.unregister(m.name)


def test_a_registered_metric_flows_everywhere(model, new_metrics, tmp_path) -> None:
    toks = CharTokenizer()(TEXT[:200])["input_ids"]
    res = evaluate(model, toks, ["mxfp4"], window=64, bootstrap=50)
    rr = res.results[0]
    m = rr.metrics
    np.testing.assert_allclose(rr.series["target_lp_err"], np.abs(rr.nll - res.ref_nll),
                               rtol=1e-9, atol=1e-12)
    assert m["target_lp_err"] == float(rr.series["target_lp_err"].mean()) > 0
    assert m["target_lp_err_low"] <= m["target_lp_err"] <= m["target_lp_err_high"]
    assert m["nll_max"] == float(rr.nll.max())
    # the built-in numbers are not disturbed by the new metrics
    alone = evaluate(model, toks, ["mxfp4"], window=64, bootstrap=50,
                     metrics=BUILTIN).results[0].metrics
    assert {k: v for k, v in m.items() if k in alone and k != "seconds"} == \
        {k: v for k, v in alone.items() if k != "seconds"}

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    cfg = EvalConfig(model="tiny", data=str(text), recipes=("mxfp4", "bf16"), tokens=96,
                     window=48, bootstrap=50)
    sheet = run_eval(cfg, model_and_tokenizer=(model, CharTokenizer()))
    assert sheet.metrics["mxfp4"]["target_lp_err"] > sheet.metrics["bf16"]["target_lp_err"]
    d = sheet.metric_definitions["target_lp_err"]
    assert d["ci"]["method"] == "block_bootstrap_mean" and d["higher_is_better"] is False
    assert d["label"] == "|Δ log p|" and d["keys"] == ["target_lp_err", "target_lp_err_low",
                                                      "target_lp_err_high"]
    assert EvalConfig.from_sheet(json.loads(sheet.to_json())).metrics[-2:] == (
        "target_lp_err", "nll_max")
    # vendor table, its live column list, the CLI summary and the report columns
    assert ("target_lp_err", "|Δ log p|", ".3g") in vendor_columns(sheet)
    assert ("target_lp_err", "|Δ log p|", ".3g") in list(VENDOR_COLUMNS)
    row = {r["recipe"]: r for r in vendor_rows(sheet)}["mxfp4"]
    assert row["target_lp_err"] == sheet.metrics["mxfp4"]["target_lp_err"]
    summary = summary_table(sheet)
    header = next(line for line in summary.splitlines() if line.startswith("| recipe"))
    assert header.endswith("| |Δ log p| | NLL max |".replace("|Δ log p|", "\\|Δ log p\\|"))
    assert "lower is better: ppl, Δppl, KL, saturated, |Δ log p|, NLL max" in summary
    assert ("target_lp_err", "|Δ log p|", ".3g") in table_columns("report")
    assert "nll_max" not in dict((c[0], c) for c in table_columns("vendor"))

    # once unregistered it leaves the registry's columns, but the sheet still describes it
    for x in new_metrics:
        METRICS.unregister(x.name)
    new_metrics.clear()
    assert "target_lp_err" not in [c[0] for c in VENDOR_COLUMNS]
    again = SpecSheet.from_json(sheet.to_json())
    assert ("target_lp_err", "|Δ log p|", ".3g") in vendor_columns(again)
    assert "NLL max" in summary_table(again)
