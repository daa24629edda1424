"""The two predictors of a few-shot point: a standardised linear probe (C chosen on the
validation split) and, for comparability with full-data HEAR scores, heareval's own predictor on
a k-shot training set written as a heareval embeddings folder (see :mod:`training.few_shot`).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .few_shot_data import SCENE_SCORES, FewShotError, Split, TaskMeta, read_json
from .hear_scores import SCORES_FILE

# Inverse regularisation strengths tried on the validation split (features are standardised,
# so one grid fits every embedding size; few-shot optima sit at the strong end).
DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


# ----------------------------------------------------------------------------------------------
# The probe
# ----------------------------------------------------------------------------------------------

def score_function(metric: str, vocabulary: Sequence[str]) -> Callable[[np.ndarray, np.ndarray], float]:
    """heareval's own score (``heareval.score.available_scores``) on (predictions, one-hot targets)."""
    # imported here: it imports dcase_util, slow, and only this function needs it
    from heareval.score import available_scores

    if metric not in SCENE_SCORES or metric not in available_scores:
        raise FewShotError(f"score {metric!r} is not a scene score heareval knows ({SCENE_SCORES})")
    scorer = available_scores[metric](label_to_idx={label: i for i, label in enumerate(vocabulary)})
    return lambda predictions, targets: float(scorer(predictions, targets))


