"""A synthetic Friends-like dataset with a known ground truth: the project's embedded data.

:func:`generate_friends_like` writes, deterministically for a seed:

- **stimuli**: one soundtrack per half-episode (``stimuli/friends_s01e01a.wav``, 16 kHz
  PCM so that resampling to 22,050 Hz is exercised; by default one episode as
  ``friends_s01e01b.mkv``, FLAC audio plus a small video stream, written with the
  ``ffmpeg`` command when available).  Each soundtrack is a sequence of segments of a few
  seconds: speech-like sounds (glottal pulse train with changing pitch through three
  formant resonators, in syllables), music-like notes (harmonic tones, ADSR envelopes,
  occasional dyads), band-limited noise bursts, and silence, over a faint room noise.
- **fMRIPrep-like derivatives** (``fmriprep/sub-XX/ses-YYY/func/``): for every run a 4-D
  ``..._space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz`` (float32) with its JSON
  sidecar, ``desc-brain_mask.nii.gz`` and ``desc-confounds_timeseries.tsv`` (+ ``.json``)
  with fMRIPrep's column names; an atlas label image with its ``dseg.tsv`` and a
  superior-temporal-like voxel mask in ``atlas/``.
- **Algonauts-like HDF5** (``algonauts/sub-XX/func/sub-XX_task-friends_..._bold.h5``): one
  dataset ``ses-YYY_task-<episode>`` per run, ``(n_TR, n_parcels)`` float32.
- **ground truth**: ``ground_truth.json`` (design, tuning, SNRs, noise ceilings) and
  ``ground_truth_features.npz`` (the feature regressors at each TR), and a
  ``dataset_description.json`` written last (its presence marks a complete dataset).

Ground truth
------------
1. *Features* at 100 Hz from the synthesis parameters and the waveform
   (:data:`FEATURES`): loudness; speech, music and noise envelopes; three pitch channels
   (Gaussian tuning, 0.6 octave wide, centred on 120, 250 and 600 Hz, driven by voiced
   speech and notes); front vowels (/i/, /e/: high second formant); onsets; high-band
   (> 2.5 kHz) noise.
2. *Tuning*: each auditory parcel prefers one feature (weight 1), with a general loudness
   drive (0.25) and two random secondary weights; each subject's weights are the
   parcel's times a log-normal jitter (sd 0.2) plus one subject-specific weight.  "weak"
   parcels follow speech at a low SNR; "noise" parcels have no drive.
3. *Haemodynamics*: each parcel's drive is convolved with nilearn's Glover HRF
   (:func:`nilearn.glm.first_level.glover_hrf`, 10 ms step, 32 s) and sampled at the middle
   of each volume, ``t = (i + 0.5) * TR`` (fMRIPrep's slice-timing reference), TR = 1.49 s.
   Volumes keep coming 2 TRs after the soundtrack ends, as a scanner does.
4. *Noise*: AR(1) (phi = 0.3) Gaussian noise per subject and parcel, scaled so that after
   the default cleaning the ratio of signal to noise variance, pooled over the subject's
   runs, is the parcel's SNR (auditory: uniform in [0.6, 1.8]; weak: [0.1, 0.25]).
5. *Cleaning and targets*: the HDF5 holds, per run, the z-scored residual of each parcel's
   time series after regressing out the run's default confounds (cosines, 24 motion
   parameters, white matter, CSF, with a constant), computed with numpy.  The NIfTI voxels
   of a parcel are ``baseline + 8 * parcel series + confounds @ loadings + voxel noise``
   with voxel noise summing to zero over the parcel, so that
   :func:`training.data.read_fmriprep` (nilearn's masker + ``load_confounds``) must
   reproduce the HDF5 up to float32 rounding -- and only with the right confounds.
6. *Confounds*: random-walk motion parameters (and their derivatives and squares),
   white-matter and CSF signals, orthogonalised run by run to the feature regressors (and
   a constant).  With runs of 40-70 TRs and 26 confound regressors, confounds drawn independently
   of the stimulus would remove most of the stimulus-driven variance; real runs have about
   480 TRs.  The derived columns are therefore not exactly the derivative or square of the
   base columns; derivative columns keep fMRIPrep's ``n/a`` first row.  Cosine regressors
   follow fMRIPrep's rule (128 s cut-off: none for runs shorter than 128 s) and are not
   orthogonalised: they high-pass the signal as in real data.
7. *Noise ceiling* of parcel p for subject s (``noise_ceiling_r``): the mean over the
   subject's runs of the Pearson correlation between the cleaned noiseless signal and the
   target (z-scored cleaned noisy signal) of the run: the score of an oracle that knows the
   true signal.  ``noise_ceiling_r2`` is the mean of its square: the r2 of that oracle after
   a least-squares rescaling.  Noise parcels have ceiling 0.

Why these features: the loudness and sound-class envelopes are what a pretrained network
readily encodes; pitch channels, vowel quality and high-band noise are narrower spectral
properties that SoundNet's pretrained conv7 (trained to recognise objects and scenes) need
not represent linearly, so fine-tuning deeper layers has room to help.  Measured on the
earlier, smaller default (6 episodes of 60 s per season; seed 0, sub-01, ridge trained on
seasons 1-2, per-run r on season 3 as a fraction of the noise ceiling, auditory parcels):
pretrained conv7 with a 5-TR causal linear readout reaches 0.70 (0.53 to 0.86 across
parcels, lowest for music and the middle pitch channel); the true features (before the HRF)
with an 8-TR causal linear readout, i.e. a perfect feature extractor under the study's head,
0.92; a log-mel readout 0.82; noise parcels stay at 0.  On the current default the main job
measures (median over parcels, 3 subjects): head-only 0.78, conv4 0.83, random-init null 0.68.

Sizes (:data:`SIZES`): ``"tiny"`` for tests (2 subjects, 3 seasons x 1 episode x 2
halves = 6 runs of about 60 s, 10 parcels, 10x12x10 voxels of 12 mm; about 4 s to
generate here), ``"default"`` (3 subjects, 3 seasons x 10 episodes x 2 halves = 60 runs of
about 90 s (58-67 volumes), 24 parcels: 14 auditory, 4 weak, 6 noise, 16x20x16 voxels of
8 mm; 30-40 s and 370 MB here, on 2 cores), ``"large"`` (4 subjects, 4 seasons x 12
episodes, 90 s runs), and ``"subject"``: the shape of one real CNeuroMod subject (seasons 1-4
of 23 episodes, 184 runs of about 11.75 min, about 87,000 TRs, 36 h of soundtrack, 1000
parcels), written in the Algonauts HDF5 layout only (``write_fmriprep=False``: no NIfTI, no
atlas image; parcels are named ``auditory-0001`` ...) with FLAC stimuli. That layout is
generated soundtrack by soundtrack and run by run (:func:`_generate_streaming`): memory holds
one soundtrack and one run's targets whatever the size, and the HDF5 targets equal the
in-memory generator's for the same configuration.  In the first three sizes the second
subject misses one run of season 1.
The default is sized so that the study's effect can show: each subject has about 1,800
training TRs (seasons 1-2 less a quarter for validation), and fine-tuning conv4..conv7
(2.8 M parameters) beats the head-only baseline on it; with the 750 training TRs of an
earlier default (6 episodes of 60 s per season) it only tied.  The held-out season has 20
runs per subject, so a Wilcoxon test across runs can reach p ~ 2e-6, well under what
Benjamini-Yekutieli FDR over the parcels needs.
Runs shorter than 60 s are refused: 40 TRs barely hold the 26 confound regressors of the
default strategy plus the 10 feature regressors.

Command line: ``python -m training.synthetic OUT_DIR [--seed N] [--size NAME]``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import butter, lfilter, sosfilt

__all__ = ["FEATURES", "SIZES", "SyntheticConfig", "SyntheticDataset", "generate_friends_like", "main"]

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
# Preferred feature of auditory parcels, in order (cycled when there are more parcels).
_PREFERENCES = (
    "speech",
    "pitch_low",
    "music",
    "pitch_high",
    "noise_high",
    "front_vowel",
    "loudness",
    "pitch_mid",
    "noise",
    "onset",
)

FRAME_RATE = 100  # feature frames per second (10 ms)
SPACE = "MNI152NLin2009cAsym"
ATLAS_NAME = "SynthAud"
_VOXEL_GAIN = 8.0  # parcel signal amplitude in voxel units (baseline ~1000: ~0.8 %)
_VOXEL_NOISE = 8.0
_CONFOUND_SD = 6.0
_NOISE_PHI = 0.3
_EXTRA_TRS = 2
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


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and design parameters of the synthetic dataset (see :data:`SIZES`)."""

    n_subjects: int = 3
    n_seasons: int = 3
    episodes_per_season: int = 10
    run_seconds: float = 90.0
    audio_rate: int = 16000
    tr: float = 1.49
    volume_shape: tuple[int, int, int] = (16, 20, 16)
    voxel_size: float = 8.0
    n_auditory: int = 14
    n_weak: int = 4
    n_noise: int = 6
    runs_per_session: int = 4
    video_episodes: tuple[str, ...] = ("s01e01b",)
    missing_runs: tuple[tuple[str, str], ...] = (("sub-02", "s01e02a"),)
    auditory_snr: tuple[float, float] = (0.6, 1.8)
    weak_snr: tuple[float, float] = (0.1, 0.25)
    # False: only the Algonauts HDF5 layout (no NIfTI, no atlas image), generated run by run in
    # bounded memory: what the full-scale size needs (1000 parcels do not fit a toy volume).
    write_fmriprep: bool = True
    audio_format: str = "wav"  # stimuli as "wav" (PCM_16) or "flac" (lossless, half the disk)

    @property
    def n_parcels(self) -> int:
        """Total number of atlas parcels."""
        return self.n_auditory + self.n_weak + self.n_noise

    def subjects(self) -> list[str]:
        """Subject labels ``sub-01``..."""
        return [f"sub-{i + 1:02d}" for i in range(self.n_subjects)]

    def episodes(self) -> list[str]:
        """Half-episode ids, in viewing order."""
        return [
            f"s{season:02d}e{episode:02d}{half}"
            for season in range(1, self.n_seasons + 1)
            for episode in range(1, self.episodes_per_season + 1)
            for half in "ab"
        ]


