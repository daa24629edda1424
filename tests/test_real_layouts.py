"""Replicas of the public releases as a user's disk holds them, built from the published file
names (not with the project's synthetic generator), and the shipped real-data configs on them.

- Algonauts 2025 (a datalad clone of ``algonauts_2025.competitors``): ``fmri/sub-01/func/``
  with the Friends HDF5 file and two Movie10 files (unfetched git-annex links, or fetched),
  ``fmri/sub-01/atlas/``, ``stimuli/movies/friends/s1..s7/``, ``stimuli/movies/movie10/`` and
  ``stimuli/transcripts/``.
- CNeuroMod ``friends.fmriprep`` (BIDS names per run, MNI and unfetched T1w files, confounds
  with fMRIPrep's column names and ``n/a``) with a 3 mm atlas on another grid than the 2 mm
  BOLD, and ``friends.stimuli`` with full-episode files beside the halves.

Soundtracks are 48 kHz stereo AAC or AC-3 in mkv, made with the ffmpeg CLI; every fMRI run is
1-3 volumes shorter than its soundtrack, as the scanner stopped before the video ended.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import nibabel as nib
import nibabel.processing
import numpy as np
import pandas as pd
import pytest

from tests.fixtures_data import annex_link, requires_ffmpeg, write_soundtrack
from training.batches import EpisodeSet
from training.config import load_config
from training.data import DataError, StimulusCache, find_algonauts_h5, find_stimuli
from training.data.loading import load_splits, plan_data, prepare_data

pytestmark = requires_ffmpeg

REPO = Path(__file__).resolve().parent.parent
TR = 1.49
SPACE = "MNI152NLin2009cAsym"
FRIENDS_H5 = f"sub-01_task-friends_space-{SPACE}_atlas-Schaefer18_parcel-1000Par7Net_desc-s123456_bold.h5"
MOVIE10_H5 = f"sub-01_task-movie10_space-{SPACE}_atlas-Schaefer18_parcel-1000Par7Net_bold.h5"
CROPPED_H5 = f"sub-01_task-movie10_space-{SPACE}_atlas-Schaefer18_parcel-1000Par7Net_desc-cropped_bold.h5"
ALGONAUTS_ATLAS = f"sub-01_space-{SPACE}_atlas-Schaefer18_parcel-1000Par7Net_desc-dseg_parcellation.nii.gz"

# episode: (session, seconds of soundtrack, volumes fewer than the soundtrack covers, codec)
RUNS = {
    "s01e01a": ("001", 68.0, 1, "aac"),
    "s01e01b": ("001", 64.0, 2, "ac3"),
    "s01e02a": ("002", 66.0, 3, "aac"),
    "s02e01a": ("003", 70.0, 1, "ac3"),
    "s02e01b": ("003", 9.0, 1, "aac"),  # too short for one 8-TR window: skipped with a warning
    "s03e01a": ("004", 64.0, 2, "aac"),
    "s04e01a": ("005", 66.0, 1, "ac3"),
}
# About 45 volumes a run: more than the study's 29 confound regressors (real runs have ~480).
REPEATED = {"s01e02a": "006"}  # seen again in a later session: the first session is used
WINDOW = "train.window_trs=8"  # the study's 80-TR windows need 2 minutes of audio per run


def n_volumes(episode: str) -> int:
    """Volumes of the run: the TRs its soundtrack covers, less 1-3."""
    _, seconds, fewer, _ = RUNS[episode]
    return int(seconds // TR) - fewer


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


# ---- replicas ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def soundtracks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One mkv per episode (plus a season-7 one and a full episode), shared by both layouts."""
    folder = tmp_path_factory.mktemp("soundtracks")
    files = {}
    for i, (episode, (_, seconds, _, codec)) in enumerate(RUNS.items()):
        files[episode] = folder / f"friends_{episode}.mkv"
        write_soundtrack(files[episode], seconds, codec=codec, seed=i)
    files["s07e01a"] = folder / "friends_s07e01a.mkv"  # released without fMRI
    write_soundtrack(files["s07e01a"], 4.0, seed=40)
    files["s01e01"] = folder / "friends_s01e01.mkv"  # a full episode: no fMRI run
    write_soundtrack(files["s01e01"], 5.0, codec="ac3", seed=41)
    files["bourne01"] = folder / "bourne01.mkv"
    write_soundtrack(files["bourne01"], 3.0, seed=42)
    return files


