"""precisim.eval.plots: Pareto and sensitivity PNGs."""

from __future__ import annotations

import pytest
from precisim.eval.plots import pareto_frontier, pareto_plot, sensitivity_plot

PNG = b"\x89PNG\r\n\x1a\n"

RECIPES = [
    {"recipe": "bf16", "bits_per_element": 16, "delta_ppl": 0.001, "delta_ppl_low": 0.0,
     "delta_ppl_high": 0.002},
    {"recipe": "fp8", "bits_per_element": 8, "delta_ppl": 0.05, "delta_ppl_low": 0.03,
     "delta_ppl_high": 0.07},
    {"recipe": "mxfp8", "bits_per_element": 8.25, "delta_ppl": 0.08, "delta_ppl_low": 0.05,
     "delta_ppl_high": 0.1},
    {"recipe": "mxfp4", "bits_per_element": 4.25, "delta_ppl": 2.1, "delta_ppl_low": 1.8,
     "delta_ppl_high": 2.4},
    {"recipe": "nvfp4", "bits_per_element": 4.5, "delta_ppl": 1.2, "delta_ppl_low": 1.0,
     "delta_ppl_high": 1.4},
]


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG) and len(data) > 2000


def test_pareto_frontier():
    xs = [r["bits_per_element"] for r in RECIPES]
    ys = [r["delta_ppl"] for r in RECIPES]
    assert [RECIPES[i]["recipe"] for i in pareto_frontier(xs, ys)] == [
        "mxfp4", "nvfp4", "fp8", "bf16"]
    assert pareto_frontier([1, 1, 2], [3, 2, 2]) == [1]
    assert pareto_frontier([1, float("nan")], [1, 0]) == [0]


def test_pareto_plot_png(tmp_path):
    out = pareto_plot(RECIPES, tmp_path / "sub" / "pareto.png", title="SmolLM2-135M", dpi=60)
    assert out == tmp_path / "sub" / "pareto.png" and _is_png(out)
    # no interval columns: no error bars, still a plot; a linear y axis
    plain = [{k: v for k, v in r.items() if not k.endswith(("_low", "_high"))} for r in RECIPES]
    assert _is_png(pareto_plot(plain, tmp_path / "plain.png", logy=False, label=None))
    nested = [{"cost": {"bits": r["bits_per_element"]}, "acc": {"d": r["delta_ppl"]},
               "recipe": r["recipe"]} for r in RECIPES]
    assert _is_png(pareto_plot(nested, tmp_path / "nested.png", x="cost.bits", y="acc.d",
                               yerr=None))
    assert (tmp_path / "v.svg").exists() is False
    pareto_plot(RECIPES, tmp_path / "v.svg")
    assert (tmp_path / "v.svg").read_text().lstrip().startswith("<?xml")


def test_sensitivity_plot_png(tmp_path):
    layers = [{"layer": f"model.layers.{i}.mlp.down_proj", "delta_ppl": (i * 7 % 11) / 10 - 0.2}
              for i in range(30)]
    out = sensitivity_plot(layers, tmp_path / "sens.png", top=10, dpi=60)
    assert _is_png(out)
    assert _is_png(sensitivity_plot(layers, tmp_path / "all.png", top=None, title="all"))


def test_bad_columns(tmp_path):
    with pytest.raises(KeyError, match="'bits'"):
        pareto_plot(RECIPES, tmp_path / "p.png", x="bits")
    with pytest.raises(KeyError, match="'ppl_delta'"):
        pareto_plot(RECIPES, tmp_path / "p.png", y="ppl_delta")
    with pytest.raises(KeyError, match="'name'"):
        pareto_plot(RECIPES, tmp_path / "p.png", label="name")
    with pytest.raises(KeyError, match="'lo'"):
        pareto_plot(RECIPES, tmp_path / "p.png", yerr=("lo", "hi"))
    with pytest.raises(KeyError, match="'module'"):
        sensitivity_plot([{"layer": "a", "delta_ppl": 1.0}], tmp_path / "s.png", x="module")
    with pytest.raises(ValueError, match="not a number"):
        pareto_plot([{"bits_per_element": "four", "delta_ppl": 1, "recipe": "x"}],
                    tmp_path / "p.png")
    with pytest.raises(ValueError, match="accepted suffixes"):
        pareto_plot(RECIPES, tmp_path / "p.jpg2")
    with pytest.raises(ValueError, match="empty"):
        pareto_plot([], tmp_path / "p.png")
    with pytest.raises(ValueError, match="top=0"):
        sensitivity_plot([{"layer": "a", "delta_ppl": 1.0}], tmp_path / "s.png", top=0)
    with pytest.raises(ValueError, match="no record has finite"):
        pareto_plot([{"bits_per_element": 4, "delta_ppl": float("nan"), "recipe": "x"}],
                    tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()
