"""lm-evaluation-harness adapter: run lm-eval tasks on a model under an emulation recipe.

Optional extra (``pip install 'precisim[lmeval]'`` or ``pip install lm_eval``)::

    from precisim.eval.lmeval import run_lm_eval
    out = run_lm_eval(model, tokenizer, "mxfp4", ["my_task"], task_paths=["tasks/"])
    out["tasks"]["my_task"]["acc"]

The already loaded ``transformers`` model is wrapped in lm-eval's ``HFLM`` and evaluated with
``lm_eval.simple_evaluate`` inside ``with emulate(model, recipe):`` (``recipe=None``: the model
as it is), so every forward lm-eval issues runs the emulated arithmetic; the model is restored
on exit, also when the evaluation raises.

Tasks come from local task YAML files or folders (``task_paths``), e.g. a local JSON-lines
dataset through ``dataset_path: json`` and ``dataset_kwargs: {data_files: {test: f.jsonl}}``
(``datasets`` resolves a relative data file against the working directory). By default the
call is offline (``HF_HUB_OFFLINE`` for its duration) and only the local task files are
searched: lm-eval's ~15,000 built-in task configs download their datasets from the Hugging
Face Hub and indexing them alone takes ~25 s; ``builtin_tasks=True, offline=False`` allows them
where the Hub is reachable.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from precisim.emulation import Recipe, emulate, get_recipe

__all__ = ["LM_EVAL_INSTALL_HINT", "LmEvalError", "run_lm_eval"]

LM_EVAL_INSTALL_HINT = ("the lm-evaluation-harness adapter needs the optional package lm_eval: "
                        "`pip install lm_eval` (or the extra: `pip install 'precisim[lmeval]'`)")


class LmEvalError(RuntimeError):
    """An lm-eval task cannot be run as asked (the message names the task or path)."""


def _import_lm_eval() -> tuple[Any, Any, Any]:
    """``(lm_eval module, HFLM class, TaskManager class)``, or an ImportError with the hint."""
    try:
        lm_eval = importlib.import_module("lm_eval")
        hf = importlib.import_module("lm_eval.models.huggingface")
        tasks = importlib.import_module("lm_eval.tasks")
    except ImportError as e:
        raise ImportError(f"{LM_EVAL_INSTALL_HINT} ({e})") from e
    return lm_eval, hf.HFLM, tasks.TaskManager


@contextlib.contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """No Hugging Face Hub access for the duration: ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``
    in the environment and in the already imported ``huggingface_hub`` / ``datasets`` (which
    read the variables once, at import), so a hub dataset fails at once instead of retrying."""
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved_attrs: list[tuple[Any, str, Any]] = []
    for mod_name in ("huggingface_hub.constants", "datasets.config"):
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(mod_name)
            for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
                if hasattr(mod, attr):
                    saved_attrs.append((mod, attr, getattr(mod, attr)))
                    setattr(mod, attr, True)
    os.environ.update({k: "1" for k in saved_env})
    try:
        yield
    finally:
        for mod, attr, val in reversed(saved_attrs):
            setattr(mod, attr, val)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_tasks(tasks: str | Sequence[str]) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else tasks
    if not isinstance(names, Sequence) or not names:
        raise ValueError(f"tasks must be a task name or a non-empty list of names, got {tasks!r}")
    for t in names:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"task names must be non-empty strings, got {t!r}")
    return list(names)


def _check_paths(task_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
                 ) -> list[str]:
    items = [task_paths] if isinstance(task_paths, (str, os.PathLike)) else list(task_paths)
    out: list[str] = []
    for p in items:
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"task_paths entries must be paths, got {p!r}")
        path = Path(p).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"task path {str(p)!r} does not exist (a task YAML file or a "
                                    "folder of them)")
        if path.is_file() and path.suffix not in (".yaml", ".yml"):
            raise ValueError(f"task path {str(p)!r} is not a YAML file (.yaml / .yml) or folder")
        out.append(str(path.resolve()))
    return out


def _check_numbers(limit: int | float | None, num_fewshot: int, batch_size: int,
                   bootstrap_iters: int) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or not limit > 0 or (isinstance(limit, float) and limit > 1)):
        raise ValueError(f"limit must be None, a positive number of examples or a fraction in "
                         f"(0, 1], got {limit!r}")
    for name, val, low in (("num_fewshot", num_fewshot, 0), ("batch_size", batch_size, 1),
                           ("bootstrap_iters", bootstrap_iters, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {val!r}")


_RESERVED = frozenset({
    "model", "model_args", "tasks", "task_manager", "limit", "num_fewshot", "batch_size",
    "bootstrap_iters", "log_samples", "random_seed", "numpy_random_seed", "torch_random_seed",
    "fewshot_random_seed"})


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None  # lm-eval writes "N/A" for a stderr it did not compute


def _plain_metrics(entry: Mapping[str, Any]) -> dict[str, float | None]:
    """``{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...}`` -> ``{"acc": 0.5,
    "acc_stderr": None}``; a metric under a filter other than ``none`` keeps it as
    ``"metric,filter"``."""
    out: dict[str, float | None] = {}
    for key, val in entry.items():
        if "," not in key:
            continue  # alias, name, sample_len, ...
        metric, _, filt = key.partition(",")
        out[metric if filt == "none" else key] = _number(val)
    return out


def run_lm_eval(model: Any, tokenizer: Any, recipe: Recipe | str | None,
                tasks: str | Sequence[str], *,
                task_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = (),
                limit: int | float | None = None, num_fewshot: int = 0, batch_size: int = 1,
                bootstrap_iters: int = 1000, builtin_tasks: bool = False, offline: bool = True,
                max_length: int | None = None, random_seed: int = 0,
                **simple_evaluate_kwargs: Any) -> dict[str, Any]:
    """Evaluate lm-eval ``tasks`` on ``model`` under ``recipe`` and return plain metrics.

    Args:
        model: a loaded ``transformers`` causal LM (e.g. from :func:`precisim.emulation.
            load_model`); it is evaluated where it is (device, dtype) and restored afterwards.
        tokenizer: its ``transformers`` tokenizer.
        recipe: a :class:`Recipe` or preset name run through :func:`emulate` for the whole
            evaluation; ``None`` evaluates the unpatched model.
        tasks: task (or group / tag) names defined in ``task_paths`` (or built in, see
            ``builtin_tasks``).
        task_paths: task YAML files or folders registered with lm-eval's ``TaskManager``.
        limit: at most this many examples per task (a float in (0, 1]: that fraction).
        num_fewshot: few-shot examples per prompt (a task whose YAML fixes 0 keeps 0).
        batch_size: lm-eval's batch size.
        bootstrap_iters: bootstrap resamples for stderrs of non-mean metrics (0: none; mean
            metrics such as ``acc`` get an analytic stderr; lm-eval's default is 100000).
        builtin_tasks: also search lm-eval's own task registry (datasets from the Hub).
        offline: no Hugging Face Hub access during the call (a hub dataset fails at once).
        max_length: the context length lm-eval truncates to (default: the model's).
        random_seed: the seed of python, numpy, torch and the few-shot sampler.
        **simple_evaluate_kwargs: passed on to ``lm_eval.simple_evaluate``.

    Returns:
        ``{"recipe": name or None, "tasks": {task: {metric: value}}, "samples": {task: n},
        "num_fewshot": {task: k}, "telemetry": emulation totals or None, "lm_eval_version":
        str}``; metric names without lm-eval's ``,none`` filter suffix, a stderr that was not
        computed is ``None``.

    Raises:
        ImportError: lm_eval is not installed (the message names the install command).
        ValueError / TypeError / FileNotFoundError: bad arguments, naming the bad value.
        LmEvalError: an unknown task name, or a task whose dataset is not available offline.
    """
    names = _check_tasks(tasks)
    paths = _check_paths(task_paths)
    _check_numbers(limit, num_fewshot, batch_size, bootstrap_iters)
    if not isinstance(random_seed, int) or isinstance(random_seed, bool):
        raise ValueError(f"random_seed must be an integer, got {random_seed!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be None or a positive integer, got {max_length!r}")
    if not paths and not builtin_tasks:
        raise ValueError("no task_paths given and builtin_tasks=False: pass the task YAML "
                         "files or folders that define " + ", ".join(map(repr, names)))
    clash = sorted(set(simple_evaluate_kwargs) & _RESERVED)
    if clash:
        raise TypeError(f"run_lm_eval sets {', '.join(clash)} itself; use its own arguments "
                        "(lm_eval.simple_evaluate keywords it does not set pass through)")
    rec = None if recipe is None else get_recipe(recipe)

    import transformers  # a dependency of lm_eval's HF wrapper

    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError("model must be a loaded transformers.PreTrainedModel, got "
                        f"{type(model).__name__}")
    if not isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        raise TypeError("tokenizer must be a transformers tokenizer, got "
                        f"{type(tokenizer).__name__}")

    lm_eval, hflm_cls, task_manager_cls = _import_lm_eval()
    with _hub_offline(offline):
        manager = task_manager_cls(include_path=paths or None, include_defaults=builtin_tasks)
        known = set(manager.all_tasks)
        unknown = [t for t in names if t not in known]
        if unknown:
            local = sorted(task_manager_cls(include_path=paths, include_defaults=False)
                           .all_tasks) if paths else []
            hint = ("" if builtin_tasks else "; lm-eval's built-in tasks (hellaswag, arc_easy, "
                    "...) download their datasets from the Hugging Face Hub and are searched "
                    "only with builtin_tasks=True (and offline=False where the Hub is "
                    "reachable)")
            raise LmEvalError(f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}: not "
                              f"defined in task_paths {paths} (tasks found there: "
                              f"{', '.join(local) or 'none'}){hint}")
        lm = hflm_cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                      max_length=max_length)
        ctx = emulate(model, rec) if rec is not None else contextlib.nullcontext()
        try:
            with ctx as em:
                raw = lm_eval.simple_evaluate(
                    model=lm, tasks=names, task_manager=manager, limit=limit,
                    num_fewshot=num_fewshot, batch_size=batch_size,
                    bootstrap_iters=bootstrap_iters, log_samples=False,
                    random_seed=random_seed, numpy_random_seed=random_seed,
                    torch_random_seed=random_seed, fewshot_random_seed=random_seed,
                    **simple_evaluate_kwargs)
        except ConnectionError as e:  # datasets' OfflineModeIsEnabled and network failures
            why = ("offline=True: the Hub is not contacted" if offline
                   else "the Hub could not be reached")
            raise LmEvalError(f"a dataset of task(s) {', '.join(map(repr, names))} is not "
                              f"available locally ({why}): {e}. Use a task YAML with a local "
                              "file (dataset_path: json, dataset_kwargs: {data_files: ...})"
                              ) from e
    if raw is None:  # lm-eval returns None on non-zero ranks
        raise LmEvalError("lm_eval.simple_evaluate returned no results (a non-zero rank of a "
                          "distributed run?)")
    results: Mapping[str, Mapping[str, Any]] = raw.get("results", {})
    return {
        "recipe": rec.name if rec is not None else None,
        "tasks": {t: _plain_metrics(r) for t, r in results.items()},
        "samples": {t: int(n.get("effective", n.get("original", 0)))
                    for t, n in raw.get("n-samples", {}).items()},
        "num_fewshot": {t: int(k) for t, k in raw.get("n-shot", {}).items()},
        "telemetry": em.telemetry.totals() if rec is not None and em.telemetry else None,
        "lm_eval_version": str(raw.get("lm_eval_version") or getattr(lm_eval, "__version__", "")),
    }
