"""Cost models of the non-GEMM units (docs/cost-perf.md section 4b): elementwise function units,
reductions and the online-softmax attention datapath, registered with
:func:`precisim.eval.cost.register_cost_model`.

**Models, not measurements** (every result carries :data:`~precisim.eval.cost.MODEL_NOTE`).
They count the same cells as the matrix-unit model (multiplier cells, adder bits, shifter cells,
docs/cost-perf.md section 2) plus the bits of lookup tables (area: stored bits x one SRAM cell;
energy: the bits read per evaluation x the SRAM read energy per bit), per evaluated element,
relative to the same baseline (a bf16 multiply with fp32 accumulation = 1):

* a :class:`~precisim.emulation.functions.FunctionUnit` per evaluation: argument reduction,
  the core (``table``: 2^n entries of the table format, linear interpolation reading two and
  adding an FMA; ``polynomial``: 2^n pieces of degree + 1 coefficients and ``degree`` Horner
  FMAs; ``newton``: a 2^n-entry seed table and 2 (rcp) or 3 (rsqrt) FMAs per step; ``exact``
  and ``bound``: priced as the cubic piecewise polynomial that reaches the working precision,
  2^ceil((p_w + 1) / 4) pieces) and the output rounding;
* a :class:`~precisim.emulation.functions.Reduction` per element reduced: one floating-point
  add (sum) or comparator (max) in its format (n - 1 of them for n elements whatever the order);
* an :class:`~precisim.emulation.flash.AttentionDatapath` per score (one query-key pair): the
  running max, x - m, exp2, the row sum, the cast of P to its format, the P x V multipliers
  (``head_dim`` products of P's significand with V's) and the per-tile rescale of the
  accumulator, divided by the tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from precisim.emulation.flash import AttentionDatapath
from precisim.emulation.functions import FunctionUnit, Reduction
from precisim.emulation.functions.core import Fn
from precisim.emulation.functions.reduction import ReduceOp
from precisim.emulation.functions.units import Interp, Method
from precisim.formats import FloatFormat, get_format

from .cost import (
    HOROWITZ_2014,
    CostCoefficients,
    CostTerm,
    DatapathCost,
    baseline_cost,
    ceil_log2,
    element_format,
    register_cost_model,
)

__all__ = ["HEAD_DIM", "TableGeometry", "attention_datapath_cost", "cost_term", "fma_cells",
           "format_pe", "fp_add_cells", "scaled_cells",
           "function_unit_cost", "reduction_cost"]

#: the head dimension the attention datapath is priced at unless told (SmolLM2, Llama: 64-128)
HEAD_DIM = 128


def format_pe(f: Any) -> tuple[int, int]:
    """Significand bits (hidden bit included) and exponent bits of a float format."""
    f = get_format(f) if isinstance(f, str) else f
    if not isinstance(f, FloatFormat):
        raise ValueError(f"format {getattr(f, 'name', f)!r} is not a float format")
    return f.man_bits + 1, f.exp_bits


def fp_add_cells(p: int, e: int) -> dict[str, float]:
    """One floating-point adder of significand ``p`` and exponent ``e`` bits: ``p + e`` add
    bits and two ``p``-bit, ceil(log2 p)-level shifters (align, normalise): the structure the
    shift cell is calibrated on (an fp32 adder = Horowitz's 0.9 pJ, docs/cost-perf.md
    section 2)."""
    return {"add": float(p + e), "shift": float(2 * p * ceil_log2(p))}


def fma_cells(p: int, e: int, fused: bool = True) -> dict[str, float]:
    """One multiply-add in a format of ``p`` / ``e`` bits: a ``p x p`` multiplier array, an
    ``e``-bit exponent add and a floating-point add at ``2p`` bits (fused) or at ``p`` bits
    after a rounding (``p`` more add bits)."""
    a = fp_add_cells(2 * p if fused else p, e)
    return {"mul": float(p * p), "add": a["add"] + e + (0 if fused else p), "shift": a["shift"]}


def scaled_cells(cells: dict[str, float], k: float) -> dict[str, float]:
    """``cells`` with every count multiplied by ``k`` (work done ``k`` times per element)."""
    return {key: v * k for key, v in cells.items()}


def cost_term(name: str, formula: str, cells: dict[str, float] | None = None, *,
          rom_bits: float = 0.0, read_bits: float = 0.0) -> CostTerm:
    """A :class:`CostTerm` from cell counts (``mul``, ``add``, ``shift``; absent keys 0)."""
    c = cells or {}
    return CostTerm(name, formula, mul=c.get("mul", 0.0), add=c.get("add", 0.0),
                    shift=c.get("shift", 0.0), rom_bits=rom_bits, read_bits=read_bits)


def _spec_pe(ts: Any) -> tuple[int, int]:
    """Significand and exponent bits of a tensor spec's element format (None: fp32)."""
    if ts is None:
        return 24, 8
    return format_pe(element_format(ts.resolve(-1)))


