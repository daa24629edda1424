"""Tests of training.synthetic: layouts, ground truth, determinism, command line."""

from __future__ import annotations

import hashlib
import json
import shutil

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from tests.fixtures_data import tiny_dataset  # noqa: F401  (session fixture)
from training.synthetic import FEATURES, SIZES, SyntheticDataset, _residualise, generate_friends_like, main


def _digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layouts_follow_fmriprep_and_algonauts(tiny_dataset):
    ds = tiny_dataset
    assert ds.subjects == ("sub-01", "sub-02")
    assert ds.episodes == ("s01e01a", "s01e01b", "s02e01a", "s02e01b", "s03e01a", "s03e01b")
    # sub-02 misses one run, in both layouts, as in the real data
    assert "s01e01a" not in ds.runs["sub-02"] and len(ds.runs["sub-01"]) == 6
    assert not list((ds.fmriprep_dir / "sub-02").rglob("*task-s01e01a*"))
    with h5py.File(ds.h5_path("sub-02")) as handle:
        assert sorted(handle) == [
            "ses-001_task-s01e01b", "ses-002_task-s02e01a", "ses-002_task-s02e01b",
            "ses-003_task-s03e01a", "ses-003_task-s03e01b",
        ]  # fmt: skip
        assert handle["ses-002_task-s02e01a"].dtype == np.float32
        assert handle["ses-002_task-s02e01a"].shape[1] == len(ds.target_names) == 10

    func = ds.fmriprep_dir / "sub-01" / "ses-002" / "func"
    prefix = "sub-01_ses-002_task-s02e01a"
    bold = func / f"{prefix}_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
    img = nib.load(bold)
    assert img.shape[:3] == ds.config.volume_shape and img.get_data_dtype() == np.float32
    assert img.header.get_zooms()[3] == pytest.approx(1.49)
    assert json.loads(bold.with_name(bold.name.replace(".nii.gz", ".json")).read_text())["RepetitionTime"] == 1.49
    assert (func / f"{prefix}_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz").exists()
    confounds = pd.read_csv(func / f"{prefix}_desc-confounds_timeseries.tsv", sep="\t")
    for column in ("trans_x", "rot_z_derivative1", "trans_y_power2", "rot_x_derivative1_power2",
                   "csf", "white_matter", "global_signal", "framewise_displacement"):  # fmt: skip
        assert column in confounds
    assert np.isnan(confounds["trans_x_derivative1"][0]) and not np.isnan(confounds["trans_x_derivative1"][1])
    assert len(confounds) == img.shape[3]

    # atlas, labels, mask
    labels = np.asarray(nib.load(ds.atlas).dataobj)
    table = pd.read_csv(ds.atlas_labels, sep="\t")
    assert list(table["name"]) == list(ds.target_names)
    assert sorted(np.unique(labels[labels > 0])) == list(table["index"])
    assert set(table["kind"]) == {"auditory", "weak", "noise"}
    mask = np.asarray(nib.load(ds.voxel_mask).dataobj)
    assert mask.sum() > 0 and set(np.unique(labels[mask > 0])) <= set(table["index"][table["kind"] == "auditory"])

    # stimuli at 16 kHz (so that reading resamples), one episode as a video file if ffmpeg exists
    info = sf.info(ds.stimuli_dir / "friends_s01e01a.wav")
    assert info.samplerate == 16000 and info.channels == 1
    if shutil.which("ffmpeg"):
        assert ds.video_episodes == ("s01e01b",)
        assert (ds.stimuli_dir / "friends_s01e01b.mkv").exists()


