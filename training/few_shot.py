"""Few-shot curves on HEAR tasks from heareval's embeddings: k examples per class, seeded draws.

heareval trains on each task's full training split and reports one number. This module reuses
the embeddings heareval's embeddings runner already wrote (computed once per task and
checkpoint) and, for each k in a list and several seeded draws, trains a standardised linear
probe (scikit-learn ``LogisticRegression``; one-vs-rest for multilabel tasks) on k training
examples per class, chooses its regularisation ``C`` on the untouched validation split and
scores the untouched test split with heareval's own score function for the task's first
(primary) metric, so numbers are comparable with heareval's.

Input: heareval's embeddings folders, ``<embeddings-dir>/<module>/<task>/`` with
``task_metadata.json``, ``labelvocabulary.csv``, ``<split>.json`` (the ground truth heareval
copies) and the per-file ``<split>/<file>.embedding.npy``. Those per-file arrays are read,
not the per-split memmap, because they carry each clip's file name: draws are made over file
names sorted, so the draw for (task, k, draw, fold) is the same for every checkpoint and
comparisons are paired.

Choices (documented in the report and tested):
- Draws: for (task, fold, draw) one seeded permutation per class; k-shot takes its first k, so
  draws are nested across k (the 2-shot set contains the 1-shot set) and do not depend on the
  checkpoint. Multilabel: files are walked in one seeded order and kept while some label has
  fewer than k positives ("k per label").
- k larger than the smallest class of the training pool: the point is skipped with a message
  naming the class, the run goes on.
- k-fold tasks: heareval's convention, test = fold i, valid = fold i+1, train = the others;
  draws are made within each fold's training pool.
- No validation split (a ``trainvaltest`` task listing only train and test): C is chosen on a
  seeded stratified 20 % of the training split, carved once per task (not per checkpoint); the
  rest is the k-shot pool.
- Labels are compared as strings, as heareval does (hearpreprocess writes integer labels as
  JSON numbers).
- Event tasks are skipped with a message: "k examples per class" has no clean meaning when a
  file holds several events of several labels and frames are the training unit, and their
  score depends on heareval's post-processing grid (median filter, minimum duration), which a
  linear probe would have to re-implement; k-file event curves are left for later.

heareval's own predictor (``predictor="heareval"``, ``--few-shot-predictor heareval``), for
comparability with full-data HEAR scores: each point's k-shot set (the same files the probe
draws) is written as a temporary heareval embeddings folder (``<split>.embeddings.npy`` memmap,
``.embedding-dimensions.json``, ``.target-labels.pkl``, metadata, vocabulary: what heareval's
predictions runner reads) and heareval's predictions runner is run on it as
:mod:`training.hear_eval` runs it (:func:`training.heareval_compat.command`, ``--grid`` /
``--grid-points`` as given to ``hear-eval``, the task metadata's own grid on top). That folder
is always ``trainvaltest``: train = the k-shot set, valid and test as for the probe, so a
k-fold task's point is one fold (heareval's k-fold mode would train every fold on its full
training folds, and grid-search on fold 0 only) and a task without a validation split gets
the probe's carved 20 % (heareval cannot run such a task at all). The score is the primary
metric of ``test.predicted-scores.json``. Points are batched (16 per runner call) because each
call pays the runner's start (torch, Lightning and heareval imports); runner logs stay in
``<out>/heareval_work/<checkpoint>/``.

Resumable: every finished point is appended (one line, flushed) to ``few_shot_points.csv``
keyed by (checkpoint, task, k, draw, fold, predictor); a skipped point is stored too, with
its message, so a resume need not read the embeddings again to find it skipped. A killed run
continues where it stopped, and a rerun with more draws or ks computes only the new points.
Probe and heareval points share a folder but never mix (the key); the seed, the probe's C
grid and heareval's grid are checked against the folder's earlier points
(``few_shot_config.json``). The inputs and draws are in :mod:`training.few_shot_data`, the
two predictors in :mod:`training.few_shot_predictors`, the statistics and plots in
:mod:`training.few_shot_stats`.

Command line::

    python -m training.few_shot [LABEL=]EMB_DIR... --out DIR [--few-shot 1,2,4,8,16,32] [--draws 5]
        [--few-shot-seed 0] [--few-shot-baseline pretrained] [--few-shot-compare A,B,...]
        [--few-shot-predictor probe|heareval] [--grid default] [--grid-points 1]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from hear_brainsoundnet.files import atomic_write

from . import heareval_compat
from .few_shot_data import (
    VALID_FRACTION,
    FewShotError,
    FoldPlan,
    SkipPoint,
    Split,
    TaskMeta,
    carve_validation,
    draw_indices,
    find_task_dirs,
    fold_plans,
    read_json,
    read_split,
    read_task_meta,
)
from .few_shot_predictors import (
    DEFAULT_CS,
    fit_probe,
    heareval_result,
    score_function,
    write_heareval_task,
)
from .hear_eval import EMBEDDINGS_DONE, log_tail, run_logged

DEFAULT_KS = (1, 2, 4, 8, 16, 32)
DEFAULT_DRAWS = 5
POINTS_FILE = "few_shot_points.csv"
CONFIG_FILE = "few_shot_config.json"
INPUTS_FILE = "few_shot_inputs.json"  # each (checkpoint, task)'s embeddings marker time
# ``predictor`` is part of a point's key (probe and heareval points never mix); ``skipped`` holds
# the message of a point that cannot be drawn (k larger than a class), so a resume need not
# re-read the embeddings to find that out again.
POINT_FIELDS = ("checkpoint", "task", "k", "draw", "fold", "score", "metric", "C", "valid_score",
                "n_train", "predictor", "skipped")
LEGACY_POINT_FIELDS = POINT_FIELDS[:10]  # files written before predictor/skipped: probe points
PREDICTORS = ("probe", "heareval")
# Points per heareval predictions-runner call: one call pays the runner's start (torch,
# Lightning and heareval imports) once for many points; a kill loses at most this many.
HEAREVAL_BATCH = 16
HEAREVAL_GRIDS = ("default", "fast", "faster")  # heareval's predictions runner --grid
HEAREVAL_WORK = "heareval_work"  # under the output folder; each batch's folders, removed after


# ----------------------------------------------------------------------------------------------
# heareval's predictor on a batch of points
# ----------------------------------------------------------------------------------------------

def _heareval_points(meta: TaskMeta, pending: Sequence[tuple[PointKey, "_Fold", np.ndarray]],
                     store: "PointStore", work: Path, options: PredictorOptions) -> int:
    """Score ``pending`` (key, fold, k-shot indices) points with heareval's predictions runner,
    run as :mod:`training.hear_eval` runs it (:func:`training.heareval_compat.command`, its log
    appended to ``work/../<task>.predictions.log``); store each; the number stored.

    Points that finished are stored even when a later one failed; then FewShotError names the
    log and the folder, which is kept for inspection (otherwise it is removed)."""
    batch = work / meta.name
    if batch.exists():  # left by a killed or failed run: its points were not stored
        shutil.rmtree(batch)
    folders = []
    for key, fold, index in pending:
        _, _, k, draw, f, _ = key
        folders.append(write_heareval_task(meta, batch / f"k{k}_draw{draw}_fold{f}" / meta.name,
                                           fold.pool.take(index), fold.valid, fold.test))
    log_path = work / f"{meta.name}.predictions.log"
    argv = heareval_compat.command("predictions", [*(d.resolve() for d in folders), "--grid", options.grid,
                                                   "--grid-points", options.grid_points])
    code = run_logged(argv, log_path, batch, options.timeout)  # cwd: Lightning's ./logs go in the batch
    stored = 0
    for (key, fold, index), folder in zip(pending, folders):
        try:
            score, valid_score = heareval_result(folder, meta.metric)
        except FewShotError as error:
            raise FewShotError(f"task {meta.name}: heareval predictions runner (exit {code}) on {folder}: "
                               f"{error}; see {log_path}:\n{log_tail(log_path)}") from None
        store.append(_point_row(key, meta.metric, score, math.nan, valid_score, len(index)))
        stored += 1
    shutil.rmtree(batch)
    return stored


# ----------------------------------------------------------------------------------------------
# The resumable store of finished points
# ----------------------------------------------------------------------------------------------

PointKey = tuple[str, str, int, int, int, str]  # (checkpoint, task, k, draw, fold, predictor)


class PointStore:
    """Append-only CSV of finished points (and skipped ones, with their message), one flushed
    line each; a line cut by a kill is dropped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: dict[PointKey, dict[str, Any]] = {}
        if self.path.is_file():
            self._load()

    @staticmethod
    def key(row: Mapping[str, Any]) -> PointKey:
        return (str(row["checkpoint"]), str(row["task"]), int(row["k"]), int(row["draw"]), int(row["fold"]),
                str(row["predictor"]))

    def _header(self, data: bytes) -> tuple[str, ...]:
        """The file's header, checked before anything is cut (a foreign file is left untouched)."""
        first = data.split(b"\n", 1)[0]
        try:
            fields = tuple(next(csv.reader([first.decode()]), ()))
        except UnicodeDecodeError:
            fields = ()
        if fields not in (POINT_FIELDS, LEGACY_POINT_FIELDS):
            raise FewShotError(f"{self.path}: header {list(fields)} is not {list(POINT_FIELDS)}; "
                               "not a few-shot points file")
        return fields

    def _load(self) -> None:
        data, fields = self.path.read_bytes(), POINT_FIELDS
        if b"\n" not in data and ",".join(POINT_FIELDS).encode().startswith(data):
            data = b""  # killed while the header itself was being written
        elif data:
            fields = self._header(data)
            if not data.endswith(b"\n"):  # the last line was being written when killed
                data = data[: data.rfind(b"\n") + 1]
        if len(data) != self.path.stat().st_size:
            with open(self.path, "r+b") as handle:
                handle.truncate(len(data))
        if not data:
            return
        for line, row in enumerate(csv.DictReader(io.StringIO(data.decode())), start=2):
            try:
                row = {"checkpoint": row["checkpoint"], "task": row["task"], "k": int(row["k"]),
                       "draw": int(row["draw"]), "fold": int(row["fold"]), "score": float(row["score"]),
                       "metric": row["metric"], "C": float(row["C"]), "valid_score": float(row["valid_score"]),
                       "n_train": int(row["n_train"]), "predictor": row.get("predictor") or "probe",
                       "skipped": row.get("skipped") or ""}
            except (TypeError, ValueError) as error:
                raise FewShotError(f"{self.path} line {line}: not a few-shot point ({error})") from None
            self.rows[self.key(row)] = row
        if fields == LEGACY_POINT_FIELDS:  # rewrite once in today's format (the rows are probe points)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(self._csv(self.rows.values(), True)))

    @staticmethod
    def _csv(rows: Iterable[Mapping[str, Any]], header: bool) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=POINT_FIELDS, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows({name: row[name] for name in POINT_FIELDS} for row in rows)
        return buffer.getvalue()

    def __contains__(self, key: PointKey) -> bool:
        return key in self.rows

    def append(self, row: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with open(self.path, "a") as handle:
            handle.write(self._csv([row], new))  # one write: a kill leaves at most one cut line
            handle.flush()
        self.rows[self.key(row)] = dict(row)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.rows.values()), columns=list(POINT_FIELDS))


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------

