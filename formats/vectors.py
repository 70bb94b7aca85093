"""Format conformance vectors: float32 inputs and the code a conversion to a number format must
produce, for a hardware team to run against its RTL; and the file formats all vectors share.

* :func:`format_vectors` computes the expected codes with the slow exact reference (Python
  ``Fraction`` arithmetic: :func:`precisim.formats.reference.round_to_float_format` /
  ``round_to_int_format``, then ``encode_value``), never with the fast torch kernels they are
  tested against. Inputs: every code's exact value and its float32 neighbours, every midpoint
  between neighbouring values (the ties) and its neighbours, the overflow boundary, the
  underflow region, zeros, infinities, NaNs, float32 subnormals, and random inputs.
* :func:`write_vectors` writes rows as CSV or JSON; the JSON has a header (what was tested,
  the precisim version, a sha256 of the rows: :func:`rows_sha256`).
* :func:`code_value`, :func:`value_code` and :func:`hex_code` convert between codes, values
  and the hex strings the rows hold.

Matrix-unit (dot product) vectors build on this module: :mod:`precisim.emulation.vectors`.
On the command line (``precisim vectors``)::

    precisim vectors e4m3 --rounding rne --out e4m3_rne.json
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import get_format
from .descriptor import FloatFormat, IntFormat
from .files import write_atomic
from .reference import (
    encode_value,
    f32_bits_to_value,
    round_to_float_format,
    round_to_int_format,
    value_to_f32_bits,
)
from .rounding import Overflow, Rounding

__all__ = ["Vectors", "code_value", "format_vectors", "hex_code", "rows_sha256", "value_code",
           "write_vectors"]

F32 = get_format("fp32")
F32_MAX_BITS = 0x7F7FFFFF
F32_INF_BITS = 0x7F800000
QNAN_BITS = 0x7FC00000
SIGN32 = 0x80000000
_DAZ_BELOW = Fraction(1, 2**126)  # float32's smallest normal: DAZ reads smaller inputs as 0

#: formats whose codes are all enumerated by default (wider formats use boundary codes)
ALL_CODES_MAX_BITS = 8
#: the widest format whose codes may be enumerated on request (``all_codes=True``): 2^16
#: codes give about 400,000 rows; fp32's 2^32 would not fit in memory
ALL_CODES_LIMIT_BITS = 16
#: the most random inputs (``n_random``) one call accepts (each row is computed exactly)
MAX_RANDOM = 1_000_000


class Vectors(list):
    """A list of vector rows (dicts) with a ``meta`` dict describing what they test."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (), meta: Mapping[str, Any] | None = None
                 ) -> None:
        super().__init__(rows)
        self.meta: dict[str, Any] = dict(meta or {})


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("precisim")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


# ---------------------------------------------------------------------------------------------
# float32 helpers

