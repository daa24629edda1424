"""Lagged ridge encoding models: lags, grouped cross-validation, himalaya equivalence, files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from training.ridge import (RidgeEncodingModel, _build_design, episode_group, fit_ridge_models,
                            grouped_splits, lag_features)


def _runs(rng: np.random.Generator, n_features: int, n_runs: int = 12, n_trs: int = 30) -> dict[str, np.ndarray]:
    # half-episodes s01e01a, s01e01b, s01e02a, ...: two runs per episode
    return {f"s01e{i // 2 + 1:02d}{'ab'[i % 2]}": rng.standard_normal((n_trs, n_features)) for i in range(n_runs)}


def _targets(features: dict[str, np.ndarray], weights: np.ndarray, lags: int, noise: np.ndarray,
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {run: lag_features(x, lags) @ weights + rng.standard_normal((len(x), len(noise))) * noise
            for run, x in features.items()}


def test_lags_are_causal_and_zero_before_the_run_starts():
    x = np.arange(1, 13, dtype=float).reshape(6, 2)
    lagged = lag_features(x, 3)
    assert lagged.shape == (6, 6)
    np.testing.assert_array_equal(lagged[:, :2], x)  # lag 0: the TR itself
    np.testing.assert_array_equal(lagged[1:, 2:4], x[:-1])  # lag 1: the previous TR
    np.testing.assert_array_equal(lagged[2:, 4:6], x[:-2])
    assert not lagged[0, 2:].any() and not lagged[1, 4:].any()  # nothing before the run
    with pytest.raises(ValueError, match="lags must be >= 1"):
        lag_features(x, 0)


def test_lags_never_cross_runs():
    features = {"s01e01a": np.ones((5, 2)), "s01e01b": np.full((5, 2), 2.0)}
    design = _build_design(features, ["s01e01a", "s01e01b"], [5, 5], lags=2)
    # standardised: run a -> -1, run b -> +1; the first row of run b has zeros in the lag block
    np.testing.assert_allclose(design.x[5], [1, 1, 0, 0])
    np.testing.assert_allclose(design.x[6], [1, 1, 1, 1])
    np.testing.assert_allclose(design.x[0], [-1, -1, 0, 0])


def test_folds_keep_whole_episodes_together():
    assert episode_group("s01e02a") == episode_group("s01e02b") == "s01e02"
    runs = ["s01e01a", "s01e01b", "s01e02a", "s01e02b", "s01e03a"]
    folds = grouped_splits([4] * 5, [episode_group(r) for r in runs])
    assert len(folds) == 3  # leave one episode out
    held = [set(test // 4) for _, test in folds]  # run index of each held-out row
    assert sorted(map(sorted, held)) == [[0, 1], [2, 3], [4]]
    for train, test in folds:
        assert not set(train) & set(test)
    assert len(grouped_splits([4] * 5, [episode_group(r) for r in runs], n_splits=2)) == 2
    with pytest.raises(ValueError, match="at least 2 groups"):
        grouped_splits([4, 4], ["s01e01", "s01e01"])


@pytest.mark.parametrize("n_features", [6, 150])  # primal (fewer columns than TRs) and dual
def test_the_eigen_solver_is_himalayas_ridgecv(n_features):
    rng = np.random.default_rng(n_features)
    lags = 3
    features = _runs(rng, n_features)
    weights = rng.standard_normal((n_features * lags, 4)) / np.sqrt(n_features)
    targets = _targets(features, weights, lags, np.array([0.3, 1.0, 3.0, 10.0]), rng)
    fits = {solver: fit_ridge_models(features, {"sub-01": targets}, lags=lags, solver=solver)["sub-01"]
            for solver in ("eigen", "himalaya")}
    assert (fits["eigen"].coef.shape[0] > 360) == (n_features == 150)
    np.testing.assert_allclose(fits["eigen"].best_alphas, fits["himalaya"].best_alphas, rtol=1e-12)
    np.testing.assert_allclose(fits["eigen"].cv_scores, fits["himalaya"].cv_scores, rtol=1e-8)
    scale = np.abs(fits["himalaya"].coef).max()
    np.testing.assert_allclose(fits["eigen"].coef, fits["himalaya"].coef, atol=1e-9 * scale)


def test_penalty_per_target_follows_the_noise_and_held_out_runs_are_predicted():
    rng = np.random.default_rng(1)
    lags, n = 4, 8
    features = _runs(rng, n, n_runs=16, n_trs=60)
    weights = rng.standard_normal((n * lags, 3)) / np.sqrt(n * lags)
    noise = np.array([0.1, 1.0, 5.0])
    model = fit_ridge_models(features, {"s": _targets(features, weights, lags, noise, rng)}, lags=lags)["s"]
    assert model.best_alphas[0] < model.best_alphas[1] < model.best_alphas[2]
    assert model.config["n_folds"] == 8 and model.config["cv_groups"][0] == "s01e01"
    test = rng.standard_normal((200, n))
    truth = lag_features(test, lags) @ weights
    prediction = model.predict(test)
    r = [np.corrcoef(truth[:, t], prediction[:, t])[0, 1] for t in range(3)]
    assert r[0] > 0.99 and r[1] > 0.9 and r[2] > 0.3, r


def test_subjects_with_the_same_runs_share_one_fit_and_others_get_their_own():
    rng = np.random.default_rng(2)
    features = _runs(rng, 5)
    weights = rng.standard_normal((10, 2))
    full = _targets(features, weights, 2, np.array([1.0, 1.0]), rng)
    partial = {run: y for run, y in full.items() if run != "s01e01a"}
    models = fit_ridge_models(features, {"a": full, "b": dict(full), "c": partial}, lags=2)
    np.testing.assert_array_equal(models["a"].coef, models["b"].coef)
    assert models["c"].config["training_runs"] == list(partial)
    assert models["c"].config["n_training_trs"] == 30 * 11


def test_save_and_load_round_trip_without_pickles(tmp_path):
    rng = np.random.default_rng(3)
    features = _runs(rng, 4)
    targets = _targets(features, rng.standard_normal((8, 3)), 2, np.ones(3), rng)
    model = fit_ridge_models(features, {"sub-01": targets}, lags=2,
                             configs={"sub-01": {"target_names": ["a", "b", "c"]}})["sub-01"]
    folder = model.save_pretrained(tmp_path / "ridge")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["lags"] == 2 and config["target_names"] == ["a", "b", "c"] and config["subject"] == "sub-01"
    loaded = RidgeEncodingModel.load(folder)
    x = rng.standard_normal((20, 4))
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    assert loaded.target_names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="fitted on 4 features per TR"):
        loaded.predict(np.zeros((20, 5)))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors: cannot read"):
        RidgeEncodingModel.load(folder)
    with pytest.raises(ValueError, match="config.json: missing"):
        RidgeEncodingModel.load(tmp_path)


def test_bad_fits_are_refused_with_the_reason():
    rng = np.random.default_rng(4)
    features = _runs(rng, 3, n_runs=4)
    targets = {run: rng.standard_normal((30, 2)) for run in features}
    with pytest.raises(ValueError, match="no features for training runs"):
        fit_ridge_models({}, {"s": targets}, lags=2)
    with pytest.raises(ValueError, match="alphas must be"):
        fit_ridge_models(features, {"s": targets}, lags=2, alphas=[-1.0])
    with pytest.raises(ValueError, match="unknown ridge solver"):
        fit_ridge_models(features, {"s": targets}, lags=2, solver="sgd")
    short = {run: x[:10] for run, x in features.items()}
    with pytest.raises(ValueError, match="features shorter than the targets"):
        fit_ridge_models(short, {"s": targets}, lags=2)