@dataclass
class FewShotResult:
    """Outcome of :func:`run_few_shot`: the long score table, what was skipped and why, the
    paired statistics, the files written and how many points this call computed."""

    out_dir: Path
    scores: pd.DataFrame
    skipped: list[str]
    stats: pd.DataFrame
    summary: list[str]
    files: dict[str, Path]
    computed: int = 0
    fits: int = 0  # predictor fits (probe: one per C per computed point; heareval: one per grid point)


def parse_ks(text: str | Iterable[int]) -> tuple[int, ...]:
    """``"1,2,4"`` (or integers) -> sorted unique ks; a clear error for anything else."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        ks = sorted({int(str(item).strip()) for item in items if str(item).strip()})
    except ValueError:
        raise FewShotError(f"--few-shot: expected comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise FewShotError(f"--few-shot: ks must be integers >= 1, got {text!r}")
    return tuple(ks)


@dataclass(frozen=True)
class PredictorOptions:
    """Which predictor fits each point, and its settings.

    ``probe``: the linear probe, C chosen on validation among ``Cs``. ``heareval``: heareval's
    own predictor (its predictions runner, ``--grid grid --grid-points grid_points``, the task
    metadata's own grid applied on top, as ``hear-eval`` runs it on full data); ``timeout``
    bounds each runner call (seconds, None: none)."""

    name: str = "probe"
    Cs: tuple[float, ...] = DEFAULT_CS
    grid: str = "default"
    grid_points: int = 1
    timeout: float | None = None

    def __post_init__(self) -> None:
        if self.name not in PREDICTORS:
            raise FewShotError(f"predictor must be one of {list(PREDICTORS)}, got {self.name!r}")
        if self.grid not in HEAREVAL_GRIDS:
            raise FewShotError(f"heareval grid must be one of {list(HEAREVAL_GRIDS)}, got {self.grid!r}")
        if self.grid_points < 1:
            raise FewShotError(f"heareval grid points must be at least 1, got {self.grid_points}")

    def settings(self) -> dict[str, Any]:
        """What the points of this predictor depend on beyond the draws (kept in the config)."""
        if self.name == "probe":
            return {"Cs": [float(c) for c in self.Cs]}
        return {"heareval_grid": {"grid": self.grid, "grid_points": self.grid_points}}


def _check_config(out_dir: Path, seed: int, options: PredictorOptions) -> None:
    """Refuse to mix points of another seed, C grid or heareval grid into an output folder
    (resume safety). Probe and heareval points are told apart by their key, so both may share
    a folder; each predictor's settings are checked against its own earlier points."""
    path = out_dir / CONFIG_FILE
    saved = read_json(path) if path.is_file() else {}
    if not isinstance(saved, dict):
        raise FewShotError(f"{path}: not a few-shot config (a JSON object)")
    wanted = {"seed": seed, "valid_fraction_when_no_valid_split": VALID_FRACTION, **options.settings()}
    for key, value in wanted.items():
        if key in saved and saved[key] != value:
            raise FewShotError(f"{path}: this folder holds few-shot points for {key}={saved[key]}, "
                               f"not {value}; use another output folder")
    saved.pop("predictor", None)  # written by earlier versions: "logistic-regression probe"
    updated = {**saved, **wanted, "predictors": sorted(set(saved.get("predictors", [])) | {options.name})}
    if updated != saved:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(updated, indent=2) + "\n"))


