"""Lagged ridge encoding models (the field's standard baseline), fitted with himalaya.

Protocol (see ``/work/shared/reference/encoding.md``):

1. Features per TR (any :class:`training.features.FeatureSource`) are standardised with the
   mean and standard deviation of the training TRs (each scale at least 10 % of the mean
   column's, as the fine-tuned head's input standardisation).
2. Each run's features are stacked with ``lags`` causal delays (TR ``t`` sees the features of
   TRs ``t, t - 1, ..., t - lags + 1``), zeros before the run starts, never crossing runs: the
   design of the fine-tuned models' causal head (kernel ``k`` TRs), with a ridge readout.
3. :class:`himalaya.ridge.RidgeCV` (or :class:`himalaya.kernel_ridge.KernelRidgeCV` with a
   linear kernel when there are more features than training TRs: the same model, solved in
   the dual) chooses one penalty **per target** by grouped cross-validation over the training
   runs: folds of whole groups (by default the episode, so the two halves of an episode are
   never split across a fold), never single TRs, whose autocorrelated BOLD would leak across
   neighbouring samples. The held-out runs are not seen.
4. The model is refitted on all training runs with each target's penalty and predicts
   held-out runs whole.

Targets are centred with their training means (kept as the intercept) and the solver fits no
intercept of its own: the design is standardised, the intercept is exactly the target mean.

A fitted :class:`RidgeEncodingModel` saves as ``model.safetensors`` (tensors) + ``config.json``
(everything else), like huggingface_hub's ``ModelHubMixin`` folders; no pickles.
"""
from __future__ import annotations

import json
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, get_args

import numpy as np
import scipy.linalg

from hear_brainsoundnet.files import atomic_write

MODEL_FILENAME = "model.safetensors"
CONFIG_FILENAME = "config.json"
FORMAT = "hear-brainsoundnet-ridge-encoding-model"
#: Penalties searched by default: 10^-2 .. 10^8, 21 values. Standardised lagged features make
#: the useful range depend on the number of features and TRs; the wide grid covers conv7's
#: 1024 x 6 columns on ~2,000 TRs as well as the oracle's 10 x 6.
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 8, 21))
MIN_SCALE_FRACTION = 0.1  # feature scales are at least this fraction of the mean column's


