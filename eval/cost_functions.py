"""Cost models of the softmax, norm and activation units (docs/cost-perf.md section 4b), built
from the function-unit and reduction models of :mod:`precisim.eval.cost_units` and registered
with :func:`precisim.eval.cost.register_cost_model`, so that ``precisim cost --detail`` lists
their terms like a matrix unit's.

**Models, not measurements.** Per element of a row (the unit of work of these datapaths);
work done once per row (the softmax's reciprocal of the sum, the norm's mean and rsqrt) is
divided by ``row`` (:data:`ROW`, 1024, unless told). Cells as in section 2: a multiply in a
format of ``p`` significand bits is a ``p x p`` multiplier array plus its rounding (``p + e``
add bits); an add is :func:`~precisim.eval.cost_units.fp_add_cells`; a comparator is ``p + e``
add bits; a function unit is its own terms (section 4b) summed, its table bits counted once
(``*_table`` terms, stored once per lane); a division ``a / b`` is priced as ``rcp(b)`` then a
multiply (the unit's own rcp when it has one, else the exact rcp). Outputs left in the input's
dtype (``output_format=None``) are priced in bf16 (:data:`~precisim.eval.cost.HIGH_PRECISION`).
"""

from __future__ import annotations

from typing import Any

from precisim.emulation.functions import Activation, FunctionUnit, Norm, Softmax
from precisim.emulation.functions.datapath import Division, NormKind, Via
from precisim.formats import get_format

from .cost import (
    HIGH_PRECISION,
    HOROWITZ_2014,
    CostCoefficients,
    CostTerm,
    DatapathCost,
    baseline_cost,
    register_cost_model,
)
from .cost_units import cost_term, format_pe, fp_add_cells, function_unit_terms, scaled_cells

__all__ = ["ROW", "activation_cost", "activation_terms", "norm_cost", "norm_terms",
           "softmax_cost", "softmax_terms"]

#: the row length per-row work is divided by unless told (a 1024-token attention row, a
#: 1024-wide hidden state)
ROW = 1024


def _mul_cells(f: Any) -> dict[str, float]:
    """One rounded multiply in format ``f``: p x p mul cells, p + e add bits."""
    p, e = format_pe(f)
    return {"mul": float(p * p), "add": float(p + e)}


def _round_cells(f: Any) -> dict[str, float]:
    """A rounding to ``f`` (None: bf16): p + e add bits."""
    p, e = format_pe(f if f is not None else get_format(HIGH_PRECISION))
    return {"add": float(p + e)}


def _unit_cells(u: FunctionUnit) -> tuple[dict[str, float], float, float]:
    """A function unit's cells per evaluation, bits read per evaluation and table bits."""
    ts = function_unit_terms(u)
    cells = {k: float(sum(getattr(t, k) for t in ts)) for k in ("mul", "add", "shift")}
    return cells, float(sum(t.read_bits for t in ts)), float(sum(t.rom_bits for t in ts))


def _unit_term(name: str, u: FunctionUnit, per: float = 1.0) -> tuple[CostTerm, float]:
    cells, read, rom = _unit_cells(u)
    what = f"the {u.name} unit's cells (section 4b)" + ("" if per == 1 else " / row")
    return cost_term(name, what, scaled_cells(cells, per), read_bits=read * per), rom


def _check_row(row: int) -> None:
    if isinstance(row, bool) or not isinstance(row, int) or row < 1:
        raise ValueError(f"row={row!r} is not valid: accepted a positive integer")


def _with_tables(terms: list[CostTerm], roms: dict[str, float]) -> list[CostTerm]:
    for name, bits in roms.items():
        if bits:
            terms.append(cost_term(f"{name}_table", f"the {name} unit's table bits (stored once "
                               "per lane)", rom_bits=bits))
    return terms


def softmax_terms(s: Softmax, row: int = ROW) -> list[CostTerm]:
    """The terms of one element of a softmax row (module docstring)."""
    _check_row(row)
    pi, ei = format_pe(s.input_format)
    max_fmt = get_format("fp32") if s.max_of.value == "input" else s.input_format
    pm, em = format_pe(max_fmt)
    exp, exp_rom = _unit_term("exp", s.exp)
    terms = [
        cost_term("input_cast", "round x to input_format: p_in + e_in add bits",
              {"add": float(pi + ei)}),
        cost_term("max", "one comparator per element (max of x or of Q_in(x)): p + e add bits",
              {"add": float(pm + em)}),
        cost_term("subtract", "x - m: one fp add in sub_format",
                  fp_add_cells(*format_pe(s.sub_format))),
        exp,
        cost_term("sum", "one fp add per element in the sum reduction's format",
              fp_add_cells(*format_pe(s.sum.format))),
    ]
    roms = {"exp": exp_rom}
    if s.division is Division.DIVIDE:
        rcp, roms["rcp"] = _unit_term("divide", s.rcp)
        mul = _mul_cells("fp32")
        cells = {k: getattr(rcp, k) + mul.get(k, 0.0) for k in ("mul", "add", "shift")}
        terms.append(cost_term("divide", f"e / s per element: the {s.rcp.name} unit's cells "
                           "(section 4b) and a multiply in fp32", cells,
                           read_bits=rcp.read_bits))
    else:
        rcp, roms["rcp"] = _unit_term("reciprocal", s.rcp, 1.0 / row)
        terms.append(rcp)
        terms.append(cost_term("scale", "e x rcp(s) per element: a multiply in fp32",
                           _mul_cells("fp32")))
    terms.append(cost_term("output_round", "round to output_format (None: bf16): p + e add bits",
                       _round_cells(s.output_format)))
    return _with_tables(terms, roms)