def _check_inputs(out_dir: Path, chosen: Mapping[str, Mapping[str, TaskMeta]], store: "PointStore") -> None:
    """Refuse to reuse points computed from embeddings that have since been recomputed (a new
    ``.done.embeddings`` marker), which would silently mix two versions of a checkpoint."""
    path = out_dir / INPUTS_FILE
    saved = read_json(path) if path.is_file() else {}
    done = {key[:2] for key in store.rows}
    for label, metas in chosen.items():
        for name, meta in metas.items():
            stamp = (meta.path / EMBEDDINGS_DONE).stat().st_mtime_ns
            before = saved.setdefault(label, {}).setdefault(name, stamp)
            if before != stamp and (label, name) in done:
                raise FewShotError(f"the embeddings of checkpoint {label!r}, task {name} ({meta.path}) were "
                                   f"recomputed after their few-shot points in {out_dir / POINTS_FILE}; "
                                   "use another output folder (or delete this one)")
            saved[label][name] = stamp
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(saved, indent=1) + "\n"))


@dataclass
class _Fold:
    plan: FoldPlan
    pool: Split
    valid: Split
    test: Split


def _prepare_folds(meta: TaskMeta, seed: int, log: Callable[[str], None],
                   said: dict[str, None], embeddings: bool = True) -> list[_Fold]:
    splits = {name: read_split(meta, name, embeddings) for name in meta.splits}
    dims = {s.X.shape[1] for s in splits.values()}
    if len(dims) != 1:
        raise FewShotError(f"{meta.path}: splits have embeddings of different sizes {sorted(dims)}")
    folds = []
    for plan in fold_plans(meta):
        pool = Split.concat([splits[name] for name in plan.train])
        if plan.valid:
            valid = Split.concat([splits[name] for name in plan.valid])
        else:
            pool, valid = carve_validation(pool, seed=seed, task=meta.name, fold=plan.fold)
            _say(log, said, f"task {meta.name}: no validation split; C is chosen on a seeded "
                            f"stratified {VALID_FRACTION:.0%} of train ({len(valid.files)} files), "
                            f"the other {len(pool.files)} are the k-shot pool")
        folds.append(_Fold(plan, pool, valid, Split.concat([splits[name] for name in plan.test])))
    return folds


