"""Recorded outputs of real NVIDIA tensor cores, loaded as tensors with their preset.

The data are the ``model_validation/`` files of Khattak & Mikaitis, "Accurate Models of NVIDIA
Tensor Cores" (arXiv 2512.07004; repository north-numerical-computing/MATLAB-tensor-core,
BSD 2-Clause), kept in ``<shared>/data/tensor-core-recordings/``. Their layout, as its
``README.md`` describes it: ``<GPU>/<input format>/`` holds, per sample (one line each),

* ``a_<GPU>_<fmt>.txt`` / ``b_<GPU>_<fmt>.txt``: the K elements of one row of A and one column
  of B, as big-endian hex of the fp32 value of each element;
* ``c_<GPU>_fp32.txt``: the addend C as 32 binary digits of its fp32 bits; for fp16-output
  runs C was first rounded to fp16 (RNE) on the GPU; for H100 E4M3/E5M2 the outputs were
  recorded with C = 0, so the c file is not an input there;
* ``d_<GPU>_fp32.txt`` / ``d_<GPU>_fp16.txt``: the output D as 32 binary digits of its fp32
  bits (fp16 outputs widened exactly to fp32). The fp16 output of the FP8 runs has no known
  model and is not offered here.

:func:`load_recording` applies those two README rules (C = 0 for FP8; C rounded to fp16 for
fp16 outputs), so ``matmul(a.unsqueeze(1), b.unsqueeze(2), preset, c)`` is what the GPU did.

The shared folder is ``$PRECISIM_SHARED`` when set, else ``../shared`` beside the repository
(the layout of a fresh clone); every function also takes an explicit ``root``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from precisim.formats import quantize

__all__ = ["RECORDED_CASES", "Recording", "RecordingCase", "RecordingError",
           "available_recordings", "load_recording", "recordings_dir"]


class RecordingError(FileNotFoundError):
    """The recordings (or one of their files) are missing or malformed."""


@dataclass(frozen=True)
class RecordingCase:
    """One recorded configuration: GPU, input format, output format and the matching preset."""

    gpu: str
    fmt: str
    out: str
    preset: str

    @property
    def name(self) -> str:
        return f"{self.gpu}-{self.fmt}-{self.out}"


RECORDED_CASES: tuple[RecordingCase, ...] = tuple(RecordingCase(*c) for c in (
    ("V100", "fp16", "fp32", "v100-fp16"),
    ("V100", "fp16", "fp16", "v100-fp16-fp16out"),
    ("A100", "fp16", "fp32", "a100-fp16"),
    ("A100", "fp16", "fp16", "a100-fp16-fp16out"),
    ("A100", "bf16", "fp32", "a100-bf16"),
    ("A100", "tf32", "fp32", "a100-tf32"),
    ("H100", "fp16", "fp32", "h100-fp16"),
    ("H100", "fp16", "fp16", "h100-fp16-fp16out"),
    ("H100", "bf16", "fp32", "h100-bf16"),
    ("H100", "tf32", "fp32", "h100-tf32"),
    ("H100", "E4M3", "fp32", "h100-e4m3"),
    ("H100", "E5M2", "fp32", "h100-e5m2"),
))


@dataclass(frozen=True)
class Recording:
    """The samples of one recorded configuration.

    ``a``, ``b``: (n, K) float32, one dot product per row. ``c``: (n,) float32, the addend as
    the GPU used it. ``d_bits``: (n,) int64, the fp32 bits of the recorded outputs (``d``:
    the same as float32 values). ``preset``: the :func:`precisim.emulation.get_unit` name
    that models the unit. ``path``: the folder the files came from.
    """

    case: RecordingCase
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    d_bits: torch.Tensor
    path: Path

    @property
    def preset(self) -> str:
        return self.case.preset

    @property
    def d(self) -> torch.Tensor:
        return _as_int32(self.d_bits).view(torch.float32)

    def __len__(self) -> int:
        return int(self.a.shape[0])


def recordings_dir(root: str | Path | None = None) -> Path:
    """The recordings folder: ``<root>/data/tensor-core-recordings`` with ``root`` the given
    shared folder, else ``$PRECISIM_SHARED``, else ``../shared`` beside the repository."""
    if root is None:
        env = os.environ.get("PRECISIM_SHARED")
        root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    return Path(root) / "data" / "tensor-core-recordings"


def _case(gpu: str, fmt: str, out: str) -> RecordingCase:
    for c in RECORDED_CASES:
        if (c.gpu.lower(), c.fmt.lower(), c.out.lower()) == (gpu.lower(), fmt.lower(),
                                                              out.lower()):
            return c
    known = ", ".join(f"({c.gpu!r}, {c.fmt!r}, {c.out!r})" for c in RECORDED_CASES)
    raise KeyError(f"no recording for gpu={gpu!r}, fmt={fmt!r}, out={out!r}; known: {known}")


def available_recordings(root: str | Path | None = None) -> list[RecordingCase]:
    """The cases of :data:`RECORDED_CASES` whose files are present (empty if none are)."""
    base = recordings_dir(root)
    return [c for c in RECORDED_CASES
            if (base / c.gpu / c.fmt / f"d_{c.gpu}_{c.out}.txt").is_file()]


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise RecordingError(f"tensor-core recording file {str(path)!r} not found (set "
                             "PRECISIM_SHARED to the folder holding data/tensor-core-recordings)")
    with open(path) as f:
        return [line for line in f if line.strip()]


def _as_int32(bits: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (int64) as the int32 with the same bits."""
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)


