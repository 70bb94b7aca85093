"""``precisim cost`` / ``perf`` / ``search`` and the mixed-precision search (precisim.eval.search,
docs/cost-perf.md section 8).

* the CLI commands print tables that say they are a model, JSON on request, and one ``error:``
  line with exit status 2 for an unknown unit or accelerator, a config missing a field, or
  parallel degrees that do not divide the model;
* the search problem's inputs are checked (budget metric, objective, candidates, grouping);
* on SmolLM2 (a tiny token budget) the greedy path gets cheaper at every step, the chosen
  recipe is the cheapest evaluated point that meets the budget on the search set, its
  held-out verification is what a separate evaluation of the saved recipe YAML on those
  tokens measures (the numbers ``precisim eval --tokens N`` reports), and the outputs are
  written;
* the back-off loop (exact synthetic measures, and a search on the tiny checkpoint whose
  predicted edge misses): it promotes the most sensitive groups one level at a time until the
  measured value meets the target.
"""

from __future__ import annotations

import json

import pytest
from precisim.eval.cli import main
from precisim.eval.search import Budget, Objective, SearchError, SearchProblem, candidate_spec

DATA = "/work/shared/data/wikitext-2-raw/wiki.test.raw"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------------------------------------
# the CLI

def test_cost_command(capsys) -> None:
    assert main(["cost"]) == 0
    out = capsys.readouterr().out
    assert "not measured" in out and "fma" not in out.split("|")[0]
    assert "| nvfp4 | recipe |" in out and "| h100-e4m3 | unit |" in out
    assert main(["cost", "unit:fma-bf16-fp32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert "not measured" in d["note"] and d["rows"][0]["energy"] == pytest.approx(1.0)
    assert main(["cost", "h100-e4m3", "--detail"]) == 0
    assert "alignment" in capsys.readouterr().out
    assert main(["cost", "h101-e4m3"]) == 2
    assert "'h101-e4m3' is neither a matrix unit nor a recipe" in _error_line(capsys)


def test_perf_command(tmp_path, capsys) -> None:
    assert main(["perf", "--model", "llama-2-7b", "--accelerator", "h100-sxm,h200,b200",
                 "--weights", "nvfp4", "--batch", "1", "--prefill", "128"]) == 0
    out = capsys.readouterr().out
    assert "| h200 |" in out and "| b200 |" in out and "measured systems reach" in out
    assert main(["perf", "--accelerator", "h100", "--json", "--ops"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["results"][0]["decode_bound"] == "memory" and d["ops"]
    assert main(["perf", "--accelerator", "h300"]) == 2
    line = _error_line(capsys)
    assert "unknown accelerator 'h300'; did you mean" in line and "h200" in line
    assert main(["perf", "--model", "llama-2-70b", "--tp", "3"]) == 2
    assert "tp=3 does not divide num_attention_heads=64" in _error_line(capsys)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4,
                               "vocab_size": 100, "intermediate_size": 96}))
    assert main(["perf", "--model", str(cfg)]) == 2
    assert "missing 'num_hidden_layers'" in _error_line(capsys)
    assert main(["perf", "--weights", "fp5"]) == 2
    assert "fp5" in _error_line(capsys)


def test_search_command_bad_input(capsys) -> None:
    for argv, what in [(["--budget", "ppl:1"], "budget metric='ppl'"),
                       (["--budget", "delta_ppl"], "give METRIC:LIMIT"),
                       (["--budget", "kl:x"], "'x' is not a number"),
                       (["--candidates", "nvfp4"], "give at least two"),
                       (["--candidates", "nvfp4,fp5x"], "fp5x"),
                       (["--objective", "time", "--accelerator", "tpu9"],
                        "unknown accelerator 'tpu9'"),
                       (["--margin", "-0.5"], "margin=-0.5")]:
        assert main(["search", "--data", DATA, *argv]) == 2, argv
        assert what in _error_line(capsys), argv


# ---------------------------------------------------------------------------------------------
# the problem description

def test_search_problem_checks_its_inputs() -> None:
    b = Budget("top1", 0.9)
    assert b.higher_is_better and b.ok({"top1": 0.95, "top1_low": 0.91})
    assert not b.ok({"top1": 0.95, "top1_low": 0.89})
    assert Budget("top1", 0.9, "estimate").ok({"top1": 0.95, "top1_low": 0.89})
    assert Budget("delta_ppl", 1).ok({"delta_ppl": 0.5, "delta_ppl_high": 0.9})
    assert not Budget("delta_ppl", 1).ok({"delta_ppl": 0.5, "delta_ppl_high": 1.1})
    with pytest.raises(SearchError, match="budget metric='ppl'"):
        Budget("ppl", 1)
    with pytest.raises(SearchError, match="budget use='low'"):
        Budget("kl", 1, "low")
    with pytest.raises(SearchError, match="objective='speed'"):
        Objective("speed")
    with pytest.raises(SearchError, match="objective batch=0"):
        Objective("time", batch=0)
    with pytest.raises(SearchError, match="by='block'"):
        SearchProblem(by="block")
    with pytest.raises(SearchError, match="search_tokens=0"):
        SearchProblem(search_tokens=0)
    assert candidate_spec("nvfp4").weight is not None
    assert candidate_spec("e4m3").input is not None


# ---------------------------------------------------------------------------------------------
# the search on SmolLM2

@pytest.mark.slow
def test_search_on_smollm2(smollm2, tmp_path) -> None:
    import torch
    from precisim.emulation import Recipe
    from precisim.eval.data import load_text, prefix_token, tokenize
    from precisim.eval.perplexity import evaluate

    model, tok = smollm2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = SearchProblem(candidates=("nvfp4", "mxfp8"), budget=Budget("kl", 0.05, "estimate"),
                          by="op", search_tokens=128, heldout_tokens=128, window=128,
                          bootstrap=100)
        from precisim.eval.search import search

        r = search(model, tok, DATA, p)
        costs = [row["cost"] for row in r.path if row["stage"] == "greedy"]
        assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)
        assert costs[0] == pytest.approx(8.25) and costs[-1] == pytest.approx(4.5)
        ok = [row for row in r.path if row["measured"] is not None and row["meets"]]
        assert r.feasible == bool(ok)
        if ok:
            assert r.cost == min(row["cost"] for row in ok)
        # the held-out verification is a full evaluation of the saved recipe on the first
        # heldout_tokens tokens (what `precisim eval --tokens 128 --window 128` evaluates)
        paths = r.save(tmp_path)
        assert {"recipe", "table", "path", "verification", "pareto"} <= set(paths)
        again = Recipe.load(paths["recipe"])
        ids = tokenize(tok, load_text(DATA).text, 128)
        res = evaluate(model, ids, [again], window=128, prefix_token=prefix_token(tok),
                       bootstrap=100, telemetry=False,
                       metrics=["ppl_ref", "ppl", "delta_ppl", "kl", "top1"])
        m = res.results[0].metrics
        assert m["kl"] == pytest.approx(r.chosen["kl"], rel=1e-9)
        assert m["delta_ppl"] == pytest.approx(r.chosen["delta_ppl"], rel=1e-9)
        assert r.verified == p.budget.ok(m)
        assert "modelled" in paths["table"].read_text()
        # and a separate `precisim eval` of the YAML on the same tokens (its own model load
        # and thread count: equal to summation-order noise)
        out = tmp_path / "eval"
        assert main(["eval", "--data", DATA, "--recipes", "", "--recipe-file",
                     str(paths["recipe"]), "--tokens", "128", "--window", "128",
                     "--bootstrap", "100", "--numerics", "native", "--no-plot",
                     "--out", str(out)]) == 0
        sheet = json.loads((out / "spec_sheet.json").read_text())
        e = sheet["metrics"][r.recipe.name]
        assert e["kl"] == pytest.approx(r.chosen["kl"], rel=1e-4)
        assert e["delta_ppl"] == pytest.approx(r.chosen["delta_ppl"], rel=1e-4, abs=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_module_costs_follow_the_objective() -> None:
    """Each objective's per-module cost is its formula: bits = k n bits/weight; energy / area =
    k n x the modelled cost per product; time = the roofline of the GEMM (memory bound at
    batch 1: weight and activation bytes / bandwidth)."""
    import torch
    from precisim.eval.accelerators import get_accelerator
    from precisim.eval.cost import gemm_cost
    from precisim.eval.search import module_costs

    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    specs = {c: candidate_spec(c) for c in ("nvfp4", "mxfp8")}
    k, n = 64, 32
    bits = module_costs(model, specs, Objective("bits"), ["0"])
    assert bits["nvfp4"]["0"] == k * n * 4.5 and bits["mxfp8"]["0"] == k * n * 8.25
    en = module_costs(model, specs, Objective("energy"), ["0"])
    assert en["nvfp4"]["0"] == pytest.approx(k * n * gemm_cost(specs["nvfp4"]).energy)
    ar = module_costs(model, specs, Objective("area"), ["0"])
    assert ar["mxfp8"]["0"] == pytest.approx(k * n * gemm_cost(specs["mxfp8"]).area)
    t = module_costs(model, specs, Objective("time", "h200", batch=1), ["0"])
    bw = get_accelerator("h200").bandwidth
    assert t["nvfp4"]["0"] == pytest.approx((k * n * 4.5 / 8 + k * 4.5 / 8 + n * 2) / bw)
    assert t["nvfp4"]["0"] < t["mxfp8"]["0"]


# ---------------------------------------------------------------------------------------------
# the back-off loop (docs/cost-perf.md section 8)

ORDER = ["bf16", "mxfp8", "nvfp4"]
SENS = {("mxfp8", "g0"): 1.0, ("nvfp4", "g0"): 5.0, ("mxfp8", "g1"): 0.5,
        ("nvfp4", "g1"): 4.0, ("mxfp8", "g2"): 0.1, ("nvfp4", "g2"): 0.3,
        ("mxfp8", "g3"): 0.2, ("nvfp4", "g3"): 2.0}


def _weight(lab: str, g: str) -> float:
    return 0.0 if lab == "bf16" else SENS[(lab, g)]


def test_backoff_promotes_the_most_sensitive_groups_until_it_fits() -> None:
    """With an exactly additive measure (value = base + load) one round promotes the groups
    whose promotion removes the most sensitivity until the fraction (value - target) /
    (value - base) of the load is gone, and the result meets the target."""
    from precisim.eval.search import backoff

    seen = []

    def additive(a: dict[str, str]) -> float:
        seen.append(dict(a))
        return 0.1 + sum(_weight(lab, g) for g, lab in a.items())

    start = {g: "nvfp4" for g in ("g0", "g1", "g2", "g3")}
    v = additive(start)  # 0.1 + 11.3
    rows = backoff(start, ORDER, _weight, additive, value=v, target=5.0, base_value=0.1)
    # need (11.4 - 5) / (11.4 - 0.1) x 11.3 = 6.4 of load removed: g1 (gain 3.5), g0 (4.0)
    assert len(rows) == 1 and rows[0]["meets"] and rows[0]["value"] <= 5.0
    assert rows[0]["promoted"] == ["g0", "g1"]
    assert rows[0]["assignment"] == {"g0": "mxfp8", "g1": "mxfp8", "g2": "nvfp4",
                                     "g3": "nvfp4"}
    assert rows[0]["value"] == pytest.approx(0.1 + 1.0 + 0.5 + 0.3 + 2.0)
    # already within the target: nothing to do
    assert backoff(start, ORDER, _weight, additive, value=v, target=20.0,
                   base_value=0.1) == []


def test_backoff_takes_more_rounds_when_the_measure_is_worse_than_additive() -> None:
    """A measure twice the additive prediction needs several rounds; every round promotes at
    least one group by exactly one level and never makes the load larger; when even the
    all-expensive assignment misses, the loop stops with every group promoted (no row meets)."""
    from precisim.eval.search import backoff

    def doubled(a: dict[str, str]) -> float:
        return 2.0 * sum(_weight(lab, g) for g, lab in a.items())

    start = {g: "nvfp4" for g in ("g0", "g1", "g2", "g3")}
    rows = backoff(start, ORDER, _weight, doubled, value=doubled(start), target=2.0,
                   base_value=0.0)
    assert len(rows) >= 2 and rows[-1]["meets"] and not any(r["meets"] for r in rows[:-1])
    prev = start
    for r in rows:
        moved = [g for g in prev if prev[g] != r["assignment"][g]]
        assert moved == sorted(r["promoted"]) or set(moved) == set(r["promoted"])
        for g in moved:
            assert ORDER.index(r["assignment"][g]) == ORDER.index(prev[g]) - 1
        assert doubled(r["assignment"]) <= doubled(prev)
        prev = r["assignment"]
    never = backoff(start, ORDER, _weight, lambda a: 1.0 + doubled(a), value=99.0, target=0.5,
                    base_value=1.0, max_rounds=50)
    assert never and not any(r["meets"] for r in never)
    assert set(never[-1]["assignment"].values()) == {"bf16"}
    assert len(backoff(start, ORDER, _weight, doubled, value=99.0, target=0.0, base_value=0.0,
                       max_rounds=2)) == 2


def test_search_backs_off_on_the_tiny_checkpoint(tiny_search) -> None:
    """On the tiny Llama (KL budget 8e-5 on the estimate, per-module groups) the predicted edge
    misses the target on the search set, the back-off promotes modules until a measured point
    meets it, and the chosen recipe is the cheapest evaluated point that meets it; each
    back-off row is the previous assignment with the promoted modules one level back."""
    model, r = tiny_search
    greedy = [row for row in r.path if row["stage"] == "greedy"]
    back = [row for row in r.path if row["stage"] == "backoff"]
    assert back, "the budget was chosen so that the predicted edge misses"
    assert all(row["measured"] is not None for row in back)
    assert back[-1]["meets"] and not any(row["meets"] for row in back[:-1])
    assert all(row["moved"].startswith("promoted ") for row in back)
    ok = [row for row in r.path if row["measured"] is not None and row["meets"]]
    assert r.feasible and r.cost == min(row["cost"] for row in ok)
    assert r.chosen["kl"] is not None
    costs = [row["cost"] for row in greedy]
    assert costs == sorted(costs, reverse=True)
    # the chosen point measured on the search set meets the target
    chosen_row = next(row for row in ok if row["cost"] == r.cost)
    assert chosen_row["measured"] <= 8e-5
    # accepted by the held-out bound of its estimate and interval (docs/cost-perf.md 8)
    from precisim.eval.search import acceptance

    assert r.problem.verify_confidence == 0.95 and chosen_row["measured_high"] is not None
    for row in r.path:
        if row["measured"] is not None:
            s = {"kl": row["measured"], "kl_high": row["measured_high"]}
            assert row["accept"] == pytest.approx(acceptance(r.problem, s), rel=1e-12)
            assert row["meets"] == (row["accept"] <= 8e-5)
    assert "acceptance on the search set: the held-out estimate of kl" in r.table()


def test_search_problem_checks_the_new_knobs() -> None:
    with pytest.raises(SearchError, match="rank_by='ppl'"):
        SearchProblem(rank_by="ppl")
    with pytest.raises(SearchError, match="against='all'"):
        SearchProblem(against="all")
    with pytest.raises(SearchError, match="margin=-0.1"):
        SearchProblem(margin=-0.1)
    with pytest.raises(SearchError, match="max_backoff=-1"):
        SearchProblem(max_backoff=-1)


def test_search_detail_explains_each_group(tiny_search) -> None:
    """``SearchResult.groups`` / :meth:`detail`: one row per group with the chosen candidate
    (the result's assignment), the group's cost in each candidate (summing to the chosen
    cost and to each uniform recipe's cost) and its sensitivity rows in each cheaper one."""
    _, r = tiny_search
    labs = r.problem.labels()
    assert [row["group"] for row in r.groups] == list(r.assignment)
    assert all(row["chosen"] == r.assignment[row["group"]] for row in r.groups)
    assert sum(row["cost"] for row in r.groups) == pytest.approx(r.cost, rel=1e-12)
    for lab in labs:
        total = sum(row[f"cost_{lab}"] for row in r.groups)
        ver = next(v for v in r.verification if v["recipe"] == f"all-{lab}")
        assert total == pytest.approx(ver["cost"], rel=1e-12)
    sens = {(s["candidate"], s["group"]): s for s in r.sensitivities}
    cheaper = {c for c, _ in sens}
    assert len(cheaper) == len(labs) - 1
    for row in r.groups:
        for lab in cheaper:
            assert row[f"kl_{lab}"] == sens[lab, row["group"]]["kl"]
            assert row[f"delta_ppl_{lab}"] == sens[lab, row["group"]]["delta_ppl"]
    text = r.detail()
    assert text.startswith("per module group: cost in bits per weight (modelled)")
    assert all(row["group"] in text for row in r.groups)


def test_search_command_detail(tiny_checkpoint, tiny_text, tmp_path, capsys) -> None:
    """``precisim search --detail`` on the tiny checkpoint: the search table, then the
    per-group detail; groups.csv holds one row per group."""
    import csv

    data = tmp_path / "tiny.txt"
    data.write_text(tiny_text * 2)
    out = tmp_path / "out"
    assert main(["search", "--model", tiny_checkpoint, "--data", str(data),
                 "--candidates", "nvfp4,mxfp8", "--by", "op", "--budget", "kl:0.05",
                 "--search-tokens", "128", "--heldout-tokens", "128", "--window", "64",
                 "--bootstrap", "50", "--detail", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out verification" in text
    assert "per op group: cost in bits per weight (modelled)" in text
    with open(out / "groups.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and {"group", "chosen", "cost_nvfp4", "cost_mxfp8", "kl_nvfp4"} <= set(rows[0])
    assert all(row["group"] in text for row in rows)
