"""lm-evaluation-harness adapter: a local multiple-choice task on a tiny random Llama, unpatched
and under MXFP4 (skipped when lm_eval is not installed: `pip install 'precisim[lmeval]'`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from precisim.emulation import RecipeError
from precisim.eval.lmeval import LmEvalError, run_lm_eval

TASK_DIR = Path(__file__).parent / "data" / "lmeval_task"
TASK = "precisim_continuation"

transformers = pytest.importorskip("transformers")


def _need_lm_eval() -> None:
    pytest.importorskip("lm_eval", reason="the lm-eval adapter tests need `pip install lm_eval` "
                        "(or `pip install 'precisim[lmeval]'`)")


@pytest.fixture(scope="module")
def tiny(eager_single_thread):
    """(model, tokenizer): a word-level tokenizer trained on the task's own sentences (no hub)
    and a 2-layer random Llama over its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rows = [json.loads(line) for line in (TASK_DIR / "continuation.jsonl").read_text()
            .splitlines() if line.strip()]
    corpus = [r["context"] + " " + c for r in rows for c in r["choices"]]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>")
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64,
                                   intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval(), tokenizer


@pytest.fixture
def in_task_dir(monkeypatch):
    """The task YAML names its data file relative to the working directory (datasets' rule)."""
    monkeypatch.chdir(TASK_DIR)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_task_unpatched_and_mxfp4(tiny, in_task_dir) -> None:
    _need_lm_eval()
    model, tokenizer = tiny
    ids = torch.arange(2, 20).unsqueeze(0)
    ref = _logits(model, ids)
    modules = [(n, type(m)) for n, m in model.named_modules()]
    params = [(n, id(p)) for n, p in model.named_parameters()]
    impl = model.config._attn_implementation

    base = run_lm_eval(model, tokenizer, None, [TASK], task_paths=[TASK_DIR])
    emu = run_lm_eval(model, tokenizer, "mxfp4", TASK, task_paths=TASK_DIR)

    for out, name in ((base, None), (emu, "mxfp4")):
        assert out["recipe"] == name
        assert out["samples"] == {TASK: 8}
        assert out["num_fewshot"] == {TASK: 0}
        m = out["tasks"][TASK]
        for k in ("acc", "acc_norm"):
            assert isinstance(m[k], float) and 0.0 <= m[k] <= 1.0, (k, m)
            assert isinstance(m[k + "_stderr"], float) and math.isfinite(m[k + "_stderr"])
        assert out["lm_eval_version"]
    assert base["telemetry"] is None
    # emulation was active during the run: the telemetry counted quantized operands
    tel = emu["telemetry"]
    assert tel is not None and tel["numel"] > 0 and tel["blocks"] > 0
    # ... and the model is exactly the unpatched model afterwards
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert [(n, id(p)) for n, p in model.named_parameters()] == params
    assert model.config._attn_implementation == impl
    assert torch.equal(_logits(model, ids), ref)
    # a recipe that emulates nothing quantizes nothing; a fractional limit cuts the examples
    same = run_lm_eval(model, tokenizer, "fp32", TASK, task_paths=TASK_DIR, limit=0.5)
    assert same["samples"] == {TASK: 4} and same["telemetry"]["numel"] == 0


def test_hub_task_fails_fast_with_a_clear_message(tiny, in_task_dir) -> None:
    _need_lm_eval()
    model, tokenizer = tiny
    with pytest.raises(LmEvalError, match=r"'hellaswag'.*builtin_tasks=True"):
        run_lm_eval(model, tokenizer, None, ["hellaswag"], task_paths=TASK_DIR)


def test_bad_input_names_the_value(tiny, tmp_path) -> None:
    model, tokenizer = tiny
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        run_lm_eval(model, tokenizer, None, TASK, task_paths=tmp_path / "no_such_dir")
    with pytest.raises(ValueError, match="tasks"):
        run_lm_eval(model, tokenizer, None, [], task_paths=TASK_DIR)
    with pytest.raises(ValueError, match="limit.*-3"):
        run_lm_eval(model, tokenizer, None, TASK, task_paths=TASK_DIR, limit=-3)
    with pytest.raises(ValueError, match="batch_size.*0"):
        run_lm_eval(model, tokenizer, None, TASK, task_paths=TASK_DIR, batch_size=0)
    with pytest.raises(ValueError, match="task_paths"):
        run_lm_eval(model, tokenizer, None, TASK)
    with pytest.raises(RecipeError, match="nofp3"):
        run_lm_eval(model, tokenizer, "nofp3", TASK, task_paths=TASK_DIR)
    with pytest.raises(TypeError, match="Linear"):
        run_lm_eval(torch.nn.Linear(2, 2), tokenizer, None, TASK, task_paths=TASK_DIR)


def test_missing_lm_eval_names_the_install_command(tiny, monkeypatch) -> None:
    model, tokenizer = tiny
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(ImportError, match=r"pip install lm_eval.*precisim\[lmeval\]"):
        run_lm_eval(model, tokenizer, None, TASK, task_paths=TASK_DIR)
