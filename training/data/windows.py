"""Training examples: windows of consecutive TRs with their audio, history included.

Time convention (used everywhere in :mod:`training.data`): TR ``i`` of a run covers the
audio ``[i * TR, (i + 1) * TR)`` seconds from the start of the episode, i.e. the samples
``[b(i), b(i + 1))`` with

    ``b(i) = round(i * TR * sample_rate)``   (:func:`tr_boundaries`)

computed exactly (TR taken in whole microseconds, halves rounded up), so that every module
and every process finds the same boundaries.  At TR = 1.49 s and 22,050 Hz a TR is
32,854.5 samples, so TRs alternate between 32,854 and 32,855 samples.

An example (:func:`make_example`, :class:`WindowDataset`) is ``window_trs`` consecutive
TRs of one run, ``first_tr`` to ``first_tr + window_trs - 1``, with

- ``"waveform"``: float32 ``(history_samples + window_samples,)``: the audio from
  ``b(first_tr) - history_samples`` to ``b(first_tr) + window_samples``.  The history is
  the **real preceding audio** of the episode (the study zero-padded it at every batch
  start); only where the episode has no audio before (the run's first TRs) is it
  left-padded with zeros, and ``"padded_samples"`` says how many.  ``window_samples`` is
  the same for every window of a dataset (:func:`window_samples`, the longest a window
  can be), so batches stack; a window one sample shorter takes one more real sample at
  its end (or a zero past the end of the audio).
- ``"targets"``: float32 ``(window_trs, n_targets)``.
- ``"tr_boundaries"``: int64 ``(window_trs + 1,)``: TR ``first_tr + j`` occupies
  ``waveform[tr_boundaries[j]:tr_boundaries[j + 1]]``; ``tr_boundaries[0]`` equals
  ``history_samples``.
- ``"episode"``, ``"subject"``, ``"first_tr"``, ``"history_samples"``, ``"padded_samples"``.

Windows (:func:`window_starts`) tile a run without overlap from TR 0.  When the run length
is not a multiple of ``window_trs``, the final partial window is, by default
(``last="shift"``), moved back to end at the run's last TR, overlapping its neighbour, so
that every TR is used; ``last="drop"`` drops it.  A run shorter than one window yields no
window (a warning names it).  ``window_trs=None`` makes one example per whole run
(evaluation); those differ in length, so batch them one at a time.

The dataset's index is stable (runs in the given order, windows in time order); shuffling
is the job of the training loop's seeded sampler.  Runs of several subjects may share a
dataset (group models) as long as a batch holds one subject's targets, or the targets have
the same width.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..timebase import tr_boundaries, window_samples

if TYPE_CHECKING:  # pragma: no cover
    from .pairing import PairedRun

try:
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover - torch is a dependency of training/
    _TorchDataset = object

__all__ = ["WindowDataset", "make_example", "tr_boundaries", "window_samples", "window_starts"]


def window_starts(n_trs: int, window_trs: int, *, last: Literal["shift", "drop"] = "shift") -> list[int]:
    """First TR of each window of ``window_trs`` TRs over a run of ``n_trs`` TRs.

    Windows tile the run from TR 0 without overlap.  A final partial window is moved
    back to end at the last TR (``last="shift"``, so every TR is used) or dropped
    (``last="drop"``).  A run shorter than one window gives ``[]``.
    """
    if window_trs < 1:
        raise ValueError(f"window_trs must be >= 1, got {window_trs}")
    if last not in ("shift", "drop"):
        raise ValueError(f"last must be 'shift' or 'drop', got {last!r}")
    if n_trs < window_trs:
        return []
    starts = list(range(0, n_trs - window_trs + 1, window_trs))
    if last == "shift" and starts[-1] + window_trs < n_trs:
        starts.append(n_trs - window_trs)
    return starts


def make_example(
    run: PairedRun,
    first_tr: int,
    n_trs: int,
    history_samples: int,
    *,
    length: int | None = None,
) -> dict[str, Any]:
    """One example (numpy arrays) from ``run``: TRs ``first_tr`` .. ``first_tr + n_trs - 1``.

    Parameters
    ----------
    run : PairedRun
    first_tr, n_trs : :obj:`int`
        The TRs of the example.
    history_samples : :obj:`int`
        Samples of audio before ``b(first_tr)`` to include (the receptive field of the
        network and the span of the head's kernel); zeros where the episode has none.
    length : :obj:`int`, optional
        Samples after ``b(first_tr)``; default: exactly ``b(first_tr + n_trs) - b(first_tr)``.

    Returns
    -------
    :obj:`dict`
        See the module docstring; arrays are numpy.
    """
    if history_samples < 0:
        raise ValueError(f"history_samples must be >= 0, got {history_samples}")
    if first_tr < 0 or n_trs < 1 or first_tr + n_trs > run.n_trs:
        raise ValueError(f"{run.subject} {run.episode}: TRs [{first_tr}, {first_tr + n_trs}) outside [0, {run.n_trs})")
    bounds = tr_boundaries(n_trs, run.tr, run.sample_rate, start=first_tr)
    if length is None:
        length = int(bounds[-1] - bounds[0])
    begin = int(bounds[0]) - history_samples
    end = int(bounds[0]) + length
    audio = run.waveform
    waveform = np.zeros(end - begin, dtype=np.float32)
    src_begin, src_end = max(begin, 0), min(end, audio.shape[0])
    if src_end > src_begin:
        waveform[src_begin - begin : src_end - begin] = audio[src_begin:src_end]
    return {
        "waveform": waveform,
        "targets": np.array(run.targets[first_tr : first_tr + n_trs], dtype=np.float32),
        "tr_boundaries": (bounds - begin).astype(np.int64),
        "episode": run.episode,
        "subject": run.subject,
        "first_tr": int(first_tr),
        "history_samples": int(history_samples),
        "padded_samples": int(max(0, -begin)),
    }


class WindowDataset(_TorchDataset):
    """A :class:`torch.utils.data.Dataset` of TR windows over paired runs.

    Parameters
    ----------
    runs : sequence of PairedRun
        Runs (of one subject, or several for group models) to draw windows from.
    window_trs : :obj:`int` or None
        TRs per example (the study used 60-80).  None: one example per whole run.
    history_samples : :obj:`int`
        Samples of past audio before each window's first TR (see :func:`make_example`).
    last : {"shift", "drop"}, default="shift"
        Rule for a run's final partial window (see :func:`window_starts`).

    Attributes
    ----------
    index : :obj:`list` of :obj:`tuple` (run position, first TR, n TRs)
        The examples, in a stable order.
    window_samples : :obj:`int` or None
        Audio samples after the history (same for every window); None for whole runs.

    Notes
    -----
    Items hold torch tensors for ``waveform`` (float32), ``targets`` (float32) and
    ``tr_boundaries`` (int64), so the default collate function stacks them.
    """

    def __init__(
        self,
        runs: Sequence[PairedRun],
        window_trs: int | None,
        history_samples: int,
        *,
        last: Literal["shift", "drop"] = "shift",
    ) -> None:
        if history_samples < 0:
            raise ValueError(f"history_samples must be >= 0, got {history_samples}")
        self.runs = list(runs)
        self.window_trs = window_trs
        self.history_samples = int(history_samples)
        self.index: list[tuple[int, int, int]] = []
        rates = {(run.tr, run.sample_rate) for run in self.runs}
        if len(rates) > 1:
            raise ValueError(f"runs have different (TR, sample rate): {sorted(rates)}")
        if window_trs is None:
            self.window_samples = None
            self.index = [(i, 0, run.n_trs) for i, run in enumerate(self.runs)]
            return
        self.window_samples = window_samples(window_trs, self.runs[0].tr, self.runs[0].sample_rate) if self.runs else 0
        short = []
        for i, run in enumerate(self.runs):
            starts = window_starts(run.n_trs, window_trs, last=last)
            if not starts:
                short.append(f"{run.subject} {run.episode} ({run.n_trs} TRs)")
            self.index.extend((i, start, window_trs) for start in starts)
        if short:
            warnings.warn(
                f"{len(short)} run(s) shorter than window_trs={window_trs} give no window: {', '.join(short)}",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, Any]:
        import torch

        position, first_tr, n_trs = self.index[item]
        example = make_example(self.runs[position], first_tr, n_trs, self.history_samples, length=self.window_samples)
        example["waveform"] = torch.from_numpy(example["waveform"])
        example["targets"] = torch.from_numpy(example["targets"])
        example["tr_boundaries"] = torch.from_numpy(example["tr_boundaries"])
        return example
