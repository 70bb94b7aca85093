"""Large checkpoints (docs/reproducibility.md): bf16/fp16 models keep no fp32 copy of their
quantized weights when the values are exact in the model's dtype; the quantized-weight cache
stays within its budget at every moment; models placed or offloaded by accelerate's hooks
(``device_map``, ``cpu_offload``) run under ``emulate()`` with the same logits, and are restored
exactly. The numbers never depend on what was cached."""

from __future__ import annotations

import copy

import pytest
import torch
from precisim.emulation import emulate

transformers = pytest.importorskip("transformers")


def _tiny(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


IDS = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_models_cache_exact_values_in_their_dtype(dtype) -> None:
    m = _tiny(dtype)
    with torch.no_grad():
        with emulate(m, "mxfp8") as em:
            a = m(IDS).logits
            b = m(IDS).logits  # from the cache
        cached = [op.values.dtype for _, op in em._wcache.values()]
        assert cached and set(cached) == {dtype}  # MXFP8 values are exact in bf16/fp16
        elems = sum(m.get_submodule(n).weight.numel() for n in em._wcache)
        assert len(em._wcache) == 14 and em.cache_bytes() == 2 * elems  # no fp32 copy
        with emulate(m, "mxfp8", weight_cache_bytes=0) as none:
            c = m(IDS).logits  # quantized afresh at every forward
        assert none.cache_bytes() == 0
    assert torch.equal(a, b) and torch.equal(a, c)


def test_values_not_exact_in_the_model_dtype_stay_fp32() -> None:
    m = _tiny(torch.bfloat16)
    with torch.no_grad():
        with emulate(m, "nvfp4") as em:
            a = m(IDS).logits
        with emulate(m, "nvfp4", weight_cache_bytes=0):
            b = m(IDS).logits
    for _, op in em._wcache.values():  # whatever was kept, it is the exact quantized value
        assert op.values.dtype in (torch.bfloat16, torch.float32)
    assert torch.equal(a, b)


def test_the_cache_stays_within_its_budget() -> None:
    m = _tiny()
    with torch.no_grad():
        with emulate(m, "mxfp8") as full:
            a = m(IDS).logits
        budget = full.cache_bytes() // 2
        with emulate(m, "mxfp8", weight_cache_bytes=budget) as em:
            b = m(IDS).logits
            assert 0 < em.cache_bytes() <= budget
            c = m(IDS).logits
            assert em.cache_bytes() <= budget
    assert torch.equal(a, b) and torch.equal(a, c)
    for bad in (-1, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match=f"weight_cache_bytes={bad!r} is not valid"):
            emulate(m, "mxfp8", weight_cache_bytes=bad)


def test_evaluate_shares_its_budget_between_recipes() -> None:
    from precisim.eval.perplexity import evaluate

    m = _tiny()
    toks = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    kw = dict(window=16, bootstrap=0, telemetry=False)
    big = evaluate(m, toks, ["mxfp8", "nvfp4"], **kw)
    small = evaluate(m, toks, ["mxfp8", "nvfp4"], weight_cache_bytes=1000, **kw)
    for x, y in zip(big.results, small.results):  # the same numbers, however much was cached
        assert {k: v for k, v in x.metrics.items() if k != "seconds"} == {
            k: v for k, v in y.metrics.items() if k != "seconds"}
    with pytest.raises(ValueError, match="weight_cache_bytes=-5 is not valid"):
        evaluate(m, toks, ["mxfp8"], weight_cache_bytes=-5, **kw)


def test_accelerate_offloaded_model_under_emulation() -> None:
    accelerate = pytest.importorskip("accelerate")
    m = _tiny()
    off = copy.deepcopy(m)
    accelerate.cpu_offload(off, execution_device="cpu")  # weights on 'meta' between forwards
    q = off.model.layers[0].self_attn.q_proj
    assert q.weight.device.type == "meta" and hasattr(q, "_hf_hook")
    with torch.no_grad():
        ref = m(IDS).logits
        with emulate(m, "mxfp8") as em:
            want = m(IDS).logits
        with emulate(off, "mxfp8", errors=True) as em_off:
            got = off(IDS).logits
        assert torch.equal(got, want)
        assert em_off.cache_bytes() == 0  # offloaded weights are not kept quantized
        assert em_off.telemetry.totals() == em.telemetry.totals()
        ops = {r["op"] for r in em_off.errors.records()}  # the original's forward as reference
        assert len(em._wcache) == 14 and ops >= set(em._wcache)
        assert torch.equal(off(IDS).logits, ref)  # restored: the hooks work as before
    assert off.model.layers[0].self_attn.q_proj is q and q.weight.device.type == "meta"