def _float_of(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _next_f32(bits: int, up: bool) -> int:
    """The float32 next to ``bits`` toward +inf (``up``) or -inf (NaN/inf saturate)."""
    x = np.float32(_float_of(bits))
    with np.errstate(over="ignore"):
        y = np.nextafter(x, np.float32(np.inf if up else -np.inf))
    return int(np.array(y, dtype=np.float32).view(np.uint32))


def _f32_around(v: Fraction) -> tuple[int, int]:
    """Bits of the largest float32 <= v and the smallest float32 >= v (inf beyond the range)."""
    fmax = F32.max
    if v > fmax:
        return F32_MAX_BITS, F32_INF_BITS
    if v < -fmax:
        return SIGN32 | F32_INF_BITS, SIGN32 | F32_MAX_BITS
    lo = round_to_float_format(v, F32, Rounding.DOWN, Overflow.SATURATE)
    hi = round_to_float_format(v, F32, Rounding.UP, Overflow.SATURATE)
    return value_to_f32_bits(lo), value_to_f32_bits(hi)


def _json_float(x: float) -> float | str:
    """Floats as JSON allows them: non-finite values as the strings nan, inf, -inf."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


# ---------------------------------------------------------------------------------------------
# format vectors

def _check_overflow(fmt: FloatFormat | IntFormat, overflow: Overflow | str | None) -> Overflow:
    if overflow is None:
        return Overflow.INF if fmt.has_inf else Overflow.SATURATE
    ovf = Overflow.parse(overflow)
    if isinstance(fmt, IntFormat):
        accepted = (Overflow.SATURATE, Overflow.WRAP)
    else:
        accepted = tuple(o for o in (Overflow.SATURATE, Overflow.INF, Overflow.NAN)
                         if o is Overflow.SATURATE or (o is Overflow.INF and fmt.has_inf)
                         or (o is Overflow.NAN and fmt.has_nan))
    if ovf not in accepted:
        raise ValueError(f"overflow={ovf.value!r} is not possible for {fmt.name}: accepted "
                         f"{', '.join(o.value for o in accepted)}")
    return ovf


def _check_rounding(rounding: Rounding | str) -> Rounding:
    rnd = Rounding.parse(rounding)
    if rnd is Rounding.STOCHASTIC:
        accepted = ", ".join(r.value for r in Rounding if r.deterministic)
        raise ValueError(f"rounding={rnd.value!r} is random: conformance vectors need a "
                         f"deterministic rounding ({accepted})")
    return rnd


def _magnitudes(fmt: FloatFormat | IntFormat, all_codes: bool) -> list[int]:
    """The non-negative codes (values >= 0) whose values and neighbours are tested."""
    if isinstance(fmt, IntFormat):
        top = fmt.qmax
        if all_codes:
            return list(range(top + 1))
        ks = {0, 1, 2, 3, top - 2, top - 1, top}
        for e in range(fmt.bits):
            ks |= {(1 << e) - 1, 1 << e, (1 << e) + 1}
        return sorted(k for k in ks if 0 <= k <= top)
    top = fmt.max_code_magnitude
    if all_codes:
        return list(range(top + 1))
    m = fmt.man_bits
    n_binades = 1 << fmt.exp_bits
    if fmt.exp_bits <= 5:
        binades = set(range(n_binades))
    else:  # the lowest, the highest, and those around 1.0; random inputs cover the rest
        binades = {0, 1, 2, 3, n_binades - 4, n_binades - 3, n_binades - 2, n_binades - 1}
        binades |= {fmt.bias + d for d in range(-2, 3)}
    mans = {0, 1, 2, (1 << m) - 2, (1 << m) - 1}
    mags = {(e << m) | man for e in binades for man in mans if 0 <= man < (1 << m)}
    return sorted(c for c in mags if 0 <= c <= top)


def _mag_value(fmt: FloatFormat | IntFormat, mag: int) -> Fraction:
    return mag * fmt.ulp if isinstance(fmt, IntFormat) else fmt.magnitude_value(mag)


def _format_inputs(fmt: FloatFormat | IntFormat, all_codes: bool, n_random: int,
                   seed: int) -> list[tuple[str, int]]:
    """(case, float32 bits) of every input, in order, first label kept for duplicates."""
    cases: list[tuple[str, int]] = []

    def add(case: str, bits: int) -> None:
        cases.append((case, bits & 0xFFFFFFFF))

    def around(case: str, v: Fraction, signs: Sequence[int]) -> None:
        """v itself when it is a float32, else the float32 values either side; and the
        float32 neighbours beyond those."""
        for s in signs:
            lo, hi = _f32_around(v * s)
            if lo == hi:
                add(case, lo)
            else:
                add(case + " (f32 below)", lo)
                add(case + " (f32 above)", hi)
            add(case + "-", _next_f32(lo, up=False))
            add(case + "+", _next_f32(hi, up=True))

    neg_signs = (1, -1)  # negative inputs are tested for unsigned formats too
    # specials and float32 landmarks
    for case, bits in (("zero", 0), ("-zero", SIGN32), ("inf", F32_INF_BITS),
                       ("-inf", SIGN32 | F32_INF_BITS), ("nan", QNAN_BITS),
                       ("-nan", SIGN32 | QNAN_BITS), ("snan", F32_INF_BITS | 1),
                       ("f32 max", F32_MAX_BITS), ("-f32 max", SIGN32 | F32_MAX_BITS),
                       ("f32 min subnormal", 1), ("-f32 min subnormal", SIGN32 | 1),
                       ("f32 max subnormal", 0x007FFFFF), ("f32 min normal", 0x00800000),
                       ("-f32 min normal", SIGN32 | 0x00800000), ("one", 0x3F800000)):
        add(case, bits)
    # every (or every boundary) code's value, its neighbours, the midpoint to the next code
    mags = _magnitudes(fmt, all_codes)
    top = fmt.qmax if isinstance(fmt, IntFormat) else fmt.max_code_magnitude
    for mag in mags:
        v = _mag_value(fmt, mag)
        for s in neg_signs:
            if s < 0 and mag == 0:
                continue
            b = value_to_f32_bits(v * s) if v else (SIGN32 if s < 0 else 0)
            add("value", b)
            add("value-", _next_f32(b, up=False))
            add("value+", _next_f32(b, up=True))
        if mag < top:
            mid = (v + _mag_value(fmt, mag + 1)) / 2
            around("midpoint", mid, neg_signs)
    if isinstance(fmt, IntFormat) and fmt.signed:
        mid = (fmt.min - fmt.ulp / 2)  # below the most negative value
        around("below min", mid, (1,))
    # overflow: the rounding boundary above max, the next value past max, twice max
    big = fmt.max
    step = fmt.ulp if isinstance(fmt, IntFormat) else Fraction(2) ** (fmt.emax - fmt.man_bits)
    around("overflow boundary", big + step / 2, neg_signs)
    around("above max", big + step, neg_signs)
    around("2x max", 2 * big, neg_signs)
    # underflow: fractions of the smallest positive value
    tiny = fmt.ulp if isinstance(fmt, IntFormat) else fmt.min_subnormal
    for name, frac in (("quarter min subnormal", Fraction(1, 4)),
                       ("half min subnormal", Fraction(1, 2)),
                       ("3/4 min subnormal", Fraction(3, 4)),
                       ("1.5x min subnormal", Fraction(3, 2))):
        around(name, tiny * frac, neg_signs)
    if isinstance(fmt, FloatFormat) and fmt.subnormals:
        around("min normal", fmt.min_normal, neg_signs)
        around("half min normal", fmt.min_normal / 2, neg_signs)
    # random inputs: 3/4 in and around the format's range, 1/4 any float32 bit pattern
    rng = np.random.default_rng(seed)
    n_near = n_random - n_random // 4
    if isinstance(fmt, IntFormat):
        lo_e, hi_e = -fmt.frac_bits - 3, fmt.emax + 3
    else:
        lo_e, hi_e = fmt.emin - fmt.man_bits - 3, fmt.emax + 3
    lo_e, hi_e = max(lo_e, -149), min(hi_e, 127)
    exps = rng.integers(lo_e, hi_e + 1, size=n_near)
    mans = rng.integers(0, 1 << 23, size=n_near)
    sgns = rng.integers(0, 2, size=n_near)
    for e, man, sg in zip(exps.tolist(), mans.tolist(), sgns.tolist()):
        # a float32 normal, or a subnormal 2^e with random lower bits
        bits = ((e + 127) << 23) | man if e >= -126 else (
            (1 << (e + 149)) | (man & ((1 << (e + 149)) - 1)))
        add("random", bits | (SIGN32 if sg else 0))
    for bits in rng.integers(0, 1 << 32, size=n_random // 4, dtype=np.uint64).tolist():
        add("random bits", int(bits))
    seen: set[int] = set()
    out = []
    for case, bits in cases:
        if bits not in seen:
            seen.add(bits)
            out.append((case, bits))
    return out


def _reference_round(v: Fraction | float, fmt: FloatFormat | IntFormat, rnd: Rounding,
                     ovf: Overflow, flush_input: bool, flush_output: bool) -> Fraction | float:
    if isinstance(fmt, IntFormat):
        return round_to_int_format(v, fmt, rnd, ovf)
    return round_to_float_format(v, fmt, rnd, ovf,
                                 flush_input_below=_DAZ_BELOW if flush_input else None,
                                 flush_output=flush_output)


def format_vectors(
    fmt: FloatFormat | IntFormat | str,
    rounding: Rounding | str = "rne",
    overflow: Overflow | str | None = None,
    n_random: int = 1000,
    seed: int = 0,
    *,
    all_codes: bool | None = None,
    flush_input: bool = False,
    flush_output: bool = False,
) -> Vectors:
    """Conversion vectors float32 -> ``fmt``: one row per input.

    Args:
        fmt: a format or its name (``"e4m3"``, ``"mxfp4"``'s element ``"e2m1"``, ``"int8"``...).
        rounding: a deterministic rounding (rne, rtz, ru, rd, rna, rto).
        overflow: saturate / inf / nan (floats), saturate / wrap (integers); default ``inf`` for
            formats with an infinity (IEEE 754 behaviour) and ``saturate`` otherwise.
        n_random: number of random inputs added to the systematic cases.
        seed: seed of the random inputs.
        all_codes: test every code's value and midpoint (default: formats of up to 8 bits).
            Wider formats use boundary codes: mantissa 0, 1, 2, max-1 and max of every binade
            (of the lowest four, the highest four and the five around 1.0 when the format has
            more than 5 exponent bits).
        flush_input: read float32 inputs below 2^-126 as zero (DAZ; float formats only).
        flush_output: results below the format's smallest normal become zero (FTZ).

    Each row: ``case`` (why the input is there), ``input_bits`` (float32 bit pattern, hex),
    ``input`` (its value), ``expected_code`` (the format's code, hex; two's complement for
    integers) and ``expected`` (its value). Inputs whose result is NaN in a format without a
    NaN code (FP4/FP6, integers) have no code and are left out (counted in ``meta``).
    """
    f = get_format(fmt)
    rnd = _check_rounding(rounding)
    ovf = _check_overflow(f, overflow)
    for what, v in (("n_random", n_random), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{what}={v!r} is not valid: accepted an integer >= 0")
    if n_random > MAX_RANDOM:
        raise ValueError(f"n_random={n_random} is not valid: accepted 0..{MAX_RANDOM} (every "
                         "row is computed with exact arithmetic; split larger sets by seed)")
    for what, v in (("all_codes", all_codes), ("flush_input", flush_input),
                    ("flush_output", flush_output)):
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{what}={v!r} is not valid: accepted True or False")
    if isinstance(f, IntFormat) and (flush_input or flush_output):
        raise ValueError(f"flush_input / flush_output are for float formats, not {f.name}")
    if all_codes is None:
        all_codes = f.bits <= ALL_CODES_MAX_BITS
    if all_codes and f.bits > ALL_CODES_LIMIT_BITS:
        raise ValueError(f"all_codes=True for {f.name} would list its 2^{f.bits} codes "
                         f"({1 << f.bits:,} values and their neighbours): accepted for formats "
                         f"of up to {ALL_CODES_LIMIT_BITS} bits; wider formats get every "
                         "binade's boundary codes and random inputs (all_codes=False)")
    rows = []
    skipped = 0
    for case, bits in _format_inputs(f, bool(all_codes), n_random, seed):
        x = f32_bits_to_value(bits)
        r = _reference_round(x, f, rnd, ovf, flush_input, flush_output)
        if isinstance(r, float) and math.isnan(r) and not f.has_nan:
            skipped += 1
            continue
        code = encode_value(r, f)
        rows.append({"case": case, "input_bits": hex_code(bits, 32), "input": _float_of(bits),
                     "expected_code": hex_code(code, f.bits), "expected": float(r)})
    meta = {
        "kind": "format",
        "format": f.name,
        "description": f.description,
        "properties": f.properties(),
        "rounding": rnd.value,
        "overflow": ovf.value,
        "flush_input": flush_input,
        "flush_output": flush_output,
        "all_codes": bool(all_codes),
        "n_random": n_random,
        "seed": seed,
        "skipped_no_code": skipped,
        "encoding": "input_bits: IEEE 754 binary32 bit pattern of the input; expected_code: "
                    f"the {f.bits}-bit code of {f.name} (sign bit first"
                    + ("; two's complement" if isinstance(f, IntFormat) else "") + "), hex",
        "reference": "precisim.formats.reference (exact Fraction arithmetic)",
    }
    return Vectors(rows, meta)


# ---------------------------------------------------------------------------------------------
# codes, values and their hex strings

def hex_code(code: int, bits: int) -> str:
    """A code as the rows write it: ``0x`` and upper-case hex digits, as many as a ``bits``-bit
    code needs (``hex_code(0x7C, 8) == "0x7C"``, ``hex_code(5, 4) == "0x5"``)."""
    return f"0x{code:0{max(1, -(-bits // 4))}X}"


def code_value(fmt: FloatFormat | IntFormat | str, code: int) -> float:
    """The value of one code as a Python float (exact: every format's values are float32
    values), -0.0 for a negative-zero code, nan / +-inf for the special codes."""
    f = get_format(fmt)
    v = f.decode_exact(code)
    if isinstance(v, float):
        return v
    x = float(v)
    if x == 0 and f.signed and isinstance(f, FloatFormat) and code >> (f.bits - 1):
        return -0.0
    return x


def value_code(fmt: FloatFormat | IntFormat, x: float) -> int:
    """The code of ``x``, a value of ``fmt`` (the inverse of :func:`code_value`): -0.0 gives the
    negative-zero code of a float format, nan / +-inf the format's special codes."""
    if isinstance(fmt, FloatFormat) and x == 0 and math.copysign(1.0, x) < 0:
        return encode_value(-0.0, fmt)
    return encode_value(x if isinstance(x, float) and not math.isfinite(x) else Fraction(x), fmt)


# ---------------------------------------------------------------------------------------------
# output

def _json_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: _json_float(v) if isinstance(v, float) else v for k, v in r.items()}
            for r in rows]