def _bits(f: Any) -> int:
    f = get_format(f) if isinstance(f, str) else f
    return int(f.bits)


@dataclass(frozen=True)
class TableGeometry:
    """The storage and the multipliers of a function unit's core, every number derived from
    the unit's fields (docs/cost-perf.md section 4b): ``entries`` stored words of
    ``entry_bits`` each (table entries, Newton seeds, or polynomial pieces x coefficients),
    ``read_entries`` of them read per evaluation, and ``fmas`` multiply-adds per evaluation on
    ``multiplier`` = (significand bits x significand bits) arrays.

    Assumptions (first order, stated, not measured): the table is a ROM priced as SRAM cells
    (section 4b); linear interpolation reads two adjacent entries and does one FMA in the
    working format, t0 + f (t1 - t0), so one extra entry closes the table; a Newton step is 2
    (rcp: e = 1 - d y, y + y e) or 3 (rsqrt) FMAs; all multipliers are full working-format
    arrays, an upper bound: dedicated interpolators truncate the remainder and slope operands
    (J.-M. Muller, "Elementary Functions: Algorithms and Implementation", 3rd ed., Birkhauser
    2016, chapters on table-based methods; J.-A. Pineiro, S. F. Oberman, J.-M. Muller,
    J. D. Bruguera, "High-speed function approximation using a minimax quadratic
    interpolator", IEEE Trans. Computers 54(3), 2005)."""

    method: str
    entries: int
    entry_bits: int
    read_entries: int
    fmas: int
    multiplier: tuple[int, int]

    @property
    def stored_bits(self) -> int:
        """Bits held by the ROM: entries x entry width."""
        return self.entries * self.entry_bits

    @property
    def read_bits(self) -> int:
        """Bits read per evaluation: entries read x entry width."""
        return self.read_entries * self.entry_bits

    @property
    def multiplier_cells(self) -> int:
        """Multiplier cells per evaluation: FMAs x the product of the operand widths."""
        return self.fmas * self.multiplier[0] * self.multiplier[1]

    @classmethod
    def of(cls, u: FunctionUnit) -> TableGeometry:
        """The geometry of ``u``'s core (exact and bound units: the cubic they are priced
        as)."""
        pw, _ = format_pe(u.working_format)
        tw = _bits(u.table_format or u.working_format)
        cw = _bits(u.coef_format or u.working_format)
        n, m = u.table_bits, u.method
        if m is Method.TABLE:
            linear = u.interpolation is Interp.LINEAR
            return cls("table", (1 << n) + (1 if linear else 0), tw, 2 if linear else 1,
                       1 if linear else 0, (pw, pw))
        if m is Method.POLYNOMIAL:
            return cls("polynomial", (1 << n) * (u.degree + 1), cw, u.degree + 1, u.degree,
                       (pw, pw))
        if m is Method.NEWTON:
            per_step = 2 if u.function is Fn.RCP else 3
            return cls("newton", 1 << n, tw, 1, per_step * u.newton_steps, (pw, pw))
        pieces = 1 << math.ceil((pw + 1) / 4)
        return cls("cubic", pieces * 4, cw, 4, 3, (pw, pw))

    def describe(self) -> str:
        return (f"{self.method}: {self.entries} x {self.entry_bits} bits stored "
                f"({self.stored_bits}), {self.read_entries} read, {self.fmas} FMA(s) of "
                f"{self.multiplier[0]} x {self.multiplier[1]} bits")


