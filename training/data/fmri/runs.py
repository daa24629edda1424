"""One subject's brain data as every reader returns it (:class:`BrainRuns`), and the rules the
readers share: episode order, subject labels, TR tolerance, repeated episodes."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError

__all__ = ["DEFAULT_TR", "TR_TOLERANCE", "BrainRuns", "log_repeats", "natural_key", "normalize_subject"]

logger = logging.getLogger(__name__)

#: Repetition time of the CNeuroMod Friends data, in seconds.
DEFAULT_TR = 1.49

# Two TRs are "the same" below this difference (seconds): headers store float32.
TR_TOLERANCE = 1e-3

_NATURAL = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """Sort key that orders ``s2e10`` after ``s2e9`` (numbers compared as numbers)."""
    return tuple(int(part) if part.isdigit() else part for part in _NATURAL.split(text))


def normalize_subject(subject: str) -> str:
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
        self.subject = normalize_subject(self.subject)
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
        return sorted(self.runs, key=natural_key)

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


def log_repeats(subject: str, repeats: Mapping[str, Sequence[str]]) -> None:
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
