"""The main job end to end at its tiny size: data, training, held-out evaluation, HEAR, report."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from training.main_job import SIZES, run_main_job
from training.evaluate import read_table


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("main_job")
    readme = run_main_job(root / "work", root / "report", size="tiny", seed=0, threads=2, progress=False)
    return root / "work", root / "report", readme


def test_report_has_every_section_and_figure(job):
    _, report, readme = job
    text = readme.read_text()
    for heading in ("## Training", "## Brain encoding on the held-out runs", "### Comparisons",
                    "### Brain maps", "## Downstream tasks (HEAR)",
                    "## Few-shot curves (HEAR tasks, linear probe on the same embeddings)", "## Run time"):
        assert heading in text
    figures = report / "figures"
    expected = ["learning_curves.png", "scatter_conv4_vs_head_sub-01.png", "scatter_conv4_vs_head_sub-02.png",
                "map_r_head_sub-01.png", "map_r_conv4_sub-01.png", "hear_scores.png",
                "few_shot_difference.png"]
    for name in expected:
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}" in text
    assert (figures / "map_r_conv4_sub-01.html").stat().st_size > 10_000
    for match in re.findall(r"\]\((figures/[^)]+)\)", text):  # every link resolves
        assert (report / match).is_file(), match
    assert "python -m training main --size tiny --seed 0" in text  # the command, as run from a clone


def test_training_ran_every_condition_and_the_group(job):
    work, _, _ = job
    state = json.loads((work / "main_job.json").read_text())
    trained = sorted(k for k in state["steps"] if k.startswith("train "))
    assert trained == ["train group_conv4", "train sub-01_conv4", "train sub-01_head", "train sub-01_null",
                       "train sub-02_conv4", "train sub-02_head", "train sub-02_null"]
    budgets = SIZES["tiny"].runs
    for step in trained:
        info = state["steps"][step]
        kind = "group" if "group" in step else step.rsplit("_", 1)[1]
        assert 1 <= info["epochs"] <= budgets[kind]["train.max_epochs"]
        assert 0 <= info["best_epoch"] < info["epochs"]
        assert np.isfinite(info["best_val_loss"])


def test_held_out_scores_are_the_models_real_predictions(job):
    """Recompute one model's held-out r and r2 from its saved file, independently of the job."""
    from sklearn.metrics import r2_score

    from training.data.loading import load_splits
    from training.main_job import MainJob
    from training.model import EncodingModel

    work, _, _ = job
    scores = read_table(work / "evaluation" / "scores.csv", dtype={"run": str, "target": str})
    main = MainJob(work, work / "unused", "tiny", 0, 2, False)
    splits = load_splits(main.config("check", "conv4", ["sub-01"]))
    model = EncodingModel.from_pretrained(work / "runs" / "sub-01_conv4" / "best.safetensors")
    episode = splits.test[0]
    truth = episode.targets["sub-01"]
    prediction = model.predict_run(episode.waveform, truth.shape[0], "sub-01", tr=splits.tr)
    rows = scores[(scores["model"] == "conv4") & (scores["subject"] == "sub-01") & (scores["run"] == episode.name)]
    names = model.target_names["sub-01"]
    assert list(rows["target"]) == names
    expected_r = [np.corrcoef(truth[:, j], prediction[:, j])[0, 1] for j in range(truth.shape[1])]
    np.testing.assert_allclose(rows["r"], expected_r, atol=1e-6)
    np.testing.assert_allclose(rows["r2"], r2_score(truth, prediction, multioutput="raw_values"), atol=1e-6)


def test_summary_numbers_in_the_report_match_the_tables(job):
    work, report, readme = job
    summary = read_table(work / "evaluation" / "summary.csv")
    text = readme.read_text()
    assert set(summary["model"]) == {"head", "conv4", "null", "group", "ridge-conv7", "ridge-log-mel", "oracle"}
    for _, row in summary.iterrows():
        assert f"{row['mean_r']:.3f}" in text
        assert 0 < row["ceiling_fraction_r"] < 1.5
    comparisons = read_table(work / "evaluation" / "comparisons.csv")
    assert set(comparisons["kind"]) == {"auditory", "weak", "noise"}
    assert comparisons["q"].between(0, 1).all()


