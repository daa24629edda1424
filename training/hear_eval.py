"""Downstream (HEAR) evaluation of several checkpoints over a tasks directory: the runner.

For each checkpoint, heareval's embeddings runner and predictions runner are run (through
:mod:`training.heareval_compat`, which shims heareval's known breakages without editing it),
and every ``test.predicted-scores.json`` is gathered into one table (CSV and Markdown) and a
bar chart (:mod:`training.hear_scores`).

Layout of an output folder::

    <out>/tasks/<task>                   links to the valid tasks only (what heareval iterates)
    <out>/embeddings/<label>/<module>/<task>/   heareval's own files, per checkpoint
    <out>/hear_status.json               what ran, what was skipped, what failed and why
    <out>/hear_scores.csv / .md / .png   the aggregated scores

The default tasks directory is a generated suite (:func:`training.hear_tasks.write_task_suite`:
scene multiclass, k-fold, pitch and event tasks, with a small predictor grid in their
metadata); real HEAR task folders work the same way.

Robustness:
- a task folder that heareval could not read (:mod:`training.hear_task_validation`) stops the
  run before anything runs, naming it and why; with ``skip_malformed`` (``--skip-malformed``)
  it is left out, the others run, and the score table names it as skipped;
- a checkpoint that fails to load (or whose runner fails) is reported; the others still run;
- rerunning resumes: heareval skips tasks with ``.done.embeddings`` and
  ``prediction-done.json`` markers, and this module skips checkpoints whose tasks are all done.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from hear_brainsoundnet.files import atomic_write

from . import heareval_compat
from .hear_scores import PREDICTION_DONE, collect_scores, write_tables
from .hear_task_validation import MalformedTasksError, TaskInfo, scan_tasks

EMBEDDINGS_DONE = ".done.embeddings"
MODULE = "hear_brainsoundnet"  # the plugin module; each checkpoint is passed with --model PATH
_LABEL_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True)
class CheckpointSpec:
    """A checkpoint to evaluate: a label for tables and folders, and what to load.

    ``source`` is anything :func:`hear_brainsoundnet.hub.resolve_checkpoint` accepts: a
    checkpoint file, a manifest name (``pretrained``, ``sub01_conv4`` ...).
    """

    label: str
    source: str

    def __post_init__(self) -> None:
        if not self.label or not set(self.label) <= _LABEL_CHARS or self.label.startswith("."):
            raise ValueError(f"checkpoint label {self.label!r}: use letters, digits, '_', '-', '.'")

    @classmethod
    def parse(cls, text: str) -> "CheckpointSpec":
        """``"LABEL=SOURCE"``, or ``"SOURCE"`` (label: the file's stem or the manifest name)."""
        label, sep, source = text.partition("=")
        if not sep:
            source = text
            label = Path(text).stem if Path(text).suffix else Path(text).name
        return cls(label.strip(), source.strip())


@dataclass
class CheckpointOutcome:
    """What happened to one checkpoint: ``ok``, ``partial`` (some tasks failed) or ``failed``."""

    label: str
    source: str
    status: str = "pending"
    error: str = ""
    path: str = ""
    tasks_done: list[str] = field(default_factory=list)
    tasks_failed: dict[str, str] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)  # runner calls made in this session


@dataclass
class HearEvalResult:
    """The outcome of :func:`run_hear_eval`: per checkpoint, task problems, and the tables."""

    out_dir: Path
    tasks: list[str]
    task_problems: dict[str, str]
    checkpoints: list[CheckpointOutcome]
    scores: pd.DataFrame
    files: dict[str, Path]

    @property
    def failed(self) -> list[CheckpointOutcome]:
        return [c for c in self.checkpoints if c.status != "ok"]