def _say(log: Callable[[str], None], said: dict[str, None], message: str) -> None:
    if message not in said:  # the same skip holds for every checkpoint: say it once
        said[message] = None
        log(message)


def _point_row(key: PointKey, metric: str, score: float = math.nan, C: float = math.nan,
               valid_score: float = math.nan, n_train: int = 0, skipped: str = "") -> dict[str, Any]:
    label, task, k, draw, fold, predictor = key
    return {"checkpoint": label, "task": task, "k": k, "draw": draw, "fold": fold, "score": score,
            "metric": metric, "C": C, "valid_score": valid_score, "n_train": n_train,
            "predictor": predictor, "skipped": skipped}


def _slug_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in text) or "_"


def _run_task(label: str, meta: TaskMeta, ks: Sequence[int], draws: int, seed: int,
              options: PredictorOptions, store: PointStore, work: Path, bar, log: Callable[[str], None],
              said: dict[str, None]) -> int:
    """Every missing (k, draw, fold) point of one checkpoint's task; the number computed.

    Stored points are not redone, stored skips are said again (same messages, same order) and
    the embeddings are read only when some point is missing. heareval points are batched
    (:data:`HEAREVAL_BATCH`) into one predictions-runner call."""
    n_folds = len(fold_plans(meta))
    multilabel = meta.prediction_type == "multilabel"
    keys = [(label, meta.name, k, d, f, options.name) for k in ks for d in range(draws) for f in range(n_folds)]
    # Read the embeddings only if some point is missing; otherwise the labels alone say again
    # what carving a validation split said on the first run.
    folds = _prepare_folds(meta, seed, log, said) if any(key not in store for key in keys) else None
    if folds is None and not fold_plans(meta)[0].valid:
        _prepare_folds(meta, seed, log, said, embeddings=False)
    score = None
    pending: list[tuple[PointKey, _Fold, np.ndarray]] = []
    waiting = 0  # (k, draw) groups whose heareval points are in ``pending``
    computed = 0
    for k in ks:
        for draw in range(draws):
            for f in range(n_folds):
                key = (label, meta.name, k, draw, f, options.name)
                if key in store:
                    if store.rows[key]["skipped"]:
                        _say(log, said, store.rows[key]["skipped"])
                    continue
                assert folds is not None  # some point is missing
                fold = folds[f]
                try:
                    index = draw_indices(fold.pool.labels, k, seed=seed, task=meta.name, fold=f, draw=draw,
                                         multilabel=multilabel,
                                         where=f" (test fold {fold.plan.test[0]})" if n_folds > 1 else "")
                except SkipPoint as skip:
                    _say(log, said, str(skip))
                    store.append(_point_row(key, meta.metric, skipped=str(skip)))
                    continue
                if options.name == "heareval":
                    pending.append((key, fold, index))
                    continue
                score = score or score_function(meta.metric, meta.vocabulary)
                try:
                    result = fit_probe(fold.pool.take(index), fold.valid, fold.test, meta.vocabulary,
                                       meta.metric, multilabel, options.Cs, score)
                except FewShotError as error:
                    raise FewShotError(f"task {meta.name} ({meta.path}), fold {f}: {error}") from None
                store.append(_point_row(key, meta.metric, result.score, result.C, result.valid_score, len(index)))
                computed += 1
            waiting += 1
            if options.name == "probe" or len(pending) >= HEAREVAL_BATCH or (k, draw) == (ks[-1], draws - 1):
                if pending:
                    computed += _heareval_points(meta, pending, store, work / _slug_name(label), options)
                    pending = []
                bar.update(waiting)
                waiting = 0
    return computed


