"""From an experiment config to the data a run trains on: checked brain runs, stimuli, splits.

Two steps, so that a wrong path or a bad file fails in seconds, before hours of decoding:

1. :func:`plan_data` reads and checks every configured subject's brain runs (through the reader
   ``data.source`` names: :func:`read_subject`), finds the soundtracks (without decoding them)
   and chooses the split: a :class:`DataPlan`. :func:`prepare_data` also decodes and caches the
   split's soundtracks (the shared work one process does before training).
2. :func:`load_splits` pairs each subject's runs with their soundtracks, sorts them into the
   split and groups them by episode: a :class:`~training.data.episodes.DataSplits`.

Every data problem raises :class:`~training.data.errors.DataError` naming the file or subject at
fault; a config that cannot work raises :class:`~training.config.ConfigError`.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError, DataConfig, ExperimentConfig
from ._io import require_file
from .episodes import DataSplits, Episode
from .errors import DataError
from .fmri import BrainRuns, find_algonauts_h5, read_algonauts_h5, read_fmriprep, read_npz_cache
from .pairing import Split, pair_runs, season_of, split_by_season, split_from_lists, split_runs
from .stimuli import StimulusCache

__all__ = ["DataPlan", "data_root", "load_splits", "plan_data", "prepare_data", "read_subject"]

log = logging.getLogger(__name__)


def data_root(config: ExperimentConfig) -> Path:
    """``data.root``; for the synthetic source, the dataset there, generated on first use."""
    root = Path(config.data.root)
    if config.data.source != "synthetic":
        return root
    from ..synthetic import SyntheticDataset, generate_friends_like

    data = config.data
    if (root / "dataset_description.json").is_file():
        dataset = SyntheticDataset.load(root)
        if (dataset.size, dataset.seed) != (data.synthetic_size, data.synthetic_seed):
            raise ConfigError(f"{root} holds the synthetic dataset of size {dataset.size!r} and seed "
                              f"{dataset.seed}, but the config asks for data.synthetic_size = "
                              f"{data.synthetic_size!r}, data.synthetic_seed = {data.synthetic_seed}; "
                              "point data.root elsewhere")
        return root
    try:
        generate_friends_like(root, seed=data.synthetic_seed, size=data.synthetic_size)
    except FileExistsError as error:
        raise ConfigError(f"data.root = {str(root)!r}: {error}") from None
    return root


@dataclass
class DataPlan:
    """What a run reads, known before any soundtrack is decoded.

    Every configured subject's brain runs (read and checked), the stimulus files (found, not
    decoded), the split, and :attr:`used`: the split's episodes that have both a soundtrack
    and a run of some subject (the only ones ever decoded).
    """

    root: Path
    cache: Path
    stimuli: StimulusCache
    brains: dict[str, BrainRuns]
    split: Split
    used: list[str]


def plan_data(config: ExperimentConfig) -> DataPlan:
    """Read and check every subject's brain data, then choose the split; decode nothing.

    A wrong path, an unfetched file or a bad run fails here, in seconds, not after hours of
    decoding. Only runs with both fMRI and a soundtrack are split.

    Raises :class:`~training.data.errors.DataError` naming the file or subject at fault.
    """
    data = config.data
    root = data_root(config)
    cache = Path(data.cache_dir) if data.cache_dir else root / "cache"
    stimuli = StimulusCache(Path(data.stimuli) if data.stimuli else _find_stimuli_dir(root), cache / "audio")
    with_audio = set(stimuli.episodes()) | set(stimuli.unfetched)
    brains = {subject: _read_checked(config, subject, root, cache, _episodes_to_read(data, with_audio))
              for subject in config.subjects.ids}
    both_set = {e for brain in brains.values() for e in brain.runs} & with_audio
    both = sorted(both_set)
    for subject, brain in brains.items():
        silent = [e for e in brain.episodes if e not in with_audio]
        if silent:
            warnings.warn(f"{subject}: {len(silent)} run(s) have no soundtrack in {stimuli.stimuli_dir} "
                          f"and are skipped: {', '.join(silent[:10])}{' ...' if len(silent) > 10 else ''}",
                          stacklevel=2)
    if not both:
        raise DataError(f"no run of {config.subjects.ids} has a soundtrack in {stimuli.stimuli_dir} "
                        f"(runs: {sorted(brains[config.subjects.ids[0]].runs)[:4]}..., soundtracks: "
                        f"{sorted(with_audio)[:4]}...); check data.stimuli")
    if data.train_episodes or data.val_episodes or data.test_episodes:
        split = split_from_lists(data.train_episodes, data.val_episodes, data.test_episodes)
    else:
        split = split_by_season(both, test_seasons=data.test_seasons or None,
                                train_seasons=data.train_seasons or None,
                                val_fraction=data.val_fraction, seed=data.split_seed)
    used = [e for e in split.train + split.validation + split.test if e in both_set]
    unfetched = [stimuli.unfetched[e] for e in used if e in stimuli.unfetched]
    if unfetched:
        raise DataError(f"{len(unfetched)} soundtrack(s) of the split not fetched: datalad get "
                        + " ".join(str(path) for path in unfetched))
    return DataPlan(root, cache, stimuli, brains, split, used)


def _episodes_to_read(data: DataConfig, with_audio: set[str]) -> set[str] | None:
    """Episodes worth reading from the brain files: those the split can use (None: all).

    Reading only these leaves other seasons' files untouched (they may not be fetched).
    """
    explicit = set(data.train_episodes) | set(data.val_episodes) | set(data.test_episodes)
    if explicit:
        return explicit
    if data.train_seasons and data.test_seasons:
        seasons = set(data.train_seasons) | set(data.test_seasons)
        return {e for e in with_audio if season_of(e) in seasons}
    return None


def _read_checked(config: ExperimentConfig, subject: str, root: Path, cache: Path,
                  episodes: set[str] | None) -> BrainRuns:
    """:func:`read_subject`, refusing a TR other than ``data.tr``."""
    brain = read_subject(config, subject, root, cache, episodes=episodes)
    if abs(brain.tr - config.data.tr) > 1e-3:
        raise DataError(f"{brain.source or subject}: TR is {brain.tr} s but data.tr = {config.data.tr} s")
    return brain


def prepare_data(config: ExperimentConfig) -> DataPlan:
    """The shared work before training, done by one process: generate the synthetic data if
    missing, read and check every brain file, then decode and cache the soundtracks the split
    uses (and only those). Returns the plan, for :func:`load_splits` in the same process."""
    plan = plan_data(config)
    log.info("decoding %d soundtrack(s) of the split (%d already cached)", len(plan.used),
             sum(plan.stimuli.cache_path(e).is_file() for e in plan.used))
    plan.stimuli.prepare(plan.used)
    return plan


def read_subject(config: ExperimentConfig, subject: str, root: Path, cache: Path,
                 episodes: set[str] | None = None) -> BrainRuns:
    """One subject's runs (only ``episodes`` when given) through the reader ``data.source`` names."""
    data = config.data
    if data.source == "synthetic":
        from ..synthetic import SyntheticDataset

        dataset = SyntheticDataset.load(root)
        if subject not in dataset.subjects:
            raise DataError(f"{root}: the synthetic dataset has subjects {list(dataset.subjects)}, "
                            f"not {subject!r}")
        brain = dataset.read_h5(subject)
        return brain if episodes is None else _keep(brain, episodes, root)
    if data.source == "algonauts":
        if data.brain_file:
            path = require_file(data.brain_file.replace("{subject}", subject), "data.brain_file")
        else:
            path = find_algonauts_h5(root, subject)
        log.info("%s: brain data from %s", subject, path)
        return read_algonauts_h5(path, subject, tr=data.tr, episodes=episodes)
    if data.source == "fmriprep":
        if bool(data.atlas) == bool(data.mask):
            raise ConfigError("data.source = 'fmriprep' needs exactly one of data.atlas (parcels) "
                              "and data.mask (voxels)")
        for key in ("atlas", "mask", "atlas_labels"):
            if getattr(data, key):
                require_file(getattr(data, key), f"data.{key}")
        standardize = False if data.standardize == "none" else data.standardize
        return read_fmriprep(root, subject, atlas=data.atlas or None, mask=data.mask or None,
                             atlas_labels=data.atlas_labels or None, confounds=data.confound_options(),
                             standardize=standardize, smoothing_fwhm=data.smoothing_fwhm or None,
                             resample_atlas=data.resample_atlas, space=data.space, episodes=episodes,
                             tr=data.tr, cache_dir=cache / "fmri")
    brain = read_npz_cache(root / subject, subject, tr=data.tr)
    return brain if episodes is None else _keep(brain, episodes, root / subject)


