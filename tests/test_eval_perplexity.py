"""Perplexity / KL / top-1 evaluation, spec sheets, vendor tables and the eval CLI (tiny models)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from precisim.eval.data import DataError, load_text, tokenize
from precisim.eval.perplexity import evaluate, rolling_windows
from precisim.eval.spec import EvalConfig, compare_metrics, run_eval, vendor_rows, write_outputs

transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


class CharTokenizer:
    """A byte-level stand-in for a Hugging Face tokenizer (ids 3..63)."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text: str, add_special_tokens: bool = False):
        return {"input_ids": [3 + (b % 61) for b in text.encode()]}


TEXT = ("The quick brown fox jumps over the lazy dog. " * 40
        + "Pack my box with five dozen liquor jugs. " * 40)


@pytest.fixture(scope="module")
def model():
    return _llama()


@pytest.fixture()
def textfile(tmp_path):
    p = tmp_path / "wiki.test.raw"
    p.write_text(TEXT)
    return p


@pytest.mark.parametrize("n, window, stride", [(10, 4, 4), (10, 4, 2), (7, 8, None), (9, 3, 1),
                                               (1, 1, 1)])
def test_rolling_windows_predict_every_token_once(n, window, stride) -> None:
    wins = rolling_windows(n, window, stride)
    predicted = [j for w in wins for j in range(w.pred_start, w.end + 1)]
    assert predicted == list(range(1, n + 1))
    for w in wins:
        assert w.end - w.start <= window and w.start < w.pred_start <= w.end + 1
        # each window sees as much context as the window allows
        assert w.start == max(0, w.end - window)


def test_rolling_windows_lm_eval_semantics() -> None:
    # stride = window: disjoint windows, first input is [prefix, t0, ..., t_{W-2}]
    wins = rolling_windows(8, 4)
    assert [(w.start, w.end, w.pred_start) for w in wins] == [(0, 4, 1), (4, 8, 5)]
    with pytest.raises(ValueError, match="stride"):
        rolling_windows(8, 4, 5)
    with pytest.raises(ValueError, match="no tokens"):
        rolling_windows(0, 4)


@pytest.mark.parametrize("window, stride", [(64, None), (64, 16)])
def test_perplexity_matches_a_direct_computation(model, window, stride) -> None:
    toks = CharTokenizer()(TEXT[:300])["input_ids"]
    res = evaluate(model, toks, [], window=window, stride=stride, prefix_token=1)
    # direct: a loop of forward passes and cross-entropy over the same windows
    seq = torch.tensor([1] + toks)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in rolling_windows(len(toks), window, stride):
            logits = model(seq[w.start:w.end][None]).logits[0]
            k = w.pred_start - w.start - 1
            ce = torch.nn.functional.cross_entropy(logits[k:].double(),
                                                   seq[w.pred_start:w.end + 1], reduction="sum")
            nll += float(ce)
            count += w.end + 1 - w.pred_start
    direct = math.exp(nll / count)
    assert count == len(toks) == len(res.ref_nll)
    assert abs(res.ref_ppl - direct) / direct < 1e-6


def test_metrics_of_identity_and_emulated_recipes(model) -> None:
    toks = CharTokenizer()(TEXT[:256])["input_ids"]
    res = evaluate(model, toks, ["fp32", "mxfp4", "bf16"], window=128, bootstrap=200)
    m = {r.recipe.name: r.metrics for r in res.results}
    assert m["fp32"]["delta_ppl"] == 0 and m["fp32"]["kl"] == 0 and m["fp32"]["top1"] == 1
    assert m["mxfp4"]["kl"] > m["bf16"]["kl"] > 0
    for r in ("mxfp4", "bf16"):
        assert m[r]["delta_ppl_low"] <= m[r]["delta_ppl"] <= m[r]["delta_ppl_high"]
        assert 0 <= m[r]["top1_low"] <= m[r]["top1"] <= 1
    assert m["mxfp4"]["saturated_rate"] > 0  # MX FLOOR saturates block maxima
    # the model is left unpatched
    assert not any("Emulated" in type(x).__name__ for x in model.modules())


