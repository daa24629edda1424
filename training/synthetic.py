"""A synthetic Friends-like dataset with a known ground truth: the project's embedded data.

:func:`generate_friends_like` writes, deterministically for a seed:

- **stimuli**: one soundtrack per half-episode (``stimuli/friends_s01e01a.wav``, 16 kHz
  PCM so that resampling to 22,050 Hz is exercised; by default one episode as
  ``friends_s01e01b.mkv``, FLAC audio plus a small video stream, written with the
  ``ffmpeg`` command when available).  Each soundtrack is a sequence of segments of a few
  seconds: speech-like sounds (glottal pulse train with changing pitch through three
  formant resonators, in syllables), music-like notes (harmonic tones, ADSR envelopes,
  occasional dyads), band-limited noise bursts, and silence, over a faint room noise
  (:mod:`training.synthetic_audio`).
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
0.92; a log-mel readout 0.82; noise parcels stay at 0.

Sizes (:data:`SIZES`): ``"tiny"`` for tests (2 subjects, 3 seasons x 1 episode x 2
halves = 6 runs of about 60 s, 10 parcels, 10x12x10 voxels of 12 mm), ``"default"`` (3
subjects, 3 seasons x 10 episodes x 2 halves = 60 runs of about 90 s (58-67 volumes), 24
parcels: 14 auditory, 4 weak, 6 noise, 16x20x16 voxels of 8 mm; about 370 MB), ``"large"``
(4 subjects, 4 seasons x 12 episodes, 90 s runs), and ``"subject"``: the shape of one real CNeuroMod subject (seasons 1-4
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import lfilter

from .synthetic_audio import (
    FEATURE_DEFINITIONS,
    FEATURES,
    FRAME_RATE,
    features_at_trs,
    seeded_rng,
    synthesise_episode,
)

__all__ = ["FEATURES", "SIZES", "SyntheticConfig", "SyntheticDataset", "generate_friends_like", "main"]

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

SPACE = "MNI152NLin2009cAsym"
ATLAS_NAME = "SynthAud"
_VOXEL_GAIN = 8.0  # parcel signal amplitude in voxel units (baseline ~1000: ~0.8 %)
_VOXEL_NOISE = 8.0
_CONFOUND_SD = 6.0
_NOISE_PHI = 0.3
_EXTRA_TRS = 2


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
    rng = seeded_rng(seed, "atlas")
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
    rng = seeded_rng(seed, "tuning")
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
    srng = seeded_rng(seed, "tuning", subject)
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
    rng = seeded_rng(seed, "confounds", subject, episode)
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


_AUDIO_FORMATS = {"wav": "PCM_16", "flac": "PCM_16"}  # audio_format -> libsndfile subtype


def _write_pcm(path: Path, audio: np.ndarray, rate: int, audio_format: str) -> None:
    """16-bit ``audio`` at ``rate`` as ``audio_format`` ("wav" or "flac")."""
    import soundfile as sf

    sf.write(path, audio, rate, subtype=_AUDIO_FORMATS[audio_format], format=audio_format.upper())


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


# --------------------------------------------------------------------------- the recipe


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
    size : {"tiny", "default", "large", "subject"}, default="default"
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
    ValueError
        An unknown size or audio format, or runs too short for the confound regressors.
    RuntimeError
        ``video=True`` without the ``ffmpeg`` command.
    """
    plan = _plan_dataset(size, seed, overrides)
    video = _use_video(video, plan.config)
    root = _prepare_out_dir(Path(out_dir), overwrite)
    if not plan.config.write_fmriprep:
        return _generate_streaming(root, plan)
    stimuli = _write_stimuli(root, plan, video=video)
    brain = _write_atlas(root, plan.config, seed)
    subjects_truth = {subject: _write_subject(root, plan, brain, stimuli.features_tr, subject)
                      for subject in plan.config.subjects()}
    _write_features(root, plan, stimuli.features_tr)
    _write_ground_truth(root, plan, brain, stimuli.segments, subjects_truth)
    _write_json(root / "fmriprep" / "dataset_description.json", _FMRIPREP_DESCRIPTION)
    return _write_description(root, plan, brain.table, stimuli.video_written, _FULL_DESCRIPTION)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Plan:
    """What to generate: the checked configuration, and each episode's length in s and in volumes."""

    config: SyntheticConfig
    seed: int
    size: str
    durations: dict[str, float]
    n_trs: dict[str, int]

    def missing(self, subject: str) -> list[str]:
        """The subject's episodes without brain data."""
        return [episode for (who, episode) in self.config.missing_runs if who == subject]

    def runs(self, subject: str) -> list[str]:
        """The subject's episodes with brain data, in viewing order."""
        missing = self.missing(subject)
        return [episode for episode in self.config.episodes() if episode not in missing]

    def sessions(self, subject: str) -> dict[str, str]:
        """Session label of each of the subject's runs; sessions number every episode of the
        design, missing runs included."""
        runs = self.runs(subject)
        return {episode: f"{i // self.config.runs_per_session + 1:03d}"
                for i, episode in enumerate(self.config.episodes()) if episode in runs}


