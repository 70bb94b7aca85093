"""Tests' helper: run a block with some op kinds unregistered (as before they existed)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from precisim.emulation.opkinds import OP_KINDS


@contextlib.contextmanager
def unregistered(kinds: Iterable[str]) -> Iterator[None]:
    """Unregister ``kinds`` for the block; afterwards the registry holds every kind again, in
    its former order (other tests read the registry's order)."""
    kinds = tuple(kinds)
    order = OP_KINDS.names()
    saved = [OP_KINDS.get(k) for k in order]
    for k in kinds:
        OP_KINDS.unregister(k)
    try:
        yield
    finally:
        for k in order:
            if k not in kinds:
                OP_KINDS.unregister(k)
        for k in saved:
            OP_KINDS.register(k.name, k)
        assert OP_KINDS.names() == order
