"""Mixed-precision search: the cheapest per-layer assignment of candidate GEMM specs that meets
an accuracy budget, verified by a full evaluation on held-out tokens.

The problem (:class:`SearchProblem`): candidate specs for the linear layers (recipe or format
names: ``("nvfp4", "mxfp8")``), an accuracy :class:`Budget` (``delta_ppl`` or ``kl`` at most a
limit, or ``top1`` at least one; by default the bad end of the 95% confidence interval must
meet it), a cost :class:`Objective` (``bits`` of the weights, modelled datapath ``energy`` or
``area`` x time per token (:mod:`precisim.eval.cost`), or modelled decode ``time`` on an
accelerator (:mod:`precisim.eval.perf`)), the grouping (one decoder layer per group by
default) and the token budgets.

The method (docs/cost-perf.md section 8):

1. the text is split: the first ``heldout_tokens`` tokens are held out for the verification
   (they are what ``precisim eval --tokens N`` evaluates), the next ``search_tokens`` are the
   search set;
2. sensitivities (:func:`precisim.eval.layers.sensitivity`, the reference log-probabilities
   computed once): every group alone in each cheaper candidate, the rest unquantized
   (``against="reference"``: one group emulated per pass) or in the most expensive candidate
   (``"base"``), measured by the mean KL divergence to the reference logits (``rank_by="kl"``:
   a per-token sum over the vocabulary, far less noisy than one group's delta ppl) or by the
   budget's metric (``"budget"``);
3. a greedy path from all-expensive to all-cheap: each step moves the group whose next cheaper
   candidate saves the most cost per unit of sensitivity; a point's "load" is the sum of its
   groups' sensitivities;
4. both ends of the path are evaluated for real on the search set
   (:func:`precisim.eval.evaluate`, with bootstrap intervals) and the budget value of every
   point predicted in the load by a monotone piecewise-linear fit of every point measured so
   far (:class:`~precisim.eval.search_fit.MonotoneFit`; with the two ends, the line through
   them); a point is accepted on the search set when its **acceptance value** (the budget
   value the held-out check is predicted to stay within with probability
   ``verify_confidence``, :func:`acceptance`) meets the target, the limit tightened by
   ``margin``; the cheapest point predicted to meet it is evaluated; while it meets the
   target, the fit is redone with it and the cheapest point predicted to meet between it and
   the first measured point that misses is evaluated (at most ``refine`` rounds); if the edge
   misses, :func:`backoff` promotes its most sensitive groups one level back until the
   measured acceptance value meets the target (at most ``max_backoff`` rounds); the cheapest
   evaluated point that meets the target is chosen (the all-expensive one when none does).
   Every point is predicted before it is measured, and the errors of those predictions are
   reported (``SearchResult.calibration``); all evaluations share one
   :class:`~precisim.emulation.WeightCache`, so each (module, format) is quantized once for
   the whole search (``SearchResult.cache``);
5. the chosen recipe, and the candidates applied uniformly, are evaluated on the held-out
   tokens.

Outputs (:meth:`SearchResult.save`): ``recipe.yaml`` (runs with ``precisim eval
--recipe-file``), ``search.md`` / ``search.csv`` (the path and the verification), ``pareto.png``
(cost against delta ppl of every evaluated point).
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from precisim.emulation import GemmSpec, Recipe, RecipeError, Rule, WeightCache, get_recipe, plan

from .search_fit import MonotoneFit, heldout_bound, locate

__all__ = ["OBJECTIVES", "Budget", "backoff", "Objective", "SearchError", "SearchProblem",
           "SearchResult", "acceptance", "candidate_spec", "module_costs", "search"]

#: the cost a search minimises
OBJECTIVES = ("bits", "energy", "area", "time")
_METRICS = {"delta_ppl": False, "kl": False, "top1": True}  # higher is better?


class SearchError(ValueError):
    """A search problem that cannot be run (the message names the value)."""


@dataclass(frozen=True)
class Budget:
    """The accuracy a recipe must keep: ``metric`` (``delta_ppl`` or ``kl``: at most
    ``limit``; ``top1``: at least ``limit``), judged on the ``upper`` (the bad) end of its
    95% confidence interval or on the ``estimate``."""

    metric: str = "delta_ppl"
    limit: float = 1.0
    use: str = "upper"

    def __post_init__(self) -> None:
        if self.metric not in _METRICS:
            raise SearchError(f"budget metric={self.metric!r} is not valid: accepted "
                              f"{', '.join(_METRICS)}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int | float) or \
                not math.isfinite(self.limit):
            raise SearchError(f"budget limit={self.limit!r} is not valid: accepted a number")
        if self.use not in ("upper", "estimate"):
            raise SearchError(f"budget use={self.use!r} is not valid: accepted 'upper' (the "
                              "bad end of the 95% CI) or 'estimate'")

    @property
    def higher_is_better(self) -> bool:
        return _METRICS[self.metric]

    def value(self, summary: Mapping[str, Any]) -> float:
        """The number compared with the limit: the estimate, or the CI end on the bad side."""
        m = self.metric
        bad_end = f"{m}_low" if self.higher_is_better else f"{m}_high"
        if self.use == "estimate" or summary.get(bad_end) is None:
            return float(summary[m])
        return float(summary[bad_end])

    def ok(self, summary: Mapping[str, Any]) -> bool:
        v = self.value(summary)
        return v >= self.limit if self.higher_is_better else v <= self.limit

    def describe(self) -> str:
        rel = ">=" if self.higher_is_better else "<="
        what = "upper end of the 95% CI of" if self.use == "upper" and not \
            self.higher_is_better else "lower end of the 95% CI of" if self.use == "upper" \
            else ""
        return f"{what} {self.metric} {rel} {self.limit:g}".strip()


@dataclass(frozen=True)
class Objective:
    """The cost to minimise: ``bits`` (weight storage bits, scales included), ``energy`` /
    ``area`` (modelled datapath energy / area per product times the products per token, relative
    to a bf16 multiply with fp32 accumulation), or ``time`` (modelled time of the linear layers
    on ``accelerator`` for one step of ``batch`` sequences of ``tokens`` new tokens: decode by
    default)."""

    kind: str = "bits"
    accelerator: str = "h200"
    batch: int = 1
    tokens: int = 1

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise SearchError(f"objective={self.kind!r} is not valid: accepted "
                              f"{', '.join(OBJECTIVES)}")
        for f in ("batch", "tokens"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SearchError(f"objective {f}={v!r} is not valid: accepted a positive "
                                  "integer")
        if self.kind == "time":
            from .accelerators import get_accelerator

            get_accelerator(self.accelerator)

    @property
    def unit(self) -> str:
        return {"bits": "bits per weight", "energy": "energy per token (bf16-FMA = 1 per MAC)",
                "area": "area x time per token (bf16-FMA = 1 per MAC)",
                "time": f"s per step on {self.accelerator}"}[self.kind]


def candidate_spec(c: str | GemmSpec | Mapping[str, Any]) -> GemmSpec:
    """A candidate's linear GEMM spec: a recipe name (its ``linear`` spec), a format name (both
    operands), a mapping as in recipes, or a spec."""
    if isinstance(c, GemmSpec):
        return c
    if isinstance(c, str):
        try:
            r = get_recipe(c)
        except RecipeError:
            r = None
        if r is not None and r.spec("linear") is not None:
            return r.spec("linear")
    try:
        s = GemmSpec.parse(c, f"candidate {c!r}")
    except RecipeError as e:
        raise SearchError(str(e)) from None
    if s is None:
        raise SearchError(f"candidate {c!r} is high precision: give a format, a recipe or a spec")
    return s


@dataclass(frozen=True)
class SearchProblem:
    """What to search (see the module docstring). ``candidates``: names (or specs) of the linear
    layers' candidate specs; ``template``: a recipe whose other op kinds (attention, KV cache)
    every point keeps (None: high precision); ``by``: ``layer``, ``op`` or ``module``
    groups; ``rank_by``: the sensitivity measure (``kl`` or the ``budget`` metric);
    ``against``: sensitivities with the other groups unquantized (``reference``) or in the most
    expensive candidate (``base``); ``verify_confidence``: a point is accepted on the search set
    when the held-out check is predicted to pass with this probability (:func:`acceptance`;
    None: when the search set's own budget value meets the target, a rule that at the edge
    passes the held-out check about half the time); ``margin``: how much tighter than the
    budget the acceptance value must be (same unit as the limit; for what the noise model
    leaves out, e.g. a harder held-out text); ``max_backoff``: back-off rounds at most; ``refine``:
    refinement rounds at most (a cheaper path point tried after the edge met the target);
    ``weight_cache_bytes``: the budget of the quantized weights shared by all the search's
    evaluations (None: no limit)."""

    candidates: tuple[Any, ...] = ("nvfp4", "mxfp8")
    budget: Budget = field(default_factory=Budget)
    objective: Objective = field(default_factory=Objective)
    by: str = "layer"
    template: Any = None
    search_tokens: int = 2048
    heldout_tokens: int = 2048
    window: int = 512
    bootstrap: int = 1000
    seed: int = 0
    name: str = "searched"
    rank_by: str = "kl"
    against: str = "reference"
    margin: float = 0.0
    verify_confidence: float | None = 0.95
    max_backoff: int = 8
    refine: int = 2
    weight_cache_bytes: int | None = 2 << 30

    def __post_init__(self) -> None:
        cands = (self.candidates,) if isinstance(self.candidates, str) else \
            tuple(self.candidates)
        if len(cands) < 2:
            raise SearchError(f"candidates={self.candidates!r}: give at least two")
        object.__setattr__(self, "candidates", cands)
        for c in cands:
            candidate_spec(c)
        if self.by not in ("layer", "op", "module"):
            raise SearchError(f"by={self.by!r} is not valid: accepted layer, op, module")
        for f in ("search_tokens", "heldout_tokens", "window"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SearchError(f"{f}={v!r} is not valid: accepted a positive integer")
        if self.rank_by not in ("kl", "budget"):
            raise SearchError(f"rank_by={self.rank_by!r} is not valid: accepted kl, budget")
        if self.against not in ("reference", "base"):
            raise SearchError(f"against={self.against!r} is not valid: accepted reference, "
                              "base")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int | float) or \
                not math.isfinite(self.margin) or self.margin < 0:
            raise SearchError(f"margin={self.margin!r} is not valid: accepted a number >= 0")
        vc = self.verify_confidence
        if vc is not None and (isinstance(vc, bool) or not isinstance(vc, int | float) or
                               not 0.5 <= vc < 1):
            raise SearchError(f"verify_confidence={vc!r} is not valid: accepted a probability "
                              "in [0.5, 1), or None (the search set's own budget value)")
        for f in ("max_backoff", "refine"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SearchError(f"{f}={v!r} is not valid: accepted an integer >= 0")
        c = self.weight_cache_bytes
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
            raise SearchError(f"weight_cache_bytes={c!r} is not valid: accepted a number of "
                              "bytes >= 0, or None (no limit)")
        if not isinstance(self.budget, Budget) or not isinstance(self.objective, Objective):
            raise SearchError("budget and objective must be Budget and Objective objects")

    def labels(self) -> list[str]:
        return [c if isinstance(c, str) else candidate_spec(c).describe()
                for c in self.candidates]


def acceptance(problem: SearchProblem, summary: Mapping[str, Any]) -> float:
    """What the search compares with its target (the budget limit tightened by ``margin``) for
    a point measured on the search set (metric units; docs/cost-perf.md section 8,
    "acceptance"): :func:`~precisim.eval.search_fit.heldout_bound` of the budget metric's
    estimate and the bad end of its 95% interval, i.e. the budget value the held-out check is
    predicted to stay within with probability ``problem.verify_confidence``. With
    ``verify_confidence=None``, or a summary without an interval, it is the budget value
    itself (:meth:`Budget.value`)."""
    b = problem.budget
    m = b.metric
    bad = summary.get(f"{m}_low" if b.higher_is_better else f"{m}_high")
    if problem.verify_confidence is None or bad is None:
        return b.value(summary)
    sg = -1.0 if b.higher_is_better else 1.0
    return sg * heldout_bound(sg * float(summary[m]), sg * float(bad),
                              search_tokens=problem.search_tokens,
                              heldout_tokens=problem.heldout_tokens,
                              confidence=float(problem.verify_confidence), use=b.use)


# ---------------------------------------------------------------------------------------------
# costs

def module_costs(model: Any, specs: Mapping[str, GemmSpec], objective: Objective,
                 modules: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{candidate: {module: cost}}`` of each linear module of ``model`` under each spec;
    the objective of an assignment is the sum of its modules' costs (``bits``: then divided by
    the weights, see :func:`_normalise`)."""
    from .cost import gemm_cost
    from .perf import GemmNumerics, gemm_time

    shapes = {}
    for name in modules:
        w = model.get_submodule(name).weight
        shapes[name] = (int(w.shape[1]), int(w.shape[0]))  # in, out
    out: dict[str, dict[str, float]] = {}
    acc = None
    if objective.kind == "time":
        from .accelerators import get_accelerator

        acc = get_accelerator(objective.accelerator)
    for label, spec in specs.items():
        per: dict[str, float] = {}
        gc = gemm_cost(spec) if objective.kind in ("energy", "area") else None
        num = GemmNumerics.of(spec.input or "bf16", spec.weight or "bf16") \
            if objective.kind == "time" else None
        w_bits = spec.weight.bits_per_element() if spec.weight is not None else 16.0
        for name, (k, n) in shapes.items():
            if objective.kind == "bits":
                per[name] = k * n * w_bits
            elif objective.kind in ("energy", "area"):
                assert gc is not None
                per[name] = k * n * (gc.energy if objective.kind == "energy" else gc.area)
            else:
                assert num is not None and acc is not None
                m = objective.batch * objective.tokens
                flops = 2.0 * m * k * n
                nbytes = k * n * num.w_bits / 8 + m * (k * num.a_bits / 8 + n * 2)
                per[name] = gemm_time(flops, nbytes, acc, num.compute)[0]
        out[label] = per
    return out