def _log_above(bar, log: Callable[[str], None], message: str) -> None:
    with bar.external_write_mode(file=sys.stderr):  # the message above the bar, not through it
        log(message)


def _collect_tasks(embedding_dirs: Mapping[str, str | os.PathLike], tasks: Iterable[str] | None,
                   log: Callable[[str], None], said: dict[str, None]) -> dict[str, dict[str, TaskMeta]]:
    """Checkpoint label -> {task folder name: metadata} of the tasks the sweep runs."""
    keep = set(tasks) if tasks is not None else None
    chosen: dict[str, dict[str, TaskMeta]] = {}
    for label, folder in embedding_dirs.items():
        chosen[label] = {}
        for name, path in find_task_dirs(folder).items():
            if keep is not None and name not in keep:
                continue
            meta = read_task_meta(path)
            reason = meta.skip_reason()
            if reason:
                _say(log, said, reason)
                continue
            chosen[label][name] = meta
    names = sorted({name for metas in chosen.values() for name in metas})
    for label, metas in chosen.items():
        absent = [name for name in names if name not in metas]
        if absent:
            log(f"checkpoint {label}: no finished embeddings for task(s) {absent}; their "
                "comparisons leave this checkpoint out")
    return chosen


def run_few_shot(embedding_dirs: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike,
                 ks: Sequence[int] = DEFAULT_KS, draws: int = DEFAULT_DRAWS, seed: int = 0, *,
                 Cs: Sequence[float] = DEFAULT_CS, tasks: Iterable[str] | None = None,
                 baseline: str | None = "pretrained", compare: Sequence[str] | None = None,
                 unit: str = "subject", alpha: float = 0.05, progress: bool = True,
                 predictor: str = "probe", heareval_grid: str = "default", heareval_grid_points: int = 1,
                 heareval_timeout: float | None = None,
                 log: Callable[[str], None] = print) -> FewShotResult:
    """The few-shot sweep over checkpoints' heareval embeddings, resumable, then tables and plots.

    ``embedding_dirs`` maps a checkpoint label to heareval's ``--embeddings-dir`` for it (or a
    module's folder). Every (checkpoint, task, k, draw, fold) point is computed once and kept
    in ``out_dir/few_shot_points.csv``; what is already there is not recomputed. ``baseline``
    (a label; None: no statistics) is compared with ``compare`` (default: every other label)
    by :func:`training.few_shot_stats.paired_stats` with ``unit`` ("subject" or "draw").
    ``predictor``: "probe" (the linear probe, C among ``Cs``) or "heareval" (heareval's own
    predictor, ``--grid heareval_grid --grid-points heareval_grid_points``; see
    :class:`PredictorOptions`). Returns the long table (checkpoint, task, k, draw, fold, score,
    metric, C, valid_score, n_train, predictor) of the requested points and the outputs' paths.
    """
    from tqdm.auto import tqdm

    from . import few_shot_stats

    out_dir = Path(out_dir)
    ks = parse_ks(ks)
    options = PredictorOptions(predictor, tuple(Cs), heareval_grid, heareval_grid_points, heareval_timeout)
    if draws < 1:
        raise FewShotError(f"draws must be at least 1, got {draws}")
    if not embedding_dirs:
        raise FewShotError("no checkpoints' embeddings given")
    if baseline is not None and baseline not in embedding_dirs:
        raise FewShotError(f"baseline {baseline!r} is not one of the checkpoints {list(embedding_dirs)}")
    said: dict[str, None] = {}  # messages in the order they were first said
    chosen = _collect_tasks(embedding_dirs, tasks, log, said)
    if not any(chosen.values()):
        raise FewShotError("no task to run: no finished scene-task embeddings in "
                           f"{[str(p) for p in embedding_dirs.values()]}")
    _check_config(out_dir, seed, options)
    store = PointStore(out_dir / POINTS_FILE)
    _check_inputs(out_dir, chosen, store)
    total = sum(len(metas) for metas in chosen.values()) * len(ks) * draws
    computed = 0
    with tqdm(total=total, desc="few-shot (checkpoint, task, k, draw)", disable=not progress,
              unit="draw", file=sys.stderr) as bar:
        for label, metas in chosen.items():
            for name, meta in sorted(metas.items()):
                bar.set_postfix_str(f"{label} {name}", refresh=False)
                computed += _run_task(label, meta, ks, draws, seed, options, store, out_dir / HEAREVAL_WORK,
                                      bar, lambda m: _log_above(bar, log, m), said)
    frame = store.frame()
    wanted = (frame["checkpoint"].isin(list(chosen)) & frame["k"].isin(ks) & (frame["draw"] < draws)
              & (frame["predictor"] == predictor) & (frame["skipped"] == "")
              & frame.apply(lambda r: r["task"] in chosen.get(r["checkpoint"], {}), axis=1)
              if not frame.empty else pd.Series([], dtype=bool))
    scores = (frame[wanted].drop(columns="skipped").sort_values(["checkpoint", "task", "k", "draw", "fold"])
              .reset_index(drop=True))
    outputs = few_shot_stats.write_outputs(scores, out_dir, baseline=baseline, compare=compare,
                                           unit=unit, alpha=alpha, skipped=list(said))
    return FewShotResult(out_dir, scores, list(said), outputs.stats, outputs.summary,
                         outputs.files, computed,
                         computed * (len(Cs) if predictor == "probe" else heareval_grid_points))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def add_few_shot_arguments(parser: argparse.ArgumentParser, *, default_ks: str | None = None) -> None:
    """The few-shot options (``--few-shot KS --draws N ...``), for ``hear-eval`` and this module.

    With ``default_ks=None`` the sweep is off unless ``--few-shot`` is given."""
    group = parser.add_argument_group("few-shot curves (training.few_shot)")
    group.add_argument("--few-shot", metavar="KS", default=default_ks,
                       help="examples per class (per label for multilabel tasks), comma-separated, "
                            f"e.g. {','.join(map(str, DEFAULT_KS))}"
                            + ("" if default_ks is None else f" (default {default_ks})"))
    group.add_argument("--draws", type=int, default=DEFAULT_DRAWS,
                       help=f"seeded draws of the training split per k (default {DEFAULT_DRAWS})")
    group.add_argument("--few-shot-seed", type=int, default=0, help="seed of the draws (default 0)")
    group.add_argument("--few-shot-baseline", default="pretrained",
                       help="checkpoint label the others are compared with (default pretrained; "
                            "'none': no statistics)")
    group.add_argument("--few-shot-compare", default=None, metavar="LABELS",
                       help="comma-separated labels compared with the baseline, one per subject "
                            "(default: every other checkpoint)")
    group.add_argument("--few-shot-predictor", default="probe", choices=PREDICTORS,
                       help="probe: a linear probe, C chosen on validation (fast, the few-shot "
                            "literature's standard); heareval: heareval's own predictor on each k-shot "
                            "training set, with hear-eval's --grid/--grid-points (comparable with "
                            "full-data HEAR scores; a runner call per batch of points, slow on CPU)")
    group.add_argument("--few-shot-unit", default="subject", choices=("subject", "draw"),
                       help="pairs of the Wilcoxon test: subjects' checkpoints (mean over draws and "
                            "folds; the study's) or draws (mean over the compared checkpoints)")


