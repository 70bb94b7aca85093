"""``precisim formats``: list formats with their properties, or show one format's value table."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from fractions import Fraction

from .catalog import catalog, get_format, p3109_family
from .descriptor import FloatFormat, FormatError, IntFormat


def _fmt_value(v: Fraction | float) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if v == 0:
            return "-0" if math.copysign(1, v) < 0 else "0"
        return "+inf" if v > 0 else "-inf"
    f = float(v)
    if v == 0:
        return "0"
    if v.denominator == 1 and abs(v) < 10**7:
        return str(v.numerator)
    return f"{f:.10g}"


def format_list_markdown(formats: list[FloatFormat | IntFormat]) -> str:
    """A Markdown table of formats and their derived limits."""
    lines = ["| name | bits | e | m | bias | max | min normal | min subnormal | inf | NaN | -0 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in formats:
        if isinstance(f, IntFormat):
            lines.append(f"| {f.name} | {f.bits} | - | - | - | {_fmt_value(f.max)} | - | "
                         f"{_fmt_value(f.ulp)} | none | none | no |")
            continue
        lines.append(
            f"| {f.name} | {f.bits} | {f.exp_bits} | {f.man_bits} | {f.bias} | "
            f"{_fmt_value(f.max)} | {_fmt_value(f.min_normal)} | {_fmt_value(f.min_subnormal)} | "
            f"{f.inf.value} | {f.nan.value} | {'yes' if f.has_negative_zero else 'no'} |"
        )
    return "\n".join(lines)


def value_table_markdown(f: FloatFormat | IntFormat, columns: int = 8) -> str:
    """The value of every code of a format of at most 8 bits, as a Markdown grid
    (row = high bits of the code, column = low bits)."""
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns={columns!r} is not valid: accepted a positive integer")
    table = f.value_table()
    cols = min(columns, len(table))
    head = "| code | " + " | ".join(f"+{c:X}" for c in range(cols)) + " |"
    lines = [head, "|---" * (cols + 1) + "|"]
    for start in range(0, len(table), cols):
        row = [_fmt_value(v) for _, v in table[start:start + cols]]
        lines.append(f"| 0x{start:02X} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def int_arg(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in ``lo..hi`` (``hi`` None: no upper bound); a
    bad value exits with status 2 and a message naming it and the accepted range, before any
    work starts."""
    accepted = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; accepted "
                                             f"{accepted}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range; accepted {accepted}")
        return v
    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("formats", help="list number formats, or show one format's value table",
                       description=__doc__)
    p.add_argument("name", nargs="?", help="a format name (e.g. e4m3, binary8p3se, e5m7)")
    p.add_argument("--p3109", type=int_arg(2, 16), metavar="K",
                   help="list the IEEE P3109 family with K bits (2..16) instead of the catalog")
    p.add_argument("--columns", type=int_arg(1, 256), default=8,
                   help="value-table columns, 1..256 (default 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.name:
        try:
            f = get_format(args.name)
        except FormatError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"## {f.name}" + (f" ({f.description})" if f.description else ""))
        print()
        print(format_list_markdown([f]))
        if f.bits <= 8:
            print()
            print(value_table_markdown(f, args.columns))
        return 0
    formats = p3109_family(args.p3109) if args.p3109 is not None else catalog()
    print(format_list_markdown(formats))
    return 0
