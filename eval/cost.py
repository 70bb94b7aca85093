"""A first-order datapath cost model: relative area and energy per product of a matrix unit.

**It is a model, not a measurement** (every result says so, :data:`MODEL_NOTE`). It counts the
bit cells of the blocks a block-FMA datapath is built from (docs/cost-perf.md has every
formula, its derivation and the assumptions) and prices them with per-cell coefficients
derived from published 45 nm figures (:class:`CostCoefficients`, Horowitz, ISSCC 2014):

* ``mul`` cells: one partial-product cell of an array multiplier (p_a x p_b of them);
* ``add`` bits: one bit of a two-input adder, comparator or incrementer;
* ``shift`` cells: one 2:1 multiplexer bit of a barrel shifter (W x ceil(log2 W) of them for a
  W-bit shifter), priced so that an fp32 adder costs what Horowitz measured.

Terms per product of a :class:`~precisim.emulation.MatrixUnit` (``d = sum a_i b_i + c`` in
blocks of k products; per-block terms are divided by k): ``multiplier`` (significand array,
p_a p_b), ``exponent_add``, ``max_exponent`` (comparators over the block's terms),
``alignment`` (one shifter per term, W = F + 2 bits), ``adder_tree`` (k or k + 1 terms),
``drop`` (sticky bits, per-term rounding), ``product_rounding``, ``normalise`` and
``round`` (once per block), ``accumulate`` (c added after the block sum), ``scale_apply``
(block scales: E8M0 = exponent adds, E4M3/fp32 = a significand multiply, once per
min(scale block, k or promotion interval) products) and ``promotion`` (an fp32 add every N
products). Results are relative to the **baseline**: a bf16 x bf16 multiply with fp32
accumulation, the unit ``fma-bf16-fp32`` (one fused multiply-add per product) = 1.

    from precisim.eval.cost import unit_cost, gemm_cost
    unit_cost("h100-e4m3").energy        # energy per product, baseline = 1 (a model)
    print(unit_cost("h100-e4m3").table())
    gemm_cost(get_recipe("nvfp4").linear)  # a recipe's GEMM: scales, storage bits

Non-GEMM units plug in with :func:`register_cost_model` (a function from the description to a
:class:`DatapathCost`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from precisim.emulation.matrix_unit import CMode, Drop, MatrixUnit
from precisim.emulation.presets import get_unit
from precisim.emulation.specs import GemmSpec, TensorSpec
from precisim.formats import FloatFormat, IntFormat, Rounding, get_format
from precisim.formats.scaling import ScaledFormat

__all__ = ["BASELINE_UNIT", "COST_MODELS", "MODEL_NOTE", "CostCoefficients", "CostError",
           "CostTerm", "DatapathCost", "GemmCost", "HOROWITZ_2014", "SOURCES", "RecipeCost",
           "cost_record", "gemm_cost", "implied_unit", "recipe_cost", "recipe_module_cost",
           "register_cost_model", "resolve_coefficients", "unit_cost"]

#: what every output of the cost model says about itself
MODEL_NOTE = ("modelled by precisim's first-order datapath cost model (docs/cost-perf.md), "
              "not measured: relative to a bf16 multiply with fp32 accumulation = 1")

#: the unit whose cost per product is 1 (area and energy separately)
BASELINE_UNIT = "fma-bf16-fp32"

#: the publications the default coefficients come from (key -> full reference)
SOURCES: dict[str, str] = {
    "horowitz2014": "M. Horowitz, \"1.1 Computing's energy problem (and what we can do about "
                    "it)\", IEEE ISSCC 2014, pp. 10-14, doi:10.1109/ISSCC.2014.6757323 (45 nm, "
                    "0.9 V energy and area table)",
    "mistry2007": "K. Mistry et al., \"A 45nm logic technology with high-k+metal gate "
                  "transistors, strained silicon, 9 Cu interconnect layers, 193nm dry patterning, "
                  "and 100% Pb-free packaging\", IEEE IEDM 2007, pp. 247-250, "
                  "doi:10.1109/IEDM.2007.4418914 (0.346 um^2 6T SRAM cell; the table bits of "
                  "the non-GEMM units, docs/cost-perf.md section 4b)",
}

_KINDS = ("mul", "add", "shift")


class CostError(ValueError):
    """A cost-model input that cannot be costed (the message names it and what is accepted)."""


@dataclass(frozen=True)
class CostCoefficients:
    """The published figures the per-cell coefficients are derived from (defaults: Horowitz,
    ISSCC 2014, 45 nm, 0.9 V; energy in pJ per operation, area in um^2).

    Override any figure for another technology (``coeffs.with_(fp32_add_pj=...)``, or a YAML /
    JSON mapping through :meth:`from_dict`); the per-cell coefficients below are properties
    derived from the fields, with the formulas of docs/cost-perf.md section 2.
    """

    name: str = "horowitz-45nm"
    int8_mult_pj: float = 0.2
    int8_mult_um2: float = 282.0
    int32_add_pj: float = 0.1
    int32_add_um2: float = 137.0
    fp32_add_pj: float = 0.9
    fp32_add_um2: float = 4184.0
    sram_64b_read_pj: float = 10.0  #: 64-bit read of an 8 KB SRAM
    dram_64b_read_pj: float = 1300.0  #: 64-bit DRAM read, low end of Horowitz's 1.3-2.6 nJ
    sram_cell_um2: float = 0.346  #: one 6T SRAM bit cell at 45 nm (Mistry et al., IEDM 2007)
    source: str = "horowitz2014"
    technology: str = "45 nm, 0.9 V"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise CostError(f"cost coefficients: name={self.name!r} is not valid: accepted a "
                            "non-empty string")
        for f in dataclasses.fields(self):
            if f.type in ("float", float):
                v = getattr(self, f.name)
                if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 \
                        or not math.isfinite(v):
                    raise CostError(f"cost coefficients {self.name!r}: {f.name}={v!r} is not "
                                    "valid: accepted a positive finite number")
                object.__setattr__(self, f.name, float(v))
        if self.shift_cell_pj <= 0 or self.shift_cell_um2 <= 0:
            raise CostError(f"cost coefficients {self.name!r}: fp32_add_pj / fp32_add_um2 must "
                            "exceed the cost of a 32-bit significand-plus-exponent adder "
                            f"(32 add bits: {32 * self.add_bit_pj:.4g} pJ, "
                            f"{32 * self.add_bit_um2:.4g} um^2)")

    # -- per-cell coefficients (docs/cost-perf.md section 2) -------------------------------
    @property
    def mul_cell_pj(self) -> float:
        """Energy of one partial-product cell: an 8x8 multiplier / 64."""
        return self.int8_mult_pj / 64

    @property
    def mul_cell_um2(self) -> float:
        return self.int8_mult_um2 / 64

    @property
    def add_bit_pj(self) -> float:
        """Energy of one adder bit: a 32-bit adder / 32."""
        return self.int32_add_pj / 32

    @property
    def add_bit_um2(self) -> float:
        return self.int32_add_um2 / 32

    @property
    def shift_cell_pj(self) -> float:
        """Energy of one shifter cell: what an fp32 adder costs beyond its 24-bit significand
        and 8-bit exponent adders, over its two 24 x 5 shifters (align, normalise)."""
        return (self.fp32_add_pj - 32 * self.add_bit_pj) / (2 * 24 * 5)

    @property
    def shift_cell_um2(self) -> float:
        return (self.fp32_add_um2 - 32 * self.add_bit_um2) / (2 * 24 * 5)

    def energy_pj(self, kind: str) -> float:
        """Energy of one cell of ``kind`` (``mul``, ``add``, ``shift``)."""
        return {"mul": self.mul_cell_pj, "add": self.add_bit_pj,
                "shift": self.shift_cell_pj}[kind]

    def area_um2(self, kind: str) -> float:
        return {"mul": self.mul_cell_um2, "add": self.add_bit_um2,
                "shift": self.shift_cell_um2}[kind]

    @property
    def sram_bit_pj(self) -> float:
        return self.sram_64b_read_pj / 64

    @property
    def dram_bit_pj(self) -> float:
        return self.dram_64b_read_pj / 64

    def with_(self, **changes: Any) -> CostCoefficients:
        """A copy with some figures changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "cost coefficients"
                  ) -> CostCoefficients:
        """From a mapping of fields (unknown keys raise, naming the accepted ones)."""
        if not isinstance(d, Mapping):
            raise CostError(f"{where}: expected a mapping of fields, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        bad = [k for k in d if k not in names]
        if bad:
            raise CostError(f"{where}: unknown key(s) {', '.join(map(repr, bad))}; accepted: "
                            f"{', '.join(names)}")
        return cls(**dict(d))

    @classmethod
    def load(cls, path: str | Path) -> CostCoefficients:
        """From a YAML or JSON file of fields."""
        import json

        p = Path(path)
        if not p.is_file():
            raise CostError(f"cost coefficients file {str(p)!r} does not exist")
        text = p.read_text()
        if p.suffix.lower() == ".json":
            d = json.loads(text)
        else:
            import yaml

            d = yaml.safe_load(text)
        return cls.from_dict(d, where=f"cost coefficients {str(p)!r}")


#: the default coefficients (Horowitz, ISSCC 2014, 45 nm)
HOROWITZ_2014 = CostCoefficients()


# ---------------------------------------------------------------------------------------------
# results

@dataclass(frozen=True)
class CostTerm:
    """One block of the datapath: its cells per product by kind (``mul``, ``add``,
    ``shift``) and the formula they follow (docs/cost-perf.md section 3)."""

    name: str
    formula: str
    mul: float = 0.0
    add: float = 0.0
    shift: float = 0.0
    rom_bits: float = 0.0  #: table bits stored (area: one SRAM cell each; section 4b)
    read_bits: float = 0.0  #: table bits read per operation (energy: SRAM read per bit)

    def cells(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in _KINDS}

    def energy_pj(self, c: CostCoefficients) -> float:
        return sum(getattr(self, k) * c.energy_pj(k) for k in _KINDS) + \
            self.read_bits * c.sram_bit_pj

    def area_um2(self, c: CostCoefficients) -> float:
        return sum(getattr(self, k) * c.area_um2(k) for k in _KINDS) + \
            self.rom_bits * c.sram_cell_um2


@dataclass(frozen=True)
class DatapathCost:
    """The modelled cost of one datapath per product (see the module docstring): its terms,
    the coefficients, and the baseline's absolute cost; ``area`` and ``energy`` are relative
    to the baseline (= 1). ``note`` says it is a model."""

    name: str
    terms: tuple[CostTerm, ...]
    coefficients: CostCoefficients = HOROWITZ_2014
    baseline_energy_pj: float = 1.0
    baseline_area_um2: float = 1.0
    description: str = ""
    note: str = MODEL_NOTE

    @property
    def energy_pj(self) -> float:
        """Modelled energy per product (pJ, at the coefficients' technology)."""
        return sum(t.energy_pj(self.coefficients) for t in self.terms)

    @property
    def area_um2(self) -> float:
        """Modelled area per product lane (um^2): a k-product unit's area / k."""
        return sum(t.area_um2(self.coefficients) for t in self.terms)

    @property
    def energy(self) -> float:
        """Energy per product relative to the baseline."""
        return self.energy_pj / self.baseline_energy_pj

    @property
    def area(self) -> float:
        """Area per product lane relative to the baseline."""
        return self.area_um2 / self.baseline_area_um2

    def term(self, name: str) -> CostTerm:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(f"no term {name!r}; terms: {', '.join(t.name for t in self.terms)}")

    def records(self) -> list[dict[str, Any]]:
        """One row per term: cells, absolute and relative energy and area, formula."""
        c = self.coefficients
        return [{"term": t.name, **{f"{k}_cells": v for k, v in t.cells().items()},
                 "rom_bits": t.rom_bits, "read_bits": t.read_bits,
                 "energy": t.energy_pj(c) / self.baseline_energy_pj,
                 "area": t.area_um2(c) / self.baseline_area_um2,
                 "energy_pj": t.energy_pj(c), "area_um2": t.area_um2(c),
                 "formula": t.formula} for t in self.terms]

    def table(self) -> str:
        """A Markdown table of the terms and the total, headed by :data:`MODEL_NOTE`."""
        from .tables import render_table

        rows = [r for r in self.records() if r["energy"] or r["area"]]
        rows.append({"term": "total", "energy": self.energy, "area": self.area,
                     "energy_pj": self.energy_pj, "area_um2": self.area_um2, "formula": ""})
        cols = [("term", "term"), ("mul_cells", "mul cells"), ("add_cells", "add bits"),
                ("shift_cells", "shift cells"), ("energy", "energy (rel.)", ".4g"),
                ("area", "area (rel.)", ".4g"), ("formula", "formula")]
        head = (f"**{self.name}**: energy {self.energy:.4g}, area {self.area:.4g} per product "
                f"(baseline {BASELINE_UNIT} = 1; {self.coefficients.name}: "
                f"{self.energy_pj:.4g} pJ, {self.area_um2:.4g} um^2)\n\n_{self.note}_\n\n")
        return head + render_table(rows, cols, floatfmt=".3g")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "note": self.note, "baseline": BASELINE_UNIT,
                "energy": self.energy, "area": self.area, "energy_pj": self.energy_pj,
                "area_um2": self.area_um2, "coefficients": self.coefficients.name,
                "description": self.description,
                "terms": [{k: v for k, v in r.items()} for r in self.records()]}


