"""Training recipes with citations (docs/training.md section 5).

Every preset gives the ``train_linear`` op kind a :class:`~.roles.TrainingSpec`; embeddings,
the lm_head and norms stay in high precision (as the cited recipes do), and so do the attention
matmuls except in ``fp8-attention-train`` (the ``train_attention`` op kind, section 1b):

* ``bf16-train``: bf16 operands in all three GEMMs, fp32 accumulation (the usual baseline);
* ``fp8-tensor-train``: FP8 with per-tensor current scaling (amax / max, fp32 scale), E4M3 for
  activations and weights and E5M2 for gradients (the "hybrid" format of Micikevicius et al.,
  "FP8 Formats for Deep Learning", arXiv 2209.05433; TransformerEngine's default);
* ``mxfp8-floor-train`` / ``mxfp8-ceil-train``: MXFP8 E4M3 for every operand of every GEMM,
  32-element blocks along each GEMM's reduction axis, E8M0 scale from the OCP MX v1.0 FLOOR
  rule or rounded up (arXiv 2506.08027, "Recipes for Pre-training LLMs with MXFP8", reports
  divergence with the former and fixes it with the latter);
* ``nvfp4-train``: NVFP4 pretraining (arXiv 2509.25149): 16x16 2-D weight blocks (the same
  quantized weight in forward and dgrad), 1x16 blocks elsewhere, stochastic rounding of the
  gradients dy, a 16x16 random Hadamard transform on the wgrad inputs; the last layers in
  high precision through rules (:func:`nvfp4_recipe` with ``hp_last``);
* ``deepseek-fp8-train``: DeepSeek-V3 FP8 (arXiv 2412.19437, section 3.3): E4M3 everywhere,
  activations and gradients in 1x128 tiles along each reduction axis, weights in 128x128
  blocks, on the H100 FP8 unit with promotion to fp32 every 128 products;
* ``fp8-attention-train``: ``fp8-tensor-train`` plus the attention matmuls in FP8 with
  per-tensor current scaling (:func:`fp8_attention_recipe`): the forward QK^T and PV with E4M3
  operands (FP8 attention forward as in FlashAttention-3, arXiv 2407.08608) and the four
  backward GEMMs (dq, dk, dp, dv) with the hybrid formats of arXiv 2209.05433 applied to them:
  E4M3 for Q, K, V and P, E5M2 for the gradients dO and dS. Not a published recipe: an
  extension of the per-tensor FP8 recipe to the attention, to ask whether it still trains.
"""

from __future__ import annotations

from precisim.formats import get_format
from precisim.formats.scaling import (
    SCALED_FORMATS,
    Granularity,
    ScaledFormat,
    ScaleRule,
)

from ..recipe import RECIPES, Recipe, Rule
from ..specs import AttentionSpec, GemmSpec, TensorSpec
from .attention import AttentionTrainingSpec
from .hadamard import HadamardSpec
from .roles import TrainingSpec

__all__ = ["fp8_attention_spec", "fp8_attention_recipe", "mxfp8_recipe", "nvfp4_recipe",
           "training_recipes"]


def _nvfp4_16x16(rule: ScaleRule | None, axis: int) -> ScaledFormat:
    """NVFP4 with 16x16 2-D blocks (E2M1 elements, E4M3 block scales, fp32 tensor scale)."""
    return ScaledFormat("nvfp4_16x16", get_format("e2m1"), Granularity.tile(16, 16),
                        get_format("e4m3"), ScaleRule.AMAX, tensor_scale=True)


if "nvfp4_16x16" not in SCALED_FORMATS.names():
    SCALED_FORMATS.register("nvfp4_16x16", _nvfp4_16x16)


def _g(a: TensorSpec | str, b: TensorSpec | str, unit: str | None = None) -> GemmSpec:
    ta = a if isinstance(a, TensorSpec) else TensorSpec(a)
    tb = b if isinstance(b, TensorSpec) else TensorSpec(b)
    return GemmSpec(ta, tb, unit=unit)


def mxfp8_recipe(rule: str = "floor") -> Recipe:
    """MXFP8 (E4M3) in every operand of the three GEMMs with scale ``rule``."""
    t = TensorSpec("mxfp8", scale_rule=rule)
    return Recipe(f"mxfp8-{rule}-train", train_linear=TrainingSpec(_g(t, t), _g(t, t), _g(t, t)),
                  description=f"MXFP8 E4M3 for every GEMM operand in training, E8M0 scale rule "
                  f"{rule} (arXiv 2506.08027)")


