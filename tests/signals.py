"""Natural-like test audio made with numpy: speech-like vowels, harmonic notes, noise bursts."""
from __future__ import annotations

import numpy as np
from scipy import signal

SR = 22050


def vowel(duration: float, f0: float, formants=(700, 1200, 2600), sr: int = SR,
          rng: np.random.Generator | None = None) -> np.ndarray:
    """A glottal pulse train with a gliding pitch through formant resonators."""
    rng = rng or np.random.default_rng(0)
    n = int(duration * sr)
    pitch = f0 * (1 + 0.15 * np.sin(2 * np.pi * 3 * np.arange(n) / sr))
    phase = np.cumsum(pitch / sr)
    pulses = np.diff(np.floor(phase), prepend=0.0) + 0.01 * rng.standard_normal(n)
    out = np.zeros(n)
    for formant in formants:
        b, a = signal.iirpeak(formant, Q=8, fs=sr)
        out += signal.lfilter(b, a, pulses)
    envelope = np.sin(np.pi * np.linspace(0, 1, n)) ** 0.5
    return out * envelope


def note(duration: float, f0: float, sr: int = SR) -> np.ndarray:
    """A harmonic tone with a decaying envelope."""
    t = np.arange(int(duration * sr)) / sr
    tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    return tone * np.exp(-3 * t) * np.minimum(1, t * 100)


def natural_like(duration: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """Alternating speech-like, music-like, noise and silent segments, peak 0.9, float32."""
    rng = np.random.default_rng(seed)
    pieces, total = [], 0
    while total < duration * sr:
        kind = rng.integers(4)
        length = rng.uniform(0.3, 1.2)
        if kind == 0:
            piece = vowel(length, rng.uniform(90, 250), sr=sr, rng=rng)
        elif kind == 1:
            piece = note(length, rng.uniform(200, 900), sr=sr)
        elif kind == 2:
            b, a = signal.butter(4, sorted(rng.uniform(300, 8000, 2)), "bandpass", fs=sr)
            piece = signal.lfilter(b, a, rng.standard_normal(int(length * sr)))
        else:
            piece = 0.001 * rng.standard_normal(int(length * sr))
        pieces.append(piece / (np.abs(piece).max() + 1e-9) * rng.uniform(0.2, 1.0))
        total += len(piece)
    audio = np.concatenate(pieces)[: int(duration * sr)]
    return (0.9 * audio / np.abs(audio).max()).astype(np.float32)