# ---------------------------------------------------------------------------------------------
# widths

def _p(f: FloatFormat | IntFormat) -> int:
    """Significand width: mantissa bits + the hidden bit (integers: their bits)."""
    return f.man_bits + 1 if isinstance(f, FloatFormat) else f.bits


def _e(f: FloatFormat | IntFormat) -> int:
    return f.exp_bits if isinstance(f, FloatFormat) else 0


def ceil_log2(n: float) -> int:
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


def _shifter(width: float) -> float:
    """Cells of a barrel shifter over ``width`` bits: width x ceil(log2 width)."""
    return width * ceil_log2(width)


def _span(f: FloatFormat | IntFormat) -> int:
    """Bits from the largest to the smallest nonzero magnitude (the fixed-point width that
    holds every value exactly)."""
    if isinstance(f, IntFormat):
        return f.bits
    low = f.emin - f.man_bits if f.subnormals else f.emin
    return f.emax - low + 1


def _rounding_bits(r: Rounding, p: int, sr_bits: int | None = None) -> float:
    """Add bits of rounding a result to ``p`` significand bits (an incrementer; none for
    truncation, one sticky OR for round-to-odd; plus the random bits' adder for sr)."""
    if r is Rounding.TOWARD_ZERO:
        return 0.0
    if r is Rounding.ODD:
        return 1.0
    return float(p + ((sr_bits or 0) if r is Rounding.STOCHASTIC else 0))


