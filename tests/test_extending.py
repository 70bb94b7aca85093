"""docs/extending.md's worked example 'A new matrix-unit field', executed as written: a field
no kernel models is refused everywhere (naming it), and a kernel that declares it computes it.
(The other two examples are tests/test_rounding_table.py::test_one_row_drives_every_layer and
tests/test_emulation_opkinds.py.)"""

from __future__ import annotations

import re
from pathlib import Path

from precisim.emulation.matmul import KERNELS

DOC = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text()


def _example(section: str) -> str:
    body = DOC.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)[-1]


def test_a_new_matrix_unit_field() -> None:
    ns: dict = {}
    try:
        exec(compile(_example("A new matrix-unit field"), "docs/extending.md", "exec"), ns)
    finally:
        if "int-chain-shift" in KERNELS:
            KERNELS.unregister("int-chain-shift")
    assert "it does not model output_shift=3" in ns["refusal"]
    assert "not 'reference': it does not model output_shift=3" in ns["refusal"]
    assert ns["shifted"].item() == 32.0
    # the default value of the new field changes nothing: every kernel takes such a unit
    unit0 = ns["ShiftedUnit"]("u0", "e4m3", block_size=32, alignment_bits=13)
    assert ns["matmul"](ns["a"], ns["b"], unit0).item() == 4.0
    try:
        ns["ShiftedUnit"]("bad", output_shift=99)
    except ValueError as e:
        assert "output_shift=99 is not valid" in str(e)
    else:  # pragma: no cover
        raise AssertionError("an impossible output_shift was accepted")
