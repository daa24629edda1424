"""Pairing brain runs with their soundtracks, and train / validation / test splits.

- :func:`pair_runs` joins a subject's :class:`~training.data.fmri.BrainRuns` with the
  stimuli by episode id and returns :class:`PairedRun` objects.
- :func:`split_by_season` / :func:`split_from_lists` build a :class:`Split` (three
  disjoint tuples of episode ids); :func:`split_runs` sorts paired runs into it.

Rules (each is tested):

1. **A run with no stimulus** is skipped; one warning lists all such runs.
2. **A stimulus with no run** is ignored silently (stimuli are shared by all subjects, and
   a subject rarely has them all).
3. **Audio shorter than the run**: TR ``i`` covers the audio samples
   ``[b(i), b(i+1))`` with ``b(i) = round(i * TR * sample_rate)`` (see
   :func:`training.timebase.tr_boundaries`).  The run keeps only its volumes whose
   TR is fully covered by audio; the rest are trimmed off the end.  Trimming more than
   ``warn_trim_trs`` volumes (default 2) warns; more than ``max_trim_trs`` (default 20,
   about 30 s) is a :class:`~training.data.errors.DataError`: the audio probably belongs to
   another cut of the episode.
4. **Audio longer than the run**: the tail is ignored, without warning (the scanner
   stopped before the soundtrack ended).
5. **Subject-specific missing runs**: a split is defined on episode ids, so a subject
   without a run for an episode simply has fewer runs in that part; :func:`split_runs`
   logs the missing ones (INFO) and reports them in :attr:`SplitRuns.missing`.  A subject
   with **no training run** is a DataError naming the subject.

Splits by season use the episode id ``sSSeEE[h]`` (season ``SS``).  By default the last
season is the test set and the other seasons are split about 75 / 25 into training and
validation **by whole episode**: the halves ``a``, ``b`` (...) of one episode always fall on
the same side, so validation never sees the other half of a training episode.  The draw
uses a seeded generator over the sorted episodes you pass; pass the same list for every
subject and all subjects share one split.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .errors import DataError
from .fmri.runs import BrainRuns, natural_key
from ..timebase import tr_boundaries

__all__ = [
    "PairedRun",
    "Split",
    "SplitRuns",
    "pair_runs",
    "parse_episode",
    "season_of",
    "split_by_season",
    "split_from_lists",
    "split_runs",
    "whole_episode",
]

logger = logging.getLogger(__name__)

_EPISODE = re.compile(r"^s(?P<season>\d+)e(?P<episode>\d+)(?P<part>[a-z]*)$")
PARTS = ("train", "validation", "test")


class _Stimuli(Protocol):
    """What :func:`pair_runs` needs from a stimulus source (a :class:`StimulusCache`)."""

    sample_rate: int

    def episodes(self) -> list[str]: ...

    def waveform(self, episode: str) -> np.ndarray: ...


def parse_episode(episode: str) -> tuple[int, int, str]:
    """``"s01e02a"`` -> ``(1, 2, "a")``.

    Raises
    ------
    DataError
        The id does not follow ``s<season>e<episode>[part]``.
    """
    match = _EPISODE.match(episode)
    if match is None:
        raise DataError(f"episode id {episode!r} does not follow 's<season>e<episode>[part]' (e.g. 's01e02a')")
    return int(match["season"]), int(match["episode"]), match["part"]


def whole_episode(episode: str) -> str:
    """The episode a run belongs to, without its part: ``"s01e02a"`` -> ``"s01e02"``."""
    season, number, _ = parse_episode(episode)
    return f"s{season:02d}e{number:02d}"


def season_of(episode: str) -> int:
    """Season number of an episode id (``"s03e11b"`` -> 3)."""
    return parse_episode(episode)[0]


@dataclass(frozen=True)
class PairedRun:
    """One run of one subject with its soundtrack.

    Attributes
    ----------
    subject, episode : :obj:`str`
    targets : :class:`numpy.ndarray`
        ``(n_trs, n_targets)`` float32, already trimmed to the TRs covered by audio.
    waveform : :class:`numpy.ndarray`
        The whole episode soundtrack, ``(n_samples,)`` float32 (a memory map from a
        :class:`StimulusCache`), at least as long as ``n_trs`` TRs.
    tr : :obj:`float`
        Repetition time (s).
    sample_rate : :obj:`int`
    trimmed_trs : :obj:`int`
        Volumes dropped from the end because the audio did not cover them.
    """

    subject: str
    episode: str
    targets: np.ndarray
    waveform: np.ndarray
    tr: float
    sample_rate: int
    trimmed_trs: int = 0

    @property
    def n_trs(self) -> int:
        """Number of volumes (after trimming)."""
        return int(self.targets.shape[0])

    def boundaries(self) -> np.ndarray:
        """Sample index of the start of each TR and of the end of the last: ``(n_trs + 1,)``."""
        return tr_boundaries(self.n_trs, self.tr, self.sample_rate)


def pair_runs(
    brain: BrainRuns,
    stimuli: _Stimuli | Mapping[str, np.ndarray],
    *,
    sample_rate: int | None = None,
    episodes: Iterable[str] | None = None,
    warn_trim_trs: int = 2,
    max_trim_trs: int = 20,
) -> list[PairedRun]:
    """Pair a subject's runs with their soundtracks by episode id (rules 1-4 above).

    Parameters
    ----------
    brain : BrainRuns
        One subject's runs.
    stimuli : StimulusCache or mapping of :obj:`str` to :class:`numpy.ndarray`
        Soundtracks by episode id.  A plain mapping needs ``sample_rate``.
    sample_rate : :obj:`int`, optional
        Sample rate of a plain mapping's waveforms (ignored for a StimulusCache).
    episodes : iterable of :obj:`str`, optional
        Pair only these episodes (default: all runs of ``brain``).
    warn_trim_trs : :obj:`int`, default=2
        Warn when more volumes than this are trimmed because the audio is shorter.
    max_trim_trs : :obj:`int`, default=20
        Raise when more volumes than this would be trimmed.

    Returns
    -------
    :obj:`list` of PairedRun
        In natural episode order.

    Raises
    ------
    DataError
        Audio much shorter than a run (rule 3), or a waveform that is not 1-D.
    """
    available, waveform_of, rate = _stimulus_source(stimuli, sample_rate)
    wanted = brain.episodes if episodes is None else [e for e in brain.episodes if e in set(episodes)]
    missing = [episode for episode in wanted if episode not in available]
    if missing:
        warnings.warn(
            f"{brain.subject}: {len(missing)} run(s) have no stimulus and are skipped: {', '.join(missing)}",
            stacklevel=2,
        )
    paired = []
    for episode in wanted:
        if episode not in available:
            continue
        waveform = waveform_of(episode)
        if waveform.ndim != 1:
            raise DataError(f"{brain.subject} {episode}: waveform has shape {waveform.shape}, expected mono (n,)")
        covered = _covered_trs(brain, episode, waveform.shape[0], rate, warn_trim_trs, max_trim_trs)
        if covered == 0:
            warnings.warn(f"{brain.subject} {episode}: the audio covers no full TR; run skipped", stacklevel=2)
            continue
        targets = brain.runs[episode]
        paired.append(
            PairedRun(
                subject=brain.subject,
                episode=episode,
                targets=targets[:covered],
                waveform=waveform,
                tr=brain.tr,
                sample_rate=rate,
                trimmed_trs=targets.shape[0] - covered,
            )
        )
    return paired


def _stimulus_source(
    stimuli: _Stimuli | Mapping[str, np.ndarray], sample_rate: int | None
) -> tuple[set[str], Callable[[str], np.ndarray], int]:
    """The episodes a stimulus source has, how to get one's waveform, and their sample rate."""
    if isinstance(stimuli, Mapping):
        if sample_rate is None:
            raise ValueError("pair_runs: pass sample_rate= with a plain mapping of waveforms")
        return set(stimuli), stimuli.__getitem__, int(sample_rate)
    return set(stimuli.episodes()), stimuli.waveform, int(stimuli.sample_rate)