@dataclass(frozen=True)
class _Scale:
    """Block-scale facts of one operand: the block length along K (None: amortised over the
    output), and the scale's significand and exponent widths."""

    length: int | None
    p: int
    e: int


def _scale_of(fmt: Any) -> _Scale | None:
    if not isinstance(fmt, ScaledFormat):
        return None
    g = fmt.granularity
    length = None
    if not g.is_per_tensor() and g.keep_axis is None:
        along = [size for ax, size in g.blocks if ax == -1]
        length = along[-1] if along else None
    s = fmt.scale
    pow2 = fmt.rule.power_of_two
    return _Scale(length, 1 if pow2 else _p(s), _e(s))


# ---------------------------------------------------------------------------------------------
# the model of a matrix unit

def _unit_terms(u: MatrixUnit, sa: _Scale | None = None, sb: _Scale | None = None
                ) -> list[CostTerm]:
    a, b, acc = u.a_format, u.b_format, u.acc_format
    k = u.block_size
    floats = isinstance(a, FloatFormat) or isinstance(b, FloatFormat)
    pa, pb = _p(a), _p(b)
    ea, eb = _e(a), _e(b)
    p_prod = pa + pb
    joint = u.c_mode is CMode.JOINT
    n = k + (1 if joint else 0)  # terms summed per block
    acc_float = isinstance(acc, FloatFormat)
    p_acc = _p(acc)
    p_blk = (u.block_result_bits + 1) if u.block_result_bits is not None else p_acc
    t: list[CostTerm] = [CostTerm("multiplier", "p_a * p_b mul cells", mul=pa * pb)]
    if not floats:
        # integer dot product: an adder tree of the k products, then the accumulator add
        width = p_prod + ceil_log2(k)
        t.append(CostTerm("adder_tree", "(k - 1) * (p_a + p_b + ceil(log2 k)) / k add bits",
                          add=(k - 1) * width / k))
        acc_bits = acc.bits if isinstance(acc, IntFormat) else p_acc + _e(acc)
        t.append(CostTerm("accumulate", "acc bits / k add bits", add=acc_bits / k))
        return t
    e_prod = max(ea, eb) + 1
    t.append(CostTerm("exponent_add", "max(e_a, e_b) + 1 add bits", add=e_prod))
    e_cmp = max(e_prod, _e(acc) if joint else 0) + 1
    t.append(CostTerm("max_exponent", "(n - 1) * e_cmp / k add bits, n = k (+1 with c "
                      "joint)", add=(n - 1) * e_cmp / k))
    if u.alignment_bits is not None:
        w = u.alignment_bits + 2
        shifters = n
        align_f = "n * W * ceil(log2 W) / k shift cells, W = F + 2"
    elif k == 1:
        # a fused multiply-add: one addend shifter over the 3p+2-style window
        w = p_prod + p_acc + 2
        shifters = 1
        align_f = "W * ceil(log2 W) shift cells, W = p_a + p_b + p_acc + 2 (FMA)"
    else:
        # exact block sums: every product aligned into a window spanning the products' range
        w = _span(a) + _span(b) + (p_acc + 2 if joint else 0)
        shifters = n
        align_f = "n * W * ceil(log2 W) / k shift cells, W = span(a) + span(b) (+ p_acc + 2)"
    t.append(CostTerm("alignment", align_f, shift=shifters * _shifter(w) / k))
    if u.alignment.value == "normalised":
        t.append(CostTerm("product_normalise", "p_a + p_b shift cells (one-bit shift)",
                          shift=p_prod))
    if u.product_format is not None:
        pf = u.product_format
        t.append(CostTerm("product_rounding", "p_a + p_b shift cells + rounding add bits",
                          shift=p_prod, add=_rounding_bits(u.product_rounding, _p(pf))))
    w_sum = w + ceil_log2(n)
    t.append(CostTerm("adder_tree", "(n - 1) * (W + ceil(log2 n)) / k add bits",
                      add=(n - 1) * w_sum / k))
    if u.alignment_bits is not None and u.drop is not Drop.TRUNCATE:
        if u.drop is Drop.NEAREST:
            t.append(CostTerm("drop", "k * W / k add bits (a rounding per term)", add=w))
        elif u.drop is Drop.STICKY:
            t.append(CostTerm("drop", "p_a + p_b add bits (a sticky OR per term)",
                              add=p_prod))
    if acc_float:
        t.append(CostTerm("normalise", "(W + ceil(log2 n)) * ceil(log2(...)) / k shift cells",
                          shift=_shifter(w_sum) / k))
        t.append(CostTerm("round", "rounding to p_blk bits / k add bits (0 for rtz)",
                          add=_rounding_bits(u.acc_rounding, p_blk, u.acc_sr_bits) / k))
    if not joint:
        if acc_float:
            t.append(CostTerm("accumulate", "(p_acc + e_acc) / k add bits + "
                              "2 p_acc ceil(log2 p_acc) / k shift cells (an fp adder)",
                              add=(p_acc + _e(acc)) / k, shift=2 * _shifter(p_acc) / k))
        else:
            t.append(CostTerm("accumulate", "acc bits / k add bits", add=acc.bits / k))
    scale = _scale_term(u, sa, sb, p_blk)
    if scale is not None:
        t.append(scale)
    if u.promotion_interval:
        pr = u.promotion_format
        pp, ep = _p(pr), _e(pr)
        nn = u.promotion_interval
        t.append(CostTerm("promotion", "((p_pr + e_pr + rounding) add bits + 2 p_pr "
                          "ceil(log2 p_pr) shift cells) / N (an fp add every N products)",
                          add=(pp + ep + _rounding_bits(u.promotion_rounding, pp)) / nn,
                          shift=2 * _shifter(pp) / nn))
    return t


