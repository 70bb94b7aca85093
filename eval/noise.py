"""The numerical-noise band of an evaluation's metrics (docs/reproducibility.md).

The token bootstrap's confidence interval says how far a metric could move with other text;
the noise band says how far it moves with the *same* text when only the order of the fp32
additions changes, as it does between machines, libraries and thread counts. It is measured by
re-running the evaluation (reference and recipes) under :func:`precisim.emulation.perturb.
perturbed_order` with a few seeds: every fp32 matmul and attention sums the same terms in a
permuted order. A difference between two recipes smaller than their noise bands is not a
format effect; ``precisim eval --spec`` checks a re-run from another environment against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from precisim.emulation import Recipe
from precisim.emulation.perturb import perturbed_order

__all__ = ["BAND_KEYS", "noise_band", "within_band"]

#: the point estimates a band is measured for (per recipe; ``reference`` has ``ppl``)
BAND_KEYS = ("ppl", "delta_ppl", "delta_ppl_rel", "kl", "top1")


def noise_band(model: torch.nn.Module, tokens: Sequence[int], recipes: Sequence[Recipe | str],
               *, seeds: int = 3, window: int = 1024, stride: int | None = None,
               prefix_token: int | None = None, baseline: Any = None) -> dict[str, Any]:
    """Each recipe's metrics (and the reference's ppl) under ``seeds`` perturbed summation
    orders, plus ``baseline`` (an :class:`~precisim.eval.perplexity.EvalResult` of the same
    evaluation unperturbed, if given): per recipe and key of :data:`BAND_KEYS` the ``min``,
    ``max`` and ``half_range`` over the runs."""
    from .perplexity import evaluate

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds={seeds!r} is not valid: accepted a positive integer")
    runs = [] if baseline is None else [baseline]
    for s in range(1, seeds + 1):
        with perturbed_order(s):
            runs.append(evaluate(model, tokens, recipes, window=window, stride=stride,
                                 prefix_token=prefix_token, bootstrap=0, telemetry=False,
                                 metrics=("ppl", "delta_ppl", "delta_ppl_rel", "kl", "top1")))
    values: dict[str, dict[str, list[float]]] = {"reference": {"ppl": []}}
    for res in runs:
        values["reference"]["ppl"].append(res.ref_ppl)
        for rr in res.results:
            d = values.setdefault(rr.recipe.name, {k: [] for k in BAND_KEYS})
            for k in BAND_KEYS:
                if k in rr.metrics:
                    d[k].append(float(rr.metrics[k]))
    band: dict[str, Any] = {"seeds": seeds, "runs": len(runs), "method":
                            "fp32 matmuls and attention with permuted reduction orders"}
    for name, d in values.items():
        band[name] = {k: {"min": min(v), "max": max(v), "half_range": (max(v) - min(v)) / 2}
                      for k, v in d.items() if v}
    return band


def within_band(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]],
                band: dict[str, Any], reference: tuple[float, float] | None = None
                ) -> list[str]:
    """Metrics of ``new`` further from ``old`` than their band's width (max - min): the
    differences that are not explained by the order of fp32 additions."""
    out = []
    if reference is not None and "reference" in band:
        b = band["reference"]["ppl"]
        if abs(reference[1] - reference[0]) > b["max"] - b["min"]:
            out.append(f"reference.ppl: {reference[0]} vs {reference[1]} (noise band width "
                       f"{b['max'] - b['min']:.3g})")
    for name, keys in band.items():
        if not isinstance(keys, dict) or name == "reference" or name not in old:
            continue
        for k, b in keys.items():
            if k in old[name] and k in new.get(name, {}):
                diff = abs(float(new[name][k]) - float(old[name][k]))
                if diff > b["max"] - b["min"]:
                    out.append(f"{name}.{k}: {old[name][k]} vs {new[name][k]} (noise band "
                               f"width {b['max'] - b['min']:.3g})")
    return out
