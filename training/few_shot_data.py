"""Few-shot inputs: heareval's embeddings folders read as labelled splits, heareval's folds,
a carved validation split when a task has none, and seeded k-shot draws.

Draws depend only on (seed, task folder name, fold, draw) and the labels, never on the
checkpoint, so every checkpoint is scored on the same files and comparisons are paired (see
:mod:`training.few_shot` for the method).
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .hear_eval import EMBEDDINGS_DONE
from .hear_task_validation import KFOLD_MODES

# The scene scores a probe's predictions can be scored with (heareval's names).
SCENE_SCORES = ("top1_acc", "pitch_acc", "chroma_acc", "mAP", "d_prime", "aucroc")
VALID_FRACTION = 0.2  # of each class of train, for C, when a task has no validation split


class FewShotError(ValueError):
    """Bad input to the few-shot evaluation (the message names the file or value at fault)."""


# ----------------------------------------------------------------------------------------------
# Reading heareval's embeddings folders
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """One split of a task: file names (sorted), their labels (strings) and embeddings."""

    files: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    X: np.ndarray  # (n_files, dim) float32

    def take(self, index: Sequence[int] | np.ndarray) -> "Split":
        index = np.asarray(index, dtype=np.int64)
        return Split(tuple(self.files[i] for i in index), tuple(self.labels[i] for i in index),
                     self.X[index])

    @staticmethod
    def concat(parts: Sequence["Split"]) -> "Split":
        return Split(tuple(f for p in parts for f in p.files), tuple(l for p in parts for l in p.labels),
                     np.concatenate([p.X for p in parts]))


@dataclass(frozen=True)
class TaskMeta:
    """What the few-shot evaluation needs from one embeddings task folder's metadata."""

    path: Path
    name: str  # the folder name, the same for every checkpoint
    embedding_type: str
    prediction_type: str
    split_mode: str
    splits: tuple[str, ...]
    evaluation: tuple[str, ...]
    vocabulary: tuple[str, ...]

    @property
    def metric(self) -> str:
        return self.evaluation[0]

    def skip_reason(self) -> str | None:
        """Why the few-shot evaluation does not run this task, or None."""
        if self.embedding_type != "scene":
            return (f"task {self.name}: event task skipped (k-shot per class is not defined for "
                    "frame-level event labels; see training.few_shot's docstring)")
        if self.metric not in SCENE_SCORES:
            return (f"task {self.name}: primary score {self.metric!r} is not a scene score "
                    f"{SCENE_SCORES}; skipped")
        return None


def read_json(path: Path) -> Any:
    """The JSON content of ``path``; :class:`FewShotError` naming the file when it is missing or
    not JSON (Python's json reads heareval's bare NaN / Infinity)."""
    if not path.is_file():
        raise FewShotError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FewShotError(f"{path}: not valid JSON ({error})") from None


def read_task_meta(task_dir: str | os.PathLike) -> TaskMeta:
    """Metadata and label vocabulary of one heareval embeddings task folder."""
    task_dir = Path(task_dir)
    meta = read_json(task_dir / "task_metadata.json")
    needed = ("embedding_type", "prediction_type", "split_mode", "splits", "evaluation")
    missing = [key for key in needed if key not in (meta if isinstance(meta, dict) else {})]
    if missing:
        raise FewShotError(f"{task_dir / 'task_metadata.json'}: lacks {missing}")
    if not isinstance(meta["evaluation"], list) or not meta["evaluation"]:
        raise FewShotError(f"{task_dir / 'task_metadata.json'}: evaluation must list score names")
    if meta["prediction_type"] not in ("multiclass", "multilabel"):
        raise FewShotError(f"{task_dir / 'task_metadata.json'}: prediction_type "
                           f"{meta['prediction_type']!r} is neither multiclass nor multilabel")
    vocab_path = task_dir / "labelvocabulary.csv"
    if not vocab_path.is_file():
        raise FewShotError(f"missing {vocab_path}")
    try:
        # Read as heareval reads it (pandas, then str), so that e.g. "060" is the label "60" as in heareval.
        frame = pd.read_csv(vocab_path)
        labels = frame["label"].astype(str)
        by_idx = dict(zip((int(i) for i in frame["idx"]), labels))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, KeyError,
            ValueError, TypeError) as error:
        raise FewShotError(f"{vocab_path}: expected a header 'idx,label' and 'integer,label' rows "
                           f"({error!r})") from None
    if not by_idx or sorted(by_idx) != list(range(len(frame))):
        raise FewShotError(f"{vocab_path}: indices must be 0..{len(frame) - 1}")
    if frame["label"].isna().any():
        row = int(np.flatnonzero(frame["label"].isna())[0]) + 2
        raise FewShotError(f"task {task_dir.name}: {vocab_path} line {row}: a label pandas reads as missing "
                           "(empty, NA, null, ...); heareval would look it up as 'nan'")
    duplicated = sorted(set(labels[labels.duplicated()]))
    if duplicated:
        # e.g. 60 and 060, both the string "60" once pandas has read them: heareval would merge them.
        raise FewShotError(f"task {task_dir.name}: {vocab_path} lists label(s) {duplicated} more than once "
                           "(as heareval reads them: as strings)")
    return TaskMeta(path=task_dir, name=task_dir.name, embedding_type=meta["embedding_type"],
                    prediction_type=meta["prediction_type"], split_mode=meta["split_mode"],
                    splits=tuple(meta["splits"]), evaluation=tuple(meta["evaluation"]),
                    vocabulary=tuple(by_idx[i] for i in range(len(by_idx))))


