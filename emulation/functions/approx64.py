"""Float64 approximations with proven error bounds for the correctly rounded cores
(docs/arithmetic.md section 7.1, "Float64 approximations"): ``exp`` on [-708, 709] and GELU
(erf form). :func:`~precisim.emulation.functions.core.cr_fast` rounds such an approximation
and sends the few values whose error interval holds a rounding boundary to the exact
reference, so an approximation only has to stay within its stated bound; these are cheaper
than the library functions they replace (Sleef's float64 ``exp`` and ``erfc``).

Arithmetic. The polynomials are evaluated by Horner's rule with :func:`fma64`, the fused
multiply-add as ``torch.compile`` builds it (``prims.fma``; inductor emits the vector FMA
instruction): in a compiled kernel and, through a small compiled kernel of its own, eagerly,
so that the eager twin of a compiled kernel computes the same bits. Every bound below counts
two roundings per step, so it also holds where the operation is a product and a sum. u =
2^-53.

**exp** (:func:`exp64`): ``n = round(y / ln 2)`` (the magic-constant rounding), ``r = y - n
L1 - n L2`` (Cody and Waite: ``L1`` is ln 2 to 42 bits, so ``n L1`` is exact for ``|n| <=
1023`` and ``y - n L1`` is exact by Sterbenz's lemma), ``|r| <= 0.3466``, then ``exp(r)`` by a
degree-10 polynomial E and the exact scaling by ``2^n``. Error relative to ``exp(y)``: the fit
of E (below 2^-51.5 = 2.9u, :func:`fit_errors`), Horner's rounding of an alternating sum, at
most ``2k u sum |e_i| |r|^i / E(r) <= 20u e^(2 * 0.3466) < 41u`` for k = 10 steps, and r's own
rounding (at most ``u (|r| + |n L2|)``, relative ``0.35u``): below 45u.

**GELU** (:func:`gelu64`): ``gelu(x) = x Phi(x)`` with ``Phi`` the standard normal
distribution function. With ``t = |x|`` and the upper tail ``Q(t) = erfc(t / sqrt(2)) / 2 =
exp(-t^2 / 2) R(t)``, ``Phi(x) = Q(t)`` for ``x < 0`` and ``1 - Q(t)`` for ``x >= 0``.
``R(t) = Q(t) exp(t^2 / 2)`` (Mills' ratio over ``sqrt(2 pi)``) is smooth and slowly varying,
1/2 at 0 and about ``1 / (t sqrt(2 pi))`` for large t; on ``[0, T]`` (T = 15) it is one
rational function ``P(t) / D(t)`` of degrees 8 and 9 with positive coefficients. Error
relative to ``gelu(x)``: the fit (below 2^-51.9, 2.2u); Horner's rounding of sums of
non-negative terms, ``2k u`` for k steps (16u for P, 18u for D); the quotient u; ``exp(-t^2 /
2)`` 45u, ``t^2 / 2`` being exact for a float32 x (else within ``u t^2 / 2 <= 113u``); the
product, ``1 - q`` (``q <= 1/2 <= 1 - q``, so its relative error is at most q's) and the
product by x, u each. In all below 86u for a float32 x, inside :data:`GELU_GUARD` = 2^-46 =
128u (the correctly rounded cores evaluate it at values of their input format, float32
values; for any float64 x the bound is 199u). Beyond ``|x| = 15`` the value is clamped: ``Q(15) <
2^-166``, so for ``x > 15`` the result is x itself (``1 - Q(x)`` rounds to 1 in float64), and
for ``x < -15`` both the result ``-15 Q(15)`` and ``gelu(x)`` are negative and below 2^-160
in magnitude: every rounding to a format whose values are float32 values (smallest step at
least 2^-149) maps them alike.

The coefficients were fitted by :func:`fit` (linearised least squares with Lawson's
reweighting toward the minimax fit, in mpmath); :func:`main` (``python -c "from
precisim.emulation.functions.approx64 import main; main()"``) prints them again with their
measured errors.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache
from typing import Any

import torch

from ..matmul.floatarith import pow2_64

__all__ = ["EXP_HALF_WIDTH", "GELU_GUARD", "T", "compiled_fma", "exp64", "fit", "fit_errors",
           "fma64", "fma64_fused", "fma_probe_args", "gelu64"]

#: the relative error bound of :func:`gelu64` at float32 values (module docstring)
GELU_GUARD = 2.0 ** -46
#: the end of the GELU ratio's fitted interval and the clamp of |x|
T = 15.0
#: the half-width of exp's reduced interval (ln(2) / 2 = 0.34657..., with room for the
#: rounding of ``y / ln 2``)
EXP_HALF_WIDTH = 0.3466

# coefficients of r^0, r^1, ... and t^0, t^1, ... (float64, exact as written; :func:`main`)
_E_HEX = (
    "0x1.0000000000000p+0", "0x1.000000000001dp+0", "0x1.ffffffffffe17p-2",
    "0x1.555555554bbf2p-3", "0x1.555555559349fp-5", "0x1.1111112d4cb29p-7",
    "0x1.6c16c0c08c825p-10", "0x1.a0197a44400dbp-13", "0x1.a01b6d1d26fe2p-16",
    "0x1.72f99023989b0p-19", "0x1.27278897f2318p-22",
)
_P_HEX = (
    "0x1.0000000000001p-1", "0x1.605eedc41b844p-1", "0x1.e123579f41603p-2",
    "0x1.9ca34d3d59ea4p-3", "0x1.e07855c7b999bp-5", "0x1.83246426fa1d1p-7",
    "0x1.a5e3af7e5264bp-10", "0x1.1dd125f0af748p-13", "0x1.752fee177b64ap-18",
)
_D_HEX = (
    "0x1.0000000000000p+0", "0x1.16508bb15ea05p+1", "0x1.1658f33c86c6cp+1",
    "0x1.511bf984e606cp+0", "0x1.116576656a599p-1", "0x1.354b6683fa5eep-3",
    "0x1.eaced7182ad34p-6", "0x1.094b218fd739cp-8", "0x1.6637edb64790ep-12",
    "0x1.d3b88813640b6p-17",
)
_E = tuple(float.fromhex(h) for h in _E_HEX)
_P = tuple(float.fromhex(h) for h in _P_HEX)
_D = tuple(float.fromhex(h) for h in _D_HEX)

_LOG2E = 1.0 / math.log(2.0)
_L1 = float.fromhex("0x1.62e42fefa3800p-1")  # ln 2 to 42 bits (11 trailing zero bits)
_L2 = float.fromhex("0x1.ef35793c76730p-45")  # ln 2 - L1 rounded (|ln 2 - L1 - L2| < 2^-98)
_MAGIC = 1.5 * 2.0**52


def fma_probe_args(dtype: torch.dtype, seed: int, specials: tuple[list[float], ...]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Operands of ``dtype`` whose fused and unfused ``a * b + c`` differ: ``c = -(a * b)``
    rounded (the fused result is the product's rounding error, the unfused one 0), others
    with a random c, and first the given ``specials`` (lists of a, b and c); ``V * 64 + 7``
    elements for V lanes of a 512-bit vector, so a compiled kernel's vector loop and its
    scalar tail both run."""
    g = torch.Generator().manual_seed(seed)
    n = 512 // torch.finfo(dtype).bits * 64 + 7  # (lanes of a 512-bit vector)
    a = torch.randn(n, generator=g, dtype=dtype) * torch.exp2(
        torch.randint(-60, 60, (n,), generator=g).to(dtype))
    b = torch.randn(n, generator=g, dtype=dtype)
    c = -(a * b)
    c[::3] = torch.randn(c[::3].shape, generator=g, dtype=dtype)
    for t, vals in zip((a, b, c), specials):
        t[:len(vals)] = torch.tensor(vals, dtype=dtype)
    return a, b, c