def nvfp4_recipe(*, sr: bool = True, rht: bool = True, hp_last: int = 0,
                 n_layers: int | None = None, layer_glob: str = "model.layers.{i}.*") -> Recipe:
    """The NVFP4 pretraining recipe (arXiv 2509.25149); ``sr``/``rht`` switch its stochastic
    rounding of gradients and its wgrad Hadamard transform; ``hp_last`` keeps the last
    ``hp_last`` of ``n_layers`` blocks (modules matching ``layer_glob``) in high precision."""
    act = TensorSpec("nvfp4")
    w2d = TensorSpec("nvfp4_16x16")
    grad = TensorSpec("nvfp4", rounding="sr") if sr else act
    spec = TrainingSpec(_g(act, w2d), _g(grad, w2d), _g(grad, act),
                        HadamardSpec(16, ("wgrad",)) if rht else None)
    rules = []
    if hp_last:
        if n_layers is None:
            raise ValueError("nvfp4_recipe: hp_last needs n_layers (the model's block count)")
        rules = [Rule(layer_glob.format(i=i), train_linear=None)
                 for i in range(n_layers - hp_last, n_layers)]
    name = "nvfp4-train" + ("" if sr else "-nosr") + ("" if rht else "-norht")
    return Recipe(name, train_linear=spec, rules=rules,
                  description="NVFP4 pretraining (arXiv 2509.25149): 16x16 weight blocks, "
                  f"SR on gradients {'on' if sr else 'off'}, 16x16 RHT on wgrad inputs "
                  f"{'on' if rht else 'off'}" + (f", last {hp_last} blocks high precision"
                                                  if hp_last else ""))


def fp8_attention_spec() -> AttentionTrainingSpec:
    """FP8 attention with per-tensor current scaling: E4M3 forward operands; in the backward
    GEMMs (docs/training.md section 1b) E4M3 for Q, K, V and P, E5M2 for dO and dS."""
    e4, e5 = TensorSpec("fp8_tensor"), TensorSpec("fp8_e5m2_tensor")
    return AttentionTrainingSpec(AttentionSpec(qk=_g(e4, e4), pv=_g(e4, e4)),
                                 dq=_g(e5, e4),   # dS (q, k) x K^T (d, k)
                                 dk=_g(e5, e4),   # dS^T (k, q) x Q^T (d, q)
                                 dp=_g(e5, e4),   # dO (q, d) x V (k, d)
                                 dv=_g(e4, e5))   # P^T (k, q) x dO^T (d, q)


def fp8_attention_recipe() -> Recipe:
    """``fp8-tensor-train`` with the attention matmuls (forward and backward) in FP8."""
    e4, e5 = TensorSpec("fp8_tensor"), TensorSpec("fp8_e5m2_tensor")
    return Recipe("fp8-attention-train",
                  train_linear=TrainingSpec(_g(e4, e4), _g(e5, e4), _g(e5, e4)),
                  train_attention=fp8_attention_spec(),
                  description="FP8 per-tensor current scaling in the linear layers and the "
                  "attention matmuls, forward and backward: E4M3 for activations, weights, "
                  "Q, K, V, P; E5M2 for gradients (arXiv 2209.05433, 2407.08608)")


def training_recipes() -> list[Recipe]:
    """The preset training recipes (registered in the recipe registry)."""
    bf = TensorSpec("bf16")
    e4, e5 = TensorSpec("fp8_tensor"), TensorSpec("fp8_e5m2_tensor")
    a128, w128 = TensorSpec("fp8_1x128"), TensorSpec("fp8_128x128")
    ds = "deepseek-fp8"
    return [
        Recipe("bf16-train", train_linear=TrainingSpec(_g(bf, bf), _g(bf, bf), _g(bf, bf)),
               description="bf16 operands in forward, dgrad and wgrad; fp32 accumulation"),
        Recipe("fp8-tensor-train",
               train_linear=TrainingSpec(_g(e4, e4), _g(e5, e4), _g(e5, e4)),
               description="FP8 per-tensor current scaling: E4M3 activations and weights, E5M2 "
                           "gradients (arXiv 2209.05433)"),
        mxfp8_recipe("floor"), mxfp8_recipe("ceil"),
        nvfp4_recipe(), nvfp4_recipe(sr=False), nvfp4_recipe(rht=False),
        nvfp4_recipe(sr=False, rht=False),
        Recipe("deepseek-fp8-train",
               train_linear=TrainingSpec(_g(a128, w128, ds), _g(a128, w128, ds),
                                         _g(a128, a128, ds)),
               description="DeepSeek-V3 FP8 training (arXiv 2412.19437 section 3.3): 1x128 "
                           "activations/gradients, 128x128 weights, promotion every 128"),
        fp8_attention_recipe(),
    ]


for _r in training_recipes():
    if _r.name not in RECIPES.names():
        RECIPES.register(_r.name, _r)