def _scale_term(u: MatrixUnit, sa: _Scale | None, sb: _Scale | None, p_sum: int
                ) -> CostTerm | None:
    scaled = [s for s in (sa, sb) if s is not None and s.length is not None]
    if not scaled:
        return None
    length = min(s.length for s in scaled if s.length is not None)
    interval = min(length, u.promotion_interval or u.block_size)
    e_max = max(s.e for s in scaled)
    add = (len(scaled) - 1) * (e_max + 1) + (e_max + 2)
    ps = [s.p for s in scaled if s.p > 1]
    mul = 0.0
    if ps:
        p_scale = sum(ps) - (len(ps) - 1)
        mul = (ps[0] * ps[1] if len(ps) == 2 else 0) + p_sum * p_scale
    what = "E8M0/power-of-two: exponent adds" if not ps else "significand multiply"
    return CostTerm("scale_apply", f"per min(scale block, k or N) products: {what} "
                    "((n_s - 1)(e_s + 1) + e_s + 2 add bits; p_sa p_sb + p_sum (p_sa + p_sb "
                    "- 1) mul cells)", add=add / interval, mul=mul / interval)


@cache
def baseline_cost(coeffs: CostCoefficients) -> tuple[float, float]:
    base = DatapathCost(BASELINE_UNIT, tuple(_unit_terms(get_unit(BASELINE_UNIT))), coeffs)
    return base.energy_pj, base.area_um2


