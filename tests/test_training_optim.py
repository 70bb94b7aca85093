"""Optimizer-side numerics: low-precision AdamW states and dynamic loss scaling
(docs/training.md section 7)."""

from __future__ import annotations

import math

import pytest
import torch
from precisim.emulation.training.lowp_optim import (
    STATE_FORMATS,
    LossScaler,
    LossScaling,
    LowPrecisionAdamW,
    StateFormat,
)
from precisim.emulation.training.sr import element_bits, key_of
from precisim.formats import quantize

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
    m, v = opt.moments(next(iter(opt.state)))
    assert torch.allclose(got, p_ref, rtol=0, atol=1e-6)  # addcdiv vs written-out: 1 ulp
    # the stored moments are exactly the rounded ones (format values)
    assert torch.equal(v, store(v))
    assert torch.equal(m, store(m))
    assert torch.allclose(m, m_ref, rtol=2 ** -7, atol=0)
    assert torch.allclose(v, v_ref, rtol=2 ** -7, atol=0)


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
        m, v = opt.moments(p)
        assert torch.equal(m, store(torch.zeros(3, 5).lerp_(g, 1 - B1)))
        assert torch.equal(v, store(torch.zeros(3, 5).addcmul_(g, g, value=1 - B2)))


def test_sr_states_round_to_a_neighbour_and_replay():
    def run(seed: int) -> torch.Tensor:
        p = torch.nn.Parameter(torch.zeros(64, 64))
        opt = LowPrecisionAdamW([("w", p)], lr=LR, weight_decay=0.0, states="bf16-sr",
                                seed=seed)
        p.grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
        opt.step()
        return opt.moments(p)[0].clone(), p.grad

    m, g = run(0)
    exact = torch.zeros(64, 64).lerp_(g, 1 - 0.9)
    # the two bf16 neighbours by magnitude: truncated, and one bf16 ulp further from 0
    bits = exact.view(torch.int32)
    trunc = (bits & ~0xFFFF).view(torch.float32)
    away = ((bits & ~0xFFFF) + 0x10000).view(torch.float32)
    assert bool(((m == trunc) | (m == away)).all())
    assert torch.equal(m, run(0)[0]) and not torch.equal(m, run(1)[0])
    assert int((m != _bf16(exact)).sum()) > 100  # SR departs from nearest for many values


def _old_store(fmt: StateFormat, x: torch.Tensor, seed: int, step: int, name: str,
               moment: str) -> torch.Tensor:
    """The rounding of the moments as the optimizer did it before they were stored compactly
    (float32 tensors holding the format values), written out."""
    if fmt.name == "fp32":
        return x
    scale = 1.0
    if fmt.scaled:
        amax = float(x.abs().max())
        scale = amax / 448.0 if amax > 0 and math.isfinite(amax) else 1.0
    y = x / scale if scale != 1.0 else x
    if fmt.stochastic:
        r = element_bits((y.numel(),), fmt.sr_bits, key_of(seed, step, name, moment))
        q = quantize(y.reshape(-1), fmt.element, "sr", sr_bits=fmt.sr_bits,
                     rand=r).reshape(y.shape)
    else:
        q = quantize(y, fmt.element)
    return q * scale if scale != 1.0 else q


def _fp32_held(params: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]],
               fmt: StateFormat, seed: int) -> tuple[dict, dict, dict]:
    """AdamW with the moments held in float32 and rounded by ``_old_store`` after each step
    (the optimizer's step op for op, before compact storage)."""
    p = {n: t.clone() for n, t in params.items()}
    m = {n: torch.zeros_like(t) for n, t in p.items()}
    v = {n: torch.zeros_like(t) for n, t in p.items()}
    for k, gs in enumerate(grads, start=1):
        for n, g in gs.items():
            p[n].mul_(1 - LR * WD)
            m[n].lerp_(g, 1 - B1)
            v[n].mul_(B2).addcmul_(g, g, value=1 - B2)
            denom = (v[n].sqrt() / (1 - B2 ** float(k)) ** 0.5).add_(EPS)
            p[n].addcdiv_(m[n], denom, value=-(LR / (1 - B1 ** float(k))))
            m[n] = _old_store(fmt, m[n], seed, k, n, "exp_avg")
            v[n] = _old_store(fmt, v[n], seed, k, n, "exp_avg_sq")
    return p, m, v


