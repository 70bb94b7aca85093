"""Generated bad and edge inputs against the public API and the command line (issue 14).

The contract every property checks: a call either returns a correct result or raises a clear
error (an exception of the documented kind whose message names the bad value or parameter;
on the command line exit status 2, an ``error:`` line and no traceback). Never a hang (every
example runs under an alarm), unbounded memory (peak RSS is bounded per test), a model left
changed, or a silently wrong number (results are compared with the exact reference).

Budgets (hypothesis settings profiles, registered below):

* default suite (``pytest``): derandomized (the same examples in every run, so CI is
  reproducible), no deadline (a shared 2-core machine makes per-example timings noisy; hangs
  are caught by the alarm instead), no example database; each property a few dozen examples,
  the whole file about 40 s of CPU time (under 3 minutes of wall time on a busy
  2-core machine);
* ``pytest -m slow``: the ``_slow`` twin of each property, randomized, many more examples.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import resource
import signal
import string
from fractions import Fraction
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from precisim.emulation import (  # noqa: E402
    EmulationError,
    Recipe,
    RecipeError,
    emulate,
    matmul,
    plan,
)
from precisim.emulation.presets import UNITS, unit_from_dict, unit_to_dict  # noqa: E402
from precisim.emulation.reference import dot  # noqa: E402
from precisim.formats import (  # noqa: E402
    FloatFormat,
    FormatError,
    IntFormat,
    Overflow,
    Rounding,
    get_format,
    quantize,
)
from precisim.formats.reference import (  # noqa: E402
    round_to_float_format,
    round_to_int_format,
)
from precisim.formats.scaling import (  # noqa: E402
    SCALED_FORMATS,
    ScaledFormat,
    get_scaled_format,
    quantize_scaled,
)

COMMON = {"deadline": None, "database": None, "print_blob": True,
          "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                    HealthCheck.filter_too_much]}
settings.register_profile("precisim-default", derandomize=True, **COMMON)
settings.register_profile("precisim-slow", derandomize=False, **COMMON)

#: examples per property: (default suite, -m slow)
FAST, SLOW = 100, 1500
#: seconds one example may take before it counts as a hang
ALARM_S = 60
#: growth of the peak resident memory one property may cause
MAX_RSS_GROWTH = 2 << 30


def _twins(strategy, fast: int = FAST, slow: int = SLOW):
    """Turn ``check(case)`` into two tests: the default one (derandomized, ``fast`` examples)
    and a ``-m slow`` one (randomized, ``slow`` examples)."""
    def deco(check):
        def make(n: int, profile: str):
            def test(case):
                with _guarded():
                    check(case)
            test.__name__ = test.__qualname__ = check.__name__
            return settings(settings.get_profile(profile), max_examples=n)(given(strategy)(test))
        fast_test = _rss_bounded(make(fast, "precisim-default"))
        slow_test = pytest.mark.slow(_rss_bounded(make(slow, "precisim-slow")))
        return fast_test, slow_test
    return deco


def _rss_bounded(test):
    def wrapper():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        test()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        assert grown < MAX_RSS_GROWTH, f"peak memory grew by {grown / 2**30:.1f} GiB"
    wrapper.__name__ = test.__name__
    return wrapper


@contextlib.contextmanager
def _guarded():
    """A hang (an example running past ALARM_S seconds) fails the example."""
    def alarm(signum, frame):
        raise TimeoutError(f"an example ran for more than {ALARM_S} s (a hang)")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, ALARM_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _names(err: BaseException, *candidates: object) -> None:
    """The error's message is clear: it names one of the candidates (a parameter name or the
    bad value, as given or as repr), and is not a bare internal error."""
    msg = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    texts = set()
    for c in candidates:
        if c is None:
            continue
        t = str(c)
        texts |= {t, repr(c), t.strip().lower(), t[:12], repr(c)[:12]}
    assert any(t and t in msg for t in texts), f"{type(err).__name__}: {msg!r} names none of " \
        f"{candidates!r}"
    assert len(msg) < 4000, "an error message must be readable"


# ---------------------------------------------------------------------------------------------
# strategies

_DIGITS = st.one_of(st.integers(0, 40), st.integers(0, 10**30), st.sampled_from([149, 150, 127,
                                                                                  128, 255]))
_SUFFIX = st.sampled_from(["", "fn", "fnuz", "fnu", "fnx", "b"])


@st.composite
def format_names(draw) -> str:
    """Names near the grammar (eXmY[bNN][suffix], binaryKpP.., catalog names with typos) and
    arbitrary text."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        e, m = draw(_DIGITS), draw(_DIGITS)
        bias = draw(st.one_of(st.none(), _DIGITS))
        return f"e{e}m{m}" + ("" if bias is None else f"b{bias}") + draw(_SUFFIX)
    if kind == 1:
        return (f"binary{draw(_DIGITS)}p{draw(_DIGITS)}{draw(st.sampled_from('sux'))}"
                f"{draw(st.sampled_from('efx'))}")
    if kind == 2:
        base = draw(st.sampled_from(["e4m3", "fp8", "bf16", "int4", "mxint8", "e8m0",
                                     "float8_e4m3fnuz", "nvfp4", "mxfp4", "fp32"]))
        return draw(st.sampled_from([base, base.upper(), base + "x", base[:-1], " " + base,
                                     "format:" + base, "scaled:" + base, "unit:" + base]))
    if kind == 3:
        return draw(st.text(string.ascii_letters + string.digits + "_-:.", max_size=30))
    if kind == 4:
        return "e4m3b" + "9" * draw(st.integers(5, 6000))
    return draw(st.text(max_size=20))