#: cost functions by description type (non-GEMM units register theirs)
COST_MODELS: dict[type, Callable[..., DatapathCost]] = {}


def register_cost_model(cls: type, fn: Callable[..., DatapathCost], *,
                        replace: bool = False) -> None:
    """Make :func:`unit_cost` cost descriptions of type ``cls`` with ``fn(desc,
    coefficients=...) -> DatapathCost`` (relative to the same baseline)."""
    if not isinstance(cls, type) or not callable(fn):
        raise TypeError("register_cost_model(cls, fn): a type and a callable")
    if cls in COST_MODELS and not replace:
        raise ValueError(f"a cost model for {cls.__name__} is registered already (pass "
                         "replace=True to replace it)")
    COST_MODELS[cls] = fn


def _resolve_coeffs(coefficients: CostCoefficients | Mapping[str, Any] | None
                    ) -> CostCoefficients:
    if coefficients is None:
        return HOROWITZ_2014
    if isinstance(coefficients, CostCoefficients):
        return coefficients
    return CostCoefficients.from_dict(coefficients)


def _matrix_unit_cost(unit: MatrixUnit, *, coefficients: CostCoefficients = HOROWITZ_2014,
                      a_scale: _Scale | None = None, b_scale: _Scale | None = None
                      ) -> DatapathCost:
    e0, a0 = baseline_cost(coefficients)
    return DatapathCost(unit.name, tuple(_unit_terms(unit, a_scale, b_scale)), coefficients,
                        e0, a0, unit.summary())


