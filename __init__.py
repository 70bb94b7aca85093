"""precisim: bit-accurate number formats, matrix-unit models and LLM accuracy evaluation for
AI-accelerator co-design.

The package is three layers, each importable on its own (a lower layer never imports a higher
one): :mod:`precisim.formats` (number formats, rounding, block scaling),
:mod:`precisim.emulation` (matrix units, kernels, model patching) and :mod:`precisim.eval`
(accuracy of real checkpoints, spec sheets, the command line). Importing ``precisim`` imports
none of them; :func:`lookup` resolves a name of any kind (docs/naming.md).
"""

from typing import Any

__version__ = "0.2.0"

__all__ = ["__version__", "lookup"]


def lookup(name: str) -> Any:
    """Any named thing (docs/naming.md): ``kind:name`` (``format:mxint8``, ``scaled:mxint8``,
    ``unit:deepseek-fp8``, ``recipe:deepseek-fp8``, ``kernel:fused-chain``, ``op:linear``,
    ``metric:kl``, ``accelerator:h200``, ``model:llama-2-7b``) or a bare name that only one
    kind uses. Imports every layer's registries first (a bare name several kinds use raises,
    naming the qualified spellings)."""
    import precisim.emulation  # noqa: F401  (units, recipes, kernels, op kinds)
    import precisim.eval.accelerators  # noqa: F401  (the roofline's accelerators)
    import precisim.eval.metrics  # noqa: F401
    import precisim.eval.models  # noqa: F401  (the roofline's model shapes)
    import precisim.formats.scaling  # noqa: F401
    from precisim.formats.registry import lookup as _lookup

    return _lookup(name)
