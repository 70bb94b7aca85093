"""Telemetry of an emulation: what the proposed formats did to the values, per module and role.

For every quantized operand (module, role) the counters are:

* ``numel``: elements quantized;
* ``saturated``: finite elements beyond the format's overflow threshold (for block-scaled
  formats: beyond the threshold of their block, i.e. the element is at the element format's
  largest magnitude and the input exceeds it by more than half an ulp), which were clamped
  (saturating overflow) or became inf/NaN (the other overflow policies);
* ``flushed``: non-zero elements that became zero (underflow, also relative to a block scale);
* ``nonfinite``: finite elements that became inf or NaN;
* ``scale_clamped``: blocks with a non-zero element whose scale hit the scale format's limit
  (E8M0 2^-127 or NaN, an E4M3 scale at 448 or at zero; docs/arithmetic.md section 2).

Counts are kept as tensors on the operand's device and summed lazily, so no host sync happens
per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import torch
from precisim.formats import FloatFormat, IntFormat
from precisim.formats.events import (
    beyond_bound,
    element_events,
    overflow_ratio,
    overflow_threshold,
    plain_events,
)
from precisim.formats.scaling import ScaledFormat, ScaledTensor, scale_clamps

__all__ = ["Telemetry", "count_events", "count_events_reference", "count_op_events",
           "event_bound", "plain_counts"]

COUNTERS = ("numel", "saturated", "flushed", "nonfinite", "scale_clamped", "blocks")


def _beyond(ax: torch.Tensor, t: float, tie: bool) -> torch.Tensor:
    return ax >= t if tie else ax > t


def _value(x: torch.Tensor, fmt: FloatFormat | IntFormat | ScaledFormat) -> torch.Tensor:
    """The quantized value ``x`` as the counters read it: float32, except a float64 ``x`` for
    an element format, kept as it is (an exact value that float32 cannot hold)."""
    x = x.detach()
    return x if x.dtype == torch.float64 and not isinstance(fmt, ScaledFormat) else x.float()


def count_events(x: torch.Tensor, q: torch.Tensor, fmt: FloatFormat | IntFormat | ScaledFormat,
                 parts: ScaledTensor | None = None) -> dict[str, torch.Tensor]:
    """The counters of one quantization of ``x`` to ``q`` (see the module docstring).

    The element-wise tests and their sums run as one fused kernel (torch.compile for large
    operands, as the quantization kernels do; :func:`count_events_reference` is the plain
    eager definition they are tested against)."""
    from precisim.formats import kernels
    from precisim.formats.quantize import decode

    xf = _value(x, fmt).reshape(-1)
    qf = q.detach().float().reshape(-1)
    out: dict[str, torch.Tensor] = {"numel": torch.tensor(x.numel(), dtype=torch.int64)}
    # the format's constants are tensor arguments, so one compiled graph serves every format
    if isinstance(fmt, ScaledFormat):
        if parts is None:
            raise ValueError("scaled telemetry needs the quantization parts")
        consts = torch.tensor([overflow_ratio(fmt.element), float(fmt.element.max)],
                              dtype=torch.float32, device=xf.device)
        if parts.elements is not None:  # at the element format's largest magnitude?
            elems = parts.elements.detach().float().reshape(-1)
        else:
            elems = decode(parts.codes.detach().reshape(-1), fmt.element)
        sums = kernels.run(_scaled_events, ("telemetry", "scaled"), xf.numel(), xf, qf, elems,
                           consts)
        out["scale_clamped"], out["blocks"] = scale_clamps(x.detach().float(), parts)
    else:
        bound = event_bound(fmt, xf.dtype, xf.device)
        sums = kernels.run(plain_events, ("telemetry", "plain", str(xf.dtype)), xf.numel(), xf,
                           qf, bound)
    return _plain_counts(out, sums)


def event_bound(fmt: FloatFormat | IntFormat, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """:func:`precisim.formats.events.beyond_bound` as the one-element tensor of ``dtype``
    that :func:`precisim.formats.events.plain_events` takes."""
    return torch.tensor([beyond_bound(fmt, dtype)], dtype=dtype, device=device)


def plain_counts(numel: int, sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """The counters of an element-format rounding of ``numel`` values from the sums
    ``[flushed, nonfinite, saturated]`` of :func:`precisim.formats.events.plain_events`
    (computed by a kernel of the caller's, as :func:`count_events` computes them)."""
    return _plain_counts({"numel": torch.tensor(numel, dtype=torch.int64)}, sums)


def _plain_counts(out: dict[str, torch.Tensor], sums: torch.Tensor) -> dict[str, torch.Tensor]:
    out.setdefault("scale_clamped", torch.zeros((), dtype=torch.int64))
    out.setdefault("blocks", torch.zeros((), dtype=torch.int64))
    out["flushed"], out["nonfinite"], out["saturated"] = sums.unbind()
    return out


@cache
def _op_events(exact: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):  # noqa: ANN202
    def run(a: torch.Tensor, b: torch.Tensor, qf: torch.Tensor,
            bound: torch.Tensor) -> torch.Tensor:
        return plain_events(exact(a, b), qf, bound)
    return run


def count_op_events(exact: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str,
                    a: torch.Tensor, b: torch.Tensor, q: torch.Tensor,
                    fmt: FloatFormat | IntFormat) -> dict[str, torch.Tensor]:
    """The counters of ``q``, an element-format rounding of ``exact(a, b)`` (a float64 value
    whose comparisons with the format's threshold and with zero are those of the exact
    result, e.g. a product of float32 values or their sum rounded to odd), equal to
    ``count_events(exact(a, b), q, fmt)``; the exact value is computed inside the counting
    kernel and never stored (``name``: the kernel's key). ``a``, ``b`` and ``q`` have one
    shape."""
    from precisim.formats import kernels

    a, b, qf = (t.detach().reshape(-1) for t in (a, b, q.float()))
    sums = kernels.run(_op_events(exact), ("telemetry", "plain", name), qf.numel(), a, b, qf,
                       event_bound(fmt, torch.float64, qf.device))
    return plain_counts(q.numel(), sums)


def _scaled_events(xf: torch.Tensor, qf: torch.Tensor, elems: torch.Tensor,
                   consts: torch.Tensor) -> torch.Tensor:
    return element_events(xf, qf, elems.abs() >= consts[1], consts[0])


def count_events_reference(x: torch.Tensor, q: torch.Tensor,
                           fmt: FloatFormat | IntFormat | ScaledFormat,
                           parts: ScaledTensor | None = None) -> dict[str, torch.Tensor]:
    """The definition of the counters, in plain eager torch (what :func:`count_events` is
    tested against)."""
    xf = _value(x, fmt)
    qf = q.detach().float()
    ax, aq = xf.abs(), qf.abs()
    finite = torch.isfinite(xf)
    out: dict[str, torch.Tensor] = {
        "numel": torch.tensor(x.numel(), dtype=torch.int64),
        "flushed": ((xf != 0) & (qf == 0) & finite).sum(),
        "nonfinite": (finite & ~torch.isfinite(qf)).sum(),
    }
    if isinstance(fmt, ScaledFormat):
        elem = fmt.element
        if parts is None:
            raise ValueError("scaled telemetry needs the quantization parts")
        from precisim.formats.quantize import decode

        ev = decode(parts.codes, elem).float().abs()
        at_max = ev >= float(elem.max)
        sat = finite & at_max & (ax > aq * overflow_ratio(elem)) & (aq > 0)
        out["saturated"] = sat.sum()
        out["scale_clamped"], out["blocks"] = scale_clamps(xf, parts)
    else:
        thr, tie = overflow_threshold(fmt)
        out["saturated"] = (finite & _beyond(ax, thr, tie)).sum()
        out["scale_clamped"] = torch.zeros((), dtype=torch.int64)
        out["blocks"] = torch.zeros((), dtype=torch.int64)
    return out


@dataclass
class Telemetry:
    """Counters per (module, role); read them with :meth:`records` or :meth:`table`.

    A parameter's quantization (a weight, an embedding table) is *static*: it gives the same
    counts every time, so it is counted once however often a cache drops and recomputes it,
    and once when ranks of a distributed evaluation merge their counters."""

    _counts: dict[tuple[str, str], dict[str, torch.Tensor]] = field(default_factory=dict)
    _calls: dict[tuple[str, str], int] = field(default_factory=dict)
    _static: set[tuple[str, str]] = field(default_factory=set)

    def add(self, module: str, role: str, counts: dict[str, torch.Tensor],
            static: bool = False) -> None:
        key = (module, role)
        if static:
            if key in self._counts:
                return
            self._static.add(key)
        cur = self._counts.get(key)
        if cur is None:
            self._counts[key] = {k: v.detach().to("cpu", torch.int64) for k, v in counts.items()}
        else:
            for k, v in counts.items():
                cur[k] = cur[k] + v.detach().to("cpu", torch.int64)
        self._calls[key] = self._calls.get(key, 0) + 1

    def add_numel(self, module: str, role: str, n: int) -> None:
        """Count ``n`` more elements of an existing ``(module, role)`` entry that had no event
        and add no call: elements a kernel knows to be exact zeros of both the value and its
        quantization without computing them (the keys a dropping softmax cuts off in the
        chunked attention, emulation/attention.py)."""
        cur = self._counts[(module, role)]
        cur["numel"] = cur["numel"] + n

    def reset(self) -> None:
        self._counts.clear()
        self._calls.clear()
        self._static.clear()

    def state(self) -> dict[tuple[str, str], tuple[dict[str, int], int, bool]]:
        """The counters as plain ints (picklable: what distributed evaluation gathers)."""
        return {key: ({k: int(v) for k, v in c.items()}, self._calls[key],
                      key in self._static) for key, c in self._counts.items()}

    @classmethod
    def merged(cls, states: list[dict[tuple[str, str], tuple[dict[str, int], int, bool]]
                                 | None]) -> Telemetry:
        """The sum of several :meth:`state` s (integer counts: the order does not matter; a
        static key counted once); keys in first-seen order."""
        out = cls()
        for st in states:
            for key, (counts, calls, static) in (st or {}).items():
                if static and key in out._counts:
                    continue
                cur = out._counts.setdefault(key, {})
                for k, v in counts.items():
                    cur[k] = cur.get(k, torch.zeros((), dtype=torch.int64)) + v
                out._calls[key] = out._calls.get(key, 0) + calls
                if static:
                    out._static.add(key)
        return out

    def records(self) -> list[dict[str, object]]:
        """One dict per (module, role): the counts, ``calls`` and the rates (count / numel;
        scale clamps / blocks)."""
        rows: list[dict[str, object]] = []
        for (module, role), c in self._counts.items():
            n = int(c["numel"])
            blocks = int(c.get("blocks", torch.tensor(0)))
            row: dict[str, object] = {"module": module, "role": role,
                                      "calls": self._calls[(module, role)]}
            for k in COUNTERS:
                row[k] = int(c.get(k, torch.tensor(0)))
            for k in ("saturated", "flushed", "nonfinite"):
                row[f"{k}_rate"] = row[k] / n if n else 0.0  # type: ignore[operator]
            row["scale_clamped_rate"] = row["scale_clamped"] / blocks if blocks else 0.0  # type: ignore[operator]
            rows.append(row)
        return rows

    def totals(self) -> dict[str, float]:
        """Counts and rates summed over every module and role."""
        tot = {k: 0 for k in COUNTERS}
        for row in self.records():
            for k in COUNTERS:
                tot[k] += int(row[k])  # type: ignore[call-overload]
        n, b = tot["numel"], tot["blocks"]
        out: dict[str, float] = {k: float(v) for k, v in tot.items()}
        for k in ("saturated", "flushed", "nonfinite"):
            out[f"{k}_rate"] = tot[k] / n if n else 0.0
        out["scale_clamped_rate"] = tot["scale_clamped"] / b if b else 0.0
        return out

    def table(self, min_rate: float = 0.0) -> str:
        """A Markdown table (rows whose every rate is below ``min_rate`` are left out)."""
        head = ("| module | role | calls | elements | saturated | flushed to 0 | inf/NaN "
                "| scale clamps |\n|---|---|---:|---:|---:|---:|---:|---:|")
        lines = [head]
        for r in self.records():
            rates = [r["saturated_rate"], r["flushed_rate"], r["nonfinite_rate"],
                     r["scale_clamped_rate"]]
            if min_rate and max(rates) < min_rate:  # type: ignore[type-var]
                continue
            lines.append(f"| {r['module']} | {r['role']} | {r['calls']} | {r['numel']} | "
                         f"{r['saturated']} ({r['saturated_rate']:.2e}) | "
                         f"{r['flushed']} ({r['flushed_rate']:.2e}) | "
                         f"{r['nonfinite']} | {r['scale_clamped']} |")
        return "\n".join(lines)


@dataclass
class LayerErrors:
    """Error of each emulated op's output against the high-precision op on the same inputs
    (signal and error energy, summed over calls): SQNR and relative RMS error per op."""

    _acc: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, ref: torch.Tensor, emu: torch.Tensor) -> None:
        r = ref.detach().double()
        e = emu.detach().double() - r
        fin = torch.isfinite(e)
        sig = float(torch.where(fin, r * r, 0).sum())
        err = float(torch.where(fin, e * e, 0).sum())
        mx = float(torch.where(fin, e.abs(), 0).max()) if e.numel() else 0.0
        cur = self._acc.setdefault(name, [0.0, 0.0, 0.0, 0.0, 0.0])
        cur[0] += sig
        cur[1] += err
        cur[2] = max(cur[2], mx)
        cur[3] += e.numel()
        cur[4] += int((~fin).sum())

    def reset(self) -> None:
        self._acc.clear()

    def records(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for name, (sig, err, mx, n, nonfinite) in self._acc.items():
            sqnr = math.inf if err == 0 else (10 * math.log10(sig / err) if sig > 0 else -math.inf)
            rows.append({"op": name, "sqnr_db": sqnr,
                         "rel_rms_error": math.sqrt(err / sig) if sig > 0 else math.inf,
                         "max_abs_error": mx, "numel": int(n), "nonfinite": int(nonfinite)})
        return rows
