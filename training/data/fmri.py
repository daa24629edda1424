"""Brain-data readers: one subject's runs as ``(n_TR, n_targets)`` float32 arrays.

Every reader returns a :class:`BrainRuns`: the subject, the repetition time, the target
names (parcels or voxels) and one array per run keyed by episode id (``"s01e02a"``).

- :func:`read_fmriprep` reads fMRIPrep derivatives
  (``sub-*/ses-*/func/*_task-<episode>_space-*_desc-preproc_bold.nii.gz`` with the run's
  ``desc-brain_mask`` and ``desc-confounds_timeseries.tsv``) through nilearn:
  :class:`~nilearn.maskers.NiftiLabelsMasker` with an atlas (parcels) or
  :class:`~nilearn.maskers.NiftiMasker` with a mask (voxels), confounds from
  :func:`nilearn.interfaces.fmriprep.load_confounds` (:data:`DEFAULT_CONFOUNDS`, the study's
  strategy), z-scored per run, no detrending.  Extraction is cached per run.
- :func:`find_algonauts_h5` picks a subject's Friends file in the Algonauts 2025 release by
  its BIDS entities (``task-friends``), and :func:`read_algonauts_h5` reads it: one dataset
  per run named ``ses-XXX_task-<episode>``.

Files of a datalad clone that were not fetched are broken git-annex links; reading one raises
a DataError that says so and gives the ``datalad get`` command.  An episode acquired twice
(two sessions) keeps its first session, in session order, and one INFO log line lists the
repeats that were ignored.
- :func:`write_npz_cache` / :func:`read_npz_cache` store and read a plain per-run array
  cache (one ``.npy`` per run plus a JSON sidecar), as the study did.

Every problem in the inputs raises :class:`~training.data.errors.DataError` naming the file.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from ._io import (
    atomic_save_npy,
    atomic_save_npz,
    atomic_write_text,
    file_identity,
    hash_key,
    require_file,
)
from .errors import DataError

__all__ = [
    "DEFAULT_CONFOUNDS",
    "DEFAULT_SPACE",
    "DEFAULT_TR",
    "BrainRuns",
    "FmriprepRun",
    "bids_entities",
    "find_algonauts_h5",
    "find_fmriprep_runs",
    "read_algonauts_h5",
    "read_fmriprep",
    "read_npz_cache",
    "write_npz_cache",
]

logger = logging.getLogger(__name__)

#: Repetition time of the CNeuroMod Friends data, in seconds.
DEFAULT_TR = 1.49

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
# Two TRs are "the same" below this difference (seconds): headers store float32.
_TR_TOLERANCE = 1e-3

_FMRIPREP_BOLD = re.compile(
    r"^(?P<prefix>sub-(?P<sub>[a-zA-Z0-9]+)(?:_ses-(?P<ses>[a-zA-Z0-9]+))?"
    r"_task-(?P<task>[a-zA-Z0-9]+)(?:_[a-z]+-[a-zA-Z0-9]+)*?)"
    r"_space-(?P<space>[a-zA-Z0-9]+)(?P<after>(?:_[a-z]+-[a-zA-Z0-9]+)*?)"
    r"_desc-preproc_bold\.nii(?:\.gz)?$"
)
_H5_RUN = re.compile(r"^(?:ses-(?P<ses>[a-zA-Z0-9]+)_)?task-(?P<task>[a-zA-Z0-9]+)(?:_run-(?P<run>[a-zA-Z0-9]+))?$")
_CACHED_RUN = re.compile(r"task-(?P<task>[a-zA-Z0-9]+)")
_EPISODE_LIKE = re.compile(r"(?<![a-zA-Z0-9])(s\d+e\d+[a-z]?)(?![a-zA-Z0-9])")
_NATURAL = re.compile(r"(\d+)")


def _natural_key(text: str) -> tuple:
    """Sort key that orders ``s2e10`` after ``s2e9`` (numbers compared as numbers)."""
    return tuple(int(part) if part.isdigit() else part for part in _NATURAL.split(text))


def _normalize_subject(subject: str) -> str:
    """``"01"`` or ``"sub-01"`` -> ``"sub-01"``."""
    subject = str(subject)
    if not subject:
        raise ValueError("subject must be a non-empty string such as 'sub-01'")
    return subject if subject.startswith("sub-") else f"sub-{subject}"


@dataclass
class BrainRuns:
    """One subject's brain data: one ``(n_TR, n_targets)`` float32 array per run.

    Parameters
    ----------
    subject : :obj:`str`
        Subject label, ``"sub-01"``.
    tr : :obj:`float`
        Repetition time in seconds, the same for every run.
    target_names : :obj:`list` of :obj:`str`
        One name per column (parcel or voxel).
    runs : :obj:`dict` of :obj:`str` to :class:`numpy.ndarray`
        Episode id (``"s01e02a"``) -> array of shape ``(n_TR, n_targets)``, float32.
        Row ``i`` is volume ``i`` of the run, acquired over ``[i*tr, (i+1)*tr)`` seconds
        from the start of the episode.
    source : :obj:`str`, default=""
        Where the data came from (reader and path), for provenance.
    sessions : :obj:`dict` of :obj:`str` to :obj:`str`, default={}
        Episode id -> session label (``"001"``) where known.
    noise_ceiling : :class:`numpy.ndarray` or None, default=None
        Per-target noise ceiling (Pearson r) when known (the synthetic dataset), else None.
    """

    subject: str
    tr: float
    target_names: list[str]
    runs: dict[str, np.ndarray]
    source: str = ""
    sessions: dict[str, str] = field(default_factory=dict)
    noise_ceiling: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.subject = _normalize_subject(self.subject)
        self.tr = float(self.tr)
        if not np.isfinite(self.tr) or self.tr <= 0:
            raise DataError(f"{self.subject}: invalid repetition time {self.tr!r} s")
        self.target_names = [str(name) for name in self.target_names]
        n_targets = len(self.target_names)
        runs = {}
        for episode, array in self.runs.items():
            array = np.asarray(array, dtype=np.float32)
            if array.ndim != 2 or array.shape[1] != n_targets or array.shape[0] == 0:
                raise DataError(
                    f"{self.subject} run {episode}: expected shape (n_TR > 0, {n_targets}), got {array.shape}"
                )
            runs[str(episode)] = array
        self.runs = runs
        if self.noise_ceiling is not None:
            self.noise_ceiling = np.asarray(self.noise_ceiling, dtype=np.float64)
            if self.noise_ceiling.shape != (n_targets,):
                raise DataError(
                    f"{self.subject}: noise_ceiling has shape {self.noise_ceiling.shape}, expected ({n_targets},)"
                )

    @property
    def episodes(self) -> list[str]:
        """Episode ids of the runs, in natural order (``s01e02a`` < ``s01e10a``)."""
        return sorted(self.runs, key=_natural_key)

    @property
    def n_targets(self) -> int:
        """Number of targets (columns)."""
        return len(self.target_names)

    @property
    def n_trs(self) -> int:
        """Total number of volumes over all runs."""
        return sum(array.shape[0] for array in self.runs.values())

    def select(self, episodes: Iterable[str]) -> BrainRuns:
        """Return a copy restricted to ``episodes`` (those absent are ignored)."""
        keep = [episode for episode in episodes if episode in self.runs]
        return BrainRuns(
            subject=self.subject,
            tr=self.tr,
            target_names=list(self.target_names),
            runs={episode: self.runs[episode] for episode in keep},
            source=self.source,
            sessions={e: s for e, s in self.sessions.items() if e in keep},
            noise_ceiling=self.noise_ceiling,
        )


# --------------------------------------------------------------------------- fMRIPrep


@dataclass(frozen=True)
class FmriprepRun:
    """Files of one fMRIPrep run.

    Attributes
    ----------
    episode, session : :obj:`str`
        Task label (the episode id) and session label (``""`` if the layout has none).
    bold, mask, confounds : :class:`pathlib.Path`
        The ``desc-preproc_bold`` image, its ``desc-brain_mask`` and the
        ``desc-confounds_timeseries.tsv``.  They may not exist: :func:`read_fmriprep`
        checks them and names the missing one.
    sidecar : :class:`pathlib.Path`
        The BOLD image's JSON sidecar (optional; holds ``RepetitionTime``).
    """

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
    subject = _normalize_subject(subject)
    subject_dir = Path(deriv_dir) / subject
    if not subject_dir.is_dir():
        raise DataError(f"{subject_dir}: no such subject folder in the fMRIPrep derivatives")
    found: dict[str, list[FmriprepRun]] = {}
    for bold in sorted(subject_dir.rglob("*_desc-preproc_bold.nii*"), key=lambda p: _natural_key(str(p))):
        match = _FMRIPREP_BOLD.match(bold.name)
        if match is None or match["space"] != space or f"sub-{match['sub']}" != subject:
            continue
        stem = bold.name[: bold.name.index("_desc-preproc_bold")]
        confounds = bold.parent / f"{match['prefix']}_desc-confounds_timeseries.tsv"
        if not confounds.exists():  # fMRIPrep < 20.2 name
            legacy = bold.parent / f"{match['prefix']}_desc-confounds_regressors.tsv"
            confounds = legacy if legacy.exists() else confounds
        run = FmriprepRun(
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
    runs = {episode: found[episode][0] for episode in sorted(found, key=_natural_key)}
    _log_repeats(
        subject,
        {e: [c.session or c.bold.name for c in found[e]] for e in runs if len(found[e]) > 1},
    )
    return runs


def _log_repeats(subject: str, repeats: Mapping[str, Sequence[str]]) -> None:
    """One INFO line for the episodes acquired more than once: the first session is used.

    The Friends data hold a few repeated viewings; the first is the one recorded in the
    order the study followed, and the later ones are a different (second) exposure.
    """
    if repeats:
        logger.info(
            "%s: %d episode(s) appear in several sessions; using the first session of each: %s",
            subject,
            len(repeats),
            "; ".join(f"{e} (using {s[0]}, ignoring {', '.join(s[1:])})" for e, s in repeats.items()),
        )


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
        if header_tr > 0 and abs(header_tr - sidecar_tr) > _TR_TOLERANCE:
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

    Each run is read with a nilearn masker: :class:`~nilearn.maskers.NiftiLabelsMasker`
    (mean signal of each atlas region) when ``atlas`` is given,
    :class:`~nilearn.maskers.NiftiMasker` (one column per voxel) when ``mask`` is given.
    Confounds are regressed out and each run is standardised on its own, without
    detrending, as in the study.  Every run's files (BOLD, brain mask, confounds), grid
    and TR are checked before the first extraction, so a missing or unfetched file fails
    in seconds; a run with no more volumes than confound regressors is skipped with a
    warning (it would leave no signal).  Only the runs of ``space`` (and of ``episodes``)
    are opened: other files, e.g. space-T1w ones, may be unfetched annex links.

    Parameters
    ----------
    deriv_dir : :obj:`str` or :class:`pathlib.Path`
        fMRIPrep output folder holding ``sub-XX/ses-YYY/func/``.
    subject : :obj:`str`
        ``"sub-01"`` or ``"01"``.
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
    space : :obj:`str`, default=:data:`DEFAULT_SPACE`
        Template space of the runs to read.
    episodes : iterable of :obj:`str`, optional
        Read only these episodes (those absent are ignored).
    tr : :obj:`float`, optional
        Expected repetition time; a run with another TR is an error.
    cache_dir : :obj:`str` or :class:`pathlib.Path`, optional
        Folder for per-run results, keyed by the identity (path, size, mtime) of every
        input file and by all parameters: a second call reads them instead of
        re-extracting.  Written atomically.

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
    from nilearn import __version__ as nilearn_version
    from nilearn.maskers import NiftiLabelsMasker, NiftiMasker

    if (atlas is None) == (mask is None):
        raise ValueError("give exactly one of atlas= (parcels) and mask= (voxels)")
    subject = _normalize_subject(subject)
    runs = find_fmriprep_runs(deriv_dir, subject, space=space)
    if episodes is not None:
        wanted = set(episodes)
        runs = {episode: run for episode, run in runs.items() if episode in wanted}
        if not runs:
            raise DataError(
                f"{Path(deriv_dir) / subject}: none of the {len(wanted)} requested episodes "
                f"({', '.join(sorted(wanted, key=_natural_key)[:4])}...) has a run in space {space}"
            )

    target_path = Path(atlas if atlas is not None else mask)
    target_what = "atlas" if atlas is not None else "mask"
    first_bold = _load_header_image(next(iter(runs.values())).bold, "BOLD image")
    target_img, target_names = _load_targets(target_path, target_what, atlas_labels, first_bold, resample_atlas)
    target_voxels = np.asanyarray(target_img.dataobj) != 0

    common = {
        "smoothing_fwhm": smoothing_fwhm,
        "standardize": standardize or None,
        "detrend": False,
        "reports": False,
    }
    if atlas is not None:
        masker = NiftiLabelsMasker(labels_img=target_img, resampling_target="data", **common)
    else:
        masker = NiftiMasker(mask_img=target_img, **common)

    params = {
        "version": _CACHE_VERSION,
        "nilearn": ".".join(nilearn_version.split(".")[:2]),
        "kind": target_what,
        "target": file_identity(target_path),
        "labels": (file_identity(atlas_labels) if isinstance(atlas_labels, (str, Path)) else atlas_labels),
        "confounds": False if confounds is False else {k: confounds[k] for k in sorted(confounds)},
        "standardize": standardize,
        "smoothing_fwhm": smoothing_fwhm,
        "resample_atlas": resample_atlas,
    }

    # Every run's files, grids and TR are checked before the first (slow) extraction.
    run_trs = {
        episode: _check_run(run, target_path, target_what, target_img, target_voxels, confounds is not False)
        for episode, run in runs.items()
    }
    reference = tr if tr is not None else next(iter(run_trs.values()))
    for episode, run_tr in run_trs.items():
        if abs(run_tr - reference) > _TR_TOLERANCE:
            origin = "the expected tr" if tr is not None else next(iter(runs.values())).bold.name
            raise DataError(f"{runs[episode].bold}: TR = {run_tr:g} s, inconsistent with {origin} ({reference:g} s)")
    masker.set_params(t_r=reference)
    arrays: dict[str, np.ndarray] = {}
    too_short: list[str] = []
    for episode, run in runs.items():
        cache_file = None if cache_dir is None else _cache_file(Path(cache_dir), subject, run, params)
        if cache_file is not None and cache_file.exists():
            with np.load(cache_file, allow_pickle=False) as cached:
                if list(cached["target_names"]) == target_names:
                    arrays[episode] = cached["data"]
                    continue
        if not hasattr(masker, "n_elements_"):  # fitted once, on the first run extracted
            masker.fit()
        try:
            data = _extract_run(run, masker, confounds, None if smoothing_fwhm else target_voxels)
        except _TooShortForConfounds as exc:
            too_short.append(str(exc))
            continue
        if data.shape[1] != len(target_names):
            raise DataError(
                f"{run.bold}: extraction gave {data.shape[1]} targets, expected "
                f"{len(target_names)} from {target_path} (regions outside the image?)"
            )
        arrays[episode] = data
        if cache_file is not None:
            atomic_save_npz(cache_file, data=data, target_names=np.array(target_names))

    if too_short:  # a cut-short run must not abort a subject's hours of data
        warnings.warn(f"{subject}: {len(too_short)} run(s) too short for the confounds are skipped: "
                      + "; ".join(too_short), stacklevel=2)
    if not arrays:
        raise DataError(f"{Path(deriv_dir) / subject}: every run is too short for the confounds: {too_short[0]}")
    return BrainRuns(
        subject=subject,
        tr=reference,
        target_names=target_names,
        runs=arrays,
        source=f"fmriprep:{Path(deriv_dir).resolve()} {target_what}:{target_path.resolve()}",
        sessions={episode: runs[episode].session for episode in arrays},
    )


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


def _cache_file(cache_dir: Path, subject: str, run: FmriprepRun, params: Mapping[str, Any]) -> Path:
    """Where one run's extraction is cached: keyed by every input file and parameter."""
    key = hash_key(
        {
            **params,
            "bold": file_identity(run.bold),
            "mask": file_identity(run.mask),
            "confounds_file": file_identity(run.confounds) if run.confounds.exists() else None,
            "sidecar": file_identity(run.sidecar) if run.sidecar.exists() else None,
        }
    )
    return cache_dir / subject / f"{subject}_task-{run.episode}_{key[:20]}.npz"


