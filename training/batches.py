"""Training batches: windows of TRs over episodes, with the frozen layers' output cached when exact.

An :class:`EpisodeSet` holds the :class:`~training.data.episodes.Episode` objects of one split
(from :func:`training.data.loading.load_splits`) for a given
:class:`~training.model.EncodingModel` and turns lists of ``(episode, start TR)`` into batches:

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
replays the same order. Evaluation windows (:func:`window_starts`) tile each run exactly once
(the last window is aligned to the run's end and counts only the TRs not seen before).
"""
from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hear_brainsoundnet.soundnet import frame_geometry

from .data._io import atomic_save_npy, drop_resident_pages
from .data.episodes import Episode
from .model import EncodingModel, EpisodeGeometry, WindowBatchNorm, WindowSlice, crop_audio


def window_starts(n_trs: int, window_trs: int) -> list[int]:
    """First TR of each evaluation window of ``window_trs`` TRs over a run of ``n_trs`` TRs.

    Windows tile the run from TR 0 without overlap; a final partial window is moved back to end
    at the last TR, so every TR is covered. A run shorter than one window gives ``[]``.
    """
    if window_trs < 1:
        raise ValueError(f"window_trs must be >= 1, got {window_trs}")
    if n_trs < window_trs:
        return []
    starts = list(range(0, n_trs - window_trs + 1, window_trs))
    if starts[-1] + window_trs < n_trs:
        starts.append(n_trs - window_trs)
    return starts


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
                atomic_save_npy(path, features.cpu().numpy())
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
                for start in window_starts(geometry.n_trs, self.window_trs)]

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
