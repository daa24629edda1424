"""What a run trains on: episodes (one soundtrack, every subject's run of it), split in three.

An :class:`Episode` is one soundtrack (a float32 waveform at 22,050 Hz, typically a memory map
from :class:`~training.data.stimuli.StimulusCache`) and the runs of every subject who watched it
(``subject -> (n_TR, n_targets)``). :class:`DataSplits` holds the training, validation and test
episodes of the configured subjects, with what a run records about them (TR, target names, the
split, where each subject's data came from); :func:`training.data.loading.load_splits` builds it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import DataError
from .pairing import Split

__all__ = ["DataSplits", "Episode"]


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
        """The longest subject's run of this episode, in TRs."""
        return max(array.shape[0] for array in self.targets.values())


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

    def restricted_to(self, subjects: Sequence[str]) -> DataSplits:
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