def test_what_the_tiny_data_make_reliable(job):
    """At the tiny size (2 held-out runs of ~40 TRs per subject) nothing can pass FDR and a
    noise parcel's mean r still swings by about 0.1; what is reliable: the pretrained features
    beat random ones on the auditory parcels, and those score well above the noise parcels."""
    work, _, _ = job
    summary = read_table(work / "evaluation" / "summary.csv")
    auditory = summary.groupby("model")["mean_r_auditory"].mean()  # mean over the 2 subjects
    assert auditory["head"] > 0.25
    assert auditory["head"] - auditory["null"] > 0.1
    assert auditory["head"] - summary["mean_r_noise"].abs().mean() > 0.15
    comparisons = read_table(work / "evaluation" / "comparisons.csv")
    assert not comparisons["significant"].any()  # smallest two-sided Wilcoxon p with 2 runs is 0.5


def test_hear_comparison_ran_for_pretrained_and_brain_aligned(job):
    work, _, readme = job
    status = json.loads((work / "hear" / "hear_status.json").read_text())
    assert [(c["label"], c["status"]) for c in status["checkpoints"]] == [("pretrained", "ok"),
                                                                         ("group_conv4", "ok")]
    scores = read_table(work / "hear" / "hear_scores.csv")
    primary = scores[scores["primary"]]
    assert len(primary) == 8  # 4 tasks x 2 checkpoints
    assert set(primary["task"]) == {"synth_scene", "synth_kfold", "synth_pitch", "synth_events"}
    assert "synth_events" in readme.read_text()


def test_rerun_skips_every_finished_step(job):
    work, report, readme = job
    state_before = (work / "main_job.json").read_text()
    best = work / "runs" / "sub-01_conv4" / "best.safetensors"
    stamps = {p: p.stat().st_mtime_ns for p in (best, readme, work / "hear" / "hear_scores.csv")}
    again = run_main_job(work, report, size="tiny", seed=0, threads=2, progress=False)
    assert again == readme
    assert (work / "main_job.json").read_text() == state_before
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_other_settings_in_the_same_workdir_are_refused(job):
    work, report, _ = job
    with pytest.raises(SystemExit, match="other settings"):
        run_main_job(work, report, size="tiny", seed=1, progress=False)


def test_a_changed_dataset_design_is_refused_not_resumed(job, monkeypatch):
    """A work folder made by an older dataset design would resume on stale data: refused."""
    from dataclasses import replace

    from training import synthetic

    work, report, _ = job
    monkeypatch.setitem(synthetic.SIZES, "tiny", replace(synthetic.SIZES["tiny"], episodes_per_season=2))
    with pytest.raises(SystemExit, match="other settings"):
        run_main_job(work, report, size="tiny", seed=0, progress=False)


def test_experiment_values_not_comments_fingerprint_a_work_folder(job, tmp_path, monkeypatch):
    import shutil

    from training import main_job

    work, report, readme = job
    configs = tmp_path / "configs"
    shutil.copytree(main_job.CONFIGS_DIR, configs)
    monkeypatch.setattr(main_job, "CONFIGS_DIR", configs)
    conv4 = configs / "synthetic_conv4.toml"
    conv4.write_text("# an edited comment\n" + conv4.read_text())
    assert run_main_job(work, report, size="tiny", seed=0, threads=2, progress=False) == readme
    conv4.write_text(conv4.read_text().replace("lr = 1e-5", "lr = 2e-5"))
    with pytest.raises(SystemExit, match="other settings"):
        run_main_job(work, report, size="tiny", seed=0, progress=False)


def test_claims_are_computed_from_the_results():
    """The report's claims on hand-made scores: conv4 better than head in every held-out run makes
    that claim hold with k of N parcels; a baseline that wins makes its claim fail and say so;
    a noise parcel at r = 0.2 breaks the noise claim."""
    from training.evaluate import EncodingScores, results_from_scores
    from training.report import check_claims

    rng = np.random.default_rng(0)
    runs = [f"s03e{i:02d}a" for i in range(1, 13)]
    targets, kinds = ["a1", "a2", "n1"], ["auditory", "auditory", "noise"]
    base = rng.uniform(0.3, 0.5, size=(12, 3))
    base[:, 2] = rng.normal(0, 0.02, size=12)
    models = {"head": base, "conv4": base + np.array([0.1, 0.1, 0.0]) + rng.normal(0, 0.01, (12, 3)),
              "ridge-log-mel": base + np.array([0.2, 0.2, 0.0]) + rng.normal(0, 0.01, (12, 3))}
    scores = {}
    for subject, noise_shift in (("sub-01", 0.0), ("sub-02", 0.2)):
        for model, r in models.items():
            r = r.copy()
            r[:, 2] += noise_shift if model == "conv4" else 0.0
            scores[(model, subject)] = EncodingScores(model, runs, targets, r, r - 0.2)
    results = results_from_scores(scores, comparisons=[("head", "conv4"), ("ridge-log-mel", "conv4")],
                                  kinds=kinds)
    claims = check_claims(results)
    head = [c for c in claims if c.statement.startswith("conv4 beats head-only")]
    assert len(head) == 2 and all(c.holds for c in head)  # r and r2
    assert "significant gain in 2 of 2 auditory parcels" in head[0].evidence
    assert "pooled p = 0.00049 over 12 runs" in head[0].evidence
    mel = [c for c in claims if c.statement.startswith("conv4 beats a ridge on a 64-band log-mel")]
    assert len(mel) == 2 and not any(c.holds for c in mel) and "loss in 2" in mel[0].evidence
    noise = [c for c in claims if c.statement.startswith("pure-noise")][0]
    assert not noise.holds and "conv4, sub-02" in noise.evidence
    assert all("conditional on one fitted model per condition" in c.statement for c in head)