def _plan_dataset(size: str, seed: int, overrides: dict[str, Any]) -> _Plan:
    """The configuration of ``size`` with ``overrides``, checked, and the episodes' lengths."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    config = replace(SIZES[size], **overrides)
    for field_name in ("n_subjects", "n_seasons", "episodes_per_season"):
        if getattr(config, field_name) < 1:
            raise ValueError(f"{field_name} must be >= 1, got {getattr(config, field_name)}")
    if config.audio_format not in _AUDIO_FORMATS:
        raise ValueError(f"audio_format must be one of {sorted(_AUDIO_FORMATS)}, got {config.audio_format!r}")
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
    return _Plan(config, seed, size, durations, n_trs)


def _episode_duration(seed: int, episode: str, config: SyntheticConfig) -> float:
    """Soundtrack length: about ``run_seconds``, never close to a whole number of TRs."""
    rng = seeded_rng(seed, "duration", episode)
    whole = int(round(config.run_seconds * rng.uniform(0.93, 1.07) / config.tr))
    samples = int(round((whole + rng.uniform(0.25, 0.75)) * config.tr * config.audio_rate))
    return samples / config.audio_rate


def _use_video(video: bool | None, config: SyntheticConfig) -> bool:
    """Whether to write the video episodes as mkv: as asked, or when ``ffmpeg`` is available."""
    ffmpeg = shutil.which("ffmpeg")
    if video is None:
        if ffmpeg is None and config.video_episodes:
            # stacklevel 3: the warning points at the caller of generate_friends_like
            warnings.warn("ffmpeg not found: video episodes are written as wav", stacklevel=3)
        return ffmpeg is not None
    if video and ffmpeg is None:
        raise RuntimeError("video=True needs the ffmpeg command")
    return video


# What generate_friends_like writes in its folder (and may replace there).
_DATASET_ENTRIES = ("stimuli", "fmriprep", "algonauts", "atlas", "ground_truth.json", "ground_truth_features.npz",
                    "dataset_description.json")


def _prepare_out_dir(root: Path, overwrite: bool) -> Path:
    """Create ``root``; if it is not empty, remove the dataset's own entries (only with ``overwrite``)."""
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty; pass overwrite=True to replace the dataset in it")
        for name in _DATASET_ENTRIES:
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    root.mkdir(parents=True, exist_ok=True)
    return root


# --------------------------------------------------------------------------- stimuli


@dataclass
class _Stimuli:
    """What the soundtracks leave in memory: per-TR features and segment lists (both small)."""

    features_tr: dict[str, np.ndarray] = field(default_factory=dict)
    segments: dict[str, list] = field(default_factory=dict)
    video_written: list[str] = field(default_factory=list)


