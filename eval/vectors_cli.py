"""``precisim vectors``: conformance vectors of a number format or a matrix unit, for RTL tests.

The command line only: the vectors are computed by :mod:`precisim.formats.vectors` (float32 ->
format conversions) and :mod:`precisim.emulation.vectors` (dot products of a matrix unit),
imported when the command runs, so that building the parser imports neither.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from precisim.formats.cli import int_arg

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``precisim vectors``."""
    p = sub.add_parser(
        "vectors", help="conformance vectors (inputs + expected output bits) for RTL tests",
        description="Write conformance vectors for a number format (float32 -> format "
        "conversion) or a matrix unit (dot products), with expected bits from the exact "
        "reference. CSV goes to stdout without --out.")
    p.add_argument("format", nargs="?", help="a number format (e.g. e4m3, e2m1, bf16, int8)")
    p.add_argument("--unit", help="a matrix unit preset instead of a format (e.g. h100-e4m3)")
    p.add_argument("--rounding", default="rne", help="format rounding (default rne)")
    p.add_argument("--overflow", default=None,
                   help="format overflow: saturate, inf, nan, wrap (default: inf if the format "
                   "has one, else saturate)")
    p.add_argument("--n", type=int_arg(0), default=None,
                   help="random vectors (default 1000 for a format, 100 for a unit)")
    p.add_argument("--seed", type=int_arg(0), default=0, help="random seed (default 0)")
    p.add_argument("--k", type=int_arg(1, 1 << 16), default=None,
                   help="unit dot length K, 1..65536 (default from the unit's block size)")
    p.add_argument("--all-codes", action="store_true",
                   help="every code of a wide format (default only formats of <= 8 bits)")
    p.add_argument("--out", help="output file, .csv or .json (default: CSV on stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``precisim vectors``: exit status 0, or 2 with a message on bad input."""
    from precisim.formats import FormatError
    from precisim.formats.vectors import format_vectors, rows_sha256, write_vectors

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if (args.format is None) == (args.unit is None):
        return fail("give either a FORMAT or --unit NAME (exactly one)")
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".json"):
        return fail(f"--out {args.out!r}: accepted suffixes .csv, .json")
    if args.out:
        from .commands import check_out_file

        try:
            check_out_file(args.out)
        except ValueError as exc:
            return fail(str(exc))
    try:
        if args.unit is not None:
            from precisim.emulation.vectors import unit_vectors

            rows = unit_vectors(args.unit, n=100 if args.n is None else args.n, k_len=args.k,
                                seed=args.seed)
        else:
            rows = format_vectors(args.format, args.rounding, args.overflow,
                                  n_random=1000 if args.n is None else args.n, seed=args.seed,
                                  all_codes=True if args.all_codes else None)
    except KeyError as exc:
        return fail(str(exc.args[0]) if exc.args else str(exc))
    except (FormatError, ValueError) as exc:
        return fail(str(exc))
    if args.out:
        path = write_vectors(rows, args.out)
        what = rows.meta.get("unit") or rows.meta.get("format")
        print(f"wrote {len(rows)} vectors for {what} to {path} (sha256 {rows_sha256(rows)})")
        return 0
    try:
        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
