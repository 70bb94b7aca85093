"""Shared test fixtures: deterministic eager kernels unless a test asks for compilation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from precisim.formats import set_backend

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PRECISIM_SHARED", REPO.parent / "shared"))


@pytest.fixture(autouse=True)
def _eager_backend():
    """Tests run the eager kernels by default (compilation is tested explicitly)."""
    set_backend("eager")
    yield
    set_backend("eager")