def _season_dir(episode: str) -> str:
    return f"s{int(episode[1:3])}"


def build_algonauts(root: Path, soundtracks: dict[str, Path], *, movie10_fetched: bool) -> dict[str, np.ndarray]:
    """``algonauts_2025.competitors`` as cloned with datalad and partly fetched; returns the
    Friends runs written (episode -> (n_TR, 1000) float32)."""
    func = root / "fmri" / "sub-01" / "func"
    func.mkdir(parents=True)
    rng = np.random.default_rng(1)
    runs = {}
    with h5py.File(func / FRIENDS_H5, "w") as handle:
        for episode, (session, *_rest) in RUNS.items():
            runs[episode] = rng.standard_normal((n_volumes(episode), 1000)).astype(np.float32)
            handle.create_dataset(f"ses-{session}_task-{episode}", data=runs[episode])
        for episode, session in REPEATED.items():
            handle.create_dataset(f"ses-{session}_task-{episode}",
                                  data=rng.standard_normal((n_volumes(episode) + 1, 1000)).astype(np.float32))
    for name in (MOVIE10_H5, CROPPED_H5):
        if movie10_fetched:
            with h5py.File(func / name, "w") as handle:
                handle.create_dataset("ses-001_task-bourne01", data=np.ones((30, 1000), np.float32))
        else:
            annex_link(func / name, root)
    atlas = root / "fmri" / "sub-01" / "atlas" / ALGONAUTS_ATLAS
    atlas.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.arange(1000, dtype=np.int16).reshape(10, 10, 10), np.eye(4)), atlas)
    friends = root / "stimuli" / "movies" / "friends"
    for episode in [*RUNS, "s07e01a"]:
        (friends / _season_dir(episode)).mkdir(parents=True, exist_ok=True)
        shutil.copy(soundtracks[episode], friends / _season_dir(episode) / f"friends_{episode}.mkv")
    movie10 = root / "stimuli" / "movies" / "movie10" / "bourne"
    movie10.mkdir(parents=True)
    shutil.copy(soundtracks["bourne01"], movie10 / "bourne01.mkv")
    transcripts = root / "stimuli" / "transcripts" / "friends" / "s1"
    transcripts.mkdir(parents=True)
    (transcripts / "friends_s01e01a.tsv").write_text("text_per_tr\twords_per_tr\nhi\t['hi']\n")
    return runs


BOLD_SHAPE = (18, 21, 18)
BOLD_AFFINE = np.array([[2.0, 0, 0, -18], [0, 2.0, 0, -22], [0, 0, 2.0, -16], [0, 0, 0, 1]])
ATLAS_SHAPE = (12, 14, 12)  # 3 mm, as the study's MIST atlas (53x64x52) beside 2 mm BOLD
ATLAS_AFFINE = np.array([[3.0, 0, 0, -19.5], [0, 3.0, 0, -22.5], [0, 0, 3.0, -16.5], [0, 0, 0, 1]])
N_PARCELS = 8