def _write_stimuli(root: Path, plan: _Plan, *, video: bool) -> _Stimuli:
    """Synthesise and write each soundtrack in turn (one in memory at a time)."""
    config = plan.config
    stimuli_dir = root / "stimuli"
    stimuli_dir.mkdir(parents=True, exist_ok=True)
    out = _Stimuli()
    for episode in config.episodes():
        duration = plan.durations[episode]
        audio, frames, out.segments[episode] = synthesise_episode(plan.seed, episode, duration, config.audio_rate)
        out.features_tr[episode] = features_at_trs(frames, plan.n_trs[episode], config.tr)
        if video and episode in config.video_episodes:
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                wav = Path(tmp) / "audio.wav"
                _write_pcm(wav, audio, config.audio_rate, "wav")
                _write_video(wav, stimuli_dir / f"friends_{episode}.mkv", duration)
            out.video_written.append(episode)
        else:
            _write_pcm(stimuli_dir / f"friends_{episode}.{config.audio_format}", audio, config.audio_rate,
                       config.audio_format)
        del audio, frames
    return out


# --------------------------------------------------------------------------- brain volume and atlas


@dataclass(frozen=True)
class _Brain:
    """The volume every subject shares: geometry, atlas, STG mask and voxel baseline (flattened)."""

    affine: np.ndarray
    mask: np.ndarray  # (X, Y, Z) bool: the brain
    labels: np.ndarray  # (X*Y*Z,) parcel label of each voxel, 0 outside the parcels
    table: list[dict[str, Any]]  # one row per parcel, in label order
    stg_ids: list[int]  # parcel labels of the STG mask
    stg_voxels: np.ndarray  # flat indices of the STG mask voxels
    baseline: np.ndarray  # (X*Y*Z,) voxel baseline: 1000 * U(0.8, 1.2) in the brain, 30 outside

    @property
    def mask_flat(self) -> np.ndarray:
        return self.mask.ravel()

    def members(self) -> list[np.ndarray]:
        """Flat voxel indices of each parcel, in label order."""
        return [np.flatnonzero(self.labels == row["index"]) for row in self.table]