def rows_sha256(rows: Sequence[Mapping[str, Any]]) -> str:
    """sha256 (hex) of the rows as written to JSON: ``json.dumps(rows, sort_keys=True,
    separators=(",", ":"))`` in UTF-8, non-finite floats as the strings nan / inf / -inf."""
    canon = json.dumps(_json_rows(rows), sort_keys=True, separators=(",", ":"),
                       allow_nan=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def write_vectors(rows: Sequence[Mapping[str, Any]], path: str | Path, *,
                  meta: Mapping[str, Any] | None = None) -> Path:
    """Write vector rows to ``.csv`` (one row per vector) or ``.json`` (``{"header", "rows"}``).

    The JSON header holds ``meta`` (default: the ``meta`` of a :class:`Vectors`), the precisim
    version, the row count and :func:`rows_sha256`; floats NaN / +-inf are written as the
    strings ``nan`` / ``inf`` / ``-inf`` (strict JSON). The file is written atomically.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"cannot write vectors to {str(path)!r}: accepted suffixes .csv, .json")
    if not rows:
        raise ValueError("no vector rows to write")
    if suffix == ".json":
        header = {**(getattr(rows, "meta", {}) if meta is None else meta),
                  "precisim_version": _version(), "rows": len(rows),
                  "sha256": rows_sha256(rows)}
        text = json.dumps({"header": header, "rows": _json_rows(rows)}, indent=1,
                          allow_nan=False) + "\n"
        return write_atomic(path, text)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
    return write_atomic(path, buf.getvalue())