def check_args(args: argparse.Namespace, labels: Iterable[str]) -> None:
    """Refuse bad few-shot options before any embedding is computed (hours on real tasks):
    the ks, the number of draws, the seed, and baseline / compared labels among ``labels``."""
    if args.few_shot is None:
        return
    parse_ks(args.few_shot)
    if args.draws < 1:
        raise FewShotError(f"--draws must be at least 1, got {args.draws}")
    if args.few_shot_seed < 0:
        raise FewShotError(f"--few-shot-seed must be >= 0, got {args.few_shot_seed}")
    labels = list(labels)
    wanted = [] if str(args.few_shot_baseline).lower() == "none" else [args.few_shot_baseline]
    wanted += [c.strip() for c in (args.few_shot_compare or "").split(",") if c.strip()]
    unknown = [label for label in wanted if label not in labels]
    if unknown:
        raise FewShotError(f"--few-shot-baseline/--few-shot-compare name {unknown}, which are not among "
                           f"the checkpoints' labels {labels} (label a checkpoint with LABEL=CHECKPOINT, "
                           "or pass --few-shot-baseline none)")


def run_from_args(args: argparse.Namespace, embedding_dirs: Mapping[str, str | os.PathLike],
                  out_dir: str | os.PathLike, *, tasks: Iterable[str] | None = None,
                  log: Callable[[str], None] = print) -> FewShotResult | None:
    """Run the sweep the parsed options ask for (None when ``--few-shot`` was not given);
    ``tasks`` keeps only those task folder names."""
    if args.few_shot is None:
        return None
    baseline = None if str(args.few_shot_baseline).lower() == "none" else args.few_shot_baseline
    compare = ([c.strip() for c in args.few_shot_compare.split(",") if c.strip()]
               if args.few_shot_compare else None)
    return run_few_shot(embedding_dirs, out_dir, parse_ks(args.few_shot), args.draws,
                        args.few_shot_seed, tasks=tasks, baseline=baseline, compare=compare,
                        unit=args.few_shot_unit, progress=getattr(args, "few_shot_progress", True),
                        predictor=getattr(args, "few_shot_predictor", "probe"),
                        # hear-eval's own predictor settings, so that heareval points match its full-data run
                        heareval_grid=getattr(args, "grid", "default"),
                        heareval_grid_points=getattr(args, "grid_points", 1), log=log)