def _write_atlas(root: Path, config: SyntheticConfig, seed: int) -> _Brain:
    """Write the atlas image and table and the STG mask; return the shared volume."""
    import pandas as pd

    affine, brain, _ = _volume_geometry(config)
    labels, table = _make_atlas(config, seed)
    atlas_dir = root / "atlas"
    _write_nifti(atlas_dir / f"tpl-{SPACE}_atlas-{ATLAS_NAME}_dseg.nii.gz", labels, affine)
    auditory_ids = [row["index"] for row in table if row["kind"] == "auditory"]
    stg_ids = auditory_ids[: max(2, len(auditory_ids) // 3)]
    stg = np.isin(labels, stg_ids).astype(np.uint8)
    _write_nifti(atlas_dir / f"tpl-{SPACE}_desc-STG_mask.nii.gz", stg, affine)
    pd.DataFrame([{k: row[k] for k in ("index", "name", "kind")} for row in table]).to_csv(
        atlas_dir / f"tpl-{SPACE}_atlas-{ATLAS_NAME}_dseg.tsv", sep="\t", index=False
    )
    brain_flat = brain.ravel()
    geometry_rng = seeded_rng(seed, "baseline")
    baseline = np.where(brain_flat, 1000.0 * (0.8 + 0.4 * geometry_rng.random(brain_flat.size)), 30.0)
    return _Brain(affine=affine, mask=brain, labels=labels.ravel(), table=table, stg_ids=stg_ids,
                  stg_voxels=np.flatnonzero(stg.ravel()), baseline=baseline)


# --------------------------------------------------------------------------- one subject's runs


def _cleaned(features_tr: np.ndarray, confounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A run's default confound matrix and its features cleaned of it."""
    return confounds, _residualise(features_tr, confounds)


def _subject_noise_levels(config: SyntheticConfig, seed: int, subject: str, table: list[dict],
                          runs: dict[str, tuple[np.ndarray, np.ndarray]], n_trs: dict[str, int]
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised tuning weights, SNRs and noise SDs of a subject, from pooled statistics
    accumulated run by run (each run's noise is drawn, summed and dropped, and drawn again
    from the same stream when its series is made)."""
    kinds = np.array([row["kind"] for row in table])
    raw_weights = _tuning(config, seed, table, subject)
    # normalise weights: cleaned noiseless signal of unit pooled SD per parcel
    pooled, total = np.zeros(config.n_parcels), 0
    for confounds, clean in runs.values():
        signal = clean @ raw_weights.T
        pooled += (signal**2).sum(axis=0)
        total += signal.shape[0]
    scale = np.where(pooled > 0, 1.0 / np.sqrt(np.maximum(pooled, 1e-300) / total), 0.0)
    weights = raw_weights * scale[:, None]
    srng = seeded_rng(seed, "snr", subject)
    snr = np.zeros(config.n_parcels)
    snr[kinds == "auditory"] = srng.uniform(*config.auditory_snr, size=int((kinds == "auditory").sum()))
    snr[kinds == "weak"] = srng.uniform(*config.weak_snr, size=int((kinds == "weak").sum()))
    noise_power: Any = 0
    signal_power: Any = 0
    for episode, (confounds, clean) in runs.items():
        noise = _ar1(seeded_rng(seed, "noise", subject, episode), (n_trs[episode], config.n_parcels), _NOISE_PHI)
        noise_power = noise_power + (_residualise(noise, confounds) ** 2).sum(axis=0)
        signal_power = signal_power + ((clean @ weights.T) ** 2).sum(axis=0)
    noise_sd = np.where(snr > 0, np.sqrt(signal_power / np.maximum(snr, 1e-12) / noise_power), 1.0)
    noise_sd[kinds == "noise"] = 1.0
    return weights, snr, noise_sd


def _run_series(plan: _Plan, subject: str, episode: str, features_tr: np.ndarray, confounds: np.ndarray,
                clean: np.ndarray, weights: np.ndarray, noise_sd: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One run's parcel series (noiseless drive + noise), cleaned noiseless signal and target
    (the z-scored cleaned parcel series, what the HDF5 holds)."""
    noise = _ar1(seeded_rng(plan.seed, "noise", subject, episode), (plan.n_trs[episode], plan.config.n_parcels),
                 _NOISE_PHI)
    parcel = features_tr @ weights.T + noise * noise_sd
    target = _zscore(_residualise(parcel, confounds))
    return parcel, clean @ weights.T, target


def _rounded(values: Any) -> list[float]:
    return [round(float(v), 6) for v in values]


def _subject_truth(plan: _Plan, subject: str, weights: np.ndarray, snr: np.ndarray, noise_sd: np.ndarray,
                   ceiling_by_run: dict[str, list[float]]) -> dict[str, Any]:
    """A subject's entry of ``ground_truth.json`` (design, tuning, SNRs, parcel noise ceilings)."""
    per_run = np.array(list(ceiling_by_run.values()))
    return {
        "episodes": plan.runs(subject),
        "missing_episodes": plan.missing(subject),
        "sessions": plan.sessions(subject),
        "tuning": [_rounded(row) for row in weights],
        "snr": _rounded(snr),
        "noise_sd": _rounded(noise_sd),
        "noise_ceiling_r": _rounded(per_run.mean(axis=0)),
        "noise_ceiling_r2": _rounded((per_run**2).mean(axis=0)),
        "noise_ceiling_r_by_run": ceiling_by_run,
    }


def _write_subject(root: Path, plan: _Plan, brain: _Brain, features_tr: dict[str, np.ndarray],
                   subject: str) -> dict[str, Any]:
    """One subject's runs in both layouts (HDF5 targets; NIfTI, mask and confounds per run);
    return its ground truth, voxel noise ceilings of the STG mask included."""
    import h5py

    config, seed = plan.config, plan.seed
    columns = {e: _confounds(seed, subject, e, features_tr[e], config.tr) for e in plan.runs(subject)}
    runs = {e: _cleaned(features_tr[e], _default_confound_matrix(columns[e])) for e in columns}
    weights, snr, noise_sd = _subject_noise_levels(config, seed, subject, brain.table, runs, plan.n_trs)
    sessions = plan.sessions(subject)
    members = brain.members()
    ceiling_by_run: dict[str, list[float]] = {}
    voxel_ceiling_sum = np.zeros(brain.stg_voxels.size)
    h5_file = root / _h5_relpath(subject, config)
    h5_file.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(h5_file, "w") as handle:
        for episode, (confounds, clean) in runs.items():
            parcel, clean_signal, target = _run_series(plan, subject, episode, features_tr[episode], confounds,
                                                       clean, weights, noise_sd)
            handle.create_dataset(f"ses-{sessions[episode]}_task-{episode}", data=target.astype(np.float32))
            ceiling_by_run[episode] = _rounded(_corr_columns(clean_signal, target))
            voxels = _simulate_voxels(seeded_rng(seed, "voxels", subject, episode), parcel, confounds, brain, members)
            # voxel-level ceilings of the STG mask voxels
            stg_clean = _zscore(_residualise(voxels[:, brain.stg_voxels], confounds))
            stg_truth = clean_signal[:, brain.labels[brain.stg_voxels] - 1]
            voxel_ceiling_sum += _corr_columns(stg_truth, stg_clean)
            _write_fmriprep_run(root, config, brain, subject, sessions[episode], episode, voxels, columns[episode])
    truth = _subject_truth(plan, subject, weights, snr, noise_sd, ceiling_by_run)
    truth["voxel_noise_ceiling_r"] = _rounded(voxel_ceiling_sum / len(runs))
    return truth


def _simulate_voxels(vrng: np.random.Generator, parcel: np.ndarray, confounds: np.ndarray, brain: _Brain,
                     members: list[np.ndarray]) -> np.ndarray:
    """Voxel time series ``(n_TR, X*Y*Z)`` of one run: in each parcel ``baseline + gain * parcel
    series + confounds @ loadings + voxel noise`` with noise summing to zero over the parcel;
    other brain voxels AR(1) noise and confounds; background noise outside the brain."""
    n = parcel.shape[0]
    brain_flat = brain.mask_flat
    conf_z = _zscore(confounds) if confounds.shape[1] else confounds
    n_conf = conf_z.shape[1]
    voxel_series = np.empty((n, brain_flat.size))
    voxel_series[:] = brain.baseline
    in_parcel = np.zeros(brain_flat.size, dtype=bool)
    for p, voxels in enumerate(members):
        common = vrng.standard_normal(n_conf) * _CONFOUND_SD / math.sqrt(max(n_conf, 1))
        own = vrng.standard_normal((voxels.size, n_conf)) * 0.5 * _CONFOUND_SD / math.sqrt(max(n_conf, 1))
        voxel_noise = vrng.standard_normal((n, voxels.size)) * _VOXEL_NOISE
        voxel_noise -= voxel_noise.mean(axis=1, keepdims=True)  # parcel mean unchanged
        voxel_series[:, voxels] += _VOXEL_GAIN * parcel[:, [p]] + conf_z @ (common[None, :] + own).T + voxel_noise
        in_parcel[voxels] = True
    others = np.flatnonzero(brain_flat & ~in_parcel)
    if others.size:  # brain voxels outside every parcel (none when parcels tile the brain)
        loadings = vrng.standard_normal((others.size, n_conf)) * _CONFOUND_SD / math.sqrt(max(n_conf, 1))
        voxel_series[:, others] += _VOXEL_GAIN * _ar1(vrng, (n, others.size), _NOISE_PHI) + conf_z @ loadings.T
    outside = np.flatnonzero(~brain_flat)
    voxel_series[:, outside] += 3.0 * vrng.standard_normal((n, outside.size))
    return voxel_series


# fMRIPrep's order of the confound columns computed from the data, before cosines and motion.
_DATA_CONFOUNDS = (
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
)


def _confounds_table(columns: dict[str, np.ndarray], voxel_series: np.ndarray, brain_flat: np.ndarray
                     ) -> dict[str, np.ndarray]:
    """A run's full confounds TSV columns: the drawn ones plus those fMRIPrep computes from the
    data (global signal, DVARS, framewise displacement ...), in fMRIPrep's order."""
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
    ordered = {name: extras.get(name, columns.get(name)) for name in _DATA_CONFOUNDS}
    ordered.update({c: columns[c] for c in columns if c.startswith("cosine")})
    ordered.update({c: columns[c] for c in columns if c.startswith(("trans", "rot"))})
    return ordered


def _write_fmriprep_run(root: Path, config: SyntheticConfig, brain: _Brain, subject: str, session: str,
                        episode: str, voxel_series: np.ndarray, columns: dict[str, np.ndarray]) -> None:
    """One run's fMRIPrep-like files: BOLD NIfTI and its sidecar, brain mask, confounds TSV."""
    func = root / "fmriprep" / subject / f"ses-{session}" / "func"
    prefix = f"{subject}_ses-{session}_task-{episode}"
    tr = config.tr
    bold = voxel_series.T.reshape(*config.volume_shape, voxel_series.shape[0]).astype(np.float32)
    _write_nifti(func / f"{prefix}_space-{SPACE}_desc-preproc_bold.nii.gz", bold, brain.affine, tr=tr)
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
    _write_nifti(func / f"{prefix}_space-{SPACE}_desc-brain_mask.nii.gz", brain.mask.astype(np.uint8), brain.affine)
    _write_confounds(func / f"{prefix}_desc-confounds_timeseries.tsv",
                     _confounds_table(columns, voxel_series, brain.mask_flat))


# --------------------------------------------------------------------------- ground truth and description


def _write_features(root: Path, plan: _Plan, features_tr: dict[str, np.ndarray]) -> None:
    """``ground_truth_features.npz``: the feature regressors at each TR, per episode."""
    np.savez(
        root / "ground_truth_features.npz",
        **{f"features_{e}": features_tr[e].astype(np.float32) for e in plan.config.episodes()},
        feature_names=np.array(FEATURES),
    )


def _write_ground_truth(root: Path, plan: _Plan, brain: _Brain, segments: dict[str, list],
                        subjects_truth: dict[str, Any]) -> None:
    """``ground_truth.json`` of the full (NIfTI + HDF5) dataset."""
    config, tr = plan.config, plan.config.tr
    truth = {
        "seed": plan.seed,
        "size": plan.size,
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
        "parcels": brain.table,
        "stg_mask_parcels": [int(i) for i in brain.stg_ids],
        "extra_trs_after_audio": _EXTRA_TRS,
        "n_trs": plan.n_trs,
        "segments": segments,
        "subjects": subjects_truth,
    }
    _write_json(root / "ground_truth.json", truth)


_FMRIPREP_DESCRIPTION = {
    "Name": "Synthetic Friends-like fMRIPrep derivatives",
    "BIDSVersion": "1.8.0",
    "DatasetType": "derivative",
    "GeneratedBy": [{"Name": "training.synthetic (hear-brainsoundnet)"}],
}
_FULL_DESCRIPTION = {
    "Name": "Synthetic Friends-like naturalistic fMRI dataset",
    "Description": (
        "Soundtracks of half-episodes with speech-like, music-like, noise and silent segments; brain "
        "responses generated from known auditory features, per-parcel and per-subject tuning, nilearn's "
        "Glover HRF and AR(1) noise of known SNR, in fMRIPrep-like NIfTI and Algonauts-like HDF5 layouts. "
        "See ground_truth.json and training/synthetic.py."
    ),
    "GeneratedBy": [{"Name": "training.synthetic (hear-brainsoundnet)"}],
}
_HDF5_DESCRIPTION = {
    "Name": "Synthetic Friends-like naturalistic fMRI dataset (Algonauts HDF5 layout only)",
    "GeneratedBy": [{"Name": "training.synthetic (hear-brainsoundnet)"}],
}


def _write_description(root: Path, plan: _Plan, table: list[dict[str, Any]], video_written: list[str],
                       header: dict[str, Any]) -> SyntheticDataset:
    """Write ``dataset_description.json`` (``header`` and the manifest :meth:`SyntheticDataset.load`
    reads), last: its presence marks a complete dataset."""
    config = plan.config
    subjects = config.subjects()
    runs_by_subject = {subject: plan.runs(subject) for subject in subjects}
    dataset = SyntheticDataset(
        root=root,
        seed=plan.seed,
        size=plan.size,
        config=config,
        subjects=tuple(subjects),
        episodes=tuple(config.episodes()),
        runs={s: tuple(e) for s, e in runs_by_subject.items()},
        tr=config.tr,
        target_names=tuple(row["name"] for row in table),
        video_episodes=tuple(video_written),
    )
    manifest = {
        "seed": plan.seed,
        "size": plan.size,
        "config": asdict(config),
        "subjects": subjects,
        "episodes": config.episodes(),
        "runs": runs_by_subject,
        "tr": config.tr,
        "target_names": list(dataset.target_names),
        "video_episodes": video_written,
    }
    _write_json(root / "dataset_description.json", {**header, "SyntheticFriends": manifest})
    return dataset


# --------------------------------------------------------------------------- streaming (HDF5 only)


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


def _stream_subject(handle: Any, plan: _Plan, subject: str, table: list[dict],
                    features_tr: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write one subject's runs into the open HDF5 ``handle``, one run in memory at a time;
    return its ground truth."""
    config, seed = plan.config, plan.seed
    sessions = plan.sessions(subject)
    runs = {}
    for episode in plan.runs(subject):
        confounds = _default_confound_matrix(_confounds(seed, subject, episode, features_tr[episode], config.tr))
        runs[episode] = _cleaned(features_tr[episode], confounds)  # (n, ~30), (n, 10)
    weights, snr, noise_sd = _subject_noise_levels(config, seed, subject, table, runs, plan.n_trs)
    ceiling_by_run: dict[str, list[float]] = {}
    for episode, (confounds, clean) in runs.items():
        _, clean_signal, target = _run_series(plan, subject, episode, features_tr[episode], confounds, clean,
                                              weights, noise_sd)
        handle.create_dataset(f"ses-{sessions[episode]}_task-{episode}", data=target.astype(np.float32))
        ceiling_by_run[episode] = _rounded(_corr_columns(clean_signal, target))
    return _subject_truth(plan, subject, weights, snr, noise_sd, ceiling_by_run)


def _generate_streaming(root: Path, plan: _Plan) -> SyntheticDataset:
    """The dataset in the Algonauts HDF5 layout only, soundtrack by soundtrack and run by run:
    memory holds one soundtrack, one run's targets and per-TR features, whatever the size.

    The HDF5 targets are those of the in-memory generator for the same configuration (same
    random streams, same operations); parcels have no atlas image, hence no voxels."""
    import h5py

    config = plan.config
    stimuli = _write_stimuli(root, plan, video=False)
    table = _plain_table(config)
    subjects_truth = {}
    for subject in config.subjects():
        h5_file = root / _h5_relpath(subject, config)
        h5_file.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(h5_file, "w") as handle:
            subjects_truth[subject] = _stream_subject(handle, plan, subject, table, stimuli.features_tr)
    _write_features(root, plan, stimuli.features_tr)
    _write_json(root / "ground_truth.json", {
        "seed": plan.seed, "size": plan.size, "tr": config.tr, "audio_sample_rate": config.audio_rate,
        "time_convention": "volume i is the HRF-convolved drive sampled at t = (i + 0.5) * TR seconds",
        "features": [{"name": n, "definition": FEATURE_DEFINITIONS[n]} for n in FEATURES],
        "layouts": ["algonauts"], "parcels": table, "extra_trs_after_audio": _EXTRA_TRS,
        "n_trs": plan.n_trs, "segments": stimuli.segments, "subjects": subjects_truth,
    })
    return _write_description(root, plan, table, [], _HDF5_DESCRIPTION)


def main(argv: Sequence[str] | None = None, prog: str = f"python -m {__package__}.synthetic") -> int:
    """Command line: ``python -m training.synthetic OUT_DIR [--seed N] [--size NAME]``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
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
