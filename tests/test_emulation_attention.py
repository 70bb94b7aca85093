"""The chunked emulated attention (emulation/attention.py) against the generic path (the
model's own eager attention function with its two matmuls routed through the emulated GEMM)."""

from __future__ import annotations

import math

import pytest
import torch
from precisim.emulation import Recipe, emulate, get_recipe
from precisim.emulation import attention as attn_mod
from precisim.emulation import gemm as gemm_mod
from precisim.emulation import patch as patch_mod
from precisim.emulation.attention import _key_ends, chunkable, is_standard_eager

transformers = pytest.importorskip("transformers")


def _model(arch: str, dtype: torch.dtype = torch.float32):
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg = (transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config)(**kw)
    torch.manual_seed(0)
    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    return cls(cfg).eval().to(dtype)


IDS = torch.randint(0, 96, (2, 150), generator=torch.Generator().manual_seed(3))

RECIPES = {
    "mxfp8": get_recipe("mxfp8"),
    "nvfp4": get_recipe("nvfp4"),
    "bf16": get_recipe("bf16"),
    "e3m2-elementwise": Recipe.from_dict({"name": "e", "attention": {"qk": "e4m3",
                                                                     "pv": "e3m2"}}),
    "group16-int8": Recipe.from_dict({"name": "g", "attention": {
        "qk": "e4m3", "pv": {"input": {"format": "int8", "scaling": "group:16",
                                       "scale_rule": "amax"}, "weight": "e4m3"}}}),
    "per-token-p": Recipe.from_dict({"name": "t", "attention": {
        "qk": "mxfp8", "pv": {"input": {"format": "e4m3", "scaling": "token"},
                              "weight": "mxfp8"}}}),
}


