"""The roofline performance model (precisim.eval.perf), accelerator descriptions
(precisim.eval.accelerators) and model shapes (precisim.eval.models): results equal hand
computations, presets carry their sources and dense figures, bad input names the value, and a
query answers in well under a second."""

from __future__ import annotations

import json
import time

import pytest
from precisim.eval.accelerators import (
    ACCELERATORS,
    Accelerator,
    AcceleratorError,
    UnknownAcceleratorError,
    get_accelerator,
    load_accelerator,
)
from precisim.eval.models import ModelSpec, ModelSpecError, UnknownModelError, get_model_spec
from precisim.eval.perf import (
    MODEL_NOTE,
    GemmNumerics,
    PerfError,
    Precision,
    Workload,
    compute_class,
    format_facts,
    generation,
    max_batch,
    roofline,
)

LLAMA2_7B_CONFIG = {  # meta-llama/Llama-2-7b-hf config.json (the fields the model reads)
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "tie_word_embeddings": False, "vocab_size": 32000,
    "hidden_act": "silu", "max_position_embeddings": 4096,
}


# ---------------------------------------------------------------------------------------------
# accelerators

def test_presets_have_sources_and_dense_figures() -> None:
    assert set(ACCELERATORS.names()) >= {"h100-sxm", "h200", "b200", "mi300x"}
    for name in ACCELERATORS.names():
        a = get_accelerator(name)
        assert a.sources and all(s.url.startswith("https://") and s.date for s in a.sources)
        assert "sparsity" in " ".join(s.note for s in a.sources)  # says how dense was taken
    h100 = get_accelerator("h100")  # alias
    assert h100.name == "h100-sxm"
    # dense = the datasheet's "with sparsity" figure / 2 (H100 SXM: 3,958 and 1,979 TFLOPS)
    assert h100.peak_ops("fp8") == 3958e12 / 2 and h100.peak_ops("bf16") == 1979e12 / 2
    assert h100.bandwidth == 3.35e12 and h100.capacity == 80e9
    h200 = get_accelerator("h200")
    assert h200.peak_ops("fp8") == h100.peak_ops("fp8") and h200.bandwidth == 4.8e12
    b200 = get_accelerator("b200")
    assert b200.peak_ops("fp4") == 9e15 and b200.peak_ops("fp8") == 4.5e15
    assert b200.bandwidth == 8e12 and b200.capacity == 180e9
    mi = get_accelerator("mi300x")
    assert mi.peak_ops("fp8") == 2614.9e12 and mi.capacity == 192e9
    # fallback: no FP4 on Hopper or MI300X, FP4 GEMMs run in FP8
    assert h100.resolve_class("fp4") == "fp8" and mi.resolve_class("fp6") == "fp8"
    assert b200.resolve_class("fp4") == "fp4"
    assert h100.tier(8).name == "nvlink4" and h100.tier(16).name.startswith("infiniband")


def test_unknown_accelerator_and_custom_yaml(tmp_path) -> None:
    with pytest.raises(UnknownAcceleratorError) as e:
        get_accelerator("h300")
    msg = str(e.value)
    assert msg.startswith("unknown accelerator 'h300'; did you mean") and "available:" in msg
    assert isinstance(e.value, AcceleratorError)
    p = tmp_path / "npu.yaml"
    p.write_text("name: npu\npeak_tflops: {fp8: 100, bf16: 50}\n"
                 "memory: [{name: HBM, capacity_gb: 24, bandwidth_gb_s: 1000}]\n"
                 "network: [{name: link, bandwidth_gb_s: 100, latency_us: 2, devices: 4}]\n"
                 "devices_per_node: 4\n"
                 "sources: [{title: t, url: 'https://x', date: '2025'}]\n")
    a = get_accelerator(str(p))
    assert a.peak_ops("fp8") == 100e12 and a.capacity == 24e9 and a.tier(4).latency == 2e-6
    assert Accelerator.from_dict(a.to_dict()) == a
    (tmp_path / "a.json").write_text(json.dumps(a.to_dict()))
    assert load_accelerator(tmp_path / "a.json") == a
    for text, msg in [
        ("name: x\npeak_tflops: {fp9: 1}\nmemory: [{capacity_gb: 1, bandwidth_gb_s: 1}]",
         "unknown compute class 'fp9'"),
        ("name: x\npeak_tflops: {fp8: -1}\nmemory: [{capacity_gb: 1, bandwidth_gb_s: 1}]",
         "peak_tflops.fp8=-1"),
        ("name: x\npeak_tflops: {fp8: 1}", "missing 'memory'"),
        ("name: x\npeak_tflops: {fp8: 1}\nmemory: [{capacity_gb: 1, bandwith_gb_s: 1}]",
         "unknown key.*'bandwith_gb_s'"),
    ]:
        p.write_text(text)
        with pytest.raises(AcceleratorError, match=msg):
            load_accelerator(p)
    with pytest.raises(AcceleratorError, match="has no 'fp4' peak; it has fp8, bf16"):
        a.peak_ops("fp4")


