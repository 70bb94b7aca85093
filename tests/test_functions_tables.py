"""docs/functions.md is what ``python -m precisim.emulation.functions.tables`` computes (slow:
every preset on all 2 x 65536 inputs), and the error statistics support the claims made from
them: correctly rounded presets are within half an ulp, more table entries / polynomial
degree / Newton steps give smaller errors, the bound model stays within its bound."""

from __future__ import annotations

import pytest
import torch
from precisim.emulation.functions import get_function_unit
from precisim.emulation.functions.tables import DOC, error_stats, markdown


def _ulp(name: str, dtype: torch.dtype = torch.float16) -> float:
    return error_stats(get_function_unit(name), dtype).max_ulp


@pytest.mark.parametrize("name", ["exp-exact", "rcp-exact", "rsqrt-exact", "silu-exact"])
def test_correctly_rounded_presets_are_within_half_an_ulp(name: str) -> None:
    assert _ulp(name) <= 0.5


def test_more_hardware_means_less_error() -> None:
    assert _ulp("exp-poly5") < _ulp("exp-lut64") < _ulp("exp-lut16")
    assert _ulp("rcp-newton2") < 1 < _ulp("rcp-newton1")
    assert _ulp("rsqrt-newton2") < 1 < _ulp("rsqrt-newton1")
    assert error_stats(get_function_unit("silu-lut64"), torch.float16).max_abs < \
        error_stats(get_function_unit("silu-lut16"), torch.float16).max_abs


def test_bound_model_error_is_within_the_cuda_bound_on_small_arguments() -> None:
    """On |x| < 1 the bound is 2 + floor(1.173|x|) <= 3 ulp (+ the half ulp of the correctly
    rounded value it displaces)."""
    u = get_function_unit("expf-fast-bound")
    x = torch.linspace(-0.99, 0.99, 2001)
    ref = torch.exp(x.double())
    ulp = torch.exp2(torch.floor(torch.log2(ref)) - 23)
    assert ((u(x).double() - ref).abs() / ulp).max() <= 3.5


@pytest.mark.slow
def test_committed_tables_match_the_code() -> None:
    assert DOC.read_text() == markdown(), \
        "regenerate: python -m precisim.emulation.functions.tables --write"