#: Named sizes.  ``tiny`` is for tests; ``default`` is the embedded dataset.
SIZES: dict[str, SyntheticConfig] = {
    "tiny": SyntheticConfig(
        n_subjects=2,
        n_seasons=3,
        episodes_per_season=1,
        run_seconds=60.0,
        volume_shape=(10, 12, 10),
        voxel_size=12.0,
        n_auditory=6,
        n_weak=2,
        n_noise=2,
        runs_per_session=2,
        missing_runs=(("sub-02", "s01e01a"),),
    ),
    "default": SyntheticConfig(),
    "large": SyntheticConfig(n_subjects=4, n_seasons=4, episodes_per_season=12, run_seconds=90.0),
    # One real CNeuroMod subject's shape: seasons 1-4 of 23 episodes (two halves of about
    # 11.75 min each: 184 runs, about 87,000 TRs of 1.49 s, 36 h of soundtrack) and 1000
    # parcels (Algonauts' Schaefer-1000), in the HDF5 layout only, stimuli as FLAC.
    "subject": SyntheticConfig(n_subjects=1, n_seasons=4, episodes_per_season=23, run_seconds=705.0,
                               n_auditory=120, n_weak=80, n_noise=800, video_episodes=(),
                               missing_runs=(), runs_per_session=4, write_fmriprep=False,
                               audio_format="flac"),
}


# --------------------------------------------------------------------------- randomness


def _rng(seed: int, *names: object) -> np.random.Generator:
    """Independent generator per component: reproducible whatever the generation order."""
    keys = [int(seed)] + [zlib.crc32(str(name).encode()) for name in names]
    return np.random.default_rng(keys)


# --------------------------------------------------------------------------- audio


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


