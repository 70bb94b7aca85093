"""precisim: bit-accurate number formats, matrix-unit models and LLM accuracy evaluation for
AI-accelerator co-design.

The package is three layers, each importable on its own (a lower layer never imports a higher
one): :mod:`precisim.formats` (number formats, rounding, block scaling),
:mod:`precisim.emulation` (matrix units, kernels, model patching) and :mod:`precisim.eval`
(accuracy of real checkpoints, spec sheets, the command line). Importing ``precisim`` imports
none of them.
"""

__version__ = "0.2.0"
