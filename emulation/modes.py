"""Function modes scoped to one module's own forward (docs/arithmetic.md section 7.9).

The op kinds ``softmax`` and ``residual`` find their calls with a
:class:`~torch.overrides.TorchFunctionMode` entered for the duration of one module's forward
(an attention module: its softmax calls; a decoder layer: its residual adds). A mode on torch's
stack sees every call made below it, including those of the module's children, which for a
decoder layer under emulation are tens of thousands of quantization and counting calls per
forward that the mode only passes on. :func:`scope_mode` installs such a mode so that it is
taken off the stack while a chosen child runs and put back where it stood afterwards: modes
entered since (another op kind's, the user's) keep their order, so each one's own exit still
pops it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .opkinds import EmulationError

if TYPE_CHECKING:
    from .opkinds import Installer

__all__ = ["ScopedMode", "scope_mode"]


def _lift(mode: TorchFunctionMode) -> int | None:
    """Take ``mode`` off torch's function-mode stack, the modes above it keeping their order;
    its position (from the bottom), or None where it is not on the stack."""
    n = torch._C._len_torch_function_stack()
    pos = next((i for i in range(n) if torch._C._get_function_stack_at(i) is mode), None)
    if pos is not None:
        above = [torch._C._pop_torch_function_stack() for _ in range(n - pos)]
        for m in reversed(above[:-1]):
            torch._C._push_on_torch_function_stack(m)
    return pos


def _put_back(mode: TorchFunctionMode, pos: int) -> None:
    """Insert ``mode`` into torch's function-mode stack at ``pos`` (from the bottom), under
    the modes entered since :func:`_lift` that are still there."""
    n = torch._C._len_torch_function_stack()
    if n < pos:
        raise EmulationError(f"torch's function-mode stack lost {pos - n} mode(s) below "
                             f"{type(mode).__name__} while a child module ran")
    above = [torch._C._pop_torch_function_stack() for _ in range(n - pos)]
    torch._C._push_on_torch_function_stack(mode)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)


class ScopedMode(TorchFunctionMode):
    """A mode active during one forward of one module, off the stack while the children
    chosen by :func:`scope_mode` run."""

    def __init__(self) -> None:
        super().__init__()
        self._lifted: list[int | None] = []  # per running child: where the mode stood

    def child_output(self, out: Any) -> None:
        """A child returned ``out`` (a hook for subclasses)."""

    def suspend(self) -> None:
        """A child's forward starts: off the stack (a child inside a child: already off)."""
        self._lifted.append(_lift(self))

    def resume(self) -> None:
        """A child's forward ended (or raised): back where it stood."""
        if self._lifted:
            pos = self._lifted.pop()
            if pos is not None:
                _put_back(self, pos)

    def leave(self) -> None:
        """The module's forward ended: off the stack wherever it stands."""
        self._lifted.clear()
        _lift(self)


def scope_mode(installer: Installer, m: nn.Module,
               enter: Callable[[tuple, dict], ScopedMode],
               left: Callable[[ScopedMode], None] | None = None,
               suspend_in: Callable[[nn.Module], bool] = lambda child: True) -> None:
    """Each forward of ``m`` runs under the mode ``enter(args, kwargs)`` returns (entered by a
    forward pre-hook, left by a forward hook that always runs, then ``left(mode)``); while a
    child with ``suspend_in(child)`` runs, the mode is off the stack, and that child's output
    goes to :meth:`ScopedMode.child_output`. The hooks are removed at restore."""
    modes: list[ScopedMode] = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        mode = enter(args, kwargs)
        mode.__enter__()
        modes.append(mode)

    def post(mod: nn.Module, args: tuple, out: Any) -> None:
        if modes:
            mode = modes.pop()
            mode.leave()
            if left is not None:
                left(mode)

    def child_pre(mod: nn.Module, args: tuple) -> None:
        if modes:
            modes[-1].suspend()

    def child_post(mod: nn.Module, args: tuple, out: Any) -> None:
        if modes:
            modes[-1].resume()
            modes[-1].child_output(out)

    for child in filter(suspend_in, m.children()):
        # the first of the child's pre-hooks; the hook after its forward always runs
        installer.on_restore(child.register_forward_pre_hook(child_pre, prepend=True).remove)
        installer.on_restore(child.register_forward_hook(child_post, always_call=True).remove)
    installer.on_restore(m.register_forward_pre_hook(pre, with_kwargs=True).remove)
    installer.on_restore(m.register_forward_hook(post, always_call=True).remove)