def _keep(brain: BrainRuns, episodes: set[str], where: Path) -> BrainRuns:
    """``brain``'s runs of ``episodes``; a DataError naming ``where`` if none is left."""
    kept = brain.select(e for e in brain.episodes if e in episodes)
    if not kept.runs:
        raise DataError(f"{where}: {brain.subject} has no run of the episodes the split can use")
    return kept


def load_splits(config: ExperimentConfig, plan: DataPlan | None = None) -> DataSplits:
    """Read the configured subjects' runs and soundtracks, pair and split them into episodes.

    Every brain file is read and checked first (:func:`plan_data`, unless ``plan``, e.g.
    :func:`prepare_data`'s, is given); only then are the split's soundtracks opened (decoded if
    :func:`prepare_data` has not cached them).

    Raises :class:`~training.data.errors.DataError` (naming the file or subject) for a subject
    with no training run, targets with NaNs, inconsistent TRs, and the data modules' other rules.
    """
    plan = plan if plan is not None else plan_data(config)
    split = plan.split
    # part -> episode -> (its waveform, subject -> targets): the subjects' runs of one episode share it
    parts: dict[str, dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]] = {"train": {}, "validation": {},
                                                                             "test": {}}
    names, sources, missing, ceilings = {}, {}, {}, {}
    for subject, brain in plan.brains.items():
        runs = split_runs(pair_runs(brain, plan.stimuli, episodes=plan.used), split, subject=brain.subject)
        names[subject], sources[subject], missing[subject] = brain.target_names, brain.source, runs.missing
        ceilings[subject] = brain.noise_ceiling
        for part, by_episode in parts.items():
            for run in getattr(runs, part):
                by_episode.setdefault(run.episode, (run.waveform, {}))[1][subject] = run.targets
    episodes = {part: [Episode(name, waveform, targets) for name, (waveform, targets) in sorted(by_episode.items())]
                for part, by_episode in parts.items()}
    if not episodes["validation"]:
        raise DataError(f"no validation runs for {config.subjects.ids} in the split {split.as_dict()['validation']}; "
                        "set data.val_fraction > 0 or data.val_episodes")
    return DataSplits(episodes["train"], episodes["validation"], episodes["test"], config.data.tr, names,
                      split, sources, missing, ceilings, plan.cache / "features")


def _find_stimuli_dir(root: Path) -> Path:
    """The stimuli folder of a data root, when ``data.stimuli`` does not name one."""
    for name in ("stimuli", "audio", "stimuli/audio"):
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root}: no stimuli folder (stimuli/ or audio/); set data.stimuli")
