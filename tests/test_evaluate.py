"""Brain-encoding statistics against known answers, and brain maps that render."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from training import evaluate
from training.evaluate import EncodingScores


@pytest.fixture
def runs():
    """Three held-out runs of 4 targets, and predictions with known relations to them."""
    rng = np.random.default_rng(0)
    truth = {f"s04e0{i}a": rng.standard_normal((40, 4)) for i in range(1, 4)}
    return truth, rng


def test_pearson_and_r2_match_hand_formulas(runs):
    truth, rng = runs
    y = truth["s04e01a"]
    pred = y + rng.standard_normal(y.shape)
    pred[:, 1] = 2 * y[:, 1] + 1  # perfectly correlated, wrong scale and offset
    r = evaluate.pearson_r(y, pred)
    r2 = evaluate.r2(y, pred)
    for j in range(4):
        assert r[j] == pytest.approx(np.corrcoef(y[:, j], pred[:, j])[0, 1], abs=1e-12)
        residual = ((y[:, j] - pred[:, j]) ** 2).sum()
        total = ((y[:, j] - y[:, j].mean()) ** 2).sum()
        assert r2[j] == pytest.approx(1 - residual / total, abs=1e-12)
    assert r[1] == pytest.approx(1.0)
    # r2 sees the scale/offset error that r ignores: 1 - sum((y+1)^2)/sum((y-mean)^2) < 0 here.
    assert r2[1] < 0


def test_constant_prediction_scores_zero_r():
    y = np.arange(30, dtype=float)[:, None] * np.ones((1, 2))
    pred = np.ones_like(y)
    assert evaluate.pearson_r(y, pred).tolist() == [0.0, 0.0]


def test_bad_inputs_name_the_run(runs):
    truth, _ = runs
    with pytest.raises(ValueError, match="runs without predictions"):
        evaluate.score_runs(truth, {"s04e01a": truth["s04e01a"]}, ["a", "b", "c", "d"])
    bad = dict(truth)
    bad["s04e02a"] = truth["s04e02a"].copy()
    bad["s04e02a"][3, 1] = np.nan
    with pytest.raises(ValueError, match="s04e02a: predictions contain NaN"):
        evaluate.score_runs(truth, bad, ["a", "b", "c", "d"], model="conv4")
    with pytest.raises(ValueError, match="target columns"):
        evaluate.score_runs(truth, truth, ["a", "b"])


def test_score_runs_rows_follow_runs_and_round_trip(runs, tmp_path):
    truth, rng = runs
    predictions = {run: y + 0.5 * rng.standard_normal(y.shape) for run, y in truth.items()}
    scores = evaluate.score_runs(truth, predictions, ["p1", "p2", "p3", "p4"], model="conv4")
    assert scores.r.shape == (3, 4)
    run = "s04e02a"
    np.testing.assert_allclose(scores.r[1], evaluate.pearson_r(truth[run], predictions[run]))
    path = scores.save_csv(tmp_path / "scores.csv")
    again = EncodingScores.load_csv(path)
    assert again.runs == scores.runs and again.targets == scores.targets
    np.testing.assert_allclose(again.r2, scores.r2)


def _by_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Yekutieli adjusted p-values written out from the definition."""
    m = len(p)
    c = sum(1 / i for i in range(1, m + 1))
    order = np.argsort(p)
    adjusted = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):
        index = order[rank - 1]
        running = min(running, p[index] * m * c / rank)
        adjusted[index] = running
    return adjusted


