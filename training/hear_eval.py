"""Downstream (HEAR) evaluation of several checkpoints over a tasks directory.

For each checkpoint, heareval's embeddings runner and predictions runner are run (through
:mod:`training.heareval_compat`, which shims heareval's known breakages without editing it),
and every ``test.predicted-scores.json`` is gathered into one table (CSV and Markdown) and a
bar chart.

Layout of an output folder::

    <out>/tasks/<task>                   links to the valid tasks only (what heareval iterates)
    <out>/embeddings/<label>/<module>/<task>/   heareval's own files, per checkpoint
    <out>/hear_status.json               what ran, what was skipped, what failed and why
    <out>/hear_scores.csv / .md / .png   the aggregated scores

The default tasks directory is a generated suite (:func:`write_task_suite`: scene multiclass,
k-fold, pitch and event tasks from :mod:`training.hear_tasks`, with a small predictor grid in
their metadata); real HEAR task folders work the same way.

Robustness:
- a task folder that heareval could not read stops the run before anything runs, naming it and
  why; with ``skip_malformed`` (``--skip-malformed``) it is left out, the others run, and the
  score table names it as skipped. Labels are compared as strings, as heareval does, so the
  numeric labels hear-preprocess writes (``[60]``, ``{"label": 60, ...}``) are valid;
- a checkpoint that fails to load (or whose runner fails) is reported; the others still run;
- rerunning resumes: heareval skips tasks with ``.done.embeddings`` and
  ``prediction-done.json`` markers, and this module skips checkpoints whose tasks are all done.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from hear_brainsoundnet.files import atomic_write

SCORES_FILE = "test.predicted-scores.json"
PREDICTION_DONE = "prediction-done.json"
EMBEDDINGS_DONE = ".done.embeddings"
REQUIRED_METADATA = ("task_name", "embedding_type", "prediction_type", "split_mode", "splits",
                     "sample_duration", "evaluation")
KFOLD_MODES = ("new_split_kfold", "presplit_kfold")
LOWER_IS_BETTER = ("segment_1s_er", "loss")


class TaskError(ValueError):
    """A task folder is not in the HEAR format heareval reads."""


class MalformedTasksError(ValueError):
    """Some task folders are malformed and the caller did not ask to skip them."""

    def __init__(self, tasks_dir: Path, problems: Mapping[str, str]):
        self.problems = dict(problems)
        super().__init__(
            f"{tasks_dir}: {len(problems)} malformed task folder(s), nothing was run:\n"
            + "\n".join(f"  {problem}" for problem in problems.values())
            + "\nfix them, remove them, or pass --skip-malformed (skip_malformed=True) to score "
              "the other tasks and list these as skipped")


# ----------------------------------------------------------------------------------------------
# Task folders
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskInfo:
    """A valid HEAR task folder and the metadata heareval will use."""

    path: Path
    name: str  # the folder's name
    task_name: str  # task_metadata.json's
    embedding_type: str
    split_mode: str
    splits: tuple[str, ...]
    split_sizes: tuple[int, ...]  # clips listed in each split's json, in the order of splits
    evaluation: tuple[str, ...]

    @property
    def primary_score(self) -> str:
        """The score that drives heareval's model selection and our tables (the first listed)."""
        return self.evaluation[0]


def _load_json(path: Path, task: Path) -> Any:
    if not path.is_file():
        raise TaskError(f"task {task.name}: missing {path.name} ({path})")
    try:
        # json accepts the non-standard NaN/Infinity heareval itself writes.
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TaskError(f"task {task.name}: {path} is not valid JSON ({error})") from None


def _known_scores() -> tuple[str, ...]:
    from heareval.score import available_scores  # 3 s import (dcase_util): only when validating

    return tuple(available_scores)


