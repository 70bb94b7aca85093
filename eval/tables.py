"""Result tables in Markdown, CSV, LaTeX and HTML, with each format's escaping.

    from precisim.eval.tables import render_table, write_table
    print(render_table(records, [("recipe", "Recipe"), ("bits_per_element", "bits/elem"),
                                 ("delta_ppl", "Δ ppl")]))
    write_table(records, "spec.tex")        # format from the suffix: .md .csv .tex .html

Records are mappings; a column is a key, or a dotted path into nested mappings
(``"params.window"``). Floats are shown with ``floatfmt`` (default 4 significant digits; CSV
keeps the full ``repr`` unless a ``floatfmt`` is given), or with a column's own format (a
``(key, header, format)`` column; not in CSV, which keeps full precision); missing values
(absent keys, None) are shown as ``missing`` (default ``"-"``, and an empty field in CSV).
"""

from __future__ import annotations

import csv
import html
import io
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .store import flatten, write_atomic

__all__ = ["FORMATS", "MISSING", "Column", "get_field", "render_table", "write_table"]

#: table formats by file suffix
FORMATS = {".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".tex": "latex",
           ".html": "html", ".htm": "html"}

Column = str | tuple[str, str] | tuple[str, str, str]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: returned by :func:`get_field` for an absent key
MISSING: Any = _Missing()


def get_field(record: Mapping[str, Any], key: str, default: Any = MISSING) -> Any:
    """``record[key]``, or the value at a dotted path into nested mappings, or ``default``."""
    if key in record:
        return record[key]
    cur: Any = record
    for part in key.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _columns(records: Sequence[Mapping[str, Any]], columns: Sequence[Column] | None
             ) -> list[tuple[str, str, str | None]]:
    if columns is None:
        seen: dict[str, None] = {}
        for r in records:
            seen.update(dict.fromkeys(flatten(r)))
        return [(k, k, None) for k in seen]
    if isinstance(columns, str):
        raise ValueError(f"columns={columns!r} must be a list of keys or (key, header) pairs, "
                         "not a single string")
    out = []
    for c in columns:
        if isinstance(c, str):
            out.append((c, c, None))
        elif (isinstance(c, tuple | list) and len(c) in (2, 3)
              and all(isinstance(x, str) for x in c)):
            if len(c) == 3:
                try:
                    format(1.0, c[2])
                except ValueError:
                    raise ValueError(f"column {c!r}: {c[2]!r} is not a format spec for a float "
                                     "(e.g. '.4g', '+.3f')") from None
            out.append((c[0], c[1], c[2] if len(c) == 3 else None))
        else:
            raise ValueError(f"column {c!r} is not valid: accepted a key, a (key, header) pair "
                             "or a (key, header, float format) triple of strings")
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _format_value(v: Any, floatfmt: str | None, missing: str) -> str:
    if v is MISSING or v is None:
        return missing
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        v = v.item()  # numpy / torch scalars
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        f = float(v)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return repr(f) if floatfmt is None else format(f, floatfmt)
    if isinstance(v, list | tuple):
        return ", ".join(_format_value(x, floatfmt, missing) for x in v)
    return str(v)


def _escape_markdown(s: str) -> str:
    s = s.replace("\\", "\\\\").replace("|", "\\|")
    return s.replace("\r\n", "<br>").replace("\n", "<br>")


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
          "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
          "<": r"\textless{}", ">": r"\textgreater{}", "\n": " "}


def _escape_latex(s: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in s)