def _world(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _ellipsoid(shape: tuple[int, ...], affine: np.ndarray, radii=(15.0, 18.0, 14.0)) -> np.ndarray:
    xyz = _world(shape, affine)
    return ((xyz / np.array(radii)) ** 2).sum(axis=-1) <= 1


def mist_like_atlas() -> np.ndarray:
    """8 parcels (octants of a brain-shaped ellipsoid) on the 3 mm grid, 0 outside."""
    xyz = _world(ATLAS_SHAPE, ATLAS_AFFINE)
    labels = 1 + (xyz[..., 0] > 0) + 2 * (xyz[..., 1] > 0) + 4 * (xyz[..., 2] > 0)
    return np.where(_ellipsoid(ATLAS_SHAPE, ATLAS_AFFINE), labels, 0).astype(np.int16)


def stg_like_mask() -> np.ndarray:
    xyz = _world(ATLAS_SHAPE, ATLAS_AFFINE)
    near = np.linalg.norm(xyz - np.array([9.0, -4.0, 0.0]), axis=-1) <= 5.0
    return near.astype(np.uint8)


def _confounds(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """fMRIPrep's confounds table with its real column names; derivatives start with n/a."""
    columns: dict[str, np.ndarray] = {}
    bases = ["global_signal", "csf", "white_matter", "csf_wm",
             "trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    for base in bases:
        x = np.cumsum(rng.standard_normal(n)) * (0.05 if base.startswith(("trans", "rot")) else 1.0)
        derivative = np.r_[np.nan, np.diff(x)]
        columns.update({base: x, f"{base}_derivative1": derivative, f"{base}_power2": x ** 2,
                        f"{base}_derivative1_power2": derivative ** 2})
    columns["std_dvars"] = np.r_[np.nan, rng.random(n - 1) + 0.5]
    columns["dvars"] = np.r_[np.nan, rng.random(n - 1) * 20]
    columns["framewise_displacement"] = np.r_[np.nan, rng.random(n - 1) * 0.2]
    columns["rmsd"] = np.r_[np.nan, rng.random(n - 1) * 0.1]
    for k in range(5):
        columns[f"a_comp_cor_{k:02d}"] = rng.standard_normal(n)
    for k in range(3):  # fMRIPrep's discrete cosine basis (128 s high-pass)
        columns[f"cosine{k:02d}"] = np.sqrt(2 / n) * np.cos(np.pi * (np.arange(n) + 0.5) * (k + 1) / n)
    columns["non_steady_state_outlier00"] = np.r_[1.0, np.zeros(n - 1)]
    return pd.DataFrame(columns)


def _write_run(func: Path, prefix: str, n: int, rng: np.random.Generator, brain: np.ndarray) -> None:
    confounds = _confounds(n, rng)
    confounds.to_csv(func / f"{prefix}_desc-confounds_timeseries.tsv", sep="\t", index=False, na_rep="n/a")
    (func / f"{prefix}_desc-confounds_timeseries.json").write_text(json.dumps({"cosine00": {"Method": "DCT"}}))
    parcels = rng.standard_normal((N_PARCELS, n))
    labels = nib.processing.resample_from_to(
        nib.Nifti1Image(mist_like_atlas(), ATLAS_AFFINE), (BOLD_SHAPE, BOLD_AFFINE), order=0).get_fdata()
    data = np.where(brain[..., None], 1000.0, 0.0) + rng.standard_normal((*BOLD_SHAPE, n))
    for label in range(1, N_PARCELS + 1):
        data[labels == label] += 10 * parcels[label - 1]
    data[brain] += 200 * confounds["trans_x"].to_numpy()  # head motion, removed by the confounds
    img = nib.Nifti1Image(data.astype(np.float32), BOLD_AFFINE)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((2.0, 2.0, 2.0, TR))
    stem = f"{prefix}_space-{SPACE}"
    nib.save(img, func / f"{stem}_desc-preproc_bold.nii.gz")
    (func / f"{stem}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": TR, "TaskName": prefix}))
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), BOLD_AFFINE), func / f"{stem}_desc-brain_mask.nii.gz")


