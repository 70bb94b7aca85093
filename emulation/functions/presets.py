"""Named function units, softmax, normalisation and activation units (docs/naming.md: kinds
``function``, ``softmax``, ``norm``, ``activation``), and their lookups.

The function-unit presets model the conventions in use (docs/arithmetic.md section 7.2):
correctly rounded units; microxcaling's ``vec_use_exp2`` (``exp(x) = exp2(x * LOG2E_BF16)``
with ``LOG2E_BF16 = 1.4453125``, every vector op rounded to bfloat16); a *bound model* of CUDA's
fast ``__expf`` (CUDA C++ Programming Guide, intrinsic functions: maximum error ``2 +
floor(|1.173 x|)`` ulp; ``ex2.approx.ftz``: flushed subnormals); and hardware-plausible
designs: 16- and 64-entry tables with linear interpolation, degree-3 and degree-5
polynomials of exp2 evaluated with FMAs (the FlashAttention-4 approach of emulating exp on FMA
units), and reciprocal / reciprocal-square-root units from a 128-entry bfloat16 seed table and
one or two Newton-Raphson steps.
"""

from __future__ import annotations

from precisim.formats.registry import Registry, UnknownNameError

from .units import FunctionUnit

__all__ = ["ACTIVATION_UNITS", "FUNCTION_UNITS", "NORMS", "SOFTMAXES",
           "UnknownFunctionUnitError", "available_function_units", "get_function_unit"]


class UnknownFunctionUnitError(UnknownNameError):
    """An unknown function-unit name."""


#: the named function units (qualified spelling ``function:<name>``)
FUNCTION_UNITS: Registry[FunctionUnit] = Registry(
    "function unit", prefix="function", error=UnknownFunctionUnitError,
    hint="or give a mapping of FunctionUnit fields (base: <preset> plus changes)")


#: softmax, norm and activation units (filled by :mod:`.datapath`; qualified spellings
#: ``softmax:<name>``, ``norm:<name>``, ``activation:<name>``)
SOFTMAXES: Registry = Registry("softmax unit", prefix="softmax",
                               hint="or give a mapping of Softmax fields")
NORMS: Registry = Registry("norm unit", prefix="norm", hint="or give a mapping of Norm fields")
ACTIVATION_UNITS: Registry = Registry("activation unit", prefix="activation",
                                      hint="or give a mapping of Activation fields")


def _function_presets() -> list[FunctionUnit]:
    U = FunctionUnit
    bf = {"input_format": "bf16", "working_format": "bf16", "output_format": "bf16"}
    seed = {"table_bits": 7, "table_format": "bf16"}
    lut = {"method": "table", "interpolation": "linear"}
    return [
        U("exp-exact", "exp", description="exp correctly rounded to fp32"),
        U("exp2-exact", "exp2", description="exp2 correctly rounded to fp32"),
        U("exp-mx-bf16", "exp", log2e_format="bf16", **bf,
          description="microxcaling vec_exp with vec_use_exp2 on bfloat16 vectors: "
          "t = bf16(x * 1.4453125), exp2(t) rounded to bf16"),
        U("expf-fast-bound", "exp", method="bound", flush_output=True,
          description="bound model (not a bit model) of CUDA __expf: correctly rounded fp32 "
          "exp moved by a hashed number of ulps in [-B, B], B = 2 + floor(1.173|x|); "
          "subnormal results flushed (ex2.approx.ftz)"),
        U("exp-lut64", "exp", table_bits=6, **lut,
          description="exp via exp2: 64-entry fp32 table of 2^f with linear interpolation, "
          "24-bit fixed-point argument, fp32 datapath"),
        U("exp-lut16", "exp", table_bits=4, **lut,
          description="exp via exp2: 16-entry fp32 table of 2^f with linear interpolation"),
        U("exp-poly3", "exp", method="polynomial", degree=3,
          description="exp via exp2: degree-3 polynomial of 2^f on [0, 1) (Chebyshev "
          "interpolant, fp32 coefficients, Horner with fp32 FMAs)"),
        U("exp-poly5", "exp", method="polynomial", degree=5,
          description="exp via exp2: degree-5 polynomial of 2^f on [0, 1), fp32 FMAs"),
        U("rcp-exact", "rcp", description="1/x correctly rounded to fp32"),
        U("rcp-newton1", "rcp", method="newton", newton_steps=1, **seed,
          description="1/x: 128-entry bf16 seed table, one Newton-Raphson step (fp32 FMAs)"),
        U("rcp-newton2", "rcp", method="newton", newton_steps=2, **seed,
          description="1/x: 128-entry bf16 seed table, two Newton-Raphson steps (fp32 FMAs)"),
        U("rsqrt-exact", "rsqrt", description="1/sqrt(x) correctly rounded to fp32"),
        U("rsqrt-newton1", "rsqrt", method="newton", newton_steps=1, **seed,
          description="1/sqrt(x): 128-entry bf16 seed table (exponent parity + 6 bits), one "
          "Newton-Raphson step (fp32 FMAs)"),
        U("rsqrt-newton2", "rsqrt", method="newton", newton_steps=2, **seed,
          description="1/sqrt(x): 128-entry bf16 seed table, two Newton-Raphson steps"),
        U("sigmoid-exact", "sigmoid", description="sigmoid correctly rounded to fp32"),
        U("tanh-exact", "tanh", description="tanh correctly rounded to fp32"),
        U("silu-exact", "silu", description="SiLU correctly rounded to fp32"),
        U("gelu-exact", "gelu", description="GELU (erf form) correctly rounded to fp32"),
        U("gelu-tanh-exact", "gelu_tanh",
          description="GELU (tanh form) correctly rounded to fp32"),
        U("silu-lut64", "silu", table_bits=6, **lut,
          description="SiLU from a 64-entry fp32 table on [-8, 8) with linear interpolation "
          "(0 below, x above)"),
        U("silu-lut16", "silu", table_bits=4, **lut,
          description="SiLU from a 16-entry fp32 table on [-8, 8) with linear interpolation"),
        U("gelu-lut64", "gelu", table_bits=6, **lut,
          description="GELU (erf) from a 64-entry fp32 table on [-8, 8), linear interpolation"),
        U("sigmoid-lut64", "sigmoid", table_bits=6, **lut,
          description="sigmoid from a 64-entry fp32 table on [-8, 8), linear interpolation "
          "(0 below, 1 above)"),
    ]


for _u in _function_presets():
    FUNCTION_UNITS.register(_u.name, _u)


def available_function_units() -> list[str]:
    return FUNCTION_UNITS.names()


def get_function_unit(name: str | FunctionUnit) -> FunctionUnit:
    """A function-unit preset by name, or the unit itself."""
    if isinstance(name, FunctionUnit):
        return name
    if not isinstance(name, str):
        raise TypeError(f"a function unit must be a name or a FunctionUnit, got "
                        f"{type(name).__name__}")
    return FUNCTION_UNITS.get(name)
