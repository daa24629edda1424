"""Training batches: windows of TRs over episodes, with the frozen layers' output cached when exact.

An :class:`Episode` is one soundtrack (a float32 waveform at 22,050 Hz, typically a memory map
from :class:`training.data.stimuli.StimulusCache`) and the runs of every subject who watched it
(``(n_TR, n_targets)`` arrays). An :class:`EpisodeSet` holds the episodes of one split for a
given :class:`~training.model.EncodingModel` and turns lists of ``(episode, start TR)`` into
batches:

- the frozen layers' output (the model's *prefix*) for the window's frames comes from a cache of
  whole-episode features, computed once, when the prefix runs on BatchNorm running statistics
  (then it is a fixed function of the audio and the cache is exact: the same numbers as running
  the prefix on the window's audio, to float rounding; see ``tests/test_model.py``); otherwise
  the window's audio is cut from the episode (with the real preceding audio) and the prefix
  runs on it;
- targets are stacked per subject, with a mask for TRs a subject does not have (a group model's
  subjects may have runs of different lengths, or miss an episode).

Window order: each epoch, every episode is tiled with as many consecutive windows as fit,
starting at a random offset within the TRs the tiling leaves over (so those fall elsewhere each
epoch), and all windows are shuffled, both drawn from ``(seed, epoch)`` alone, so a resumed run
replays the same order. Evaluation windows tile each run exactly once (the last
window is aligned to the run's end and counts only the TRs not seen before).
"""
from __future__ import annotations

import hashlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hear_brainsoundnet.soundnet import frame_geometry

from hear_brainsoundnet.files import atomic_write

from .config import ConfigError, ExperimentConfig
from .data._io import drop_resident_pages
from .data import (BrainRuns, DataError, Split, StimulusCache, find_algonauts_h5, pair_runs,
                   read_algonauts_h5, read_fmriprep, read_npz_cache, require_file, season_of,
                   split_by_season, split_from_lists, split_runs, window_starts)
from .model import EncodingModel, EpisodeGeometry, WindowBatchNorm, WindowSlice, crop_audio

log = logging.getLogger(__name__)


@dataclass
class Episode:
    """One episode's audio and every subject's run of it (``subject -> (n_TR, n_targets)``)."""

    name: str
    waveform: np.ndarray
    targets: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError(f"episode {self.name}: no subject has a run of it")
        for subject, array in self.targets.items():
            if array.ndim != 2 or array.shape[0] == 0:
                raise ValueError(f"{subject} run {self.name}: targets must be (n_TR > 0, n_targets), "
                                 f"got {array.shape}")
            if not np.isfinite(array).all():
                rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
                raise ValueError(f"{subject} run {self.name}: targets contain NaN or infinite values "
                                 f"({rows.size} TR(s), first at TR {rows[0]}); fix or drop the run")
        if self.waveform.ndim != 1 or len(self.waveform) == 0:
            raise ValueError(f"episode {self.name}: waveform must be 1-D and non-empty, "
                             f"got shape {self.waveform.shape}")

    @property
    def n_trs(self) -> int:
        return max(array.shape[0] for array in self.targets.values())


@dataclass
class Batch:
    """Model inputs and targets of a list of windows (one row per window)."""

    windows: list[WindowSlice]
    prefix: torch.Tensor  # (B, C, prefix_length): the trunk's input
    targets: dict[str, torch.Tensor]  # subject -> (B_s, n, n_targets)
    rows: dict[str, torch.Tensor]  # subject -> indices of the windows that subject has
    mask: dict[str, torch.Tensor]  # subject -> (B_s, n) bool: TRs that count in the loss


