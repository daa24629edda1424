"""Data for retraining SoundNet on brain activity.

Readers of brain data (:mod:`~training.data.fmri`), the stimulus cache
(:mod:`~training.data.stimuli`), pairing and splits (:mod:`~training.data.pairing`) and
training windows (:mod:`~training.data.windows`).  A typical pipeline::

    brain = read_fmriprep(deriv_dir, "sub-01", atlas=atlas, cache_dir=cache / "fmri")
    # or: brain = read_algonauts_h5(find_algonauts_h5(fmri_dir, "sub-01"))
    stimuli = StimulusCache(stimuli_dir, cache / "audio")
    split = split_by_season(set(brain.episodes) & set(stimuli.episodes()), seed=0)
    parts = split_runs(pair_runs(brain, stimuli, episodes=split.train + split.validation), split)
    train = WindowDataset(parts.train, window_trs=70, history_samples=history)

Every data problem raises :class:`DataError`, naming the file at fault.
"""

from ._io import is_unfetched, require_file
from .errors import DataError
from .fmri import (
    DEFAULT_CONFOUNDS,
    DEFAULT_SPACE,
    DEFAULT_TR,
    BrainRuns,
    FmriprepRun,
    bids_entities,
    find_algonauts_h5,
    find_fmriprep_runs,
    read_algonauts_h5,
    read_fmriprep,
    read_npz_cache,
    write_npz_cache,
)
from .pairing import (
    PairedRun,
    Split,
    SplitRuns,
    pair_runs,
    parse_episode,
    season_of,
    split_by_season,
    split_from_lists,
    split_runs,
    whole_episode,
)
from .stimuli import SAMPLE_RATE, StimulusCache, decode_audio, find_stimuli, scan_stimuli
from .windows import WindowDataset, make_example, tr_boundaries, window_samples, window_starts

__all__ = [
    "DEFAULT_CONFOUNDS",
    "DEFAULT_SPACE",
    "DEFAULT_TR",
    "SAMPLE_RATE",
    "BrainRuns",
    "DataError",
    "FmriprepRun",
    "PairedRun",
    "Split",
    "SplitRuns",
    "StimulusCache",
    "WindowDataset",
    "bids_entities",
    "decode_audio",
    "find_algonauts_h5",
    "find_fmriprep_runs",
    "find_stimuli",
    "is_unfetched",
    "make_example",
    "pair_runs",
    "parse_episode",
    "read_algonauts_h5",
    "read_fmriprep",
    "read_npz_cache",
    "require_file",
    "scan_stimuli",
    "season_of",
    "split_by_season",
    "split_from_lists",
    "split_runs",
    "tr_boundaries",
    "window_samples",
    "whole_episode",
    "window_starts",
    "write_npz_cache",
]