def _covered_trs(brain: BrainRuns, episode: str, n_samples: int, rate: int, warn_trim_trs: int,
                 max_trim_trs: int) -> int:
    """How many of a run's volumes ``n_samples`` of audio cover in full (rule 3 above).

    Warns when more than ``warn_trim_trs`` volumes are left uncovered; raises a DataError when
    more than ``max_trim_trs`` are.
    """
    n_trs = brain.runs[episode].shape[0]
    ends = tr_boundaries(n_trs, brain.tr, rate)[1:]
    covered = int(np.searchsorted(ends, n_samples, side="right"))
    trimmed = n_trs - covered
    if trimmed > max_trim_trs:
        raise DataError(
            f"{brain.subject} {episode}: the audio lasts {n_samples / rate:.2f} s but the run has "
            f"{n_trs} volumes ({n_trs * brain.tr:.2f} s): {trimmed} volumes would be trimmed "
            f"(more than max_trim_trs={max_trim_trs}); is it the right soundtrack?"
        )
    if trimmed > warn_trim_trs:
        warnings.warn(
            f"{brain.subject} {episode}: audio shorter than the run, trimming {trimmed} of {n_trs} volumes",
            stacklevel=3,
        )
    return covered


@dataclass(frozen=True)
class Split:
    """Disjoint train / validation / test episode ids.

    Raises
    ------
    DataError
        An episode appears in two parts.
    """

    train: tuple[str, ...]
    validation: tuple[str, ...] = ()
    test: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in PARTS:
            object.__setattr__(self, name, tuple(sorted(dict.fromkeys(getattr(self, name)), key=natural_key)))
        for i, first in enumerate(PARTS):
            for second in PARTS[i + 1 :]:
                both = set(getattr(self, first)) & set(getattr(self, second))
                if both:
                    raise DataError(f"split: episodes {sorted(both)} are in both {first} and {second}")

    def part_of(self, episode: str) -> str | None:
        """``"train"``, ``"validation"``, ``"test"`` or None for an episode id."""
        for name in PARTS:
            if episode in getattr(self, name):
                return name
        return None

    def as_dict(self) -> dict[str, list[str]]:
        """JSON-ready form (for run directories and reports)."""
        return {name: list(getattr(self, name)) for name in PARTS}