def _mostly(good, bad):
    """``good`` about half the time, else one of ``bad``: the valid path is exercised too."""
    return st.one_of(st.just(good), st.sampled_from(bad))


_ROUNDINGS = st.sampled_from(["rne", "rtz", "ru", "rd", "rna", "rto", "sr", "RNE", "nearest",
                              "floor", "", "banana", 3, None])
_OVERFLOWS = st.sampled_from(["saturate", "inf", "nan", "wrap", "clamp", "", 1, None])


_DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64,
           torch.int32)


def _tensors(max_dims: int = 3, max_side: int = 40, dtypes: tuple = _DTYPES, min_dims: int = 0):
    """Float tensors of assorted shapes (empty axes included) and values (specials, huge,
    tiny, subnormal), in the accepted dtypes and a few others."""
    @st.composite
    def build(draw):
        shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=min_dims,
                                    max_size=max_dims)))
        n = math.prod(shape)
        kind = draw(st.sampled_from(["normal", "wide", "special", "tiny", "ints"]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        if kind == "normal":
            x = torch.randn(n, generator=g) * draw(st.sampled_from([1e-3, 1.0, 100.0]))
        elif kind == "wide":
            x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-140, 128, (n,),
                                                                         generator=g).float())
        elif kind == "tiny":
            x = torch.randn(n, generator=g) * 2.0**-135
        elif kind == "ints":
            x = torch.randint(-300, 300, (n,), generator=g).float()
        else:
            pool = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 3.4e38, -3.4e38,
                                 1e-45, -1e-45, 1.0, 0.5, 448.0, 464.0, 6.0, 5.0])
            x = pool[torch.randint(0, len(pool), (n,), generator=g)]
        dtype = draw(st.sampled_from(dtypes))
        return x.reshape(shape).to(dtype) if dtype != torch.int32 else \
            x.nan_to_num().clamp(-1e9, 1e9).reshape(shape).to(dtype)
    return build()


def _exact(v: float) -> Fraction | float:
    return v if math.isnan(v) or math.isinf(v) else Fraction(v)


def _reference(v: float, fmt, rnd: Rounding, ovf: Overflow) -> float:
    x = _exact(v)
    r = round_to_int_format(x, fmt, rnd, ovf) if isinstance(fmt, IntFormat) else \
        round_to_float_format(x, fmt, rnd, ovf)
    return float(r)


# ---------------------------------------------------------------------------------------------
# formats