def lag_features(features: np.ndarray, lags: int) -> np.ndarray:
    """``(n_TR, n_features * lags)``: column block ``j`` is the features ``j`` TRs earlier.

    Causal and within one run: rows before the run's start are zeros.
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be (n_TR, n_features), got shape {features.shape}")
    if lags < 1:
        raise ValueError(f"lags must be >= 1, got {lags}")
    n, d = features.shape
    out = np.zeros((n, d * lags), dtype=features.dtype)
    for j in range(lags):
        out[j:, j * d:(j + 1) * d] = features[:n - j] if j < n else features[:0]
    return out


def episode_group(run: str) -> str:
    """The whole episode of a half-episode run id (``s01e02a`` -> ``s01e02``)."""
    return run[:-1] if run[-1:] in ("a", "b") and len(run) > 1 else run


def _limits(threads: int | None):
    """numpy's BLAS thread limit for the fit (None: leave the library's default)."""
    if not threads:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=int(threads))


@dataclass
class RidgeEncodingModel:
    """A fitted lagged ridge encoding model for one subject (see the module docstring).

    ``coef`` is ``(n_features * lags, n_targets)`` on standardised lagged features,
    ``intercept`` the training mean of each target, ``feature_mean`` / ``feature_scale`` the
    standardisation, ``best_alphas`` / ``cv_scores`` the penalty chosen per target and its
    cross-validated score (negative squared error, himalaya's default), ``config`` the
    provenance (feature source, subject, target names, training runs, folds).
    """

    coef: np.ndarray
    intercept: np.ndarray
    feature_mean: np.ndarray
    feature_scale: np.ndarray
    best_alphas: np.ndarray
    cv_scores: np.ndarray
    lags: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.feature_mean.shape[0])

    @property
    def target_names(self) -> list[str]:
        return list(self.config.get("target_names", []))

    def design(self, features: np.ndarray) -> np.ndarray:
        """Standardised, lagged design of one run's ``(n_TR, n_features)`` features."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"features of shape {features.shape}; this model was fitted on "
                             f"{self.n_features} features per TR ({self.config.get('source', {})})")
        return lag_features((features - self.feature_mean) / self.feature_scale, self.lags)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted targets ``(n_TR, n_targets)`` of one whole run."""
        return self.design(features) @ self.coef + self.intercept

    def predict_runs(self, features: Mapping[str, np.ndarray], lengths: Mapping[str, int]) -> dict[str, np.ndarray]:
        """``{run: prediction}`` for each run of ``lengths`` (its TR count) from its features."""
        return {run: self.predict(features[run][:n]) for run, n in lengths.items()}

    # -- files -----------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``folder`` (atomically each)."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: np.ascontiguousarray(getattr(self, name), dtype=np.float64)
                   for name in ("coef", "intercept", "feature_mean", "feature_scale", "best_alphas", "cv_scores")}
        atomic_write(folder / MODEL_FILENAME,
                     lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
        config = {"format": FORMAT, "lags": self.lags, **self.config}
        text = json.dumps(config, indent=1, sort_keys=True, default=_jsonable)
        atomic_write(folder / CONFIG_FILENAME, lambda tmp: Path(tmp).write_text(text + "\n"))
        return folder

    save = save_pretrained

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "RidgeEncodingModel":
        """Read a folder written by :meth:`save_pretrained`; errors name the file at fault."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        folder = Path(folder)
        config_path, model_path = folder / CONFIG_FILENAME, folder / MODEL_FILENAME
        for path in (config_path, model_path):
            if not path.is_file():
                raise ValueError(f"{path}: missing; {folder} is not a saved ridge encoding model")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path}: not valid JSON ({error})") from None
        if config.get("format") != FORMAT:
            raise ValueError(f"{config_path}: format {config.get('format')!r}, expected {FORMAT!r}")
        try:
            tensors = load_file(str(model_path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{model_path}: cannot read ({error})") from None
        names = ("coef", "intercept", "feature_mean", "feature_scale", "best_alphas", "cv_scores")
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{model_path}: tensors {missing} missing")
        lags = int(config.pop("lags"))
        config.pop("format")
        model = cls(**{n: tensors[n] for n in names}, lags=lags, config=config)
        expected = (model.n_features * lags, model.intercept.shape[0])
        if model.coef.shape != expected:
            raise ValueError(f"{model_path}: coef is {model.coef.shape}, expected {expected}")
        return model

    load = from_pretrained


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def grouped_splits(lengths: Sequence[int], groups: Sequence[str], n_splits: int | None = None
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Folds over the concatenated TRs of runs with ``lengths`` and ``groups``: one fold per group
    (leave-one-group-out) when ``n_splits`` is None, else GroupKFold with ``min(n_splits,
    n groups)`` folds. Needs at least two distinct groups."""
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

    distinct = sorted(set(groups))
    if len(distinct) < 2:
        raise ValueError(f"cross-validation over runs needs at least 2 groups of training runs, got "
                         f"{distinct}: add training runs")
    labels = np.repeat(np.arange(len(groups)), lengths)
    group_of_row = np.asarray([distinct.index(groups[i]) for i in labels])
    folds = LeaveOneGroupOut() if n_splits is None else GroupKFold(n_splits=min(n_splits, len(distinct)))
    return list(folds.split(np.zeros((len(labels), 1)), groups=group_of_row))


@dataclass
class _Design:
    """Standardised lagged design of a set of training runs, and its decomposition
    ``X = U diag(sqrt(s2)) V^T`` (thin, zero singular values dropped)."""

    runs: list[str]
    lengths: list[int]
    mean: np.ndarray
    scale: np.ndarray
    x: np.ndarray
    u: np.ndarray | None = None
    s2: np.ndarray | None = None

    def decompose(self) -> None:
        # One symmetric eigendecomposition of the smaller Gram matrix: X^T X (features) when
        # there are fewer features than TRs, else X X^T (TRs; the kernel-ridge dual).
        x = self.x
        gram = x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T
        s2, vectors = scipy.linalg.eigh(gram, driver="evr", overwrite_a=True)  # MRRR: the fastest driver here
        keep = s2 > 1e-10 * max(float(s2.max()), 1e-300)
        s2, vectors = s2[keep], vectors[:, keep]
        self.u = x @ (vectors / np.sqrt(s2)) if x.shape[1] <= x.shape[0] else vectors
        self.s2 = s2


def _build_design(features: Mapping[str, np.ndarray], runs: Sequence[str], lengths: Sequence[int],
                  lags: int) -> _Design:
    short = [run for run, n in zip(runs, lengths) if features[run].shape[0] < n]
    if short:
        raise ValueError(f"features shorter than the targets for runs {short}")
    raw = [np.asarray(features[run][:n], dtype=np.float64) for run, n in zip(runs, lengths)]
    stacked = np.concatenate(raw)
    mean, scale = stacked.mean(axis=0), stacked.std(axis=0)
    # As the fine-tuned head does (training.model.CausalHead): a scale under 10 % of the mean
    # column's is raised to it, so near-silent columns (a third of pretrained conv7's channels
    # barely fire) are not amplified to unit variance and given the same prior weight.
    floor = MIN_SCALE_FRACTION * float(scale.mean())
    scale = np.maximum(scale, floor) if floor > 0 else np.ones_like(scale)
    x = np.concatenate([lag_features((r - mean) / scale, lags) for r in raw])
    return _Design(list(runs), list(lengths), mean, scale, x)


def leave_group_out_scores(design: _Design, y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                           alphas: np.ndarray) -> np.ndarray:
    """``(n_alphas, n_targets)``: mean over folds of the negative mean squared error of each
    fold's held-out TRs predicted by ridge refitted without them (himalaya's ``l2_neg_loss``).

    Exact, without refitting: for a linear smoother ``H = X (X^T X + a I)^-1 X^T`` the residuals
    of the fold ``g`` left out are ``(I - H_gg)^-1 (y_g - (H y)_g)`` (block deletion identity);
    ``H = U diag(s2 / (s2 + a)) U^T`` comes from the one decomposition.
    """
    with _limits(1):  # hundreds of small solves: BLAS threads only add synchronisation
        return _leave_group_out(design.u, design.s2, y, folds, alphas)


def _leave_group_out(u: np.ndarray, s2: np.ndarray, y: np.ndarray, folds, alphas: np.ndarray) -> np.ndarray:
    uty = u.T @ y
    scores = np.zeros((len(folds), len(alphas), y.shape[1]))
    for a, alpha in enumerate(alphas):
        shrink = s2 / (s2 + alpha)
        residual = y - u @ (shrink[:, None] * uty)
        for f, (_, rows) in enumerate(folds):
            ug = u[rows]
            block = np.eye(len(rows)) - (ug * shrink) @ ug.T
            try:
                errors = np.linalg.solve(block, residual[rows])
            except np.linalg.LinAlgError:  # a penalty so small the fold is interpolated
                scores[f, a] = -np.inf
                continue
            scores[f, a] = -(errors ** 2).mean(axis=0)
    return scores.mean(axis=0)


def _refit(design: _Design, y: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Primal ridge coefficients ``(n_columns, n_targets)`` with one penalty per target."""
    u, s2 = design.u, design.s2
    weights = (u.T @ y) / (s2[:, None] + alphas[None, :])  # (k, T)
    return design.x.T @ (u @ weights)


def _fit_himalaya(design: _Design, y: np.ndarray, folds, alphas: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same fit through :class:`himalaya.ridge.RidgeCV` (or ``KernelRidgeCV``, linear kernel,
    when there are more columns than TRs): it refits every fold, at a cost that grows with
    ``n_alphas * n_columns^2 * n_TR``; numerically the same model."""
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV

    set_backend("numpy", on_error="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "n_samples < n_features": we chose the solver
        if design.x.shape[0] < design.x.shape[1]:
            solver = KernelRidgeCV(kernel="linear", alphas=alphas, cv=list(folds), fit_intercept=False)
            solver.fit(design.x, y)
            coef = np.asarray(solver.get_primal_coef(), dtype=np.float64)
        else:
            solver = RidgeCV(alphas=alphas, cv=list(folds), fit_intercept=False)
            solver.fit(design.x, y)
            coef = np.asarray(solver.coef_, dtype=np.float64)
    best = np.asarray(solver.best_alphas_, dtype=np.float64)
    return coef, best, np.asarray(solver.cv_scores_, dtype=np.float64).ravel()


# How the penalties are searched (the same model either way; see fit_ridge_models).
Solver = Literal["eigen", "himalaya"]
SOLVERS: tuple[str, ...] = get_args(Solver)


def fit_ridge_models(features: Mapping[str, np.ndarray], targets: Mapping[str, Mapping[str, np.ndarray]], *,
                     lags: int, alphas: Sequence[float] = DEFAULT_ALPHAS, n_splits: int | None = None,
                     groups: Mapping[str, str] | None = None, solver: Solver = "eigen",
                     threads: int | None = None, configs: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> dict[str, RidgeEncodingModel]:
    """Fit one lagged ridge model per subject: ``targets[subject] = {run: (n_TR, n_targets)}``.

    ``features`` maps each run to at least as many TRs of features (extra rows are ignored).
    Cross-validation groups: ``groups[run]``, default the whole episode (:func:`episode_group`);
    folds: leave-one-group-out (``n_splits`` None) or GroupKFold(``n_splits``). ``solver``:
    ``"eigen"`` (default) scores every penalty from one eigendecomposition of the design per set
    of training runs, shared by the subjects that have the same runs; ``"himalaya"`` runs
    himalaya's RidgeCV with the same folds and penalties (the same model; see
    :func:`_fit_himalaya`). ``threads`` limits numpy's BLAS threads during the fit.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown ridge solver {solver!r}; choose one of {SOLVERS}")
    if lags < 1:
        raise ValueError(f"lags must be >= 1, got {lags}")
    alphas = np.asarray(alphas, dtype=np.float64)
    if alphas.ndim != 1 or not len(alphas) or not (alphas > 0).all():
        raise ValueError(f"alphas must be a non-empty list of positive penalties, got {alphas.tolist()}")
    by_runs: dict[tuple, list[str]] = {}
    for subject, runs in targets.items():
        if not runs:
            raise ValueError(f"{subject}: no training runs to fit the ridge model on")
        missing = [run for run in runs if run not in features]
        if missing:
            raise ValueError(f"{subject}: no features for training runs {missing}")
        key = tuple((run, int(array.shape[0])) for run, array in runs.items())
        by_runs.setdefault(key, []).append(subject)
    models = {}
    with _limits(threads):
        for key, subjects in by_runs.items():
            runs, lengths = [r for r, _ in key], [n for _, n in key]
            design = _build_design(features, runs, lengths, lags)
            labels = [(groups or {}).get(run, episode_group(run)) for run in runs]
            folds = grouped_splits(lengths, labels, n_splits)
            if solver == "eigen":
                design.decompose()
            for subject in subjects:
                y = np.concatenate([np.asarray(targets[subject][run], dtype=np.float64) for run in runs])
                y_mean = y.mean(axis=0)
                if solver == "eigen":
                    cv = leave_group_out_scores(design, y - y_mean, folds, alphas)
                    chosen = np.argmax(cv, axis=0)  # the first (smallest) penalty among ties
                    best, cv_scores = alphas[chosen], cv[chosen, np.arange(y.shape[1])]
                    coef = _refit(design, y - y_mean, best)
                else:
                    coef, best, cv_scores = _fit_himalaya(design, y - y_mean, folds, alphas)
                info = {**dict((configs or {}).get(subject, {})), "subject": subject, "training_runs": runs,
                        "cv_groups": sorted(set(labels)), "n_folds": len(folds),
                        "folds": "leave-one-group-out" if n_splits is None else f"GroupKFold({n_splits})",
                        "alphas": alphas.tolist(), "n_training_trs": int(y.shape[0]), "solver": solver,
                        "alphas_at_grid_edge": int(np.sum((best <= alphas.min()) | (best >= alphas.max())))}
                models[subject] = RidgeEncodingModel(coef=coef, intercept=y_mean, feature_mean=design.mean,
                                                     feature_scale=design.scale, best_alphas=best,
                                                     cv_scores=cv_scores, lags=lags, config=info)
    return models