def test_ground_truth_is_consistent_with_the_data(tiny_dataset):
    """Recompute the saved noise ceilings from the HDF5 targets, features, tuning and TSVs."""
    from nilearn.interfaces.fmriprep import load_confounds

    ds = tiny_dataset
    truth = ds.ground_truth()
    features = np.load(ds.root / "ground_truth_features.npz")
    assert list(features["feature_names"]) == list(FEATURES)
    subject = truth["subjects"]["sub-01"]
    weights = np.array(subject["tuning"])
    brain = ds.read_h5("sub-01")
    for episode in brain.episodes:
        (bold,) = (ds.fmriprep_dir / "sub-01").rglob(f"*task-{episode}_*desc-preproc_bold.nii.gz")
        confounds, _ = load_confounds(str(bold), strategy=("high_pass", "motion", "wm_csf"), motion="full",
                                      wm_csf="basic")  # fmt: skip
        clean = _residualise(features[f"features_{episode}"].astype(np.float64) @ weights.T, confounds.to_numpy())
        target = brain.runs[episode]
        for p, expected in enumerate(subject["noise_ceiling_r_by_run"][episode]):
            r = 0.0 if clean[:, p].std() == 0 else np.corrcoef(clean[:, p], target[:, p])[0, 1]
            assert r == pytest.approx(expected, abs=1e-4)
    kinds = np.array([p["kind"] for p in truth["parcels"]])
    ceiling = np.array(subject["noise_ceiling_r"])
    assert np.all(ceiling[kinds == "noise"] == 0)
    assert np.all((ceiling[kinds == "auditory"] > 0.45) & (ceiling[kinds == "auditory"] < 0.95))
    assert np.all(ceiling[kinds == "weak"] < ceiling[kinds == "auditory"].min())
    by_run = np.array(list(subject["noise_ceiling_r_by_run"].values()))
    assert np.allclose(subject["noise_ceiling_r2"], (by_run**2).mean(axis=0), atol=1e-5)
    assert np.allclose(ds.noise_ceiling("sub-01"), ceiling)


def test_bold_lags_the_sound_by_the_haemodynamic_delay(tiny_dataset):
    """The speech-tuned parcel follows the speech segments of the soundtrack about 5 s later."""
    ds = tiny_dataset
    truth = ds.ground_truth()
    brain = ds.read_h5("sub-01")
    preferred = [p.get("preferred_feature") for p in truth["parcels"]]
    speech_parcel = preferred.index("speech")
    lags = []
    for episode in brain.episodes:
        n = brain.runs[episode].shape[0]
        centres = (np.arange(n) + 0.5) * ds.tr
        speaking = np.zeros(n)
        for kind, start, stop in truth["segments"][episode]:
            if kind == "speech":
                speaking[(centres >= start) & (centres < stop)] = 1.0
        target = brain.runs[episode][:, speech_parcel]
        scores = [np.corrcoef(speaking[: n - lag], target[lag:])[0, 1] for lag in range(0, 8)]
        lags.append(int(np.nanargmax(scores)))
    # Glover HRF peaks about 5 s after the stimulus: 3 to 4 TRs of 1.49 s.
    assert 2 <= np.median(lags) <= 5


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    small = {"n_subjects": 1, "n_seasons": 1}
    first = generate_friends_like(tmp_path / "a", size="tiny", seed=7, **small)
    second = generate_friends_like(tmp_path / "b", size="tiny", seed=7, **small)
    other = generate_friends_like(tmp_path / "c", size="tiny", seed=8, **small)
    digest_a, digest_b, digest_c = _digest(first.root), _digest(second.root), _digest(other.root)
    assert digest_a == digest_b
    assert digest_a.keys() == digest_c.keys()
    h5_name = str(first.h5_path("sub-01").relative_to(first.root))
    for name in ("stimuli/friends_s01e01a.wav", "ground_truth.json", h5_name):
        assert digest_a[name] != digest_c[name], name
    assert SyntheticDataset.load(first.root) == first


