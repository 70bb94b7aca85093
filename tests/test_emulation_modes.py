"""The function modes of the softmax and residual op kinds are scoped to their module's own
code (emulation/modes.py): off torch's stack while a decoder layer's children (residual) or an
attention module's projections (softmax) run, back where they stood afterwards, under modes
entered since; the logits and counters are those of the same recipe."""

from __future__ import annotations

import pytest
import torch
from precisim.emulation import Recipe, emulate
from precisim.emulation.datapath_ops import _SoftmaxMode
from precisim.emulation.rounded_ops import _ResidualMode
from test_emulation_datapath import _llama, _logits
from torch.overrides import TorchFunctionMode

RECIPE = Recipe.from_yaml("name: t\nlinear: {input: e4m3, weight: e4m3}\n"
                          "softmax: softmax-exact\nresidual: bf16\nglu: bf16\n")


def _stack() -> list[TorchFunctionMode]:
    return [torch._C._get_function_stack_at(i)
            for i in range(torch._C._len_torch_function_stack())]


def _kinds(modes: list[TorchFunctionMode]) -> list[str]:
    return [type(m).__name__ for m in modes]


def test_modes_are_off_the_stack_in_children_and_on_it_in_the_modules_own_code() -> None:
    model = _llama()
    layer = model.model.layers[0]
    seen: dict[str, list[str]] = {}
    with emulate(model, RECIPE):
        def note(key: str):  # noqa: ANN202 - a pre-hook
            def hook(m, a) -> None:  # (returns None: the arguments unchanged)
                seen.setdefault(key, _kinds(_stack()))
            return hook

        hooks = [layer.mlp.register_forward_pre_hook(note("mlp")),
                 layer.self_attn.q_proj.register_forward_pre_hook(note("q_proj"))]
        real_softmax = torch.softmax

        def spy(*args, **kwargs):  # the attention function's softmax call: both modes on
            seen.setdefault("softmax", _kinds(_stack()))
            return real_softmax(*args, **kwargs)

        try:
            torch.softmax = spy  # (the eager attention calls torch's softmax by name)
            with torch.no_grad():
                model(torch.arange(12)[None])
        finally:
            torch.softmax = real_softmax
            for h in hooks:
                h.remove()
    assert seen["mlp"] == []  # a child of the layer: the residual mode is off
    assert seen["q_proj"] == []  # a projection: the softmax mode is off too
    assert _stack() == []
    # inside the attention's own code both are on (the residual mode below the softmax's);
    # a softmax intercepted by the softmax mode runs with that mode popped by torch
    assert "_ResidualMode" in seen.get("softmax", ["_ResidualMode"])


class _User(TorchFunctionMode):
    """A mode of the user's, entered and left by hooks registered after the emulation's."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("child", ["mlp", "self_attn"])
def test_modes_entered_inside_a_child_keep_their_order(child: str) -> None:
    """A user's mode entered by a child's pre-hook and left by its post-hook (both registered
    after the emulation's) is popped by its own exit: the emulation's mode is put back under
    it. The logits and every counter equal the run without it."""
    model = _llama()
    with emulate(model, RECIPE) as em:
        ref = _logits(model)
        ref_counts = em.telemetry.records()
    popped: list[TorchFunctionMode] = []
    with emulate(model, RECIPE) as em:
        for layer in model.model.layers:
            mod = getattr(layer, child)
            user = _User()

            def pre(m, a, user=user) -> None:
                user.__enter__()

            def post(m, a, out, user=user) -> None:
                popped.append(torch._C._pop_torch_function_stack())
                assert popped[-1] is user, _kinds([popped[-1]])

            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)
        y = _logits(model)
        counts = em.telemetry.records()
    assert len(popped) == len(model.model.layers)
    assert torch.equal(y, ref)
    assert counts == ref_counts
    assert _stack() == []


def test_a_child_that_raises_leaves_the_stack_clean() -> None:
    model = _llama()

    def boom(m, a) -> None:
        raise RuntimeError("boom")

    with emulate(model, RECIPE):
        h = model.model.layers[0].mlp.register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
            model(torch.arange(12)[None])
        h.remove()
        assert _stack() == []
        with torch.no_grad():  # and the next forward runs emulated as before
            model(torch.arange(12)[None])
    assert _stack() == []
    assert _ResidualMode and _SoftmaxMode  # (the classes whose instances these tests follow)