# ---------------------------------------------------------------------------------------------
# models

def test_model_from_hf_config(tmp_path) -> None:
    m = ModelSpec.from_hf_config(LLAMA2_7B_CONFIG, name="llama-2-7b")
    preset = get_model_spec("llama-2-7b")
    assert m.params == preset.params == 6_738_415_616  # the published parameter count
    assert (m.n_layers, m.hidden, m.head_dim, m.kv_dim) == (32, 4096, 128, 4096)
    p = tmp_path / "m"
    p.mkdir()
    (p / "config.json").write_text(json.dumps(LLAMA2_7B_CONFIG))
    assert get_model_spec(str(p)).params == m.params
    for missing in ("num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size"):
        cfg = {k: v for k, v in LLAMA2_7B_CONFIG.items() if k != missing}
        with pytest.raises(ModelSpecError, match=f"missing '{missing}'"):
            ModelSpec.from_hf_config(cfg)
    with pytest.raises(ModelSpecError, match="n_kv_heads=5 does not divide n_heads=32"):
        ModelSpec.from_hf_config({**LLAMA2_7B_CONFIG, "num_key_value_heads": 5})
    with pytest.raises(UnknownModelError, match="unknown model shape 'llama-9'"):
        get_model_spec("llama-9")
    moe = get_model_spec("mixtral-8x7b")
    assert moe.is_moe and 46e9 < moe.params < 47e9 and 12.5e9 < moe.active_params < 13e9
    sm = get_model_spec("smollm2")
    assert sm.tie_embeddings and 134e6 < sm.params < 135e6


def test_model_from_loaded_transformers_config() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**{k: v for k, v in LLAMA2_7B_CONFIG.items()
                                      if k != "architectures"})
    assert ModelSpec.from_hf_config(cfg).params == 6_738_415_616


# ---------------------------------------------------------------------------------------------
# precision

def test_format_facts_and_classes() -> None:
    assert format_facts("nvfp4") == (4.5, "fp4")
    assert format_facts("mxfp8") == (8.25, "fp8")
    assert format_facts("mxfp6") == (6.25, "fp6")
    assert format_facts("bf16") == (16.0, "bf16") and format_facts("fp16")[1] == "fp16"
    assert format_facts("int8")[1] == "int8" and format_facts("int4_group128") == (4.25, "int4")
    assert compute_class("fp4", "bf16") == "bf16"  # weight-only quantization
    assert compute_class("fp4", "fp8") == "fp8" and compute_class("int4", "int8") == "int8"
    assert compute_class("int8", "fp8") == "fp8"
    with pytest.raises(PerfError, match="unknown format 'fp5'"):
        format_facts("fp5")
    p = Precision.from_recipe("nvfp4")
    assert p.linear == GemmNumerics(4.5, 4.5, "fp4", p.linear.label)
    # nvfp4's attention matmuls are MXFP8, and K/V are cached in their format (as
    # Recipe.bits_per_element says)
    assert p.kv_bits == 8.25 and p.attention.compute == "fp8"
    assert Precision.from_recipe("bf16").kv_bits == 16
    assert Precision.from_recipe("deepseek-fp8").linear.w_bits == pytest.approx(8 + 32 / 128 ** 2)