def build_fmriprep(root: Path) -> None:
    """``friends.fmriprep`` for sub-01: MNI runs fetched, T1w siblings and season 5 not fetched."""
    rng = np.random.default_rng(2)
    brain = _ellipsoid(BOLD_SHAPE, BOLD_AFFINE, radii=(17.0, 21.0, 17.0))
    runs = [(episode, session) for episode, (session, *_r) in RUNS.items()]
    runs += [(episode, session) for episode, session in REPEATED.items()]
    for episode, session in runs:
        func = root / "sub-01" / f"ses-{session}" / "func"
        func.mkdir(parents=True, exist_ok=True)
        prefix = f"sub-01_ses-{session}_task-{episode}"
        _write_run(func, prefix, n_volumes(episode) + (session in REPEATED.values()), rng, brain)
        for name in ("space-T1w_desc-preproc_bold.nii.gz", "space-T1w_desc-brain_mask.nii.gz",
                     "space-T1w_boldref.nii.gz", "hemi-L_space-fsaverage5_bold.func.gii"):
            annex_link(func / f"{prefix}_{name}", root)
    func = root / "sub-01" / "ses-007" / "func"  # a later season nobody fetched
    for name in (f"space-{SPACE}_desc-preproc_bold.nii.gz", f"space-{SPACE}_desc-brain_mask.nii.gz",
                 "desc-confounds_timeseries.tsv"):
        annex_link(func / f"sub-01_ses-007_task-s05e01a_{name}", root)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "fMRIPrep - fMRI PREProcessing workflow",
                                                               "BIDSVersion": "1.4.0", "DatasetType": "derivative"}))


def build_stimuli(root: Path, soundtracks: dict[str, Path]) -> None:
    """``friends.stimuli``: season folders of halves, full episodes beside them."""
    for episode in [*RUNS, "s01e01"]:
        (root / _season_dir(episode)).mkdir(parents=True, exist_ok=True)
        shutil.copy(soundtracks[episode], root / _season_dir(episode) / f"friends_{episode}.mkv")
    annex_link(root / "s5" / "friends_s05e01a.mkv", root)


@pytest.fixture(scope="module")
def algonauts(tmp_path_factory, soundtracks) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("clone") / "algonauts_2025.competitors"
    return root, build_algonauts(root, soundtracks, movie10_fetched=False)


@pytest.fixture(scope="module")
def cneuromod(tmp_path_factory, soundtracks) -> Path:
    """A working folder as the user has it: the two datasets, the atlas and mask at the
    shipped config's place (data/atlases/)."""
    work = tmp_path_factory.mktemp("cneuromod")
    build_fmriprep(work / "friends.fmriprep")
    build_stimuli(work / "friends.stimuli", soundtracks)
    atlases = work / "data" / "atlases"
    atlases.mkdir(parents=True)
    nib.save(nib.Nifti1Image(mist_like_atlas(), ATLAS_AFFINE), atlases / "MIST_ROI.nii.gz")
    nib.save(nib.Nifti1Image(stg_like_mask(), ATLAS_AFFINE), atlases / "STG_mask.nii.gz")
    return work


def algonauts_config(root: Path, cache: Path, *more: str):
    return load_config(REPO / "configs" / "friends_sub01.toml", [
        f"data.root={root / 'fmri'}", f"data.stimuli={root / 'stimuli' / 'movies' / 'friends'}",
        f"data.cache_dir={cache}", WINDOW, *more])


def cneuromod_config(work: Path, cache: Path, *more: str, config: str = "cneuromod_sub01.toml"):
    return load_config(REPO / "configs" / config, [
        f"data.root={work / 'friends.fmriprep'}", f"data.stimuli={work / 'friends.stimuli'}",
        f"data.atlas={work / 'data' / 'atlases' / 'MIST_ROI.nii.gz'}" if config == "cneuromod_sub01.toml"
        else f"data.mask={work / 'data' / 'atlases' / 'STG_mask.nii.gz'}",
        f"data.cache_dir={cache}", WINDOW, *more])