def _hex_rows(path: Path) -> torch.Tensor:
    try:
        rows = [[int(h, 16) for h in line.split()] for line in _lines(path)]
        bits = torch.tensor(rows, dtype=torch.int64)
    except ValueError as e:  # bad hex digit, or rows of different lengths
        raise RecordingError(f"{str(path)!r} is not rows of hex fp32 words: {e}") from None
    return _as_int32(bits).view(torch.float32)


def _bin_words(path: Path) -> torch.Tensor:
    try:
        return torch.tensor([int(line.strip(), 2) for line in _lines(path)], dtype=torch.int64)
    except ValueError as e:
        raise RecordingError(f"{str(path)!r} is not lines of 32 binary digits: {e}") from None


def load_recording(gpu: str, fmt: str, out: str = "fp32", root: str | Path | None = None
                   ) -> Recording:
    """The recorded samples of ``gpu`` (``"V100"``, ``"A100"``, ``"H100"``) with input format
    ``fmt`` (``"fp16"``, ``"bf16"``, ``"tf32"``, ``"E4M3"``, ``"E5M2"``) and output ``out``
    (``"fp32"`` or ``"fp16"``), with C as the GPU used it (see the module docstring).

    Raises ``KeyError`` for a configuration that was not recorded and :class:`RecordingError`
    (naming the path) when the files are missing or malformed.
    """
    case = _case(gpu, fmt, out)
    d = recordings_dir(root) / case.gpu / case.fmt
    if not d.is_dir():
        raise RecordingError(f"tensor-core recordings not found at {str(d)!r} (set "
                             "PRECISIM_SHARED to the folder holding data/tensor-core-recordings)")
    a = _hex_rows(d / f"a_{case.gpu}_{case.fmt}.txt")
    b = _hex_rows(d / f"b_{case.gpu}_{case.fmt}.txt")
    c = _as_int32(_bin_words(d / f"c_{case.gpu}_fp32.txt")).view(torch.float32)
    dd = _bin_words(d / f"d_{case.gpu}_{case.out}.txt")
    if case.fmt in ("E4M3", "E5M2"):  # README: recorded with C = 0; the c file is no input
        c = torch.zeros_like(c)
    if case.out == "fp16":  # README: C was first rounded to fp16 (RNE) on the GPU
        c = quantize(c, "fp16")
    n = {a.shape[0], b.shape[0], c.shape[0], dd.shape[0]}
    if len(n) != 1 or a.shape != b.shape:
        raise RecordingError(f"{str(d)!r}: files disagree in length or K (a {tuple(a.shape)}, "
                             f"b {tuple(b.shape)}, c {tuple(c.shape)}, d {tuple(dd.shape)})")
    return Recording(case, a, b, c, dd, d)