def function_unit_terms(u: FunctionUnit) -> list[CostTerm]:
    """The terms of one evaluation of a function unit (module docstring); the storage and
    multiplier counts are :class:`TableGeometry`'s."""
    pw, ew = format_pe(u.working_format)
    geo = TableGeometry.of(u)
    terms = []
    fn, m = u.function, u.method
    red: dict[str, float] = {"add": float(u.arg_frac_bits + ew),
                             "shift": float(u.arg_frac_bits * ceil_log2(u.arg_frac_bits))}
    if fn is Fn.EXP:  # x * log2(e) first
        red = {k: red.get(k, 0.0) + v for k, v in fma_cells(pw, ew, u.fma).items()}
    terms.append(cost_term("range_reduction", "fixed-point split: a_f + e_w add bits, a_f x "
                       "ceil(log2 a_f) shift cells (+ one FMA for exp's x log2 e)", red))
    fma = fma_cells(pw, ew, u.fma if m is not Method.EXACT and m is not Method.BOUND
                    else True)
    if m is Method.TABLE:
        terms.append(cost_term("table", "(2^n [+1 if linear]) entries x w_t bits stored; 1 or 2 "
                           "entries read", rom_bits=geo.stored_bits, read_bits=geo.read_bits))
        if geo.fmas:
            terms.append(cost_term("interpolate", "one FMA in the working format",
                               scaled_cells(fma, geo.fmas)))
    elif m is Method.POLYNOMIAL:
        terms.append(cost_term("coefficients", "2^n pieces x (degree + 1) x w_c bits stored; "
                           "degree + 1 coefficients read", rom_bits=geo.stored_bits,
                           read_bits=geo.read_bits))
        terms.append(cost_term("horner", "degree FMAs in the working format",
                           scaled_cells(fma, geo.fmas)))
    elif m is Method.NEWTON:
        terms.append(cost_term("seed_table", "2^n entries x w_t bits stored, one read",
                           rom_bits=geo.stored_bits, read_bits=geo.read_bits))
        per_step = 2 if fn is Fn.RCP else 3
        terms.append(cost_term("newton", f"steps x {per_step} FMAs in the working format",
                           scaled_cells(fma, geo.fmas)))
    else:  # exact, bound: the cubic piecewise polynomial that reaches the working precision
        terms.append(cost_term("coefficients", "exact/bound priced as a cubic: 2^ceil((p_w+1)/4) "
                           "pieces x 4 x w_c bits stored, 4 read",
                           rom_bits=geo.stored_bits, read_bits=geo.read_bits))
        terms.append(cost_term("horner", "exact/bound priced as a cubic: 3 FMAs",
                           scaled_cells(fma, geo.fmas)))
    po, eo = format_pe(u.output_format)
    terms.append(cost_term("output_round", "p_out + e_out add bits (round, exponent adjust)",
                       {"add": float(po + eo)}))
    return terms


def function_unit_cost(u: FunctionUnit | str, *,
                       coefficients: CostCoefficients = HOROWITZ_2014) -> DatapathCost:
    """The modelled cost of one evaluation of a function unit (a name or a
    :class:`FunctionUnit`), relative to the baseline (docs/cost-perf.md section 4b)."""
    from precisim.emulation.functions import get_function_unit

    unit = get_function_unit(u) if isinstance(u, str) else u
    e0, a0 = baseline_cost(coefficients)
    return DatapathCost(unit.name, tuple(function_unit_terms(unit)), coefficients, e0, a0,
                        unit.describe())


