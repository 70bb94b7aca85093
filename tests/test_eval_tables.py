"""precisim.eval.tables: Markdown / CSV / LaTeX / HTML tables and their escaping."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from precisim.eval.stats import Interval
from precisim.eval.tables import get_field, render_table, write_table

RECORDS = [
    {"recipe": "mxfp4", "bits": 4.25, "delta_ppl": 1.23456789, "tokens": 4096,
     "params": {"window": 512}, "sat": True},
    {"recipe": "a|b & c_%#<x>", "bits": 8, "delta_ppl": float("nan"), "tokens": np.int64(7),
     "params": {"window": 256}, "note": 'say "hi", then\nleave'},
    {"recipe": "bf16", "bits": np.float32(16.0), "delta_ppl": None, "tokens": 1},
]
COLS = [("recipe", "Recipe"), ("bits", "bits/elem"), ("delta_ppl", "Δ ppl"),
        ("params.window", "window"), ("note", "note")]


def test_markdown():
    out = render_table(RECORDS, COLS)
    lines = out.splitlines()
    assert lines[0] == "| Recipe | bits/elem | Δ ppl | window | note |"
    assert lines[1] == "|---|---:|---:|---:|---|"
    assert lines[2] == "| mxfp4 | 4.25 | 1.235 | 512 | - |"
    assert lines[3] == '| a\\|b & c_%#<x> | 8 | nan | 256 | say "hi", then<br>leave |'
    assert lines[4] == "| bf16 | 16 | - | - | - |"
    # every row has the same number of unescaped pipes
    assert {line.replace("\\|", "").count("|") for line in lines} == {6}


def test_floatfmt_missing_and_default_columns():
    out = render_table(RECORDS[:1], floatfmt=".2f", missing="n/a")
    assert out.splitlines()[0] == ("| recipe | bits | delta_ppl | tokens | params.window | "
                                   "sat |")
    assert out.splitlines()[2] == "| mxfp4 | 4.25 | 1.23 | 4096 | 512 | yes |"
    out = render_table(RECORDS, ["recipe", "nope"], missing="n/a")
    assert out.splitlines()[2] == "| mxfp4 | n/a |"
    ci = Interval(1.2341, 1.1, 1.35, 0.95, 10)
    assert "1.234 [1.100, 1.350]" in render_table([{"ci": ci, "l": [1, 2.5]}])
    assert "| 1, 2.5 |" in render_table([{"l": [1, 2.5]}])


def test_csv_quoting_and_full_precision():
    out = render_table(RECORDS, COLS, "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["Recipe", "bits/elem", "Δ ppl", "window", "note"]
    assert rows[1] == ["mxfp4", "4.25", "1.23456789", "512", ""]
    assert rows[2] == ["a|b & c_%#<x>", "8", "nan", "256", 'say "hi", then\nleave']
    assert rows[3] == ["bf16", "16.0", "", "", ""]
    assert '"say ""hi"", then\nleave"' in out


def test_latex_escaping():
    out = render_table(RECORDS, COLS, "latex", caption="FP4 & friends_1")
    assert "\\begin{tabular}{lrrrl}" in out
    assert r"a|b \& c\_\%\#\textless{}x\textgreater{}" in out
    assert "Recipe & bits/elem & Δ ppl & window & note \\\\" in out
    assert r"\caption{FP4 \& friends\_1}" in out
    assert r"mxfp4 & 4.25 & 1.235 & 512 & - \\" in out
    body = [ln for ln in out.splitlines() if ln.endswith("\\\\")]
    # exactly 4 column separators in each row: no unescaped & leaked from the data
    assert all(ln.replace("\\&", "").count("&") == 4 for ln in body)
    assert r"\textbackslash{}\{\}\$\textasciitilde{}\textasciicircum{}" in render_table(
        [{"x": "\\{}$~^"}], fmt="latex")


def test_html_escaping():
    out = render_table(RECORDS, COLS, "html", caption="<b>x</b>")
    assert "<caption>&lt;b&gt;x&lt;/b&gt;</caption>" in out
    assert "<td>a|b &amp; c_%#&lt;x&gt;</td>" in out
    assert "<td>say &quot;hi&quot;, then\nleave</td>" in out
    assert '<th style="text-align:right">bits/elem</th>' in out
    assert out.count("<tr>") == 4 and out.strip().endswith("</table>")


@pytest.mark.parametrize(("suffix", "start"), [(".md", "| recipe"), (".csv", "recipe,"),
                                                (".tex", "\\begin{tabular}"),
                                                (".html", "<table>")])
def test_write_table_by_suffix(tmp_path, suffix, start):
    path = write_table(RECORDS, tmp_path / "out" / f"t{suffix}", ["recipe", "bits"])
    assert path.read_text().startswith(start)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="fmt='xlsx'.*markdown, csv, latex, html"):
        render_table(RECORDS, fmt="xlsx")
    with pytest.raises(ValueError, match=r"suffix: accepted \.md"):
        write_table(RECORDS, tmp_path / "t.xlsx")
    with pytest.raises(ValueError, match="column 3"):
        render_table(RECORDS, [3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="single string"):
        render_table(RECORDS, "recipe")
    with pytest.raises(ValueError, match="sequence of mappings"):
        render_table([1, 2])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no columns"):
        render_table([])
    assert render_table([], ["a"]) == "| a |\n|---|\n"


def test_get_field():
    rec = {"a": {"b": {"c": 1}}, "x.y": 2}
    assert get_field(rec, "a.b.c") == 1 and get_field(rec, "x.y") == 2
    assert get_field(rec, "a.z", None) is None


def test_column_formats():
    cols = [("recipe", "Recipe"), ("delta_ppl", "Δ ppl", "+.2f"), ("bits", "bits/elem")]
    md = render_table(RECORDS[:1], cols, floatfmt=".3g")
    assert md.splitlines()[2] == "| mxfp4 | +1.23 | 4.25 |"  # its own format, else floatfmt
    assert render_table(RECORDS[:1], cols, "latex").count("+1.23 &") == 1
    assert ">+1.23</td>" in render_table(RECORDS[:1], cols, "html")
    # CSV keeps full precision
    assert list(csv.reader(io.StringIO(render_table(RECORDS[:1], cols, "csv"))))[1] == [
        "mxfp4", "1.23456789", "4.25"]
    with pytest.raises(ValueError, match="'q' is not a format spec for a float"):
        render_table(RECORDS, [("bits", "bits", "q")])
    with pytest.raises(ValueError, match="or a \\(key, header, float format\\) triple"):
        render_table(RECORDS, [("bits", "bits", "x", "y")])