def test_spec_sheet_reproduces_exactly(model, textfile, tmp_path) -> None:
    tok = CharTokenizer()
    cfg = EvalConfig(model="tiny", data=str(textfile), recipes=("mxfp8", "nvfp4"), tokens=200,
                     window=100, bootstrap=100)
    sheet = run_eval(cfg, model_and_tokenizer=(model, tok))
    again = run_eval(EvalConfig.from_sheet(json.loads(sheet.to_json())),
                     model_and_tokenizer=(model, tok))
    assert again["content_hash"] == sheet["content_hash"]
    assert compare_metrics(sheet, again) == []
    # a changed setting changes the hash and is reported
    other = run_eval(EvalConfig(model="tiny", data=str(textfile), recipes=("mxfp8", "nvfp4"),
                                tokens=150, window=100, bootstrap=100),
                     model_and_tokenizer=(model, tok))
    assert compare_metrics(sheet, other)
    paths = write_outputs(sheet, tmp_path / "out")
    assert set(paths) == {"sheet", "md", "csv", "tex", "html", "pareto"}
    assert EvalConfig.from_sheet(paths["sheet"]).recipes[0]["name"] == "mxfp8"
    md = paths["md"].read_text()
    assert "nvfp4" in md and "E2M1" in md and "e4m3" in md.lower()


def test_vendor_rows_cost_axis(model, textfile) -> None:
    cfg = EvalConfig(model="tiny", data=str(textfile), recipes=("mxfp4", "nvfp4", "bf16"),
                     tokens=64, window=64, bootstrap=0)
    rows = {r["recipe"]: r for r in vendor_rows(run_eval(cfg, model_and_tokenizer=(
        model, CharTokenizer())))}
    assert rows["mxfp4"]["bits_w"] == 4.25 and rows["nvfp4"]["bits_w"] == 4.5
    assert rows["mxfp4"]["mem_w"] == 4.25 / 16 and rows["bf16"]["mem_kv"] == 1.0
    assert "E8M0" in rows["mxfp4"]["scale"].upper() and "floor" in rows["mxfp4"]["scale"]
    assert rows["bf16"]["acc_bits"].startswith("fp32")


