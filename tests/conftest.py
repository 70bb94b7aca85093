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