def test_recipe_rules_resolved_per_module() -> None:
    from precisim.emulation import Recipe, Rule, get_recipe

    r = Recipe("mix", linear=get_recipe("mxfp8").linear,
               rules=(Rule("model.layers.1.*", linear=get_recipe("nvfp4").linear),
                      Rule("*.down_proj", linear=None)))
    p = Precision.from_recipe(r, "llama-2-7b")
    names = dict(p.modules)
    assert names["model.layers.1.self_attn.q_proj"].w_bits == 4.5
    assert names["model.layers.5.mlp.down_proj"].w_bits == 16.0
    assert "model.layers.5.self_attn.q_proj" not in names  # the default
    assert len(p.modules) == 6 + 32  # layer 1 (7 modules, down_proj overridden later) + 32
    with pytest.raises(PerfError, match="has rules: give the model"):
        Precision.from_recipe(r)


# ---------------------------------------------------------------------------------------------
# the roofline against hand computations

def test_llama2_7b_decode_batch1_on_h100_is_weight_bytes_over_bandwidth() -> None:
    m = get_model_spec("llama-2-7b")
    r = roofline(m, "h100-sxm", Precision.uniform("bf16"),
                 Workload(batch=1, prefill_tokens=1, context=1))
    weights = (m.params - m.embedding_params - (2 * m.n_layers + 1) * m.hidden) * 2  # bytes
    hand = weights / 3.35e12  # 3.944 ms
    assert r.decode.latency == pytest.approx(hand, rel=2e-3)
    assert r.summary()["decode_bound"] == "memory"
    assert r.decode.tokens_per_s == pytest.approx(1 / r.decode.latency)
    # FP8 weights (lm_head stays bf16): half the bytes of the decoder layers
    r8 = roofline(m, "h100-sxm", Precision.uniform("e4m3"), Workload(1, 1, context=1))
    head = m.vocab * m.hidden * 2
    assert r8.decode.latency == pytest.approx(((weights - head) / 2 + head) / 3.35e12,
                                              rel=3e-3)


def test_prefill_gemm_is_flops_over_peak() -> None:
    r = roofline("llama-2-7b", "h100-sxm", Precision.uniform("bf16"),
                 Workload(batch=1, prefill_tokens=2048))
    op = next(o for o in r.prefill.ops if o.name == "mlp.gate_proj")
    flops = 2 * 2048 * 4096 * 11008
    assert op.flops == flops and op.count == 32 and op.bound == "compute"
    assert op.time == pytest.approx(flops / 989.5e12)
    att = next(o for o in r.prefill.ops if o.kind == "attention")
    assert att.flops == 4 * 32 * 128 * 2048 * 2049 / 2  # QK^T and PV, causal
    kv = next(o for o in r.decode.ops if o.kind == "kv_cache")
    assert kv.bytes == 2049 * 2 * 4096 * 2 and kv.bound == "memory"
    # the same prefill on B200 in FP4 (NVFP4 weights and activations): 9 PFLOPS dense
    rb = roofline("llama-2-7b", "b200", Precision.uniform("nvfp4"),
                  Workload(batch=1, prefill_tokens=2048))
    ob = next(o for o in rb.prefill.ops if o.name == "mlp.gate_proj")
    assert ob.compute == "fp4" and ob.time == pytest.approx(flops / 9e15)
    # ... and on H100, which has no FP4: it runs at the FP8 peak
    rh = roofline("llama-2-7b", "h100", Precision.uniform("nvfp4"),
                  Workload(batch=1, prefill_tokens=2048))
    oh = next(o for o in rh.prefill.ops if o.name == "mlp.gate_proj")
    assert oh.compute == "fp8" and oh.time == pytest.approx(flops / 1979e12)


def test_tensor_parallel_collectives_and_memory() -> None:
    m = get_model_spec("llama-2-70b")
    w = Workload(batch=8, prefill_tokens=1024, context=1024, tp=4)
    r = roofline(m, "h100-sxm", Precision.uniform("e4m3", kv_cache="e4m3"), w)
    ar = next(o for o in r.decode.ops if o.kind == "collective")
    x = 8 * m.hidden * 2  # bytes of one all-reduce
    assert ar.count == 2 * 80 and ar.bound == "network"
    assert ar.time == pytest.approx(2 * 3 / 4 * x / 450e9 + 2 * 3 * 3e-6)
    q = next(o for o in r.decode.ops if o.name == "self_attn.q_proj")
    assert q.flops == 2 * 8 * 8192 * (8192 / 4)  # column-parallel: output split
    mem = r.memory
    kv = 8 * (1024 + 128) * 2 * m.kv_dim * 80 * 1 / 4  # fp8 KV, split over tp
    assert mem.kv_cache == pytest.approx(kv)
    assert mem.fits and mem.total < mem.capacity
    big = roofline(m, "h100-sxm", None, Workload(batch=1, tp=1))
    assert not big.memory.fits  # 70B in bf16 on one 80 GB device
    assert "DOES NOT FIT" in big.table()