def _run(model, recipe, *, generic: bool, mp: pytest.MonkeyPatch, mask=None, ids=IDS,
         record: dict | None = None, chunk_rows: int = 16):
    """Logits, chunked-attention calls and telemetry records; ``record`` collects the
    quantized operands of the first layer's attention matmuls and that attention's output."""
    calls = []
    real = patch_mod.chunked_attention
    real_q = attn_mod.quantize_operand
    real_attn = patch_mod._precisim_attention
    first = "model.layers.0.self_attn"

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def quantizing(x, spec, **kw):
        out = real_q(x, spec, **kw)
        if record is not None and kw.get("where", ("",))[0].startswith(first + "."):
            record.setdefault(kw["where"], []).append(out.values)
        return out

    def attending(module, *a, **k):
        out = real_attn(module, *a, **k)
        if record is not None and "out" not in record:
            record["out"] = out[0]
        return out

    with mp.context() as m:
        # default: small chunks (16 rows), many of them
        m.setattr(attn_mod, "CHUNK_ROWS", chunk_rows)
        m.setattr(patch_mod, "chunked_attention", counting)
        m.setattr(attn_mod, "quantize_operand", quantizing)
        m.setattr(gemm_mod, "quantize_operand", quantizing)
        m.setattr(patch_mod, "_precisim_attention", attending)
        if generic:
            m.setattr(patch_mod, "chunkable", lambda spec: None)
        with torch.no_grad(), emulate(model, recipe) as em:
            out = model(ids, attention_mask=mask, use_cache=False).logits
    return out, len(calls), em.telemetry.records()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_chunked_attention_equals_the_generic_path(arch: str, name: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked path quantizes exactly the operands the generic path quantizes (the same
    scores, the same P and its scale blocks, the same telemetry events); its two fp32 matmuls
    are the generic path's sums restricted to the visible keys, computed by the BLAS library
    on smaller shapes. The library may order a dot product's additions by the shape (MKL on
    AVX-512 does for the 6-row tail of a 150-row product), so the first layer's attention
    output is checked against the bound of fp32 summation in any order, 2 * gamma_K *
    (|P| @ |V|) with gamma_K = K u / (1 - K u), u = 2^-24."""
    model = _model(arch)
    rec_fast: dict = {}
    rec_slow: dict = {}
    fast, n_fast, tel = _run(model, RECIPES[name], generic=False, mp=monkeypatch,
                             record=rec_fast)
    slow, n_slow, tel_slow = _run(model, RECIPES[name], generic=True, mp=monkeypatch,
                                  record=rec_slow)
    assert n_fast == 2 and n_slow == 0  # one call per layer, and the generic path did not use it
    first = "model.layers.0.self_attn"
    for role in (("qk", "input"), ("qk", "weight"), ("pv", "weight")):
        where = (f"{first}.{role[0]}", role[1])
        a, b = rec_fast[where][0], rec_slow[where][0]
        if a.shape[1] != b.shape[1]:  # GQA: k and v quantized once per kv head, then repeated
            assert role[1] == "weight" and b.shape[1] % a.shape[1] == 0
            a = attn_mod.repeat_kv(a, b.shape[1] // a.shape[1])
        assert torch.equal(a.reshape(-1), b.reshape(-1)), where
    # P: every chunk's quantized block equals the same block of the generic path's P
    p_full = rec_slow[(f"{first}.pv", "input")][0]
    r0 = 0
    for p in rec_fast[(f"{first}.pv", "input")]:
        rows, ke = p.shape[-2], p.shape[-1]
        assert torch.equal(p, p_full[..., r0:r0 + rows, :ke])
        assert not bool(p_full[..., r0:r0 + rows, ke:].any())  # skipped keys: exact zeros
        r0 += rows
    assert r0 == p_full.shape[-2]
    # the first layer's output: within the fp32 summation bound of the generic one
    v = rec_slow[(f"{first}.pv", "weight")][0].transpose(-1, -2).double()
    K = v.shape[-2]
    u = 2.0 ** -24
    bound = 2 * (K * u / (1 - K * u)) * (p_full.double().abs() @ v.abs())
    out_fast, out_slow = rec_fast["out"].double(), rec_slow["out"].double()
    assert bool(((out_fast - out_slow).abs() <= bound.transpose(1, 2)).all())
    # the same quantization events, role by role
    assert _counts(tel) == _counts(tel_slow)
    # the end result is the same model computation, up to that summation order
    torch.testing.assert_close(fast, slow, rtol=1e-3, atol=1e-3)
    # the reference is not trivially equal: the attention formats change the logits
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
    assert not torch.equal(fast, ref)
    roles = {(r["module"].rsplit(".", 1)[-1], r["role"]) for r in tel}
    assert {("qk", "input"), ("qk", "weight"), ("pv", "input"), ("pv", "weight")} <= roles


def test_chunked_softmax_rows_of_any_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 23 rows see 23, 46, ... of 150 keys: the softmax runs over them padded with
    -inf to whole vectors (32, 64, 96, ...; attention.softmax_row_length), so P is
    bit-identical to the generic path's full-row softmax."""
    model = _model("llama")
    recs: list[dict] = [{}, {}]
    for rec, generic in zip(recs, (False, True)):
        _run(model, RECIPES["e3m2-elementwise"], generic=generic, mp=monkeypatch, record=rec,
             chunk_rows=23)
    where = ("model.layers.0.self_attn.pv", "input")
    p_full = recs[1][where][0]
    r0 = 0
    for p in recs[0][where]:
        assert p.shape[-2] == min(23, 150 - r0)
        assert torch.equal(p, p_full[..., r0:r0 + p.shape[-2], :p.shape[-1]])
        r0 += p.shape[-2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_row_length_keeps_every_probability(dtype: torch.dtype) -> None:
    """The property the chunked path relies on (attention.softmax_row_length): torch's softmax
    over the visible keys padded with -inf to whole vectors equals, bit for bit, its softmax
    over the full row, for visible lengths below one vector, at vector boundaries and in
    between, and rows of every length up to 4096 keys. A torch whose CPU softmax reduces in
    another order fails here."""
    from precisim.emulation.attention import SOFTMAX_ROW_ALIGN, softmax_row_length

    torch.manual_seed(0)
    for n_k in (64, 150, 1024, 4096):
        for ke in (*range(1, 40), 63, 64, 65, 127, 128, 129, 500, 1000, 2049, n_k - 1):
            if ke > n_k:
                continue
            s = (torch.randn(3, 5, ke) * 6).to(dtype)
            full = torch.nn.functional.pad(s, (0, n_k - ke), value=-math.inf)
            kp = softmax_row_length(ke, n_k)
            assert ke <= kp <= n_k and (kp == n_k or kp % SOFTMAX_ROW_ALIGN == 0)
            want = torch.softmax(full, dim=-1, dtype=torch.float32)[..., :ke]
            got = torch.softmax(full[..., :kp], dim=-1, dtype=torch.float32)[..., :ke]
            assert torch.equal(got, want), (n_k, ke, dtype)


def test_chunked_softmax_of_short_visible_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose visible keys end before 16 (a mask hiding every later key): ATen reduces
    rows shorter than 16 in another order than the same values in a longer row, so the
    chunked path pads them with -inf to whole vectors (here the whole row) and gets the
    generic path's P bit for bit."""
    from precisim.emulation.attention import KeyEnds, chunked_attention

    torch.manual_seed(0)
    b, h, n, d = 1, 4, 64, 8
    q, k, v = (torch.randn(b, h, n, d) * 3 for _ in range(3))
    mask = torch.zeros(b, 1, n, n)
    mask[..., 10:] = torch.finfo(torch.float32).min  # keys 10.. hidden from every query
    # P kept in fp32 (every last-bit difference shows)
    spec = Recipe.from_dict({"name": "p32", "attention": {"qk": "e4m3", "pv": {
        "input": "fp32", "weight": "e4m3"}}}).attention
    seen: list = []
    real_q = attn_mod.quantize_operand

    def quantizing(x, s, **kw):
        out = real_q(x, s, **kw)
        if kw.get("where", ("", ""))[1] == "input" and kw["where"][0].endswith(".pv"):
            seen.append(out.values)
        return out

    monkeypatch.setattr(attn_mod, "quantize_operand", quantizing)
    module = torch.nn.Module()
    chunked_attention(module, q, k, v, mask, 0.25, spec, 1, name="a", telemetry=None,
                      key_ends=KeyEnds())
    from precisim.emulation.gemm import quantize_operand

    qq = quantize_operand(q, spec.qk.input).values
    kq = quantize_operand(k, spec.qk.weight).values
    p_full = torch.softmax((qq @ kq.transpose(-1, -2)) * 0.25 + mask, dim=-1)
    p_q = quantize_operand(p_full, spec.pv.input).values
    r0 = 0
    for p in seen:
        assert p.shape[-1] == 10
        assert torch.equal(p, p_q[..., r0:r0 + p.shape[-2], :10])
        r0 += p.shape[-2]
    assert r0 == n


def _counts(records: list[dict]) -> dict:
    out: dict = {}
    for r in records:
        if r["module"].startswith("model.layers.0."):
            key = (r["module"], r["role"])
            # (P's numel differs: the skipped keys are never quantized)
            out[key] = tuple(r[c] for c in ("saturated", "flushed", "nonfinite"))
    return out


def test_chunked_attention_with_left_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Padded rows are fully masked (uniform softmax over every key): those chunks keep every
    key, the others still skip the masked triangle; same result as the generic path."""
    model = _model("llama")
    mask = torch.ones_like(IDS)
    mask[1, :37] = 0
    fast, n, _ = _run(model, get_recipe("mxfp8"), generic=False, mp=monkeypatch, mask=mask)
    slow, _, _ = _run(model, get_recipe("mxfp8"), generic=True, mp=monkeypatch, mask=mask)
    assert n == 2
    assert torch.equal(fast, slow)


def test_half_precision_chunked_equals_generic(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("llama", torch.bfloat16)
    fast, n, _ = _run(model, get_recipe("mxfp8"), generic=False, mp=monkeypatch)
    slow, _, _ = _run(model, get_recipe("mxfp8"), generic=True, mp=monkeypatch)
    assert n == 2 and fast.dtype == torch.bfloat16
    assert torch.equal(fast, slow)


def test_key_ends_skip_the_causal_triangle() -> None:
    n = 100
    causal = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
    assert _key_ends(causal, n, n, 16, 32) == [(e,) for e in (32, 32, 64, 64, 96, 96, 100)]
    assert _key_ends(causal, n, n, 16, 1) == [(e,) for e in (16, 32, 48, 64, 80, 96, 100)]
    assert _key_ends(None, n, n, 16, 32) == [(n,)] * 7
    fully_masked = causal.clone()
    fully_masked[..., 20, :] = torch.finfo(torch.float32).min
    assert _key_ends(fully_masked, n, n, 16, 1)[1] == (n,)
    # per batch element: one sequence's padding leaves the other's keys alone
    both = torch.cat([causal, fully_masked])
    assert _key_ends(both, n, n, 16, 1)[1] == (32, n)
    assert _key_ends(both, n, n, 16, 1)[0] == (16, 16)


def test_when_the_chunked_path_does_not_apply() -> None:
    # P per-tensor scaled (its amax spans every row), stochastic rounding, a matrix unit
    assert chunkable(get_recipe("fp8-e4m3").attention) is None
    sr = Recipe.from_dict({"name": "sr", "attention": {
        "qk": "e4m3", "pv": {"input": {"format": "e4m3", "rounding": "sr", "sr_bits": 8,
                                       "seed": 0}, "weight": "e4m3"}}})
    assert chunkable(sr.attention) is None
    unit = Recipe.from_dict({"name": "u", "attention": {
        "qk": {"input": "e4m3", "weight": "e4m3", "unit": "h100-e4m3"},
        "pv": {"input": "e4m3", "weight": "e4m3", "unit": "h100-e4m3"}}})
    assert chunkable(unit.attention) is None
    assert chunkable(get_recipe("mxfp8").attention) == 32
    assert chunkable(get_recipe("bf16").attention) == 1
    from transformers.models.gpt2 import modeling_gpt2
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    assert is_standard_eager(modeling_llama.eager_attention_forward)
    assert is_standard_eager(modeling_qwen2.eager_attention_forward)
    assert not is_standard_eager(modeling_gpt2.eager_attention_forward)


def test_generate_with_a_kv_cache_chunked_equals_generic(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Prefill and one-token decode steps (a growing cache, a (1, k) mask) agree too."""
    model = _model("llama")
    r = Recipe.from_dict({"name": "kv", "linear": "mxfp8", "attention": {
        "qk": "mxfp8", "pv": "mxfp8", "kv_cache": "e4m3"}})
    outs = []
    for generic in (False, True):
        with monkeypatch.context() as m:
            m.setattr(attn_mod, "CHUNK_ROWS", 16)
            if generic:
                m.setattr(patch_mod, "chunkable", lambda spec: None)
            with torch.no_grad(), emulate(model, r):
                g = model.generate(IDS[:1, :40], max_new_tokens=8, do_sample=False,
                                   pad_token_id=0, output_logits=True,
                                   return_dict_in_generate=True)
        outs.append(g)
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits):
        assert torch.equal(a, b)


