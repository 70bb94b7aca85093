"""The registry of matrix-unit kernels, and the dispatcher that asks them.

A :class:`Kernel` computes a prepared :class:`~.call.GemmCall` at one fidelity. It declares
the :class:`~precisim.emulation.MatrixUnit` fields it models (``fields``): a unit that sets any
other field to a value other than its default is refused without the kernel being asked, so a
new field is never silently ignored by a fast kernel; ``supports(call)`` then says, for the
fields it does model, whether it handles these values and these operands (``None``) or why not
(a reason). :data:`KERNELS` holds them; :func:`select` takes the preferred (lowest ``priority``:
fastest) kernel that supports the call, within an optional preference (an argument of
:func:`precisim.emulation.matmul` or the scoped :func:`use_kernels`); :func:`explain_call`
says which kernel runs and why each faster one was refused. The exact ``reference`` kernel
models every field and supports every call.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch
from precisim.formats import FloatFormat, FormatError, IntFormat
from precisim.formats.registry import Registry, UnknownNameError

from ..matrix_unit import MatrixUnit
from .call import GemmCall

__all__ = ["ALL_FIELDS", "Explanation", "Kernel", "KERNELS", "UnknownKernelError",
           "explain_call", "register_kernel", "select", "unmodelled_fields", "use_kernels"]

#: every field of MatrixUnit that changes what it computes
ALL_FIELDS = frozenset(f.name for f in dataclasses.fields(MatrixUnit)) - {"name", "description"}
#: fields every kernel honours because :func:`~.call.prepare` applies them before dispatch
PREPARED_FIELDS = frozenset({"flush_input_subnormals"})


class UnknownKernelError(UnknownNameError):
    """An unknown kernel name."""


@dataclass(frozen=True)
class Kernel:
    """A way to compute GEMMs under matrix units (see the module docstring).

    ``run(call)`` returns the (B, M, N) float32 result before special values are put back
    (every operand it sees is finite).
    """

    name: str
    fidelity: str
    fields: frozenset[str]
    supports: Callable[[GemmCall], str | None]
    run: Callable[[GemmCall], torch.Tensor]
    priority: int
    description: str = ""

    def refusal(self, call: GemmCall) -> str | None:
        """Why this kernel does not compute ``call`` (None: it does)."""
        if call.fidelity != self.fidelity:
            return f"it computes the {self.fidelity!r} fidelity"
        bad = unmodelled_fields(self, call.unit)
        if bad:
            unit = call.unit
            return "it does not model " + ", ".join(
                f"{f}={_show(getattr(unit, f))}" for f in bad)
        return self.supports(call)


def _show(v: object) -> str:
    if isinstance(v, enum.Enum):
        return repr(v.value)
    if isinstance(v, FloatFormat | IntFormat):
        return v.name
    return repr(v)


@cache
def _nondefault_fields(unit: MatrixUnit) -> tuple[str, ...]:
    """The fields of ``unit`` (its class's: a subclass may add some) whose value differs from
    what the field's default gives."""
    out = []
    for f in dataclasses.fields(unit):
        if f.name in ("name", "description"):
            continue
        try:
            same = getattr(unit.with_(**{f.name: f.default}), f.name) == getattr(unit, f.name)
        except (ValueError, TypeError, FormatError):
            same = False  # the default is not even valid with the other fields
        if not same:
            out.append(f.name)
    return tuple(out)


def unmodelled_fields(kernel: Kernel, unit: MatrixUnit) -> list[str]:
    """The fields ``unit`` sets that ``kernel`` does not model."""
    known = kernel.fields | PREPARED_FIELDS
    return [f for f in _nondefault_fields(unit) if f not in known]


#: every matrix-unit kernel (docs/naming.md: ``kernel:<name>``)
KERNELS: Registry[Kernel] = Registry("matrix-unit kernel", prefix="kernel",
                                     error=UnknownKernelError)


def register_kernel(kernel: Kernel, *, replace: bool = False,
                    unit_type: type[MatrixUnit] = MatrixUnit) -> Kernel:
    """Add a kernel to :data:`KERNELS` (its ``priority`` places it among the others). Its
    ``fields`` must be fields of ``unit_type`` (a subclass of MatrixUnit may add some)."""
    known = {f.name for f in dataclasses.fields(unit_type)} - {"name", "description"}
    unknown = kernel.fields - known
    if unknown:
        raise ValueError(f"kernel {kernel.name!r} declares unknown {unit_type.__name__} fields "
                         f"{sorted(unknown)}; accepted: {sorted(known)}")
    return KERNELS.register(kernel.name, kernel, replace=replace)


def _ordered() -> list[Kernel]:
    return sorted((k for _, k in KERNELS.items()), key=lambda k: k.priority)


_PREFERENCE: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "precisim_kernel_preference", default=None)


@contextmanager
def use_kernels(*names: str) -> Iterator[None]:
    """Within the block, matrix-unit GEMMs may only use these kernels (in priority order), e.g.
    ``with use_kernels("float-chain", "int-chain", "reference"): model(ids)``; an unknown name
    raises at once. Nested blocks replace the outer preference."""
    chosen = _names(names)
    token = _PREFERENCE.set(chosen)
    try:
        yield
    finally:
        _PREFERENCE.reset(token)


def _names(names: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = (names,)
    return tuple(KERNELS.canonical(n) for n in names)


@dataclass(frozen=True)
class Explanation:
    """Which kernel computes a call (``kernel``, None if none can) and why each kernel tried
    before it was refused (``refused``: (name, reason) in priority order)."""

    fidelity: str
    kernel: str | None
    refused: tuple[tuple[str, str], ...]
    preference: tuple[str, ...] | None = None

    def __str__(self) -> str:
        head = (f"{self.fidelity}: kernel {self.kernel!r}" if self.kernel
                else f"{self.fidelity}: no kernel computes this call")
        if self.preference is not None:
            head += f" (allowed: {', '.join(self.preference)})"
        lines = [head] + [f"  not {n!r}: {why}" for n, why in self.refused]
        return "\n".join(lines)


def explain_call(call: GemmCall, kernel: str | Sequence[str] | None = None) -> Explanation:
    """:class:`Explanation` of :func:`select` for ``call``."""
    allowed = _names(kernel) if kernel is not None else _PREFERENCE.get()
    refused = []
    for k in _ordered():
        if allowed is not None and k.name not in allowed:
            if k.fidelity == call.fidelity:
                refused.append((k.name, "not in the kernels allowed for this call"))
            continue
        if k.fidelity != call.fidelity:
            continue
        why = k.refusal(call)
        if why is None:
            return Explanation(call.fidelity, k.name, tuple(refused), allowed)
        refused.append((k.name, why))
    return Explanation(call.fidelity, None, tuple(refused), allowed)


def select(call: GemmCall, kernel: str | Sequence[str] | None = None) -> Kernel:
    """The kernel that computes ``call`` (see the module docstring); ``ValueError`` listing
    every refusal when none does."""
    ex = explain_call(call, kernel)
    if ex.kernel is None:
        raise ValueError(f"no matrix-unit kernel computes this GEMM under unit "
                         f"{call.unit.name!r}:\n{ex}")
    return KERNELS.get(ex.kernel)
