"""The spec sheet as a typed object (precisim.eval.sheet): version-2 round trip, version-1 sheets
(the committed ones) converted on load, and clear errors for an unknown version or a malformed
or wrongly shaped sheet, through the API and the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from precisim.eval.metrics import BUILTIN_METRICS
from precisim.eval.sheet import SCHEMA_VERSION, SpecSheet, SpecSheetError, as_sheet
from precisim.eval.spec import EvalConfig, compare_metrics, vendor_columns, vendor_rows
from precisim.eval.tables import render_table

ROOT = Path(__file__).resolve().parents[1]
#: version-1 sheets with the vendor tables written beside them (the README main job's sheet as
#: committed before it was regenerated in version 2, kept as test data)
V1_SHEETS = [ROOT / "tests/data/v1-main-job/spec_sheet.json",
             ROOT / "notebooks/outputs/04/fp4-datapaths/spec_sheet.json"]


@pytest.fixture()
def v1() -> dict:
    return json.loads(V1_SHEETS[0].read_text())


@pytest.mark.parametrize("path", V1_SHEETS, ids=lambda p: p.parent.name)
def test_version_1_sheets_load_converted(path: Path) -> None:
    raw = json.loads(path.read_text())
    assert raw["precisim_spec_sheet"] == 1 and "metric_definitions" not in raw
    sheet = SpecSheet.load(path)
    assert sheet.schema_version == SCHEMA_VERSION == 2
    assert len(sheet.notes) == 1 and sheet.notes[0].startswith(
        "converted from schema version 1 by precisim")
    # everything version 1 recorded is kept as it was
    for key in ("content_hash", "inputs", "recipes_resolved", "versions", "reference",
                "metrics", "telemetry"):
        assert sheet[key] == raw[key], key
    assert list(sheet.metric_definitions) == [m.name for m in BUILTIN_METRICS]
    assert sheet.metric_definitions["delta_ppl"]["ci"]["method"] == "paired_block_bootstrap"
    # the vendor table of the converted sheet is the one committed beside it, byte for byte
    table = render_table(vendor_rows(sheet), vendor_columns(sheet), fmt="markdown")
    assert table == (path.parent / "spec_table.md").read_text()
    cfg = EvalConfig.from_sheet(path)
    assert cfg.window == raw["inputs"]["settings"]["window"]
    assert cfg.metrics == tuple(m.name for m in BUILTIN_METRICS)
    assert compare_metrics(raw, sheet) == []


def test_version_2_round_trip(v1, tmp_path) -> None:
    sheet = SpecSheet.from_dict(v1)
    d = json.loads(sheet.to_json())
    assert d["precisim_spec_sheet"] == 2 and list(d) == [
        "precisim_spec_sheet", "content_hash", "inputs", "recipes_resolved", "versions",
        "reference", "metric_definitions", "metrics", "telemetry", "notes"]
    assert SpecSheet.from_dict(d) == sheet == SpecSheet.from_dict(sheet.to_dict())
    again = SpecSheet.load(sheet.save(tmp_path / "s.json"))
    assert again == sheet and again.notes == sheet.notes  # no second conversion note
    assert as_sheet(tmp_path / "s.json") == sheet and as_sheet(sheet) is sheet
    # non-finite numbers are written as strings (strict JSON) and read back as floats
    sheet.metrics["mxfp4"]["kl"] = math.nan
    sheet.metrics["mxfp4"]["ppl"] = math.inf
    text = sheet.to_json()
    assert '"kl": "nan"' in text and '"ppl": "inf"' in text
    back = SpecSheet.from_json(text)
    assert math.isnan(back.metrics["mxfp4"]["kl"]) and back.metrics["mxfp4"]["ppl"] == math.inf
    assert compare_metrics(sheet, back) == []
    # unknown top-level keys are kept
    assert SpecSheet.from_dict({**d, "annotations": {"by": "me"}})["annotations"] == {"by": "me"}


def test_mapping_view(v1) -> None:
    sheet = SpecSheet.from_dict(v1)
    assert sheet["metrics"] is sheet.metrics and sheet["precisim_spec_sheet"] == 2
    assert sheet.get("content_hash") == v1["content_hash"] and "notes" in sheet
    assert sheet["metrics"]["mxfp4"]["kl"] == v1["metrics"]["mxfp4"]["kl"]
    assert len(sheet) == len(list(sheet)) == 10
    with pytest.raises(KeyError):
        sheet["nope"]
    with pytest.raises(TypeError):
        hash(sheet)
    with pytest.raises(SpecSheetError, match="schema version 2, got 1"):
        SpecSheet(**{**{f: getattr(sheet, f) for f in (
            "content_hash", "inputs", "recipes_resolved", "versions", "reference",
            "metric_definitions", "metrics", "telemetry")}, "schema_version": 1})


@pytest.mark.parametrize("version, match", [
    (3, r"has schema version 3; precisim \S+ reads versions 1, 2 \(written by a newer "
        r"precisim\? upgrade to read it\)"),
    (0, r"has schema version 0; precisim \S+ reads versions 1, 2$"),
    ("2", r"has schema version '2'; precisim \S+ reads versions 1, 2"),
    (True, r"has schema version True; precisim \S+ reads versions 1, 2"),
])
def test_unknown_version(v1, version, match) -> None:
    with pytest.raises(SpecSheetError, match=match):
        SpecSheet.from_dict({**v1, "precisim_spec_sheet": version})


def test_malformed_and_wrongly_shaped(v1, tmp_path) -> None:
    no_version = {k: v for k, v in v1.items() if k != "precisim_spec_sheet"}
    with pytest.raises(SpecSheetError, match="has no schema version \\(no key "
                       "'precisim_spec_sheet'\\): is it a precisim spec sheet\\? accepted "
                       "versions: 1, 2"):
        SpecSheet.from_dict(no_version)
    with pytest.raises(SpecSheetError, match="spec sheet is array, not a JSON object"):
        SpecSheet.from_dict([v1])  # type: ignore[arg-type]
    bad = json.loads(json.dumps(v1))
    del bad["inputs"]["settings"]["window"]
    bad["metrics"] = [1]
    bad["reference"]["ppl"] = "high"
    with pytest.raises(SpecSheetError) as e:
        SpecSheet.from_dict(bad)
    msg = str(e.value)
    assert msg.startswith("spec sheet (schema version 1) is malformed: ")
    assert "missing 'inputs.settings.window'" in msg
    assert "'metrics' is array ([1]), expected object" in msg
    assert "'reference.ppl' is string (\"high\"), expected number" in msg
    v2 = json.loads(SpecSheet.from_dict(v1).to_json())
    del v2["metric_definitions"]
    with pytest.raises(SpecSheetError, match=r"\(schema version 2\) is malformed: missing "
                       "'metric_definitions'"):
        SpecSheet.from_dict(v2)
    with pytest.raises(SpecSheetError, match="'inputs.settings.window' is string"):
        SpecSheet.from_dict({**v1, "inputs": {**v1["inputs"], "settings": {
            **v1["inputs"]["settings"], "window": "512"}}})
    p = tmp_path / "broken.json"
    p.write_text('{"precisim_spec_sheet": 2, ')
    with pytest.raises(SpecSheetError, match=re.escape(f"spec sheet '{p}' is not valid JSON: ")):
        SpecSheet.load(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SpecSheet.load(tmp_path / "absent.json")
    with pytest.raises(SpecSheetError, match="is not valid JSON"):
        EvalConfig.from_sheet(p)  # a ValueError, as before


def test_cli_report_and_eval_read_sheets(tmp_path, capsys) -> None:
    from precisim.eval.cli import main

    out = tmp_path / "rep"
    assert main(["report", "--sheet", str(V1_SHEETS[0]), "--out", str(out)]) == 0
    written = json.loads((out / "spec_sheet.json").read_text())
    assert written["precisim_spec_sheet"] == 2 and "metric_definitions" in written
    assert written["notes"][0].startswith("converted from schema version 1")
    assert (out / "spec_table.md").read_text() == (V1_SHEETS[0].parent / "spec_table.md"
                                                   ).read_text()
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**written, "precisim_spec_sheet": 7}))
    capsys.readouterr()
    assert main(["report", "--sheet", str(newer), "--out", str(tmp_path / "x")]) == 2
    assert "has schema version 7" in capsys.readouterr().err
    assert main(["eval", "--spec", str(newer), "--out", str(tmp_path / "y")]) == 2
    assert "reads versions 1, 2" in capsys.readouterr().err
    assert main(["report", "--sheet", str(tmp_path / "none.json"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