# ---------------------------------------------------------------------------------------------
# results

@dataclass(frozen=True)
class SearchResult:
    """What :func:`search` found (see the module docstring): the ``recipe``, its
    ``assignment`` (group -> candidate), its ``cost`` under the objective, the greedy
    ``path`` (predicted and, where evaluated, measured accuracy on the search set), the
    held-out ``verification`` rows (the recipe and each candidate applied uniformly), whether
    the recipe met the budget on the search set (``feasible``) and on the held-out tokens
    (``verified``), the wall time of each stage (``seconds``), and one row per group
    (``groups``, :meth:`detail`): its candidate, its cost and its sensitivity in each
    candidate."""

    problem: SearchProblem
    recipe: Recipe
    assignment: dict[str, str]
    cost: float
    path: list[dict[str, Any]]
    verification: list[dict[str, Any]]
    sensitivities: list[dict[str, Any]]
    feasible: bool
    verified: bool
    seconds: dict[str, float]
    costs: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)
    note: str = ("costs are modelled (docs/cost-perf.md), accuracies measured: search set for "
                 "the path, held-out tokens for the verification")

    @property
    def chosen(self) -> dict[str, Any]:
        """The held-out verification row of the chosen recipe."""
        return next(r for r in self.verification if r["recipe"] == self.recipe.name)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.assignment.values():
            out[c] = out.get(c, 0) + 1
        return out

    def table(self) -> str:
        from .tables import render_table

        b = self.problem.budget
        o = self.problem.objective
        ch = self.chosen
        m = b.metric
        head = [
            f"**{self.recipe.name}**: {', '.join(f'{n} x {c}' for c, n in self.counts().items())}"
            f" ({self.problem.by} groups); cost {self.cost:.5g} {o.unit}",
            f"budget: {b.describe()}; search set: "
            + ("met" if self.feasible else "NOT met") + "; held-out: "
            + ("met" if self.verified else "NOT met")
            + f" ({m} {ch[m]:.4g} [{ch.get(f'{m}_low', math.nan):.4g}, "
              f"{ch.get(f'{m}_high', math.nan):.4g}])",
            self.acceptance_rule(),
            "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()),
            self._calibration_line(), self._cache_line(),
            "", f"_{self.note}_", "", "held-out verification:", ""]
        vcols = [("recipe", "recipe"), ("cost", "cost", ".5g"), ("ppl", "ppl", ".4g"),
                 ("delta_ppl_ci", "Δppl [95% CI]"), ("kl", "KL", ".4g"),
                 ("top1", "top-1", ".4f"), ("meets", "meets budget")]
        pcols = [("step", "step"), ("stage", "stage"), ("measured_as", "measured as"),
                 ("moved", "moved"),
                 ("cost", "cost", ".5g"),
                 ("predicted_before", "predicted acceptance value (before measuring)",
                  ".4g"),
                 ("measured", f"measured {m}", ".4g"),
                 ("measured_ci", "95% CI"), ("accept", "acceptance value", ".4g"),
                 ("meets", "accepted")]
        evaluated = [p for p in self.path if p.get("measured") is not None]
        return ("\n".join(head) + render_table(self.verification, vcols) +
                "\nevaluated points of the greedy path (search set):\n\n" +
                render_table(evaluated, pcols))

    def detail(self) -> str:
        """Why each group got its candidate (``precisim search --detail``): per group, the
        chosen candidate, the modelled cost of the group in each candidate (objective unit,
        the same terms as the total: bits per weight of the whole model for ``bits``), the
        group's sensitivity in each cheaper candidate (KL and delta ppl on the search set,
        the other groups unquantized or in the most expensive candidate as
        ``problem.against`` says; the most expensive candidate, where the path starts, has
        none)."""
        from .tables import render_table

        labs = self.problem.labels()
        cols = [("group", "group"), ("modules", "modules"), ("chosen", "chosen"),
                ("cost", "cost", ".5g")]
        cols += [(f"cost_{lab}", f"cost {lab}", ".5g") for lab in labs]
        cols += [(f"{k}_{lab}", f"{k} {lab}", ".4g") for lab in labs
                 for k in ("kl", "delta_ppl")
                 if any(f"{k}_{lab}" in r for r in self.groups)]
        o = self.problem.objective
        on = "alone" if self.problem.against == "reference" else "on top of the base"
        return (f"per {self.problem.by} group: cost in {o.unit} (modelled), sensitivity {on} "
                f"on the search set (measured; rank by {self.problem.rank_by})\n\n"
                + render_table(self.groups, cols))

    def acceptance_rule(self) -> str:
        """The rule that accepted points on the search set, in words (docs/cost-perf.md
        section 8, "acceptance")."""
        p = self.problem
        b = p.budget
        rel = ">=" if b.higher_is_better else "<="
        sg = -1.0 if b.higher_is_better else 1.0
        target = b.limit - sg * p.margin
        if p.verify_confidence is None:
            return (f"acceptance on the search set: its own {b.describe().rsplit(' ', 2)[0]} "
                    f"{rel} {target:g} (limit, margin {p.margin:g})")
        judged = "upper end of the 95% CI" if b.use == "upper" else "estimate"
        return (f"acceptance on the search set: the held-out {judged} of {b.metric} predicted "
                f"from the search set's estimate and interval ({p.search_tokens} search, "
                f"{p.heldout_tokens} held-out tokens) {rel} {target:g} (limit, margin "
                f"{p.margin:g}) with probability {p.verify_confidence:g}")

    def _calibration_line(self) -> str:
        c = self.calibration
        if not c:
            return ""
        err = "no point predicted before it was measured" if not c["predicted_points"] else (
            f"prediction error on the {c['predicted_points']} points predicted before they were "
            f"measured: mean |e| {c['mean_abs_error']:.4g}, max |e| {c['max_abs_error']:.4g}")
        return (f"accuracy prediction: monotone piecewise-linear fit in the load on "
                f"{c['measured_points']} measured points ({c['refine_rounds']} refinement "
                f"rounds); {err}")

    def _cache_line(self) -> str:
        c = self.cache
        if not c:
            return ""
        return (f"quantized-weight cache: {c['misses']} quantizations, {c['hits']} reuses, "
                f"at most {c['max_quantizations']} per (module, format), "
                f"{c['bytes'] / 2**20:.0f} MiB held, {c['evictions']} evicted")

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``recipe.yaml``, ``search.md``, ``search.csv`` (the whole path),
        ``verification.csv``, ``sensitivity.csv``, ``groups.csv`` (:meth:`detail`) and
        ``pareto.png``."""
        from precisim.formats.files import write_atomic

        from .plots import pareto_plot
        from .tables import write_table

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"recipe": self.recipe.save(out / "recipe.yaml"),
                 "table": write_atomic(out / "search.md", self.table()),
                 "path": write_table(self.path, out / "search.csv"),
                 "verification": write_table(self.verification, out / "verification.csv"),
                 "sensitivity": write_table(self.sensitivities, out / "sensitivity.csv")}
        if self.groups:
            paths["groups"] = write_table(self.groups, out / "groups.csv")
        m = self.problem.budget.metric
        pts = [{"label": p["label"], "cost": p["cost"], "y": p["measured"],
                "y_low": p.get("measured_low"), "y_high": p.get("measured_high")}
               for p in self.path if p.get("measured") is not None]
        if pts:
            have_ci = all(p["y_low"] is not None for p in pts)
            paths["pareto"] = pareto_plot(
                pts, out / "pareto.png", x="cost", y="y", label="label",
                yerr=("y_low", "y_high") if have_ci else None,
                title=f"{self.recipe.name}: {m} (search set) vs modelled cost",
                xlabel=f"{self.problem.objective.kind}: {self.problem.objective.unit} "
                "(modelled)", ylabel=m)
        return paths


# ---------------------------------------------------------------------------------------------
# the search

def _rule_pattern(group: str, by: str) -> tuple[str, str]:
    if by == "layer":
        return f"{group}.*", "glob"
    if by == "op":
        return group, "glob"
    return re.escape(group), "regex"


def _recipe(name: str, template: Recipe | None, default: GemmSpec,
            assign: Mapping[str, GemmSpec], by: str) -> Recipe:
    rules = []
    for g, spec in assign.items():
        if spec != default:
            pat, kind = _rule_pattern(g, by)
            rules.append(Rule(pat, kind, linear=spec))
    ops = dict(template.ops) if template is not None else {}
    ops["linear"] = default
    return Recipe(name, ops=ops, rules=tuple(rules),
                  description=f"mixed-precision search ({by} groups)")


def _summary_cells(s: Mapping[str, Any], metric: str) -> dict[str, Any]:
    lo, hi = s.get(f"{metric}_low"), s.get(f"{metric}_high")
    return {"measured": s[metric], "measured_low": lo, "measured_high": hi,
            "measured_ci": "" if lo is None else f"[{lo:.4g}, {hi:.4g}]"}


def backoff(assign: Mapping[str, str], order: Sequence[str],
            weight: Callable[[str, str], float], measure: Callable[[dict[str, str]], float],
            *, value: float, target: float, base_value: float, max_rounds: int = 8
            ) -> list[dict[str, Any]]:
    """Promote the most sensitive groups of ``assign`` (group -> candidate; ``order``: the
    candidates from the most expensive) one level back towards the most expensive candidate
    until ``measure(assignment)`` is at most ``target`` (values signed so that larger is
    worse: the budget value, see :meth:`Budget.value`).

    ``weight(candidate, group)``: the group's sensitivity alone in that candidate (0 in the
    most expensive); ``value``: the measured value of ``assign``; ``base_value``: that of the
    all-expensive assignment. Under the linear model ``value = base_value + slope x (sum of the
    groups' sensitivities)`` the fraction ``(value - target) / (value - base_value)`` of the
    sensitivity must go; each round promotes groups in order of the sensitivity their promotion
    removes until at least that fraction is removed (at least one group), then measures again.
    Returns one row per round (``assignment``, ``promoted``, ``value``, ``meets``); the last
    meets the target, or no group can be promoted, or ``max_rounds`` were spent
    (docs/cost-perf.md section 8)."""
    level_of = {lab: i for i, lab in enumerate(order)}
    cur = dict(assign)
    rows: list[dict[str, Any]] = []

    def w(lab: str, g: str) -> float:
        return 0.0 if level_of[lab] == 0 else float(weight(lab, g))

    for _ in range(max_rounds):
        if value <= target:
            break
        movable = [g for g, lab in cur.items() if level_of[lab] > 0]
        if not movable:
            break
        gain = {g: w(cur[g], g) - w(order[level_of[cur[g]] - 1], g) for g in movable}
        total = sum(w(lab, g) for g, lab in cur.items())
        frac = 1.0 if value - base_value <= 0 else \
            min(1.0, (value - target) / (value - base_value))
        need = frac * total
        promoted: list[str] = []
        removed = 0.0
        for g in sorted(movable, key=lambda g: (-gain[g], g)):
            if promoted and removed >= need:
                break
            promoted.append(g)
            removed += gain[g]
        for g in promoted:
            cur[g] = order[level_of[cur[g]] - 1]
        value = float(measure(dict(cur)))
        rows.append({"assignment": dict(cur), "promoted": promoted, "value": value,
                     "meets": value <= target})
    return rows


def search(model: Any, tokenizer: Any, data: Any, problem: SearchProblem | None = None, *,
           progress: bool = False) -> SearchResult:
    """Run ``problem`` (default :class:`SearchProblem`) on a loaded ``model`` and its
    ``tokenizer`` over ``data``: a path or dataset name (read by
    :func:`~precisim.eval.load_text`), a :class:`~precisim.eval.data.Text`, or token ids.
    ``progress``: a line on stderr after each stage and each sensitivity pass (one group in
    one candidate), and the evaluations' progress. See the module docstring."""
    from .data import load_text, prefix_token, tokenize
    from .layers import module_groups, reference_logprobs, sensitivity
    from .perplexity import evaluate

    p = problem or SearchProblem()
    t_start = time.perf_counter()

    def say(msg: str) -> None:  # stage progress on stderr (progress=True)
        if progress:
            print(f"[search +{time.perf_counter() - t_start:.0f} s] {msg}", file=sys.stderr,
                  flush=True)
    secs: dict[str, float] = {}
    need = p.heldout_tokens + p.search_tokens
    if isinstance(data, str | Path):
        data = load_text(data)
    if hasattr(data, "text"):
        ids = tokenize(tokenizer, data.text, need)
    elif isinstance(data, Sequence) and all(isinstance(t, int) for t in data[:8]):
        ids = list(data)[:need]
    else:
        raise SearchError(f"data must be a path, a dataset name, a Text or token ids, got "
                          f"{type(data).__name__}")
    if len(ids) < need:
        raise SearchError(f"the text has {len(ids)} tokens; the search needs heldout_tokens + "
                          f"search_tokens = {need}")
    held, srch = ids[:p.heldout_tokens], ids[p.heldout_tokens:]
    prefix = prefix_token(tokenizer)
    template = get_recipe(p.template) if p.template is not None else None
    labels = p.labels()
    specs = {lab: candidate_spec(c) for lab, c in zip(labels, p.candidates)}
    probe = Recipe("probe", linear=specs[labels[0]])
    entries = [e for e in plan(model, probe, warn=False).emulated() if e.op == "linear"]
    modules = [e.module for e in entries]
    groups = module_groups(model, probe, p.by)
    costs = module_costs(model, specs, p.objective, modules)
    total = {lab: sum(costs[lab].values()) for lab in labels}
    order = sorted(labels, key=lambda lab: -total[lab])  # most expensive first
    base = order[0]
    n_weights = sum(model.get_submodule(m).weight.numel() for m in modules)

    def cost_of(assign: Mapping[str, str]) -> float:
        c = sum(costs[lab][m] for g, lab in assign.items() for m in groups[g])
        return c / n_weights if p.objective.kind == "bits" else c

    base_recipe = _recipe(f"{p.name}-base", template, specs[base], {}, p.by)
    # each (module, spec) quantized once for the whole search (bit-identical: the cache keys
    # on the weight's identity, version and spec; bounded by weight_cache_bytes)
    wcache = WeightCache(p.weight_cache_bytes)
    secs["setup"] = time.perf_counter() - t_start

    # 1. sensitivities: each group alone in each cheaper candidate, against the reference
    # (only the group emulated) or on top of the base; the reference log-probs are computed once
    t0 = time.perf_counter()
    ref = reference_logprobs(model, srch, window=p.window, prefix_token=prefix)
    sens: dict[str, dict[str, dict[str, float]]] = {lab: {} for lab in order[1:]}
    sens_rows: list[dict[str, Any]] = []
    say(f"reference log-probabilities: {time.perf_counter() - t0:.0f} s")
    n_pass = (len(order) - 1) * len(groups)
    for lab in order[1:]:
        r = Recipe(f"{p.name}-{lab}", linear=specs[lab])
        for g, members in groups.items():  # one group per call: same rows, progress between
            rows = sensitivity(model, srch, r, by=p.by, window=p.window, prefix_token=prefix,
                               base=base_recipe if p.against == "base" else None,
                               groups={g: members}, reference=ref, weight_cache=wcache)
            for row in rows:
                sens[lab][row["group"]] = row
                sens_rows.append({"candidate": lab, **row})
            done = sum(len(v) for v in sens.values())
            say(f"sensitivity {done}/{n_pass} ({lab}, {g}): "
                f"{time.perf_counter() - t0:.0f} s")
    secs["sensitivity"] = time.perf_counter() - t0

    metric = p.budget.metric
    sign = -1.0 if p.budget.higher_is_better else 1.0
    rank_key = "kl" if p.rank_by == "kl" else metric
    rank_sign = 1.0 if p.rank_by == "kl" else sign

    def weight(lab: str, g: str) -> float:  # the group's loss alone in lab (larger is worse)
        return 0.0 if lab == base else rank_sign * float(sens[lab][g][rank_key])

    # 2. the greedy path, in sensitivity units (cumulative: "load")
    t0 = time.perf_counter()
    assign = {g: base for g in groups}
    level = {g: 0 for g in groups}
    load = 0.0
    path: list[dict[str, Any]] = [{"step": 0, "stage": "greedy", "moved": "",
                                   "assignment": dict(assign), "cost": cost_of(assign),
                                   "load": 0.0}]
    while True:
        best = None
        for g in groups:
            if level[g] + 1 >= len(order):
                continue
            cur, nxt = order[level[g]], order[level[g] + 1]
            saving = sum(costs[cur][m] - costs[nxt][m] for m in groups[g])
            penalty = weight(nxt, g) - weight(cur, g)
            score = saving / penalty if penalty > 1e-12 else math.inf
            key = (score, saving)
            if best is None or key > best[0]:
                best = (key, g, nxt, penalty)
        if best is None:
            break
        _, g, nxt, penalty = best
        level[g] += 1
        assign[g] = nxt
        load += penalty
        path.append({"step": len(path), "stage": "greedy", "moved": f"{g} -> {nxt}",
                     "assignment": dict(assign), "cost": cost_of(assign), "load": load})
    secs["greedy"] = time.perf_counter() - t0

    # 3. real evaluations on the search set: both ends, the predicted edge, then back-off
    t0 = time.perf_counter()
    evaluated: dict[int, dict[str, Any]] = {}

    def assignment_recipe(a: Mapping[str, str], name: str) -> Recipe:
        counts = {lab: sum(1 for x in a.values() if x == lab) for lab in order}
        default = max(order, key=lambda lab: counts[lab])
        return _recipe(name, template, specs[default], {g: specs[lab] for g, lab in a.items()},
                       p.by)

    def point_recipe(i: int) -> Recipe:
        return assignment_recipe(path[i]["assignment"], f"{p.name}-step{i}")

    def run(points: list[int]) -> None:
        todo = [i for i in dict.fromkeys(points) if i not in evaluated]
        if not todo:
            return
        res = evaluate(model, srch, [point_recipe(i) for i in todo], window=p.window,
                       prefix_token=prefix, bootstrap=p.bootstrap, seed=p.seed,
                       telemetry=False, progress=progress, weight_cache=wcache,
                       metrics=["ppl_ref", "ppl", "delta_ppl", "kl", "top1"])
        for i, rr in zip(todo, res.results):
            evaluated[i] = rr.metrics

    def value(i: int) -> float:  # the acceptance value, larger is worse
        return sign * acceptance(p, evaluated[i])

    target = sign * (p.budget.limit - sign * p.margin)  # the search-set target, larger = worse

    def target_ok(v: float) -> bool:
        return v <= target
    last = len(path) - 1
    run([0, last])
    v0 = value(0)

    def fit() -> MonotoneFit:  # calibrated on every point measured so far
        return MonotoneFit.of([(path[i]["load"], value(i)) for i in evaluated])

    def measure_point(i: int) -> float:  # predicted first (out of sample), then measured
        if i not in evaluated:
            before = fit()(path[i]["load"])
            run([i])
            path[i]["predicted_before"] = sign * before
            path[i]["prediction_error"] = sign * (value(i) - before)
        path[i].update(_summary_cells(evaluated[i], metric), accept=sign * value(i),
                       meets=target_ok(value(i)))
        return value(i)

    def measure_path_point(i: int) -> float:
        run([i])
        return value(i)

    loc = locate([row["load"] for row in path], {0: v0, last: value(last)},
                 measure_path_point, target, p.refine)
    for i, before in loc.predicted.items():
        path[i]["predicted_before"] = sign * before
        path[i]["prediction_error"] = sign * (value(i) - before)
    for i in loc.values:  # why each point of the greedy path was measured
        path[i]["measured_as"] = "end" if i in (0, last) else \
            "refine" if i in loc.refined else "edge"
    chosen_i, refine_rounds = loc.chosen, len(loc.refined)
    for i, s in evaluated.items():
        path[i].update(_summary_cells(s, metric), accept=sign * value(i),
                       meets=target_ok(value(i)))
    if chosen_i != 0 and not target_ok(value(chosen_i)):
        def measure(a: dict[str, str]) -> float:
            i = len(path)
            path.append({"step": i, "stage": "backoff", "moved": "", "assignment": a,
                         "cost": cost_of(a), "load": sum(weight(lab, g) for g, lab in a.items())})
            return measure_point(i)

        first = len(path)
        rounds = backoff(path[chosen_i]["assignment"], order, weight, measure,
                         value=value(chosen_i), target=target, base_value=v0,
                         max_rounds=p.max_backoff)
        for k, rd in enumerate(rounds):
            path[first + k]["moved"] = "promoted " + ", ".join(rd["promoted"])
        chosen_i = first + len(rounds) - 1 if rounds and rounds[-1]["meets"] else 0
    final = fit()
    for row in path:  # the budget value predicted by the fit on every measured point
        row["predicted"] = sign * final(row["load"])
    ok = [i for i, s in evaluated.items() if target_ok(value(i))]
    feasible = bool(ok)
    if ok:
        chosen_i = min(ok, key=lambda i: path[i]["cost"])
    for i, row in enumerate(path):
        row["label"] = ("all " + row["assignment"][next(iter(groups))]
                        if len(set(row["assignment"].values())) == 1 else f"step {i}")
        row.setdefault("measured", None)
        row.setdefault("accept", None)
        row.setdefault("predicted_before", None)
        row.setdefault("measured_as", "backoff" if row["stage"] == "backoff" else "")
        row.setdefault("prediction_error", None)
    secs["evaluate"] = time.perf_counter() - t0
    say(f"search-set evaluations ({len(evaluated)} points): {secs['evaluate']:.0f} s")

    # 4. the verification on held-out tokens
    t0 = time.perf_counter()
    chosen = point_recipe(chosen_i).with_(name=p.name)
    uniform = {lab: _recipe(f"all-{lab}", template, specs[lab], {}, p.by) for lab in order}
    res = evaluate(model, held, [chosen, *uniform.values()], window=p.window,
                   prefix_token=prefix, bootstrap=p.bootstrap, seed=p.seed, telemetry=False,
                   progress=progress, metrics=["ppl_ref", "ppl", "delta_ppl", "kl", "top1"],
                   weight_cache=wcache)
    ver = []
    for rr in res.results:
        s = rr.metrics
        lab = rr.recipe.name
        c = path[chosen_i]["cost"] if lab == p.name else \
            cost_of({g: lab[len("all-"):] for g in groups})
        ver.append({"recipe": lab, "cost": c, **{k: v for k, v in s.items()},
                    "delta_ppl_ci": f"{s['delta_ppl']:+.3f} [{s['delta_ppl_low']:+.3f}, "
                    f"{s['delta_ppl_high']:+.3f}]" if "delta_ppl_low" in s else "",
                    "meets": p.budget.ok(s)})
    secs["verification"] = time.perf_counter() - t0
    say(f"held-out verification: {secs['verification']:.0f} s")
    secs["total"] = time.perf_counter() - t_start
    verified = next(r for r in ver if r["recipe"] == p.name)["meets"]
    all_costs = _all_costs(model, chosen, modules)

    def counts(a: Mapping[str, str]) -> str:
        return ", ".join(f"{lab} {sum(1 for x in a.values() if x == lab)}" for lab in order)

    path_rows = [{k: v for k, v in r.items() if k != "assignment"}
                 | {"counts": counts(r["assignment"])} for r in path]
    errs = [r["prediction_error"] for r in path if r["prediction_error"] is not None]
    calib = {"measured_points": len(evaluated), "knots": len(final.loads),
             "predicted_points": len(errs), "refine_rounds": refine_rounds,
             "mean_abs_error": sum(abs(e) for e in errs) / len(errs) if errs else None,
             "max_abs_error": max((abs(e) for e in errs), default=None)}
    final_assign = dict(path[chosen_i]["assignment"])
    group_rows = []
    for g, members in groups.items():
        row: dict[str, Any] = {"group": g, "modules": len(members), "chosen": final_assign[g],
                               "cost": cost_of({g: final_assign[g]})}
        for lab in labels:
            row[f"cost_{lab}"] = cost_of({g: lab})
        for lab in order[1:]:
            row[f"kl_{lab}"] = sens[lab][g]["kl"]
            row[f"delta_ppl_{lab}"] = sens[lab][g]["delta_ppl"]
        group_rows.append(row)
    return SearchResult(p, chosen, final_assign, path[chosen_i]["cost"],
                        path_rows, ver, sens_rows, feasible, bool(verified), secs, all_costs,
                        calibration=calib, cache=wcache.stats(), groups=group_rows)


def _all_costs(model: Any, recipe: Recipe, modules: Sequence[str]) -> dict[str, float]:
    """Bits per weight and MAC-weighted relative energy and area of a recipe's linear layers,
    every module at the spec its rule gives it (modelled:
    :func:`precisim.eval.cost.recipe_module_cost`)."""
    from .cost import recipe_module_cost

    rc = recipe_module_cost(recipe, model)
    return {} if rc is None else {"bits_per_weight": rc.bits["weight"],
                                  "energy_per_mac": rc.energy, "area_per_mac": rc.area}