# --------------------------------------------------------------------------- Algonauts


_BIDS_ENTITY = re.compile(r"^(?P<key>[a-zA-Z0-9]+)-(?P<value>[a-zA-Z0-9]+)$")


def bids_entities(name: str) -> dict[str, str]:
    """BIDS entities of a file name: ``"sub-01_task-friends_desc-s1_bold.h5"`` ->
    ``{"sub": "01", "task": "friends", "desc": "s1"}`` (the suffix, ``bold``, is not one)."""
    stem = Path(name).name.split(".", 1)[0]
    return {m["key"]: m["value"] for part in stem.split("_") if (m := _BIDS_ENTITY.match(part))}


def find_algonauts_h5(root: str | Path, subject: str, *, task: str = "friends") -> Path:
    """A subject's HDF5 file for ``task`` under ``root`` (the release's ``fmri/`` folder).

    The Algonauts 2025 release holds, in ``fmri/sub-01/func/``, the Friends file
    (``..._task-friends_..._bold.h5``) beside Movie10 files (``task-movie10``, one of them
    ``desc-cropped``).  Files whose ``task`` entity is another task are ignored; among the
    rest, files naming ``task`` win over files with no task entity.  The chosen file may be
    a git-annex link that was not fetched: :func:`read_algonauts_h5` says so.

    Raises
    ------
    DataError
        No file for this subject and task (the message lists the other tasks' files found),
        or several (set ``data.brain_file`` to choose one).
    """
    root = Path(root)
    subject = _normalize_subject(subject)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (data.root: the release's fmri/ folder)")
    # glob lists unfetched annex links too (they are names; is_file() would drop them).
    found = sorted({p for pattern in (f"{subject}/**/*.h5", f"**/{subject}_*.h5") for p in root.glob(pattern)})
    found = [p for p in found if bids_entities(p.name).get("sub", subject[4:]) == subject[4:]]
    tasks = {p: bids_entities(p.name).get("task") for p in found}
    named = [p for p in found if tasks[p] == task]
    chosen = named or [p for p in found if tasks[p] is None]
    if len(chosen) == 1:
        return chosen[0]
    if not chosen:
        others = ", ".join(str(p.relative_to(root)) for p in found) or "none"
        raise DataError(
            f"{root}: no HDF5 file for {subject} and task-{task} (looked for {subject}/**/*.h5 and "
            f"**/{subject}_*.h5; found: {others})"
        )
    raise DataError(
        f"{root}: several HDF5 files for {subject} and task-{task}: "
        f"{', '.join(str(p.relative_to(root)) for p in chosen)}; set data.brain_file to the one to use"
    )


def read_algonauts_h5(
    h5_path: str | Path,
    subject: str | None = None,
    *,
    tr: float = DEFAULT_TR,
    target_names: Sequence[str] | None = None,
    episodes: Iterable[str] | None = None,
) -> BrainRuns:
    """Read one subject's Algonauts-2025-style HDF5 file (already parcellated).

    The file holds one dataset per run, named ``ses-XXX_task-<episode>`` (optionally with
    ``_run-N``), shaped ``(n_TR, n_parcels)``.  The episode id is the part after
    ``task-``.  An episode present twice (repeated viewing) keeps its first session (the
    datasets sorted by name, i.e. by session) and one INFO log line names the others.

    Parameters
    ----------
    h5_path : :obj:`str` or :class:`pathlib.Path`
        The subject's ``.h5`` file.
    subject : :obj:`str`, optional
        Subject label; default: the ``sub-XX`` entity of the file name.
    tr : :obj:`float`, default=:data:`DEFAULT_TR`
        Repetition time (the HDF5 files do not store it).
    target_names : sequence of :obj:`str`, optional
        Parcel names; default ``"parcel-0001"``, ``"parcel-0002"``, ... (column order).
    episodes : iterable of :obj:`str`, optional
        Read only these episodes.

    Returns
    -------
    BrainRuns

    Raises
    ------
    DataError
        The file is missing (or an unfetched git-annex link), truncated or not HDF5; a
        dataset name does not follow the convention; runs with different numbers of
        parcels; non-finite values.
    """
    import h5py

    path = Path(h5_path)
    if subject is None:
        found = re.search(r"(?:^|_)(sub-[a-zA-Z0-9]+)", path.name)
        if found is None:
            raise DataError(f"{path}: no 'sub-XX' in the file name; pass subject=")
        subject = found.group(1)
    subject = _normalize_subject(subject)
    require_file(path, "HDF5 file")
    wanted = None if episodes is None else set(episodes)
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: cannot open HDF5 file (truncated or not HDF5?): {exc}") from exc
    runs: dict[str, np.ndarray] = {}
    sessions: dict[str, str] = {}
    repeats: dict[str, list[str]] = {}
    with handle:
        names = sorted(handle.keys(), key=_natural_key)
        first_names: dict[str, str] = {}
        for name in names:
            match = _H5_RUN.match(name)
            if match is None:
                raise DataError(f"{path}: dataset '{name}' is not named 'ses-XXX_task-<episode>'")
            episode = match["task"]
            if wanted is not None and episode not in wanted:
                continue
            if episode in runs:  # names sort by session: the first session is kept
                repeats.setdefault(episode, [f"'{first_names[episode]}'"]).append(f"'{name}'")
                continue
            first_names[episode] = name
            dataset = handle[name]
            if not isinstance(dataset, h5py.Dataset):
                raise DataError(f"{path}: '{name}' is a group, expected a dataset")
            try:
                array = np.asarray(dataset[()], dtype=np.float32)
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: cannot read dataset '{name}' (corrupt file?): {exc}") from exc
            if array.ndim != 2:
                raise DataError(f"{path}: dataset '{name}' has shape {array.shape}, expected (n_TR, n_parcels)")
            if runs and array.shape[1] != next(iter(runs.values())).shape[1]:
                raise DataError(
                    f"{path}: dataset '{name}' has {array.shape[1]} parcels, "
                    f"others have {next(iter(runs.values())).shape[1]}"
                )
            if not np.all(np.isfinite(array)):
                raise DataError(f"{path}: dataset '{name}' contains NaN or infinite values")
            runs[episode] = array
            sessions[episode] = match["ses"] or ""
    if not runs:
        requested = f" for the {len(wanted)} requested episodes ({', '.join(sorted(wanted)[:4])}...)" if wanted else ""
        raise DataError(f"{path}: no run dataset found{requested}")
    _log_repeats(f"{subject} ({path.name})", repeats)
    n_targets = next(iter(runs.values())).shape[1]
    if target_names is None:
        target_names = [f"parcel-{i + 1:04d}" for i in range(n_targets)]
    elif len(target_names) != n_targets:
        raise DataError(f"{path}: {n_targets} parcels but {len(target_names)} target names given")
    return BrainRuns(
        subject=subject,
        tr=tr,
        target_names=list(target_names),
        runs=runs,
        source=f"algonauts-h5:{path.resolve()}",
        sessions=sessions,
    )


# --------------------------------------------------------------------------- array cache


def write_npz_cache(brain: BrainRuns, out_dir: str | Path) -> Path:
    """Write a :class:`BrainRuns` as plain per-run arrays, the study's format.

    Layout: ``out_dir/<subject>/<subject>_task-<episode>_bold.npy`` (float32,
    ``(n_TR, n_targets)``, memory-mappable) and ``out_dir/<subject>/<subject>_runs.json``
    (TR, target names, source, sessions, noise ceiling).  Every file is written
    atomically.

    Returns
    -------
    :class:`pathlib.Path`
        The subject folder, to pass to :func:`read_npz_cache`.
    """
    folder = Path(out_dir) / brain.subject
    for episode, array in brain.runs.items():
        atomic_save_npy(folder / f"{brain.subject}_task-{episode}_bold.npy", array.astype(np.float32))
    meta = {
        "subject": brain.subject,
        "tr": brain.tr,
        "target_names": brain.target_names,
        "source": brain.source,
        "sessions": brain.sessions,
        "episodes": brain.episodes,
        "noise_ceiling": None if brain.noise_ceiling is None else brain.noise_ceiling.tolist(),
    }
    atomic_write_text(folder / f"{brain.subject}_runs.json", json.dumps(meta, indent=1))
    return folder


def read_npz_cache(
    folder: str | Path,
    subject: str | None = None,
    *,
    tr: float | None = None,
    target_names: Sequence[str] | None = None,
) -> BrainRuns:
    """Read per-run arrays (``.npy`` or ``.npz``) from a folder.

    Works with what :func:`write_npz_cache` writes and with any folder of per-run arrays
    whose file names contain ``task-<episode>`` or a Friends id (``s01e02a``).  A
    ``.npz`` must hold one array (or one named ``data``/``bold``).

    Parameters
    ----------
    folder : :obj:`str` or :class:`pathlib.Path`
        The folder of arrays.
    subject : :obj:`str`, optional
        Default: from ``<subject>_runs.json`` or the folder name.
    tr : :obj:`float`, optional
        Needed when there is no JSON sidecar; if both are given they must agree.
    target_names : sequence of :obj:`str`, optional
        Default: from the sidecar, else ``"target-0000"``, ...

    Returns
    -------
    BrainRuns

    Raises
    ------
    DataError
        No arrays, unknown TR, an unreadable file, inconsistent shapes, NaNs.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    metas = sorted(folder.glob("*_runs.json"))
    meta: dict[str, Any] = {}
    if metas:
        try:
            meta = json.loads(metas[0].read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{metas[0]}: cannot read JSON: {exc}") from exc
    if tr is None:
        tr = meta.get("tr")
        if tr is None:
            raise DataError(f"{folder}: no *_runs.json with the TR; pass tr=")
    elif "tr" in meta and abs(float(meta["tr"]) - tr) > _TR_TOLERANCE:
        raise DataError(f"{metas[0]}: TR {meta['tr']} s differs from tr={tr} s")
    subject = subject or meta.get("subject") or folder.name
    runs: dict[str, np.ndarray] = {}
    for path in sorted(list(folder.glob("*.npy")) + list(folder.glob("*.npz")), key=lambda p: _natural_key(p.name)):
        match = _CACHED_RUN.search(path.name) or _EPISODE_LIKE.search(path.stem)
        if match is None:
            continue
        episode = match.group(1)
        try:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    keys = list(loaded.keys())
                    key = next((k for k in ("data", "bold") if k in keys), keys[0] if len(keys) == 1 else None)
                    if key is None:
                        raise DataError(f"{path}: several arrays {keys} and none named 'data' or 'bold'")
                    array = loaded[key]
            else:
                array = loaded
        except DataError:
            raise
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{path}: cannot read array (truncated or corrupt?): {exc}") from exc
        if episode in runs:
            raise DataError(f"{path}: a second file for episode {episode}")
        if not np.all(np.isfinite(array)):
            raise DataError(f"{path}: contains NaN or infinite values")
        runs[episode] = array
    if not runs:
        raise DataError(f"{folder}: no per-run .npy/.npz file with an episode id in its name")
    shapes = {array.shape[1:] for array in runs.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise DataError(f"{folder}: runs have inconsistent or non-2-D shapes {sorted(shapes)}")
    n_targets = next(iter(runs.values())).shape[1]
    names = target_names or meta.get("target_names") or [f"target-{i:04d}" for i in range(n_targets)]
    ceiling = meta.get("noise_ceiling")
    return BrainRuns(
        subject=subject,
        tr=float(tr),
        target_names=list(names),
        runs=runs,
        source=meta.get("source") or f"npz-cache:{folder.resolve()}",
        sessions=meta.get("sessions", {}),
        noise_ceiling=None if ceiling is None else np.asarray(ceiling),
    )