def test_compare_wilcoxon_and_by_fdr_known_answers():
    rng = np.random.default_rng(1)
    n_runs, n_targets = 10, 6
    base = rng.normal(0.2, 0.05, (n_runs, n_targets))
    cand = base + rng.normal(0.0, 0.01, (n_runs, n_targets))
    cand[:, :2] = base[:, :2] + 0.03 + np.arange(n_runs)[:, None] * 1e-3  # every run improves
    cand[:, 5] = base[:, 5]  # identical: no evidence at all
    a = EncodingScores("head-only", [f"r{i}" for i in range(n_runs)], list("abcdef"), base, base)
    b = EncodingScores("conv4", a.runs, a.targets, cand, cand)
    table = evaluate.compare(a, b, metric="r2")
    # All 10 differences positive: the exact two-sided p is 2 / 2**10.
    assert table["p"][0] == pytest.approx(2 / 1024)
    assert table["p"][0] == pytest.approx(evaluate.smallest_wilcoxon_p(10))
    for j in range(n_targets - 1):
        assert table["p"][j] == pytest.approx(stats.wilcoxon(cand[:, j], base[:, j]).pvalue)
    assert table["p"][5] == 1.0
    np.testing.assert_allclose(table["q"], _by_adjust(table["p"].to_numpy()))
    # BY inflates p by m * sum(1/i) / rank = 6 * 2.45 / 2 for the two smallest: 0.0144 < 0.05.
    assert table["q"][0] == pytest.approx(2 / 1024 * 6 * sum(1 / i for i in range(1, 7)) / 2)
    assert table["gain"].tolist()[:2] == [True, True]
    assert not table["significant"][2:].any()
    np.testing.assert_allclose(table["mean_diff"], (cand - base).mean(axis=0))


def test_compare_refuses_unpaired_scores():
    a = EncodingScores("a", ["r1", "r2"], ["t"], np.zeros((2, 1)), np.zeros((2, 1)))
    b = EncodingScores("b", ["r1", "r3"], ["t"], np.zeros((2, 1)), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="different runs"):
        evaluate.compare(a, b)


def test_few_runs_cannot_survive_fdr():
    """With 5 runs the smallest two-sided p is 1/16: nothing can be significant at 0.05."""
    assert evaluate.smallest_wilcoxon_p(5) == pytest.approx(0.0625)
    base = np.zeros((5, 3))
    a = EncodingScores("a", list("vwxyz"), list("abc"), base, base)
    b = EncodingScores("b", a.runs, a.targets, base + 1, base + 1)
    assert not evaluate.compare(a, b)["significant"].any()


def test_ceiling_fraction():
    fraction = evaluate.ceiling_fraction([0.2, 0.1, 0.05, 0.3], [0.4, 0.0, np.nan, 0.3])
    assert fraction[0] == pytest.approx(0.5)
    assert np.isnan(fraction[1]) and np.isnan(fraction[2])
    assert fraction[3] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        evaluate.ceiling_fraction([0.1], [0.1, 0.2])


@pytest.fixture
def atlas():
    import nibabel as nib

    labels = np.zeros((20, 24, 20), dtype=np.int16)
    labels[2:9, 2:10, 2:10] = 1
    labels[3:8, 14:22, 12:18] = 2
    labels[10:18, 12:20, 8:16] = 4  # label numbers need not be contiguous
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = -40
    return nib.Nifti1Image(labels, affine)


def test_parcel_values_go_back_to_their_parcels(atlas):
    img = evaluate.parcel_values_to_img(np.array([0.3, -0.1, 0.6]), atlas)
    data = img.get_fdata()
    labels = np.asarray(atlas.dataobj)
    assert data.shape == labels.shape
    for label, value in ((1, 0.3), (2, -0.1), (4, 0.6), (0, 0.0)):
        np.testing.assert_allclose(data[labels == label], value)
    with pytest.raises(ValueError, match="3 parcels"):
        evaluate.parcel_values_to_img(np.zeros(4), atlas)


def test_voxel_values_go_back_to_the_mask(atlas):
    import nibabel as nib

    mask = nib.Nifti1Image((np.asarray(atlas.dataobj) == 1).astype(np.uint8), atlas.affine)
    n = int((np.asarray(atlas.dataobj) == 1).sum())
    img = evaluate.voxel_values_to_img(np.arange(n, dtype=float) + 1, mask)
    data = img.get_fdata()
    assert np.count_nonzero(data) == n and data.max() == n