def test_gqa_operands_quantized_before_repeating_only_when_that_is_the_same(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """k and v are quantized once per kv head and then repeated only where the quantization
    treats every head alike (attention._head_local); a stochastic rounding or a block across
    the head axis quantizes the repeated tensor, as the generic path does. Either way the
    values equal quantizing the repeated tensor, and the telemetry counts are the repeated
    tensor's."""
    import dataclasses

    from precisim.emulation.gemm import quantize_operand
    from precisim.emulation.recipe import TensorSpec
    from precisim.emulation.telemetry import Telemetry
    from precisim.formats.scaling import Granularity, get_scaled_format

    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 64) * 4
    x[0, 1, 3, 5] = 1e30  # saturates in e4m3: an event to count
    for spec, local in ((TensorSpec("mxfp8"), True), (TensorSpec("e4m3"), True),
                        (TensorSpec("e4m3", rounding="sr", seed=3), False)):
        assert attn_mod._head_local(spec) is local
        tel_a, tel_b = Telemetry(), Telemetry()
        got = attn_mod._repeated_operand(x, 3, spec, tel_a, ("m", "weight"))
        want = quantize_operand(attn_mod.repeat_kv(x, 3), spec, telemetry=tel_b,
                                where=("m", "weight")).values
        if local:
            assert torch.equal(got, want)
        assert tel_a.records() == tel_b.records()
    across = dataclasses.replace(get_scaled_format("mxfp8"),
                                 granularity=Granularity(((1, 2), (-1, 32))))
    monkeypatch.setattr(attn_mod, "resolved_format", lambda spec, axis: across)
    assert not attn_mod._head_local(TensorSpec("mxfp8"))