def _parse_embedding_dir(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep:
        path, label = text, Path(text).name
    return label.strip(), Path(path.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.few_shot",
                                     description="Few-shot curves with a linear probe on heareval embeddings.")
    parser.add_argument("embeddings", nargs="+", metavar="[LABEL=]EMB_DIR",
                        help="heareval --embeddings-dir of each checkpoint (label: the folder's name)")
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    add_few_shot_arguments(parser, default_ks=",".join(map(str, DEFAULT_KS)))
    parser.add_argument("--grid", default="default", choices=HEAREVAL_GRIDS,
                        help="heareval's --grid for --few-shot-predictor heareval (default: default)")
    parser.add_argument("--grid-points", type=int, default=1,
                        help="heareval's --grid-points for --few-shot-predictor heareval (default 1)")
    parser.add_argument("--no-progress", dest="few_shot_progress", action="store_false",
                        help="no progress bar")
    args = parser.parse_args(argv)
    dirs = dict(_parse_embedding_dir(text) for text in args.embeddings)
    if len(dirs) != len(args.embeddings):
        raise SystemExit("error: checkpoint labels must be unique (use LABEL=EMB_DIR)")
    try:
        check_args(args, dirs)
        result = run_from_args(args, dirs, args.out)
    except FewShotError as error:
        raise SystemExit(f"error: {error}") from None
    assert result is not None
    print((Path(args.out) / "few_shot.md").read_text())
    print(f"{result.computed} point(s) computed; wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