@_twins(format_names())
def _format_name(name):
    try:
        f = get_format(name)
    except FormatError as e:  # also a ValueError; unknown names are KeyErrors too
        _names(e, name, name.strip(), name.split(":")[-1], "bias", "exp_bits", "man_bits",
               "P3109", "digits", "names")
        return
    assert isinstance(f, FloatFormat | IntFormat)
    # every value is a float32 value: the fake-quantization can return it
    if isinstance(f, FloatFormat):
        assert f.max <= Fraction(2**128 - 2**104) and f.min_subnormal >= Fraction(1, 2**149)
    x = torch.tensor([0.1, -3.0, 1e30, 2.0**-140, float(f.max), -float(f.max) * 3])
    y = quantize(x, f)
    for xi, yi in zip(x.tolist(), y.tolist()):
        ref = _reference(xi, f, Rounding.NEAREST_EVEN, Overflow.SATURATE)
        assert yi == ref or (math.isnan(yi) and math.isnan(ref)), (name, xi, yi, ref)


test_format_names, test_format_names_slow = _format_name


@_twins(st.tuples(_tensors(), st.sampled_from(["e4m3", "e5m2", "e2m1", "bf16", "int8", "e8m0",
                                                "binary8p3se", "e3m2", "mxfp4", "fp32"]),
                  _ROUNDINGS, _OVERFLOWS,
                  _mostly(None, [0, 1, 8, 30, 31, -1, True, 2.5]),
                  _mostly(None, [0, 7, -3, "abc", 2**70]),
                  _mostly(False, [True, "no", 1])))