def validate_task(path: str | os.PathLike, sample_rate: int = 22050,
                  known_scores: Sequence[str] | None = None) -> TaskInfo:
    """Check that ``path`` is a HEAR task folder heareval can run at ``sample_rate``.

    Checks what heareval reads: ``task_metadata.json`` (keys, split mode, splits, score names),
    ``labelvocabulary.csv`` (header ``idx,label``, idx 0..n-1), one ``<split>.json`` per split
    whose labels are in the vocabulary (events with ``start <= end`` in ms), and the audio folder
    ``<sample_rate>/<split>/`` holding every listed file. Raises :class:`TaskError` naming the
    task and the file at fault.
    """
    task = Path(path)
    if not task.is_dir():
        raise TaskError(f"{task}: not a task folder (a HEAR tasks directory holds only task folders)")
    meta = _load_json(task / "task_metadata.json", task)
    if not isinstance(meta, dict):
        raise TaskError(f"task {task.name}: task_metadata.json must hold a JSON object")
    missing = [key for key in REQUIRED_METADATA if key not in meta]
    if missing:
        raise TaskError(f"task {task.name}: task_metadata.json lacks {missing}")
    if meta["embedding_type"] not in ("scene", "event"):
        raise TaskError(f"task {task.name}: embedding_type {meta['embedding_type']!r} is neither "
                        "'scene' nor 'event'")
    if meta["prediction_type"] not in ("multiclass", "multilabel"):
        raise TaskError(f"task {task.name}: prediction_type {meta['prediction_type']!r} is neither "
                        "'multiclass' nor 'multilabel'")
    splits = meta["splits"]
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
        raise TaskError(f"task {task.name}: splits must be a non-empty list of names, got {splits!r}")
    if meta["split_mode"] == "trainvaltest":
        if sorted(splits) != ["test", "train", "valid"]:
            raise TaskError(f"task {task.name}: split_mode trainvaltest needs splits train, valid, "
                            f"test; got {splits}")
    elif meta["split_mode"] in KFOLD_MODES:
        if len(splits) < 3:
            raise TaskError(f"task {task.name}: k-fold tasks need at least 3 folds, got {splits}")
    else:
        raise TaskError(f"task {task.name}: unknown split_mode {meta['split_mode']!r}; expected "
                        f"trainvaltest or one of {KFOLD_MODES}")
    evaluation = meta["evaluation"]
    known = tuple(known_scores) if known_scores is not None else _known_scores()
    if not isinstance(evaluation, list) or not evaluation:
        raise TaskError(f"task {task.name}: evaluation must be a non-empty list of score names")
    unknown = [name for name in evaluation if name not in known]
    if unknown:
        raise TaskError(f"task {task.name}: unknown score(s) {unknown} in evaluation; "
                        f"heareval knows {list(known)}")
    duration = meta["sample_duration"]
    if duration is not None and not (isinstance(duration, (int, float)) and duration > 0):
        raise TaskError(f"task {task.name}: sample_duration must be a positive number of seconds "
                        f"or null, got {duration!r}")
    vocabulary = _read_vocabulary(task)
    sizes = tuple(_check_split(task, split, meta, vocabulary, sample_rate) for split in splits)
    return TaskInfo(path=task, name=task.name, task_name=meta["task_name"],
                    embedding_type=meta["embedding_type"], split_mode=meta["split_mode"],
                    splits=tuple(splits), split_sizes=sizes, evaluation=tuple(evaluation))


def _read_vocabulary(task: Path) -> set[str]:
    """The label vocabulary as heareval sees it: the strings its ``label_to_idx`` maps.

    heareval reads ``labelvocabulary.csv`` with pandas (so ``60`` is read as the integer 60) and
    converts the label column with ``astype(str)`` (``score.label_vocab_as_dict``); it then looks
    labels up as ``str(label)``. hear-preprocess writes numeric labels (nsynth pitch, libricount,
    maestro notes) as JSON numbers, which match this way. Reading the file the same way keeps
    the two in agreement, including on spellings such as ``060`` that pandas reads as 60.
    """
    path = task / "labelvocabulary.csv"
    if not path.is_file():
        raise TaskError(f"task {task.name}: missing labelvocabulary.csv ({path})")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise TaskError(f"task {task.name}: {path} is not a CSV file ({error})") from None
    if [str(c).strip() for c in frame.columns] != ["idx", "label"]:
        raise TaskError(f"task {task.name}: {path} must start with the header 'idx,label' "
                        f"(and have two columns), got {list(frame.columns)}")
    if frame.empty:
        raise TaskError(f"task {task.name}: {path} lists no labels")
    try:
        indices = [int(i) for i in frame["idx"]]
    except (ValueError, TypeError):
        raise TaskError(f"task {task.name}: {path} has a row that is not 'integer,label'") from None
    if sorted(indices) != list(range(len(frame))):
        raise TaskError(f"task {task.name}: {path} must number its labels 0..{len(frame) - 1}")
    if frame["label"].isna().any():
        row = int(np.flatnonzero(frame["label"].isna())[0]) + 2
        raise TaskError(f"task {task.name}: {path} line {row}: a label pandas reads as missing (empty, "
                        "NA, null, ...): heareval would look it up as 'nan'; rename it")
    labels = frame["label"].astype(str)
    duplicated = sorted(set(labels[labels.duplicated()]))
    if duplicated:
        raise TaskError(f"task {task.name}: {path} lists label(s) {duplicated} more than once "
                        "(as heareval reads them: as strings)")
    return set(labels)


