"""Brain-data readers: one subject's runs as ``(n_TR, n_targets)`` float32 arrays.

Every reader returns a :class:`~training.data.fmri.runs.BrainRuns` (:mod:`.runs`): the subject,
the repetition time, the target names (parcels or voxels) and one array per run keyed by
episode id (``"s01e02a"``).  One module per source:

- :mod:`.fmriprep`: :func:`read_fmriprep` reads fMRIPrep derivatives
  (``sub-*/ses-*/func/*_task-<episode>_space-*_desc-preproc_bold.nii.gz`` with the run's
  ``desc-brain_mask`` and ``desc-confounds_timeseries.tsv``, found by
  :func:`find_fmriprep_runs`) through a :class:`FmriprepMasker`, fit and transform as nilearn's
  maskers: :class:`~nilearn.maskers.NiftiLabelsMasker` with an atlas (parcels) or
  :class:`~nilearn.maskers.NiftiMasker` with a mask (voxels), confounds from
  :func:`nilearn.interfaces.fmriprep.load_confounds` (:data:`DEFAULT_CONFOUNDS`, the study's
  strategy), z-scored per run, no detrending.  Extraction is cached per run.
- :mod:`.algonauts`: :func:`find_algonauts_h5` picks a subject's Friends file in the
  Algonauts 2025 release by its BIDS entities (``task-friends``), and
  :func:`read_algonauts_h5` reads it: one dataset per run named ``ses-XXX_task-<episode>``.
- :mod:`.arrays`: :func:`write_npz_cache` / :func:`read_npz_cache` store and read a plain
  per-run array cache (one ``.npy`` per run plus a JSON sidecar), as the study did.

Files of a datalad clone that were not fetched are broken git-annex links; reading one raises
a DataError that says so and gives the ``datalad get`` command.  An episode acquired twice
(two sessions) keeps its first session, in session order, and one INFO log line lists the
repeats that were ignored.

Every problem in the inputs raises :class:`~training.data.errors.DataError` naming the file.
"""

from .algonauts import bids_entities, find_algonauts_h5, read_algonauts_h5
from .arrays import read_npz_cache, write_npz_cache
from .fmriprep import (
    DEFAULT_CONFOUNDS,
    DEFAULT_SPACE,
    FmriprepMasker,
    FmriprepRun,
    find_fmriprep_runs,
    read_fmriprep,
)
from .runs import DEFAULT_TR, BrainRuns

__all__ = [
    "DEFAULT_CONFOUNDS",
    "DEFAULT_SPACE",
    "DEFAULT_TR",
    "BrainRuns",
    "FmriprepMasker",
    "FmriprepRun",
    "bids_entities",
    "find_algonauts_h5",
    "find_fmriprep_runs",
    "read_algonauts_h5",
    "read_fmriprep",
    "read_npz_cache",
    "write_npz_cache",
]
