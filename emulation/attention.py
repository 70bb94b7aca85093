"""Emulated attention for the standard eager attention function, skipping the masked triangle.

Most decoder models in transformers (Llama, Mistral, Qwen2/3, Phi-3, OLMo-2, Granite, SmolLM3,
Mixtral, ...) share one eager attention function::

    S = (Q @ K^T) * scaling + mask;  P = softmax(S, fp32).to(dtype);  O = P @ V

:func:`chunked_attention` computes exactly that with both matmuls under their
:class:`~precisim.emulation.recipe.GemmSpec` (fake quant: operands quantized, fp32 products),
but row chunk by row chunk, and for each chunk only over the keys the mask leaves visible
(rounded up to whole scale blocks of P; the softmax runs over those keys rounded up to whole
vectors, :func:`softmax_row_length`, with the padding at -inf, so that its reductions add the
same values in the same order as the generic path's). Entries it skips are the ones the mask
sends to an exact 0 in P, so they contribute nothing to ``P @ V`` and leave every scale block
of P that is computed unchanged (the blocks run along the keys, docs/arithmetic.md section 2).
Under a causal mask this does ~(1 + c/L)/2 of the work of the full ``L x L`` score matrix, in
pieces of :data:`CHUNK_ROWS` rows. The chunks and each one's keys depend only on the
positions and on that sequence's own mask, never on the batch size or on the other sequences
of a batch (docs/reproducibility.md section 9).

It applies only when the result is the same computation as the generic path (the model's own
function under :class:`~precisim.emulation.patch` 's matmul routing), checked by
:func:`chunkable`: both matmuls fake-quant (no matrix unit, no output format), and P's format
row-local along the keys (an element format with deterministic rounding, or blocks / a whole
row along the keys, no tensor-level scale). Anything else (per-tensor FP8 scaling of P,
stochastic rounding, a bit-exact unit, a different attention function) runs the generic path.

With an emulated softmax (the ``softmax`` op kind, docs/arithmetic.md section 7.8) the
``torch.softmax`` call below goes through the op kind's function mode like the generic path's,
and both GEMMs run over every key, as the generic path's do (a BLAS product's summation order
may depend on the number of keys: with MKL, P @ V over the first 480 of 1024 keys differs in
the last bits from the same product with zeros for the rest). An arbitrary unit's image of the
masked scores need not be an exact 0, so the softmax itself runs over only the first keys of a
chunk (those the mask leaves visible) where the unit *drops* entries far below their row's
maximum (``drop_gap``: :attr:`~precisim.emulation.functions.Softmax.drop_gap`, e.g. a
correctly rounded exp) and every later score of the chunk lies that far below its row's
maximum (:func:`drops_tail`, checked on the scores); the later probabilities are then exact
zeros, as in the generic path, and P is padded with them. Under telemetry the softmax runs
over those keys rounded up to whole vectors (:func:`softmax_row_length`), so that the
model's own float32 softmax it is compared with equals the whole row's, the later keys are
counted as elements only (zeros of both, where :func:`own_softmax_drops` holds), and P is
quantized whole as in the generic path. Otherwise (and with ``skip_keys=False``) the softmax
sees every row exactly as the generic path gives it. Both paths agree bit for bit, logits and
telemetry (tests/test_emulation_datapath.py).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from precisim.formats import FloatFormat, IntFormat, Rounding
from precisim.formats.scaling import ScaledFormat

from .gemm import quantize_operand, resolved_format
from .precision import ieee_fp32
from .recipe import AttentionSpec, GemmSpec, TensorSpec
from .telemetry import Telemetry

__all__ = ["chunkable", "chunked_attention", "is_standard_eager", "kv_operand",
           "softmax_row_length"]

#: query rows per chunk. A constant, so that the chunks, the keys each one multiplies over and
#: hence the BLAS summation order of every row depend on neither the batch size nor the
#: sequence length (docs/reproducibility.md section 9): a row's result is the same whatever
#: else is in the batch. One chunk of scores holds ``batch x heads x CHUNK_ROWS x keys`` floats.
CHUNK_ROWS = 128

_STANDARD: dict[Any, bool] = {}


def _reference_eager() -> Any:
    from transformers.models.llama import modeling_llama

    return modeling_llama.eager_attention_forward


def is_standard_eager(fn: Any) -> bool:
    """True if ``fn`` is (a copy of) transformers' Llama ``eager_attention_forward``."""
    hit = _STANDARD.get(fn)
    if hit is None:
        ref = _reference_eager()
        a, b = getattr(fn, "__code__", None), ref.__code__
        hit = fn is ref or (a is not None and a.co_code == b.co_code
                            and a.co_names == b.co_names and a.co_consts == b.co_consts
                            and a.co_varnames == b.co_varnames)
        _STANDARD[fn] = hit
    return hit