register_cost_model(MatrixUnit, _matrix_unit_cost)


def unit_cost(unit: Any, coefficients: CostCoefficients | Mapping[str, Any] | None = None
              ) -> DatapathCost:
    """The modelled cost per product of a datapath: a matrix unit (a name from
    :func:`precisim.emulation.available_units` or a :class:`MatrixUnit`) or any description
    with a registered cost model (:func:`register_cost_model`)."""
    coeffs = _resolve_coeffs(coefficients)
    if isinstance(unit, str):
        unit = get_unit(unit)
    for cls in type(unit).__mro__:
        if cls in COST_MODELS:
            return COST_MODELS[cls](unit, coefficients=coeffs)
    raise CostError(f"no cost model for {type(unit).__name__}: accepted a matrix-unit name, "
                    f"a MatrixUnit, or a type registered with register_cost_model "
                    f"({', '.join(c.__name__ for c in COST_MODELS)})")


# ---------------------------------------------------------------------------------------------
# GEMM specs and recipes

def element_format(fmt: Any) -> FloatFormat | IntFormat:
    return fmt.element if isinstance(fmt, ScaledFormat) else fmt


#: the format a role left in high precision is costed in (the usual deployment dtype)
HIGH_PRECISION = "bf16"


def implied_unit(spec: GemmSpec) -> MatrixUnit:
    """The datapath a GEMM spec is costed on: its matrix unit, or for the fake-quant
    convention (no unit: an fp32 matmul of the dequantized operands) a block-FMA unit with
    the operands' element formats (roles in high precision: bf16), k = the smaller scale
    block along K (at most 32; 32 without blocks), F = 25 (fp32-like alignment), c joint,
    truncation, an fp32 accumulator rounded to nearest (docs/cost-perf.md section 4)."""
    u = spec.matrix_unit()
    if u is not None:
        return u
    fa = element_format(spec.input.resolve()) if spec.input is not None \
        else get_format(HIGH_PRECISION)
    fb = element_format(spec.weight.resolve(-1)) if spec.weight is not None \
        else get_format(HIGH_PRECISION)
    lengths = [s.length for s in (_scale_of(_fmt(spec.input)), _scale_of(_fmt(spec.weight)))
               if s is not None and s.length]
    k = min([32, *lengths])
    return MatrixUnit(f"implied-{fa.name}x{fb.name}", fa, fb, block_size=k, alignment_bits=25,
                      acc_format="fp32", acc_rounding="rne",
                      description="the datapath a fake-quant GEMM is costed on (fp32 "
                      "accumulation of exact products)")