# ---- Algonauts --------------------------------------------------------------------------------


@pytest.mark.parametrize("movie10_fetched", [False, True])
def test_the_friends_file_is_chosen_by_its_bids_entities(tmp_path, soundtracks, movie10_fetched):
    root = tmp_path / "algonauts_2025.competitors"
    runs = build_algonauts(root, soundtracks, movie10_fetched=movie10_fetched)
    assert (root / "fmri" / "sub-01" / "func" / MOVIE10_H5).exists() == movie10_fetched
    assert find_algonauts_h5(root / "fmri", "sub-01") == root / "fmri" / "sub-01" / "func" / FRIENDS_H5
    plan = plan_data(algonauts_config(root, tmp_path / "cache"))
    brain = plan.brains["sub-01"]
    assert brain.episodes == list(RUNS) and brain.n_targets == 1000
    for episode, array in runs.items():  # the first session of the repeated run
        np.testing.assert_array_equal(brain.runs[episode], array)


def test_an_explicit_file_and_several_candidates(tmp_path, algonauts):
    root, _ = algonauts
    func = root / "fmri" / "sub-01" / "func"
    other = tmp_path / "sub-01_task-friends_desc-other_bold.h5"
    with h5py.File(other, "w") as handle:
        for episode in RUNS:
            handle[f"ses-001_task-{episode}"] = np.full((n_volumes(episode), 3), 0.5, np.float32)
    explicit = f"data.brain_file={tmp_path}/{{subject}}_task-friends_desc-other_bold.h5"
    assert plan_data(algonauts_config(root, tmp_path / "cache", explicit)).brains["sub-01"].n_targets == 3
    twin = tmp_path / "twin"
    shutil.copytree(root / "fmri", twin, symlinks=True)
    shutil.copy(other, twin / "sub-01" / "func" / other.name)
    with pytest.raises(DataError, match="several HDF5 files for sub-01 and task-friends.*set data.brain_file"):
        find_algonauts_h5(twin, "sub-01")
    only_movie10 = tmp_path / "movie10_only"
    (only_movie10 / "sub-01" / "func").mkdir(parents=True)
    shutil.copy(func / MOVIE10_H5, only_movie10 / "sub-01" / "func", follow_symlinks=False)
    with pytest.raises(DataError, match=r"no HDF5 file for sub-01 and task-friends .*found: sub-01/func/"
                                        r"sub-01_task-movie10"):
        find_algonauts_h5(only_movie10, "sub-01")


def test_an_unfetched_friends_file_says_datalad_get_before_any_decoding(tmp_path, soundtracks, monkeypatch):
    root = tmp_path / "algonauts_2025.competitors"
    build_algonauts(root, soundtracks, movie10_fetched=False)
    friends = root / "fmri" / "sub-01" / "func" / FRIENDS_H5
    friends.unlink()
    annex_link(friends, root)
    monkeypatch.setattr("training.data.stimuli.decode_audio", _no_decoding)
    with pytest.raises(DataError, match=rf"{friends}: HDF5 file not fetched .*: datalad get {friends}$"):
        prepare_data(algonauts_config(root, tmp_path / "cache"))


def _no_decoding(*args, **kwargs):
    raise AssertionError("a soundtrack was decoded before the brain data were checked")


def test_brain_data_are_read_and_checked_before_decoding(tmp_path, algonauts, monkeypatch):
    root, _ = algonauts
    monkeypatch.setattr("training.data.stimuli.decode_audio", _no_decoding)
    with pytest.raises(DataError, match="no such folder"):
        prepare_data(algonauts_config(root, tmp_path / "cache", f"data.root={tmp_path / 'wrong'}"))
    broken = tmp_path / "nan.h5"  # a bad run in the test season, the last one a reader would reach
    with h5py.File(root / "fmri" / "sub-01" / "func" / FRIENDS_H5, "r") as source, h5py.File(broken, "w") as handle:
        for name in source:
            handle[name] = source[name][()]
        handle["ses-005_task-s04e01a"][3, 7] = np.nan
    with pytest.raises(DataError, match="'ses-005_task-s04e01a' contains NaN"):
        prepare_data(algonauts_config(root, tmp_path / "cache", f"data.brain_file={broken}"))
    assert not (tmp_path / "cache" / "audio").exists() or not any((tmp_path / "cache" / "audio").iterdir())


