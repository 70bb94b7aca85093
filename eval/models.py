"""Transformer shapes for the performance model: a :class:`ModelSpec` read from a Hugging Face
config, and named presets.

A :class:`ModelSpec` holds what the roofline needs: layers, hidden size, attention and
key-value heads, head dimension, MLP width (gated or not), vocabulary, tied embeddings, and
for mixtures of experts the number of experts, experts per token and the expert MLP width.
:meth:`ModelSpec.from_hf_config` reads a ``config.json`` (a path, a directory holding one, a
mapping, or a ``transformers`` config object) and names any field it misses. The presets in
:data:`MODELS` (qualified spelling ``model:<name>``) copy the fields of the public
``config.json`` of each model on the Hugging Face Hub (URL in ``source``).

Module names follow the Llama family (``model.layers.N.self_attn.q_proj``, ...,
``lm_head``): :meth:`ModelSpec.linear_modules` lists them with their shapes, which is how a
recipe's rules are resolved without loading the model. This module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precisim.formats.registry import Registry, UnknownNameError

__all__ = ["MODELS", "LinearModule", "ModelSpec", "ModelSpecError", "UnknownModelError",
           "available_models", "get_model_spec"]


class ModelSpecError(ValueError):
    """A model description that cannot be built (the message names the missing or bad
    field)."""


class UnknownModelError(UnknownNameError, ModelSpecError):
    """An unknown model preset name."""


#: model types whose MLP is not gated (two matrices, not three)
_UNGATED = ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2")

#: HF config keys read for each field, first found wins
_KEYS: dict[str, tuple[str, ...]] = {
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "n_heads": ("num_attention_heads", "n_head"),
    "n_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    "head_dim": ("head_dim",),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim"),
    "vocab": ("vocab_size",),
    "n_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "experts_per_token": ("num_experts_per_tok", "moe_top_k"),
    "expert_intermediate": ("moe_intermediate_size",),
}


@dataclass(frozen=True)
class LinearModule:
    """One linear layer: its module name, op kind (``linear`` or ``lm_head``), its decoder
    layer (None for lm_head), shape (``in_features`` x ``out_features``), whether tensor
    parallelism splits its output (column-parallel) or its input (row-parallel), and how many
    copies (experts) it has."""

    name: str
    op: str
    layer: int | None
    in_features: int
    out_features: int
    column_parallel: bool
    experts: int = 1

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.experts


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer's shape (see the module docstring)."""

    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_embeddings: bool = False
    gated_mlp: bool = True
    n_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        for f in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "intermediate",
                  "vocab"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ModelSpecError(f"model {self.name!r}: {f}={v!r} is not valid: accepted a "
                                     "positive integer")
        if self.n_heads % self.n_kv_heads:
            raise ModelSpecError(f"model {self.name!r}: n_kv_heads={self.n_kv_heads} does not "
                                 f"divide n_heads={self.n_heads}")
        for f in ("n_experts", "experts_per_token"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ModelSpecError(f"model {self.name!r}: {f}={v!r} is not valid: accepted a "
                                     "non-negative integer")
        if self.is_moe and not 1 <= self.experts_per_token <= self.n_experts:
            raise ModelSpecError(f"model {self.name!r}: experts_per_token="
                                 f"{self.experts_per_token} is not valid for n_experts="
                                 f"{self.n_experts}: accepted 1..{self.n_experts}")
        if self.expert_intermediate is None:
            object.__setattr__(self, "expert_intermediate", self.intermediate)

    # -- derived ---------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V) per token: KV heads x head dimension."""
        return self.n_kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.gated_mlp else 2

    def linear_modules(self) -> list[LinearModule]:
        """Every linear layer (Llama-family names), lm_head last."""
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        out: list[LinearModule] = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}"
            out += [LinearModule(f"{p}.self_attn.q_proj", "linear", i, h, q, True),
                    LinearModule(f"{p}.self_attn.k_proj", "linear", i, h, kv, True),
                    LinearModule(f"{p}.self_attn.v_proj", "linear", i, h, kv, True),
                    LinearModule(f"{p}.self_attn.o_proj", "linear", i, q, h, False)]
            e = self.n_experts if self.is_moe else 1
            f = self.expert_intermediate if self.is_moe else self.intermediate
            mlp = f"{p}.block_sparse_moe.experts" if self.is_moe else f"{p}.mlp"
            if self.is_moe:
                out.append(LinearModule(f"{p}.block_sparse_moe.gate", "linear", i, h,
                                        self.n_experts, True))
            if self.gated_mlp:
                out.append(LinearModule(f"{mlp}.gate_proj", "linear", i, h, f, True, e))
            out += [LinearModule(f"{mlp}.up_proj", "linear", i, h, f, True, e),
                    LinearModule(f"{mlp}.down_proj", "linear", i, f, h, False, e)]
        out.append(LinearModule("lm_head", "lm_head", None, h, self.vocab, True))
        return out

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """Every weight: the linear layers, the embedding (once when tied) and the norms."""
        lin = sum(m.params for m in self.linear_modules())
        if self.tie_embeddings:
            lin -= self.vocab * self.hidden  # lm_head shares the embedding
        norms = (2 * self.n_layers + 1) * self.hidden
        return lin + self.embedding_params + norms

    @property
    def active_params(self) -> int:
        """Weights a token uses (MoE: experts_per_token of the experts)."""
        if not self.is_moe:
            return self.params
        per_expert = self.mlp_matrices * self.hidden * self.expert_intermediate
        return self.params - self.n_layers * per_expert * (self.n_experts -
                                                           self.experts_per_token)

    def summary(self) -> str:
        moe = (f", {self.n_experts} experts (top {self.experts_per_token}, width "
               f"{self.expert_intermediate})" if self.is_moe else "")
        return (f"{self.name}: {self.params / 1e9:.3g}B parameters, {self.n_layers} layers, "
                f"hidden {self.hidden}, {self.n_heads} heads / {self.n_kv_heads} KV heads of "
                f"{self.head_dim}, MLP {self.intermediate}"
                f"{' gated' if self.gated_mlp else ''}, vocabulary {self.vocab}"
                f"{', tied embeddings' if self.tie_embeddings else ''}{moe}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """From this class's own fields (``to_dict``)."""
        names = [f.name for f in dataclasses.fields(cls)]
        bad = [k for k in d if k not in names]
        if bad:
            raise ModelSpecError(f"model spec: unknown key(s) {', '.join(map(repr, bad))}; "
                                 f"accepted: {', '.join(names)}")
        try:
            return cls(**dict(d))
        except TypeError as e:
            raise ModelSpecError(f"model spec: {e}") from None

    @classmethod
    def from_hf_config(cls, config: Any, name: str | None = None) -> ModelSpec:
        """From a Hugging Face config: a mapping, a ``transformers`` config object, a
        ``config.json`` path or a directory holding one. Raises :class:`ModelSpecError`
        naming the first missing field (and the keys it looked for)."""
        where = "config"
        if isinstance(config, str | Path):
            p = Path(config)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise ModelSpecError(f"no Hugging Face config at {str(p)!r}")
            try:
                d = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ModelSpecError(f"{p}: not valid JSON ({e})") from None
            where = f"config {str(p)!r}"
            name = name or p.parent.name
        elif isinstance(config, Mapping):
            d = dict(config)
        elif hasattr(config, "to_dict"):
            d = config.to_dict()
        else:
            raise ModelSpecError(f"expected a Hugging Face config (mapping, config object, "
                                 f"config.json path), got {type(config).__name__}")
        if not isinstance(d, Mapping):
            raise ModelSpecError(f"{where}: expected a JSON object")
        if isinstance(d.get("text_config"), Mapping):  # multimodal wrappers
            d = {**d, **d["text_config"]}

        def get(field: str, required: bool = True) -> Any:
            for k in _KEYS[field]:
                if d.get(k) is not None:
                    return d[k]
            if required:
                raise ModelSpecError(f"{where} is missing {_KEYS[field][0]!r} (the model's "
                                     f"{field.replace('_', ' ')}; also read from: "
                                     f"{', '.join(_KEYS[field][1:]) or 'no other key'})")
            return None

        n_layers, hidden, heads = get("n_layers"), get("hidden"), get("n_heads")
        kv = get("n_kv_heads", False)
        if kv is None:
            kv = 1 if d.get("multi_query") else heads
        head_dim = get("head_dim", False) or (hidden // heads if isinstance(hidden, int)
                                              and isinstance(heads, int) else None)
        n_exp = get("n_experts", False) or 0
        inter = get("intermediate", n_exp <= 1)
        if inter is None:
            inter = 4 * hidden if d.get("model_type") in _UNGATED else get("expert_intermediate")
        mtype = str(d.get("model_type", ""))
        tie = d.get("tie_word_embeddings")
        return cls(name=name or str(d.get("_name_or_path") or mtype or "model"),
                   n_layers=n_layers, hidden=hidden, n_heads=heads, n_kv_heads=kv,
                   head_dim=head_dim, intermediate=inter, vocab=get("vocab"),
                   tie_embeddings=bool(tie) if tie is not None else False,
                   gated_mlp=mtype not in _UNGATED, n_experts=n_exp if n_exp > 1 else 0,
                   experts_per_token=(get("experts_per_token", False) or 0) if n_exp > 1 else 0,
                   expert_intermediate=get("expert_intermediate", False),
                   source=where if where != "config" else "")


def _hub(repo: str) -> str:
    return f"https://huggingface.co/{repo}/blob/main/config.json"


def _presets() -> list[ModelSpec]:
    return [
        ModelSpec("smollm2-135m", 30, 576, 9, 3, 64, 1536, 49152, tie_embeddings=True,
                  source=_hub("HuggingFaceTB/SmolLM2-135M")),
        ModelSpec("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000,
                  source=_hub("meta-llama/Llama-2-7b-hf")),
        ModelSpec("llama-2-13b", 40, 5120, 40, 40, 128, 13824, 32000,
                  source=_hub("meta-llama/Llama-2-13b-hf")),
        ModelSpec("llama-2-70b", 80, 8192, 64, 8, 128, 28672, 32000,
                  source=_hub("meta-llama/Llama-2-70b-hf")),
        ModelSpec("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256,
                  source=_hub("meta-llama/Llama-3.1-8B")),
        ModelSpec("llama-3.1-70b", 80, 8192, 64, 8, 128, 28672, 128256,
                  source=_hub("meta-llama/Llama-3.1-70B") + " (Llama-3.3-70B has the same "
                  "shape)"),
        ModelSpec("mixtral-8x7b", 32, 4096, 32, 8, 128, 14336, 32000, n_experts=8,
                  experts_per_token=2, source=_hub("mistralai/Mixtral-8x7B-v0.1")),
    ]


#: the named model shapes (docs/naming.md; qualified spelling ``model:<name>``)
MODELS: Registry[ModelSpec] = Registry(
    "model shape", prefix="model", error=UnknownModelError,
    hint="or give a Hugging Face config.json (path or directory)")
for _m in _presets():
    MODELS.register(_m.name, _m, aliases=("smollm2",) if _m.name == "smollm2-135m" else
                    ("llama-3.3-70b",) if _m.name == "llama-3.1-70b" else ())


def available_models() -> list[str]:
    """The preset names :func:`get_model_spec` accepts."""
    return MODELS.names()


def get_model_spec(model: str | Path | Mapping[str, Any] | ModelSpec | Any) -> ModelSpec:
    """A :class:`ModelSpec` from a preset name, a ``config.json`` (or its directory), a
    config mapping, a ``transformers`` config or model (its ``config``), or a spec."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str) and not Path(model).exists():
        return MODELS.get(model)
    if hasattr(model, "config") and hasattr(model.config, "to_dict"):
        return ModelSpec.from_hf_config(model.config,
                                        name=getattr(model.config, "_name_or_path", None))
    return ModelSpec.from_hf_config(model)
