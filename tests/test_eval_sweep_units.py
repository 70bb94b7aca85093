"""``precisim sweep`` with the keys of the units beyond the GEMM (softmax, normalization,
activation, glu, residual; docs/arithmetic.md sections 7.8 and 7.9) as its recipe axis, on the
tiny local checkpoint: every cell runs, each recipe file is its own cell (keyed by content),
the exact units reproduce the unpatched model's perplexity and approximate ones move it."""

from __future__ import annotations

import json

RECIPES = {
    "exact-units": "softmax: softmax-exact\nnormalization: rmsnorm\nactivation: silu\n"
                   "glu: fp32\nresidual: fp32\n",
    "sm-lut16": "softmax: softmax-lut16\n",
    "norm-bf16": "normalization: rmsnorm-bf16-seq\n",
    "silu-lut16": "activation: silu-table16\n",
    "stream-e4m3": "glu: bf16\nresidual: {format: e4m3, overflow: saturate}\n",
}


def test_sweep_over_unit_recipes(tiny_checkpoint, tiny_text, tmp_path, capsys) -> None:
    from precisim.eval.cli import main

    data = tmp_path / "text.txt"
    data.write_text(tiny_text)
    files = []
    for name, body in RECIPES.items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(f"name: {name}\n{body}")
        files.append(str(f))
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"name: units\nmodels: [{tiny_checkpoint}]\nrecipes: [{', '.join(files)}]\n"
                    f"datasets: [{data}]\nparams: {{tokens: 64, window: 32, bootstrap: 20}}\n")
    store = tmp_path / "runs.sqlite"
    assert main(["sweep", str(spec), "--store", str(store),
                 "--export", str(tmp_path / "units.json")]) == 0
    recs = [e["record"] for e in json.loads((tmp_path / "units.json").read_text())]
    by = {r["recipe_name"]: r for r in recs}
    assert set(by) == set(RECIPES)
    # every unit exact (fp32 model): the unpatched perplexity within fp32 noise
    assert abs(by["exact-units"]["ppl"] - by["exact-units"]["ppl_ref"]) \
        <= 1e-5 * by["exact-units"]["ppl_ref"]
    for name in ("sm-lut16", "silu-lut16", "stream-e4m3"):
        assert by[name]["kl"] > by["exact-units"]["kl"], name
    assert len({r["content_hash"] for r in recs}) == len(RECIPES)
    # the vendor table describes the units (sheet field recipes_resolved[].datapath)
    from precisim.emulation import Recipe
    from precisim.eval.spec import _recipe_info

    dp = _recipe_info(Recipe.load(files[-1]))["datapath"]
    assert dp == {"glu": "glu bf16", "residual": "residual float8_e4m3fn"}
    capsys.readouterr()  # a re-run finds every cell stored
    assert main(["sweep", str(spec), "--store", str(store)]) == 0
    assert f"{len(RECIPES)} cells" in capsys.readouterr().out