def test_existing_folder_and_bad_size_are_refused(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_friends_like(tmp_path, size="tiny")
    assert main([str(tmp_path), "--size", "tiny"]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown size"):
        generate_friends_like(tmp_path / "x", size="huge")
    with pytest.raises(ValueError, match="run_seconds >= "):
        generate_friends_like(tmp_path / "y", size="tiny", run_seconds=30.0)
    assert not (tmp_path / "y").exists() or not any((tmp_path / "y").iterdir())
    with pytest.raises(ValueError, match="n_subjects must be >= 1, got 0"):
        generate_friends_like(tmp_path / "z", size="tiny", n_subjects=0)
    (tmp_path / "stimuli").mkdir()
    with pytest.raises(ValueError, match="audio_format must be one of"):
        generate_friends_like(tmp_path, size="tiny", overwrite=True, audio_format="mp3")
    assert (tmp_path / "stimuli").is_dir()  # refused before the old dataset was removed
    with pytest.raises(FileNotFoundError, match="dataset_description.json"):
        SyntheticDataset.load(tmp_path)


def test_sizes_are_consistent():
    for name, config in SIZES.items():
        episodes = config.episodes()
        assert len(episodes) == config.n_seasons * config.episodes_per_season * 2, name
        assert set(config.video_episodes) <= set(episodes), name
        assert {e for _, e in config.missing_runs} <= set(episodes), name
    default = SIZES["default"]
    # the test season has >= 12 runs: enough for a Wilcoxon test across runs to survive FDR
    assert default.episodes_per_season * 2 >= 12 and default.n_subjects >= 3 and default.n_seasons >= 3
    # fine-tuning 2.8 M parameters needs data: ~1,800 training TRs per subject (750 only tied)
    runs = (default.n_seasons - 1) * default.episodes_per_season * 2
    assert runs * default.run_seconds / default.tr * 0.75 > 1500


# ---- full scale: the streaming generator (Algonauts HDF5 only) and the "subject" size ------------

def test_streaming_generator_gives_the_in_memory_targets(tmp_path):
    """Without the fMRIPrep layout the dataset is written run by run, with the same HDF5 targets
    and noise ceilings as the in-memory generator, stimuli as FLAC, and no NIfTI at all."""
    small = {"n_subjects": 2, "n_seasons": 2}
    full = generate_friends_like(tmp_path / "full", size="tiny", seed=5, video=False, **small)
    streamed = generate_friends_like(tmp_path / "stream", size="tiny", seed=5, write_fmriprep=False,
                                     audio_format="flac", **small)
    assert streamed.runs == full.runs and len(streamed.target_names) == full.config.n_parcels
    for subject in full.subjects:
        with h5py.File(full.h5_path(subject)) as a, h5py.File(streamed.h5_path(subject)) as b:
            assert sorted(a) == sorted(b) and len(a) == len(full.runs[subject])
            for key in a:
                np.testing.assert_array_equal(a[key][()], b[key][()])
        truth_a = full.ground_truth()["subjects"][subject]
        truth_b = streamed.ground_truth()["subjects"][subject]
        for key in ("noise_ceiling_r", "noise_ceiling_r_by_run", "sessions", "snr", "tuning"):
            assert truth_a[key] == truth_b[key], key
    assert not list(streamed.root.rglob("*.nii.gz")) and not (streamed.root / "fmriprep").exists()
    flac = streamed.stimuli_dir / "friends_s01e01a.flac"
    wav_audio, rate = sf.read(full.stimuli_dir / "friends_s01e01a.wav", dtype="int16")
    flac_audio, flac_rate = sf.read(flac, dtype="int16")
    # the same signal; libsndfile converts float to 16-bit slightly differently per format (1 LSB)
    assert flac_rate == rate and flac_audio.shape == wav_audio.shape
    assert np.abs(flac_audio.astype(int) - wav_audio).max() <= 1
    loaded = SyntheticDataset.load(streamed.root)
    assert loaded == streamed and not loaded.config.write_fmriprep
    brain = loaded.read_h5("sub-01")
    assert brain.noise_ceiling.shape == (full.config.n_parcels,)


def test_subject_size_has_the_shape_of_one_cneuromod_subject():
    """Seasons 1-4, runs of about 12 minutes, about 87,000 TRs (36 h), 1000 parcels."""
    from training.synthetic import _EXTRA_TRS, _episode_duration

    config = SIZES["subject"]
    episodes = config.episodes()
    durations = [_episode_duration(0, e, config) for e in episodes]
    n_trs = sum(int(d // config.tr) + _EXTRA_TRS for d in durations)
    assert config.n_subjects == 1 and config.n_seasons == 4 and len(episodes) == 184
    assert 82_000 <= n_trs <= 92_000, n_trs
    assert 34 <= sum(durations) / 3600 <= 38
    assert 600 <= min(durations) and max(durations) <= 800  # runs of about 12 minutes
    assert config.n_parcels == 1000 and not config.write_fmriprep
