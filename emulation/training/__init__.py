"""Training under a proposed arithmetic (docs/training.md): per-GEMM training roles
(forward, dgrad, wgrad), replayable stochastic rounding of gradients, random Hadamard
transforms, preset training recipes and optimizer-side numerics.

Importing this package registers the ``train_linear`` and ``train_attention`` op kinds, the
``nvfp4_16x16`` scaled format and the training recipes (``precisim.emulation`` imports it).
"""

from __future__ import annotations

from .attention import ATTN_GEMMS, TRAIN_ATTENTION, AttentionTrainingSpec
from .autograd import GradProbe, LinearGrad, attach_linear_grad
from .hadamard import HadamardSpec, hadamard_matrix, random_hadamard, rht
from .layer import TRAIN_LINEAR, TrainableLinear
from .lowp_optim import LossScaler, LossScaling, LowPrecisionAdamW, StateFormat
from .presets import mxfp8_recipe, nvfp4_recipe, training_recipes
from .roles import GEMMS, TrainingSpec, check_blocks
from .sr import SeedSource, SRSeedError, active_seed, element_bits, key_of, seed_scope

__all__ = [
    "ATTN_GEMMS", "GEMMS", "TRAIN_ATTENTION", "TRAIN_LINEAR", "AttentionTrainingSpec",
    "GradProbe", "HadamardSpec", "LinearGrad", "LossScaler",
    "LossScaling", "LowPrecisionAdamW", "SRSeedError", "StateFormat",
    "SeedSource", "TrainableLinear", "TrainingSpec", "active_seed", "attach_linear_grad",
    "check_blocks", "element_bits", "hadamard_matrix", "key_of", "mxfp8_recipe",
    "nvfp4_recipe", "random_hadamard", "rht", "seed_scope", "training_recipes",
]