def test_bad_parallel_degrees_name_the_values() -> None:
    with pytest.raises(PerfError, match="tp=3 does not divide num_attention_heads=64"):
        roofline("llama-2-70b", "h100", None, Workload(tp=3))
    with pytest.raises(PerfError, match="tp=16 does not divide num_key_value_heads=8"):
        roofline("llama-2-70b", "h100", None, Workload(tp=16))
    with pytest.raises(PerfError, match="pp=3 does not divide num_hidden_layers=80"):
        roofline("llama-2-70b", "h100", None, Workload(pp=3, batch=3))
    with pytest.raises(PerfError, match="batch=3 is not a multiple of pp=2"):
        Workload(batch=3, pp=2)
    with pytest.raises(PerfError, match="workload tp=0"):
        Workload(tp=0)
    with pytest.raises(UnknownAcceleratorError, match="unknown accelerator 'tpu'"):
        roofline("llama-2-7b", "tpu")


def test_pipeline_and_data_parallel() -> None:
    base = roofline("llama-2-7b", "h200", None, Workload(batch=8, prefill_tokens=512))
    pp = roofline("llama-2-7b", "h200", None, Workload(batch=8, prefill_tokens=512, pp=2))
    dp = roofline("llama-2-7b", "h200", None, Workload(batch=8, prefill_tokens=512, dp=2))
    assert dp.decode.tokens_per_s == pytest.approx(2 * base.decode.tokens_per_s)
    assert pp.memory.weights < 0.6 * base.memory.weights
    assert any(o.kind == "collective" for o in pp.decode.ops)


def test_generation_and_max_batch() -> None:
    w = Workload(batch=4, prefill_tokens=128, output_tokens=64)
    g = generation("llama-2-7b", "h100", None, w)
    r0 = roofline("llama-2-7b", "h100", None, w.with_(context=128))
    r1 = roofline("llama-2-7b", "h100", None, w.with_(context=128 + 62))
    assert g.ttft == pytest.approx(r0.prefill.latency)
    assert r0.decode.latency <= g.tpot <= r1.decode.latency
    assert g.output_tokens_per_s == pytest.approx(4 * 64 / (g.ttft + 63 * g.tpot))
    b = max_batch("llama-2-7b", "h100", None, Workload(prefill_tokens=1024, output_tokens=1024))
    fits = roofline("llama-2-7b", "h100", None,
                    Workload(batch=b, prefill_tokens=1024, output_tokens=1024)).memory
    over = roofline("llama-2-7b", "h100", None,
                    Workload(batch=b + 1, prefill_tokens=1024, output_tokens=1024)).memory
    assert fits.fits and not over.fits


def test_report_says_it_is_a_model_and_answers_fast() -> None:
    t0 = time.perf_counter()
    r = roofline("llama-3.1-70b", "b200", Precision.uniform("nvfp4", kv_cache="e4m3"),
                 Workload(batch=64, prefill_tokens=2048, tp=2))
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0
    assert r.note == MODEL_NOTE and MODEL_NOTE in r.table() and r.to_dict()["note"]
    s = r.summary()
    assert s["prefill_bound"] in ("compute", "memory") and s["decode_tokens_per_s"] > 0
    t0 = time.perf_counter()
    generation("mixtral-8x7b", "mi300x", None, Workload(batch=32, prefill_tokens=1024,
                                                        output_tokens=1024, tp=2))
    assert time.perf_counter() - t0 < 1.0


def test_smollm2_config_from_the_loader(smollm2) -> None:
    """The model description of the loaded SmolLM2 (its transformers config) counts exactly the
    loaded model's parameters and matches the preset."""
    model, _ = smollm2
    m = ModelSpec.from_hf_config(model.config)
    assert m.params == sum(p.numel() for p in model.parameters())
    preset = get_model_spec("smollm2")
    assert (m.n_layers, m.hidden, m.n_heads, m.n_kv_heads, m.head_dim, m.vocab) == (
        preset.n_layers, preset.hidden, preset.n_heads, preset.n_kv_heads, preset.head_dim,
        preset.vocab) and m.params == preset.params