def _fmt(ts: TensorSpec | None) -> Any:
    return None if ts is None else ts.resolve(-1)


@dataclass(frozen=True)
class GemmCost:
    """The modelled cost of one GEMM spec: the datapath per product (scales included) and the
    storage bits per element of each operand (scales included)."""

    spec: str
    datapath: DatapathCost
    bits: dict[str, float] = field(default_factory=dict)
    note: str = MODEL_NOTE

    @property
    def energy(self) -> float:
        return self.datapath.energy

    @property
    def area(self) -> float:
        return self.datapath.area

    def traffic_pj(self, role: str, level: str = "dram") -> float:
        """Modelled energy of reading one element of ``role`` from ``dram`` or ``sram`` (pJ),
        at the coefficients' technology."""
        c = self.datapath.coefficients
        per_bit = {"dram": c.dram_bit_pj, "sram": c.sram_bit_pj}.get(level)
        if per_bit is None:
            raise CostError(f"level={level!r} is not valid: accepted 'dram', 'sram'")
        if role not in self.bits:
            raise CostError(f"role={role!r} is not valid: accepted {', '.join(self.bits)}")
        return self.bits[role] * per_bit

    def traffic(self, role: str, level: str = "dram") -> float:
        """:meth:`traffic_pj` relative to the baseline's energy per product."""
        return self.traffic_pj(role, level) / self.datapath.baseline_energy_pj

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "note": self.note, "energy": self.energy, "area": self.area,
                "bits": dict(self.bits), "datapath": self.datapath.to_dict()}


def gemm_cost(spec: GemmSpec | str | Mapping[str, Any],
              coefficients: CostCoefficients | Mapping[str, Any] | None = None) -> GemmCost:
    """The modelled cost of a GEMM spec (a :class:`GemmSpec`, a format name for both
    operands, or a mapping as in recipes): the datapath of :func:`implied_unit` with the
    block-scale application of the operands' scaled formats, and the operands' storage bits
    per element (``input``, ``weight``; high-precision roles: bf16, 16 bits)."""
    from precisim.emulation.specs import RecipeError

    if not isinstance(spec, GemmSpec):
        try:
            parsed = GemmSpec.parse(spec, "gemm spec")
        except RecipeError as e:
            raise CostError(str(e)) from None
        if parsed is None:
            parsed = GemmSpec()
        spec = parsed
    coeffs = _resolve_coeffs(coefficients)
    unit = implied_unit(spec)
    dp = _matrix_unit_cost(unit, coefficients=coeffs, a_scale=_scale_of(_fmt(spec.input)),
                           b_scale=_scale_of(_fmt(spec.weight)))
    bits = {r: (getattr(spec, r).bits_per_element() if getattr(spec, r) is not None
                else float(get_format(HIGH_PRECISION).bits)) for r in ("input", "weight")}
    return GemmCost(spec.describe(), dp, bits)


def recipe_cost(recipe: Any, op: str = "linear",
                coefficients: CostCoefficients | Mapping[str, Any] | None = None
                ) -> GemmCost | None:
    """The modelled cost of a recipe's default GEMM spec of op kind ``op`` (``linear``;
    ``attention.qk`` / ``attention.pv`` for the attention matmuls); None when the recipe
    leaves it in high precision. Rules are not costed here: :func:`recipe_module_cost` prices
    every module's own spec on a model."""
    from precisim.emulation import get_recipe

    r = get_recipe(recipe)
    kind, _, part = op.partition(".")
    spec = r.spec(kind)
    if part:
        spec = getattr(spec, part, None) if spec is not None else None
    if spec is None or not isinstance(spec, GemmSpec) or spec.is_identity:
        return None
    return gemm_cost(spec, coefficients)


@dataclass(frozen=True)
class RecipeCost:
    """The modelled cost of a recipe's ``op`` GEMMs on a model, every module priced at the
    spec the recipe's rules give it (high-precision modules as bf16 x bf16, see
    :data:`HIGH_PRECISION`) and weighted by its products per token (``in x out`` for a linear
    layer): ``energy`` / ``area`` per product and ``bits`` per element (``weight``: weighted by
    the weights, ``input``: by the products), relative to the baseline; ``by_spec`` lists each
    distinct spec with its products per token and its :class:`GemmCost` (docs/cost-perf.md
    section 4)."""

    recipe: str
    energy: float
    area: float
    bits: dict[str, float]
    macs: int
    by_spec: tuple[tuple[str, int, GemmCost], ...]
    note: str = MODEL_NOTE

    def describe(self) -> str:
        return "; ".join(f"{s}: {m / self.macs:.1%} of MACs" for s, m, _ in self.by_spec)