def _key_align(g: GemmSpec) -> int | None:
    """Key alignment that keeps P's quantization unchanged when keys are cut, or None when
    P's format is not row-local along the keys."""
    spec = g.input
    if spec is None:
        return 1
    fmt = resolved_format(spec, -1)
    if isinstance(fmt, FloatFormat | IntFormat):
        return None if Rounding.parse(spec.rounding) is Rounding.STOCHASTIC else 1
    if not isinstance(fmt, ScaledFormat) or fmt.tensor_scale or fmt.granularity.keep_axis \
            is not None or fmt.granularity.is_per_tensor():
        return None
    if Rounding.parse(spec.rounding) is Rounding.STOCHASTIC:
        return None
    blocks = fmt.granularity.blocks
    if len(blocks) != 1 or blocks[0][0] != -1:
        return None
    return blocks[0][1] or 1  # None: one scale per row (amax unchanged by exact zeros)


def chunkable(spec: AttentionSpec) -> int | None:
    """The key alignment for :func:`chunked_attention` under ``spec``, or None if it does not
    apply (see module doc)."""
    qk, pv = spec.qk, spec.pv
    for g in (qk, pv):
        if g is None or g.is_identity or g.unit is not None or g.output is not None:
            return None
    assert pv is not None
    return _key_align(pv)