def split_from_lists(train: Iterable[str], validation: Iterable[str] = (), test: Iterable[str] = ()) -> Split:
    """A split from explicit episode lists (e.g. read from a config file)."""
    return Split(tuple(train), tuple(validation), tuple(test))


def split_by_season(
    episodes: Iterable[str],
    *,
    test_seasons: Sequence[int] | None = None,
    train_seasons: Sequence[int] | None = None,
    val_fraction: float = 0.25,
    seed: int = 0,
) -> Split:
    """Split episodes by season, as the study did (seasons 1-3 train/validation, 4 test).

    Parameters
    ----------
    episodes : iterable of :obj:`str`
        All episode ids to consider, e.g. :meth:`StimulusCache.episodes` (use the same
        list for every subject so that they share one split).
    test_seasons : sequence of :obj:`int`, optional
        Default: the last season present.
    train_seasons : sequence of :obj:`int`, optional
        Seasons split into training and validation; default: every other season.
        Episodes of seasons in neither list are left out.
    val_fraction : :obj:`float`, default=0.25
        Fraction of the train-season episodes drawn for validation: ``round(fraction * n)``
        whole episodes (all their parts ``a``, ``b``...), at least one when
        ``fraction > 0`` and there are two episodes or more.
    seed : :obj:`int`, default=0
        Seed of the draw (:func:`numpy.random.default_rng` permutation of the sorted
        episodes).

    Returns
    -------
    Split
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(dict.fromkeys(episodes), key=natural_key)
    if not ids:
        raise DataError("split_by_season: no episodes given")
    seasons = {episode: season_of(episode) for episode in ids}
    present = sorted(set(seasons.values()))
    test_set = set(test_seasons) if test_seasons is not None else {present[-1]}
    train_set = set(train_seasons) if train_seasons is not None else set(present) - test_set
    if test_set & train_set:
        raise ValueError(f"seasons {sorted(test_set & train_set)} are both train and test seasons")
    test = [e for e in ids if seasons[e] in test_set]
    groups: dict[str, list[str]] = {}  # whole episode -> its parts, in order
    for episode in ids:
        if seasons[episode] in train_set:
            groups.setdefault(whole_episode(episode), []).append(episode)
    pool = list(groups)
    n_val = int(math.floor(val_fraction * len(pool) + 0.5))
    if val_fraction > 0 and len(pool) >= 2:
        n_val = max(n_val, 1)
    order = np.random.default_rng(seed).permutation(len(pool))
    validation = [e for i in order[:n_val] for e in groups[pool[i]]]
    train = [e for i in order[n_val:] for e in groups[pool[i]]]
    return Split(tuple(train), tuple(validation), tuple(test))


@dataclass
class SplitRuns:
    """A subject's paired runs sorted into the parts of a :class:`Split`.

    Attributes
    ----------
    subject : :obj:`str`
    train, validation, test : :obj:`list` of PairedRun
    missing : :obj:`dict` of :obj:`str` to :obj:`list` of :obj:`str`
        Per part, the split's episodes this subject has no paired run for.
    unused : :obj:`list` of :obj:`str`
        Paired episodes that belong to no part.
    """

    subject: str
    train: list[PairedRun] = field(default_factory=list)
    validation: list[PairedRun] = field(default_factory=list)
    test: list[PairedRun] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)


def split_runs(runs: Sequence[PairedRun], split: Split, *, subject: str | None = None) -> SplitRuns:
    """Sort one subject's paired runs into a split (rule 5 above).

    Parameters
    ----------
    runs : sequence of PairedRun
        Output of :func:`pair_runs` for one subject.
    split : Split
    subject : :obj:`str`, optional
        Subject label for messages when ``runs`` is empty.

    Returns
    -------
    SplitRuns

    Raises
    ------
    DataError
        The subject has no training run, or ``runs`` mixes subjects.
    """
    subjects = {run.subject for run in runs}
    if len(subjects) > 1:
        raise DataError(f"split_runs: runs of several subjects {sorted(subjects)}; split one subject at a time")
    subject = subject or (subjects.pop() if subjects else "unknown subject")
    result = SplitRuns(subject=subject)
    by_episode = {run.episode: run for run in runs}
    for name in PARTS:
        episodes = getattr(split, name)
        getattr(result, name).extend(by_episode[e] for e in episodes if e in by_episode)
        result.missing[name] = [e for e in episodes if e not in by_episode]
        if result.missing[name]:
            logger.info(
                "%s has no run for %d %s episode(s): %s",
                subject,
                len(result.missing[name]),
                name,
                ", ".join(result.missing[name]),
            )
    result.unused = [e for e in by_episode if split.part_of(e) is None]
    if not result.train:
        raise DataError(
            f"{subject} has no training runs: the split's {len(split.train)} training episodes "
            f"({', '.join(split.train[:5])}{'...' if len(split.train) > 5 else ''}) and the subject's "
            f"{len(by_episode)} paired runs do not overlap"
        )
    return result