def norm_terms(n: Norm, row: int = ROW) -> list[CostTerm]:
    """The terms of one element of an RMSNorm / LayerNorm row (module docstring)."""
    _check_row(row)
    pw, ew = format_pe(n.working_format)
    add_w = fp_add_cells(pw, ew)
    red = fp_add_cells(*format_pe(n.reduction.format))
    terms = []
    if n.kind is NormKind.LAYER:
        terms.append(cost_term("mean", "R(x): one fp add per element in the reduction's format, "
                           "and mu = sum / n (a multiply) / row",
                           {k: red.get(k, 0.0) + _mul_cells(n.working_format).get(k, 0.0) / row
                            for k in ("mul", "add", "shift")}))
        terms.append(cost_term("center", "x - mu: one fp add in the working format", add_w))
    terms.append(cost_term("square", "x^2 (or d^2): a multiply in the working format",
                       _mul_cells(n.working_format)))
    terms.append(cost_term("sum_squares", "one fp add per element in the reduction's format", red))
    per_row = {k: (_mul_cells(n.working_format).get(k, 0.0) + add_w.get(k, 0.0)) / row
               for k in ("mul", "add", "shift")}
    terms.append(cost_term("variance", "ss / n + eps: a multiply and an add in the working format, "
                       "/ row", per_row))
    rs, rom = _unit_term("rsqrt", n.rsqrt, 1.0 / row)
    terms.append(rs)
    terms.append(cost_term("normalise", "x r: a multiply in the working format",
                       _mul_cells(n.working_format)))
    out = n.output_format if n.output_format is not None else get_format(HIGH_PRECISION)
    terms.append(cost_term("weight", "the weight multiply (and its rounding) in the output format "
                       "(None: bf16)", _mul_cells(out)))
    return _with_tables(terms, {"rsqrt": rom})


def activation_terms(a: Activation) -> list[CostTerm]:
    """The terms of one activation evaluation (module docstring): ``via="unit"``: the unit and
    the output rounding; ``"exp-rcp"``: the argument (SiLU: none; gelu_sigmoid: one multiply;
    gelu_tanh: three multiplies and an add), exp, 1 + exp, rcp, x times it, the rounding. The
    GLU product (:meth:`~precisim.emulation.functions.Activation.glu`) is one more multiply,
    not counted here."""
    roms: dict[str, float] = {}
    terms = []
    if a.via is Via.UNIT:
        u, roms["unit"] = _unit_term("unit", a.unit)  # type: ignore[arg-type]
        terms.append(u)
    else:
        fn = a.function.value
        n_mul = {"silu": 0, "gelu_sigmoid": 1, "gelu_tanh": 3}[fn]
        if n_mul:
            m = scaled_cells(_mul_cells(a.working_format), n_mul)
            if fn == "gelu_tanh":
                add = fp_add_cells(*format_pe(a.working_format))
                m = {k: m.get(k, 0.0) + add.get(k, 0.0) for k in ("mul", "add", "shift")}
            terms.append(cost_term("argument", f"z for {fn}: {n_mul} multiply(ies)"
                               + (" and an add" if fn == "gelu_tanh" else "")
                               + " in the working format", m))
        e, roms["exp"] = _unit_term("exp", a.exp)
        terms.append(e)
        terms.append(cost_term("one_plus", "1 + exp(-z): one fp add in the working format",
                           fp_add_cells(*format_pe(a.working_format))))
        r, roms["rcp"] = _unit_term("rcp", a.rcp)
        terms.append(r)
        terms.append(cost_term("multiply", "x rcp(...): a multiply in the working format",
                           _mul_cells(a.working_format)))
    terms.append(cost_term("output_round", "round to output_format (None: bf16): p + e add bits",
                       _round_cells(a.output_format)))
    return _with_tables(terms, roms)


def _cost(name: str, terms: list[CostTerm], coefficients: CostCoefficients,
          description: str) -> DatapathCost:
    e0, a0 = baseline_cost(coefficients)
    return DatapathCost(name, tuple(terms), coefficients, e0, a0, description)


def softmax_cost(s: Softmax | str, *, row: int = ROW,
                 coefficients: CostCoefficients = HOROWITZ_2014) -> DatapathCost:
    """The modelled cost per element of a softmax unit (a preset name or a :class:`Softmax`),
    relative to the baseline (docs/cost-perf.md section 4b)."""
    u = Softmax.parse(s, "softmax")
    return _cost(u.name, softmax_terms(u, row), coefficients, u.describe())


def norm_cost(n: Norm | str, *, row: int = ROW,
              coefficients: CostCoefficients = HOROWITZ_2014) -> DatapathCost:
    """The modelled cost per element of a norm unit (a preset name or a :class:`Norm`)."""
    u = Norm.parse(n, "norm")
    return _cost(u.name, norm_terms(u, row), coefficients, u.describe())


def activation_cost(a: Activation | str, *,
                    coefficients: CostCoefficients = HOROWITZ_2014) -> DatapathCost:
    """The modelled cost per element of an activation unit (a preset name or an
    :class:`Activation`)."""
    u = Activation.parse(a, "activation")
    return _cost(u.name, activation_terms(u), coefficients, u.describe())


register_cost_model(Softmax, softmax_cost)
register_cost_model(Norm, norm_cost)
register_cost_model(Activation, activation_cost)