def _fma64_probe_args() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fma_probe_args` in float64, with the near-tie ``(1 + 2^-27)^2 - 1`` and a
    subnormal sum."""
    return fma_probe_args(torch.float64, 64, ([1 + 2.0**-27, 2.0**-600],
                                              [1 + 2.0**-27, 2.0**-460], [-1.0, 2.0**-1074]))


def compiled_fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
                 ) -> tuple[Any, torch.Tensor] | None:
    """``torch.compile`` of ``prims.fma`` (dynamic shapes) and its result on the probe
    operands ``a, b, c``; None where compiling or running it fails."""
    try:
        import torch._inductor.inductor_prims  # noqa: F401 - registers prims.fma

        f = torch.compile(lambda a, b, c: torch.ops.prims.fma(a, b, c), dynamic=True,
                          fullgraph=True)
        return f, f(a, b, c)
    except Exception:  # pragma: no cover - depends on the machine's compiler
        return None


#: set when the compiled operation failed on a later call: fma64 is then a product and a sum
_FMA64_FAILED: list[bool] = []


@lru_cache(maxsize=1)
def _fma64_kernel() -> tuple[Any, bool] | None:
    """``(kernel, fused)``: ``torch.compile`` of ``prims.fma`` on float64 tensors, and
    whether it rounds once on this machine; None where compiling fails or where it returns,
    on :func:`_fma64_probe_args`, neither the correctly rounded results (exact in
    Fractions) nor the product-then-sum ones throughout. One small compile per process
    (about 2 s), at the first eager :func:`fma64`, whatever the kernels' backend (as
    :func:`~precisim.emulation.functions.core.fused_fma32_compiles`)."""
    if _FMA64_FAILED:  # pragma: no cover
        return None
    a, b, c = _fma64_probe_args()
    res = compiled_fma(a, b, c)
    if res is None:  # pragma: no cover - depends on the machine's compiler
        return None
    f, got = res
    fused = torch.tensor([float(Fraction(x) * Fraction(y) + Fraction(z))
                          for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())],
                         dtype=torch.float64)
    bits = got.view(torch.int64)
    if torch.equal(bits, fused.view(torch.int64)):
        return f, True
    if torch.equal(bits, (a * b + c).view(torch.int64)):  # pragma: no cover - no FMA unit
        return f, False
    return None  # pragma: no cover


def fma64_fused() -> bool:
    """Whether :func:`fma64` rounds once (the compiled ``prims.fma`` does on this machine)."""
    k = _fma64_kernel()
    return k is not None and k[1]


def fma64(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` of float64 tensors (same shape) as ``prims.fma`` compiles it: one
    rounding where the CPU has an FMA instruction (inductor emits it), else a product and a
    sum. Traced, ``prims.fma`` itself; eagerly the same compiled operation
    (:func:`_fma64_kernel`), so an eager kernel and its compiled twin agree bit for bit
    (``a * b + c`` where the operation does not compile). The module's bounds count two
    roundings, so they hold either way."""
    if torch.compiler.is_compiling():
        return torch.ops.prims.fma(a, b, c)
    k = _fma64_kernel()
    if k is not None:
        try:  # (flat: one compiled graph for every shape)
            return k[0](a.reshape(-1), b.reshape(-1), c.reshape(-1)).view(a.shape)
        except Exception:  # pragma: no cover - a failed recompile: the two-rounding form
            _fma64_kernel.cache_clear()
            _FMA64_FAILED.append(True)
    return a * b + c


def _horner(t: torch.Tensor, cs: tuple[float, ...]) -> torch.Tensor:
    y = fma64(t, torch.full_like(t, cs[-1]), torch.full_like(t, cs[-2]))
    for c in reversed(cs[:-2]):
        y = fma64(y, t, torch.full_like(t, c))
    return y


def exp64(y: torch.Tensor) -> torch.Tensor:
    """``exp(y)`` for float64 ``y`` in [-708, 709], within 45u (relative; module docstring).
    NaN gives NaN (the polynomial's value); elsewhere outside the interval the result is
    not specified: callers clamp."""
    n = (y * _LOG2E + _MAGIC) - _MAGIC
    r = fma64(n, torch.full_like(n, -_L2), fma64(n, torch.full_like(n, -_L1), y))
    return _horner(r, _E) * pow2_64(n)


def gelu64(x: torch.Tensor) -> torch.Tensor:
    """``x Phi(x)`` for float64 ``x``, within :data:`GELU_GUARD` (relative) of the exact
    value at float32 values ``|x| <= 15`` (within 199u at other float64 values); beyond,
    the value at the clamp (module docstring). -0 gives -0, +inf +inf, -inf a negative
    value below 2^-160; NaN NaN. Branch-free."""
    xc = x.clamp(min=-T)
    t = xc.abs().clamp(max=T)
    q = exp64(-0.5 * (t * t)) * (_horner(t, _P) / _horner(t, _D))
    return xc * torch.where(xc < 0, q, 1.0 - q)


# ---------------------------------------------------------------------------------------------
# the fits (mpmath; not imported by the kernels)

def _ratio(mp, t):  # noqa: ANN001, ANN202 - mpmath objects
    """The GELU ratio R(t) = Q(t) exp(t^2 / 2) to the working precision."""
    return mp.erfc(t / mp.sqrt(2)) / 2 * mp.exp(t * t / 2)


def _targets(mp):  # noqa: ANN001, ANN202
    """name -> (function, interval, degrees (n, m), variable scale)."""
    h = mp.mpf(EXP_HALF_WIDTH)
    return {"E": (mp.exp, (-h, h), (10, 0), h),
            "PD": (lambda t: _ratio(mp, t), (mp.mpf(0), mp.mpf(T)), (8, 9), mp.mpf(T))}


def _lawson(mp, f, ab, n: int, m: int, scale, nodes: int, iterations: int):  # noqa: ANN001, ANN202
    """P (degree n) and D (degree m, ``D(0) = 1``) with ``P / D`` close to f on the interval
    ab in relative error, in powers of ``s = t / scale``: on ``nodes`` Chebyshev points the
    linearised residual ``(P - f D) / (f D_prev)`` is minimised by least squares
    (Sanathanan-Koerner), with Lawson's weights (each multiplied by its point's error) from
    the sixth iteration on; the iterate of least maximum error is kept."""
    a, b = ab
    ts = [(a + b) / 2 - (b - a) / 2 * mp.cos(mp.pi * (i + mp.mpf(1) / 2) / nodes)
          for i in range(nodes)]
    fs = [f(t) for t in ts]
    ss = [t / scale for t in ts]
    w = [mp.mpf(1)] * nodes
    dprev = [mp.mpf(1)] * nodes
    best = None
    for it in range(iterations):
        rows, rhs = [], []
        for s, fv, dp, wi in zip(ss, fs, dprev, w):
            sc = mp.sqrt(wi) / (fv * dp)
            rows.append([s**k * sc for k in range(n + 1)]
                        + [-fv * s**k * sc for k in range(1, m + 1)])
            rhs.append(fv * sc)
        sol = mp.qr_solve(mp.matrix(rows), mp.matrix(rhs))[0]
        p = [sol[k] for k in range(n + 1)]
        d = [mp.mpf(1)] + [sol[n + 1 + k] for k in range(m)]
        dprev = [mp.polyval(d[::-1], s) for s in ss]
        errs = [(mp.polyval(p[::-1], s) / dv - fv) / fv for s, dv, fv in zip(ss, dprev, fs)]
        worst = max(abs(e) for e in errs)
        if best is None or worst < best[0]:
            best = (worst, p, d)
        if it >= 5:
            w = [wi * abs(e) for wi, e in zip(w, errs)]
            tot = sum(w)
            w = [wi * nodes / tot for wi in w]
    return best[1], best[2]


def fit(nodes: int = 300, iterations: int = 25) -> dict[str, tuple[float, ...]]:
    """The coefficient tables ``E``, ``P`` and ``D`` fitted again (:func:`_lawson`, 50
    decimal digits; deterministic), in powers of the variable, each rounded once to
    float64."""
    import mpmath

    mp = mpmath.mp
    out: dict[str, tuple[float, ...]] = {}
    with mpmath.workdps(50):
        for name, (f, ab, (n, m), scale) in _targets(mp).items():
            p, d = _lawson(mp, f, ab, n, m, scale, nodes, iterations)
            conv = [tuple(float(c / scale**k) for k, c in enumerate(cs)) for cs in (p, d)]
            if m == 0:
                out[name] = conv[0]
            else:
                out["P"], out["D"] = conv
    return out


def fit_errors(points: int = 2000, tables: dict[str, tuple[float, ...]] | None = None
               ) -> dict[str, float]:
    """The largest relative error of ``E`` against exp and of ``P / D`` against R, with the
    float64 coefficients evaluated exactly, on ``points + 1`` equally spaced points and
    ``points`` Chebyshev points of each interval."""
    import mpmath

    mp = mpmath.mp
    tab = tables or {"E": _E, "P": _P, "D": _D}
    out = {}
    with mpmath.workdps(40):
        for name, (f, (a, b), _, _) in _targets(mp).items():
            ts = [a + (b - a) * i / points for i in range(points + 1)]
            ts += [(a + b) / 2 - (b - a) / 2 * mp.cos(mp.pi * (i + mp.mpf(1) / 2) / points)
                   for i in range(points)]
            num = [mp.mpf(c) for c in tab["E" if name == "E" else "P"]][::-1]
            den = [mp.mpf(1)] if name == "E" else [mp.mpf(c) for c in tab["D"]][::-1]
            out[name] = float(max(abs(mp.polyval(num, t) / mp.polyval(den, t) / f(t) - 1)
                                  for t in ts))
    return out


def main() -> None:  # pragma: no cover - prints the coefficient tables again
    """Print the fitted tables (as the module writes them) and their measured errors."""
    tabs = fit()
    for key, cs in tabs.items():
        print(f"_{key}_HEX = (\n" + "\n".join(f'    "{c.hex()}",' for c in cs) + "\n)")
    for key, e in fit_errors(tables=tabs).items():
        print(f"{key}: largest relative error 2^{math.log2(e):.2f}")


if __name__ == "__main__":  # pragma: no cover
    main()
