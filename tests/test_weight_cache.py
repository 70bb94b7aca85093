"""The quantized-weight cache shared by emulations (precisim.emulation.WeightCache,
docs/cost-perf.md section 8).

* outputs are bit-identical with and without the shared cache, across recipes and handles,
  for fp32 and bf16 models, and the telemetry each handle records is the same;
* the cache is hit: every (module, spec) is quantized once however many emulations read it
  (counts, not time), including through :func:`precisim.eval.evaluate` and
  :func:`precisim.eval.layers.sensitivity`;
* it is invalidated by an in-place change of a weight and by a replaced parameter, is never
  used for a stochastic rounding without a seed, and holds at most its byte budget (least
  recently used entries dropped), still bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from precisim.emulation import Emulation, Recipe, WeightCache, emulate
from precisim.emulation.weight_cache import operand_bytes

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(3))
RECIPES = ("nvfp4", "mxfp8", "mxfp4")


def _llama(dtype: torch.dtype = torch.float32):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


def _run(model, recipe, cache=None, telemetry=True):
    em = Emulation(model, recipe, weight_cache=cache, telemetry=telemetry, warn=False)
    with torch.no_grad(), em:
        out = model(IDS).logits
    return out, em


def _n_linear(model) -> int:
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1  # not lm_head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_and_each_module_quantized_once(dtype: torch.dtype) -> None:
    model = _llama(dtype)
    plain = {r: _run(model, r)[0] for r in RECIPES}
    cache = WeightCache()
    for _ in range(3):  # three rounds of fresh handles: only the first quantizes
        for r in RECIPES:
            out, em = _run(model, r, cache)
            assert torch.equal(out, plain[r]), r
    n = _n_linear(model)
    assert len(cache.quantizations) == len(RECIPES) * n
    assert set(cache.quantizations.values()) == {1}
    assert cache.misses == len(RECIPES) * n and cache.hits == 2 * len(RECIPES) * n
    assert cache.stats()["max_quantizations"] == 1 and cache.evictions == 0
    assert cache.total_bytes == sum(operand_bytes(e.op) for e in cache._entries.values())


def test_telemetry_is_the_same_from_the_cache() -> None:
    model = _llama()
    _, ref = _run(model, "nvfp4")
    cache = WeightCache()
    _run(model, "nvfp4", cache, telemetry=False)  # fills the cache, records nothing
    _, em = _run(model, "nvfp4", cache)  # reads every weight from it
    assert cache.hits == _n_linear(model)

    def recs(e):
        return [{k: v for k, v in r.items() if "time" not in k} for r in e.telemetry.records()]

    assert recs(em) == recs(ref)


def test_invalidated_by_in_place_change_and_replaced_parameter() -> None:
    model = _llama()
    cache = WeightCache()
    _run(model, "nvfp4", cache)
    up = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        up.weight.mul_(2)  # in place: version counter moves
    out, _ = _run(model, "nvfp4", cache)
    assert torch.equal(out, _run(model, "nvfp4")[0])
    key = ("model.layers.0.mlp.up_proj", "nvfp4")
    assert cache.quantizations[key] == 2
    up.weight = torch.nn.Parameter(up.weight.detach().clone() / 2)  # a new tensor
    out, _ = _run(model, "nvfp4", cache)
    assert torch.equal(out, _run(model, "nvfp4")[0])
    assert cache.quantizations[key] == 3
    assert max(v for k, v in cache.quantizations.items() if k != key) == 1


def test_unseeded_stochastic_rounding_is_not_shared() -> None:
    model = _llama()
    sr = Recipe("sr", linear={"input": "mxfp8", "weight": {"format": "mxfp8",
                                                            "rounding": "stochastic"}})
    seeded = Recipe("sr-seeded", linear={"input": "mxfp8", "weight": {
        "format": "mxfp8", "rounding": "stochastic", "seed": 5}})
    cache = WeightCache()
    _run(model, sr, cache)
    _run(model, sr, cache)
    assert len(cache) == 0 and cache.hits == 0
    a, _ = _run(model, seeded, cache)
    b, _ = _run(model, seeded, cache)
    assert torch.equal(a, b) and cache.hits == _n_linear(model)
    assert torch.equal(a, _run(model, seeded)[0])


def test_bounded_memory_evicts_least_recently_used() -> None:
    model = _llama()
    full = WeightCache()
    _run(model, "nvfp4", full)
    budget = full.total_bytes // 2
    cache = WeightCache(budget)
    plain = _run(model, "nvfp4")[0]
    for _ in range(2):
        out, _ = _run(model, "nvfp4", cache)
        assert torch.equal(out, plain)
        assert cache.total_bytes <= budget
    assert cache.evictions > 0 and 0 < len(cache) < _n_linear(model)
    tiny = WeightCache(0)  # an entry larger than the budget is not stored
    assert tiny.put("x", torch.ones(4), _spec(), False, False, _op(), None) is False
    assert len(tiny) == 0 and tiny.total_bytes == 0


def _spec():
    from precisim.emulation import TensorSpec

    return TensorSpec("e4m3")


def _op():
    from precisim.emulation.gemm import Operand

    return Operand(torch.ones(4))


def test_bad_budget() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"max_bytes={bad!r} is not valid"):
            WeightCache(bad)
    with pytest.raises(ValueError, match="weight_cache=3 is not valid"):
        emulate(_llama(), "nvfp4", weight_cache=3)


def test_evaluate_and_sensitivity_share_the_cache() -> None:
    from precisim.eval import evaluate
    from precisim.eval.layers import sensitivity

    model = _llama()
    ids = IDS[0].tolist() * 3
    kw = dict(window=32, bootstrap=20, telemetry=False, metrics=["kl", "delta_ppl"])
    cache = WeightCache()
    rows = sensitivity(model, ids, "nvfp4", window=32, weight_cache=cache)
    assert cache.misses == _n_linear(model) and cache.hits == 0
    a = evaluate(model, ids, ["nvfp4", "mxfp8"], weight_cache=cache, **kw)
    b = evaluate(model, ids, ["nvfp4", "mxfp8"], weight_cache=cache, **kw)
    c = evaluate(model, ids, ["nvfp4", "mxfp8"], **kw)
    assert set(cache.quantizations.values()) == {1}
    assert cache.hits == 3 * _n_linear(model)  # nvfp4 twice more, mxfp8 once more
    for x, y in ((a, c), (b, c)):
        for rx, ry in zip(x.results, y.results):
            for s in rx.series:
                assert (rx.series[s] == ry.series[s]).all()
    assert rows == sensitivity(model, ids, "nvfp4", window=32)