def test_few_shot_curves_reuse_the_hear_embeddings(job):
    """The few-shot step scores pretrained and the brain-aligned checkpoint on the same draws,
    from the embeddings heareval wrote (one folder per checkpoint), at every k the suite allows."""
    import pandas as pd

    work, _, readme = job
    points = pd.read_csv(work / "hear" / "few_shot" / "few_shot.csv")
    assert set(points["checkpoint"]) == {"pretrained", "group_conv4"}
    assert points["score"].between(0, 1).all() and points["k"].min() == 1
    keys = ["task", "k", "draw", "fold"]
    per_checkpoint = [set(map(tuple, part[keys].values)) for _, part in points.groupby("checkpoint")]
    assert per_checkpoint[0] == per_checkpoint[1]  # paired: the same points for both
    assert "too few pairs for a test" in readme.read_text()


def test_ridge_baselines_and_held_out_ceilings_are_in_the_evaluation(job):
    """The ridge baselines (frozen pretrained conv7, log-mel, the oracle) are scored beside the
    trained models; the noise ceilings are those of the held-out runs; the claims cover them."""
    from training.evaluate import held_out_noise_ceiling

    work, _, readme = job
    state = json.loads((work / "main_job.json").read_text())
    timings = state["steps"]["ridge baselines"]["ridge_seconds"]
    assert set(timings) == {"ridge-conv7", "ridge-log-mel", "oracle"}
    summary = read_table(work / "evaluation" / "summary.csv")
    assert {"ridge-conv7", "ridge-log-mel", "oracle", "head", "conv4", "null", "group"} <= set(summary["model"])
    auditory = summary.pivot(index="subject", columns="model", values="mean_r_auditory")
    assert (auditory["oracle"] > auditory["head"] + 0.1).all()  # the true features bound the rest
    comparisons = read_table(work / "evaluation" / "comparisons.csv")
    rows = comparisons[(comparisons["subject"] == "sub-01") & (comparisons["metric"] == "r")
                       & (comparisons["baseline"] == "head") & (comparisons["candidate"] == "conv4")]
    ceiling = held_out_noise_ceiling(work / "data", "sub-01", ["s03e01a", "s03e01b"])
    np.testing.assert_allclose(rows["ceiling_r"], ceiling["r"], atol=1e-9)
    text = readme.read_text()
    assert "### Per subject over the auditory parcels" in text
    assert "conv4 beats a ridge on a 64-band log-mel spectrogram" in text
    assert "conditional on one fitted model per condition" in text


def test_seeds_add_runs_with_their_own_seed(tmp_path):
    from training.main_job import MainJob

    job = MainJob(tmp_path, tmp_path / "report", "tiny", 0, 1, False, seeds=3)
    runs = job.runs()
    assert {"sub-01_conv4_seed1", "sub-01_conv4_seed2", "sub-02_null_seed2"} <= set(runs)
    assert not any(name.startswith("group") and "seed" in name for name in runs)
    assert job.config("sub-01_conv4_seed2", "conv4", ["sub-01"]).run.seed == 2
    assert job.config("sub-01_conv4", "conv4", ["sub-01"]).run.seed == 0
    with pytest.raises(SystemExit, match="at least 1 seed"):
        MainJob(tmp_path, tmp_path / "report", "tiny", 0, 1, False, seeds=0)