@dataclass
class EpisodeSet:
    """The episodes of one split, ready to cut windows for ``model``."""

    name: str
    episodes: list[Episode]
    model: EncodingModel
    tr: float
    window_trs: int
    use_cache: bool = True
    progress: bool = False
    geometries: list[EpisodeGeometry] = field(init=False)
    cache: dict[int, torch.Tensor] = field(init=False, default_factory=dict)
    prefix_seconds: float = field(init=False, default=0.0)  # time spent running frozen layers

    def __post_init__(self) -> None:
        kept, self.geometries, short = [], [], []
        for e in self.episodes:
            try:  # raises for fewer TRs than a window, or too little audio for its frames
                geometry = EpisodeGeometry(e.n_trs, len(e.waveform), tr=self.tr,
                                           prefix=self.model.prefix_layer,
                                           context=self.model.kernel_trs - 1,
                                           window_trs=self.window_trs,
                                           name=f"{self.name} episode {e.name}")
            except ValueError:
                short.append(e)
                continue
            kept.append(e)
            self.geometries.append(geometry)
        if short:  # one short half-episode must not abort hours of training
            warnings.warn(f"{self.name}: {len(short)} episode(s) too short for one window of "
                          f"train.window_trs = {self.window_trs} TRs are skipped: "
                          + ", ".join(f"{e.name} ({e.n_trs} TRs)" for e in short), stacklevel=2)
        self.episodes = kept
        if not self.episodes:
            raise ValueError(f"the {self.name} split has no episode long enough for one window of "
                             f"train.window_trs = {self.window_trs} TRs")
        self.use_cache = self.use_cache and self.model.prefix_cacheable

    @property
    def subjects(self) -> list[str]:
        return sorted({s for e in self.episodes for s in e.targets})

    @property
    def n_trs(self) -> int:
        """TRs of all subjects' runs (what an epoch covers, up to the window offsets)."""
        return sum(a.shape[0] for e in self.episodes for a in e.targets.values())

    def build_cache(self, device: torch.device | str = "cpu", folder: str | Path | None = None) -> None:
        """Compute every episode's prefix features once (no-op when they cannot be cached).

        With ``folder``, features are also kept on disk (``.npy``, written atomically) under a
        key that hashes the frozen weights, the layer and the audio, so that other runs with
        the same frozen layers (e.g. head-only models of every subject) reuse them.
        """
        if not self.use_cache:
            return
        fingerprint = _frozen_fingerprint(self.model) if folder is not None else ""
        items = range(len(self.episodes))
        for i in tqdm(items, desc=f"caching {self.model.prefix_layer} ({self.name})",
                      disable=not self.progress, leave=False):
            if i in self.cache:
                continue
            episode, geometry = self.episodes[i], self.geometries[i]
            path = None
            if folder is not None:
                key = hashlib.sha256(f"{fingerprint}/{geometry.n_samples}/{_audio_identity(episode.waveform)}".encode())
                path = Path(folder) / f"{episode.name}_{self.model.prefix_layer}_{key.hexdigest()[:20]}.npy"
                if path.is_file():
                    cached = _load_cached_features(path)
                    if cached is not None:
                        self.cache[i] = cached.to(device)
                        continue
            features = self.model.episode_features(episode.waveform, geometry)
            drop_resident_pages(episode.waveform)  # read once: keep RSS to what is cached
            if path is not None:
                atomic_write(path, lambda tmp, array=features.cpu().numpy(): _save_npy(tmp, array))
            self.cache[i] = features.to(device)

    # -- window lists --------------------------------------------------------------------------

    def train_windows(self, seed: int, epoch: int) -> list[tuple[int, int]]:
        """This epoch's shuffled ``(episode index, start TR)`` list, a function of (seed, epoch)."""
        rng = np.random.default_rng([seed, epoch])
        windows = []
        for i, geometry in enumerate(self.geometries):
            slack = geometry.n_trs % self.window_trs  # TRs left over by the tiling: random place
            windows += [(i, start) for start in geometry.windows(int(rng.integers(slack + 1)))]
        order = rng.permutation(len(windows))
        return [windows[j] for j in order]

    def eval_windows(self) -> list[tuple[int, int]]:
        """Windows that cover every TR of every episode once (see :meth:`counted_trs`)."""
        return [(i, start) for i, geometry in enumerate(self.geometries)
                for start in window_starts(geometry.n_trs, self.window_trs, last="shift")]

    def counted_trs(self, item: tuple[int, int], evaluation: bool) -> np.ndarray:
        """Bool ``(window_trs,)``: TRs of the window that count (an end-aligned evaluation
        window skips the TRs its predecessor already covered)."""
        counted = np.ones(self.window_trs, dtype=bool)
        if evaluation:
            i, start = item
            overlap = (self.geometries[i].n_trs // self.window_trs) * self.window_trs - start
            if start % self.window_trs and overlap > 0:
                counted[:overlap] = False
        return counted

    # -- batches --------------------------------------------------------------------------------

    def prefix_frames(self, i: int, window: WindowSlice) -> torch.Tensor:
        """Prefix frames ``(C, prefix_length)`` of one window: from the cache, else computed."""
        if self.use_cache:
            return self.cache[i][:, window.prefix_start:window.prefix_stop]
        s0, s1 = window.samples
        device = next(self.model.parameters()).device
        audio = crop_audio(self.episodes[i].waveform, s0, s1).to(device)[None]
        start = time.perf_counter()
        frames = self.model.prefix(audio)[0]
        self.prefix_seconds += time.perf_counter() - start
        drop_resident_pages(self.episodes[i].waveform)
        offset = s0 // frame_geometry(self.model.prefix_layer).hop
        return frames[:, window.prefix_start - offset:window.prefix_stop - offset]

    def batch(self, items: Sequence[tuple[int, int]], device: torch.device | str = "cpu",
              evaluation: bool = False) -> Batch:
        """Inputs and targets of the windows ``items`` (``(episode index, start TR)``)."""
        windows = [self.geometries[i].window(start) for i, start in items]
        prefix = torch.stack([self.prefix_frames(i, w) for (i, _), w in zip(items, windows)]).to(device)
        n = self.window_trs
        targets, rows, masks = {}, {}, {}
        for subject in self.subjects:
            chosen, arrays, mask = [], [], []
            for row, (i, start) in enumerate(items):
                run = self.episodes[i].targets.get(subject)
                if run is None or start >= run.shape[0]:
                    continue
                piece = np.zeros((n, run.shape[1]), dtype=np.float32)
                have = run[start:start + n]
                piece[:len(have)] = have
                valid = np.zeros(n, dtype=bool)
                valid[:len(have)] = True
                chosen.append(row)
                arrays.append(piece)
                mask.append(valid & self.counted_trs((i, start), evaluation))
            if chosen:
                targets[subject] = torch.from_numpy(np.stack(arrays)).to(device)
                rows[subject] = torch.tensor(chosen, device=device)
                masks[subject] = torch.from_numpy(np.stack(mask)).to(device)
        return Batch(windows, prefix, targets, rows, masks)


def _audio_identity(waveform: np.ndarray) -> str:
    """A decoded-audio file's path, size and mtime (a StimulusCache memory map), else a hash of
    the samples: hashing hours of audio on every run would cost more than it saves."""
    filename = getattr(waveform, "filename", None)
    if isinstance(waveform, np.memmap) and filename:
        stat = Path(filename).stat()
        return f"{Path(filename).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(np.ascontiguousarray(waveform, dtype=np.float32).tobytes()).hexdigest()


def _load_cached_features(path: Path) -> torch.Tensor | None:
    """A feature-cache file, or None (after a warning naming it, and its removal) when it cannot
    be read: it is only a cache, so a damaged file (a disk that filled up, a copy cut short) is
    recomputed rather than stopping the run."""
    try:
        array = np.load(path, allow_pickle=False)
        if array.ndim != 2 or array.dtype != np.float32:
            raise ValueError(f"a {array.dtype} array of shape {array.shape}, not 2-D float32 features")
        if not np.isfinite(array).all():
            raise ValueError("non-finite values")
    except (ValueError, OSError, EOFError) as error:
        warnings.warn(f"{path}: unreadable feature-cache file ({error}); removed, recomputing it",
                      stacklevel=3)
        path.unlink(missing_ok=True)
        return None
    return torch.from_numpy(array)


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.save would append ".npy" to the name
        np.save(handle, array, allow_pickle=False)


def _frozen_fingerprint(model: EncodingModel) -> str:
    """sha256 of the frozen layers' weights and statistics and of how they run."""
    digest = hashlib.sha256(f"{model.prefix_layer}/{model.batchnorm}".encode())
    for name, tensor in sorted(model.backbone.state_dict().items()):
        if name.split(".")[1] in model.frozen:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def batch_errors(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window: summed squared error and number of (TR, target) values counted, ``(B,)`` each.

    ``model`` is an :class:`EncodingModel` or its DistributedDataParallel wrapper.
    """
    predictions = model(batch.prefix, batch.windows, batch.rows)
    n_windows = len(batch.windows)
    sq_sum = batch.prefix.new_zeros(n_windows)
    count = batch.prefix.new_zeros(n_windows)
    for subject, target in batch.targets.items():
        rows = batch.rows[subject]
        prediction = predictions[subject]
        mask = batch.mask[subject][:, :, None].to(prediction.dtype)
        error = ((prediction - target) ** 2 * mask).sum(dim=(1, 2))
        sq_sum = sq_sum.index_add(0, rows, error)
        count = count.index_add(0, rows, mask.sum(dim=(1, 2)) * target.shape[2])
    return sq_sum, count


def shard(items: Sequence, rank: int, world: int) -> list:
    """Every ``world``-th item from ``rank``: a DDP rank's share of a batch or list."""
    return list(items[rank::world])


def batches_of(items: Sequence, size: int, drop_last: bool) -> Iterable[list]:
    """Consecutive groups of ``size`` items (the last, shorter group dropped if ``drop_last``)."""
    stop = len(items) - (len(items) % size if drop_last else 0)
    for begin in range(0, stop, size):
        yield list(items[begin:begin + size])


def recalibrate_batchnorm(model: EncodingModel, episodes: EpisodeSet, device: torch.device | str,
                          batch_windows: int = 8) -> None:
    """Set the running statistics of every window-statistics BatchNorm to their exact average
    over one tiling of the training windows, with the current weights (as
    :func:`torch.optim.swa_utils.update_bn` does). Every DDP rank computes the same numbers."""
    layers = [m for m in model.modules() if isinstance(m, WindowBatchNorm)]
    if not layers:
        return
    model.train()
    if not any(layer.training for layer in layers):
        return
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    items = [(i, s) for i, g in enumerate(episodes.geometries) for s in g.windows(0)]
    try:
        with torch.no_grad():
            for group in batches_of(items, batch_windows, drop_last=False):
                batch = episodes.batch(group, device)
                model.features_from_prefix(batch.prefix, batch.windows)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


def fit_head_statistics(model: EncodingModel, episodes: EpisodeSet, device: torch.device | str,
                        batch_windows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the head's input over the training windows (one tiling).

    Computed as in training (window statistics where the condition trains BatchNorm), without
    moving any running statistic.
    """
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    model.train()
    total = sq = None
    count = 0
    items = [(i, s) for i, g in enumerate(episodes.geometries) for s in g.windows(0)]
    with torch.no_grad():
        for group in batches_of(items, batch_windows, drop_last=False):
            batch = episodes.batch(group, device)
            features, _ = model.features_from_prefix(batch.prefix, batch.windows)
            own = features[:, :, model.kernel_trs - 1:].double()  # each window's own TRs
            s, s2 = own.sum(dim=(0, 2)), (own ** 2).sum(dim=(0, 2))
            total = s if total is None else total + s
            sq = s2 if sq is None else sq + s2
            count += own.shape[0] * own.shape[2]
    model.load_state_dict({**model.state_dict(), **saved})
    mean = total / count
    std = (sq / count - mean ** 2).clamp_min(0).sqrt()
    return mean.float(), std.float()


# ----------------------------------------------------------------------------------------------
# From a config to episodes
# ----------------------------------------------------------------------------------------------

@dataclass
class DataSplits:
    """Training, validation and test episodes of the configured subjects."""

    train: list[Episode]
    validation: list[Episode]
    test: list[Episode]
    tr: float
    target_names: dict[str, list[str]]
    split: Split
    sources: dict[str, str]
    missing: dict[str, dict[str, list[str]]]
    noise_ceiling: dict[str, np.ndarray | None] = field(default_factory=dict)  # per subject, if known
    feature_cache_dir: Path | None = None  # where runs share cached frozen-layer features

    def restricted_to(self, subjects: Sequence[str]) -> "DataSplits":
        """The same splits with only ``subjects``' runs (episodes nobody left has are dropped)."""
        missing = [s for s in subjects if s not in self.target_names]
        if missing:
            raise DataError(f"no data loaded for subject(s) {missing}; loaded: {sorted(self.target_names)}")
        for subject in subjects:
            if not any(subject in e.targets for e in self.train):
                raise DataError(f"{subject} has no training runs (training episodes: "
                                f"{[e.name for e in self.train][:6]})")
        if set(subjects) == set(self.target_names):
            return self

        def keep(episodes: list[Episode]) -> list[Episode]:
            return [Episode(e.name, e.waveform, {s: a for s, a in e.targets.items() if s in subjects})
                    for e in episodes if any(s in e.targets for s in subjects)]
        return DataSplits(keep(self.train), keep(self.validation), keep(self.test), self.tr,
                          {s: self.target_names[s] for s in subjects}, self.split,
                          {s: self.sources[s] for s in subjects}, {s: self.missing[s] for s in subjects},
                          {s: self.noise_ceiling.get(s) for s in subjects}, self.feature_cache_dir)

    def describe(self) -> dict[str, Any]:
        """What the run trained on, for provenance (JSON-ready)."""
        return {"tr": self.tr, "split": self.split.as_dict(), "sources": self.sources,
                "missing_runs": self.missing,
                "n_targets": {s: len(n) for s, n in self.target_names.items()},
                "train_trs": {s: sum(e.targets[s].shape[0] for e in self.train if s in e.targets)
                              for s in self.target_names}}


def data_root(config: ExperimentConfig) -> Path:
    """``data.root``; for the synthetic source, the dataset there, generated on first use."""
    root = Path(config.data.root)
    if config.data.source != "synthetic":
        return root
    from .synthetic import SyntheticDataset, generate_friends_like

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


def _episodes_to_read(data: Any, with_audio: set[str]) -> set[str] | None:
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
        from .synthetic import SyntheticDataset

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
    parts: dict[str, dict[str, dict[str, Any]]] = {"train": {}, "validation": {}, "test": {}}
    names, sources, missing, ceilings = {}, {}, {}, {}
    for subject, brain in plan.brains.items():
        runs = split_runs(pair_runs(brain, plan.stimuli, episodes=plan.used), split, subject=brain.subject)
        names[subject], sources[subject], missing[subject] = brain.target_names, brain.source, runs.missing
        ceilings[subject] = brain.noise_ceiling
        for part in parts:
            for run in getattr(runs, part):
                entry = parts[part].setdefault(run.episode, {"waveform": run.waveform, "targets": {}})
                entry["targets"][subject] = run.targets
    episodes = {part: [Episode(name, entry["waveform"], entry["targets"])
                       for name, entry in sorted(parts[part].items())] for part in parts}
    if not episodes["validation"]:
        raise DataError(f"no validation runs for {config.subjects.ids} in the split {split.as_dict()['validation']}; "
                        "set data.val_fraction > 0 or data.val_episodes")
    return DataSplits(episodes["train"], episodes["validation"], episodes["test"], config.data.tr, names,
                      split, sources, missing, ceilings, plan.cache / "features")


def _find_stimuli_dir(root: Path) -> Path:
    for name in ("stimuli", "audio", "stimuli/audio"):
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root}: no stimuli folder (stimuli/ or audio/); set data.stimuli")
