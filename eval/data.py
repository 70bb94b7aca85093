"""Evaluation text, read with Hugging Face ``datasets`` from a local file or a hub dataset.

Local files: ``.txt`` / ``.raw`` (plain text, line breaks kept), ``.json`` / ``.jsonl`` and
``.parquet`` (a text column, ``text`` by default); rows are joined with the separator that
lm-evaluation-harness' WikiText task uses between documents (none for plain text, whose lines
keep their ``\\n``; ``"\\n\\n"`` between json/parquet rows). A hub dataset is named
``name[:config]`` (e.g. ``wikitext:wikitext-2-raw-v1``) and needs the network; without it the
error says so and asks for a local path. ``PRECISIM_DATA`` gives the default path.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataError", "Text", "data_source", "load_text", "prefix_token", "tokenize"]

DATA_ENV = "PRECISIM_DATA"
_BUILDERS = {".txt": "text", ".raw": "text", ".text": "text", ".json": "json",
             ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Evaluation data could not be read (the message names the source)."""


@dataclass(frozen=True)
class Text:
    """A text and where it came from (``sha256`` of its UTF-8 bytes)."""

    text: str
    source: str
    sha256: str


def data_source(source: str | Path | None = None) -> str:
    """``source``, or ``$PRECISIM_DATA`` when it is None (a clear error when neither is set)."""
    if source is None or str(source) == "":
        source = os.environ.get(DATA_ENV)
        if not source:
            raise DataError(f"no data given: pass a path (text, jsonl, parquet) or set "
                            f"${DATA_ENV}")
    return str(source)


def prefix_token(tokenizer: object) -> int:
    """The token prepended to an evaluated text: the tokenizer's BOS, else EOS, else 0."""
    return next((t for t in (getattr(tokenizer, "bos_token_id", None),
                             getattr(tokenizer, "eos_token_id", None)) if t is not None), 0)


def load_text(source: str | Path | None = None, *, split: str = "test",
              column: str = "text") -> Text:
    """Read the evaluation text from ``source`` (or ``$PRECISIM_DATA``) with ``datasets``."""
    src = data_source(source)
    p = Path(src).expanduser()
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if p.suffix.lower() in _BUILDERS or p.exists():
        if not p.is_file():
            raise DataError(f"data file {src!r} does not exist")
        builder = _BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise DataError(f"data file {src!r}: unknown type {p.suffix!r}; accepted: "
                            f"{', '.join(sorted(_BUILDERS))}")
        _check_file(p, src, builder)
        kw = {"keep_linebreaks": True} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=str(p), split="train", **kw)
        except Exception as e:  # datasets raises many types for unreadable files
            cause = e.__cause__ or e.__context__
            why = f"{type(e).__name__}: {e}" + (
                f" ({type(cause).__name__}: {str(cause)[:300]})" if cause is not None else "")
            raise DataError(f"could not read {src!r} as {builder}: {why}") from None
        sep = "" if builder == "text" else "\n\n"
    else:
        name, _, config = src.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as e:
            raise DataError(f"could not load dataset {src!r} from the Hugging Face Hub "
                            f"({type(e).__name__}: {str(e)[:200]}). No hub is reachable from "
                            "here: pass a local text/jsonl/parquet file instead") from None
        sep = "\n\n"
    if column not in ds.column_names:
        raise DataError(f"{src!r} has no column {column!r}; columns: "
                        f"{', '.join(ds.column_names)}")
    text = sep.join(t for t in ds[column] if t is not None)
    if not text.strip():
        raise DataError(f"{src!r} contains no text")
    return Text(text, src, hashlib.sha256(text.encode()).hexdigest())


def _check_file(p: Path, src: str, builder: str) -> None:
    """Refuse, naming the file and the reason, what ``datasets`` would fail on with an opaque
    error: an empty file, and for plain text a binary file (a NUL byte) or one that is not
    UTF-8 (e.g. Latin-1)."""
    try:
        size = p.stat().st_size
    except OSError as e:
        raise DataError(f"cannot read data file {src!r}: {e}") from None
    if size == 0:
        raise DataError(f"data file {src!r} is empty")
    if builder != "text":
        return
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {src!r}: {e}") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(f"data file {src!r} is not text: it holds a NUL byte at offset {nul} "
                        "(a binary file?); give a UTF-8 text file")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {src!r} is not UTF-8: byte 0x{data[e.start]:02x} at offset "
                        f"{e.start} is invalid (a Latin-1 / Windows-1252 file? convert it, e.g. "
                        "iconv -f latin1 -t utf-8)") from None


def tokenize(tokenizer: object, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` (no special tokens), at most ``max_tokens`` (the first ones).

    Only a prefix of a long text is tokenized when a budget is given (grown until it holds
    enough tokens), so a quick run does not pay for the whole corpus; the tokens are those of
    the full text's tokenization except possibly at the cut, which is dropped.
    """
    def enc(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])  # type: ignore[operator]

    if max_tokens is None:
        return enc(text)
    if max_tokens < 1:
        raise DataError(f"token budget {max_tokens} must be at least 1")
    n_chars = max_tokens * 6
    while True:
        chunk = text[:n_chars]
        ids = enc(chunk)
        if n_chars >= len(text):
            return ids[:max_tokens]
        if len(ids) > max_tokens + 1:  # drop the token at the cut, it may be partial
            return ids[:max_tokens]
        n_chars *= 2