def render_table(
    records: Sequence[Mapping[str, Any]],
    columns: Sequence[Column] | None = None,
    fmt: str = "markdown",
    *,
    floatfmt: str | None = None,
    missing: str | None = None,
    caption: str | None = None,
) -> str:
    """Render records as a table.

    Args:
        records: the rows (mappings).
        columns: keys (or dotted paths), ``(key, header)`` pairs or ``(key, header, format)``
            triples (the column's floats in that format spec, except in CSV); default every key
            of the records (nested mappings flattened to dotted keys), in first-seen order.
        fmt: ``"markdown"``, ``"csv"``, ``"latex"`` (a ``tabular``, numeric columns right
            aligned) or ``"html"`` (a ``<table>``).
        floatfmt: format spec for floats; default ``".4g"``, for CSV the full ``repr``.
        missing: text for absent / None values; default ``"-"`` (CSV: empty).
        caption: a caption (LaTeX: a ``table`` float around the tabular; HTML: ``<caption>``;
            Markdown: an italic line above; CSV: ignored).

    Every header and cell is escaped for the format: ``|`` in Markdown; ``& % $ # _ { } ~ ^ \\``
    in LaTeX; ``< > & "`` in HTML; CSV quotes fields with commas, quotes or newlines.
    """
    if fmt not in ("markdown", "csv", "latex", "html"):
        raise ValueError(f"fmt={fmt!r} is not valid: accepted markdown, csv, latex, html")
    if isinstance(records, Mapping) or not all(isinstance(r, Mapping) for r in records):
        raise ValueError("records must be a sequence of mappings (one per row)")
    cols = _columns(records, columns)
    if not cols:
        raise ValueError("no columns: the records are empty and no columns were given")
    if floatfmt is None and fmt != "csv":
        floatfmt = ".4g"
    if missing is None:
        missing = "" if fmt == "csv" else "-"
    raw = [[get_field(r, k) for k, _, _ in cols] for r in records]
    fmts = [floatfmt if f is None or fmt == "csv" else f for _, _, f in cols]
    cells = [[_format_value(v, f, missing) for v, f in zip(row, fmts)] for row in raw]
    headers = [h for _, h, _ in cols]
    numeric = [all(_is_number(row[j]) or row[j] is MISSING or row[j] is None for row in raw)
               and any(_is_number(row[j]) for row in raw) for j in range(len(cols))]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(headers)
        w.writerows(cells)
        return buf.getvalue()
    if fmt == "markdown":
        lines = [f"*{_escape_markdown(caption)}*", ""] if caption else []
        lines.append("| " + " | ".join(_escape_markdown(h) for h in headers) + " |")
        lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
        lines += ["| " + " | ".join(_escape_markdown(c) for c in row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        spec = "".join("r" if n else "l" for n in numeric)
        lines = [f"\\begin{{tabular}}{{{spec}}}", "\\hline",
                 " & ".join(_escape_latex(h) for h in headers) + " \\\\", "\\hline"]
        lines += [" & ".join(_escape_latex(c) for c in row) + " \\\\" for row in cells]
        lines += ["\\hline", "\\end{tabular}"]
        if caption:
            lines = ["\\begin{table}", "\\centering", f"\\caption{{{_escape_latex(caption)}}}",
                     *lines, "\\end{table}"]
        return "\n".join(lines) + "\n"
    e = html.escape
    align = [' style="text-align:right"' if n else "" for n in numeric]
    lines = ["<table>"]
    if caption:
        lines.append(f"  <caption>{e(caption)}</caption>")
    lines.append("  <thead>")
    lines.append("    <tr>" + "".join(f"<th{a}>{e(h)}</th>" for a, h in zip(align, headers))
                 + "</tr>")
    lines += ["  </thead>", "  <tbody>"]
    for row in cells:
        lines.append("    <tr>" + "".join(f"<td{a}>{e(c)}</td>" for a, c in zip(align, row))
                     + "</tr>")
    lines += ["  </tbody>", "</table>"]
    return "\n".join(lines) + "\n"


def write_table(records: Sequence[Mapping[str, Any]], path: str | Path,
                columns: Sequence[Column] | None = None, **kw: Any) -> Path:
    """Write :func:`render_table` to ``path``, the format from its suffix (.md .csv .tex .html);
    keyword options as for :func:`render_table`. The file is written atomically."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the table format of {str(path)!r} from its suffix: "
                         f"accepted {', '.join(FORMATS)}")
    return write_atomic(path, render_table(records, columns, fmt, **kw))
