"""The synthetic dataset's soundtracks and their ground-truth auditory features.

:func:`synthesise_episode` makes one half-episode's soundtrack, deterministically for a seed:
a sequence of segments of a few seconds -- speech-like sounds (glottal pulse train with
changing pitch through three formant resonators, in syllables), music-like notes (harmonic
tones, ADSR envelopes, occasional dyads), band-limited noise bursts and silence -- over a
faint room noise, with the features (:data:`FEATURES`, defined in
:data:`FEATURE_DEFINITIONS`) at 100 Hz computed from the synthesis parameters and the
waveform. :func:`features_at_trs` convolves them with nilearn's Glover HRF and samples them at
the middle of each volume. :mod:`training.synthetic` builds the dataset from them.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import butter, lfilter, sosfilt

#: Ground-truth auditory features, in column order of the tuning matrices.
FEATURES = (
    "loudness",
    "speech",
    "music",
    "noise",
    "pitch_low",
    "pitch_mid",
    "pitch_high",
    "front_vowel",
    "onset",
    "noise_high",
)
FEATURE_DEFINITIONS = {
    "loudness": "clip((20*log10(RMS over 10 ms) + 50) / 40, 0, 1) of the final waveform",
    "speech": "syllable envelope of speech-like segments (raised-cosine attack 30 ms, release 50 ms)",
    "music": "sum of the notes' ADSR envelopes, clipped to 1",
    "noise": "envelope of band-limited noise bursts (5 ms attack, exponential decay)",
    "pitch_low": (
        "speech envelope * G(f0_speech) + music envelope * G(f0_note), G Gaussian in log2(f / 120 Hz), sd 0.6 octave"
    ),
    "pitch_mid": "as pitch_low, centred on 250 Hz",
    "pitch_high": "as pitch_low, centred on 600 Hz",
    "front_vowel": "speech envelope during /i/ and /e/ syllables (second formant > 1.8 kHz)",
    "onset": "clip(max(0, loudness(t) - loudness(t - 30 ms)) / 0.3, 0, 1)",
    "noise_high": "noise envelope of bursts centred above 2.5 kHz",
}
PITCH_CENTRES = {"pitch_low": 120.0, "pitch_mid": 250.0, "pitch_high": 600.0}
FRAME_RATE = 100  # feature frames per second (10 ms)
_VOWELS = {  # formants F1, F2, F3 (Hz) of an adult male voice
    "a": (730.0, 1090.0, 2440.0),
    "e": (530.0, 1840.0, 2480.0),
    "i": (270.0, 2290.0, 3010.0),
    "o": (570.0, 840.0, 2410.0),
    "u": (300.0, 870.0, 2240.0),
}
_FRONT_VOWELS = ("e", "i")
_SPEAKER_F0 = (105.0, 125.0, 150.0, 195.0, 220.0, 250.0)
_PENTATONIC = (0, 2, 4, 7, 9)


def seeded_rng(seed: int, *names: object) -> np.random.Generator:
    """Independent generator per component (``seed`` and names such as ``"audio", episode``):
    reproducible whatever the generation order.  Every random component of the dataset, here
    and in :mod:`training.synthetic`, draws from its own."""
    keys = [int(seed)] + [zlib.crc32(str(name).encode()) for name in names]
    return np.random.default_rng(keys)


# --------------------------------------------------------------------------- synthesis


@dataclass
class _Track:
    """A soundtrack being synthesised, with its per-frame feature inputs."""

    n_samples: int
    rate: int
    audio: np.ndarray = field(init=False)
    frames: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.audio = np.zeros(self.n_samples)
        n_frames = int(math.ceil(self.n_samples * FRAME_RATE / self.rate))
        names = ("speech", "f0_speech", "front", "music", "f0_music", "noise", "noise_high")
        self.frames = {name: np.zeros(n_frames) for name in names}

    def frame_values(self, start: int, values: np.ndarray) -> tuple[int, np.ndarray]:
        """First frame index and means of a per-sample array (starting at sample ``start``) per 10 ms frame."""
        per = self.rate // FRAME_RATE
        first = start // per
        offset = start - first * per
        padded = np.concatenate([np.zeros(offset), values])
        padded = np.concatenate([padded, np.zeros((-padded.size) % per)])
        means = padded.reshape(-1, per).mean(axis=1)
        end = min(first + means.size, self.frames["speech"].size)
        return first, means[: end - first]


def _raised_cosine_envelope(n: int, attack: int, release: int) -> np.ndarray:
    env = np.ones(n)
    attack, release = min(attack, n // 2), min(release, n // 2)
    if attack:
        env[:attack] = 0.5 - 0.5 * np.cos(np.pi * np.arange(attack) / attack)
    if release:
        env[n - release :] = 0.5 + 0.5 * np.cos(np.pi * np.arange(1, release + 1) / release)
    return env


def _resonator(signal: np.ndarray, freq: float, bandwidth: float, rate: int) -> np.ndarray:
    """Two-pole resonator with unit gain at 0 Hz (Klatt's formant filter)."""
    r = math.exp(-math.pi * bandwidth / rate)
    c = -2 * r * math.cos(2 * math.pi * freq / rate)
    a = [1.0, c, r * r]
    return lfilter([1.0 + c + r * r], a, signal)


def _render_speech(track: _Track, start: int, n: int, rng: np.random.Generator) -> None:
    rate = track.rate
    base = float(rng.choice(_SPEAKER_F0))
    scale = 1.0 if base < 170 else 1.17  # shorter vocal tract: higher formants
    segment = np.zeros(n)
    cursor = int(rng.uniform(0.0, 0.1) * rate)
    while cursor < n - int(0.1 * rate):
        length = min(int(rng.uniform(0.14, 0.32) * rate), n - cursor)
        vowel = str(rng.choice(list(_VOWELS)))
        t = np.arange(length) / rate
        position = (cursor + t * rate) / n  # 0..1 across the segment: declination
        vibrato_hz, vibrato_phase = rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
        f0 = base * (1.1 - 0.2 * position) * (1 + 0.12 * np.sin(2 * np.pi * vibrato_hz * t + vibrato_phase))
        f0 *= 1 + 0.06 * rng.standard_normal()
        phase = np.cumsum(f0 / rate)
        source = np.diff(np.floor(phase), prepend=0.0)  # one impulse per glottal period
        source = lfilter([1.0], [1.0, -0.9], source)  # glottal spectral tilt
        source += 0.02 * rng.standard_normal(length)  # aspiration
        voiced = source
        for formant, bandwidth in zip(_VOWELS[vowel], (60.0, 90.0, 120.0), strict=True):
            voiced = _resonator(voiced, formant * scale, bandwidth * scale, rate)
        env = _raised_cosine_envelope(length, int(0.03 * rate), int(0.05 * rate))
        segment[cursor : cursor + length] = voiced * env
        first, env_frames = track.frame_values(start + cursor, env)
        span = slice(first, first + env_frames.size)
        track.frames["speech"][span] = np.maximum(track.frames["speech"][span], env_frames)
        _, f0_frames = track.frame_values(start + cursor, f0)
        track.frames["f0_speech"][span] = np.where(env_frames > 0, f0_frames, track.frames["f0_speech"][span])
        if vowel in _FRONT_VOWELS:
            track.frames["front"][span] = np.maximum(track.frames["front"][span], env_frames)
        cursor += length + int(rng.uniform(0.03, 0.12) * rate)
    rms = np.sqrt(np.mean(segment**2)) or 1.0
    track.audio[start : start + n] += segment * (rng.uniform(0.05, 0.1) / rms)


def _render_music(track: _Track, start: int, n: int, rng: np.random.Generator) -> None:
    rate = track.rate
    tilt = rng.uniform(0.7, 2.0)  # timbre: harmonic amplitude ~ 1 / h**tilt
    segment = np.zeros(n)
    env_total = np.zeros(n)
    f0_track = np.zeros(n)
    best_env = np.zeros(n)
    cursor = 0
    while cursor < n - int(0.1 * rate):
        length = min(int(rng.uniform(0.18, 0.6) * rate), n - cursor)
        midi = 55 + 12 * int(rng.integers(0, 3)) + int(rng.choice(_PENTATONIC))
        pitches = [440.0 * 2 ** ((midi - 69) / 12)]
        if rng.random() < 0.25:
            pitches.append(pitches[0] * (1.5 if rng.random() < 0.5 else 1.25))
        t = np.arange(length) / rate
        attack = rng.uniform(0.005, 0.03)
        env = np.where(t < attack, t / attack, 0.6 + 0.4 * np.exp(-(t - attack) / 0.08))
        env *= _raised_cosine_envelope(length, 0, int(min(0.12, length / rate / 3) * rate))
        for k, pitch in enumerate(pitches):
            amp = 1.0 if k == 0 else 0.7
            harmonics = np.arange(1, 7)
            harmonics = harmonics[harmonics * pitch < 0.45 * rate]
            tone = sum(np.sin(2 * np.pi * h * pitch * t) / h**tilt for h in harmonics)
            segment[cursor : cursor + length] += amp * env * tone
        region = slice(cursor, cursor + length)
        louder = env > best_env[region]
        f0_track[region] = np.where(louder, pitches[0], f0_track[region])
        best_env[region] = np.maximum(best_env[region], env)
        env_total[region] += env
        cursor += int(length * rng.uniform(0.8, 1.0))
    rms = np.sqrt(np.mean(segment**2)) or 1.0
    track.audio[start : start + n] += segment * (rng.uniform(0.05, 0.1) / rms)
    first, env_frames = track.frame_values(start, np.minimum(env_total, 1.0))
    span = slice(first, first + env_frames.size)
    track.frames["music"][span] = np.maximum(track.frames["music"][span], env_frames)
    # Pitch of the frame: the loudest note's, read at the frame's middle sample.
    per = rate // FRAME_RATE
    mids = np.clip((np.arange(span.start, span.stop) * per + per // 2) - start, 0, n - 1)
    track.frames["f0_music"][span] = f0_track[mids]


def _render_noise(track: _Track, start: int, n: int, rng: np.random.Generator) -> None:
    rate = track.rate
    segment = np.zeros(n)
    cursor = int(rng.uniform(0.0, 0.2) * rate)
    while cursor < n - int(0.05 * rate):
        length = min(int(rng.uniform(0.08, 0.7) * rate), n - cursor)
        centre = math.exp(rng.uniform(math.log(300.0), math.log(6000.0)))
        width = rng.uniform(0.3, 1.0)  # octaves
        low, high = centre * 2 ** (-width / 2), min(centre * 2 ** (width / 2), 0.48 * rate)
        sos = butter(2, [low, high], btype="band", fs=rate, output="sos")
        t = np.arange(length) / rate
        env = np.minimum(t / 0.005, 1.0) * np.exp(-t / (length / rate / 3))
        burst = sosfilt(sos, rng.standard_normal(length))
        burst /= np.sqrt(np.mean(burst**2)) or 1.0
        segment[cursor : cursor + length] += burst * env
        first, env_frames = track.frame_values(start + cursor, env)
        span = slice(first, first + env_frames.size)
        track.frames["noise"][span] = np.maximum(track.frames["noise"][span], env_frames)
        if centre > 2500:
            track.frames["noise_high"][span] = np.maximum(track.frames["noise_high"][span], env_frames)
        cursor += length + int(rng.uniform(0.05, 0.5) * rate)
    rms = np.sqrt(np.mean(segment**2)) or 1.0
    track.audio[start : start + n] += segment * (rng.uniform(0.04, 0.1) / rms)


def synthesise_episode(seed: int, episode: str, duration: float, rate: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Waveform (float32), feature frames ``(n_frames, K)`` and the segment list."""
    rng = seeded_rng(seed, "audio", episode)
    track = _Track(int(round(duration * rate)), rate)
    segments = []
    t = rng.uniform(0.3, 1.0)
    classes = ("speech", "music", "noise", "silence")
    while t < duration - 0.5:
        kind = str(rng.choice(classes, p=(0.4, 0.25, 0.2, 0.15)))
        length = {"speech": (2.0, 5.0), "music": (2.0, 5.0), "noise": (1.5, 4.0), "silence": (1.0, 2.5)}[kind]
        length = min(rng.uniform(*length), duration - t)
        start, n = int(t * rate), int(length * rate)
        if kind == "speech":
            _render_speech(track, start, n, rng)
        elif kind == "music":
            _render_music(track, start, n, rng)
        elif kind == "noise":
            _render_noise(track, start, n, rng)
        segments.append((kind, round(t, 4), round(t + length, 4)))
        t += length
    room = lfilter([1.0], [1.0, -0.95], rng.standard_normal(track.n_samples))
    track.audio += room * (0.002 / (np.sqrt(np.mean(room**2)) or 1.0))
    peak = np.max(np.abs(track.audio))
    if peak > 0.99:
        track.audio *= 0.99 / peak
    return track.audio.astype(np.float32), _features(track), segments


def _pitch_tuning(f0: np.ndarray, centre: float) -> np.ndarray:
    """Gaussian tuning in log frequency (sd 0.6 octave); 0 where there is no pitch (f0 = 0)."""
    octaves = np.log2(np.maximum(f0, 1e-3) / centre)
    return np.where(f0 > 0, np.exp(-0.5 * (octaves / 0.6) ** 2), 0.0)


def _features(track: _Track) -> np.ndarray:
    """The ground-truth features (see :data:`FEATURE_DEFINITIONS`) at 100 Hz."""
    per = track.rate // FRAME_RATE
    n_frames = track.frames["speech"].size
    audio = np.concatenate([track.audio, np.zeros(n_frames * per - track.audio.size)])
    rms = np.sqrt(np.mean(audio.reshape(n_frames, per) ** 2, axis=1))
    loudness = np.clip((20 * np.log10(np.maximum(rms, 1e-10)) + 50) / 40, 0, 1)
    frames = track.frames
    out = np.zeros((n_frames, len(FEATURES)))
    out[:, FEATURES.index("loudness")] = loudness
    out[:, FEATURES.index("speech")] = frames["speech"]
    out[:, FEATURES.index("music")] = frames["music"]
    out[:, FEATURES.index("noise")] = frames["noise"]
    for name, centre in PITCH_CENTRES.items():
        speech = frames["speech"] * _pitch_tuning(frames["f0_speech"], centre)
        music = frames["music"] * _pitch_tuning(frames["f0_music"], centre)
        out[:, FEATURES.index(name)] = np.clip(speech + music, 0, 1)
    out[:, FEATURES.index("front_vowel")] = frames["front"]
    previous = np.concatenate([np.full(3, loudness[0]), loudness[:-3]])
    out[:, FEATURES.index("onset")] = np.clip(np.maximum(0, loudness - previous) / 0.3, 0, 1)
    out[:, FEATURES.index("noise_high")] = frames["noise_high"]
    return out


def features_at_trs(frames: np.ndarray, n_trs: int, tr: float) -> np.ndarray:
    """HRF-convolved features sampled at the middle of each volume: ``(n_TR, K)``."""
    from nilearn.glm.first_level import glover_hrf

    hrf = glover_hrf(tr, oversampling=int(round(tr * FRAME_RATE)), time_length=32.0)
    n_needed = int(math.ceil((n_trs + 1) * tr * FRAME_RATE))
    padded = np.zeros((max(n_needed, frames.shape[0]), frames.shape[1]))
    padded[: frames.shape[0]] = frames
    times = (np.arange(padded.shape[0]) + 0.5) / FRAME_RATE
    sample_times = (np.arange(n_trs) + 0.5) * tr
    out = np.empty((n_trs, frames.shape[1]))
    for k in range(frames.shape[1]):
        drive = np.convolve(padded[:, k], hrf)[: padded.shape[0]]
        out[:, k] = np.interp(sample_times, times, drive)
    return out