def log_tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a runner's log (empty if it cannot be read), for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_logged(argv: list[str], log_path: Path, cwd: Path, timeout: float | None) -> int:
    """Run ``argv`` with stdout and stderr appended to ``log_path``; the exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # Both runners import this package (``training`` in a clone, ``hear_brainsoundnet.training``
    # installed) from another working directory: put the folder holding its top level on the path.
    root = str(Path(__file__).resolve().parents[len(__package__.split("."))])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(argv)}\n")
        log.flush()
        try:
            return subprocess.run(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  stdin=subprocess.DEVNULL, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[hear_eval] timed out after {timeout} s\n")
            return -1


def stage_tasks(tasks: Sequence[TaskInfo], staging: Path) -> Path:
    """A folder of links to the valid tasks only: heareval's embeddings runner takes every
    entry of its tasks dir as a task, so the malformed ones must not be in it."""
    staging.mkdir(parents=True, exist_ok=True)
    wanted = {task.name: task.path.resolve() for task in tasks}
    for entry in staging.iterdir():
        if entry.name in wanted and entry.is_symlink() and entry.resolve() == wanted[entry.name]:
            continue
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
        else:
            shutil.rmtree(entry)
    for name, target in wanted.items():
        if not (staging / name).is_symlink():
            (staging / name).symlink_to(target, target_is_directory=True)
    return staging


def _resolve(spec: CheckpointSpec) -> Path:
    """The checkpoint file, loaded once here so that a bad file fails fast with its own error."""
    from hear_brainsoundnet.checkpoints import load_checkpoint
    from hear_brainsoundnet.hub import resolve_checkpoint

    path = resolve_checkpoint(spec.source)
    load_checkpoint(path)
    return Path(path).resolve()


def evaluate_checkpoint(spec: CheckpointSpec, tasks: Sequence[TaskInfo], staging: Path,
                        out_dir: Path, *, grid: str = "default", grid_points: int = 1,
                        timeout: float | None = None,
                        log: Callable[[str], None] = print) -> CheckpointOutcome:
    """Embeddings then predictions of every task for one checkpoint, skipping finished work."""
    outcome = CheckpointOutcome(spec.label, spec.source)
    try:
        path = _resolve(spec)
    except Exception as error:  # any load failure is reported, and the next checkpoint runs
        outcome.status, outcome.error = "failed", f"cannot load checkpoint {spec.source!r}: {error}"
        log(f"[{spec.label}] {outcome.error}")
        return outcome
    outcome.path = str(path)
    emb_root = out_dir / "embeddings" / spec.label
    task_dirs = {task.name: emb_root / MODULE / task.name for task in tasks}
    logs, work = out_dir / "logs", out_dir / "work"
    embeddings_argv = heareval_compat.command("embeddings", [MODULE, "--model", path, "--tasks-dir", staging.resolve(),
                                                             "--embeddings-dir", emb_root.resolve()])
    embedded = _run_embeddings(outcome, task_dirs, embeddings_argv, logs / f"{spec.label}.embeddings.log", work,
                               timeout, log)
    _run_predictions(outcome, {name: task_dirs[name] for name in embedded},
                     ["--grid", grid, "--grid-points", grid_points], logs / f"{spec.label}.predictions.log", work,
                     timeout, log)
    outcome.tasks_done = [n for n, d in task_dirs.items() if (d / PREDICTION_DONE).is_file()]
    if not outcome.tasks_done:
        outcome.status = "failed"
        outcome.error = outcome.error or "no task finished"
    else:
        outcome.status = "ok" if len(outcome.tasks_done) == len(task_dirs) else "partial"
    return outcome


def _run_embeddings(outcome: CheckpointOutcome, task_dirs: dict[str, Path], argv: list[str], log_path: Path,
                    work: Path, timeout: float | None, log: Callable[[str], None]) -> list[str]:
    """Run the embeddings runner unless every task has its marker; the embedded tasks' names
    (the others are recorded as failed in ``outcome``)."""
    pending = [name for name, d in task_dirs.items() if not (d / EMBEDDINGS_DONE).is_file()]
    if pending:
        log(f"[{outcome.label}] embeddings for {len(pending)} task(s): {', '.join(pending)}")
        outcome.ran.append("embeddings")
        code = run_logged(argv, log_path, work, timeout)
        if code != 0:
            outcome.error = (f"heareval embeddings runner exited with {code}; see {log_path}:\n"
                             f"{log_tail(log_path)}")
            log(f"[{outcome.label}] embeddings runner failed (exit {code})")
    embedded = [name for name, d in task_dirs.items() if (d / EMBEDDINGS_DONE).is_file()]
    for name in task_dirs:
        if name not in embedded:
            outcome.tasks_failed[name] = "no embeddings (the embeddings runner failed)"
    return embedded


def _run_predictions(outcome: CheckpointOutcome, task_dirs: dict[str, Path], options: list[Any], log_path: Path,
                     work: Path, timeout: float | None, log: Callable[[str], None]) -> None:
    """Run the predictions runner on the unfinished tasks; when it fails, record the task it
    failed on and run it again on the tasks after that one."""
    pending = [name for name, d in task_dirs.items() if not (d / PREDICTION_DONE).is_file()]
    while pending:
        log(f"[{outcome.label}] predictions for {len(pending)} task(s): {', '.join(pending)}")
        argv = heareval_compat.command("predictions", [*(task_dirs[n].resolve() for n in pending), *options])
        outcome.ran.append("predictions")
        code = run_logged(argv, log_path, work, timeout)
        still = [name for name in pending if not (task_dirs[name] / PREDICTION_DONE).is_file()]
        if not still:  # all done (a failure after the last task leaves nothing to retry)
            break
        # heareval runs the tasks in order: the first unfinished one is the one that failed.
        culprit = still[0]
        outcome.tasks_failed[culprit] = (f"heareval predictions runner exited with {code}; see "
                                         f"{log_path}:\n{log_tail(log_path)}")
        log(f"[{outcome.label}] predictions failed on {culprit} (exit {code})")
        pending = still[1:]


def run_hear_eval(checkpoints: Sequence[CheckpointSpec], tasks_dir: str | os.PathLike,
                  out_dir: str | os.PathLike, *, grid: str = "default", grid_points: int = 1,
                  timeout: float | None = None, skip_malformed: bool = False,
                  log: Callable[[str], None] = print) -> HearEvalResult:
    """Evaluate every checkpoint on every valid task of ``tasks_dir``; write the tables.

    A malformed task folder raises :class:`MalformedTasksError` (naming each one and why) before
    anything runs, unless ``skip_malformed``: then it is left out, logged, recorded in
    ``hear_status.json`` and named under the score table. A checkpoint that fails to load or
    whose runner fails is reported and the others still run; finished work (heareval's markers)
    is never redone. Also raises ``ValueError`` when no task is valid or two checkpoints share
    a label.
    """
    out_dir = Path(out_dir)
    labels = [spec.label for spec in checkpoints]
    if len(set(labels)) != len(labels):
        raise ValueError(f"checkpoint labels must be unique, got {labels}")
    if not checkpoints:
        raise ValueError("no checkpoints to evaluate")
    tasks, problems = scan_tasks(tasks_dir)
    if problems and not skip_malformed:
        raise MalformedTasksError(Path(tasks_dir), problems)
    for name, problem in problems.items():
        log(f"skipping malformed task {name}: {problem}")
    if not tasks:
        raise ValueError(f"{tasks_dir}: no valid HEAR task folder"
                         + (f" ({len(problems)} malformed: {'; '.join(problems.values())})" if problems else ""))
    staging = stage_tasks(tasks, out_dir / "tasks")
    outcomes = [evaluate_checkpoint(spec, tasks, staging, out_dir, grid=grid, grid_points=grid_points,
                                    timeout=timeout, log=log) for spec in checkpoints]
    scores = collect_scores({o.label: out_dir / "embeddings" / o.label for o in outcomes if o.tasks_done},
                            tasks=[t.name for t in tasks])
    files = write_tables(scores, out_dir, skipped=problems) if not scores.empty else {}
    status = {"tasks_dir": str(Path(tasks_dir).resolve()), "tasks": [t.name for t in tasks],
              "task_problems": problems, "grid": grid, "grid_points": grid_points,
              "checkpoints": [asdict(o) for o in outcomes]}
    files["status"] = atomic_write(out_dir / "hear_status.json",
                                   lambda tmp: Path(tmp).write_text(json.dumps(status, indent=2)))
    return HearEvalResult(out_dir, [t.name for t in tasks], problems, outcomes, scores, files)
