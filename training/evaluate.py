"""Brain-encoding evaluation on held-out runs: scores, model comparison, noise ceilings, brain maps.

The study scored every parcel (or voxel) on every held-out run with ``sklearn.metrics.r2_score``
and compared conditions with a Wilcoxon signed-rank test across runs followed by a
Benjamini-Yekutieli FDR correction over targets. This module does the same, reports Pearson r
beside r2, expresses scores as a fraction of a known noise ceiling when the data carry one
(the synthetic dataset does), and draws the scores back onto the brain with nilearn.

Shapes: a run's targets and predictions are ``(n_TR, n_targets)``; per-run scores are
``(n_runs, n_targets)``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import r2_score

from hear_brainsoundnet.files import atomic_write

METRICS = ("r", "r2")


def read_table(path: str | os.PathLike, **kwargs) -> pd.DataFrame:
    """A CSV table this package wrote: labels such as ``null`` or ``NA`` stay strings (pandas
    would read them as missing values); only empty cells are missing."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""], **kwargs)


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------

def _check_pair(y_true: np.ndarray, y_pred: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != y_pred.shape:
        raise ValueError(f"{what}: targets {y_true.shape} and predictions {y_pred.shape} must both "
                         "be (n_TR, n_targets) of the same shape")
    if y_true.shape[0] < 3:
        raise ValueError(f"{what}: {y_true.shape[0]} time points; scores need at least 3")
    for name, array in (("targets", y_true), ("predictions", y_pred)):
        if not np.isfinite(array).all():
            raise ValueError(f"{what}: {name} contain NaN or infinite values")
    return y_true, y_pred


def pearson_r(y_true: np.ndarray, y_pred: np.ndarray, *, what: str = "run") -> np.ndarray:
    """Pearson r between each target column and its prediction, ``(n_targets,)``.

    r is undefined when either series is constant (e.g. a dead network predicting a flat line);
    it is reported as 0 there (no linear association), as ``r2_score`` reports a finite value.
    """
    y_true, y_pred = _check_pair(y_true, y_pred, what)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        r = stats.pearsonr(y_true, y_pred, axis=0).statistic
    return np.nan_to_num(np.asarray(r, dtype=np.float64), nan=0.0)


def r2(y_true: np.ndarray, y_pred: np.ndarray, *, what: str = "run") -> np.ndarray:
    """Coefficient of determination per target, ``sklearn.metrics.r2_score`` semantics, ``(n_targets,)``.

    Unlike r, r2 penalises offset and scale errors and is negative for a prediction worse than
    the run's own mean.
    """
    y_true, y_pred = _check_pair(y_true, y_pred, what)
    return np.asarray(r2_score(y_true, y_pred, multioutput="raw_values"), dtype=np.float64)


@dataclass
class EncodingScores:
    """Per-run, per-target scores of one model on held-out runs.

    ``r`` and ``r2`` are ``(n_runs, n_targets)``; row i belongs to ``runs[i]``.
    """

    model: str
    runs: list[str]
    targets: list[str]
    r: np.ndarray
    r2: np.ndarray

    def __post_init__(self) -> None:
        self.runs, self.targets = list(self.runs), list(self.targets)
        shape = (len(self.runs), len(self.targets))
        for metric in METRICS:
            value = np.asarray(getattr(self, metric), dtype=np.float64)
            if value.shape != shape:
                raise ValueError(f"scores of {self.model!r}: {metric} has shape {value.shape}, "
                                 f"expected (runs, targets) = {shape}")
            setattr(self, metric, value)

    def metric(self, name: str) -> np.ndarray:
        """The ``(n_runs, n_targets)`` array of ``name`` ("r" or "r2")."""
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; choose one of {METRICS}")
        return getattr(self, name)

    def mean(self, name: str) -> np.ndarray:
        """Mean of ``name`` over runs, per target, ``(n_targets,)``."""
        return self.metric(name).mean(axis=0)

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (run, target) with columns model, run, target, r, r2."""
        n_runs, n_targets = len(self.runs), len(self.targets)
        return pd.DataFrame({
            "model": self.model,
            "run": np.repeat(self.runs, n_targets),
            "target": np.tile(self.targets, n_runs),
            "r": self.r.ravel(),
            "r2": self.r2.ravel(),
        })

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, model: str | None = None) -> "EncodingScores":
        """Inverse of :meth:`to_frame` (rows for one model; runs and targets in first-seen order)."""
        missing = {"model", "run", "target", *METRICS} - set(frame.columns)
        if missing:
            raise ValueError(f"score table lacks columns {sorted(missing)}")
        models = list(dict.fromkeys(frame["model"]))
        model = model if model is not None else (models[0] if len(models) == 1 else None)
        if model is None or model not in models:
            raise ValueError(f"score table holds models {models}; name one (got {model!r})")
        rows = frame[frame["model"] == model]
        runs = list(dict.fromkeys(rows["run"]))
        targets = list(dict.fromkeys(rows["target"]))
        arrays = {}
        for metric in METRICS:
            table = rows.pivot(index="run", columns="target", values=metric)
            if table.isna().any().any():
                raise ValueError(f"score table of {model!r} is missing some (run, target) pairs")
            arrays[metric] = table.loc[runs, targets].to_numpy()
        return cls(model=model, runs=runs, targets=targets, **arrays)

    def save_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_frame` to ``path`` atomically."""
        return atomic_write(path, lambda tmp: self.to_frame().to_csv(tmp, index=False))

    @classmethod
    def load_csv(cls, path: str | os.PathLike, model: str | None = None) -> "EncodingScores":
        """Read a table written by :meth:`save_csv`."""
        path = Path(path)
        try:
            frame = read_table(path, dtype={"run": str, "target": str})
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
            raise ValueError(f"{path}: cannot read a score table ({error})") from None
        try:
            return cls.from_frame(frame, model)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def score_runs(truth: Mapping[str, np.ndarray], predictions: Mapping[str, np.ndarray],
               targets: Sequence[str], model: str = "model") -> EncodingScores:
    """Score every held-out run: Pearson r and r2 per target, runs in ``truth``'s order.

    ``truth`` and ``predictions`` map a run id (e.g. ``s04e01a``) to ``(n_TR, n_targets)``
    arrays; both must hold the same runs.
    """
    if not truth:
        raise ValueError(f"{model}: no held-out runs to score")
    if set(truth) != set(predictions):
        raise ValueError(f"{model}: runs without predictions {sorted(set(truth) - set(predictions))}, "
                         f"predictions without runs {sorted(set(predictions) - set(truth))}")
    runs = list(truth)
    targets = list(targets)
    for run in runs:
        if np.shape(truth[run])[1:] != (len(targets),):
            raise ValueError(f"{model}, run {run}: {np.shape(truth[run])} does not have "
                             f"{len(targets)} target columns")
    r_rows = [pearson_r(truth[run], predictions[run], what=f"{model}, run {run}") for run in runs]
    r2_rows = [r2(truth[run], predictions[run], what=f"{model}, run {run}") for run in runs]
    return EncodingScores(model=model, runs=runs, targets=targets,
                          r=np.stack(r_rows), r2=np.stack(r2_rows))


# ----------------------------------------------------------------------------------------------
# Predicting held-out runs with a trained encoding model
# ----------------------------------------------------------------------------------------------

def predict_runs(model, episodes: Sequence, subject: str, tr: float) -> dict[str, np.ndarray]:
    """Predictions ``{episode: (n_TR, n_targets)}`` of ``subject``'s runs among ``episodes``.

    ``model`` is a trained :class:`training.model.EncodingModel` with a head for ``subject``;
    ``episodes`` are :class:`training.data.episodes.Episode` objects (e.g. ``DataSplits.test``). Each
    run is predicted whole from its episode's audio, so every TR sees the real preceding audio
    (only TRs before the run's first volume enter the head as zeros).
    """
    if subject not in model.subjects:
        raise ValueError(f"the model has heads for {model.subjects}, not for {subject!r}")
    predictions = {}
    for episode in episodes:
        run = episode.targets.get(subject)
        if run is not None:
            predictions[episode.name] = model.predict_run(episode.waveform, run.shape[0], subject, tr=tr)
    return predictions


def score_model(model, episodes: Sequence, subject: str, tr: float, target_names: Sequence[str],
                label: str) -> EncodingScores:
    """Predict and score ``subject``'s held-out runs among ``episodes`` (see :func:`predict_runs`)."""
    truth = {e.name: e.targets[subject] for e in episodes if subject in e.targets}
    if not truth:
        raise ValueError(f"{label}: {subject} has no held-out runs among "
                         f"{[e.name for e in episodes][:6]}")
    return score_runs(truth, predict_runs(model, episodes, subject, tr), target_names, model=label)


def score_checkpoint(path: str | os.PathLike, episodes: Sequence, tr: float,
                     subjects: Sequence[str] | None = None, label: str | None = None,
                     device: str = "cpu") -> dict[str, EncodingScores]:
    """Scores of an encoding-model file (``best.safetensors`` of a run, or its export) per
    subject it has a head for.

    ``subjects`` restricts the subjects (default: all of the model's); target names come from
    the file.
    """
    import torch

    from .model import EncodingModel

    path = Path(path)
    model = EncodingModel.from_pretrained(path, device=device)
    names = model.target_names
    label = label or path.parent.name
    chosen = list(subjects) if subjects is not None else model.subjects
    scores = {}
    with torch.inference_mode():
        for subject in chosen:
            if subject not in names:
                raise ValueError(f"{path}: no target names stored for {subject!r}")
            scores[subject] = score_model(model, episodes, subject, tr, names[subject], label)
    return scores


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------

def smallest_wilcoxon_p(n_runs: int, alternative: str = "two-sided") -> float:
    """The smallest p-value an exact Wilcoxon signed-rank test can give with ``n_runs`` pairs.

    It bounds what FDR can declare significant: with few runs nothing survives correction.
    """
    p = 0.5 ** n_runs
    return 2 * p if alternative == "two-sided" else p


def compare(baseline: EncodingScores, candidate: EncodingScores, *, metric: str = "r2",
            alpha: float = 0.05, alternative: str = "two-sided") -> pd.DataFrame:
    """Per-target comparison of ``candidate`` with ``baseline`` across held-out runs.

    For each target: Wilcoxon signed-rank test on the paired per-run scores (candidate minus
    baseline), then Benjamini-Yekutieli FDR over all targets (valid under any dependence between
    targets, as in the study). Targets whose differences are all zero get p = 1.

    Returns one row per target: ``target``, ``mean_baseline``, ``mean_candidate``, ``mean_diff``,
    ``median_diff``, ``statistic``, ``p``, ``q`` and ``significant`` (q < alpha) and ``gain``
    (significant with a positive median difference).
    """
    if baseline.runs != candidate.runs:
        raise ValueError(f"{baseline.model!r} and {candidate.model!r} were scored on different "
                         f"runs: {baseline.runs} vs {candidate.runs}")
    if baseline.targets != candidate.targets:
        raise ValueError(f"{baseline.model!r} and {candidate.model!r} have different targets")
    if len(baseline.runs) < 2:
        raise ValueError(f"a Wilcoxon test across runs needs at least 2 runs, got {len(baseline.runs)}")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    a, b = baseline.metric(metric), candidate.metric(metric)
    diff = b - a
    with warnings.catch_warnings():
        # All-zero differences make scipy divide 0 by 0 on the way to p = 1; that p is right.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        test = stats.wilcoxon(b, a, axis=0, alternative=alternative)
    p = np.where(np.isfinite(test.pvalue), test.pvalue, 1.0)
    q = stats.false_discovery_control(p, method="by")
    median = np.median(diff, axis=0)
    return pd.DataFrame({
        "target": baseline.targets,
        "mean_baseline": a.mean(axis=0),
        "mean_candidate": b.mean(axis=0),
        "mean_diff": diff.mean(axis=0),
        "median_diff": median,
        "statistic": np.asarray(test.statistic, dtype=np.float64),
        "p": p,
        "q": q,
        "significant": q < alpha,
        "gain": (q < alpha) & (median > 0),
    })


def pooled_compare(baseline: EncodingScores, candidate: EncodingScores, *, metric: str = "r",
                   targets: Sequence[bool] | np.ndarray | None = None,
                   alternative: str = "two-sided") -> dict[str, float]:
    """One test across a set of targets: the per-run difference of ``metric`` averaged over
    ``targets`` (a boolean mask; default all), then a Wilcoxon signed-rank test across runs.

    Runs are the independent units (targets of one run share its noise and stimulus), so the
    pooled test has as many pairs as held-out runs. Returns ``n_runs``, ``n_targets``,
    ``mean_diff``, ``median_diff``, ``statistic`` and ``p``.
    """
    if baseline.runs != candidate.runs or baseline.targets != candidate.targets:
        raise ValueError(f"{baseline.model!r} and {candidate.model!r} were scored on different runs "
                         "or targets")
    mask = np.ones(len(baseline.targets), dtype=bool) if targets is None else np.asarray(targets, dtype=bool)
    if mask.shape != (len(baseline.targets),) or not mask.any():
        raise ValueError(f"targets mask of shape {mask.shape} selects no target of {len(baseline.targets)}")
    diff = (candidate.metric(metric)[:, mask] - baseline.metric(metric)[:, mask]).mean(axis=1)
    if len(diff) < 2:
        raise ValueError(f"a Wilcoxon test across runs needs at least 2 runs, got {len(diff)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        test = stats.wilcoxon(diff, alternative=alternative)
    p = float(test.pvalue) if np.isfinite(test.pvalue) else 1.0
    return {"n_runs": int(len(diff)), "n_targets": int(mask.sum()), "mean_diff": float(diff.mean()),
            "median_diff": float(np.median(diff)), "statistic": float(test.statistic), "p": p}


def chance_r_sd(truth: Mapping[str, np.ndarray], predictions: Mapping[str, np.ndarray],
                max_lag: int = 10) -> np.ndarray:
    """Per target, the standard deviation the run-mean Pearson r would have if predictions were
    independent of the targets: Bartlett's large-sample variance of a cross-correlation,
    ``(1 + 2 * sum_k rho_y(k) rho_p(k)) / n_TR`` per run (``rho`` autocorrelations up to
    ``max_lag``), averaged over runs as the scores are. No permutations: autocorrelated BOLD
    and smooth predictions widen it beyond the ``1 / n_TR`` of white noise.
    """
    variances = []
    for run, y in truth.items():
        y, p = _check_pair(y, predictions[run], f"run {run}")
        n = y.shape[0]
        total = np.ones(y.shape[1])
        for k in range(1, min(max_lag, n - 2) + 1):
            total += 2 * _autocorrelation(y, k) * _autocorrelation(p, k)
        variances.append(np.maximum(total, 0.0) / n)
    return np.sqrt(np.sum(variances, axis=0)) / len(variances)


def _autocorrelation(x: np.ndarray, lag: int) -> np.ndarray:
    centred = x - x.mean(axis=0)
    denominator = (centred ** 2).sum(axis=0)
    numerator = (centred[lag:] * centred[:-lag]).sum(axis=0)
    return np.divide(numerator, denominator, out=np.zeros(x.shape[1]), where=denominator > 0)


def held_out_noise_ceiling(root: str | os.PathLike, subject: str, runs: Sequence[str]) -> dict[str, np.ndarray]:
    """The synthetic dataset's noise ceiling of ``subject`` on the held-out ``runs`` only:
    ``{"r": mean over those runs of the oracle's r, "r2": mean of its square}``.

    ``ground_truth.json`` also holds the mean over all runs; a ceiling must be computed on the
    runs whose scores it normalises.
    """
    import json

    path = Path(root) / "ground_truth.json"
    try:
        by_run = json.loads(path.read_text())["subjects"][subject]["noise_ceiling_r_by_run"]
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the ground truth ({error})") from None
    except KeyError:
        raise ValueError(f"{path}: no per-run noise ceiling of {subject!r}") from None
    missing = [run for run in runs if run not in by_run]
    if missing or not runs:
        raise ValueError(f"{path}: no noise ceiling of {subject} for runs {missing or list(runs)}")
    values = np.asarray([by_run[run] for run in runs], dtype=np.float64)
    return {"r": values.mean(axis=0), "r2": (values ** 2).mean(axis=0)}


def ceiling_fraction(scores: np.ndarray, ceiling: np.ndarray) -> np.ndarray:
    """``scores / ceiling`` per target; NaN where the ceiling is not positive (pure-noise targets).

    ``scores`` and ``ceiling`` must be on the same scale (r with an r ceiling, r2 with an r2
    ceiling) and the same length.
    """
    scores = np.asarray(scores, dtype=np.float64)
    ceiling = np.asarray(ceiling, dtype=np.float64)
    if scores.shape != ceiling.shape:
        raise ValueError(f"scores {scores.shape} and noise ceiling {ceiling.shape} differ in shape")
    positive = np.isfinite(ceiling) & (ceiling > 0)
    out = np.full(scores.shape, np.nan)
    np.divide(scores, ceiling, out=out, where=positive)
    return out


# ----------------------------------------------------------------------------------------------
# Brain maps
# ----------------------------------------------------------------------------------------------

def parcel_values_to_img(values: np.ndarray, labels_img):
    """A 3-D image with each parcel of ``labels_img`` filled with its value (background 0).

    ``values`` follow the order of the atlas's non-background labels, sorted, which is the
    column order of ``NiftiLabelsMasker`` and so of the parcel targets.
    """
    from nilearn.maskers import NiftiLabelsMasker

    masker = NiftiLabelsMasker(labels_img).fit()
    values = np.asarray(values, dtype=np.float64)
    n_regions = masker.n_elements_
    if values.shape != (n_regions,):
        raise ValueError(f"{n_regions} parcels in the atlas {_describe(labels_img)}, "
                         f"but {values.shape} values")
    return masker.inverse_transform(values)


def voxel_values_to_img(values: np.ndarray, mask_img):
    """A 3-D image with the in-mask voxels of ``mask_img`` set to ``values`` (outside 0)."""
    from nilearn.maskers import NiftiMasker

    masker = NiftiMasker(mask_img).fit()
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (masker.n_elements_,):
        raise ValueError(f"{masker.n_elements_} voxels in the mask {_describe(mask_img)}, "
                         f"but {values.shape} values")
    return masker.inverse_transform(values)


def _describe(img) -> str:
    return str(img) if isinstance(img, (str, os.PathLike)) else "image"


def render_brain_map(img, png_path: str | os.PathLike, *, html_path: str | os.PathLike | None = None,
                     title: str = "", bg_img=None, threshold: float | None = None,
                     vmax: float | None = None, cut_coords=None) -> list[Path]:
    """Draw ``img`` as a static PNG (orthogonal slices) and optionally an interactive HTML view.

    ``bg_img`` is the anatomy behind the map (None: no background, which suits images that are
    not in MNI space, such as the synthetic atlas); ``threshold`` hides small values; the colour
    scale is symmetric up to ``vmax`` (default: the largest absolute value); the slices cut
    through ``cut_coords`` (default: the strongest value). nilearn saves the HTML view as a
    self-contained iframe (``srcdoc``) that opens offline in a browser.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import image, plotting

    data = np.asarray(img.get_fdata())
    if vmax is None:
        vmax = float(np.max(np.abs(data))) or 1.0
    if cut_coords is None:
        # Cut through the strongest value: nilearn's default looks for a cluster above a
        # threshold and falls back, with a warning, on maps of a few uniform parcels.
        peak = np.unravel_index(np.argmax(np.abs(data)), data.shape)
        cut_coords = tuple(float(c) for c in image.coord_transform(*peak, img.affine))
    written = []
    figure = plt.figure(figsize=(9, 3.2))
    try:
        plotting.plot_stat_map(img, bg_img=bg_img, title=title or None, threshold=threshold,
                               vmax=vmax, cut_coords=cut_coords, figure=figure,
                               draw_cross=False, black_bg=False, annotate=False)
        written.append(atomic_write(png_path, lambda tmp: figure.savefig(tmp, format="png", dpi=110)))
    finally:
        plt.close(figure)
    if html_path is not None:
        view = plotting.view_img(img, bg_img=bg_img if bg_img is not None else False,
                                 threshold=threshold, vmax=vmax, title=title or None,
                                 cut_coords=cut_coords, black_bg=False)
        written.append(atomic_write(html_path, view.save_as_html))
    return written


# ----------------------------------------------------------------------------------------------
# Several models on the held-out runs: tables
# ----------------------------------------------------------------------------------------------

@dataclass
class HeldOutResults:
    """Scores of several models on the held-out runs, their comparisons and a summary.

    ``scores[(model, subject)]`` are per-run scores; ``comparisons`` has one row per
    (subject, baseline, candidate, metric, target) with the Wilcoxon/BY statistics (see
    :func:`compare`), the target's ``kind`` and noise ceilings ``ceiling_r`` / ``ceiling_r2``
    when known; ``summary`` has
    one row per (subject, model).
    """

    scores: dict[tuple[str, str], EncodingScores]
    comparisons: pd.DataFrame
    summary: pd.DataFrame

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``scores.csv``, ``comparisons.csv`` and ``summary.csv`` into ``out_dir``."""
        out_dir = Path(out_dir)
        frames = [s.to_frame().assign(subject=subject) for (_, subject), s in self.scores.items()]
        scores = pd.concat(frames, ignore_index=True)[["subject", "model", "run", "target", "r", "r2"]]
        return {name: atomic_write(out_dir / f"{name}.csv", lambda tmp, f=frame: f.to_csv(tmp, index=False))
                for name, frame in (("scores", scores), ("comparisons", self.comparisons),
                                    ("summary", self.summary))}

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "HeldOutResults":
        """Read what :meth:`save` wrote."""
        out_dir = Path(out_dir)
        try:
            frame = read_table(out_dir / "scores.csv", dtype={"run": str, "target": str})
            try:
                comparisons = read_table(out_dir / "comparisons.csv", dtype={"target": str})
            except pd.errors.EmptyDataError:  # saved without comparisons (e.g. one model)
                comparisons = pd.DataFrame()
            summary = read_table(out_dir / "summary.csv")
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
            raise ValueError(f"{out_dir}: cannot read held-out results ({error})") from None
        scores = {}
        for (model, subject), rows in frame.groupby(["model", "subject"], sort=False):
            scores[(model, subject)] = EncodingScores.from_frame(rows.drop(columns="subject"), model)
        return cls(scores, comparisons, summary)


def evaluate_models(models: Mapping[str, Mapping[str, str | os.PathLike]], episodes: Sequence,
                    tr: float, *, comparisons: Sequence[tuple[str, str]] = (),
                    ceilings: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                    kinds: Sequence[str] | None = None, alpha: float = 0.05,
                    log: Callable[[str], None] | None = None) -> HeldOutResults:
    """Score every model on the held-out ``episodes`` and compare the pairs in ``comparisons``.

    ``models`` maps a model label to ``{subject: encoding-model file}`` (a group model's file
    appears under each of its subjects). ``comparisons`` lists ``(baseline, candidate)``
    labels, compared per subject on r and r2. ``ceilings`` gives each subject's noise ceilings
    as ``{"r": ..., "r2": ...}`` (one value per target; either may be absent) and ``kinds`` a
    kind per target (e.g. auditory / weak / noise in the synthetic data); both are optional and
    only add columns.
    """
    scores: dict[tuple[str, str], EncodingScores] = {}
    for label, files in models.items():
        by_file: dict[Path, list[str]] = {}
        for subject, path in files.items():
            by_file.setdefault(Path(path), []).append(subject)
        for path, subjects in by_file.items():  # a group model's file is loaded once
            if log:
                log(f"scoring {label} on the held-out runs of {', '.join(subjects)}")
            for subject, result in score_checkpoint(path, episodes, tr, subjects, label).items():
                scores[(label, subject)] = result
    return results_from_scores(scores, comparisons=comparisons, ceilings=ceilings, kinds=kinds, alpha=alpha)


def results_from_scores(scores: Mapping[tuple[str, str], EncodingScores], *,
                        comparisons: Sequence[tuple[str, str]] = (),
                        ceilings: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                        kinds: Sequence[str] | None = None, alpha: float = 0.05) -> HeldOutResults:
    """:class:`HeldOutResults` of already computed scores ``{(model, subject): EncodingScores}``
    (fine-tuned models, ridge encoding models, any mix): the pairs in ``comparisons`` are
    compared per subject on r and r2 (see :func:`evaluate_models`)."""
    scores = dict(scores)
    rows = []
    for baseline, candidate in comparisons:
        for subject in sorted({s for (m, s) in scores if m == baseline} & {s for (m, s) in scores if m == candidate}):
            for metric in METRICS:
                table = compare(scores[(baseline, subject)], scores[(candidate, subject)],
                                metric=metric, alpha=alpha)
                table.insert(0, "metric", metric)
                table.insert(0, "candidate", candidate)
                table.insert(0, "baseline", baseline)
                table.insert(0, "subject", subject)
                rows.append(_annotate(table, subject, ceilings, kinds))
    comparison_frame = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    return HeldOutResults(scores, comparison_frame, summarise(scores, ceilings, kinds))


def _annotate(table: pd.DataFrame, subject: str, ceilings, kinds) -> pd.DataFrame:
    if kinds is not None:
        table["kind"] = list(kinds)
    if ceilings is not None and subject in ceilings:
        for metric, values in ceilings[subject].items():
            table[f"ceiling_{metric}"] = np.asarray(values, dtype=np.float64)
    return table


def summarise(scores: Mapping[tuple[str, str], EncodingScores],
              ceilings: Mapping[str, Mapping[str, np.ndarray]] | None = None,
              kinds: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (subject, model): run count, mean r and r2 over targets (and per kind), the
    best target's r2, and per ceiling metric the median fraction of the noise ceiling
    (``ceiling_fraction_r``: held-out r / ceiling r; ``ceiling_fraction_r2``: held-out r2 /
    ceiling r2; medians over targets with a positive ceiling)."""
    rows = []
    for (model, subject), s in scores.items():
        r, r2_ = s.mean("r"), s.mean("r2")
        row: dict[str, object] = {"subject": subject, "model": model, "n_runs": len(s.runs),
                                  "n_targets": len(s.targets), "mean_r": r.mean(), "mean_r2": r2_.mean(),
                                  "best_r2": r2_.max(), "best_target": s.targets[int(np.argmax(r2_))]}
        if kinds is not None:
            kind_array = np.asarray(kinds)
            for kind in dict.fromkeys(kinds):
                row[f"mean_r_{kind}"] = r[kind_array == kind].mean()
                row[f"mean_r2_{kind}"] = r2_[kind_array == kind].mean()
        for metric, ceiling in (ceilings or {}).get(subject, {}).items():
            fraction = ceiling_fraction(s.mean(metric), ceiling)
            row[f"ceiling_fraction_{metric}"] = (float(np.nanmedian(fraction)) if np.isfinite(fraction).any()
                                                 else np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_table(results: HeldOutResults, pairs: Sequence[tuple[str, str]], *, kind: str = "auditory",
                     kinds: Sequence[str] | None = None, metrics: Sequence[str] = ("r", "r2")) -> pd.DataFrame:
    """Per subject, pair ``(baseline, candidate)`` and metric, over the targets of ``kind``: the
    mean scores, "k of N" targets with a significant gain (and loss) after BY FDR (from
    ``results.comparisons``, which must hold the pair), and the pooled test across those
    targets (:func:`pooled_compare`, runs as units). ``kinds`` gives each target's kind (default:
    the ``kind`` column of the comparisons; without kinds, every target counts).
    """
    rows = []
    table = results.comparisons
    for baseline, candidate in pairs:
        for metric in metrics:
            part = (table[(table["baseline"] == baseline) & (table["candidate"] == candidate)
                          & (table["metric"] == metric)] if not table.empty else table)
            for subject in sorted({s for (m, s) in results.scores if m == baseline}
                                  & {s for (m, s) in results.scores if m == candidate}):
                a, b = results.scores[(baseline, subject)], results.scores[(candidate, subject)]
                if kinds is not None:
                    mask = np.asarray(kinds) == kind
                elif "kind" in part and len(part):
                    mask = (part[part["subject"] == subject]["kind"] == kind).to_numpy()
                else:
                    mask = np.ones(len(a.targets), dtype=bool)
                rows_subject = part[part["subject"] == subject] if len(part) else part
                selected = rows_subject[mask] if len(rows_subject) == len(mask) else rows_subject.iloc[0:0]
                pooled = pooled_compare(a, b, metric=metric, targets=mask)
                rows.append({"subject": subject, "baseline": baseline, "candidate": candidate, "metric": metric,
                             "targets": f"{kind}" if mask.sum() < len(mask) else "all",
                             "n": int(mask.sum()),
                             "mean_baseline": float(a.mean(metric)[mask].mean()),
                             "mean_candidate": float(b.mean(metric)[mask].mean()),
                             "mean_diff": pooled["mean_diff"],
                             "k_gain": int(selected["gain"].sum()) if len(selected) else np.nan,
                             "k_loss": (int((selected["significant"] & (selected["median_diff"] < 0)).sum())
                                        if len(selected) else np.nan),
                             "pooled_p": pooled["p"], "n_runs": pooled["n_runs"]})
    return pd.DataFrame(rows)