def test_stimuli_other_films_transcripts_and_season_7_are_never_decoded(tmp_path, algonauts, caplog):
    root, runs = algonauts
    found = find_stimuli(root / "stimuli")  # even from the release's whole stimuli/ folder
    assert sorted(found) == sorted([*RUNS, "s07e01a"])
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="training.data.fmri"):
        prepare_data(algonauts_config(root, cache, f"data.stimuli={root / 'stimuli'}"))
    decoded = sorted(path.name.split("_")[0] for path in (cache / "audio").glob("*.npy"))
    assert decoded == sorted(RUNS)  # not s07e01a (no fMRI), not Movie10
    (line,) = [r.getMessage() for r in caplog.records if "several sessions" in r.getMessage()]
    assert "s01e02a (using 'ses-002_task-s01e02a', ignoring 'ses-006_task-s01e02a')" in line


def test_the_prepared_plan_is_not_read_twice(tmp_path, algonauts, monkeypatch):
    root, _ = algonauts
    config = algonauts_config(root, tmp_path / "cache")
    plan = prepare_data(config)

    def read_again(*args, **kwargs):
        raise AssertionError("the brain data were read a second time")

    monkeypatch.setattr("training.data.loading.read_subject", read_again)
    splits = load_splits(config, plan)
    assert splits.split == plan.split and len(splits.train) + len(splits.validation) == len(plan.used) - 1


def test_pairing_keeps_every_volume_of_runs_shorter_than_their_audio(tmp_path, algonauts):
    root, runs = algonauts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_splits(algonauts_config(root, tmp_path / "cache"))
    assert not [w for w in caught if "trimming" in str(w.message)]
    episodes = {e.name: e for e in splits.train + splits.validation + splits.test}
    assert sorted(episodes) == sorted(RUNS)
    for name, episode in episodes.items():
        np.testing.assert_array_equal(episode.targets["sub-01"], runs[name])
        audio_trs = len(episode.waveform) / 22050 / TR
        assert 1 <= audio_trs - n_volumes(name) < 4.1, name  # the run is 1-3 TRs shorter
    # validation by whole episode: the halves of an episode are on one side
    assert splits.split.test == ("s04e01a",)
    train_ids = {e[:-1] for e in splits.split.train}
    assert train_ids.isdisjoint(e[:-1] for e in splits.split.validation) and len(splits.split.validation) >= 1


def test_an_episode_too_short_for_a_window_is_skipped_with_a_warning(tmp_path, algonauts):
    from training.train import build_model

    root, _ = algonauts
    config = algonauts_config(root, tmp_path / "cache", "model.condition=head")
    splits = load_splits(config)
    model, _ = build_model(config, {"sub-01": 1000})
    episodes = splits.train + splits.validation
    with pytest.warns(UserWarning, match=r"1 episode\(s\) too short for one window .*s02e01b \(5 TRs\)"):
        kept = EpisodeSet("all", episodes, model, TR, 8)
    assert [e.name for e in kept.episodes] == [e.name for e in episodes if e.name != "s02e01b"]


