"""fMRIPrep derivatives to :class:`~training.data.fmri.runs.BrainRuns`, through a masker.

:func:`find_fmriprep_runs` finds a subject's runs (BOLD, brain mask, confounds, sidecar) in one
template space; :class:`FmriprepMasker`, as nilearn's maskers do, is fit on the atlas or mask
and the runs' BOLD grid (checking every run before the first extraction) and transforms one
run into its ``(n_TR, n_targets)`` time series, cached per run; :func:`read_fmriprep` does both
for a subject.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from .._io import atomic_save_npz, file_identity, hash_key, require_file
from ..errors import DataError
from .runs import TR_TOLERANCE, BrainRuns, log_repeats, natural_key, normalize_subject

__all__ = [
    "DEFAULT_CONFOUNDS", "DEFAULT_SPACE", "FmriprepMasker", "FmriprepRun", "find_fmriprep_runs", "read_fmriprep",
]

logger = logging.getLogger(__name__)

#: Template space of the study's fMRIPrep outputs.
DEFAULT_SPACE = "MNI152NLin2009cAsym"

#: The study's confounds: cosine high-pass regressors, 24 motion parameters (6 rigid-body
#: parameters, their derivatives, squares and squared derivatives) and the mean white-matter
#: and CSF signals.  Passed as keyword arguments to
#: :func:`nilearn.interfaces.fmriprep.load_confounds`.
DEFAULT_CONFOUNDS: Mapping[str, Any] = MappingProxyType(
    {"strategy": ("high_pass", "motion", "wm_csf"), "motion": "full", "wm_csf": "basic"}
)

# Bumped whenever the extraction code changes what it writes to the cache.
_CACHE_VERSION = 1

_FMRIPREP_BOLD = re.compile(
    r"^(?P<prefix>sub-(?P<sub>[a-zA-Z0-9]+)(?:_ses-(?P<ses>[a-zA-Z0-9]+))?"
    r"_task-(?P<task>[a-zA-Z0-9]+)(?:_[a-z]+-[a-zA-Z0-9]+)*?)"
    r"_space-(?P<space>[a-zA-Z0-9]+)(?P<after>(?:_[a-z]+-[a-zA-Z0-9]+)*?)"
    r"_desc-preproc_bold\.nii(?:\.gz)?$"
)


@dataclass(frozen=True)
class FmriprepRun:
    """Files of one fMRIPrep run.

    Attributes
    ----------
    subject : :obj:`str`
        ``"sub-01"`` (names the run's extraction in a cache).
    episode, session : :obj:`str`
        Task label (the episode id) and session label (``""`` if the layout has none).
    bold, mask, confounds : :class:`pathlib.Path`
        The ``desc-preproc_bold`` image, its ``desc-brain_mask`` and the
        ``desc-confounds_timeseries.tsv``.  They may not exist: :func:`read_fmriprep`
        checks them and names the missing one (:meth:`FmriprepMasker.fit`).
    sidecar : :class:`pathlib.Path`
        The BOLD image's JSON sidecar (optional; holds ``RepetitionTime``).
    """

    subject: str
    episode: str
    session: str
    bold: Path
    mask: Path
    confounds: Path
    sidecar: Path


def find_fmriprep_runs(deriv_dir: str | Path, subject: str, *, space: str = DEFAULT_SPACE) -> dict[str, FmriprepRun]:
    """Find a subject's preprocessed BOLD runs in an fMRIPrep derivatives folder.

    Parameters
    ----------
    deriv_dir : :obj:`str` or :class:`pathlib.Path`
        The fMRIPrep output folder (holding ``sub-XX/``).
    subject : :obj:`str`
        ``"sub-01"`` or ``"01"``.
    space : :obj:`str`, default=:data:`DEFAULT_SPACE`
        Template space of the images to use.

    Returns
    -------
    :obj:`dict` of :obj:`str` to :class:`FmriprepRun`
        Episode id -> files, in natural episode order.  When an episode was acquired
        more than once (two sessions or ``run-`` entities), the first in session order is
        kept and a warning lists the others.

    Raises
    ------
    DataError
        The subject folder does not exist or holds no BOLD run in ``space``.
    """
    subject = normalize_subject(subject)
    subject_dir = Path(deriv_dir) / subject
    if not subject_dir.is_dir():
        raise DataError(f"{subject_dir}: no such subject folder in the fMRIPrep derivatives")
    found: dict[str, list[FmriprepRun]] = {}
    for bold in sorted(subject_dir.rglob("*_desc-preproc_bold.nii*"), key=lambda p: natural_key(str(p))):
        match = _FMRIPREP_BOLD.match(bold.name)
        if match is None or match["space"] != space or f"sub-{match['sub']}" != subject:
            continue
        stem = bold.name[: bold.name.index("_desc-preproc_bold")]
        confounds = bold.parent / f"{match['prefix']}_desc-confounds_timeseries.tsv"
        if not confounds.exists():  # fMRIPrep < 20.2 name
            legacy = bold.parent / f"{match['prefix']}_desc-confounds_regressors.tsv"
            confounds = legacy if legacy.exists() else confounds
        run = FmriprepRun(
            subject=subject,
            episode=match["task"],
            session=match["ses"] or "",
            bold=bold,
            mask=bold.parent / f"{stem}_desc-brain_mask.nii.gz",
            confounds=confounds,
            sidecar=bold.parent / f"{stem}_desc-preproc_bold.json",
        )
        found.setdefault(run.episode, []).append(run)
    if not found:
        raise DataError(f"{subject_dir}: no '*_space-{space}_desc-preproc_bold.nii[.gz]' file found")
    runs = {episode: found[episode][0] for episode in sorted(found, key=natural_key)}
    log_repeats(
        subject,
        {e: [c.session or c.bold.name for c in found[e]] for e in runs if len(found[e]) > 1},
    )
    return runs


def _load_header_image(path: Path, what: str):
    """nibabel image with its header read (data not loaded); DataError if unreadable."""
    import nibabel as nib

    require_file(path, f"{what} file")
    try:
        return nib.load(path)
    except Exception as exc:  # nibabel raises several unrelated types for bad headers
        raise DataError(f"{path}: cannot read {what} (corrupt or not NIfTI?): {exc}") from exc


def _image_data(path: Path, what: str) -> np.ndarray:
    """Whole data array of a (small) image: atlas, masks."""
    img = _load_header_image(path, what)
    try:
        return np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise DataError(f"{path}: cannot read {what} data (truncated or corrupt?): {exc}") from exc


def _run_tr(run: FmriprepRun, img) -> float:
    """TR of one run from the NIfTI header, cross-checked with the JSON sidecar."""
    header_tr = float(img.header.get_zooms()[3]) if len(img.shape) == 4 else 0.0
    unit = img.header.get_xyzt_units()[1]
    header_tr *= {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
    sidecar_tr = None
    if run.sidecar.exists():
        try:
            sidecar_tr = json.loads(run.sidecar.read_text()).get("RepetitionTime")
        except (json.JSONDecodeError, OSError) as exc:
            raise DataError(f"{run.sidecar}: cannot read JSON sidecar: {exc}") from exc
    if sidecar_tr is not None:
        sidecar_tr = float(sidecar_tr)
        if header_tr > 0 and abs(header_tr - sidecar_tr) > TR_TOLERANCE:
            raise DataError(
                f"{run.bold}: the NIfTI header says TR = {header_tr:g} s but the sidecar "
                f"{run.sidecar.name} says RepetitionTime = {sidecar_tr:g} s"
            )
        return sidecar_tr
    if not header_tr > 0:
        raise DataError(f"{run.bold}: no repetition time in the NIfTI header (zooms[3] = 0) nor sidecar")
    return header_tr


def _atlas_target_names(
    atlas_path: Path, atlas_labels: str | Path | Sequence[str] | None, values: np.ndarray
) -> list[str]:
    """Names of the atlas regions, in increasing label value (nilearn's column order)."""
    if atlas_labels is None:
        return [f"label-{int(v)}" if float(v).is_integer() else f"label-{v:g}" for v in values]
    if isinstance(atlas_labels, (str, Path)):
        labels_path = Path(atlas_labels)
        import pandas as pd

        try:
            table = pd.read_csv(labels_path, sep="\t")
        except (OSError, ValueError) as exc:
            raise DataError(f"{labels_path}: cannot read the atlas labels table: {exc}") from exc
        if not {"index", "name"} <= set(table.columns):
            raise DataError(
                f"{labels_path}: the atlas labels table needs 'index' and 'name' columns "
                f"(BIDS dseg.tsv), found {list(table.columns)}"
            )
        mapping = dict(zip(table["index"].astype(float), table["name"].astype(str), strict=True))
        missing = [v for v in values if float(v) not in mapping]
        if missing:
            raise DataError(f"{labels_path}: no name for label values {missing[:10]} of atlas {atlas_path}")
        return [mapping[float(v)] for v in values]
    names = [str(name) for name in atlas_labels]
    if len(names) != len(values):
        raise DataError(f"{atlas_path}: {len(values)} labels in the image but {len(names)} names given")
    return names


def _check_same_grid(reference, ref_path: Path, other_path: Path, what: str, other=None) -> None:
    """Raise DataError unless ``other_path`` has the voxel grid (shape, affine) of the BOLD."""
    if other is None:
        other = _load_header_image(other_path, what)
    if tuple(other.shape[:3]) != tuple(reference.shape[:3]) or not np.allclose(
        other.affine, reference.affine, atol=1e-3
    ):
        raise DataError(
            f"{other_path}: {what} does not match the BOLD image {ref_path}: "
            f"shape {tuple(other.shape[:3])} vs {tuple(reference.shape[:3])}, affine\n"
            f"{np.array2string(other.affine, precision=3)}\nvs\n"
            f"{np.array2string(reference.affine, precision=3)}"
        )


class _TooShortForConfounds(DataError):
    """A run with no more volumes than confound regressors: skipped (with a warning), not fatal."""


def _load_run_confounds(run: FmriprepRun, confounds: Mapping[str, Any], n_volumes: int) -> np.ndarray | None:
    """Confound matrix of a run, with volumes to censor turned into spike regressors.

    nilearn returns volumes to drop (non-steady-state volumes, scrubbing) as a
    ``sample_mask``.  Dropping them would shift every later volume relative to the audio,
    so each dropped volume becomes a one-hot regressor instead: the same fit, and the
    run keeps one row per acquired volume.
    """
    from nilearn.interfaces.fmriprep import load_confounds

    require_file(run.confounds, "confounds file", f" (needed for {run.bold.name})")
    try:
        frame, sample_mask = load_confounds(str(run.bold), **dict(confounds))
    except ValueError as exc:
        raise DataError(f"{run.confounds}: cannot load confounds {dict(confounds)}: {exc}") from exc
    matrix = np.zeros((n_volumes, 0)) if frame is None else frame.to_numpy(dtype=np.float64)
    if matrix.shape[0] != n_volumes:
        raise DataError(f"{run.confounds}: {matrix.shape[0]} rows but {run.bold.name} has {n_volumes} volumes")
    if not np.all(np.isfinite(matrix)):
        bad = [c for c, ok in zip(frame.columns, np.isfinite(matrix).all(axis=0), strict=True) if not ok]
        raise DataError(f"{run.confounds}: non-finite values in confound columns {bad}")
    if sample_mask is not None:
        dropped = np.setdiff1d(np.arange(n_volumes), np.asarray(sample_mask))
        spikes = np.zeros((n_volumes, dropped.size))
        spikes[dropped, np.arange(dropped.size)] = 1.0
        matrix = np.hstack([matrix, spikes])
        logger.info("%s: %d volume(s) censored with spike regressors", run.bold.name, dropped.size)
    if matrix.shape[1] >= n_volumes - 1:  # no degree of freedom left: the targets would be 0
        raise _TooShortForConfounds(
            f"{run.bold.name}: {n_volumes} volumes, {matrix.shape[1]} confound regressors "
            f"({dict(confounds)}): regressing them out would leave no signal"
        )
    return matrix if matrix.shape[1] else None


def _grid_text(shape: Sequence[int], affine: np.ndarray) -> str:
    """``"53x64x52, 3 mm voxels"``."""
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    size = f"{zooms[0]:g} mm" if np.allclose(zooms, zooms[0], atol=1e-3) else "x".join(f"{z:g}" for z in zooms) + " mm"
    return f"{'x'.join(str(int(n)) for n in shape[:3])}, {size} voxels"


def _resample_to_bold(target_path: Path, what: str, target_img, target_data: np.ndarray, bold_img):
    """Atlas or mask resampled to the BOLD grid by nilearn, nearest neighbour; one log line."""
    import nibabel as nib
    from nilearn.image import resample_to_img

    # A header-only stand-in for the BOLD grid: resampling needs shape and affine only.
    grid = nib.Nifti1Image(np.zeros(bold_img.shape[:3], dtype=np.int8), bold_img.affine)
    resampled = resample_to_img(
        nib.Nifti1Image(target_data, target_img.affine),
        grid,
        interpolation="nearest",
        force_resample=True,
        copy_header=True,
    )
    logger.info(
        "%s: %s on another grid (%s) than the BOLD images (%s): resampled to the BOLD grid by "
        "nearest neighbour (data.resample_atlas = false makes this an error)",
        target_path,
        what,
        _grid_text(target_data.shape, target_img.affine),
        _grid_text(bold_img.shape, bold_img.affine),
    )
    return resampled, np.asanyarray(resampled.dataobj)


def _count_nonfinite(data: np.ndarray, region: np.ndarray | None) -> int:
    """Non-finite values of a 4-D array (within a 3-D region), counted in time blocks."""
    count = 0
    for start in range(0, data.shape[3], 64):
        block = np.asarray(data[..., start : start + 64])
        count += int(np.count_nonzero(~np.isfinite(block if region is None else block[region])))
    return count


def _extract_run(
    run: FmriprepRun,
    masker,
    confounds: Mapping[str, Any] | Literal[False],
    region: np.ndarray | None = None,
) -> np.ndarray:
    """Masker output of one run: ``(n_TR, n_targets)`` float32.  The cached step.

    ``region`` is where non-finite values matter (the atlas or mask voxels; None: the whole
    image, as when smoothing spreads values).  nilearn itself would replace them by zeros,
    silently for voxel masks, which yields wrong targets.
    """
    import nibabel as nib

    img = _load_header_image(run.bold, "BOLD image")
    if len(img.shape) != 4:
        raise DataError(f"{run.bold}: expected a 4-D BOLD image, got shape {img.shape}")
    matrix = None if confounds is False else _load_run_confounds(run, confounds, img.shape[3])
    try:
        # Loaded once here and handed to the masker as an in-memory image: no second read.
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise DataError(f"{run.bold}: cannot read the BOLD data (truncated or corrupt file?): {exc}") from exc
    bad = _count_nonfinite(data, region)
    if bad:
        where = "in the atlas/mask voxels" if region is not None else "in the image"
        raise DataError(f"{run.bold}: the BOLD data contain {bad} NaN or infinite values {where}")
    img = nib.Nifti1Image(data, img.affine, img.header)
    try:
        with warnings.catch_warnings():
            # Non-finite values outside the targets are harmless; nilearn zeroes them.
            warnings.filterwarnings("ignore", message="Non-finite values detected")
            signals = masker.transform(img, confounds=matrix)
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(f"{run.bold}: signal extraction failed: {exc}") from exc
    signals = np.asarray(signals, dtype=np.float32)
    if not np.all(np.isfinite(signals)):
        bad_columns = np.flatnonzero(~np.isfinite(signals).all(axis=0))
        raise DataError(
            f"{run.bold}: extraction gave non-finite values in {bad_columns.size} target(s) "
            f"(first columns {bad_columns[:5].tolist()}); check the confounds file {run.confounds}"
        )
    return signals


def read_fmriprep(
    deriv_dir: str | Path,
    subject: str,
    *,
    atlas: str | Path | None = None,
    atlas_labels: str | Path | Sequence[str] | None = None,
    mask: str | Path | None = None,
    confounds: Mapping[str, Any] | Literal[False] = DEFAULT_CONFOUNDS,
    standardize: Literal["zscore_sample", "psc"] | Literal[False] = "zscore_sample",
    smoothing_fwhm: float | None = None,
    resample_atlas: bool = True,
    space: str = DEFAULT_SPACE,
    episodes: Iterable[str] | None = None,
    tr: float | None = None,
    cache_dir: str | Path | None = None,
) -> BrainRuns:
    """Extract parcel or voxel time series from a subject's fMRIPrep derivatives.

    Finds the subject's runs of ``space`` (:func:`find_fmriprep_runs`; only those, and only
    those of ``episodes``, are opened: other files, e.g. space-T1w ones, may be unfetched annex
    links), fits a :class:`FmriprepMasker` built from the other keyword arguments (documented
    there) on them, which checks every run's files, grid and TR before the first extraction, and
    transforms each run.  A run with no more volumes than confound regressors is skipped with a
    warning (it would leave no signal).

    Parameters
    ----------
    deriv_dir : :obj:`str` or :class:`pathlib.Path`
        fMRIPrep output folder holding ``sub-XX/ses-YYY/func/``.
    subject : :obj:`str`
        ``"sub-01"`` or ``"01"``.
    space : :obj:`str`, default=:data:`DEFAULT_SPACE`
        Template space of the runs to read.
    episodes : iterable of :obj:`str`, optional
        Read only these episodes (those absent are ignored).
    tr : :obj:`float`, optional
        Expected repetition time; a run with another TR is an error.
    atlas, atlas_labels, mask, confounds, standardize, smoothing_fwhm, resample_atlas, cache_dir
        The extraction settings: see :class:`FmriprepMasker`.

    Returns
    -------
    BrainRuns
        One float32 array ``(n_TR, n_targets)`` per run.

    Raises
    ------
    DataError
        A missing BOLD, mask or confounds file; an atlas or mask whose shape or affine
        differs from a BOLD image; a truncated or corrupt image; runs with different TRs
        (or a header TR that disagrees with its sidecar); NaNs in the extracted signals.
    """
    masker = FmriprepMasker(atlas=atlas, atlas_labels=atlas_labels, mask=mask, confounds=confounds,
                            standardize=standardize, smoothing_fwhm=smoothing_fwhm,
                            resample_atlas=resample_atlas, cache_dir=cache_dir)
    subject = normalize_subject(subject)
    runs = find_fmriprep_runs(deriv_dir, subject, space=space)
    if episodes is not None:
        wanted = set(episodes)
        runs = {episode: run for episode, run in runs.items() if episode in wanted}
        if not runs:
            raise DataError(
                f"{Path(deriv_dir) / subject}: none of the {len(wanted)} requested episodes "
                f"({', '.join(sorted(wanted, key=natural_key)[:4])}...) has a run in space {space}"
            )
    masker.fit(runs.values(), tr=tr)
    arrays: dict[str, np.ndarray] = {}
    too_short: list[str] = []
    for episode, run in runs.items():
        try:
            arrays[episode] = masker.transform(run)
        except _TooShortForConfounds as exc:
            too_short.append(str(exc))
    if too_short:  # a cut-short run must not abort a subject's hours of data
        warnings.warn(f"{subject}: {len(too_short)} run(s) too short for the confounds are skipped: "
                      + "; ".join(too_short), stacklevel=2)
    if not arrays:
        raise DataError(f"{Path(deriv_dir) / subject}: every run is too short for the confounds: {too_short[0]}")
    return BrainRuns(
        subject=subject,
        tr=masker.tr_,
        target_names=masker.target_names_,
        runs=arrays,
        source=f"fmriprep:{Path(deriv_dir).resolve()} {masker.kind}:{masker.target_path.resolve()}",
        sessions={episode: runs[episode].session for episode in arrays},
    )


class FmriprepMasker:
    """Parcel or voxel time series of fMRIPrep runs, in the manner of nilearn's maskers.

    Built from the extraction settings, :meth:`fit` on a subject's runs loads the atlas or mask
    on their BOLD grid (resampled if allowed), checks every run's files (BOLD, brain mask,
    confounds), grid and TR before the first (slow) extraction, so that a missing or unfetched
    file fails in seconds, and sets up the nilearn masker:
    :class:`~nilearn.maskers.NiftiLabelsMasker` (mean signal of each atlas region) with
    ``atlas``, :class:`~nilearn.maskers.NiftiMasker` (one column per voxel) with ``mask``.
    :meth:`transform` then gives one run's ``(n_TR, n_targets)`` float32 time series: confounds
    regressed out, standardised on its own, without detrending, as in the study.

    Parameters
    ----------
    atlas : :obj:`str` or :class:`pathlib.Path`, optional
        3-D label image (0 = background).  Exactly one of ``atlas`` and ``mask``.
    atlas_labels : path, sequence of :obj:`str` or None, default=None
        Region names: a BIDS ``dseg.tsv`` (columns ``index``, ``name``) or one name per
        label value in increasing order.  Default: ``"label-<value>"``.
    mask : :obj:`str` or :class:`pathlib.Path`, optional
        3-D binary image of the voxels to extract (e.g. a superior-temporal mask).
    confounds : mapping or False, default=:data:`DEFAULT_CONFOUNDS`
        Keyword arguments of :func:`nilearn.interfaces.fmriprep.load_confounds`; the
        default is the study's strategy: ``strategy=("high_pass", "motion", "wm_csf"),
        motion="full", wm_csf="basic"`` (fMRIPrep's cosine regressors, 24 motion
        parameters, mean white-matter and CSF signals).  Volumes that nilearn would
        censor (non-steady-state) become spike regressors so that row ``i`` stays volume
        ``i``.  ``False``: no confound regression.
    standardize : {"zscore_sample", "psc", False}, default="zscore_sample"
        Per-run standardisation (nilearn's ``standardize``).
    smoothing_fwhm : :obj:`float`, optional
        Spatial smoothing in mm before extraction (the study's first round used 8).
    resample_atlas : :obj:`bool`, default=True
        An atlas or mask on another grid than the BOLD images (the study's MIST atlas is
        3 mm, the BOLD 2 mm) is resampled to the BOLD grid by nilearn's
        :func:`~nilearn.image.resample_to_img` with nearest-neighbour interpolation (labels
        stay labels, as nilearn's maskers do), and one INFO log line says so.  If False,
        another grid is an error.
    cache_dir : :obj:`str` or :class:`pathlib.Path`, optional
        Folder for per-run results, keyed by the identity (path, size, mtime) of every
        input file and by all parameters: a second call reads them instead of
        re-extracting.  Written atomically.

    Attributes
    ----------
    tr_ : :obj:`float`
        After :meth:`fit`: the runs' repetition time.
    target_names_ : :obj:`list` of :obj:`str`
        After :meth:`fit`: parcel names (atlas) or ``"voxel-i-j-k"`` (mask), in column order.
    """

    def __init__(
        self,
        *,
        atlas: str | Path | None = None,
        atlas_labels: str | Path | Sequence[str] | None = None,
        mask: str | Path | None = None,
        confounds: Mapping[str, Any] | Literal[False] = DEFAULT_CONFOUNDS,
        standardize: Literal["zscore_sample", "psc"] | Literal[False] = "zscore_sample",
        smoothing_fwhm: float | None = None,
        resample_atlas: bool = True,
        cache_dir: str | Path | None = None,
    ) -> None:
        if (atlas is None) == (mask is None):
            raise ValueError("give exactly one of atlas= (parcels) and mask= (voxels)")
        self.kind = "atlas" if atlas is not None else "mask"
        self.target_path = Path(atlas if atlas is not None else mask)
        self.atlas_labels = atlas_labels
        self.confounds = confounds
        self.standardize = standardize
        self.smoothing_fwhm = smoothing_fwhm
        self.resample_atlas = resample_atlas
        self.cache_dir = None if cache_dir is None else Path(cache_dir)

    def fit(self, runs: Iterable[FmriprepRun], *, tr: float | None = None) -> FmriprepMasker:
        """Load the atlas or mask on the runs' grid and check every run; ``tr``: the expected TR.

        Raises :class:`DataError` for a missing or unreadable file, another grid (unless
        resampled), or a TR other than ``tr`` (or, without it, than the first run's).
        """
        runs = list(runs)
        if not runs:
            raise ValueError("FmriprepMasker.fit: no run given")
        first_bold = _load_header_image(runs[0].bold, "BOLD image")
        self.target_img_, self.target_names_ = _load_targets(
            self.target_path, self.kind, self.atlas_labels, first_bold, self.resample_atlas
        )
        self.target_voxels_ = np.asanyarray(self.target_img_.dataobj) != 0
        with_confounds = self.confounds is not False
        run_trs = [
            _check_run(run, self.target_path, self.kind, self.target_img_, self.target_voxels_, with_confounds)
            for run in runs
        ]
        self.tr_ = tr if tr is not None else run_trs[0]
        for run, run_tr in zip(runs, run_trs, strict=True):
            if abs(run_tr - self.tr_) > TR_TOLERANCE:
                origin = "the expected tr" if tr is not None else runs[0].bold.name
                raise DataError(f"{run.bold}: TR = {run_tr:g} s, inconsistent with {origin} ({self.tr_:g} s)")
        self.masker_ = self._nilearn_masker()
        return self

    def transform(self, run: FmriprepRun) -> np.ndarray:
        """One run's ``(n_TR, n_targets)`` float32 time series (from the cache when there).

        Raises :class:`DataError` for unreadable data or non-finite values, and its subclass
        ``_TooShortForConfounds`` for a run with no more volumes than confound regressors.
        """
        if not hasattr(self, "masker_"):
            raise RuntimeError("FmriprepMasker.transform before fit")
        cache_file = self._cache_file(run)
        if cache_file is not None and cache_file.exists():
            with np.load(cache_file, allow_pickle=False) as cached:
                if list(cached["target_names"]) == self.target_names_:
                    return cached["data"]
        if not hasattr(self.masker_, "n_elements_"):  # fitted once, on the first run extracted
            self.masker_.fit()
        data = _extract_run(run, self.masker_, self.confounds, None if self.smoothing_fwhm else self.target_voxels_)
        if data.shape[1] != len(self.target_names_):
            raise DataError(
                f"{run.bold}: extraction gave {data.shape[1]} targets, expected "
                f"{len(self.target_names_)} from {self.target_path} (regions outside the image?)"
            )
        if cache_file is not None:
            atomic_save_npz(cache_file, data=data, target_names=np.array(self.target_names_))
        return data

    def _nilearn_masker(self):
        """NiftiLabelsMasker (atlas) or NiftiMasker (mask): per-run z-score, no detrending."""
        from nilearn.maskers import NiftiLabelsMasker, NiftiMasker

        common = {
            "smoothing_fwhm": self.smoothing_fwhm,
            "standardize": self.standardize or None,
            "detrend": False,
            "reports": False,
            "t_r": self.tr_,
        }
        if self.kind == "atlas":
            return NiftiLabelsMasker(labels_img=self.target_img_, resampling_target="data", **common)
        return NiftiMasker(mask_img=self.target_img_, **common)

    def _cache_file(self, run: FmriprepRun) -> Path | None:
        """Where one run's extraction is cached: keyed by every input file and setting."""
        if self.cache_dir is None:
            return None
        from nilearn import __version__ as nilearn_version

        labels = self.atlas_labels
        key = hash_key(
            {
                "version": _CACHE_VERSION,
                "nilearn": ".".join(nilearn_version.split(".")[:2]),
                "kind": self.kind,
                "target": file_identity(self.target_path),
                "labels": file_identity(labels) if isinstance(labels, (str, Path)) else labels,
                "confounds": False if self.confounds is False else {k: self.confounds[k] for k in sorted(self.confounds)},
                "standardize": self.standardize,
                "smoothing_fwhm": self.smoothing_fwhm,
                "resample_atlas": self.resample_atlas,
                "bold": file_identity(run.bold),
                "mask": file_identity(run.mask),
                "confounds_file": file_identity(run.confounds) if run.confounds.exists() else None,
                "sidecar": file_identity(run.sidecar) if run.sidecar.exists() else None,
            }
        )
        return self.cache_dir / run.subject / f"{run.subject}_task-{run.episode}_{key[:20]}.npz"


def _load_targets(path: Path, what: str, atlas_labels, bold_img, resample: bool) -> tuple[Any, list[str]]:
    """The atlas or mask image on the BOLD grid (resampled if allowed) and the target names."""
    import nibabel as nib

    img = _load_header_image(path, what)
    data = _image_data(path, what)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
        img = nib.Nifti1Image(data, img.affine)
    if data.ndim != 3:
        raise DataError(f"{path}: the {what} must be a 3-D image, got shape {data.shape}")
    if resample and (
        tuple(data.shape) != tuple(bold_img.shape[:3]) or not np.allclose(img.affine, bold_img.affine, atol=1e-3)
    ):
        img, data = _resample_to_bold(path, what, img, data, bold_img)
    if what == "atlas":
        values = np.unique(data[data != 0])
        if values.size == 0:
            raise DataError(f"{path}: the atlas has no non-zero label")
        return img, _atlas_target_names(path, atlas_labels, values)
    if not (data != 0).any():
        raise DataError(f"{path}: the mask is empty")
    return img, [f"voxel-{i}-{j}-{k}" for i, j, k in np.argwhere(data != 0)]


def _check_run(
    run: FmriprepRun, target_path: Path, what: str, target_img, target_voxels: np.ndarray, with_confounds: bool
) -> float:
    """Check a run's files and grids before any extraction; return its TR."""
    bold_img = _load_header_image(run.bold, "BOLD image")
    require_file(run.mask, "brain mask", f" (needed for {run.bold.name})")
    _check_same_grid(bold_img, run.bold, run.mask, "brain mask")
    _check_same_grid(bold_img, run.bold, target_path, what, other=target_img)
    outside = target_voxels & (_image_data(run.mask, "brain mask") == 0)
    if outside.sum() > 0.1 * target_voxels.sum():
        warnings.warn(
            f"{run.bold.name}: {int(outside.sum())} of {int(target_voxels.sum())} "
            f"{what} voxels lie outside the run's brain mask {run.mask.name}",
            stacklevel=3,
        )
    if with_confounds:
        require_file(run.confounds, "confounds file", f" (needed for {run.bold.name})")
    return _run_tr(run, bold_img)
