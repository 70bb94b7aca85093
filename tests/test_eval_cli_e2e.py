"""``precisim sweep`` and ``precisim report`` end to end on a real (tiny, local) checkpoint: a
randomly initialised Llama saved as a Hugging Face directory with its own tokenizer, loaded
by the CLI through ``load_model``, evaluated under real recipes, stored, resumed, reported."""

from __future__ import annotations

import json


def test_sweep_report_and_resume_on_a_local_checkpoint(
    tiny_checkpoint, tiny_text, tmp_path, capsys
) -> None:
    from precisim.eval.cli import main

    data = tmp_path / "text.txt"
    data.write_text(tiny_text)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"name: e2e\nmodels: [{tiny_checkpoint}]\nrecipes: [mxfp8, nvfp4, bf16]\n"
                    f"datasets: [{data}]\nparams: {{tokens: 96, window: 48, bootstrap: 50}}\n")
    store = tmp_path / "runs.sqlite"
    assert main(["sweep", str(spec), "--store", str(store),
                 "--export", str(tmp_path / "e2e.json")]) == 0
    recs = [e["record"] for e in json.loads((tmp_path / "e2e.json").read_text())]
    by = {r["recipe"]: r for r in recs}
    assert set(by) == {"mxfp8", "nvfp4", "bf16"}
    for r in recs:
        assert r["tokens"] == 96 and r["ppl"] > 1 and 0 <= r["top1"] <= 1
        assert r["delta_ppl_low"] <= r["delta_ppl"] <= r["delta_ppl_high"]
    assert by["nvfp4"]["bits_per_element"] == 4.5 and by["nvfp4"]["cost"]["bits_w"] == 4.5
    assert by["nvfp4"]["kl"] > by["bf16"]["kl"] > 0
    # a re-run finds every cell stored and evaluates nothing
    capsys.readouterr()
    assert main(["sweep", str(spec), "--store", str(store)]) == 0
    assert "3 cells" in capsys.readouterr().out
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "nvfp4" in md and (tmp_path / "rep" / "pareto.png").stat().st_size > 1000
    # the modelled datapath cost is recorded per cell and is a cost axis of the report
    from precisim.eval.cost import recipe_cost

    assert by["nvfp4"]["dp_energy"] == by["nvfp4"]["cost"]["dp_energy"] == \
        recipe_cost("nvfp4").energy
    assert by["bf16"]["dp_area"] == recipe_cost("bf16").area
    assert "datapath energy/MAC (model)" in md
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "rep2"),
                 "--cost-axis", "dp_energy"]) == 0
    assert (tmp_path / "rep2" / "pareto.png").stat().st_size > 1000


def test_eval_writes_summary_and_reproduces_its_sheet(
    tiny_checkpoint, tiny_text, tmp_path, capsys
) -> None:
    from precisim.eval.cli import main

    data = tmp_path / "text.txt"
    data.write_text(tiny_text)
    out = tmp_path / "out"
    assert main(["eval", "--model", tiny_checkpoint, "--data", str(data), "--recipes",
                 "mxfp4,deepseek-fp8", "--fidelity", "fast", "--tokens", "64", "--window", "32",
                 "--bootstrap", "50", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    assert summary.strip() in printed and "deepseek-fp8@fast" in summary
    assert (out / "pareto.png").is_file() and (out / "spec_table.html").is_file()
    assert main(["eval", "--spec", str(out / "spec_sheet.json"), "--out",
                 str(tmp_path / "again")]) == 0
    assert "reproduced exactly" in capsys.readouterr().out


def test_sweep_with_a_cost_section(tiny_checkpoint, tiny_text, tmp_path, capsys) -> None:
    """precisim sweep with cost.coefficients and cost.max: NVFP4 (modelled energy per MAC
    0.325 > 0.32) is left out without being evaluated, MXFP8 runs and its record carries the
    cost under both coefficient sets; the report plots either (--cost-axis dp_energy@hot) and
    rejects an unknown axis with one error line."""
    from precisim.eval.cli import main
    from precisim.eval.cost import recipe_cost, resolve_coefficients

    data = tmp_path / "text.txt"
    data.write_text(tiny_text)
    hot = tmp_path / "hot.yaml"
    hot.write_text("name: hot\nfp32_add_pj: 1.8\n")
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"name: costed\nmodels: [{tiny_checkpoint}]\nrecipes: [mxfp8, nvfp4]\n"
                    f"datasets: [{data}]\nparams: {{tokens: 64, window: 32, bootstrap: 20}}\n"
                    f"cost: {{coefficients: [horowitz-45nm, {hot}], max: {{dp_energy: 0.32}}}}\n")
    store = tmp_path / "runs.sqlite"
    capsys.readouterr()
    assert main(["sweep", str(spec), "--store", str(store), "--export",
                 str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "left out" in out and "dp_energy 0.3247 > cost.max 0.32" in out
    assert "1 cells" in out and "1 left out by cost.max" in out
    recs = [e["record"] for e in json.loads((tmp_path / "c.json").read_text())]
    assert [r["recipe"] for r in recs] == ["mxfp8"]
    r = recs[0]
    assert r["dp_energy"] == recipe_cost("mxfp8").energy and r["ppl"] > 1
    want = recipe_cost("mxfp8", coefficients=resolve_coefficients(str(hot))).energy
    assert r["dp_energy@hot"] == want != r["dp_energy"]
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "rep"),
                 "--cost-axis", "dp_energy@hot"]) == 0
    assert (tmp_path / "rep" / "pareto.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "rep2"),
                 "--cost-axis", "dp_speed"]) == 2
    assert "--cost-axis 'dp_speed' is not valid" in capsys.readouterr().err
