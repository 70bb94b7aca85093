"""precisim.eval.train: a tiny run, its checkpoints and its run-store record."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from precisim.eval.store import RunStore
from precisim.eval.train import ModelConfig, TrainConfig, TrainError, load_tokenizer, train


@pytest.fixture()
def setup(tiny_checkpoint, tiny_text, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(tiny_text)
    tok = load_tokenizer(tiny_checkpoint)
    return tok, str(data), tmp_path


def _cfg(data: str, **kw) -> TrainConfig:
    base = dict(recipe="mxfp8-floor-train", seed=1, steps=6, data=data, batch=2, seq=16,
                val_every=3, val_batches=1, checkpoint_every=3, probe_every=2,
                model=ModelConfig(layers=1, hidden=64, heads=4, kv_heads=2, intermediate=96))
    base.update(kw)
    return TrainConfig(**base)


def test_killed_run_resumes_bit_for_bit(setup):
    tok, data, tmp = setup
    cfg = _cfg(data)
    whole = train(cfg, out=tmp / "a", tokenizer=tok)
    part = train(cfg, out=tmp / "b", tokenizer=tok, stop_after=4)  # killed after step 4
    assert part["steps_done"] == 4
    with RunStore(tmp / "runs.sqlite") as store:
        resumed = train(cfg, out=tmp / "b", tokenizer=tok, store=store)  # resumes at 3
        assert store.has("train/mxfp8-floor-train/seed1")
    assert resumed["loss"] == whole["loss"] and resumed["val"] == whole["val"]
    a = torch.load(Path(tmp / "a" / "ckpt.pt"), weights_only=False)["model"]
    b = torch.load(Path(tmp / "b" / "ckpt.pt"), weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(whole["loss"]) == 6 and len(whole["val"]) == 2
    probe = whole["probe"][0]
    assert 5 < probe["wgrad.sqnr_db"] < 80 and 0 < probe["dgrad.noise_ratio"] < 1


def test_bf16_sr_master_weights_hold_bf16_values(setup):
    tok, data, tmp = setup
    cfg = _cfg(data, recipe="fp32", steps=2, master="bf16-sr", probe_every=0)
    train(cfg, out=tmp / "c", tokenizer=tok)
    sd = torch.load(tmp / "c" / "ckpt.pt", weights_only=False)["model"]
    for v in sd.values():
        assert torch.equal(v.bfloat16().float(), v)


def test_bad_config():
    with pytest.raises(TrainError, match="steps=0"):
        TrainConfig(steps=0)
    with pytest.raises(TrainError, match="master='bf8'"):
        TrainConfig(master="bf8")
    with pytest.raises(TrainError, match="hidden=60 is not a multiple of heads=8"):
        ModelConfig(hidden=60, heads=8)


def test_cli_trains_recipes_and_prints_the_gap(setup, tiny_checkpoint, capsys):
    from precisim.eval.cli import main

    _, data, tmp = setup
    rc = main(["train", "--recipe", "fp32", "--recipe", "nvfp4-train", "--steps", "2",
               "--data", data, "--tokenizer", tiny_checkpoint, "--layers", "1", "--batch",
               "2", "--seq", "16", "--val-every", "2", "--val-batches", "1",
               "--out", str(tmp / "cli")])
    out = capsys.readouterr().out
    assert rc == 0 and "| nvfp4-train |" in out and "gap to fp32" in out
    assert (tmp / "cli" / "nvfp4-train" / "seed0" / "ckpt.pt").exists()
    rc = main(["train", "--recipe", "nope", "--out", str(tmp / "x")])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_vocab_table_keeps_the_most_frequent_training_ids():
    from precisim.eval.train import vocab_table

    ids = torch.tensor([5, 5, 5, 2, 2, 9, 9, 7, 1])
    t = vocab_table(ids, 3, 12)
    # counts: 5->3, 2->2, 9->2 (tie with 2: smaller id first), 7->1, 1->1 (cut)
    assert t[5] == 0 and t[2] == 1 and t[9] == 2
    assert all(int(t[i]) == 3 for i in range(12) if i not in (5, 2, 9))


def test_vocab_option_maps_both_splits_with_training_frequencies(setup):
    from precisim.eval.train import model_vocab, token_splits, vocab_table

    tok, data, tmp = setup
    full_tr, full_va = token_splits(_cfg(data), tok)
    cfg = _cfg(data, vocab=20)
    tr, va = token_splits(cfg, tok)
    table = vocab_table(full_tr, 20, len(tok))
    assert torch.equal(tr, table[full_tr]) and torch.equal(va, table[full_va])
    assert int(tr.max()) <= 20 and model_vocab(cfg, tok) == 21
    rec = train(dataclasses.replace(cfg, steps=2, probe_every=0), out=tmp / "v", tokenizer=tok)
    assert math.isfinite(rec["final_val"])
    with pytest.raises(TrainError, match="vocab=0"):
        TrainConfig(vocab=0)
    with pytest.raises(TrainError, match="vocab=8 with init"):
        TrainConfig(vocab=8, init="x")


def test_seed_gap_is_the_paired_t_interval():
    from fractions import Fraction

    from precisim.eval.train import seed_gap

    base = {0: 3.0, 1: 3.5, 2: 2.5}
    other = {0: 3.25, 1: 3.5, 2: 3.0, 7: 9.0}  # seed 7 has no pair: ignored
    g = seed_gap(base, other)
    d = [Fraction(1, 4), Fraction(0), Fraction(1, 2)]
    mean = sum(d) / 3
    var = sum((x - mean) ** 2 for x in d) / 2  # 1/16
    t975_2 = 4.302652729749464  # Student t, 2 degrees of freedom, 97.5%
    half = t975_2 * math.sqrt(var) / math.sqrt(3)
    assert g.n == 3 and g.estimate == float(mean)
    assert math.isclose(g.low, float(mean) - half, rel_tol=1e-12)
    assert math.isclose(g.high, float(mean) + half, rel_tol=1e-12)
    one = seed_gap({0: 1.0}, {0: 2.0})
    assert one.estimate == 1.0 and one.low == -math.inf and one.high == math.inf
    with pytest.raises(TrainError, match="no common seeds"):
        seed_gap({0: 1.0}, {1: 1.0})


def test_dynamic_loss_scale_skips_overflowing_steps_and_resumes(setup):
    """A scale of 2^127 overflows the scaled loss's gradients to inf/nan: those steps are
    skipped (weights unchanged) and the scale halves until the gradients are finite; with
    bf16 optimizer states and a kill after 3 steps the run resumes bit for bit."""
    tok, data, tmp = setup
    cfg = _cfg(data, recipe="bf16-train", steps=9, probe_every=0, loss_scale=2.0 ** 127,
               dynamic_loss_scale=True, loss_scale_interval=2, optimizer_states="bf16")
    whole = train(cfg, out=tmp / "d", tokenizer=tok)
    sc = whole["scale"]
    assert sc[0] == 2.0 ** 127 and whole["skipped_steps"] >= 1
    # replay the rule on the logged scales: a drop is a skipped (non-finite) step and halves
    # the scale; every 2 finite steps in a row double it
    good, skips = 0, 0
    for a, b in zip(sc, sc[1:]):
        if b < a:
            assert b == a / 2
            good, skips = 0, skips + 1
        else:
            good += 1
            assert b == (2 * a if good == 2 else a)
            good %= 2
    assert sc[1] == sc[0] / 2 and skips in (whole["skipped_steps"], whole["skipped_steps"] - 1)
    assert all(math.isfinite(x) for x in whole["loss"]) and math.isfinite(whole["final_val"])
    part = train(cfg, out=tmp / "e", tokenizer=tok, stop_after=4)
    assert part["steps_done"] == 4
    resumed = train(cfg, out=tmp / "e", tokenizer=tok)  # resumes from the step-3 checkpoint
    assert resumed["loss"] == whole["loss"] and resumed["scale"] == sc
    a = torch.load(tmp / "d" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp / "e" / "ckpt.pt", weights_only=False)
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    m = next(iter(a["optimizer"]["state"].values()))["exp_avg"]
    assert torch.equal(m, m.bfloat16().float())  # the moments are stored in bf16
    with pytest.raises(TrainError, match="optimizer_states='bf8'"):
        TrainConfig(optimizer_states="bf8")


def test_train_kernels_lowers_the_compile_threshold_and_restores_it(monkeypatch):
    from precisim.eval.train import TRAIN_COMPILE_MIN_NUMEL, train_kernels
    from precisim.formats import kernels

    monkeypatch.delenv("PRECISIM_COMPILE_MIN_NUMEL", raising=False)
    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 1 << 18)
    with train_kernels():
        assert kernels.COMPILE_MIN_NUMEL == TRAIN_COMPILE_MIN_NUMEL
    assert kernels.COMPILE_MIN_NUMEL == 1 << 18
    monkeypatch.setenv("PRECISIM_COMPILE_MIN_NUMEL", str(1 << 20))  # explicit: kept
    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 1 << 20)
    with train_kernels():
        assert kernels.COMPILE_MIN_NUMEL == 1 << 20


def test_cli_rejects_an_unknown_optimizer_state_format(tmp_path, capsys):
    from precisim.eval.cli import main

    rc = main(["train", "--recipe", "bf16-train", "--optimizer-states", "bf8", "--out",
               str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "optimizer_states='bf8'" in err and "bf16-sr" in err
