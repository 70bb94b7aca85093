"""Optimizer-side numerics: low-precision AdamW states and dynamic loss scaling
(docs/training.md section 7)."""

from __future__ import annotations

import pytest
import torch
from precisim.emulation.training.lowp_optim import (
    LossScaler,
    LossScaling,
    LowPrecisionAdamW,
    StateFormat,
)

LR, B1, B2, EPS, WD = 1e-2, 0.9, 0.999, 1e-8, 0.1


def _grads(n: int, shape: tuple[int, ...] = (3, 5)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=g) * 10.0 ** (-i) for i in range(n)]


def _run(opt_of, steps: int = 4) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 5))
    opt = opt_of(p)
    for g in _grads(steps):
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


def test_fp32_states_are_torch_adamw_bit_for_bit():
    ref, _ = _run(lambda p: torch.optim.AdamW([p], lr=LR, betas=(B1, B2), eps=EPS,
                                              weight_decay=WD, foreach=False))
    got, _ = _run(lambda p: LowPrecisionAdamW([("w", p)], lr=LR, betas=(B1, B2), eps=EPS,
                                              weight_decay=WD, states="fp32"))
    assert torch.equal(ref, got)


def _hand(store, steps: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdamW written out with the moments rounded by ``store`` after each step."""
    torch.manual_seed(0)
    p = torch.randn(3, 5)
    m = torch.zeros(3, 5)
    v = torch.zeros(3, 5)
    for t, g in enumerate(_grads(steps), start=1):
        p = p * (1 - LR * WD)
        m = m + (g - m) * (1 - B1)  # lerp, weight < 0.5: start + weight * (end - start)
        v = v * B2 + (g * g) * (1 - B2)
        denom = v.sqrt() / (1 - B2 ** t) ** 0.5 + EPS
        p = p - (LR / (1 - B1 ** t)) * (m / denom)
        m, v = store(m), store(v)
    return p, m, v


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()  # torch's own cast: round to nearest even


def _fp8(x: torch.Tensor) -> torch.Tensor:
    scale = float(x.abs().max()) / 448.0
    return (x / scale).to(torch.float8_e4m3fn).float() * scale


@pytest.mark.parametrize("name,store", [("bf16", _bf16), ("fp8", _fp8)])
def test_low_precision_states_are_the_hand_computation(name, store):
    p_ref, m_ref, v_ref = _hand(store)
    got, opt = _run(lambda p: LowPrecisionAdamW([("w", p)], lr=LR, betas=(B1, B2), eps=EPS,
                                                weight_decay=WD, states=name), steps=3)
    st = next(iter(opt.state.values()))
    assert torch.allclose(got, p_ref, rtol=0, atol=1e-6)  # addcdiv vs written-out: 1 ulp
    # the stored moments are exactly the rounded ones (format values)
    assert torch.equal(st["exp_avg_sq"], store(st["exp_avg_sq"]))
    assert torch.equal(st["exp_avg"], store(st["exp_avg"]))
    assert torch.allclose(st["exp_avg"], m_ref, rtol=2 ** -7, atol=0)
    assert torch.allclose(st["exp_avg_sq"], v_ref, rtol=2 ** -7, atol=0)


def test_low_precision_states_store_exactly_the_rounded_fp32_update():
    """One step from zero states: m = (1 - b1) g and v = (1 - b2) g^2 in fp32, then rounded:
    the stored values equal the rounding of exactly those, bit for bit."""
    g = _grads(1)[0]
    for name, store in (("bf16", _bf16), ("fp8", _fp8)):
        p = torch.nn.Parameter(torch.zeros(3, 5))
        opt = LowPrecisionAdamW([("w", p)], lr=LR, betas=(B1, B2), weight_decay=0.0,
                                states=name)
        p.grad = g.clone()
        opt.step()
        st = opt.state[p]
        assert torch.equal(st["exp_avg"], store(torch.zeros(3, 5).lerp_(g, 1 - B1)))
        assert torch.equal(st["exp_avg_sq"], store(torch.zeros(3, 5).addcmul_(g, g,
                                                                               value=1 - B2)))


def test_sr_states_round_to_a_neighbour_and_replay():
    def run(seed: int) -> torch.Tensor:
        p = torch.nn.Parameter(torch.zeros(64, 64))
        opt = LowPrecisionAdamW([("w", p)], lr=LR, weight_decay=0.0, states="bf16-sr",
                                seed=seed)
        p.grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
        opt.step()
        return opt.state[p]["exp_avg"].clone(), p.grad

    m, g = run(0)
    exact = torch.zeros(64, 64).lerp_(g, 1 - 0.9)
    # the two bf16 neighbours by magnitude: truncated, and one bf16 ulp further from 0
    bits = exact.view(torch.int32)
    trunc = (bits & ~0xFFFF).view(torch.float32)
    away = ((bits & ~0xFFFF) + 0x10000).view(torch.float32)
    assert bool(((m == trunc) | (m == away)).all())
    assert torch.equal(m, run(0)[0]) and not torch.equal(m, run(1)[0])
    assert int((m != _bf16(exact)).sum()) > 100  # SR departs from nearest for many values


def test_unknown_state_format():
    with pytest.raises(ValueError, match="unknown optimizer-state format 'bf61'; did you "
                                         "mean 'bf16'"):
        StateFormat("bf61")


def test_loss_scaler_backs_off_on_inf_and_grows():
    sc = LossScaler(LossScaling(scale=1024.0, interval=3, min_scale=256.0))
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.tensor([1.0, float("inf"), 2.0, 3.0])
    assert not sc.unscale([p])
    assert torch.isinf(p.grad[1])  # left as it was: the step is skipped
    sc.update(False)
    assert sc.scale == 512.0 and sc.skipped == 1
    p.grad = torch.tensor([float("nan"), 0.0, 0.0, 0.0])
    sc.update(sc.unscale([p]))
    sc.update(False)
    assert sc.scale == 256.0  # min_scale
    p.grad = torch.full((4,), 512.0)
    assert sc.unscale([p]) and torch.equal(p.grad, torch.full((4,), 2.0))
    for _ in range(3):
        sc.update(True)
    assert sc.scale == 512.0 and sc.good == 0
    sc2 = LossScaler(LossScaling())
    sc2.load_state_dict(sc.state_dict())
    assert sc2.state_dict() == sc.state_dict()
    with pytest.raises(ValueError, match="backoff=1.5"):
        LossScaling(backoff=1.5)