def test_chunked_attention_does_not_depend_on_the_batch(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """A sequence's logits are the same alone and in a batch with other sequences, one of them
    left-padded: the row chunks are a constant number of rows (attention.CHUNK_ROWS) and the
    keys of a chunk are those visible to that batch element (attention._key_ends), so every
    BLAS product, and its summation order, is the same. P is kept in fp32 so that a change of
    order shows: the same sequence under another chunking differs (the check is not vacuous).
    Before, the chunk's rows were a byte budget divided by the batch size, and a chunk holding
    any sequence's padding took every key for every sequence (both fail here: MKL sums the
    second chunk's 256 keys in another order than 640 keys with zeros past the 256th)."""
    kw = dict(vocab_size=96, hidden_size=256, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=640)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    ids = torch.randint(0, 96, (3, 640), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :133] = 0  # fully masked rows in the first two chunks of sequence 1 only
    r = Recipe.from_dict({"name": "p32", "attention": {"qk": "e4m3", "pv": {
        "input": "fp32", "weight": "e4m3"}}})

    def logits(rows: int, n: int) -> torch.Tensor:
        monkeypatch.setattr(attn_mod, "CHUNK_ROWS", rows)
        with torch.no_grad(), emulate(model, r, telemetry=False):
            return model(ids[:n], attention_mask=mask[:n], use_cache=False).logits[0]

    alone = logits(128, 1)
    assert torch.equal(logits(128, 3), alone)
    assert not torch.equal(logits(64, 1), alone)