def _label_key(value: Any) -> str | None:
    """``str(value)`` for a JSON scalar label (what heareval looks up), ``None`` for anything else."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _check_split(task: Path, split: str, meta: Mapping[str, Any], vocabulary: set[str],
                 sample_rate: int) -> int:
    """Check one split's labels and audio; return its number of clips."""
    path = task / f"{split}.json"
    labels = _load_json(path, task)
    if not isinstance(labels, dict) or not labels:
        raise TaskError(f"task {task.name}: {path.name} must map audio file names to labels")
    for name, value in labels.items():
        if meta["embedding_type"] == "scene":
            keys = [_label_key(v) for v in value] if isinstance(value, list) else [None]
            ok = None not in keys
            if ok and meta["prediction_type"] == "multiclass":
                ok = len(keys) == 1
        else:
            ok = isinstance(value, list) and all(
                isinstance(e, dict) and {"label", "start", "end"} <= set(e)
                and _label_key(e["label"]) is not None
                and isinstance(e["start"], (int, float)) and isinstance(e["end"], (int, float))
                and e["start"] <= e["end"] for e in value)
            keys = [_label_key(e["label"]) for e in value] if ok else []
        if not ok:
            raise TaskError(f"task {task.name}: {path.name}: labels of {name!r} are malformed "
                            f"({value!r:.80}) for a {meta['embedding_type']} "
                            f"{meta['prediction_type']} task")
        bad = [key for key in keys if key not in vocabulary]
        if bad:
            raise TaskError(f"task {task.name}: {path.name}: {name!r} has label(s) {bad} that are "
                            "not in labelvocabulary.csv (compared as strings, as heareval does)")
    audio = task / str(sample_rate) / split
    if not audio.is_dir():
        raise TaskError(f"task {task.name}: no audio folder {audio} (the plugin runs at "
                        f"{sample_rate} Hz; heareval reads <task>/{sample_rate}/<split>/)")
    absent = [name for name in labels if not (audio / name).is_file()]
    if absent:
        raise TaskError(f"task {task.name}: {len(absent)} file(s) of {path.name} missing from "
                        f"{audio}, e.g. {absent[0]!r}")
    return len(labels)


def scan_tasks(tasks_dir: str | os.PathLike, sample_rate: int = 22050
               ) -> tuple[list[TaskInfo], dict[str, str]]:
    """Validate every entry of ``tasks_dir``: (valid tasks sorted by name, {entry: error})."""
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise FileNotFoundError(f"{tasks_dir}: no such tasks directory")
    known = _known_scores()
    valid, problems = [], {}
    for entry in sorted(tasks_dir.iterdir()):
        try:
            valid.append(validate_task(entry, sample_rate, known))
        except TaskError as error:
            problems[entry.name] = str(error)
    return valid, problems


def test_set_sizes(tasks: Sequence[TaskInfo]) -> dict[str, tuple[int, ...]]:
    """Number of clips each task's test score is measured on, by task name: one count, or one
    per fold for k-fold tasks (each fold is tested once, trained on the others)."""
    return {task.task_name: tuple(n for split, n in zip(task.splits, task.split_sizes)
                                  if task.split_mode in KFOLD_MODES or split == "test")
            for task in tasks}


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------