def recipe_module_cost(recipe: Any, model: Any, op: str = "linear",
                       coefficients: CostCoefficients | Mapping[str, Any] | None = None
                       ) -> RecipeCost | None:
    """:class:`RecipeCost` of ``recipe`` (a name or a :class:`~precisim.emulation.Recipe`) on
    ``model`` (a ``torch.nn.Module``): the products-weighted mean over the modules of op kind
    ``op`` of the cost of the spec each gets (its rules resolved by
    :func:`precisim.emulation.plan`); None when the model has no such module."""
    from precisim.emulation import get_recipe, plan

    r = get_recipe(recipe)
    macs: dict[Any, int] = {}
    for e in plan(model, r, warn=False).entries:
        if e.op != op:
            continue
        w = getattr(model.get_submodule(e.module), "weight", None)
        if w is None:
            raise CostError(f"module {e.module!r} has no weight to count its products")
        spec = e.spec if e.emulated else GemmSpec()
        macs[spec] = macs.get(spec, 0) + int(w.numel())
    n = sum(macs.values())
    if not n:
        return None
    rows = tuple((s.describe() if not s.is_identity else HIGH_PRECISION, m,
                  gemm_cost(s, coefficients)) for s, m in macs.items())
    return RecipeCost(r.name, sum(m * g.energy for _, m, g in rows) / n,
                      sum(m * g.area for _, m, g in rows) / n,
                      {role: sum(m * g.bits[role] for _, m, g in rows) / n
                       for role in ("input", "weight")}, n, rows)


def resolve_coefficients(value: CostCoefficients | Mapping[str, Any] | str
                         ) -> CostCoefficients:
    """Coefficients from themselves, a mapping of fields, the default's name
    (``horowitz-45nm``) or a YAML / JSON file of fields."""
    if isinstance(value, str):
        if value == HOROWITZ_2014.name:
            return HOROWITZ_2014
        if not Path(value).is_file():
            raise CostError(f"cost coefficients {value!r}: neither {HOROWITZ_2014.name!r} nor "
                            "a YAML / JSON file of CostCoefficients fields")
        return CostCoefficients.load(value)
    return _resolve_coeffs(value)


def cost_record(recipe: Any, coefficients: Any = (HOROWITZ_2014,), model: Any = None
                ) -> dict[str, Any]:
    """The modelled cost keys of a recipe as a sweep records them (docs/cost-perf.md section
    4c): ``bits_per_element`` (weights) and ``bits_a`` (activations), scales included, and
    ``dp_energy`` / ``dp_area`` per MAC of the linear layers under the first coefficient set;
    with several sets also ``dp_energy@NAME`` / ``dp_area@NAME`` for each. A recipe with
    rules is priced per module when ``model`` is given (:func:`recipe_module_cost`); the
    datapath keys are None when the linear layers stay in high precision."""
    from precisim.emulation import get_recipe

    r = get_recipe(recipe)
    sets = [resolve_coefficients(c) for c in coefficients]
    if not sets:
        raise CostError("cost_record: give at least one coefficient set")
    out: dict[str, Any] = {}
    for i, c in enumerate(sets):
        e = a = None
        bits: dict[str, Any] = {}
        rc = recipe_module_cost(r, model, coefficients=c) if r.rules and model is not None \
            else None
        if rc is not None:
            e, a, bits = rc.energy, rc.area, rc.bits
        else:
            g = recipe_cost(r, coefficients=c)
            if g is not None:
                e, a = g.energy, g.area
        if i == 0:
            bpe = r.bits_per_element()
            out["bits_per_element"] = bits.get("weight") or bpe.get("weight") or 32.0
            out["bits_a"] = bits.get("input") or bpe.get("input") or 32.0
            out["dp_energy"], out["dp_area"] = e, a
        if len(sets) > 1:
            out[f"dp_energy@{c.name}"], out[f"dp_area@{c.name}"] = e, a
    return out


# the non-GEMM units' cost models register themselves (docs/cost-perf.md section 4b)
from . import cost_functions as _cost_functions  # noqa: E402,F401
from . import cost_units as _cost_units  # noqa: E402,F401