def _quantize_args(case):
    x, fmt, rnd, ovf, sr_bits, seed, flush = case
    kw = {"sr_bits": sr_bits, "seed": seed, "flush_input": flush}
    if rnd is not None:
        kw["rounding"] = rnd
    if ovf is not None:
        kw["overflow"] = ovf
    try:
        y = quantize(x, fmt, **kw)
    except (TypeError, ValueError) as e:
        _names(e, fmt, rnd, ovf, sr_bits, seed, flush, x.dtype, "rounding", "overflow",
               "sr_bits", "seed", "dtype", "flush_input", "representable")
        return
    assert y.shape == x.shape and y.dtype == x.dtype
    r = Rounding.parse(rnd if rnd is not None else "rne")
    if r is Rounding.STOCHASTIC or flush is True or y.numel() == 0:
        return
    f = get_format(fmt)
    o = Overflow.parse(ovf if ovf is not None else "saturate")
    if o is Overflow.WRAP:
        return
    xs, ys = x.float().reshape(-1), y.float().reshape(-1)
    for i in range(0, xs.numel(), max(1, xs.numel() // 6)):
        ref = _reference(float(xs[i]), f, r, o)
        got = float(ys[i])
        assert got == ref or (math.isnan(got) and math.isnan(ref)), (fmt, r, o, float(xs[i]),
                                                                     got, ref)


test_quantize_arguments, test_quantize_arguments_slow = _quantize_args


_SCALED = st.sampled_from(SCALED_FORMATS.names() + ["mxfp5", "nvfp4x", "e4m3"])


@_twins(st.one_of(
    # anything, mostly bad
    st.tuples(_tensors(max_dims=3, max_side=70), _SCALED,
              _mostly(None, ["floor", "ceil", "rceil", "even", "amax", "up", 7]),
              _mostly(-1, [-2, 0, 1, 5, -9, True]), st.one_of(st.none(), _ROUNDINGS),
              _mostly(None, [0, 5]), st.booleans()),
    # valid calls, so that results are checked too (against the exact reference for MX)
    st.tuples(_tensors(max_dims=2, max_side=70, dtypes=(torch.float32,), min_dims=1),
              st.sampled_from(SCALED_FORMATS.names()), st.just(None), st.just(-1),
              st.sampled_from([None, "rne"]), st.just(None), st.booleans())))
def _scaled(case):
    x, name, rule, axis, rnd, seed, parts = case
    try:
        f = get_scaled_format(name, rule, axis)
        out = quantize_scaled(x, f, rounding=rnd, seed=seed, return_parts=parts)
    except (TypeError, ValueError) as e:
        _names(e, name, rule, axis, rnd, seed, x.dtype, "axis", "rule", "rounding", "seed",
               "dims", "representable", "dtype", "sr")
        return
    y = out.dequantized if parts else out
    assert y.shape == x.shape and y.dtype == x.dtype
    assert isinstance(f, ScaledFormat)
    if x.numel() == 0:
        return
    xf, yf = x.float(), y.float()
    finite = torch.isfinite(xf)
    # finite inputs give finite outputs, or NaN for a block holding a non-finite value, or
    # +-inf (only under CEIL near the float32 range: documented)
    bad = finite & torch.isnan(yf)
    if bad.any():
        assert not torch.isfinite(xf).all(), "NaN from an all-finite tensor"
    if finite.all() and Rounding.parse(rnd or "rne") is Rounding.NEAREST_EVEN \
            and f.rule is not None and f.rule.value != "ceil":
        # nearest rounding: each value within half a block step... at least never further
        # from x than the block's largest magnitude (a silently wrong number would be)
        amax = xf.abs().max()
        assert (yf - xf).abs().max() <= amax * 1.01 + 1e-30
    if parts:
        assert out.codes.shape == x.shape
    _check_mx_blocks(x, y, f, rnd)


def _check_mx_blocks(x: torch.Tensor, y: torch.Tensor, f: ScaledFormat, rnd) -> None:
    """Power-of-two scaled (MX) blocks along an axis, float32 input, nearest-even rounding: a
    few rows' blocks equal the exact reference bit for bit (a silently wrong number fails)."""
    from precisim.formats.reference import quantize_block_pow2_exact

    if x.dtype != torch.float32 or x.dim() == 0 or f.scale.name != "float8_e8m0fnu" \
            or f.tensor_scale or Rounding.parse(rnd or "rne") is not Rounding.NEAREST_EVEN \
            or len(f.granularity.blocks) != 1:
        return
    axis, size = f.granularity.blocks[0]
    if size is None:
        return
    xs, ys = x.movedim(axis, -1), y.movedim(axis, -1)
    xs, ys = xs.reshape(-1, xs.shape[-1]), ys.reshape(-1, ys.shape[-1])
    for row in range(min(2, xs.shape[0])):
        xr, yr = xs[row].tolist(), ys[row].tolist()
        for b in range(0, len(xr), size):
            ref = quantize_block_pow2_exact(xr[b:b + size], f.element, f.rule.value)
            for xi, got, r in zip(xr[b:b + size], yr[b:b + size], ref):
                ok = math.isnan(got) if isinstance(r, float) and math.isnan(r) else \
                    (got == r if isinstance(r, float) else
                     not math.isinf(got) and Fraction(got) == Fraction(r))
                assert ok, (f.name, f.rule, xi, got, r)


test_scaled_formats, test_scaled_formats_slow = _scaled


# ---------------------------------------------------------------------------------------------
# matrix units

_UNIT_FIELDS = {
    "a_format": ["fp16", "bf16", "e4m3", "e5m2", "tf32", "fp32", "int8", "e9m3", "nvfp4", 3],
    "b_format": [None, "fp16", "e4m3", "int4", "bogus"],
    "block_size": [1, 4, 16, 32, 0, -1, 2**25, 2.5, "16", True],
    "alignment_bits": [None, 0, 13, 24, 201, -1, "x"],
    "drop": ["truncate", "floor", "nearest", "sticky", "chop"],
    "alignment_floor": [None, -20, 2000],
    "acc_format": ["fp32", "fp16", "bf16", "int16", "int32", "e8m0", "fp64"],
    "acc_rounding": ["rne", "rtz", "sr", "odd", 5],
    "acc_overflow": [None, "inf", "saturate", "wrap", "nan", "boom"],
    "acc_sr_bits": [None, 8, 0, 40],
    "block_result_bits": [None, 0, 13, 30, -2],
    "flush_input_subnormals": [False, True, "yes"],
    "output_format": [None, "fp16", "bf16", "e4m3"],
    "promotion_interval": [None, 32, 128, 100, 0],
    "promotion_rounding": ["rne", "sr"],
    "c_mode": ["joint", "after", "middle"],
    "name": ["u", "", 5],
    "frobnicate": [1],
}


@st.composite
def unit_dicts(draw) -> dict:
    d = {}
    if draw(st.booleans()):
        d["base"] = draw(st.sampled_from(UNITS.names() + ["h200-e4m3"]))
    else:
        d["name"] = "u"
    for k in draw(st.lists(st.sampled_from(sorted(_UNIT_FIELDS)), max_size=4, unique=True)):
        d[k] = draw(st.sampled_from(_UNIT_FIELDS[k]))
    return d


@_twins(st.tuples(unit_dicts(), st.integers(0, 2**31 - 1), st.integers(0, 3),
                  st.integers(0, 5), st.integers(0, 3)))
def _unit(case):
    d, seed, m, k, n = case
    try:
        u = unit_from_dict(d)
    except ValueError as e:
        _names(e, *d, *(v for v in d.values()), "unit", "base")
        return
    assert unit_from_dict(unit_to_dict(u)) == u  # every field survives a round trip
    # a small GEMM of the unit's own values: the kernels equal the exact reference
    g = torch.Generator().manual_seed(seed)
    a = quantize(torch.randn(m, k, generator=g) * 4, u.a_format) if m * k else \
        torch.zeros(m, k)
    b = quantize(torch.randn(k, n, generator=g) * 4, u.b_format) if k * n else \
        torch.zeros(k, n)
    if u.acc_rounding is Rounding.STOCHASTIC:
        return
    out = matmul(a, b, u)
    assert out.shape == (m, n)
    for i in range(m):
        for j in range(n):
            ref = dot(a[i].tolist(), b[:, j].tolist(), u)
            got = float(out[i, j])
            assert got == ref or (math.isnan(got) and math.isnan(ref)), (d, i, j, got, ref)


test_units, test_units_slow = _unit


@_twins(st.tuples(st.lists(st.integers(0, 4), min_size=2, max_size=4),
                  st.lists(st.integers(0, 4), min_size=2, max_size=4),
                  st.sampled_from(["h100-e4m3", "a100-bf16", "exact-fp32", "nope"]),
                  st.sampled_from(["bit-exact", "fast", "exact"]),
                  st.sampled_from([None, 0.5, "c", float("nan")])))
def _matmul_shapes(case):
    sa, sb, unit, fidelity, c = case
    a = torch.ones(sa) * 0.5
    b = torch.ones(sb) * 0.25
    try:
        out = matmul(a, b, unit, c=c, fidelity=fidelity)
    except (ValueError, TypeError) as e:  # (UnknownUnitError is a ValueError)
        _names(e, unit, fidelity, "shapes", "broadcast", "dimensions", "c", "K=", "fidelity")
        return
    ref = torch.matmul(a, b)
    assert out.shape == ref.shape
    if c is None:  # small exact products and sums: every unit gives the exact result
        assert torch.equal(out, ref)


test_matmul_shapes, test_matmul_shapes_slow = _matmul_shapes


# ---------------------------------------------------------------------------------------------
# recipes, plan and emulate on a tiny model

transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


MODEL = None
IDS = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))


