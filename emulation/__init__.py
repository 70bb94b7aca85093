"""precisim.emulation: matrix units (tensor-core datapaths) emulated bit for bit.

    from precisim.emulation import get_unit, matmul
    d = matmul(a, b, "h100-e4m3")            # what an H100 FP8 tensor core returns
    d = matmul(a, b, "deepseek-fp8")         # with promotion to fp32 every 128 products

    with emulate(model, "mxfp4") as em:      # a Hugging Face model under a recipe
        model(ids); print(em.plan, em.telemetry.table())

    rec = load_recording("H100", "E4M3")     # real tensor-core outputs to check a model against

See docs/arithmetic.md section 4 and :mod:`precisim.emulation.matrix_unit` for the model.
"""

from . import functions
from .divergence import divergence, fast_divergence, scaled_fast_divergence
from .loader import LoadError, load_model
from .matmul import available_kernels, explain, matmul, use_kernels
from .matrix_unit import (
    Alignment,
    CMode,
    Drop,
    MatrixUnit,
    chunked,
    kulisch,
    per_add_rounding,
    sequential_fma,
)
from .opkinds import OP_KINDS, Installer, OpKind
from .patch import (
    Emulation,
    EmulationError,
    Plan,
    PlanEntry,
    active_emulation,
    emulate,
    plan,
)
from .presets import available_units, get_unit, unit_from_dict, unit_to_dict
from .recipe import (
    AttentionSpec,
    GemmSpec,
    Recipe,
    RecipeError,
    Rule,
    TensorSpec,
    available_recipes,
    get_recipe,
)
from .recordings import (
    RECORDED_CASES,
    Recording,
    RecordingCase,
    RecordingError,
    available_recordings,
    load_recording,
    recordings_dir,
)
from .reference import dot, exact_dot, scaled_dot
from .scaled import scaled_matmul
from .telemetry import Telemetry
from .weight_cache import WeightCache

__all__ = [
    "functions",
    "AttentionSpec", "Emulation", "EmulationError", "GemmSpec", "Installer", "LoadError",
    "OP_KINDS", "OpKind", "Plan",
    "PlanEntry", "Recipe", "RecipeError", "Rule", "Telemetry", "TensorSpec", "WeightCache",
    "active_emulation", "available_recipes", "emulate", "get_recipe", "load_model", "plan",
    "Alignment", "CMode", "Drop", "MatrixUnit", "available_kernels", "available_units",
    "chunked", "divergence", "dot", "explain", "use_kernels",
    "exact_dot", "fast_divergence", "get_unit", "kulisch", "matmul", "per_add_rounding",
    "scaled_dot", "scaled_fast_divergence", "scaled_matmul", "sequential_fma",
    "unit_from_dict", "unit_to_dict",
    "RECORDED_CASES", "Recording", "RecordingCase", "RecordingError", "available_recordings",
    "load_recording", "recordings_dir",
]

# the attention datapaths (registry kind ``datapath``, docs/attention-datapath.md); training
# roles, the train_linear op kind and the training recipes (docs/training.md)
from . import flash, training  # noqa: E402,F401
