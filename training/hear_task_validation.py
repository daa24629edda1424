"""Validation of HEAR task folders: what heareval will read, checked before anything runs.

:func:`validate_task` checks one ``<task>-<version>-<mode>`` folder (metadata, label
vocabulary, split files, audio) and names the file at fault; :func:`scan_tasks` sorts a tasks
directory into valid tasks and problems. Labels are compared as strings, as heareval does, so
the numeric labels hear-preprocess writes (``[60]``, ``{"label": 60, ...}``) are valid.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

REQUIRED_METADATA = ("task_name", "embedding_type", "prediction_type", "split_mode", "splits",
                     "sample_duration", "evaluation")
KFOLD_MODES = ("new_split_kfold", "presplit_kfold")


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
    # imported here: a slow import (dcase_util), needed only when validating
    from heareval.score import available_scores

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