def _model():
    global MODEL
    if MODEL is None:
        MODEL = _llama()
    return MODEL


def _state(model):
    with torch.no_grad():
        out = model(IDS).logits
    return ([(n, id(m), type(m)) for n, m in model.named_modules()],
            [(n, id(p)) for n, p in model.named_parameters()],
            model.config._attn_implementation, out)


def _same_state(a, b) -> bool:
    return a[:3] == b[:3] and torch.equal(a[3], b[3])


_TENSOR_FIELDS = {
    "format": ["e4m3", "mxfp4", "nvfp4", "bf16", "int8", "e4m3b200", "fp8_1x128", "nope", 4,
               None],
    "rounding": ["rne", "sr", "rtz", "up!", 1],
    "overflow": ["saturate", "inf", "nan", "wrap"],
    "scaling": [None, "tensor", "group:32", "tile:4x4", "group:0", "rows"],
    "scale_rule": [None, "floor", "amax", "rceil", "x"],
    "scale_format": [None, "e8m0", "fp32", "e4m3"],
    "flush_subnormals": [False, True, "no", 0],
    "sr_bits": [None, 4, 0, 40, "8"],
    "seed": [None, 1, -1, "abc", 2**64],
    "colour": ["red"],
}


@st.composite
def tensor_specs(draw):
    if draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(["mxfp8", "e2m1", "none", "nvfp4", "fp8_tensor", "bogus",
                                     None, 7, ["e4m3"]]))
    d = {"format": draw(st.sampled_from(_TENSOR_FIELDS["format"]))}
    for k in draw(st.lists(st.sampled_from(sorted(_TENSOR_FIELDS)), max_size=3, unique=True)):
        d[k] = draw(st.sampled_from(_TENSOR_FIELDS[k]))
    return d


