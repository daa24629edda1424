"""Data for retraining SoundNet on brain activity: from files to episodes paired with brain runs.

The pipeline the trainer runs (:func:`training.data.loading.load_splits`, from an experiment
config)::

    brain = read_fmriprep(deriv_dir, "sub-01", atlas=atlas, cache_dir=cache / "fmri")
    # or read_algonauts_h5(find_algonauts_h5(fmri_dir, "sub-01")), or read_npz_cache(folder)
    stimuli = StimulusCache(stimuli_dir, cache / "audio")           # decoded once, memory-mapped
    split = split_by_season(set(brain.episodes) & set(stimuli.episodes()), seed=0)
    runs = split_runs(pair_runs(brain, stimuli), split)               # PairedRun per episode
    # load_splits groups every subject's runs by episode: DataSplits of Episode objects,
    # which training.batches.EpisodeSet cuts into windows and batches.

Modules, in import order (each imports only those before it): :mod:`~training.data.errors`
(:class:`DataError`), :mod:`~training.data._io` (file helpers), :mod:`~training.data.fmri`
(brain-data readers, one module per source), :mod:`~training.data.stimuli` (the stimulus
cache), :mod:`~training.data.pairing` (pairing and splits), :mod:`~training.data.episodes`
(what a run trains on) and :mod:`~training.data.loading` (config to data; not imported here,
as it needs the experiment config).

Every data problem raises :class:`DataError`, naming the file at fault.
"""

from ._io import is_unfetched, require_file
from .episodes import DataSplits, Episode
from .errors import DataError
from .fmri import (
    DEFAULT_CONFOUNDS,
    DEFAULT_SPACE,
    DEFAULT_TR,
    BrainRuns,
    FmriprepMasker,
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

__all__ = [
    "DEFAULT_CONFOUNDS",
    "DEFAULT_SPACE",
    "DEFAULT_TR",
    "SAMPLE_RATE",
    "BrainRuns",
    "DataError",
    "DataSplits",
    "Episode",
    "FmriprepMasker",
    "FmriprepRun",
    "PairedRun",
    "Split",
    "SplitRuns",
    "StimulusCache",
    "bids_entities",
    "decode_audio",
    "find_algonauts_h5",
    "find_fmriprep_runs",
    "find_stimuli",
    "is_unfetched",
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
    "whole_episode",
    "write_npz_cache",
]