def test_brain_map_renders_png_and_html(atlas, tmp_path):
    img = evaluate.parcel_values_to_img(np.array([0.3, -0.1, 0.6]), atlas)
    png, html = evaluate.render_brain_map(img, tmp_path / "map.png", html_path=tmp_path / "map.html",
                                          title="conv4 r2")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    import html as html_module

    page = html_module.unescape(html.read_text())  # nilearn writes the page as an iframe srcdoc
    assert "<html" in page and "<title>Nilearn - conv4 r2</title>" in page
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_summary_per_kind_and_ceiling_fractions():
    r = np.array([[0.4, 0.2, 0.0, 0.05], [0.6, 0.2, 0.1, -0.05]])  # 2 runs x 4 targets
    r2 = np.array([[0.10, 0.04, -0.1, 0.0], [0.30, 0.04, 0.1, -0.2]])
    scores = {("conv4", "sub-01"): EncodingScores("conv4", ["a", "b"], list("wxyz"), r, r2)}
    kinds = ["auditory", "auditory", "weak", "noise"]
    ceilings = {"sub-01": {"r": np.array([0.8, 0.5, 0.2, 0.0]), "r2": np.array([0.4, 0.2, 0.05, 0.0])}}
    row = evaluate.summarise(scores, ceilings, kinds).iloc[0]
    assert row["mean_r_auditory"] == pytest.approx((0.5 + 0.2) / 2)
    assert row["mean_r_noise"] == pytest.approx(0.0)
    assert row["best_r2"] == pytest.approx(0.2) and row["best_target"] == "w"
    # r: 0.5/0.8, 0.2/0.5, 0.05/0.2 -> median 0.4; the zero ceiling is left out.
    assert row["ceiling_fraction_r"] == pytest.approx(0.4)
    # r2: 0.2/0.4, 0.04/0.2, 0.0/0.05 -> median 0.2.
    assert row["ceiling_fraction_r2"] == pytest.approx(0.2)


# ---- pooled test, chance level of r, held-out noise ceiling, scores of any model -------------

def _scores(model: str, r: np.ndarray) -> EncodingScores:
    runs = [f"s04e{i + 1:02d}a" for i in range(r.shape[0])]
    return EncodingScores(model, runs, [f"p{j}" for j in range(r.shape[1])], r, r - 0.1)


def test_pooled_test_uses_runs_as_units_and_the_target_mask():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.4, size=(12, 5))
    gain = base + np.array([0.05, 0.05, 0.05, -0.3, -0.3]) + rng.normal(0, 0.01, size=(12, 5))
    a, b = _scores("head", base), _scores("conv4", gain)
    auditory = np.array([True, True, True, False, False])
    pooled = evaluate.pooled_compare(a, b, metric="r", targets=auditory)
    assert pooled["n_runs"] == 12 and pooled["n_targets"] == 3
    assert pooled["mean_diff"] == pytest.approx((gain - base)[:, :3].mean(), abs=1e-12)
    assert pooled["p"] == pytest.approx(2 * 0.5 ** 12)  # every run gains: the exact two-sided minimum
    assert evaluate.pooled_compare(a, b, metric="r")["mean_diff"] < 0  # all targets: a loss
    with pytest.raises(ValueError, match="selects no target"):
        evaluate.pooled_compare(a, b, targets=np.zeros(5, dtype=bool))