@st.composite
def recipe_dicts(draw):
    d: dict = {"name": draw(st.sampled_from(["r", "x-y", ""]))}
    if draw(st.booleans()):
        g = {r: draw(tensor_specs()) for r in draw(st.lists(
            st.sampled_from(["input", "weight", "output", "inputs"]), max_size=3, unique=True))}
        if draw(st.booleans()):
            g["unit"] = draw(st.one_of(st.sampled_from(["h100-e4m3", "a100-bf16", "exact-fp32",
                                                        "h9-x", "deepseek-fp8"]), unit_dicts()))
        if draw(st.booleans()):
            g["fidelity"] = draw(st.sampled_from(["bit-exact", "fast", "slow"]))
        d["linear"] = draw(st.sampled_from([g, g, "mxfp8", None, 3]))
    if draw(st.booleans()):
        d["attention"] = draw(st.sampled_from([{"qk": "e4m3", "pv": "mxfp8"},
                                               {"kv_cache": draw(tensor_specs())},
                                               "bf16", {"qkv": "e4m3"}, []]))
    if draw(st.booleans()):
        d["rules"] = draw(st.sampled_from([
            [{"match": "*.mlp.*", "linear": "e2m1"}], [{"match": "re:[", "linear": "bf16"}],
            [{"linear": "bf16"}], [{"match": "Linear", "kind": "type", "linear": None}],
            [{"match": "*", "kind": "shape", "linear": "bf16"}], "all", [{"match": "x"}]]))
    if draw(st.integers(0, 9)) == 0:
        d["lienar"] = "bf16"
    return d


@_twins(recipe_dicts(), fast=30, slow=600)
def _recipe(d):
    model = _model()
    before = _state(model)
    try:
        r = Recipe.from_dict(d)
    except (RecipeError, ValueError) as e:
        flat = json.dumps(d, default=str)
        _names(e, *[w for w in flat.replace('"', " ").replace(",", " ").replace(":", " ")
                    .replace("{", " ").replace("}", " ").replace("[", " ").replace("]", " ")
                    .split() if len(w) > 1], "rule", "recipe", "format", "unit")
        return
    assert Recipe.from_dict(r.to_dict()) == r  # parse -> dict -> parse is the identity
    # validated when parsed or planned (naming the module); a forward never fails on it
    try:
        p = plan(model, r, warn=False)
    except RecipeError as e:
        _names(e, "model.", "needs an input and a weight")
        return
    with emulate(model, r, warn=False), torch.no_grad():
        out = model(IDS).logits
    assert out.shape == before[3].shape
    if not p.emulated():
        assert torch.equal(out, before[3])
    assert _same_state(_state(model), before)  # restored exactly


test_recipes, test_recipes_slow = _recipe


_OPS = st.lists(st.tuples(st.sampled_from(["apply", "restore", "with", "plan", "forget"]),
                          st.integers(0, 2)), max_size=12)


@_twins(_OPS, fast=30, slow=200)
def _handles(ops):
    """Any sequence of apply / restore / nested with / plan / dropping handles on one model:
    at most one emulation is active, refusals are EmulationErrors naming the active recipe, the
    outputs are those of the active recipe, and restoring everything gives the original."""
    import gc

    model = _model()
    before = _state(model)
    recipes = ["mxfp4", "bf16", "nvfp4"]
    handles = [emulate(model, r, warn=False) for r in recipes]
    try:
        _run_ops(model, ops, recipes, handles)
    finally:
        for h in handles:
            h.restore()
    gc.collect()
    assert _same_state(_state(model), before)


