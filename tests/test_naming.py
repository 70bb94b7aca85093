"""One lookup mechanism (formats/registry.py, docs/naming.md): one grammar, kind:name
qualifiers, one error style across every registry, and the documented shared names."""

from __future__ import annotations

import re
from pathlib import Path

import precisim
import pytest
from precisim.formats.registry import Registry, UnknownNameError, normalize, registries

ROOT = Path(__file__).resolve().parents[1]


def _all_registries() -> dict[str, Registry]:
    precisim.lookup("e4m3")  # imports every layer's registries
    return registries()


def test_every_kind_is_registered() -> None:
    assert set(_all_registries()) == {"format", "scaled", "unit", "kernel", "op", "recipe",
                                      "metric", "accelerator", "model", "function",
                                      "softmax", "norm", "activation", "datapath"}
    assert precisim.lookup("accelerator:h200").bandwidth == 4.8e12
    assert precisim.lookup("model:llama-2-7b").params == 6_738_415_616


def test_grammar_case_and_dashes() -> None:
    from precisim.emulation import get_recipe, get_unit

    assert get_recipe("DeepSeek_FP8") is get_recipe("deepseek-fp8")
    assert get_unit("H100_E4M3") is get_unit("h100-e4m3")
    reg = Registry("widget", prefix="widget-test")
    try:
        reg.register("my-widget", 1)
        with pytest.raises(ValueError, match="registered already"):
            reg.register("My_Widget", 2)
        with pytest.raises(ValueError, match="not valid"):
            reg.register("bad name", 3)
        assert reg.get("MY_WIDGET") == 1 and reg.get("widget-test:my-widget") == 1
    finally:
        registries().pop("widget_test")


def test_one_error_style_everywhere() -> None:
    for reg in _all_registries().values():
        with pytest.raises(UnknownNameError) as err:
            reg.get("zzz-no-such-name")
        msg = str(err.value)
        assert msg.startswith(f"unknown {reg.kind} 'zzz-no-such-name'; "), msg
        assert "; available: " in msg, msg
        names = reg.names()
        if names:
            typo = names[0][:-1] + ("x" if names[0][-1] != "x" else "y")
            if reg.find(typo) is None:
                with pytest.raises(UnknownNameError, match=r"did you mean '"):
                    reg.get(typo)


def test_qualified_names_and_wrong_kinds() -> None:
    from precisim.emulation import get_recipe, get_unit
    from precisim.formats import FormatError, get_format

    assert get_unit("unit:deepseek-fp8").promotion_interval == 128
    assert get_recipe("recipe:deepseek-fp8").linear is not None
    with pytest.raises(FormatError, match="names a matrix unit, not a format"):
        get_format("unit:h100-e4m3")
    assert type(precisim.lookup("format:mxint8")).__name__ == "IntFormat"
    assert type(precisim.lookup("scaled:mxint8")).__name__ == "ScaledFormat"
    assert type(precisim.lookup("kernel:int-chain")).__name__ == "Kernel"
    with pytest.raises(UnknownNameError, match="unknown kind 'colour'"):
        precisim.lookup("colour:red")


def test_shared_names_are_the_documented_ones() -> None:
    """docs/naming.md lists every name that several kinds use, with the kinds."""
    owners: dict[str, set[str]] = {}
    for reg in _all_registries().values():
        for n in reg.names():
            owners.setdefault(normalize(n), set()).add(reg.kind)
    shared = {n: kinds for n, kinds in owners.items() if len(kinds) > 1}
    doc = (ROOT / "docs" / "naming.md").read_text()
    table = doc.split("## Names that several kinds use", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, set[str]] = {}
    kind_names = {"format": "format", "scaled format": "scaled format", "unit": "matrix unit",
                  "recipe": "recipe"}
    for row in re.findall(r"^\| (`.*?) \| (.*?) \|", table, re.M):
        names = [normalize(n) for n in re.findall(r"`([^`]+)`", row[0])]
        kinds = {kind_names[k.strip()] for k in row[1].split(",")}
        for n in names:
            documented[n] = kinds
    assert documented == shared
    for n in shared:  # ambiguous without a qualifier
        with pytest.raises(UnknownNameError, match="is ambiguous"):
            precisim.lookup(n)


def test_version() -> None:
    import importlib.metadata as md

    assert re.fullmatch(r"\d+\.\d+\.\d+", precisim.__version__)
    assert md.version("precisim") == precisim.__version__