def test_algonauts_shipped_config_trains_and_exports(tmp_path, algonauts):
    root, _ = algonauts
    work = tmp_path / "work"
    work.mkdir()
    done = run_cli(["-m", "training.train", str(REPO / "configs" / "friends_sub01.toml"),
                    "--set", f"data.root={root / 'fmri'}",
                    "--set", f"data.stimuli={root / 'stimuli' / 'movies' / 'friends'}",
                    "--set", "train.max_epochs=1", "--set", WINDOW], work)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    run_dir = Path(summary["run_dir"]) if Path(summary["run_dir"]).is_absolute() else work / summary["run_dir"]
    assert run_dir == work / "runs" / "friends_conv4_sub-01"
    assert "s02e01b (5 TRs)" in done.stderr  # skipped with a warning, not an abort
    data = json.loads((run_dir / "data.json").read_text())
    assert data["split"]["test"] == ["s04e01a"] and data["n_targets"] == {"sub-01": 1000}
    decoded = sorted(p.name.split("_")[0] for p in (work / "data" / "cache" / "algonauts" / "audio").glob("*.npy"))
    assert decoded == sorted(RUNS)
    _export_and_load(run_dir, work)


def _export_and_load(run_dir: Path, work: Path) -> None:
    import hear_brainsoundnet

    done = run_cli(["-m", "training.publish", "export", str(run_dir), str(work / "exported")], work)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = json.loads(done.stdout)["checkpoint"]
    model = hear_brainsoundnet.load_model(checkpoint)
    assert model.sample_rate == 22050 and model.scene_embedding_size > 0


# ---- CNeuroMod fMRIPrep -----------------------------------------------------------------------


def test_fmriprep_atlas_on_another_grid_is_resampled_with_one_log_line(tmp_path, cneuromod, caplog):
    with caplog.at_level(logging.INFO, logger="training.data.fmri"), \
            pytest.warns(UserWarning, match=r"1 run\(s\) too short for the confounds are skipped: "
                                            r"sub-01_ses-003_task-s02e01b_.*5 volumes, 30 confound regressors"):
        plan = plan_data(cneuromod_config(cneuromod, tmp_path / "cache"))
    brain = plan.brains["sub-01"]
    assert brain.target_names == [f"label-{k}" for k in range(1, N_PARCELS + 1)]
    long_runs = [e for e in RUNS if e != "s02e01b"]  # 5 volumes cannot take 30 regressors
    assert brain.episodes == long_runs and all(brain.runs[e].shape[0] == n_volumes(e) for e in long_runs)
    lines = [r.getMessage() for r in caplog.records if "resampled to the BOLD grid" in r.getMessage()]
    assert len(lines) == 1
    assert "MIST_ROI.nii.gz" in lines[0] and "12x14x12, 3 mm" in lines[0] and "18x21x18, 2 mm" in lines[0]
    (line,) = [r.getMessage() for r in caplog.records if "several sessions" in r.getMessage()]
    assert "s01e02a (using 002, ignoring 006)" in line
    refused = cneuromod_config(cneuromod, tmp_path / "cache2", "data.resample_atlas=false")
    with pytest.raises(DataError, match="atlas does not match the BOLD image"):
        plan_data(refused)


@pytest.mark.filterwarnings("ignore:sub-01. 1 run.s. too short for the confounds:UserWarning")
def test_fmriprep_extraction_settings_come_from_the_config(tmp_path, cneuromod):
    """The study's settings (8 mm, cosine + 24 motion + WM + CSF, z-score) against others."""
    def run(*more: str) -> np.ndarray:
        brain = plan_data(cneuromod_config(cneuromod, tmp_path / "cache", *more)).brains["sub-01"]
        return brain.runs["s01e01a"]

    confounds = pd.read_csv(next((cneuromod / "friends.fmriprep").rglob("*task-s01e01a_desc-confounds_timeseries.tsv")),
                            sep="\t", na_values="n/a")
    motion = confounds["trans_x"].to_numpy()

    def motion_r(x: np.ndarray) -> float:
        return float(np.max(np.abs([np.corrcoef(motion, column)[0, 1] for column in x.T])))

    study = run()
    assert motion_r(study) < 1e-3  # regressed out
    np.testing.assert_allclose(study.std(axis=0, ddof=1), 1.0, atol=1e-4)  # z-scored per run
    assert motion_r(run("data.confounds=[]")) > 0.5
    assert not np.allclose(run("data.smoothing_fwhm=0"), study, atol=1e-2)
    raw = run("data.standardize=none", "data.confounds=[]", "data.smoothing_fwhm=0")
    assert raw.mean() > 500  # the BOLD baseline (1000 in the brain), not z-scores
    assert motion_r(run("data.confounds=['high_pass', 'motion']", "data.confounds_motion=basic")) < 1e-3