def _run_ops(model, ops, recipes, handles):
    import gc

    ref = {}
    active = None
    for op, i in ops:
        h = handles[i]
        if op == "apply" or op == "with":
            try:
                if op == "with":
                    with h, torch.no_grad():
                        model(IDS)
                else:
                    h.apply()
                    active = i
            except EmulationError as e:
                assert active is not None, f"refused with nothing applied: {e}"
                _names(e, recipes[active], "already applied")
        elif op == "restore":
            h.restore()
            if active == i:
                active = None
        elif op == "plan":
            try:
                plan(model, recipes[i], warn=False)
            except EmulationError as e:
                _names(e, recipes[active])
        else:  # drop the handle object (a new one takes its place when it can be planned)
            if active is None:
                handles[i] = emulate(model, recipes[i], warn=False)
            else:
                with pytest.raises(EmulationError, match=recipes[active]):
                    emulate(model, recipes[i], warn=False)
            gc.collect()
        with torch.no_grad():
            out = model(IDS).logits  # never broken
        key = active if active is not None else -1
        if key in ref:
            assert torch.equal(out, ref[key])
        ref[key] = out


test_emulation_handles, test_emulation_handles_slow = _handles


# ---------------------------------------------------------------------------------------------
# eval: settings, sweeps, spec sheets

_SETTING_VALUES = st.sampled_from([None, 0, 1, 7, 64, -5, 2.5, "lots", True, [1], 2**70])


@_twins(st.dictionaries(st.sampled_from(["tokens", "window", "stride", "bootstrap", "block",
                                         "seed", "threads", "dtype", "fidelity", "recipes",
                                         "model", "data"]),
                        st.one_of(_SETTING_VALUES, st.sampled_from(["fast", "bf16", "int8",
                                                                    "float16", ""])),
                        max_size=4))
def _eval_config(d):
    from precisim.eval.spec import EvalConfig

    kw = {"model": "smollm2", "data": "x.txt", "recipes": ("bf16",), **d}
    try:
        cfg = EvalConfig(**kw)
    except (ValueError, TypeError) as e:
        _names(e, *d, *d.values())
        return
    for k, v in d.items():  # what was accepted is exactly what was given
        got = getattr(cfg, k)
        assert got == (tuple(v) if k == "recipes" and isinstance(v, list) else v)


test_eval_config, test_eval_config_slow = _eval_config


@_twins(st.dictionaries(st.sampled_from(["name", "models", "recipes", "datasets", "params",
                                         "grid"]),
                        st.one_of(st.sampled_from(["s", "", "a/b", [], ["m"], ["m", "m"],
                                                   [1], {"tokens": 5}, {"": 1},
                                                   {"window": {"a": 1}}, None, 3]),
                                  st.text(max_size=8)),
                        max_size=6))
def _sweep_spec(d):
    from precisim.eval.sweep import SweepError, SweepSpec

    try:
        s = SweepSpec.from_dict(d)
    except SweepError as e:
        _names(e, *d, *(json.dumps(v) for v in d.values()), *d.values(), "missing")
        return
    assert SweepSpec.from_dict(s.to_dict()) == s
    assert len(s.cells()) == len(s.models) * len(s.recipes) * len(s.datasets)


test_sweep_specs, test_sweep_specs_slow = _sweep_spec


_SHEET = json.loads((Path(__file__).parents[1] / "docs/main-job/spec_sheet.json").read_text())


@st.composite
def mutated_sheets(draw):
    """The committed spec sheet with one field deleted or replaced, somewhere in it."""
    sheet = json.loads(json.dumps(_SHEET))
    node, path = sheet, []
    for _ in range(draw(st.integers(0, 4))):
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) \
            if isinstance(node, list) else []
        if not keys:
            break
        k = draw(st.sampled_from(keys))
        if not isinstance(node[k], dict | list):
            break
        node, path = node[k], [*path, k]
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    if not keys:
        return sheet, path
    k = draw(st.sampled_from(keys))
    if draw(st.booleans()) and isinstance(node, dict):
        del node[k]
    else:
        node[k] = draw(st.sampled_from([None, "x", -1, [], {}, 1e308, True]))
    return sheet, [*path, k]