def read_scores(task_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows (one per test metric) from one embedding task folder's ``test.predicted-scores.json``.

    trainvaltest tasks have the scores under ``test``; k-fold tasks have one entry per test fold
    and ``aggregated_scores`` with ``<metric>_mean`` / ``_std``, which are used (std over folds
    is kept). Each row: task, metric, value, std, n_folds, primary (the task's first score).
    """
    task_dir = Path(task_dir)
    path = task_dir / SCORES_FILE
    try:
        results = json.loads(path.read_text())  # accepts heareval's bare Infinity / NaN
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable heareval scores ({error})") from None
    meta_path = task_dir / "task_metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
        primary = meta["evaluation"][0]
        task = meta.get("task_name", task_dir.name)
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
        raise ValueError(f"{meta_path}: cannot tell the task's primary score ({error!r})") from None
    rows = []
    if "aggregated_scores" in results:
        folds = [key for key, value in results.items()
                 if key != "aggregated_scores" and isinstance(value, dict) and "test_score" in value]
        aggregated = results["aggregated_scores"]
        names = [key[: -len("_mean")] for key in aggregated if key.endswith("_mean")]
        for name in names:
            if not name.startswith("test_") or name == "test_score":
                continue
            rows.append(_row(task, task_dir.name, name, aggregated[f"{name}_mean"],
                             aggregated.get(f"{name}_std"), len(folds), primary))
    elif isinstance(results.get("test"), dict):
        for name, value in results["test"].items():
            if name.startswith("test_") and name != "test_score":
                rows.append(_row(task, task_dir.name, name, value, None, 1, primary))
    else:
        raise ValueError(f"{path}: neither a 'test' entry nor 'aggregated_scores'")
    if not any(row["primary"] for row in rows):
        raise ValueError(f"{path}: no score for the task's primary metric {primary!r}")
    return rows


def _row(task: str, folder: str, name: str, value: Any, std: Any, n_folds: int,
         primary: str) -> dict[str, Any]:
    metric = name[len("test_"):]
    return {"task": task, "task_folder": folder, "metric": metric, "value": _float(value),
            "std": _float(std), "n_folds": n_folds, "primary": metric == primary,
            "higher_is_better": metric not in LOWER_IS_BETTER}


def _float(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)


def collect_scores(runs: Mapping[str, str | os.PathLike],
                   tasks: Iterable[str] | None = None) -> pd.DataFrame:
    """Every finished task's ``test.predicted-scores.json`` under each checkpoint's folder, as one table.

    ``runs`` maps a checkpoint label to the folder given to heareval as ``--embeddings-dir``
    (holding ``<module>/<task>/``); a task counts once heareval wrote ``prediction-done.json``.
    ``tasks`` keeps only those task folder names. Returns a long table with columns checkpoint,
    task, task_folder, metric, value, std, n_folds, primary, higher_is_better.
    """
    keep = set(tasks) if tasks is not None else None
    rows = []
    for label, folder in runs.items():
        for path in sorted(Path(folder).glob(f"*/*/{SCORES_FILE}")):
            if not (path.parent / PREDICTION_DONE).is_file():
                continue
            if keep is not None and path.parent.name not in keep:
                continue
            for row in read_scores(path.parent):
                rows.append({"checkpoint": label, **row})
    columns = ["checkpoint", "task", "task_folder", "metric", "value", "std", "n_folds",
               "primary", "higher_is_better"]
    return pd.DataFrame(rows, columns=columns)


def primary_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Wide table of each task's primary score: one row per task, one column per checkpoint."""
    primary = scores[scores["primary"]]
    table = primary.pivot_table(index=["task", "metric"], columns="checkpoint", values="value",
                                aggfunc="first", sort=False)
    order = list(dict.fromkeys(scores["checkpoint"]))
    return table.reindex(columns=[c for c in order if c in table.columns]).reset_index()


def _cell(value: float, std: float) -> str:
    if not np.isfinite(std):
        return f"{value:.3f}"
    return f"{value:.3f} ± {std:.3f}"


def primary_markdown(scores: pd.DataFrame) -> str:
    """Markdown table of the primary scores (± std over folds for k-fold tasks)."""
    primary = scores[scores["primary"]].copy()
    primary["cell"] = [_cell(v, s) for v, s in zip(primary["value"], primary["std"])]
    wide = primary.pivot_table(index=["task", "metric"], columns="checkpoint", values="cell",
                               aggfunc="first", sort=False)
    order = [c for c in dict.fromkeys(scores["checkpoint"]) if c in wide.columns]
    return wide.reindex(columns=order).reset_index().to_markdown(index=False)


def plot_scores(scores: pd.DataFrame, png_path: str | os.PathLike, title: str = "HEAR tasks") -> Path:
    """Grouped bar chart of each task's primary score per checkpoint (error bars: std over folds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = scores[scores["primary"]]
    tasks = list(dict.fromkeys(primary["task"]))
    checkpoints = list(dict.fromkeys(primary["checkpoint"]))
    width = 0.8 / max(1, len(checkpoints))
    figure, axes = plt.subplots(figsize=(1.6 + 1.5 * len(tasks) * max(1, len(checkpoints)) ** 0.5, 3.8))
    try:
        for i, label in enumerate(checkpoints):
            rows = primary[primary["checkpoint"] == label].set_index("task")
            values = [rows["value"].get(t, np.nan) for t in tasks]
            errors = [rows["std"].get(t, np.nan) for t in tasks]
            positions = np.arange(len(tasks)) + (i - (len(checkpoints) - 1) / 2) * width
            # NaN errors (tasks without folds) draw no error bar at all.
            axes.bar(positions, values, width, yerr=np.asarray(errors, dtype=float), capsize=2, label=label)
        metric = primary.drop_duplicates("task").set_index("task")["metric"]
        axes.set_xticks(np.arange(len(tasks)), [f"{t}\n{metric[t]}" for t in tasks], fontsize=8)
        axes.set_ylabel("test score (primary metric)")
        axes.set_title(title)
        axes.legend(fontsize=8, loc="best")
        axes.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        return atomic_write(png_path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(figure)


def skipped_markdown(skipped: Mapping[str, str]) -> str:
    """Markdown lines naming the task folders that were skipped as malformed, and why."""
    if not skipped:
        return ""
    lines = [f"Skipped {len(skipped)} malformed task folder(s) (not scored):", ""]
    lines += [f"- `{name}`: {problem.splitlines()[0]}" for name, problem in sorted(skipped.items())]
    return "\n".join(lines)


def write_tables(scores: pd.DataFrame, out_dir: str | os.PathLike, stem: str = "hear_scores",
                 skipped: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Write the long CSV, the Markdown table of primary scores and the bar chart into ``out_dir``.

    ``skipped`` (task folder -> problem) is listed under the Markdown table, so that a table
    with fewer tasks than the tasks directory says which are missing and why.
    """
    out_dir = Path(out_dir)
    if scores.empty:
        raise ValueError("no HEAR scores to write: no task finished for any checkpoint")
    notes = skipped_markdown(skipped or {})
    markdown = primary_markdown(scores) + "\n" + (f"\n{notes}\n" if notes else "")
    paths = {
        "csv": atomic_write(out_dir / f"{stem}.csv", lambda tmp: scores.to_csv(tmp, index=False)),
        "md": atomic_write(out_dir / f"{stem}.md", lambda tmp: Path(tmp).write_text(markdown)),
        "png": plot_scores(scores, out_dir / f"{stem}.png"),
    }
    return paths


# ----------------------------------------------------------------------------------------------
# The default task suite
# ----------------------------------------------------------------------------------------------

# A small predictor grid (one point of heareval's: one hidden layer, early stopping on the
# task's score), written into each task's metadata. Batches of 32 clips: with heareval's 1024
# a 72-clip task takes one step per epoch, and 60 such steps left the predictors undertrained,
# so that scores followed the embeddings' scale, not their content (pitch: pretrained 0.67 vs
# synthetic conv4 0.19, where a standardised logistic-regression probe gave 0.81-0.92 to both).
SUITE_GRID = {"hidden_layers": [1], "hidden_dim": [256], "lr": [1e-3], "max_epochs": [300],
              "patience": [10], "check_val_every_n_epoch": [3], "batch_size": [32]}
# Sizes of the generated suite: arguments of the training.hear_tasks generators.
SUITES: dict[str, dict[str, Any]] = {
    "default": {"grid": SUITE_GRID,
                # 2-s pitch clips: conv7's hop is 1.5 s, so 1-s clips give the scene embedding
                # about one frame (pretrained, with the earlier 60-step grid: pitch_acc 0.67
                # with 2 s, 0.44 with 1 s).
                "scene": {"per_class": 8}, "kfold": {"per_class": 4},
                "pitch": {"per_pitch": 6, "duration": 2.0},
                "event": {"clips": {"train": 24, "valid": 8, "test": 8}}},
    "tiny": {"grid": {**SUITE_GRID, "max_epochs": [15], "patience": [3], "hidden_dim": [64]},
             "scene": {"per_class": 3, "duration": 1.0}, "kfold": {"per_class": 2, "duration": 1.0},
             "pitch": {"per_pitch": 2, "duration": 0.5},
             "event": {"clips": {"train": 8, "valid": 3, "test": 3}, "duration": 3.0,
                       "events_per_clip": (1, 2)}},
}
EVENT_POSTPROCESSING = {"median_filter_ms": [150], "min_duration": [60]}


def write_task_suite(tasks_dir: str | os.PathLike, size: str = "default", seed: int = 0) -> list[Path]:
    """The generated HEAR suite (scene multiclass, k-fold, pitch, event tasks of
    :mod:`training.hear_tasks`) with a small predictor grid in each task's metadata."""
    from . import hear_tasks

    if size not in SUITES:
        raise ValueError(f"unknown task suite size {size!r}; choose one of {list(SUITES)}")
    suite = SUITES[size]
    grid = suite["grid"]
    return [
        hear_tasks.scene_task(tasks_dir, seed=seed, param_grid=grid, overwrite=True, **suite["scene"]),
        hear_tasks.kfold_task(tasks_dir, seed=seed + 1, param_grid=grid, overwrite=True, **suite["kfold"]),
        hear_tasks.pitch_task(tasks_dir, seed=seed + 2, param_grid=grid, overwrite=True, **suite["pitch"]),
        hear_tasks.event_task(tasks_dir, seed=seed + 3, param_grid=grid, overwrite=True,
                              postprocessing_grid=EVENT_POSTPROCESSING, **suite["event"]),
    ]


# ----------------------------------------------------------------------------------------------
# Running heareval over checkpoints
# ----------------------------------------------------------------------------------------------

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
    # Both runners import the working tree's packages: make them importable from the work dir.
    root = str(Path(__file__).resolve().parent.parent)
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
    from . import heareval_compat

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

    pending = [name for name, d in task_dirs.items() if not (d / EMBEDDINGS_DONE).is_file()]
    if pending:
        log(f"[{spec.label}] embeddings for {len(pending)} task(s): {', '.join(pending)}")
        argv = heareval_compat.command("embeddings", [MODULE, "--model", path, "--tasks-dir",
                                                      staging.resolve(), "--embeddings-dir",
                                                      emb_root.resolve()])
        outcome.ran.append("embeddings")
        code = run_logged(argv, logs / f"{spec.label}.embeddings.log", work, timeout)
        if code != 0:
            outcome.error = (f"heareval embeddings runner exited with {code}; see "
                             f"{logs / f'{spec.label}.embeddings.log'}:\n"
                             f"{log_tail(logs / f'{spec.label}.embeddings.log')}")
            log(f"[{spec.label}] embeddings runner failed (exit {code})")
    embedded = [name for name, d in task_dirs.items() if (d / EMBEDDINGS_DONE).is_file()]
    for name in task_dirs:
        if name not in embedded:
            outcome.tasks_failed[name] = "no embeddings (the embeddings runner failed)"

    pending = [name for name in embedded if not (task_dirs[name] / PREDICTION_DONE).is_file()]
    while pending:
        log(f"[{spec.label}] predictions for {len(pending)} task(s): {', '.join(pending)}")
        log_path = logs / f"{spec.label}.predictions.log"
        argv = heareval_compat.command("predictions", [*(task_dirs[n].resolve() for n in pending),
                                                       "--grid", grid, "--grid-points", grid_points])
        outcome.ran.append("predictions")
        code = run_logged(argv, log_path, work, timeout)
        still = [name for name in pending if not (task_dirs[name] / PREDICTION_DONE).is_file()]
        if code == 0 and not still:
            break
        if not still:  # the runner failed after the last task: nothing left to retry
            break
        # heareval runs the tasks in order: the first unfinished one is the one that failed.
        culprit = still[0]
        outcome.tasks_failed[culprit] = (f"heareval predictions runner exited with {code}; see "
                                         f"{log_path}:\n{log_tail(log_path)}")
        log(f"[{spec.label}] predictions failed on {culprit} (exit {code})")
        pending = still[1:]

    outcome.tasks_done = [n for n, d in task_dirs.items() if (d / PREDICTION_DONE).is_file()]
    if not outcome.tasks_done:
        outcome.status = "failed"
        outcome.error = outcome.error or "no task finished"
    else:
        outcome.status = "ok" if len(outcome.tasks_done) == len(task_dirs) else "partial"
    return outcome


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