@pytest.mark.filterwarnings("ignore:sub-01. 1 run.s. too short for the confounds:UserWarning")
def test_fmriprep_voxel_mask_on_another_grid(tmp_path, cneuromod):
    plan = plan_data(cneuromod_config(cneuromod, tmp_path / "cache", config="cneuromod_sub01_stg.toml"))
    brain = plan.brains["sub-01"]
    mask = nib.Nifti1Image(stg_like_mask(), ATLAS_AFFINE)
    resampled = nib.processing.resample_from_to(mask, (BOLD_SHAPE, BOLD_AFFINE), order=0).get_fdata()
    assert brain.n_targets == int((resampled > 0).sum()) > 10  # every 2 mm voxel of the 3 mm mask


@pytest.mark.filterwarnings("ignore:sub-01. 1 run.s. too short for the confounds:UserWarning")
def test_fmriprep_needed_run_not_fetched_says_datalad_get(tmp_path, cneuromod):
    # seasons 1-4 never touch the unfetched season-5 run; asking for season 5 does
    config = cneuromod_config(cneuromod, tmp_path / "cache", "data.test_seasons=[5]")
    with pytest.raises(DataError, match=r"s05e01a_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz: BOLD image "
                                        r"file not fetched .*: datalad get .*ses-007"):
        plan_data(config)


def test_full_episode_files_are_never_episodes(tmp_path, cneuromod, caplog):
    stimuli = cneuromod / "friends.stimuli"
    with caplog.at_level(logging.INFO, logger="training.data.stimuli"):
        cache = StimulusCache(stimuli, tmp_path / "audio")
    assert "s01e01" not in cache.episodes() and set(RUNS) <= set(cache.episodes())
    assert any("friends_s01e01.mkv" in r.getMessage() for r in caplog.records)
    assert list(cache.unfetched) == ["s05e01a"]
    with pytest.raises(DataError, match=r"friends_s05e01a.mkv: stimulus of s05e01a not fetched: datalad get"):
        cache.path("s05e01a")


def test_cneuromod_shipped_config_trains_with_two_paths_and_exports(cneuromod):
    """From the folder holding data/atlases/, as the config's comment says: two paths set."""
    done = run_cli(["-m", "training.train", str(REPO / "configs" / "cneuromod_sub01.toml"),
                    "--set", f"data.root={cneuromod / 'friends.fmriprep'}",
                    "--set", f"data.stimuli={cneuromod / 'friends.stimuli'}",
                    "--set", "train.max_epochs=1", "--set", WINDOW], cneuromod)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = cneuromod / "runs" / "cneuromod_mist_conv4_sub-01"
    data = json.loads((run_dir / "data.json").read_text())
    assert data["n_targets"] == {"sub-01": N_PARCELS} and data["split"]["test"] == ["s04e01a"]
    assert "MIST_ROI.nii.gz: atlas on another grid" in (run_dir / "train.log").read_text()
    decoded = sorted(p.name.split("_")[0] for p in (cneuromod / "data" / "cache" / "cneuromod" / "audio").glob("*.npy"))
    # not the full episode, not the unfetched season 5, not the run skipped for its confounds
    assert decoded == sorted(e for e in RUNS if e != "s02e01b")
    _export_and_load(run_dir, cneuromod)