def _synthesise_episode(seed: int, episode: str, duration: float, rate: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Waveform (float32), feature frames ``(n_frames, K)`` and the segment list."""
    rng = _rng(seed, "audio", episode)
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


def _features_at_trs(frames: np.ndarray, n_trs: int, tr: float) -> np.ndarray:
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


# --------------------------------------------------------------------------- brain


def _volume_geometry(config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine, brain mask (ellipsoid) and voxel centre coordinates (mm)."""
    shape = np.array(config.volume_shape)
    size = config.voxel_size
    affine = np.diag([size, size, size, 1.0])
    centre_mm = np.array([0.0, -18.0, 18.0])
    affine[:3, 3] = centre_mm - size * (shape - 1) / 2
    ijk = np.indices(config.volume_shape).reshape(3, -1).T
    xyz = ijk * size + affine[:3, 3]
    radii = size * (shape - 1) / 2 * np.array([0.95, 0.95, 0.9])
    inside = np.sum(((xyz - centre_mm) / radii) ** 2, axis=1) <= 1.0
    return affine, inside.reshape(config.volume_shape), xyz


def _make_atlas(config: SyntheticConfig, seed: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Label image (Voronoi cells of parcel centres inside the brain) and parcel table."""
    affine, brain, xyz = _volume_geometry(config)
    rng = _rng(seed, "atlas")
    centre_mm = np.array([0.0, -18.0, 18.0])
    radii = config.voxel_size * (np.array(config.volume_shape) - 1) / 2 * 0.9
    brain_xyz = xyz[brain.ravel()]
    kinds = ["auditory"] * config.n_auditory + ["weak"] * config.n_weak + ["noise"] * config.n_noise
    for _attempt in range(100):
        centres = []
        for i, kind in enumerate(kinds):
            if kind == "auditory":  # lateral and inferior: temporal-lobe-like
                side = -1 if i % 2 == 0 else 1
                unit = np.array([side * rng.uniform(0.55, 0.85), rng.uniform(-0.5, 0.4), rng.uniform(-0.55, -0.05)])
            else:
                unit = rng.uniform(-0.8, 0.8, size=3)
                unit[0] *= 0.6
                unit[2] = abs(unit[2])  # superior half
            centres.append(centre_mm + unit * radii)
        distances = np.linalg.norm(brain_xyz[:, None, :] - np.array(centres)[None], axis=2)
        nearest = np.argmin(distances, axis=1)
        counts = np.bincount(nearest, minlength=len(kinds))
        if counts.min() >= 3:
            break
    else:  # pragma: no cover - geometry too small for the number of parcels
        raise ValueError(f"cannot fit {len(kinds)} parcels of >= 3 voxels in {config.volume_shape}")
    labels = np.zeros(brain.size, dtype=np.int16)
    labels[np.flatnonzero(brain.ravel())] = nearest + 1
    table = []
    n_by_kind: dict[str, int] = {}
    for i, kind in enumerate(kinds):
        n_by_kind[kind] = n_by_kind.get(kind, 0) + 1
        side = "L" if centres[i][0] < 0 else "R"
        table.append(
            {
                "index": i + 1,
                "name": f"{kind}-{side}-{n_by_kind[kind]:02d}",
                "kind": kind,
                "n_voxels": int(counts[i]),
                "centre_mm": [round(float(c), 1) for c in centres[i]],
            }
        )
    return labels.reshape(config.volume_shape), table


def _tuning(config: SyntheticConfig, seed: int, table: list[dict], subject: str) -> np.ndarray:
    """Unnormalised tuning weights ``(n_parcels, K)`` of one subject."""
    k = len(FEATURES)
    base = np.zeros((config.n_parcels, k))
    rng = _rng(seed, "tuning")
    auditory = [i for i, row in enumerate(table) if row["kind"] == "auditory"]
    for j, parcel in enumerate(auditory):
        preferred = FEATURES.index(_PREFERENCES[j % len(_PREFERENCES)])
        base[parcel, FEATURES.index("loudness")] += 0.25
        others = [f for f in range(k) if f != preferred]
        for other in rng.choice(others, size=2, replace=False):
            base[parcel, other] += rng.uniform(0.1, 0.35)
        base[parcel, preferred] = 1.0
        table[parcel]["preferred_feature"] = FEATURES[preferred]
    for i, row in enumerate(table):
        if row["kind"] == "weak":
            base[i, FEATURES.index("speech")] = 1.0
            base[i, FEATURES.index("front_vowel")] = 0.3
            row["preferred_feature"] = "speech"
        elif row["kind"] == "noise":
            row["preferred_feature"] = None
    srng = _rng(seed, "tuning", subject)
    weights = base * np.exp(0.2 * srng.standard_normal(base.shape))
    for parcel in auditory:  # one individual extra weight per parcel
        weights[parcel, srng.integers(0, k)] += srng.uniform(0.0, 0.15)
    return weights


def _fmriprep_cosines(n_trs: int, tr: float, period: float = 128.0) -> np.ndarray:
    """fMRIPrep's discrete cosine regressors (nipype ``_cosine_drift``), constant excluded."""
    order = max(int(np.floor(2 * n_trs * tr / period)), 1)
    n = np.arange(n_trs)
    return (
        np.column_stack([np.sqrt(2.0 / n_trs) * np.cos(np.pi / n_trs * (n + 0.5) * k) for k in range(1, order)])
        if order > 1
        else np.zeros((n_trs, 0))
    )


def _orthogonalise(columns: np.ndarray, basis: np.ndarray, first_rows_equal: bool = False) -> np.ndarray:
    """Remove from ``columns`` their projection on ``basis``.

    With ``first_rows_equal`` the result also keeps row 0 equal to row 1 (so that
    nilearn's filling of a derivative column's ``n/a`` first row with the second value
    gives back exactly this column): the projection is done in the subspace of such
    vectors, parametrised by rows 1..n-1.
    """
    if not first_rows_equal:
        q, _ = np.linalg.qr(basis)
        return columns - q @ (q.T @ columns)
    n = columns.shape[0]
    dup = np.zeros((n, n - 1))
    dup[0, 0] = 1.0
    dup[1:, :] = np.eye(n - 1)
    reduced_basis = dup.T @ basis
    q, _ = np.linalg.qr(reduced_basis)
    u = columns[1:]
    u = u - q @ (q.T @ u)
    return dup @ u


_MOTION = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")


def _confounds(seed: int, subject: str, episode: str, features_tr: np.ndarray, tr: float) -> dict[str, np.ndarray]:
    """The confound columns of one run (orthogonalised; see the module docstring)."""
    rng = _rng(seed, "confounds", subject, episode)
    n = features_tr.shape[0]
    basis = np.column_stack([np.ones(n), features_tr])
    columns: dict[str, np.ndarray] = {}
    for name in _MOTION:
        step = 0.02 if name.startswith("trans") else 0.0003
        walk = np.cumsum(step * rng.standard_normal(n))
        if rng.random() < 0.3:  # a small jump, as when a subject shifts
            walk[rng.integers(n // 4, n) :] += 10 * step * rng.standard_normal()
        offset = walk.mean()
        base = _orthogonalise(walk[:, None], basis)[:, 0] + offset
        derivative = np.diff(base, prepend=base[0])
        derivative[0] = derivative[1]
        derivative = _orthogonalise(derivative[:, None], basis, first_rows_equal=True)[:, 0]
        power = _orthogonalise((base**2)[:, None], basis)[:, 0] + np.mean(base**2)
        derivative_power = _orthogonalise((derivative**2)[:, None], basis, first_rows_equal=True)[:, 0]
        derivative_power += np.mean(derivative**2)
        columns[name] = base
        columns[f"{name}_derivative1"] = derivative
        columns[f"{name}_power2"] = power
        columns[f"{name}_derivative1_power2"] = derivative_power
    for name, level, scale in (("csf", 900.0, 8.0), ("white_matter", 600.0, 3.0)):
        slow = lfilter([1.0], [1.0, -0.8], rng.standard_normal(n)) * scale
        columns[name] = _orthogonalise(slow[:, None], basis)[:, 0] + level
    cosines = _fmriprep_cosines(n, tr)
    for k in range(cosines.shape[1]):
        columns[f"cosine{k:02d}"] = cosines[:, k]
    return columns


def _default_confound_matrix(columns: dict[str, np.ndarray]) -> np.ndarray:
    """The columns nilearn's default strategy loads (cosines, 24 motion, csf, wm)."""
    names = [c for c in columns if c.startswith("cosine")]
    names += [f"{m}{suffix}" for m in _MOTION for suffix in ("", "_derivative1", "_power2", "_derivative1_power2")]
    names += ["csf", "white_matter"]
    return np.column_stack([columns[name] for name in names])


def _residualise(signals: np.ndarray, confounds: np.ndarray) -> np.ndarray:
    """Residual of ``signals`` after least squares on a constant and ``confounds``."""
    design = np.column_stack([np.ones(signals.shape[0]), confounds])
    q, r = np.linalg.qr(design)
    keep = np.abs(np.diag(r)) > 1e-10 * np.abs(np.diag(r)).max()
    q = q[:, keep]
    return signals - q @ (q.T @ signals)


def _zscore(x: np.ndarray) -> np.ndarray:
    """Per-column z-score with the sample standard deviation (nilearn's ``zscore_sample``)."""
    centred = x - x.mean(axis=0)
    sd = centred.std(axis=0, ddof=1)
    sd[sd < np.finfo(np.float64).eps] = 1.0
    return centred / sd


def _ar1(rng: np.random.Generator, shape: tuple[int, int], phi: float) -> np.ndarray:
    """Stationary AR(1) series along axis 0 with unit variance."""
    innovations = rng.standard_normal(shape) * math.sqrt(1 - phi * phi)
    innovations[0] /= math.sqrt(1 - phi * phi)
    return lfilter([1.0], [1.0, -phi], innovations, axis=0)


def _corr_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / denom
    return np.where(denom > 1e-12, r, 0.0)


# --------------------------------------------------------------------------- writers


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, tr: float | None = None) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=4)  # MNI
    img.set_qform(affine, code=4)
    if tr is not None:
        zooms = list(img.header.get_zooms())
        zooms[3] = tr
        img.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _write_confounds(path: Path, columns: dict[str, np.ndarray]) -> None:
    import pandas as pd

    frame = pd.DataFrame(columns)
    # fMRIPrep leaves the first value of temporal derivatives (and of FD/DVARS) undefined.
    for name in frame.columns:
        if "derivative1" in name or name in ("framewise_displacement", "dvars", "std_dvars", "rmsd"):
            frame.loc[0, name] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, sep="\t", index=False, na_rep="n/a")
    meta = {name: {"Method": "synthetic (training.synthetic)"} for name in frame.columns}
    _write_json(path.with_suffix(".json"), meta)


def _write_video(wav: Path, out: Path, duration: float) -> None:
    """Mux ``wav`` (as FLAC) with a tiny black video into an mkv, bit-exactly."""
    command = [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"color=c=black:s=32x24:r=2:d={duration + 1:.3f}",
        "-i", str(wav),
        "-map", "0:v", "-map", "1:a", "-c:v", "ffv1", "-c:a", "flac",
        "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
        "-map_metadata", "-1", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)


# --------------------------------------------------------------------------- the dataset


def _h5_relpath(subject: str, config: SyntheticConfig) -> Path:
    """Algonauts-style file name, e.g. ``sub-01_task-friends_..._parcel-24Par_desc-s123_bold.h5``."""
    seasons = "".join(str(s) for s in range(1, config.n_seasons + 1))
    name = (
        f"{subject}_task-friends_space-{SPACE}_atlas-{ATLAS_NAME}_parcel-{config.n_parcels}Par_desc-s{seasons}_bold.h5"
    )
    return Path("algonauts") / subject / "func" / name


@dataclass(frozen=True)
class SyntheticDataset:
    """Paths and facts of a generated synthetic dataset.

    Build with :func:`generate_friends_like`, or :meth:`load` an existing one.

    Attributes
    ----------
    root : :class:`pathlib.Path`
    seed : :obj:`int`
    size : :obj:`str`
    config : SyntheticConfig
    subjects : :obj:`tuple` of :obj:`str`
    episodes : :obj:`tuple` of :obj:`str`
        Every half-episode (all have a stimulus).
    runs : :obj:`dict` of :obj:`str` to :obj:`tuple` of :obj:`str`
        Per subject, the episodes with brain data.
    tr : :obj:`float`
    target_names : :obj:`tuple` of :obj:`str`
        Parcel names, in label order (HDF5 column order).
    video_episodes : :obj:`tuple` of :obj:`str`
        Episodes whose stimulus is an ``.mkv``.
    """

    root: Path
    seed: int
    size: str
    config: SyntheticConfig
    subjects: tuple[str, ...]
    episodes: tuple[str, ...]
    runs: dict[str, tuple[str, ...]]
    tr: float
    target_names: tuple[str, ...]
    video_episodes: tuple[str, ...]

    @property
    def stimuli_dir(self) -> Path:
        """Folder of ``friends_<episode>.wav|.mkv`` files."""
        return self.root / "stimuli"

    @property
    def fmriprep_dir(self) -> Path:
        """fMRIPrep-like derivatives folder."""
        return self.root / "fmriprep"

    @property
    def atlas(self) -> Path:
        """Atlas label image."""
        return self.root / "atlas" / f"tpl-{SPACE}_atlas-{ATLAS_NAME}_dseg.nii.gz"

    @property
    def atlas_labels(self) -> Path:
        """BIDS ``dseg.tsv`` of the atlas (index, name, kind)."""
        return self.root / "atlas" / f"tpl-{SPACE}_atlas-{ATLAS_NAME}_dseg.tsv"

    @property
    def voxel_mask(self) -> Path:
        """Superior-temporal-like voxel mask (the voxel-model targets)."""
        return self.root / "atlas" / f"tpl-{SPACE}_desc-STG_mask.nii.gz"

    @property
    def ground_truth_path(self) -> Path:
        """``ground_truth.json``."""
        return self.root / "ground_truth.json"

    def h5_path(self, subject: str) -> Path:
        """The subject's Algonauts-like HDF5 file."""
        return self.root / _h5_relpath(subject, self.config)

    def ground_truth(self) -> dict[str, Any]:
        """The content of ``ground_truth.json``."""
        return json.loads(self.ground_truth_path.read_text())

    def noise_ceiling(self, subject: str, metric: str = "r") -> np.ndarray:
        """Per-parcel noise ceiling (``metric`` "r" or "r2") of a subject."""
        return np.asarray(self.ground_truth()["subjects"][subject][f"noise_ceiling_{metric}"])

    def read_h5(self, subject: str):
        """The subject's runs from the HDF5 layout, with names and noise ceiling."""
        from .data.fmri import read_algonauts_h5

        brain = read_algonauts_h5(self.h5_path(subject), subject, tr=self.tr, target_names=list(self.target_names))
        brain.noise_ceiling = self.noise_ceiling(subject)
        return brain

    def read_fmriprep(self, subject: str, **kwargs: Any):
        """The subject's runs from the NIfTI layout (parcels by default; ``mask=`` for voxels)."""
        from .data.fmri import read_fmriprep

        if "mask" not in kwargs:
            kwargs.setdefault("atlas", self.atlas)
            kwargs.setdefault("atlas_labels", self.atlas_labels)
        brain = read_fmriprep(self.fmriprep_dir, subject, **kwargs)
        if "atlas" in kwargs and Path(kwargs["atlas"]) == self.atlas:
            brain.noise_ceiling = self.noise_ceiling(subject)
        return brain

    @classmethod
    def load(cls, root: str | Path) -> SyntheticDataset:
        """Open a dataset written by :func:`generate_friends_like`.

        Raises
        ------
        FileNotFoundError
            ``root`` holds no complete dataset (no ``dataset_description.json``).
        """
        root = Path(root)
        description = root / "dataset_description.json"
        if not description.exists():
            raise FileNotFoundError(f"{description}: not found; {root} holds no complete synthetic dataset")
        manifest = json.loads(description.read_text())["SyntheticFriends"]
        raw = manifest["config"]
        config = SyntheticConfig(
            **{
                f.name: (
                    tuple(tuple(v) if isinstance(v, list) else v for v in raw[f.name])
                    if isinstance(raw[f.name], list)
                    else raw[f.name]
                )
                for f in fields(SyntheticConfig)
                if f.name in raw  # fields added later keep their defaults for older datasets
            }
        )
        return cls(
            root=root,
            seed=manifest["seed"],
            size=manifest["size"],
            config=config,
            subjects=tuple(manifest["subjects"]),
            episodes=tuple(manifest["episodes"]),
            runs={s: tuple(e) for s, e in manifest["runs"].items()},
            tr=manifest["tr"],
            target_names=tuple(manifest["target_names"]),
            video_episodes=tuple(manifest["video_episodes"]),
        )


def _episode_duration(seed: int, episode: str, config: SyntheticConfig) -> float:
    """Soundtrack length: about ``run_seconds``, never close to a whole number of TRs."""
    rng = _rng(seed, "duration", episode)
    whole = int(round(config.run_seconds * rng.uniform(0.93, 1.07) / config.tr))
    samples = int(round((whole + rng.uniform(0.25, 0.75)) * config.tr * config.audio_rate))
    return samples / config.audio_rate


def generate_friends_like(
    out_dir: str | Path,
    *,
    seed: int = 0,
    size: str = "default",
    overwrite: bool = False,
    video: bool | None = None,
    **overrides: Any,
) -> SyntheticDataset:
    """Generate the synthetic Friends-like dataset (see the module docstring).

    Parameters
    ----------
    out_dir : :obj:`str` or :class:`pathlib.Path`
        Destination folder; created if needed.  Must be empty unless ``overwrite``.
    seed : :obj:`int`, default=0
        Everything random derives from it: same seed, same bytes.
    size : {"tiny", "default", "large"}, default="default"
        A preset of :data:`SIZES`.
    overwrite : :obj:`bool`, default=False
        Replace the dataset folders and files in ``out_dir`` (nothing else is removed).
    video : :obj:`bool`, optional
        Write ``config.video_episodes`` as mkv (needs the ``ffmpeg`` command).  Default:
        when ``ffmpeg`` is available; if not, those episodes are written as wav with a
        warning.
    **overrides
        Any :class:`SyntheticConfig` field, e.g. ``n_subjects=2, run_seconds=140``.

    Returns
    -------
    SyntheticDataset

    Raises
    ------
    FileExistsError
        ``out_dir`` is not empty and ``overwrite`` is False.
    """
    import h5py
    import soundfile as sf

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    config = replace(SIZES[size], **overrides)
    for field_name in ("n_subjects", "n_seasons", "episodes_per_season"):
        if getattr(config, field_name) < 1:
            raise ValueError(f"{field_name} must be >= 1")
    subjects = config.subjects()
    episodes = config.episodes()
    tr = config.tr
    durations = {episode: _episode_duration(seed, episode, config) for episode in episodes}
    n_trs = {episode: int(math.floor(durations[episode] / tr)) + _EXTRA_TRS for episode in episodes}
    # Each run must hold the default confounds (24 motion + 2, plus cosines), the feature
    # regressors they are orthogonalised to and a constant, with room to spare.
    needed = 26 + len(FEATURES) + 2
    if min(n_trs.values()) < needed:
        raise ValueError(
            f"run_seconds={config.run_seconds} gives runs of {min(n_trs.values())} TRs; the default confound "
            f"strategy (26 regressors) and {len(FEATURES)} feature regressors need >= {needed}: use "
            f"run_seconds >= {math.ceil((needed - _EXTRA_TRS + 1) * tr / 0.93)}"
        )

    root = Path(out_dir)
    ours = (
        "stimuli",
        "fmriprep",
        "algonauts",
        "atlas",
        "ground_truth.json",
        "ground_truth_features.npz",
        "dataset_description.json",
    )
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty; pass overwrite=True to replace the dataset in it")
        for name in ours:
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    root.mkdir(parents=True, exist_ok=True)
    ffmpeg = shutil.which("ffmpeg")
    if video is None:
        video = ffmpeg is not None
        if not video and config.video_episodes:
            warnings.warn("ffmpeg not found: video episodes are written as wav", stacklevel=2)
    elif video and ffmpeg is None:
        raise RuntimeError("video=True needs the ffmpeg command")
    if config.audio_format not in _AUDIO_FORMATS:
        raise ValueError(f"audio_format must be one of {sorted(_AUDIO_FORMATS)}, got {config.audio_format!r}")
    if not config.write_fmriprep:
        return _generate_streaming(root, config, seed=seed, size=size, durations=durations, n_trs=n_trs)

    # --- stimuli and features (shared by all subjects)
    features_tr: dict[str, np.ndarray] = {}
    segments_by_episode: dict[str, list] = {}
    video_written = []
    stimuli_dir = root / "stimuli"
    stimuli_dir.mkdir(parents=True, exist_ok=True)
    for episode in episodes:
        duration = durations[episode]
        audio, frames, segments = _synthesise_episode(seed, episode, duration, config.audio_rate)
        segments_by_episode[episode] = segments
        features_tr[episode] = _features_at_trs(frames, n_trs[episode], tr)
        if video and episode in config.video_episodes:
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                wav = Path(tmp) / "audio.wav"
                sf.write(wav, audio, config.audio_rate, subtype="PCM_16")
                _write_video(wav, stimuli_dir / f"friends_{episode}.mkv", duration)
            video_written.append(episode)
        else:
            _write_audio(stimuli_dir, episode, audio, config)

    # --- geometry and atlas
    affine, brain, _ = _volume_geometry(config)
    labels, table = _make_atlas(config, seed)
    atlas_dir = root / "atlas"
    _write_nifti(atlas_dir / f"tpl-{SPACE}_atlas-{ATLAS_NAME}_dseg.nii.gz", labels, affine)
    auditory_ids = [row["index"] for row in table if row["kind"] == "auditory"]
    stg_ids = auditory_ids[: max(2, len(auditory_ids) // 3)]
    stg = np.isin(labels, stg_ids).astype(np.uint8)
    _write_nifti(atlas_dir / f"tpl-{SPACE}_desc-STG_mask.nii.gz", stg, affine)
    brain_u8 = brain.astype(np.uint8)
    flat_labels = labels.ravel()
    brain_flat = brain.ravel()
    parcel_members = [np.flatnonzero(flat_labels == row["index"]) for row in table]
    stg_voxels = np.flatnonzero(stg.ravel())
    n_parcels = config.n_parcels
    kinds = np.array([row["kind"] for row in table])

    # spatial baseline (shared) and outside-brain background
    geometry_rng = _rng(seed, "baseline")
    baseline = np.where(brain_flat, 1000.0 * (0.8 + 0.4 * geometry_rng.random(brain_flat.size)), 30.0)

    subjects_truth: dict[str, Any] = {}
    runs_by_subject: dict[str, list[str]] = {}
    missing = {s: [e for (subj, e) in config.missing_runs if subj == s] for s in subjects}
    for subject in subjects:
        run_episodes = [e for e in episodes if e not in missing[subject]]
        runs_by_subject[subject] = run_episodes
        raw_weights = _tuning(config, seed, table, subject)
        # per-run confounds and cleaning
        confound_columns = {e: _confounds(seed, subject, e, features_tr[e], tr) for e in run_episodes}
        confound_used = {e: _default_confound_matrix(confound_columns[e]) for e in run_episodes}
        clean_features = {e: _residualise(features_tr[e], confound_used[e]) for e in run_episodes}
        # normalise weights: cleaned noiseless signal of unit pooled SD per parcel
        pooled = np.zeros(n_parcels)
        total = 0
        for e in run_episodes:
            signal = clean_features[e] @ raw_weights.T
            pooled += (signal**2).sum(axis=0)
            total += signal.shape[0]
        scale = np.where(pooled > 0, 1.0 / np.sqrt(np.maximum(pooled, 1e-300) / total), 0.0)
        weights = raw_weights * scale[:, None]
        srng = _rng(seed, "snr", subject)
        snr = np.zeros(n_parcels)
        snr[kinds == "auditory"] = srng.uniform(*config.auditory_snr, size=int((kinds == "auditory").sum()))
        snr[kinds == "weak"] = srng.uniform(*config.weak_snr, size=int((kinds == "weak").sum()))
        noise = {e: _ar1(_rng(seed, "noise", subject, e), (n_trs[e], n_parcels), _NOISE_PHI) for e in run_episodes}
        clean_noise = {e: _residualise(noise[e], confound_used[e]) for e in run_episodes}
        noise_power = sum((clean_noise[e] ** 2).sum(axis=0) for e in run_episodes)
        signal_power = sum(((clean_features[e] @ weights.T) ** 2).sum(axis=0) for e in run_episodes)
        noise_sd = np.where(snr > 0, np.sqrt(signal_power / np.maximum(snr, 1e-12) / noise_power), 1.0)
        noise_sd[kinds == "noise"] = 1.0

        h5_runs: dict[str, np.ndarray] = {}
        ceiling_by_run: dict[str, list[float]] = {}
        voxel_ceiling_sum = np.zeros(stg_voxels.size)
        sessions = {}
        for r_index, episode in enumerate(episodes):
            if episode not in run_episodes:
                continue
            session = f"{r_index // config.runs_per_session + 1:03d}"
            sessions[episode] = session
            n = n_trs[episode]
            signal = features_tr[episode] @ weights.T  # (n, P) noiseless drive
            parcel = signal + noise[episode] * noise_sd  # the parcel's true mean series
            clean_signal = clean_features[episode] @ weights.T
            target = _zscore(_residualise(parcel, confound_used[episode]))
            h5_runs[episode] = target.astype(np.float32)
            ceiling_by_run[episode] = [round(float(v), 6) for v in _corr_columns(clean_signal, target)]

            # voxels
            vrng = _rng(seed, "voxels", subject, episode)
            conf = confound_used[episode]
            conf_z = _zscore(conf) if conf.shape[1] else conf
            n_conf = conf_z.shape[1]
            voxel_series = np.empty((n, brain_flat.size))
            voxel_series[:] = baseline
            in_parcel = np.zeros(brain_flat.size, dtype=bool)
            for p, members in enumerate(parcel_members):
                common = vrng.standard_normal(n_conf) * _CONFOUND_SD / math.sqrt(max(n_conf, 1))
                own = vrng.standard_normal((members.size, n_conf)) * 0.5 * _CONFOUND_SD / math.sqrt(max(n_conf, 1))
                voxel_noise = vrng.standard_normal((n, members.size)) * _VOXEL_NOISE
                voxel_noise -= voxel_noise.mean(axis=1, keepdims=True)  # parcel mean unchanged
                voxel_series[:, members] += (
                    _VOXEL_GAIN * parcel[:, [p]] + conf_z @ (common[None, :] + own).T + voxel_noise
                )
                in_parcel[members] = True
            others = np.flatnonzero(brain_flat & ~in_parcel)
            if others.size:  # brain voxels outside every parcel (none when parcels tile the brain)
                loadings = vrng.standard_normal((others.size, n_conf)) * _CONFOUND_SD / math.sqrt(max(n_conf, 1))
                voxel_series[:, others] += _VOXEL_GAIN * _ar1(vrng, (n, others.size), _NOISE_PHI) + conf_z @ loadings.T
            outside = np.flatnonzero(~brain_flat)
            voxel_series[:, outside] += 3.0 * vrng.standard_normal((n, outside.size))
            # voxel-level ceilings of the STG mask voxels
            stg_clean = _zscore(_residualise(voxel_series[:, stg_voxels], conf))
            stg_truth = clean_signal[:, flat_labels[stg_voxels] - 1]
            voxel_ceiling_sum += _corr_columns(stg_truth, stg_clean)

            # confounds TSV extras computed from the data, as fMRIPrep does
            columns = dict(confound_columns[episode])
            global_signal = voxel_series[:, brain_flat].mean(axis=1)
            diffs = np.diff(voxel_series[:, brain_flat], axis=0)
            dvars = np.concatenate([[np.nan], np.sqrt((diffs**2).mean(axis=1))])
            motion = np.column_stack([columns[m] for m in _MOTION])
            fd = np.abs(np.diff(motion, axis=0))
            fd = np.concatenate([[np.nan], fd[:, :3].sum(axis=1) + 50.0 * fd[:, 3:].sum(axis=1)])
            extras = {
                "global_signal": global_signal,
                "global_signal_derivative1": np.diff(global_signal, prepend=np.nan),
                "global_signal_power2": global_signal**2,
                "global_signal_derivative1_power2": np.diff(global_signal, prepend=np.nan) ** 2,
                "csf_derivative1": np.diff(columns["csf"], prepend=np.nan),
                "csf_power2": columns["csf"] ** 2,
                "white_matter_derivative1": np.diff(columns["white_matter"], prepend=np.nan),
                "white_matter_power2": columns["white_matter"] ** 2,
                "std_dvars": dvars / np.nanmedian(dvars),
                "dvars": dvars,
                "framewise_displacement": fd,
                "rmsd": np.concatenate([[np.nan], np.sqrt((np.diff(motion[:, :3], axis=0) ** 2).sum(axis=1))]),
            }
            ordered = {}
            for name in (
                "global_signal",
                "global_signal_derivative1",
                "global_signal_power2",
                "global_signal_derivative1_power2",
                "csf",
                "csf_derivative1",
                "csf_power2",
                "white_matter",
                "white_matter_derivative1",
                "white_matter_power2",
                "std_dvars",
                "dvars",
                "framewise_displacement",
                "rmsd",
            ):
                ordered[name] = extras.get(name, columns.get(name))
            ordered.update({c: columns[c] for c in columns if c.startswith("cosine")})
            ordered.update({c: columns[c] for c in columns if c.startswith(("trans", "rot"))})

            func = root / "fmriprep" / subject / f"ses-{session}" / "func"
            prefix = f"{subject}_ses-{session}_task-{episode}"
            bold = voxel_series.T.reshape(*config.volume_shape, n).astype(np.float32)
            _write_nifti(func / f"{prefix}_space-{SPACE}_desc-preproc_bold.nii.gz", bold, affine, tr=tr)
            _write_json(
                func / f"{prefix}_space-{SPACE}_desc-preproc_bold.json",
                {
                    "RepetitionTime": tr,
                    "SkullStripped": False,
                    "SliceTimingCorrected": True,
                    "StartTime": round(tr / 2, 6),
                    "TaskName": episode,
                },
            )
            _write_nifti(func / f"{prefix}_space-{SPACE}_desc-brain_mask.nii.gz", brain_u8, affine)
            _write_confounds(func / f"{prefix}_desc-confounds_timeseries.tsv", ordered)

        h5_file = root / _h5_relpath(subject, config)
        h5_file.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(h5_file, "w") as handle:
            for episode, array in h5_runs.items():
                handle.create_dataset(f"ses-{sessions[episode]}_task-{episode}", data=array)

        per_run = np.array(list(ceiling_by_run.values()))
        subjects_truth[subject] = {
            "episodes": run_episodes,
            "missing_episodes": missing[subject],
            "sessions": sessions,
            "tuning": [[round(float(w), 6) for w in row] for row in weights],
            "snr": [round(float(v), 6) for v in snr],
            "noise_sd": [round(float(v), 6) for v in noise_sd],
            "noise_ceiling_r": [round(float(v), 6) for v in per_run.mean(axis=0)],
            "noise_ceiling_r2": [round(float(v), 6) for v in (per_run**2).mean(axis=0)],
            "noise_ceiling_r_by_run": ceiling_by_run,
            "voxel_noise_ceiling_r": [round(float(v), 6) for v in voxel_ceiling_sum / len(run_episodes)],
        }

    np.savez(
        root / "ground_truth_features.npz",
        **{f"features_{e}": features_tr[e].astype(np.float32) for e in episodes},
        feature_names=np.array(FEATURES),
    )
    import pandas as pd

    pd.DataFrame([{k: row[k] for k in ("index", "name", "kind")} for row in table]).to_csv(
        atlas_dir / f"tpl-{SPACE}_atlas-{ATLAS_NAME}_dseg.tsv", sep="\t", index=False
    )
    truth = {
        "seed": seed,
        "size": size,
        "tr": tr,
        "audio_sample_rate": config.audio_rate,
        "time_convention": (
            "volume i is the HRF-convolved drive sampled at t = (i + 0.5) * TR seconds from the start of the "
            "episode's soundtrack; TR i covers the audio [i*TR, (i+1)*TR)"
        ),
        "features": [{"name": n, "definition": FEATURE_DEFINITIONS[n]} for n in FEATURES],
        "feature_rate_hz": FRAME_RATE,
        "hrf": {
            "model": "glover",
            "function": "nilearn.glm.first_level.glover_hrf",
            "oversampling": int(round(tr * FRAME_RATE)),
            "time_length_s": 32.0,
            "step_s": 1 / FRAME_RATE,
        },
        "noise": {
            "model": "AR(1) Gaussian",
            "phi": _NOISE_PHI,
            "snr_definition": "variance of the cleaned noiseless signal / variance of the cleaned noise, "
            "pooled over the subject's runs",
            "auditory_snr_range": list(config.auditory_snr),
            "weak_snr_range": list(config.weak_snr),
        },
        "noise_ceiling_definition": (
            "noise_ceiling_r: mean over the subject's runs of the Pearson r between the cleaned noiseless signal "
            "and the target of the run; noise_ceiling_r2: mean over runs of r**2 (r2 of the least-squares "
            "rescaled oracle); voxel_noise_ceiling_r: the same for the STG mask voxels (mask order)"
        ),
        "cleaning": {
            "confounds": "nilearn load_confounds strategy=('high_pass','motion','wm_csf'), motion='full', "
            "wm_csf='basic'; z-score per run (ddof=1), no detrending",
            "confound_design": "motion, white matter and CSF columns orthogonalised to the run's feature "
            "regressors and a constant; cosines follow fMRIPrep (128 s cut-off)",
        },
        "voxels": {
            "baseline": "1000 * U(0.8, 1.2) inside the brain, 30 outside",
            "signal_gain": _VOXEL_GAIN,
            "voxel_noise_sd": _VOXEL_NOISE,
            "confound_sd": _CONFOUND_SD,
            "note": "voxel noise sums to zero over each parcel, so parcel means equal the parcel series",
        },
        "parcels": table,
        "stg_mask_parcels": [int(i) for i in stg_ids],
        "extra_trs_after_audio": _EXTRA_TRS,
        "n_trs": n_trs,
        "segments": segments_by_episode,
        "subjects": subjects_truth,
    }
    _write_json(root / "ground_truth.json", truth)
    _write_json(
        root / "fmriprep" / "dataset_description.json",
        {
            "Name": "Synthetic Friends-like fMRIPrep derivatives",
            "BIDSVersion": "1.8.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "training.synthetic (hear-brainsoundnet)"}],
        },
    )
    config_dict = asdict(config)
    dataset = SyntheticDataset(
        root=root,
        seed=seed,
        size=size,
        config=config,
        subjects=tuple(subjects),
        episodes=tuple(episodes),
        runs={s: tuple(e) for s, e in runs_by_subject.items()},
        tr=tr,
        target_names=tuple(row["name"] for row in table),
        video_episodes=tuple(video_written),
    )
    description = {
        "Name": "Synthetic Friends-like naturalistic fMRI dataset",
        "Description": (
            "Soundtracks of half-episodes with speech-like, music-like, noise and silent segments; brain "
            "responses generated from known auditory features, per-parcel and per-subject tuning, nilearn's "
            "Glover HRF and AR(1) noise of known SNR, in fMRIPrep-like NIfTI and Algonauts-like HDF5 layouts. "
            "See ground_truth.json and training/synthetic.py."
        ),
        "GeneratedBy": [{"Name": "training.synthetic (hear-brainsoundnet)"}],
        "SyntheticFriends": {
            "seed": seed,
            "size": size,
            "config": config_dict,
            "subjects": subjects,
            "episodes": episodes,
            "runs": runs_by_subject,
            "tr": tr,
            "target_names": list(dataset.target_names),
            "video_episodes": video_written,
        },
    }
    _write_json(root / "dataset_description.json", description)  # last: marks completion
    return dataset


# --------------------------------------------------------------------------- streaming (HDF5 only)

_AUDIO_FORMATS = {"wav": "PCM_16", "flac": "PCM_16"}


def _write_audio(stimuli_dir: Path, episode: str, audio: np.ndarray, config: SyntheticConfig) -> Path:
    """``friends_<episode>.<audio_format>`` at ``config.audio_rate``, 16-bit."""
    import soundfile as sf

    path = stimuli_dir / f"friends_{episode}.{config.audio_format}"
    sf.write(path, audio, config.audio_rate, subtype=_AUDIO_FORMATS[config.audio_format],
             format=config.audio_format.upper())
    return path


def _plain_table(config: SyntheticConfig) -> list[dict[str, Any]]:
    """The parcel table without an atlas image: index, name and kind, in the atlas's kind order."""
    kinds = ["auditory"] * config.n_auditory + ["weak"] * config.n_weak + ["noise"] * config.n_noise
    width = len(str(len(kinds)))
    counts: dict[str, int] = {}
    table = []
    for i, kind in enumerate(kinds):
        counts[kind] = counts.get(kind, 0) + 1
        table.append({"index": i + 1, "name": f"{kind}-{counts[kind]:0{width}d}", "kind": kind})
    return table


def _stream_stimuli(root: Path, config: SyntheticConfig, seed: int, durations: dict[str, float],
                    n_trs: dict[str, int]) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Synthesise and write each soundtrack in turn (one in memory at a time); return the
    features at each TR and the segment lists (small)."""
    stimuli_dir = root / "stimuli"
    stimuli_dir.mkdir(parents=True, exist_ok=True)
    features_tr, segments = {}, {}
    for episode, duration in durations.items():
        audio, frames, segments[episode] = _synthesise_episode(seed, episode, duration, config.audio_rate)
        features_tr[episode] = _features_at_trs(frames, n_trs[episode], config.tr)
        _write_audio(stimuli_dir, episode, audio, config)
        del audio, frames
    return features_tr, segments


def _subject_noise_levels(config: SyntheticConfig, seed: int, subject: str, table: list[dict],
                          runs: dict[str, tuple[np.ndarray, np.ndarray]], n_trs: dict[str, int]
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised tuning weights, SNRs and noise SDs of a subject, from pooled statistics
    accumulated run by run (each run's noise is drawn, summed and dropped): the same numbers,
    in the same order of operations, as the in-memory generator."""
    kinds = np.array([row["kind"] for row in table])
    raw_weights = _tuning(config, seed, table, subject)
    pooled, total = np.zeros(config.n_parcels), 0
    for confounds, clean in runs.values():
        signal = clean @ raw_weights.T
        pooled += (signal**2).sum(axis=0)
        total += signal.shape[0]
    scale = np.where(pooled > 0, 1.0 / np.sqrt(np.maximum(pooled, 1e-300) / total), 0.0)
    weights = raw_weights * scale[:, None]
    srng = _rng(seed, "snr", subject)
    snr = np.zeros(config.n_parcels)
    snr[kinds == "auditory"] = srng.uniform(*config.auditory_snr, size=int((kinds == "auditory").sum()))
    snr[kinds == "weak"] = srng.uniform(*config.weak_snr, size=int((kinds == "weak").sum()))
    noise_power: Any = 0
    signal_power: Any = 0
    for episode, (confounds, clean) in runs.items():
        noise = _ar1(_rng(seed, "noise", subject, episode), (n_trs[episode], config.n_parcels), _NOISE_PHI)
        noise_power = noise_power + (_residualise(noise, confounds) ** 2).sum(axis=0)
        signal_power = signal_power + ((clean @ weights.T) ** 2).sum(axis=0)
    noise_sd = np.where(snr > 0, np.sqrt(signal_power / np.maximum(snr, 1e-12) / noise_power), 1.0)
    noise_sd[kinds == "noise"] = 1.0
    return weights, snr, noise_sd


def _stream_subject(handle: Any, config: SyntheticConfig, seed: int, subject: str, episodes: list[str],
                    table: list[dict], features_tr: dict[str, np.ndarray], n_trs: dict[str, int]
                    ) -> dict[str, Any]:
    """Write one subject's runs (``episodes``) into the open HDF5 ``handle``, one run in memory
    at a time; return its ground truth."""
    # sessions number every episode of the design, missing runs included, as in the in-memory path
    sessions = {e: f"{i // config.runs_per_session + 1:03d}" for i, e in enumerate(config.episodes())
                if e in episodes}
    runs = {}
    for episode in episodes:
        confounds = _default_confound_matrix(_confounds(seed, subject, episode, features_tr[episode], config.tr))
        runs[episode] = (confounds, _residualise(features_tr[episode], confounds))  # (n, ~30), (n, 10)
    weights, snr, noise_sd = _subject_noise_levels(config, seed, subject, table, runs, n_trs)
    ceiling_by_run: dict[str, list[float]] = {}
    for episode, (confounds, clean) in runs.items():
        noise = _ar1(_rng(seed, "noise", subject, episode), (n_trs[episode], config.n_parcels), _NOISE_PHI)
        parcel = features_tr[episode] @ weights.T + noise * noise_sd
        target = _zscore(_residualise(parcel, confounds))
        handle.create_dataset(f"ses-{sessions[episode]}_task-{episode}", data=target.astype(np.float32))
        ceiling_by_run[episode] = [round(float(v), 6) for v in _corr_columns(clean @ weights.T, target)]
    per_run = np.array(list(ceiling_by_run.values()))
    return {
        "episodes": episodes, "missing_episodes": [], "sessions": sessions,
        "tuning": [[round(float(w), 6) for w in row] for row in weights],
        "snr": [round(float(v), 6) for v in snr], "noise_sd": [round(float(v), 6) for v in noise_sd],
        "noise_ceiling_r": [round(float(v), 6) for v in per_run.mean(axis=0)],
        "noise_ceiling_r2": [round(float(v), 6) for v in (per_run**2).mean(axis=0)],
        "noise_ceiling_r_by_run": ceiling_by_run,
    }


def _generate_streaming(root: Path, config: SyntheticConfig, *, seed: int, size: str,
                        durations: dict[str, float], n_trs: dict[str, int]) -> SyntheticDataset:
    """The dataset in the Algonauts HDF5 layout only, soundtrack by soundtrack and run by run:
    memory holds one soundtrack, one run's targets and per-TR features, whatever the size.

    The HDF5 targets are those of the in-memory generator for the same configuration (same
    random streams, same operations); parcels have no atlas image, hence no voxels."""
    import h5py

    subjects, episodes = config.subjects(), config.episodes()
    missing = {s: [e for (subj, e) in config.missing_runs if subj == s] for s in subjects}
    features_tr, segments = _stream_stimuli(root, config, seed, durations, n_trs)
    table = _plain_table(config)
    subjects_truth, runs_by_subject = {}, {}
    for subject in subjects:
        runs_by_subject[subject] = [e for e in episodes if e not in missing[subject]]
        h5_file = root / _h5_relpath(subject, config)
        h5_file.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(h5_file, "w") as handle:
            subjects_truth[subject] = _stream_subject(handle, config, seed, subject, runs_by_subject[subject],
                                                      table, features_tr, n_trs)
        subjects_truth[subject]["missing_episodes"] = missing[subject]
    np.savez(root / "ground_truth_features.npz",
             **{f"features_{e}": features_tr[e].astype(np.float32) for e in episodes},
             feature_names=np.array(FEATURES))
    _write_json(root / "ground_truth.json", {
        "seed": seed, "size": size, "tr": config.tr, "audio_sample_rate": config.audio_rate,
        "time_convention": "volume i is the HRF-convolved drive sampled at t = (i + 0.5) * TR seconds",
        "features": [{"name": n, "definition": FEATURE_DEFINITIONS[n]} for n in FEATURES],
        "layouts": ["algonauts"], "parcels": table, "extra_trs_after_audio": _EXTRA_TRS,
        "n_trs": n_trs, "segments": segments, "subjects": subjects_truth,
    })
    dataset = SyntheticDataset(root=root, seed=seed, size=size, config=config, subjects=tuple(subjects),
                               episodes=tuple(episodes), runs={s: tuple(e) for s, e in runs_by_subject.items()},
                               tr=config.tr, target_names=tuple(row["name"] for row in table), video_episodes=())
    _write_json(root / "dataset_description.json", {  # last: marks completion
        "Name": "Synthetic Friends-like naturalistic fMRI dataset (Algonauts HDF5 layout only)",
        "GeneratedBy": [{"Name": "training.synthetic (hear-brainsoundnet)"}],
        "SyntheticFriends": {"seed": seed, "size": size, "config": asdict(config), "subjects": subjects,
                             "episodes": episodes, "runs": runs_by_subject, "tr": config.tr,
                             "target_names": list(dataset.target_names), "video_episodes": []},
    })
    return dataset


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m training.synthetic OUT_DIR [--seed N] [--size NAME]``."""
    parser = argparse.ArgumentParser(prog="python -m training.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="destination folder (must be empty unless --overwrite)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", choices=sorted(SIZES), default="default", help="dataset size (default: default)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT_DIR")
    parser.add_argument("--no-video", action="store_true", help="write every stimulus as wav (no ffmpeg needed)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        dataset = generate_friends_like(
            args.out_dir,
            seed=args.seed,
            size=args.size,
            overwrite=args.overwrite,
            video=False if args.no_video else None,
        )
    except (FileExistsError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    n_runs = sum(len(r) for r in dataset.runs.values())
    print(
        f"wrote {dataset.root}: {len(dataset.subjects)} subjects, {len(dataset.episodes)} episodes, "
        f"{n_runs} runs, {len(dataset.target_names)} parcels, TR {dataset.tr} s, seed {dataset.seed} "
        f"({elapsed:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