def test_chance_sd_of_r_matches_simulated_independent_series():
    """For independent AR(1) series (phi 0.6 and 0.8), the spread of the run-mean r over many
    simulations is Bartlett's, much wider than the white-noise 1 / sqrt(n)."""
    rng = np.random.default_rng(1)
    n, n_runs, n_sim = 80, 3, 600

    def ar1(phi, shape):
        x = np.zeros(shape)
        noise = rng.standard_normal(shape)
        for t in range(shape[0]):
            x[t] = phi * (x[t - 1] if t else 0) + noise[t]
        return x

    truth = {f"r{i}": ar1(0.6, (n, n_sim)) for i in range(n_runs)}
    predictions = {f"r{i}": ar1(0.8, (n, n_sim)) for i in range(n_runs)}
    mean_r = np.mean([evaluate.pearson_r(truth[k], predictions[k]) for k in truth], axis=0)
    predicted_sd = evaluate.chance_r_sd(truth, predictions).mean()
    white = 1 / np.sqrt(n * n_runs)
    assert predicted_sd > 1.5 * white
    assert mean_r.std() == pytest.approx(predicted_sd, rel=0.15)


def test_held_out_noise_ceiling_averages_only_the_held_out_runs(tmp_path):
    import json

    truth = {"subjects": {"sub-01": {"noise_ceiling_r_by_run": {
        "s01e01a": [0.9, 0.0], "s02e01a": [0.5, 0.0], "s03e01a": [0.4, 0.0], "s03e01b": [0.6, 0.2]}}}}
    (tmp_path / "ground_truth.json").write_text(json.dumps(truth))
    ceiling = evaluate.held_out_noise_ceiling(tmp_path, "sub-01", ["s03e01a", "s03e01b"])
    np.testing.assert_allclose(ceiling["r"], [0.5, 0.1])
    np.testing.assert_allclose(ceiling["r2"], [(0.16 + 0.36) / 2, 0.02])
    with pytest.raises(ValueError, match="no noise ceiling of sub-01 for runs"):
        evaluate.held_out_noise_ceiling(tmp_path, "sub-01", ["s04e01a"])
    with pytest.raises(ValueError, match="no per-run noise ceiling of 'sub-09'"):
        evaluate.held_out_noise_ceiling(tmp_path, "sub-09", ["s03e01a"])


def test_results_from_scores_compares_any_models():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.1, 0.3, size=(8, 3))
    scores = {("ridge-log-mel", "sub-01"): _scores("ridge-log-mel", base),
              ("conv4", "sub-01"): _scores("conv4", base + 0.1)}
    results = evaluate.results_from_scores(scores, comparisons=[("ridge-log-mel", "conv4")],
                                           kinds=["auditory", "auditory", "noise"])
    assert set(results.comparisons["metric"]) == {"r", "r2"}
    rows = results.comparisons[results.comparisons["metric"] == "r"]
    np.testing.assert_allclose(rows["mean_diff"], 0.1)
    assert list(rows["kind"]) == ["auditory", "auditory", "noise"]
    assert len(results.summary) == 2


def test_comparison_table_counts_k_of_n_auditory_and_pools_across_them():
    rng = np.random.default_rng(3)
    base = rng.uniform(0.2, 0.4, size=(12, 4))
    better = base + np.array([0.2, 0.2, 0.0, 0.0]) + rng.normal(0, 0.01, size=(12, 4))
    kinds = ["auditory", "auditory", "auditory", "noise"]
    scores = {("head", "sub-01"): _scores("head", base), ("conv4", "sub-01"): _scores("conv4", better)}
    results = evaluate.results_from_scores(scores, comparisons=[("head", "conv4")], kinds=kinds)
    table = evaluate.comparison_table(results, [("head", "conv4")], kinds=kinds)
    row = table[table["metric"] == "r"].iloc[0]
    assert (row["n"], row["k_gain"], row["k_loss"], row["n_runs"]) == (3, 2, 0, 12)
    assert row["mean_diff"] == pytest.approx((better - base)[:, :3].mean())
    assert row["pooled_p"] == pytest.approx(2 * 0.5 ** 12)
    assert row["mean_candidate"] == pytest.approx(better[:, :3].mean())