def _key_ends(mask: torch.Tensor | None, n_q: int, n_k: int, rows: int, align: int
              ) -> list[tuple[int, ...]]:
    """Per row chunk and per batch element of the mask (one entry for a mask broadcast over
    the batch, or none), the number of leading keys that hold every key the mask leaves
    visible to that element's rows (rounded up to ``align``); all keys for an element with a
    fully masked row in the chunk (its softmax is uniform over every key) or without a mask.
    Per element, so that one sequence's padding does not change another's keys (and so its
    summation order)."""
    starts = range(0, n_q, rows)
    if mask is None:
        return [(n_k,) for _ in starts]
    vis = (mask > torch.finfo(mask.dtype).min / 2).expand(-1, -1, n_q, n_k)
    vis = vis.any(dim=1)  # (b, q, k)
    ends = []
    for r0 in starts:
        v = vis[:, r0:r0 + rows]
        whole = v.any(-1).all(-1).tolist()  # (b,): no fully masked row
        last = v.any(dim=1).int().cumsum(-1).argmax(-1).tolist()  # last visible key
        ends.append(tuple(min(n_k, -(-(j + 1) // align) * align) if ok else n_k
                          for ok, j in zip(whole, last, strict=True)))
    return ends


def _batch_groups(ends: tuple[int, ...]) -> list[tuple[slice, int]]:
    """``(batch slice, key end)`` runs of equal key ends (one run over the whole batch when
    every element has the same)."""
    if len(set(ends)) == 1:
        return [(slice(None), ends[0])]
    out: list[tuple[slice, int]] = []
    b0 = 0
    for i in range(1, len(ends) + 1):
        if i == len(ends) or ends[i] != ends[b0]:
            out.append((slice(b0, i), ends[b0]))
            b0 = i
    return out


class KeyEnds:
    """Caches :func:`_key_ends` for the mask object every layer of one forward shares."""

    def __init__(self) -> None:
        self._mask: torch.Tensor | None = None
        self._key: tuple[Any, ...] | None = None
        self._ends: list[tuple[int, ...]] = []

    def get(self, mask: torch.Tensor | None, n_q: int, n_k: int, rows: int, align: int
            ) -> list[tuple[int, ...]]:
        key = (n_q, n_k, rows, align, None if mask is None else mask._version)
        if mask is not self._mask or key != self._key:
            self._ends = _key_ends(mask, n_q, n_k, rows, align)
            self._mask, self._key = mask, key
        return self._ends

    def clear(self) -> None:
        self._mask, self._key, self._ends = None, None, []


#: rows are padded with -inf to a multiple of this many keys before the softmax (see
#: :func:`softmax_row_length`)
SOFTMAX_ROW_ALIGN = 32


def softmax_row_length(ke: int, n_k: int) -> int:
    """How many keys of a row the softmax runs over when only the first ``ke`` of ``n_k`` can
    be visible: ``ke`` rounded up to :data:`SOFTMAX_ROW_ALIGN` (at most ``n_k``), the others
    at -inf. torch's CPU softmax reduces a row with vector accumulators indexed by position
    and handles a row shorter than one vector by another route; appended exact zeros
    (exp(-inf)) leave every accumulator, and so every probability, unchanged once the row holds
    whole vectors. tests/test_emulation_attention.py checks that ``softmax`` over this length
    equals the softmax over the full row bit for bit, so a torch whose kernel breaks it fails
    there, not silently."""
    return min(n_k, -(-ke // SOFTMAX_ROW_ALIGN) * SOFTMAX_ROW_ALIGN)


def drops_tail(x: torch.Tensor, c: int, gap: float) -> bool:
    """Whether every row of ``x`` (..., keys) has a finite maximum among its first ``c``
    entries and every later entry more than ``gap`` below it (NaN anywhere: False): then an
    emulated softmax with ``drop_gap <= gap`` gives those entries +0 and cutting them off
    leaves the others unchanged (:attr:`~precisim.emulation.functions.Softmax.drop_gap`). The
    difference is taken in float64, whose rounding is monotonic and -gap one of its values,
    so a float64 difference below -gap means an exact one below it."""
    top = x[..., :c].amax(-1).double()
    tail = x[..., c:].amax(-1).double()
    return bool(((tail - top < -gap) & torch.isfinite(top)).all())


@functools.cache
def own_softmax_drops(gap: float, device: str) -> bool:
    """Whether torch's float32 softmax on ``device`` gives exactly +0 to entries ``gap`` or
    more below their row's maximum (its exp underflows there), checked once per process on
    rows whose vector body and scalar remainder both hold such entries (exp is monotonic, so
    the entries at ``-gap`` bound every lower one). Telemetry compares an emulated softmax
    with this one: where it holds, the keys a dropping softmax cuts off are zeros of both, and
    their counts are their number alone."""
    x = torch.full((3, 67), -gap, dtype=torch.float32, device=device)
    x[0, 0], x[1, 66], x[2, 5] = 0.0, 0.0, 0.0
    x[2, 40:] = -float("inf")
    # (the aten op: an emulated softmax's function mode, active in the attention forward
    # that calls this, intercepts torch.softmax, not it)
    p = torch.ops.aten._softmax.default(x, -1, False)
    return bool((p == 0).sum() == 3 * 66) and bool(torch.equal(p.amax(-1), torch.ones(3)))


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _head_local(spec: TensorSpec | None) -> bool:
    """True if quantizing a (b, h, n, d) operand to ``spec`` treats every head alike whatever
    the other heads hold: deterministic rounding, and no finite block across the batch or
    head axes (a scale over a whole axis or the whole tensor sees the same maximum in a
    repeated tensor as in the original)."""
    if spec is None:
        return True
    if Rounding.parse(spec.rounding) is Rounding.STOCHASTIC:
        return False
    fmt = resolved_format(spec, -1)
    if not isinstance(fmt, ScaledFormat):
        return True
    return all(size is None or size == 1 or axis in (-1, -2, 2, 3)
               for axis, size in fmt.granularity.blocks)


class _Repeated:
    """Telemetry of a GQA operand quantized before its heads are repeated: every count is
    that of the repeated tensor (each kv head's events happen ``groups`` times)."""

    def __init__(self, telemetry: Telemetry, groups: int) -> None:
        self.telemetry, self.groups = telemetry, groups

    def add(self, module: str, role: str, counts: dict[str, torch.Tensor]) -> None:
        self.telemetry.add(module, role, {k: v * self.groups for k, v in counts.items()})


def kv_operand(x: torch.Tensor, groups: int, spec: TensorSpec | None,
               telemetry: Telemetry | None = None, where: tuple[str, str] = ("", "")
               ) -> tuple[torch.Tensor, int]:
    """``(values, g)``: ``repeat_kv(x, groups)`` quantized to ``spec`` (float32 values) is
    ``repeat_kv(values, g)``. The kv heads are quantized once (``g = groups``) where that is
    the same (:func:`_head_local`), with the repeated tensor's telemetry counts; otherwise
    the repeated tensor is quantized (``g = 1``)."""
    if groups == 1 or not _head_local(spec):
        return quantize_operand(repeat_kv(x, groups), spec, telemetry=telemetry,
                                where=where).values, 1
    tel = None if telemetry is None else _Repeated(telemetry, groups)
    return quantize_operand(x, spec, telemetry=tel,  # type: ignore[arg-type]
                            where=where).values, groups


def _repeated_operand(x: torch.Tensor, groups: int, spec: TensorSpec | None,
                      telemetry: Telemetry | None, where: tuple[str, str]) -> torch.Tensor:
    """``repeat_kv(x, groups)`` quantized to ``spec`` (float32 values): :func:`kv_operand`
    repeated."""
    return repeat_kv(*kv_operand(x, groups, spec, telemetry, where))


@ieee_fp32
def chunked_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                      spec: AttentionSpec, align: int, *, name: str,
                      telemetry: Telemetry | None, key_ends: KeyEnds, skip_keys: bool = True,
                      drop_gap: float | None = None) -> tuple[torch.Tensor, None]:
    """The standard eager attention under ``spec`` (see module doc); returns
    ``(output (b, q, h, d) in the query's dtype, None)``. ``skip_keys=False``: every key of
    every row chunk is computed. ``drop_gap`` (an emulated softmax that drops entries that far
    below their row's maximum): the GEMMs run over every key and the softmax over the visible
    ones where :func:`drops_tail` holds (see module doc)."""
    qk, pv = spec.qk, spec.pv
    assert qk is not None and pv is not None
    dtype = query.dtype
    groups = getattr(module, "num_key_value_groups", 1)
    qq = quantize_operand(query, qk.input, telemetry=telemetry, where=(f"{name}.qk", "input"))
    kq = _repeated_operand(key, groups, qk.weight, telemetry, (f"{name}.qk", "weight"))
    vq = _repeated_operand(value.transpose(-1, -2), groups, pv.weight, telemetry,
                           (f"{name}.pv", "weight")).transpose(-1, -2)
    q = qq.values
    pow2 = scaling > 0 and math.frexp(scaling)[0] == 0.5
    if pow2:  # exact: scaling the fp32 operand by 2^n scales every partial sum by 2^n
        q = q * scaling
    b, h, n_q, d = q.shape
    n_k = kq.shape[-2]
    rows = min(n_q, CHUNK_ROWS)
    ends = key_ends.get(mask, n_q, n_k, rows, align) if skip_keys else [(n_k,)] * len(
        range(0, n_q, rows))
    out = torch.empty(b, h, n_q, vq.shape[-1], dtype=torch.float32, device=q.device)
    kt = kq.transpose(-1, -2)

    def chunk(bs: slice, r0: int, r1: int, ke: int) -> torch.Tensor:
        """Rows ``r0:r1`` of batch elements ``bs`` (fp32) over the first ``ke`` keys; a
        dropping softmax: the GEMMs over every key, the softmax cut at ``ke`` where
        :func:`drops_tail` allows."""
        cut = None
        if drop_gap is not None:
            cut, ke = ke, n_k
        s = torch.matmul(q[bs, :, r0:r1], kt[bs, :, :, :ke]).to(dtype)
        if not pow2:
            s = s * scaling
        if mask is not None:  # (in place on the fresh scores where that keeps the dtype)
            m = mask[bs if mask.shape[0] > 1 else slice(None), :, r0:r1, :ke]
            s = s.add_(m) if m.dtype == s.dtype and s.dtype == dtype else s + m
        v = vq[bs, :, :ke]
        if cut is not None and cut < ke and drops_tail(s, cut, drop_gap) and (
                telemetry is None or own_softmax_drops(drop_gap, s.device.type)):
            if telemetry is None:
                # (cut is a multiple of P's blocks: quantized alone as within the row)
                p = torch.softmax(s[..., :cut], dim=-1, dtype=torch.float32).to(dtype)
                pq = quantize_operand(p, pv.input, where=(f"{name}.pv", "input"))
                pz = torch.nn.functional.pad(pq.values, (0, ke - cut))  # the dropped zeros
                return torch.matmul(pz, v)
            # telemetry: the softmax over whole vectors (its own fp32 softmax then equals
            # the whole row's, softmax_row_length), the dropped keys beyond them counted as
            # zeros of both (own_softmax_drops), and P quantized whole as in the generic path
            kp = softmax_row_length(cut, ke)
            p = torch.softmax(s[..., :kp], dim=-1, dtype=torch.float32).to(dtype)
            telemetry.add_numel(name, "output", p[..., 0].numel() * (ke - kp))
            pq = quantize_operand(torch.nn.functional.pad(p, (0, ke - kp)), pv.input,
                                  telemetry=telemetry, where=(f"{name}.pv", "input"))
            return torch.matmul(pq.values, v)
        kp = softmax_row_length(ke, n_k)
        if ke < kp:  # the skipped keys up to kp at -inf (see softmax_row_length)
            s = torch.nn.functional.pad(s, (0, kp - ke), value=-math.inf)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(dtype)
        p = p if kp == ke else p[..., :ke]
        pq = quantize_operand(p, pv.input, telemetry=telemetry, where=(f"{name}.pv", "input"))
        return torch.matmul(pq.values, v)

    for i, r0 in enumerate(range(0, n_q, rows)):
        r1 = min(n_q, r0 + rows)
        for bs, ke in _batch_groups(ends[i]):
            out[bs, :, r0:r1] = chunk(bs, r0, r1, ke)
    return out.to(dtype).transpose(1, 2).contiguous(), None
