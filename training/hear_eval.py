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

Robustness:
- a task folder that heareval could not read is reported by name and left out; the others run;
- a checkpoint that fails to load (or whose runner fails) is reported; the others still run;
- rerunning resumes: heareval skips tasks with ``.done.embeddings`` and
  ``prediction-done.json`` markers, and this module skips checkpoints whose tasks are all done.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from hear_brainsoundnet.checkpoints import atomic_write

SCORES_FILE = "test.predicted-scores.json"
PREDICTION_DONE = "prediction-done.json"
EMBEDDINGS_DONE = ".done.embeddings"
REQUIRED_METADATA = ("task_name", "embedding_type", "prediction_type", "split_mode", "splits",
                     "sample_duration", "evaluation")
KFOLD_MODES = ("new_split_kfold", "presplit_kfold")
LOWER_IS_BETTER = ("segment_1s_er",)


class TaskError(ValueError):
    """A task folder is not in the HEAR format heareval reads."""


# ----------------------------------------------------------------------------------------------
# Task folders
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskInfo:
    """A valid HEAR task folder and the metadata heareval will use."""

    path: Path
    name: str
    embedding_type: str
    split_mode: str
    splits: tuple[str, ...]
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
    for split in splits:
        _check_split(task, split, meta, vocabulary, sample_rate)
    return TaskInfo(path=task, name=task.name, embedding_type=meta["embedding_type"],
                    split_mode=meta["split_mode"], splits=tuple(splits),
                    evaluation=tuple(evaluation))


def _read_vocabulary(task: Path) -> set[str]:
    path = task / "labelvocabulary.csv"
    if not path.is_file():
        raise TaskError(f"task {task.name}: missing labelvocabulary.csv ({path})")
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or [c.strip() for c in rows[0]] != ["idx", "label"]:
        raise TaskError(f"task {task.name}: {path} must start with the header 'idx,label'")
    body = [row for row in rows[1:] if row]
    if not body:
        raise TaskError(f"task {task.name}: {path} lists no labels")
    try:
        indices = [int(row[0]) for row in body]
    except (ValueError, IndexError):
        raise TaskError(f"task {task.name}: {path} has a row that is not 'integer,label'") from None
    if sorted(indices) != list(range(len(body))) or any(len(row) != 2 for row in body):
        raise TaskError(f"task {task.name}: {path} must number its labels 0..{len(body) - 1}")
    return {row[1] for row in body}


def _check_split(task: Path, split: str, meta: Mapping[str, Any], vocabulary: set[str],
                 sample_rate: int) -> None:
    path = task / f"{split}.json"
    labels = _load_json(path, task)
    if not isinstance(labels, dict) or not labels:
        raise TaskError(f"task {task.name}: {path.name} must map audio file names to labels")
    for name, value in labels.items():
        if meta["embedding_type"] == "scene":
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            if ok and meta["prediction_type"] == "multiclass":
                ok = len(value) == 1
            bad = [] if not ok else [v for v in value if v not in vocabulary]
        else:
            ok = isinstance(value, list) and all(
                isinstance(e, dict) and {"label", "start", "end"} <= set(e)
                and isinstance(e["start"], (int, float)) and isinstance(e["end"], (int, float))
                and e["start"] <= e["end"] for e in value)
            bad = [] if not ok else [e["label"] for e in value if e["label"] not in vocabulary]
        if not ok:
            raise TaskError(f"task {task.name}: {path.name}: labels of {name!r} are malformed "
                            f"({value!r:.80}) for a {meta['embedding_type']} "
                            f"{meta['prediction_type']} task")
        if bad:
            raise TaskError(f"task {task.name}: {path.name}: {name!r} has label(s) {bad} that are "
                            "not in labelvocabulary.csv")
    audio = task / str(sample_rate) / split
    if not audio.is_dir():
        raise TaskError(f"task {task.name}: no audio folder {audio} (the plugin runs at "
                        f"{sample_rate} Hz; heareval reads <task>/{sample_rate}/<split>/)")
    absent = [name for name in labels if not (audio / name).is_file()]
    if absent:
        raise TaskError(f"task {task.name}: {len(absent)} file(s) of {path.name} missing from "
                        f"{audio}, e.g. {absent[0]!r}")


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


def collect_scores(runs: Mapping[str, str | os.PathLike]) -> pd.DataFrame:
    """Every ``test.predicted-scores.json`` under each checkpoint's embeddings folder, as one table.

    ``runs`` maps a checkpoint label to the folder given to heareval as ``--embeddings-dir``
    (holding ``<module>/<task>/``). Returns a long table with columns checkpoint, task,
    task_folder, metric, value, std, n_folds, primary, higher_is_better.
    """
    rows = []
    for label, folder in runs.items():
        for path in sorted(Path(folder).glob(f"*/*/{SCORES_FILE}")):
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
            axes.bar(positions, values, width, yerr=np.nan_to_num(errors), capsize=2, label=label)
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


def write_tables(scores: pd.DataFrame, out_dir: str | os.PathLike, stem: str = "hear_scores"
                 ) -> dict[str, Path]:
    """Write the long CSV, the Markdown table of primary scores and the bar chart into ``out_dir``."""
    out_dir = Path(out_dir)
    if scores.empty:
        raise ValueError("no HEAR scores to write: no task finished for any checkpoint")
    paths = {
        "csv": atomic_write(out_dir / f"{stem}.csv", lambda tmp: scores.to_csv(tmp, index=False)),
        "md": atomic_write(out_dir / f"{stem}.md",
                           lambda tmp: Path(tmp).write_text(primary_markdown(scores) + "\n")),
        "png": plot_scores(scores, out_dir / f"{stem}.png"),
    }
    return paths
