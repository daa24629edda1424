"""The time base: where each TR falls in the audio, in samples and in conv7 frames.

One convention everywhere: the TR is the decimal number the data states (``1.49``, from the
BOLD sidecar or the config), taken exactly (``Fraction("1.49")``), never its binary float. At
22,050 Hz one TR is then exactly 32,854.5 samples, and TR ``i`` starts at sample
``b(i) = floor(i * TR * rate + 1/2)``, computed in integers: no drift over an 87,000-TR subject.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from hear_brainsoundnet.soundnet import SAMPLE_RATE, frame_geometry

FEATURE_LAYER = "conv7"

__all__ = ["FEATURE_LAYER", "tr_samples", "tr_boundaries", "window_samples", "tr_frames"]


def tr_samples(tr: float, sample_rate: int = SAMPLE_RATE) -> Fraction:
    """One TR in audio samples, exactly (1.49 s at 22,050 Hz -> 32854.5).

    Raises :class:`ValueError` for a TR that is not a positive finite number.
    """
    try:
        exact = Fraction(str(tr))
    except (TypeError, ValueError):
        raise ValueError(f"TR must be a positive number of seconds, got {tr!r}") from None
    if exact <= 0:
        raise ValueError(f"TR must be positive, got {tr!r}")
    return exact * int(sample_rate)


def tr_boundaries(n_trs: int, tr: float, sample_rate: int, start: int = 0) -> np.ndarray:
    """Sample indices of the boundaries of TRs ``start`` .. ``start + n_trs``.

    Returns int64, shape ``(n_trs + 1,)``: ``b(start), ..., b(start + n_trs)`` with
    ``b(i) = floor(i * TR * sample_rate + 1/2)`` in exact integer arithmetic.
    """
    per_tr = tr_samples(tr, sample_rate)
    num, den = per_tr.numerator, per_tr.denominator
    # Python integers: i * num can pass 2**63 for a TR written with many decimals.
    return np.array([(2 * i * num + den) // (2 * den) for i in range(start, start + n_trs + 1)],
                    dtype=np.int64)


def window_samples(window_trs: int, tr: float, sample_rate: int) -> int:
    """Audio samples of a window of ``window_trs`` TRs: the longest any such window spans.

    ``b(t + n) - b(t)`` is the floor or the ceiling of ``n * TR * sample_rate``; this returns the
    ceiling, so every window of a dataset has the same length.
    """
    return math.ceil(int(window_trs) * tr_samples(tr, sample_rate))


def tr_frames(n_trs: int, tr: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """conv7 frame of each TR ``0 .. n_trs - 1``: the frame centred nearest the TR's midpoint."""
    geometry = frame_geometry(FEATURE_LAYER)
    per_tr = tr_samples(tr, sample_rate)
    frames = np.empty(n_trs, dtype=np.int64)
    for t in range(n_trs):
        position = ((t + Fraction(1, 2)) * per_tr - geometry.first_centre) / geometry.hop
        frames[t] = math.floor(position + Fraction(1, 2))
    return frames