def test_data_loading(tmp_path, textfile) -> None:
    t = load_text(textfile)
    assert t.text == TEXT and len(t.sha256) == 64
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "a b"}\n{"text": "c"}\n')
    assert load_text(j).text == "a b\n\nc"
    with pytest.raises(DataError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no text"):
        load_text(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="no column 'body'"):
        load_text(j, column="body")
    with pytest.raises(DataError, match="unknown type"):
        (tmp_path / "x.bin").write_bytes(b"\0")
        load_text(tmp_path / "x.bin")
    assert tokenize(CharTokenizer(), TEXT, 50) == CharTokenizer()(TEXT)["input_ids"][:50]


def test_cli_bad_input_writes_nothing(tmp_path, textfile, capsys) -> None:
    from precisim.eval.cli import main

    out = tmp_path / "out"
    assert main(["eval", "--data", str(tmp_path / "nope.raw"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--data", str(textfile), "--recipes", "mxfp5", "--out",
                 str(out)]) == 2
    assert "unknown recipe 'mxfp5'" in capsys.readouterr().err
    assert main(["eval", "--data", str(textfile), "--model", str(tmp_path / "no-model"),
                 "--recipes", "bf16", "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--spec", str(tmp_path / "sheet.json"), "--out", str(out)]) == 2
    assert not out.exists()


def test_layer_errors_and_sensitivity(model) -> None:
    from precisim.eval.layers import layer_errors, module_groups, sensitivity

    toks = CharTokenizer()(TEXT[:128])["input_ids"]
    e4 = {r["op"]: r for r in layer_errors(model, toks, "mxfp4", window=64)}
    e8 = {r["op"]: r for r in layer_errors(model, toks, "mxfp8", window=64)}
    assert "model.layers.0.self_attn.qk" in e4 and "model.layers.1.mlp.down_proj" in e4
    assert set(e4) == set(e8)
    for op in e4:
        assert e4[op]["sqnr_db"] > 0 and e4[op]["numel"] > 0
        if not op.endswith((".qk", ".pv")):  # (both recipes run attention in mxfp8)
            # 8-bit blocks are more accurate than 4-bit blocks on every linear layer
            assert e8[op]["sqnr_db"] > e4[op]["sqnr_db"] + 10
    assert set(module_groups(model, "mxfp4")) == {"model.layers.0", "model.layers.1"}
    rows = sensitivity(model, toks, "mxfp4", window=64)
    assert [r["group"] for r in rows] and len(rows) == 2
    assert rows[0]["delta_ppl"] >= rows[1]["delta_ppl"]
    assert all(r["kl"] > 0 and r["modules"] == 8 for r in rows)
    # reference log-probs computed once and passed in: the same rows, bit for bit
    from precisim.eval.layers import reference_logprobs

    ref = reference_logprobs(model, toks, window=64)
    assert sensitivity(model, toks, "mxfp4", window=64, reference=ref) == rows
    with pytest.raises(ValueError, match="reference has 1 windows"):
        sensitivity(model, toks, "mxfp4", window=64, reference=ref[:1])


def test_spec_sheet_with_a_custom_matrix_unit(model, textfile) -> None:
    """A recipe whose unit is given by its fields (not a preset) reaches the vendor table and
    the spec sheet reproduces it from the recorded fields alone."""
    from precisim.emulation import Recipe

    r = Recipe.from_dict({"name": "fp4-acc13", "linear": {
        "input": "nvfp4", "weight": "nvfp4",
        "unit": {"base": "h100-e4m3", "name": "fp4-acc13-k16", "block_size": 16}}})
    cfg = EvalConfig(model="tiny", data=str(textfile), recipes=(r.to_dict(),), tokens=64,
                     window=64, bootstrap=0)
    sheet = run_eval(cfg, model_and_tokenizer=(model, CharTokenizer()))
    row = vendor_rows(sheet)[0]
    assert "fp4-acc13-k16" in row["unit"] and "k=16" in row["unit"]
    assert "13 fraction bits after alignment" in row["acc_bits"]
    again = EvalConfig.from_sheet(json.loads(sheet.to_json()))
    assert Recipe.from_dict(again.recipes[0]) == r


def test_weight_cache_budget_changes_memory_not_numbers(model) -> None:
    toks = CharTokenizer()(TEXT[:256])["input_ids"]
    kept = evaluate(model, toks, ["mxfp4", "nvfp4"], window=64, bootstrap=0)
    tight = evaluate(model, toks, ["mxfp4", "nvfp4"], window=64, bootstrap=0,
                     weight_cache_bytes=0)
    for a, b in zip(kept.results, tight.results):
        assert np.array_equal(a.nll, b.nll) and np.array_equal(a.kl, b.kl)


def test_spec_sheet_with_softmax_norm_and_activation_units(model, textfile) -> None:
    """A recipe with the op kinds beyond the GEMM (docs/arithmetic.md section 7.8) runs in
    run_eval, the vendor table describes its units, and the sheet reproduces the recipe."""
    from precisim.emulation import Recipe

    r = Recipe.from_dict({"name": "sfu", "linear": "bf16", "softmax": "softmax-bf16",
                          "normalization": {"base": "rmsnorm", "reduction": "bf16"},
                          "activation": "silu-table64"})
    cfg = EvalConfig(model="tiny", data=str(textfile), recipes=(r.to_dict(), "bf16"),
                     tokens=64, window=64, bootstrap=0)
    sheet = run_eval(cfg, model_and_tokenizer=(model, CharTokenizer()))
    rows = {row["recipe"]: row for row in vendor_rows(sheet)}
    cell = rows["sfu"]["datapath"]
    assert "softmax-bf16" in cell and "sum bf16 pairwise" in cell and "silu-lut64" in cell
    assert rows["bf16"]["datapath"] == "model (torch)"
    from precisim.eval.spec import DATAPATH_COLUMN, vendor_columns

    assert DATAPATH_COLUMN in vendor_columns(sheet)  # (only for sheets with such recipes)
    again = EvalConfig.from_sheet(json.loads(sheet.to_json()))
    assert Recipe.from_dict(again.recipes[0]) == r
