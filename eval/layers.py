"""Per-layer error and per-layer sensitivity of a model under a recipe.

* :func:`layer_errors`: every emulated op (each linear layer, each attention's QK^T and PV) is
  also run in high precision on the *same* inputs (the emulated model's own activations), and
  its output error is reported as SQNR (dB) and relative RMS error, joined with the op's
  telemetry (saturation, flush-to-zero rates).
* :func:`sensitivity`: the recipe is applied to one group of modules at a time (a decoder
  layer, or one op type across layers), everything else in high precision; groups are ranked
  by the accuracy delta they cause alone (mean NLL delta as a perplexity delta, and KL to the
  reference), joined with the group's telemetry.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from precisim.emulation import Emulation, Recipe, Rule, WeightCache, get_recipe, plan

from .perplexity import (
    logits_of,
    prefixed,
    rolling_windows,
    token_kl,
    token_nll,
    window_logprobs,
)

__all__ = ["layer_errors", "sensitivity", "module_groups", "reference_logprobs"]


def _windows(tokens: Sequence[int] | torch.Tensor, window: int, prefix_token: int):
    seq = prefixed(tokens, prefix_token)
    return seq, rolling_windows(seq.numel() - 1, window)


def _rates(records: list[dict[str, Any]], keep: Any) -> dict[str, float]:
    n = sat = fl = 0
    for r in records:
        if keep(r["module"]):
            n += int(r["numel"])
            sat += int(r["saturated"])
            fl += int(r["flushed"])
    return {"saturated_rate": sat / n if n else 0.0, "flushed_rate": fl / n if n else 0.0}


def layer_errors(model: torch.nn.Module, tokens: Sequence[int] | torch.Tensor,
                 recipe: Recipe | str, *, window: int = 512, prefix_token: int = 0
                 ) -> list[dict[str, Any]]:
    """SQNR / relative error of every emulated op's output against the high-precision op on
    the same inputs, with the op's telemetry rates; sorted by SQNR (worst first)."""
    seq, wins = _windows(tokens, window, prefix_token)
    em = Emulation(model, get_recipe(recipe) if isinstance(recipe, str) else recipe,
                   errors=True)
    with torch.no_grad(), em:
        for w in wins:
            model(seq[w.start:w.end][None], use_cache=False)
    assert em.errors is not None and em.telemetry is not None
    tel = em.telemetry.records()
    rows = []
    for r in em.errors.records():
        op = str(r["op"])
        rows.append({**r, **_rates(tel, lambda m, op=op: m == op)})
    return sorted(rows, key=lambda r: r["sqnr_db"])


def module_groups(model: torch.nn.Module, recipe: Recipe | str, by: str = "layer"
                  ) -> dict[str, list[str]]:
    """Groups of emulated modules: ``layer`` (one decoder block, ``...layers.N``), ``op`` (one
    op type across blocks, e.g. ``mlp.down_proj``, ``self_attn``) or ``module`` (each)."""
    if by not in ("layer", "op", "module"):
        raise ValueError(f"group by {by!r}: accepted layer, op, module")
    p = plan(model, get_recipe(recipe) if isinstance(recipe, str) else recipe, warn=False)
    groups: dict[str, list[str]] = {}
    for e in p.emulated():
        m = re.match(r"(.*?\.(?:layers|h|blocks|layer)\.\d+)(?:\.(.*))?$", e.module)
        if by == "module" or m is None:
            key = e.module
        elif by == "layer":
            key = m.group(1)
        else:
            key = re.sub(r"\.\d+\.", ".*.", e.module)
        groups.setdefault(key, []).append(e.module)
    return groups


def _with_group(base: Recipe, r: Recipe, members: list[str]) -> Recipe:
    """``base`` with ``r``'s linear spec on the modules ``members`` (one rule each)."""
    rules = tuple(Rule(re.escape(m), "regex", linear=r.spec("linear")) for m in members)
    return base.with_(name=f"{base.name}+group", rules=base.rules + rules)


def reference_logprobs(model: torch.nn.Module, tokens: Sequence[int] | torch.Tensor, *,
                       window: int = 512, prefix_token: int = 0
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The unpatched model's log-probabilities and targets per window: computed once and
    passed to :func:`sensitivity` (``reference=``) by callers that run it several times on
    the same tokens."""
    seq, wins = _windows(tokens, window, prefix_token)
    with torch.no_grad():
        return [window_logprobs(logits_of(model, seq[w.start:w.end]), seq, w) for w in wins]


def sensitivity(model: torch.nn.Module, tokens: Sequence[int] | torch.Tensor,
                recipe: Recipe | str, *, by: str = "layer", window: int = 512,
                prefix_token: int = 0, base: Recipe | str | None = None,
                groups: dict[str, list[str]] | None = None,
                reference: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                weight_cache: WeightCache | None = None) -> list[dict[str, Any]]:
    """Emulate one group at a time; rank groups by the perplexity delta they cause alone.

    ``base``: the other groups run under this recipe instead of high precision, and the
    group gets ``recipe``'s linear spec on top of it (the deltas are still against the
    unpatched model); ``groups``: the groups to try (default :func:`module_groups`);
    ``reference``: :func:`reference_logprobs` of the same tokens, window and prefix (default:
    computed here); ``weight_cache``: quantized weights shared with other emulations
    (:class:`~precisim.emulation.WeightCache`). Each row also holds ``top1``, the agreement of
    the group's argmax with the reference's."""
    r = get_recipe(recipe) if isinstance(recipe, str) else recipe
    b = get_recipe(base) if isinstance(base, str) else base
    seq, wins = _windows(tokens, window, prefix_token)
    groups = module_groups(model, r, by) if groups is None else groups
    ref = reference_logprobs(model, tokens, window=window, prefix_token=prefix_token) \
        if reference is None else reference
    if len(ref) != len(wins):
        raise ValueError(f"reference has {len(ref)} windows; the tokens make {len(wins)}")
    ref_nll = torch.cat([token_nll(lp, t) for lp, t in ref])
    rows = []
    for name, members in groups.items():
        keep = set(members)
        if b is None:
            em = Emulation(model, r, only=lambda m, keep=keep: m in keep, warn=False,
                           weight_cache=weight_cache)
        else:
            em = Emulation(model, _with_group(b, r, members), warn=False,
                           weight_cache=weight_cache)
        nll, kl, top1 = [], [], []
        with torch.no_grad():
            for w, (lp0, t) in zip(wins, ref):
                with em:
                    lp, _ = window_logprobs(logits_of(model, seq[w.start:w.end]), seq, w)
                nll.append(token_nll(lp, t))
                kl.append(token_kl(lp0, lp))
                top1.append((lp.argmax(-1) == lp0.argmax(-1)).double())
        d_nll = float(torch.cat(nll).mean() - ref_nll.mean())
        assert em.telemetry is not None
        rows.append({
            "group": name, "modules": len(members),
            "delta_ppl": math.exp(float(ref_nll.mean())) * (math.exp(d_nll) - 1),
            "delta_nll": d_nll, "kl": float(torch.cat(kl).mean()),
            "top1": float(torch.cat(top1).mean()),
            **_rates(em.telemetry.records(), lambda m, keep=keep: m.split(".qk")[0]
                     .split(".pv")[0] in keep),
        })
    return sorted(rows, key=lambda x: -x["delta_ppl"])