@_twins(mutated_sheets())
def _sheet(case):
    from precisim.eval.sheet import SpecSheet, SpecSheetError
    from precisim.eval.spec import vendor_rows

    d, path = case
    try:
        sheet = SpecSheet.from_dict(d)
        rows = vendor_rows(sheet)
    except SpecSheetError as e:
        _names(e, *path, "recipes_resolved", "malformed", "schema")
        return
    assert len(rows) == len(sheet.recipes_resolved)


test_spec_sheets, test_spec_sheets_slow = _sheet


# ---------------------------------------------------------------------------------------------
# the command line

_VALUES = st.sampled_from(["0", "-3", "1", "99999999999", "x", "", "1.5", "e4m3", "nope.txt",
                           "/proc/nope/out", "README.md", "docs", "-1e9", "2"])


@st.composite
def argvs(draw) -> list[str]:
    """Command lines of every command with assorted (mostly bad) option values."""
    cmd = draw(st.sampled_from(["formats", "vectors", "report", "eval", "layers", "sweep"]))
    opts = {
        "formats": ["--columns", "--p3109"],
        "vectors": ["--n", "--k", "--seed", "--unit", "--rounding", "--overflow", "--out"],
        "report": ["--store", "--sheet", "--out", "--sweep"],
        "eval": ["--tokens", "--window", "--stride", "--block", "--bootstrap", "--seed",
                 "--dtype", "--recipes", "--recipe-file", "--data", "--out", "--spec",
                 "--threads", "--model", "--fidelity"],
        "layers": ["--tokens", "--window", "--recipe", "--data", "--out", "--by", "--dtype",
                   "--model"],
        "sweep": ["--store", "--export"],
    }[cmd]
    argv = [cmd]
    if cmd in ("formats", "vectors") and draw(st.booleans()):
        argv.append(draw(st.sampled_from(["e4m3", "fp32", "e4m3b99999", "nope", "int16",
                                          "binary8p3se"])))
    if cmd == "sweep":
        argv.append(draw(st.sampled_from(["nope.yaml", "README.md", "docs"])))
    for o in draw(st.lists(st.sampled_from(opts), max_size=4, unique=True)):
        argv += [o, draw(_VALUES)]
    if cmd == "vectors" and draw(st.booleans()):
        argv.append("--all-codes")
    return argv


class _WouldRun(Exception):
    """Raised where a valid command line would start its long work."""


@pytest.fixture(scope="module")
def no_long_work():
    """Stop valid command lines where their long work starts (model loading, evaluation)."""
    from precisim.emulation import loader
    from precisim.eval import commands, spec

    mp = pytest.MonkeyPatch()

    def stop(*a, **k):
        raise _WouldRun
    mp.setattr(loader, "load_model", stop)
    mp.setattr(spec, "run_eval", stop)
    mp.setattr("precisim.emulation.load_model", stop)
    mp.setattr(commands, "summary_table", stop)
    yield
    mp.undo()


def _cli(argv):
    from precisim.eval.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except _WouldRun:
            rc = "would run"
    return rc, out.getvalue(), err.getvalue()


def _check_cli(argv, tmp):
    rc, out, err = _cli(argv)
    assert "Traceback" not in out + err, (argv, err)
    assert not (Path(__file__).parents[1] / "precisim-report").exists()
    if rc == "would run" or rc == 0:
        return
    assert rc in (1, 2), (argv, rc, err)
    if rc == 2:
        assert "error:" in err, (argv, err)


def test_command_line(no_long_work, tmp_path) -> None:
    _cli_property(tmp_path, FAST, "precisim-default")


@pytest.mark.slow
def test_command_line_slow(no_long_work, tmp_path) -> None:
    _cli_property(tmp_path, SLOW, "precisim-slow")


def _cli_property(tmp_path, n, profile) -> None:
    """Run in a scratch folder holding a README.md (a file that is no sheet, store or sweep)
    and a docs/ folder, so that nothing is written into the repository."""
    (tmp_path / "README.md").write_text("# not a spec sheet\n")
    (tmp_path / "docs").mkdir()

    @settings(settings.get_profile(profile), max_examples=n)
    @given(argvs())
    def prop(argv):
        with _guarded(), _chdir(tmp_path):
            _check_cli(argv, tmp_path)
    _rss_bounded(prop)()


@contextlib.contextmanager
def _chdir(path: Path):
    import os

    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