def reduction_cost(r: Reduction, *, coefficients: CostCoefficients = HOROWITZ_2014
                   ) -> DatapathCost:
    """The modelled cost per element reduced: one adder (sum) or comparator (max) in the
    reduction's format (docs/cost-perf.md section 4b)."""
    p, e = format_pe(r.format)
    if r.op is ReduceOp.SUM:
        t = cost_term("add", "one floating-point add per element: p + e add bits, 2 p ceil(log2 p) "
                  "shift cells", fp_add_cells(p, e))
    else:
        t = cost_term("compare", "one comparator per element: p + e add bits",
                  {"add": float(p + e)})
    e0, a0 = baseline_cost(coefficients)
    return DatapathCost(f"reduce-{r.describe()}", (t,), coefficients, e0, a0, r.describe())


def attention_datapath_terms(dp: AttentionDatapath, head_dim: int = HEAD_DIM
                             ) -> list[CostTerm]:
    """The softmax-side terms of one score of an online-softmax attention datapath (module
    docstring); the QK^T products are the GEMM's (:func:`~precisim.eval.cost.gemm_cost`)."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim={head_dim!r} is not valid: accepted a positive integer")
    pm, em = format_pe(dp.max_format)
    ps, es = format_pe(dp.sum_format)
    pa, ea = format_pe(dp.alpha_format)
    pacc, eacc = format_pe(dp.acc_format)
    pp, ep = _spec_pe(dp.p_format)
    pvv = _spec_pe(dp.pv.weight if dp.pv is not None else None)[0]
    rescale = fma_cells(pa, ea)
    rescale["mul"] += head_dim * pacc * pacc
    rescale["add"] += head_dim * eacc
    exp2 = function_unit_terms(dp.exp2)
    exp2_cells = {k: sum(getattr(t, k) for t in exp2) for k in ("mul", "add", "shift")}
    terms = [
        cost_term("running_max", "one comparator in max_format: p + e add bits",
              {"add": float(pm + em)}),
        cost_term("subtract", "x - m: one fp add in fp32", fp_add_cells(24, 8)),
        cost_term("exp2", "the exp2 unit's cells (section 4b)", exp2_cells,
              read_bits=sum(t.read_bits for t in exp2)),
        cost_term("row_sum", "one fp add in sum_format", fp_add_cells(ps, es)),
        cost_term("p_cast", "round P to its format: p_P + e_P add bits", {"add": float(pp + ep)}),
        cost_term("pv_multiply", "head_dim products of P's and V's significands: head_dim x p_P x "
              "p_V mul cells", {"mul": float(head_dim * pp * pvv)}),
        cost_term("rescale", "per tile and row: exp2(m_old - m_new) in alpha_format (one FMA) and "
              "head_dim multiplies of O in acc_format (p_acc^2 mul cells, e_acc add bits "
              "each), / tile", scaled_cells(rescale, 1.0 / dp.tile)),
    ]
    rom = sum(t.rom_bits for t in exp2)
    if rom:
        terms.append(cost_term("exp2_table", "the exp2 unit's table bits (stored once per lane)",
                           rom_bits=rom))
    return terms


def attention_datapath_cost(dp: AttentionDatapath | str, *, head_dim: int = HEAD_DIM,
                            coefficients: CostCoefficients = HOROWITZ_2014) -> DatapathCost:
    """The modelled cost per score (query-key pair) of an attention datapath (a preset name or
    an :class:`AttentionDatapath`), softmax side and P x V multipliers, at ``head_dim``
    (docs/cost-perf.md section 4b)."""
    from precisim.emulation.flash import get_datapath

    d = get_datapath(dp) if isinstance(dp, str) else dp
    e0, a0 = baseline_cost(coefficients)
    return DatapathCost(d.name, tuple(attention_datapath_terms(d, head_dim)), coefficients, e0,
                        a0, d.describe())


register_cost_model(FunctionUnit, function_unit_cost)
register_cost_model(Reduction, reduction_cost)
register_cost_model(AttentionDatapath, attention_datapath_cost)
