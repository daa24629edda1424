"""Tests of training.data.fmri: the fMRIPrep masker (nilearn), Algonauts HDF5 and array-cache readers."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tests.fixtures_data import bold_path, copy_runs, tiny_dataset  # noqa: F401  (session fixture)
from training.data import (
    BrainRuns,
    DataError,
    FmriprepMasker,
    find_fmriprep_runs,
    read_algonauts_h5,
    read_fmriprep,
    read_npz_cache,
    write_npz_cache,
)
from training.data.fmri import fmriprep as fmriprep_module

# float32 voxels around 1000 limit the agreement of the two layouts to about 1e-4 after
# z-scoring; reading without confounds misses by about 1 (see test_confounds_are_applied).
TOLERANCE = 1e-3


@pytest.mark.parametrize("subject", ["sub-01", "sub-02"])
def test_nifti_and_hdf5_give_the_same_targets(tiny_dataset, subject):
    ds = tiny_dataset
    nifti = read_fmriprep(ds.fmriprep_dir, subject, atlas=ds.atlas, atlas_labels=ds.atlas_labels)
    h5 = read_algonauts_h5(ds.h5_path(subject))
    assert nifti.subject == h5.subject == subject
    assert nifti.tr == pytest.approx(1.49) and h5.tr == pytest.approx(1.49)
    assert nifti.episodes == h5.episodes == list(ds.runs[subject])
    assert nifti.target_names == list(ds.target_names)
    assert h5.target_names[0] == "parcel-0001" and h5.n_targets == nifti.n_targets
    assert nifti.sessions == h5.sessions
    for episode in nifti.episodes:
        assert nifti.runs[episode].dtype == np.float32
        np.testing.assert_allclose(nifti.runs[episode], h5.runs[episode], atol=TOLERANCE)
        # z-scored per run, as the study did
        np.testing.assert_allclose(nifti.runs[episode].std(axis=0, ddof=1), 1.0, atol=1e-4)


def test_confounds_are_applied(tiny_dataset):
    ds = tiny_dataset
    raw = read_fmriprep(ds.fmriprep_dir, "sub-01", atlas=ds.atlas, confounds=False, episodes=["s02e01a"])
    h5 = read_algonauts_h5(ds.h5_path("sub-01"), episodes=["s02e01a"])
    assert raw.episodes == ["s02e01a"] and raw.target_names[0] == "label-1"
    assert np.abs(raw.runs["s02e01a"] - h5.runs["s02e01a"]).max() > 0.5


def test_voxel_mask_reader_matches_the_parcels(tiny_dataset):
    """NiftiMasker voxels, averaged per parcel, give the HDF5 parcel series back."""
    ds = tiny_dataset
    voxels = read_fmriprep(ds.fmriprep_dir, "sub-01", mask=ds.voxel_mask, standardize=False)
    mask = np.asarray(nib.load(ds.voxel_mask).dataobj)
    labels = np.asarray(nib.load(ds.atlas).dataobj)
    assert voxels.n_targets == int(mask.sum())
    ijk = np.array([[int(v) for v in name.split("-")[1:]] for name in voxels.target_names])
    assert np.all(mask[tuple(ijk.T)] == 1)
    parcel_of_voxel = labels[tuple(ijk.T)]
    h5 = ds.read_h5("sub-01")
    for episode in voxels.episodes:
        for label in np.unique(parcel_of_voxel):
            mean = voxels.runs[episode][:, parcel_of_voxel == label].astype(np.float64).mean(axis=1)
            z = (mean - mean.mean()) / mean.std(ddof=1)
            np.testing.assert_allclose(z, h5.runs[episode][:, label - 1], atol=TOLERANCE)


def test_the_masker_fits_once_and_transforms_each_run_as_read_fmriprep_does(tiny_dataset):
    ds = tiny_dataset
    brain = read_fmriprep(ds.fmriprep_dir, "sub-01", atlas=ds.atlas, episodes=["s01e01a", "s02e01a"])
    runs = find_fmriprep_runs(ds.fmriprep_dir, "sub-01")
    masker = FmriprepMasker(atlas=ds.atlas)
    with pytest.raises(RuntimeError, match="before fit"):
        masker.transform(runs["s01e01a"])
    assert masker.fit([runs["s01e01a"], runs["s02e01a"]], tr=1.49) is masker
    assert masker.tr_ == 1.49 and masker.target_names_ == brain.target_names
    for episode in brain.episodes:
        np.testing.assert_array_equal(masker.transform(runs[episode]), brain.runs[episode])
    with pytest.raises(DataError, match="inconsistent with the expected tr"):
        FmriprepMasker(atlas=ds.atlas).fit([runs["s01e01a"]], tr=2.0)
    with pytest.raises(ValueError, match="exactly one of atlas"):
        FmriprepMasker()


def test_extraction_is_cached(tiny_dataset, tmp_path, monkeypatch):
    ds = tiny_dataset
    kwargs = {"atlas": ds.atlas, "episodes": ["s01e01a", "s03e01b"], "cache_dir": tmp_path / "cache"}
    first = read_fmriprep(ds.fmriprep_dir, "sub-01", **kwargs)
    files = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]

    def no_extraction(*args, **kwargs):
        raise AssertionError("extraction ran again although cached")

    monkeypatch.setattr(fmriprep_module, "_extract_run", no_extraction)
    second = read_fmriprep(ds.fmriprep_dir, "sub-01", **kwargs)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    for episode in first.episodes:
        np.testing.assert_array_equal(first.runs[episode], second.runs[episode])
    # another parameter is another key: extraction runs (and here fails loudly)
    with pytest.raises(AssertionError, match="extraction ran again"):
        read_fmriprep(ds.fmriprep_dir, "sub-01", smoothing_fwhm=6.0, **kwargs)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_atlas_on_another_grid_is_resampled_by_default_or_refused(tiny_dataset, tmp_path, caplog):
    ds = tiny_dataset
    atlas = nib.load(ds.atlas)
    data = np.asarray(atlas.dataobj)
    cropped = tmp_path / "cropped_dseg.nii.gz"
    nib.save(nib.Nifti1Image(data[:-1], atlas.affine), cropped)
    with pytest.raises(DataError, match="does not match the BOLD") as error:
        read_fmriprep(ds.fmriprep_dir, "sub-01", atlas=cropped, resample_atlas=False)
    assert str(cropped) in str(error.value) and "desc-preproc_bold" in str(error.value)

    shifted_affine = atlas.affine.copy()
    shifted_affine[0, 3] += 4.0
    shifted = tmp_path / "shifted_dseg.nii.gz"
    nib.save(nib.Nifti1Image(data, shifted_affine), shifted)
    with pytest.raises(DataError, match="affine") as error:
        read_fmriprep(ds.fmriprep_dir, "sub-01", atlas=shifted, resample_atlas=False)
    assert str(shifted) in str(error.value)
    # by default nilearn resamples it (nearest neighbour), with one log line
    with caplog.at_level("INFO", logger="training.data.fmri"):
        resampled = read_fmriprep(ds.fmriprep_dir, "sub-01", atlas=shifted, episodes=["s01e01a"])
    lines = [r.getMessage() for r in caplog.records if "resampled to the BOLD grid" in r.getMessage()]
    assert len(lines) == 1 and str(shifted) in lines[0] and "nearest neighbour" in lines[0]
    assert resampled.runs["s01e01a"].shape[0] > 0 and np.isfinite(resampled.runs["s01e01a"]).all()
    # a shift of 4 mm moves labels but keeps their values: every region still has a column
    same = read_fmriprep(ds.fmriprep_dir, "sub-01", atlas=ds.atlas, episodes=["s01e01a"])
    assert resampled.target_names == same.target_names


def test_truncated_nifti_is_an_error_naming_it(tiny_dataset, tmp_path):
    derivatives = copy_runs(tiny_dataset, "sub-01", ["s01e01a", "s01e01b"], tmp_path / "deriv")
    bold = bold_path(derivatives, "sub-01", "s01e01b")
    with open(bold, "r+b") as handle:
        handle.truncate(os.path.getsize(bold) // 2)
    with pytest.raises(DataError, match="truncated or corrupt") as error:
        read_fmriprep(derivatives, "sub-01", atlas=tiny_dataset.atlas)
    assert str(bold) in str(error.value)


def test_inconsistent_trs_are_an_error(tiny_dataset, tmp_path):
    derivatives = copy_runs(tiny_dataset, "sub-01", ["s01e01a", "s01e01b"], tmp_path / "deriv")
    bold = bold_path(derivatives, "sub-01", "s01e01b")
    img = nib.load(bold)
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
    img.header.set_zooms(img.header.get_zooms()[:3] + (2.0,))
    nib.save(img, bold)
    # the header now disagrees with the sidecar
    with pytest.raises(DataError, match="header says TR = 2 s") as error:
        read_fmriprep(derivatives, "sub-01", atlas=tiny_dataset.atlas)
    assert str(bold) in str(error.value)
    sidecar = bold.with_name(bold.name.replace(".nii.gz", ".json"))
    sidecar.write_text(json.dumps({"RepetitionTime": 2.0}))
    # header and sidecar agree, but the run differs from the other runs
    with pytest.raises(DataError, match="inconsistent") as error:
        read_fmriprep(derivatives, "sub-01", atlas=tiny_dataset.atlas)
    assert str(bold) in str(error.value) and "2 s" in str(error.value) and "1.49 s" in str(error.value)
    with pytest.raises(DataError, match="expected tr"):
        read_fmriprep(derivatives, "sub-01", atlas=tiny_dataset.atlas, tr=1.49, episodes=["s01e01b"])


@pytest.mark.parametrize("target", ["atlas", "mask"])
def test_nan_in_bold_is_an_error(tiny_dataset, tmp_path, target):
    ds = tiny_dataset
    derivatives = copy_runs(ds, "sub-01", ["s02e01a"], tmp_path / "deriv")
    bold = bold_path(derivatives, "sub-01", "s02e01a")
    img = nib.load(bold)
    data = np.asarray(img.dataobj).copy()
    mask = np.asarray(nib.load(ds.voxel_mask).dataobj) > 0
    data[mask, 5] = np.nan  # inside the mask and inside auditory parcels
    data[0, 0, 0, :] = np.nan  # outside the brain: harmless on its own
    nib.save(nib.Nifti1Image(data, img.affine, img.header), bold)
    kwargs = {"atlas": ds.atlas} if target == "atlas" else {"mask": ds.voxel_mask}
    with pytest.raises(DataError, match="NaN") as error:
        read_fmriprep(derivatives, "sub-01", **kwargs)
    assert str(bold) in str(error.value)
    # NaNs only outside the targets do not matter
    data[mask, 5] = 1000.0
    nib.save(nib.Nifti1Image(data, img.affine, img.header), bold)
    assert np.isfinite(read_fmriprep(derivatives, "sub-01", **kwargs).runs["s02e01a"]).all()


@pytest.mark.parametrize("which", ["mask", "confounds"])
def test_missing_mask_or_confounds_is_an_error(tiny_dataset, tmp_path, which):
    derivatives = copy_runs(tiny_dataset, "sub-01", ["s02e01b"], tmp_path / "deriv")
    pattern = "*desc-brain_mask.nii.gz" if which == "mask" else "*desc-confounds_timeseries.tsv"
    (missing,) = derivatives.rglob(pattern)
    missing.unlink()
    with pytest.raises(DataError, match="not found") as error:
        read_fmriprep(derivatives, "sub-01", atlas=tiny_dataset.atlas)
    assert str(missing) in str(error.value)


def test_censored_volumes_keep_the_time_axis(tiny_dataset, tmp_path):
    """Non-steady-state volumes become spike regressors: row i stays volume i."""
    derivatives = copy_runs(tiny_dataset, "sub-01", ["s02e01b"], tmp_path / "deriv")
    (tsv,) = derivatives.rglob("*desc-confounds_timeseries.tsv")
    frame = pd.read_csv(tsv, sep="\t")
    frame["non_steady_state_outlier00"] = 0.0
    frame.loc[0, "non_steady_state_outlier00"] = 1.0
    frame.to_csv(tsv, sep="\t", index=False, na_rep="n/a")
    brain = read_fmriprep(derivatives, "sub-01", atlas=tiny_dataset.atlas)
    reference = read_algonauts_h5(tiny_dataset.h5_path("sub-01"), episodes=["s02e01b"])
    assert brain.runs["s02e01b"].shape == reference.runs["s02e01b"].shape
    # the censored volume is fitted exactly by its spike: it sits at the run's mean
    assert np.allclose(brain.runs["s02e01b"][0], brain.runs["s02e01b"][0, 0], atol=0.5)


def test_other_usage_errors(tiny_dataset, tmp_path):
    ds = tiny_dataset
    with pytest.raises(ValueError, match="exactly one"):
        read_fmriprep(ds.fmriprep_dir, "sub-01", atlas=ds.atlas, mask=ds.voxel_mask)
    with pytest.raises(DataError, match="no such subject folder"):
        read_fmriprep(ds.fmriprep_dir, "sub-09", atlas=ds.atlas)
    with pytest.raises(DataError, match="no '\\*_space-MNI152NLin6Asym"):
        read_fmriprep(ds.fmriprep_dir, "01", atlas=ds.atlas, space="MNI152NLin6Asym")
    with pytest.raises(DataError, match="atlas file not found"):
        read_fmriprep(ds.fmriprep_dir, "sub-01", atlas=tmp_path / "nope.nii.gz")
    with pytest.raises(DataError, match="10 labels in the image but 2 names"):
        read_fmriprep(ds.fmriprep_dir, "sub-01", atlas=ds.atlas, atlas_labels=["a", "b"])


def test_algonauts_reader_names_and_errors(tmp_path, caplog):
    path = tmp_path / "sub-03_task-friends_space-MNI152NLin2009cAsym_atlas-X_desc-s1_bold.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as handle:
        handle["ses-010_task-s01e10a"] = rng.standard_normal((30, 4))
        handle["ses-009_task-s01e10a"] = rng.standard_normal((31, 4))  # session 9 comes first
        handle["ses-001_task-s01e02b"] = rng.standard_normal((20, 4))
        handle["ses-005_task-s01e02b"] = rng.standard_normal((21, 4))  # repeated viewing
    with caplog.at_level("INFO", logger="training.data.fmri"):
        brain = read_algonauts_h5(path)
    assert brain.subject == "sub-03" and brain.episodes == ["s01e02b", "s01e10a"]
    assert brain.runs["s01e02b"].shape == (20, 4) and brain.sessions["s01e02b"] == "001"
    assert brain.runs["s01e10a"].shape == (31, 4) and brain.sessions["s01e10a"] == "009"
    (line,) = [r.getMessage() for r in caplog.records if "several sessions" in r.getMessage()]
    assert "2 episode(s)" in line and "using the first session" in line
    assert "s01e02b (using 'ses-001_task-s01e02b', ignoring 'ses-005_task-s01e02b')" in line

    with h5py.File(path, "a") as handle:
        handle["movie_s01e03a"] = rng.standard_normal((20, 4))
    with pytest.raises(DataError, match="'movie_s01e03a' is not named") as error:
        read_algonauts_h5(path)
    assert str(path) in str(error.value)

    nan_file = tmp_path / "sub-04_bold.h5"
    with h5py.File(nan_file, "w") as handle:
        handle["ses-001_task-s01e01a"] = np.full((5, 2), np.nan)
    with pytest.raises(DataError, match="'ses-001_task-s01e01a' contains NaN"):
        read_algonauts_h5(nan_file)


def test_algonauts_file_found_by_bids_entities_and_unfetched_links(tmp_path):
    """fmri/sub-01/func/ of the Algonauts 2025 release: Friends beside Movie10 files."""
    from tests.fixtures_data import annex_link
    from training.data import bids_entities, find_algonauts_h5

    func = tmp_path / "fmri" / "sub-01" / "func"
    func.mkdir(parents=True)
    tail = "space-MNI152NLin2009cAsym_atlas-Schaefer18_parcel-1000Par7Net"
    friends = func / f"sub-01_task-friends_{tail}_desc-s123456_bold.h5"
    with h5py.File(friends, "w") as handle:
        handle["ses-001_task-s01e02a"] = np.ones((4, 3), np.float32)
    annex_link(func / f"sub-01_task-movie10_{tail}_bold.h5", tmp_path)
    annex_link(func / f"sub-01_task-movie10_{tail}_desc-cropped_bold.h5", tmp_path)
    assert bids_entities(friends.name) == {"sub": "01", "task": "friends", "space": "MNI152NLin2009cAsym",
                                           "atlas": "Schaefer18", "parcel": "1000Par7Net", "desc": "s123456"}
    assert find_algonauts_h5(tmp_path / "fmri", "sub-01") == friends
    with pytest.raises(DataError, match="several HDF5 files for sub-01 and task-movie10: .*desc-cropped"):
        find_algonauts_h5(tmp_path / "fmri", "01", task="movie10")
    with pytest.raises(DataError, match="no HDF5 file for sub-02"):
        find_algonauts_h5(tmp_path / "fmri", "sub-02")
    # the chosen file not fetched: the reader says which command fetches it
    friends.unlink()
    annex_link(friends, tmp_path)
    with pytest.raises(DataError, match=f"{friends}: HDF5 file not fetched .*datalad get {friends}$"):
        read_algonauts_h5(find_algonauts_h5(tmp_path / "fmri", "sub-01"))
    # a broken link that is not git-annex's is named as such
    other = tmp_path / "sub-05_bold.h5"
    other.symlink_to(tmp_path / "elsewhere.h5")
    with pytest.raises(DataError, match="broken symbolic link"):
        read_algonauts_h5(other)


def test_truncated_hdf5_is_an_error_naming_it(tiny_dataset, tmp_path):
    broken = tmp_path / tiny_dataset.h5_path("sub-01").name
    shutil.copy(tiny_dataset.h5_path("sub-01"), broken)
    with open(broken, "r+b") as handle:
        handle.truncate(os.path.getsize(broken) // 2)
    with pytest.raises(DataError, match="truncated or not HDF5") as error:
        read_algonauts_h5(broken)
    assert str(broken) in str(error.value)
    with pytest.raises(DataError, match="HDF5 file not found"):
        read_algonauts_h5(tmp_path / "sub-01_missing.h5")


def test_array_cache_round_trip(tiny_dataset, tmp_path):
    brain = tiny_dataset.read_h5("sub-02")
    folder = write_npz_cache(brain, tmp_path / "arrays")
    assert (folder / "sub-02_task-s02e01a_bold.npy").exists()
    back = read_npz_cache(folder)
    assert back.subject == "sub-02" and back.tr == brain.tr and back.target_names == brain.target_names
    assert back.episodes == brain.episodes and back.sessions == brain.sessions
    np.testing.assert_array_equal(back.noise_ceiling, brain.noise_ceiling)
    for episode in brain.episodes:
        np.testing.assert_array_equal(back.runs[episode], brain.runs[episode])


def test_plain_array_folder_needs_a_tr(tmp_path):
    folder = tmp_path / "study_cache"
    folder.mkdir()
    np.save(folder / "sub-01_ses-001_task-s01e01a_space-MNI_desc-mist_bold.npy", np.ones((10, 3)))
    np.savez(folder / "s01e01b.npz", data=np.zeros((12, 3)))
    (folder / "notes.npy").write_bytes(b"")  # no episode id: ignored
    with pytest.raises(DataError, match="pass tr="):
        read_npz_cache(folder)
    brain = read_npz_cache(folder, "sub-01", tr=1.49)
    assert brain.episodes == ["s01e01a", "s01e01b"]
    assert brain.target_names == ["target-0000", "target-0001", "target-0002"]
    np.save(folder / "task-s01e02a.npy", np.full((4, 3), np.nan))
    with pytest.raises(DataError, match="task-s01e02a.npy: contains NaN"):
        read_npz_cache(folder, tr=1.49)


def test_brain_runs_validates_shapes():
    with pytest.raises(DataError, match=r"sub-01 run s01e01a: expected shape \(n_TR > 0, 2\)"):
        BrainRuns("01", 1.49, ["a", "b"], {"s01e01a": np.zeros((5, 3))})
    with pytest.raises(DataError, match="invalid repetition time"):
        BrainRuns("sub-01", 0.0, ["a"], {})
    brain = BrainRuns("sub-01", 1.49, ["a"], {"s01e10a": np.zeros((3, 1)), "s01e02a": np.ones((2, 1))})
    assert brain.episodes == ["s01e02a", "s01e10a"] and brain.n_trs == 5
    assert brain.select(["s01e10a", "s09e01a"]).episodes == ["s01e10a"]