def read_split(task: TaskMeta, split: str, embeddings: bool = True) -> Split:
    """One split's embeddings (``<split>/<file>.embedding.npy``) and string labels, by file name;
    ``embeddings=False``: the labels only (X has no columns), for what depends on labels alone."""
    truth = read_json(task.path / f"{split}.json")
    if not isinstance(truth, dict) or not truth:
        raise FewShotError(f"{task.path / f'{split}.json'}: must map file names to label lists")
    vocabulary = set(task.vocabulary)
    files = sorted(truth)
    labels, arrays = [], []
    for name in files:
        value = truth[name]
        if not isinstance(value, list) or (task.prediction_type == "multiclass" and len(value) != 1):
            raise FewShotError(f"{task.path / f'{split}.json'}: labels of {name!r} ({value!r:.60}) "
                               f"are not a list{' of one label' if task.prediction_type == 'multiclass' else ''}")
        as_text = tuple(str(v) for v in value)  # heareval compares labels as strings
        unknown = [v for v in as_text if v not in vocabulary]
        if unknown:
            raise FewShotError(f"{task.path / f'{split}.json'}: {name!r} has label(s) {unknown} not in "
                               "labelvocabulary.csv")
        labels.append(as_text)
        if not embeddings:
            continue
        path = task.path / split / f"{name}.embedding.npy"
        if not path.is_file():
            raise FewShotError(f"missing {path} (heareval's per-file embedding of {name!r})")
        array = np.load(path)
        if array.ndim != 1 or not np.isfinite(array).all():
            raise FewShotError(f"{path}: expected a finite 1-D scene embedding, got shape {array.shape}")
        arrays.append(array.astype(np.float32, copy=False))
    if not embeddings:
        return Split(tuple(files), tuple(labels), np.zeros((len(files), 0), dtype=np.float32))
    dims = {a.shape[0] for a in arrays}
    if len(dims) != 1:
        raise FewShotError(f"{task.path / split}: embeddings of different sizes {sorted(dims)}")
    return Split(tuple(files), tuple(labels), np.stack(arrays))