@pytest.mark.parametrize("kind", ["head", "conv4", "null", "group"])
def test_run_configs_are_the_experiment_files_with_the_jobs_values(tmp_path, kind):
    """The job sets its values on the loaded experiment file: the result is what the command line
    makes of the same file with those values as ``--set`` overrides (so a run's config.toml is
    the file's), and only the job's keys differ from the file."""
    from training.config import load_config
    from training.main_job import CONFIGS_DIR, RUN_CONFIGS, MainJob

    job = MainJob(tmp_path, tmp_path / "report", "tiny", 3, 2, False, seeds=2)
    subjects = ["sub-01", "sub-02"] if kind == "group" else ["sub-02"]
    name = f"x_{kind}_seed4"
    config = job.config(name, kind, subjects)
    values = {"run.name": name, "run.out_dir": str(tmp_path / "runs"), "run.seed": 4, "run.threads": 2,
              "run.progress": False, "data.source": "synthetic", "data.root": str(tmp_path / "data"),
              "data.synthetic_size": "tiny", "data.synthetic_seed": 3,
              "subjects.mode": "group" if kind == "group" else "individual", "subjects.ids": subjects,
              **SIZES["tiny"].runs[kind]}
    path = CONFIGS_DIR / RUN_CONFIGS[kind]
    assert config == load_config(path, [f"{k}={json.dumps(v)}" for k, v in values.items()])
    file_values = load_config(path).to_dict()
    changed = {f"{section}.{key}" for section, table in config.to_dict().items() if isinstance(table, dict)
               for key, value in table.items() if file_values[section][key] != value}
    assert changed <= set(values)
    assert config.train.max_epochs == SIZES["tiny"].runs[kind]["train.max_epochs"]


def test_a_bad_size_value_names_the_key_and_the_file(tmp_path, monkeypatch):
    from dataclasses import replace

    from training.config import ConfigError
    from training.main_job import MainJob

    runs = {**SIZES["tiny"].runs, "head": {"train.max_epochs": "8"}}
    monkeypatch.setitem(SIZES, "tiny", replace(SIZES["tiny"], runs=runs))
    job = MainJob(tmp_path, tmp_path / "report", "tiny", 0, 1, False)
    with pytest.raises(ConfigError, match=r"synthetic_head.toml \(main job, size 'tiny'\): train.max_epochs "
                                          r"must be int, got str '8'"):
        job.config("sub-01_head", "head", ["sub-01"])


def test_the_evaluate_command_rescores_the_jobs_runs(job, tmp_path, capsys):
    """``evaluate head=RUN conv4=RUN``: the same held-out scores as the job's evaluation, the
    comparison with the first run, and brain maps on the synthetic atlas."""
    from training.cli import main

    work, _, _ = job
    out = tmp_path / "evaluation"
    assert main(["evaluate", f"head={work / 'runs' / 'sub-01_head'}", str(work / "runs" / "sub-01_conv4"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sub-01_conv4" in printed and "wrote" in printed
    ours = read_table(out / "scores.csv", dtype={"run": str, "target": str})
    assert set(ours["model"]) == {"head", "sub-01_conv4"} and set(ours["subject"]) == {"sub-01"}
    theirs = read_table(work / "evaluation" / "scores.csv", dtype={"run": str, "target": str})
    theirs = theirs[(theirs["subject"] == "sub-01") & theirs["model"].isin(["head", "conv4"])]
    key = ["model", "run", "target"]
    ours = ours.replace({"model": {"sub-01_conv4": "conv4"}}).sort_values(key).reset_index(drop=True)
    theirs = theirs.sort_values(key).reset_index(drop=True)
    np.testing.assert_allclose(ours["r"], theirs["r"], atol=1e-9)
    comparisons = read_table(out / "comparisons.csv")
    assert set(zip(comparisons["baseline"], comparisons["candidate"])) == {("head", "sub-01_conv4")}
    assert (out / "map_r_sub-01_conv4_sub-01.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="--baseline 'conv5' is not one of the runs"):
        main(["evaluate", str(work / "runs" / "sub-01_head"), "--baseline", "conv5", "--out", str(out)])
    with pytest.raises(SystemExit, match="no such model file"):
        main(["evaluate", str(tmp_path / "absent"), "--out", str(out)])


def test_seed_spread_summarises_each_condition_over_its_seeds():
    import pandas as pd

    from training.report import seed_spread

    summary = pd.DataFrame({"subject": ["sub-01"] * 4, "model": ["conv4", "conv4@seed1", "conv4@seed2", "head"],
                            "mean_r_auditory": [0.60, 0.62, 0.58, 0.55], "mean_r2_auditory": [0.3, 0.32, 0.28, 0.25]})
    spread = seed_spread(summary)
    assert len(spread) == 1
    row = spread.iloc[0]
    assert row["model"] == "conv4" and row["seeds"] == 3
    assert row["mean_r_auditory_mean"] == pytest.approx(0.60)
    assert row["mean_r_auditory_sd"] == pytest.approx(0.02)
    assert (row["mean_r2_auditory_min"], row["mean_r2_auditory_max"]) == (0.28, 0.32)