def _problem(steps: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(7)
    params = {f"w{i}": torch.randn(16, 24, generator=gen) for i in range(3)}
    # gradients of three magnitudes: 1, 1e-3 and 1e-6 (bf16 / E4M3 subnormal moments)
    grads = [{f"w{i}": torch.randn(16, 24, generator=gen) * 10.0 ** (-3 * i) for i in range(3)}
             for _ in range(steps)]
    return params, grads


def _compact_run(params, grads, fmt: str, seed: int = 11, stop: int | None = None,
                 opt: LowPrecisionAdamW | None = None, ps: dict | None = None):
    ps = ps if ps is not None else {n: torch.nn.Parameter(t.clone()) for n, t in params.items()}
    opt = opt or LowPrecisionAdamW(list(ps.items()), lr=LR, betas=(B1, B2), eps=EPS,
                                   weight_decay=WD, states=fmt, seed=seed)
    for gs in grads[:stop]:
        for n, g in gs.items():
            ps[n].grad = g.clone()
        opt.step()
    return ps, opt


@pytest.mark.parametrize("fmt", list(STATE_FORMATS))
def test_compact_states_follow_the_fp32_held_trajectory_bit_for_bit(fmt):
    """Moments stored compactly (bf16 tensors; E4M3 codes + a per-tensor scale) give every
    parameter and moment of the fp32-held rounded moments bit for bit, over 6 steps of three
    parameters whose gradients span 1 to 1e-6, in every state format (SR ones included)."""
    params, grads = _problem(6)
    ref_p, ref_m, ref_v = _fp32_held(params, grads, StateFormat(fmt), seed=11)
    ps, opt = _compact_run(params, grads, fmt)
    for n, p in ps.items():
        assert torch.equal(p.detach(), ref_p[n]), n
        m, v = opt.moments(p)
        assert torch.equal(m, ref_m[n]) and torch.equal(v, ref_v[n]), n
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype \
            == {"fp32": torch.float32, "bf16": torch.bfloat16,
                "e4m3": torch.float8_e4m3fn}[StateFormat(fmt).element]


def test_state_bytes_drop_with_the_format():
    """Bytes held by the moments' storage (untyped storages, so no hidden larger buffer) for
    a 384 x 1024 parameter: fp32 8 bytes an element, bf16 4, FP8 2 (two moments) plus the
    4-byte step counter; the FP8 scales are two Python floats."""
    n = 384 * 1024
    got = {}
    for fmt in STATE_FORMATS:
        p = torch.nn.Parameter(torch.zeros(384, 1024))
        opt = LowPrecisionAdamW([("w", p)], states=fmt)
        p.grad = torch.randn(384, 1024, generator=torch.Generator().manual_seed(0))
        opt.step()
        st = opt.state[p]
        got[fmt] = sum(t.untyped_storage().nbytes() for t in st.values()
                       if isinstance(t, torch.Tensor))
        assert got[fmt] == opt.state_bytes()
    assert got["fp32"] == 8 * n + 4
    assert got["bf16"] == got["bf16-sr"] == 4 * n + 4
    assert got["fp8"] == got["fp8-sr"] == 2 * n + 4


@pytest.mark.parametrize("fmt", ["bf16-sr", "fp8"])
def test_compact_states_survive_a_state_dict_round_trip(fmt):
    """Saved after 3 steps (torch.save), loaded into a new optimizer (torch's loader casts the
    moments to fp32; they come back compact), 3 more steps: bit for bit the 6-step run."""
    import io

    params, grads = _problem(6)
    whole, wopt = _compact_run(params, grads, fmt)
    part, popt = _compact_run(params, grads, fmt, stop=3)
    buf = io.BytesIO()
    torch.save(popt.state_dict(), buf)
    buf.seek(0)
    ps = {n: torch.nn.Parameter(p.detach().clone()) for n, p in part.items()}
    opt = LowPrecisionAdamW(list(ps.items()), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD,
                            states=fmt, seed=11)
    opt.load_state_dict(torch.load(buf, weights_only=False))
    assert all(opt.state[p]["exp_avg"].dtype == StateFormat(fmt).dtype for p in ps.values())
    _compact_run(params, grads[3:], fmt, opt=opt, ps=ps)
    for n in ps:
        assert torch.equal(ps[n].detach(), whole[n].detach()), n
        assert all(torch.equal(a, b) for a, b in zip(opt.moments(ps[n]),
                                                     wopt.moments(whole[n])))


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


def _opt_after_steps(fmt: str, n: int, shape: tuple[int, int], steps: int = 1):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(shape)) for _ in range(n)]
    opt = LowPrecisionAdamW([(f"p{i}", p) for i, p in enumerate(ps)], lr=LR, states=fmt)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(shape)
        opt.step()
    for p in ps:
        p.grad = torch.randn(shape)
    return ps, opt


@pytest.mark.parametrize("fmt", sorted(STATE_FORMATS))
def test_step_peak_memory_is_one_parameters_temporaries(fmt, monkeypatch):
    """Bytes, not time: the peak of the CPU bytes a step allocates (torch's memory profiler)
    is at most 3 fp32 copies of one parameter (its decoded m and v and the denominator; fp32
    states: the denominator only) plus the rounding's temporaries of one slice of
    ENCODE_CHUNK elements (at most 128 bytes an element: eager stochastic rounding to bf16
    takes about 100), and the same for 1 and 4
    parameters. Before, the previous parameter's m and v were alive while the next ones were
    decoded, and the rounding's temporaries spanned the whole tensor (bf16-sr: 27 fp32 copies
    of a 256x256 parameter, 9.5 over four 2048x1024 ones)."""
    import precisim.emulation.training.lowp_optim as lo

    monkeypatch.setattr(lo, "ENCODE_CHUNK", 1 << 14)
    shape = (512, 256)
    param = shape[0] * shape[1] * 4
    copies = 1 if fmt == "fp32" else 3
    peaks = []
    for n in (1, 4):
        _, opt = _opt_after_steps(fmt, n, shape)
        peaks.append(lo.peak_bytes(opt.step))
    assert peaks[0] == peaks[1], peaks
    assert copies * param <= peaks[0] <= copies * param + 128 * (1 << 14), peaks


@pytest.mark.parametrize("fmt", ["bf16-sr", "fp8", "fp8-sr"])
def test_sliced_rounding_stores_the_same_codes(fmt, monkeypatch):
    """Rounding the moments in slices of ENCODE_CHUNK elements (SR bits keyed by the element's
    position in the whole tensor) stores the same codes, bit for bit, as in one slice."""
    import precisim.emulation.training.lowp_optim as lo

    whole = _opt_after_steps(fmt, 2, (96, 80), steps=3)
    monkeypatch.setattr(lo, "ENCODE_CHUNK", 1000)  # not a divisor of a row or the tensor
    sliced = _opt_after_steps(fmt, 2, (96, 80), steps=3)
    for pa, pb in zip(whole[0], sliced[0]):
        assert torch.equal(pa, pb)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(whole[1].state[pa][k].view(torch.uint8),
                               sliced[1].state[pb][k].view(torch.uint8))