def find_task_dirs(folder: str | os.PathLike) -> dict[str, Path]:
    """Embedding task folders under ``folder``: heareval's ``--embeddings-dir`` (``<module>/<task>``),
    one module's folder (``<task>``) or a single task folder; only finished ones (marker present)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FewShotError(f"{folder}: no such embeddings folder")
    for depth in ("", "*", "*/*"):
        pattern = f"{depth}/task_metadata.json" if depth else "task_metadata.json"
        found = sorted(p.parent for p in folder.glob(pattern))
        if found:
            break
    names = [p.name for p in found]
    if len(set(names)) != len(names):
        raise FewShotError(f"{folder}: holds several modules' embeddings of the same task; "
                           "give each module's folder separately")
    done = {p.name: p for p in found if (p / EMBEDDINGS_DONE).is_file()}
    if not found:
        raise FewShotError(f"{folder}: no heareval embeddings (no task_metadata.json at depth 0-2)")
    return done


# ----------------------------------------------------------------------------------------------
# Folds, validation, draws
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FoldPlan:
    """Which splits train, validate and test one fold (heareval's convention for k-fold)."""

    fold: int
    train: tuple[str, ...]
    valid: tuple[str, ...]  # empty: carve validation from train
    test: tuple[str, ...]


def fold_plans(task: TaskMeta) -> list[FoldPlan]:
    """heareval's data splits (``data_splits_from_folds``): for k-fold, test = fold i,
    valid = fold i+1 (cyclic), train = the others; for trainvaltest, one plan."""
    if task.split_mode in KFOLD_MODES:
        folds = sorted(task.splits)
        if len(folds) < 3:
            raise FewShotError(f"task {task.name}: k-fold needs at least 3 folds, got {folds}")
        plans = []
        for i, test in enumerate(folds):
            valid = folds[(i + 1) % len(folds)]
            plans.append(FoldPlan(i, tuple(f for f in folds if f not in (test, valid)), (valid,), (test,)))
        return plans
    if task.split_mode != "trainvaltest":
        raise FewShotError(f"task {task.name}: unknown split_mode {task.split_mode!r}")
    if "train" not in task.splits or "test" not in task.splits:
        raise FewShotError(f"task {task.name}: a trainvaltest task needs train and test splits, "
                           f"got {list(task.splits)}")
    return [FoldPlan(0, ("train",), ("valid",) if "valid" in task.splits else (), ("test",))]


def _rng(seed: int, task: str, *parts: int) -> np.random.Generator:
    # crc32 of the task folder name: stable across processes (Python's hash() is salted).
    return np.random.default_rng([seed, zlib.crc32(task.encode()), *parts])


def carve_validation(pool: Split, *, seed: int, task: str, fold: int,
                     fraction: float = VALID_FRACTION) -> tuple[Split, Split]:
    """(train, valid): a seeded stratified ``fraction`` of each class (at least 1 of a class
    with 2+ examples) for a task without a validation split. Multilabel: by first label."""
    rng = _rng(seed, task, fold, 2**31 - 1)  # a stream no draw uses
    first = np.array([l[0] if l else "" for l in pool.labels])
    valid = []
    for label in sorted(set(first)):
        members = np.flatnonzero(first == label)
        n = int(round(fraction * len(members))) if len(members) > 1 else 0
        valid.extend(rng.permutation(members)[:max(n, 1 if len(members) > 1 else 0)])
    if not valid:
        raise FewShotError(f"task {task}: too few training examples to carve a validation split")
    keep = np.setdiff1d(np.arange(len(pool.files)), valid)
    return pool.take(keep), pool.take(np.sort(valid))


class SkipPoint(Exception):
    """A (task, k, fold) point that cannot be drawn (k larger than a class); the run goes on."""


def class_counts(labels: Sequence[tuple[str, ...]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for label_set in labels:
        for label in set(label_set):
            counts[label] = counts.get(label, 0) + 1
    return counts


def draw_indices(labels: Sequence[tuple[str, ...]], k: int, *, seed: int, task: str, fold: int,
                 draw: int, multilabel: bool = False, where: str = "") -> np.ndarray:
    """Indices (sorted) of a k-shot training set drawn from ``labels`` (the pool, in file order).

    Multiclass: k per class present in the pool, the first k of one seeded permutation per
    class, so draws are nested across k. Multilabel: files in one seeded order, each kept while
    one of its labels has fewer than k positives. Raises :class:`SkipPoint` when a class has
    fewer than k examples (``where``, e.g. " (test fold fold00)", goes into its message).
    Depends only on (seed, task, fold, draw, labels), not on embeddings.
    """
    if k < 1:
        raise FewShotError(f"k must be at least 1, got {k}")
    counts = class_counts(labels)
    smallest = min(counts, key=lambda c: (counts[c], c))
    if counts[smallest] < k:
        raise SkipPoint(f"task {task}{where}: k={k} is larger than the smallest class "
                        f"({smallest!r}: {counts[smallest]} training example(s)); point skipped")
    rng = _rng(seed, task, fold, draw)
    if not multilabel:
        members: dict[str, list[int]] = {}  # one pass over the pool, not one per class
        for i, label_set in enumerate(labels):
            members.setdefault(label_set[0], []).append(i)
        chosen = []
        for label in sorted(members):
            chosen.extend(rng.permutation(np.asarray(members[label], dtype=np.int64))[:k])
        return np.sort(np.asarray(chosen, dtype=np.int64))
    have = dict.fromkeys(counts, 0)
    chosen = []
    for i in rng.permutation(len(labels)):
        if any(have[label] < k for label in labels[i]):
            chosen.append(i)
            for label in set(labels[i]):
                have[label] += 1
            if all(n >= k for n in have.values()):
                break
    return np.sort(np.asarray(chosen, dtype=np.int64))