def targets_matrix(labels: Sequence[tuple[str, ...]], vocabulary: Sequence[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(vocabulary)}
    y = np.zeros((len(labels), len(vocabulary)), dtype=np.float32)
    for row, label_set in enumerate(labels):
        y[row, [index[label] for label in label_set]] = 1.0
    return y


def _make_classifier(multilabel: bool):
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    # warm_start: along the C grid each fit starts from the previous solution (same optimum, fewer steps).
    linear = LogisticRegression(max_iter=2000, warm_start=True)
    return OneVsRestClassifier(linear) if multilabel else linear


def _predict(classifier, X: np.ndarray, classes: Sequence[str], vocabulary: Sequence[str],
             multilabel: bool) -> np.ndarray:
    """Scores (n, len(vocabulary)): the probe's probabilities placed at each label's index."""
    proba = classifier.predict_proba(X)
    if multilabel:
        return proba
    out = np.zeros((len(X), len(vocabulary)), dtype=np.float64)
    index = {label: i for i, label in enumerate(vocabulary)}
    out[:, [index[c] for c in classes]] = proba
    return out


@dataclass(frozen=True)
class ProbeResult:
    score: float  # test score of the probe with the chosen C
    C: float
    valid_score: float


def fit_probe(train: Split, valid: Split, test: Split, vocabulary: Sequence[str], metric: str,
              multilabel: bool, Cs: Sequence[float] = DEFAULT_CS,
              score: Callable[[np.ndarray, np.ndarray], float] | None = None) -> ProbeResult:
    """Logistic regression on ``train`` standardised with train's mean and std; C chosen on
    ``valid`` by the task's metric (ties: the stronger regularisation); the test score of that C."""
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    score = score or score_function(metric, vocabulary)
    if multilabel:
        y = targets_matrix(train.labels, vocabulary).astype(np.int64)
        classes: Sequence[str] = vocabulary
    else:
        y = np.array([l[0] for l in train.labels])
        classes = sorted(set(y))
        if len(classes) < 2:
            raise FewShotError("a probe needs at least two classes in its training set")
    scaler = StandardScaler().fit(train.X)
    X_train, X_valid, X_test = (scaler.transform(s.X) for s in (train, valid, test))
    valid_targets = targets_matrix(valid.labels, vocabulary)
    classifier = _make_classifier(multilabel)
    best: tuple[float, float, np.ndarray] | None = None
    # One BLAS thread: these problems are small, and threads only contend on a shared machine.
    with threadpool_limits(1), warnings.catch_warnings():
        # OneVsRest warns about labels present in every (or no) k-shot file: it predicts them constantly.
        warnings.simplefilter("ignore", UserWarning)
        if X_train.shape[0] < X_train.shape[1]:
            # Exact shortcut: an L2-penalised linear model's weights lie in the span of its training
            # rows (the loss gradient is X^T(...)), so fitting in an orthonormal basis of that span
            # gives the same predictions for any input, with n instead of d features (few-shot: n << d).
            _, singular, vt = np.linalg.svd(X_train, full_matrices=False)
            # At least one column: an all-zero training set (one file, standardised) gets zero weights anyway.
            basis = vt[:max(1, int(np.sum(singular > singular[0] * 1e-10)))].T
            X_train, X_valid, X_test = X_train @ basis, X_valid @ basis, X_test @ basis
        for C in sorted(Cs):
            if multilabel:
                classifier.set_params(estimator__C=C)
            else:
                classifier.set_params(C=C)
            classifier.fit(X_train, y)
            value = score(_predict(classifier, X_valid, classes, vocabulary, multilabel), valid_targets)
            value = value if math.isfinite(value) else -math.inf
            if best is None or value > best[0]:
                best = (value, C, _predict(classifier, X_test, classes, vocabulary, multilabel))
    assert best is not None
    test_score = score(best[2], targets_matrix(test.labels, vocabulary))
    return ProbeResult(float(test_score), float(best[1]), float(best[0]))


# ----------------------------------------------------------------------------------------------
# heareval's own predictor on a k-shot training set
# ----------------------------------------------------------------------------------------------

def _write_heareval_split(folder: Path, name: str, split: Split) -> None:
    """One split as heareval's embeddings runner writes it and its predictions runner reads it:
    ``<split>.embeddings.npy`` (a raw float32 memmap), ``.embedding-dimensions.json``,
    ``.target-labels.pkl`` (label lists), and ``<split>.json`` (the ground truth, which heareval
    reads for event tasks only; written so that the folder says which files it holds)."""
    memmap = np.memmap(folder / f"{name}.embeddings.npy", dtype=np.float32, mode="w+", shape=split.X.shape)
    memmap[:] = split.X
    memmap.flush()
    del memmap
    (folder / f"{name}.embedding-dimensions.json").write_text(json.dumps(list(split.X.shape)))
    (folder / f"{name}.target-labels.pkl").write_bytes(pickle.dumps([list(l) for l in split.labels]))
    (folder / f"{name}.json").write_text(json.dumps({f: list(l) for f, l in zip(split.files, split.labels)}))


def write_heareval_task(meta: TaskMeta, folder: str | os.PathLike, train: Split, valid: Split,
                        test: Split) -> Path:
    """A heareval embeddings task folder whose train split is ``train`` (the k-shot set).

    Always a ``trainvaltest`` folder: heareval's predictor then trains on exactly ``train``,
    selects on ``valid`` and scores ``test``. For a k-fold task this is one fold's point
    (train: the draw from that fold's training folds, valid: fold i+1, test: fold i); for a
    task without a validation split, ``valid`` is the carved 20 % the probe also uses (heareval
    itself cannot run such a task). The task's metadata is kept otherwise, so its own
    ``evaluation_params`` grid and heareval's per-task grid apply as on full data."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    metadata = read_json(meta.path / "task_metadata.json")
    metadata.update(split_mode="trainvaltest", splits=["train", "valid", "test"])
    (folder / "task_metadata.json").write_text(json.dumps(metadata, indent=1))
    shutil.copyfile(meta.path / "labelvocabulary.csv", folder / "labelvocabulary.csv")
    for name, split in (("train", train), ("valid", valid), ("test", test)):
        _write_heareval_split(folder, name, split)
    return folder


def heareval_result(folder: Path, metric: str) -> tuple[float, float]:
    """(test score of ``metric``, validation score) from heareval's ``test.predicted-scores.json``."""
    path = folder / SCORES_FILE
    if not path.is_file():
        raise FewShotError(f"heareval wrote no {path}")
    results = read_json(path)  # Python's json reads heareval's bare NaN / Infinity
    test = results.get("test") if isinstance(results, dict) else None
    if not isinstance(test, dict) or f"test_{metric}" not in test:
        raise FewShotError(f"{path}: no 'test' entry with test_{metric}")
    return float(test[f"test_{metric}"]), float(test.get("validation_score", math.nan))
