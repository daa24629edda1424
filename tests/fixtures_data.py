"""Shared fixtures and helpers for the training.data / training.synthetic tests.

Import explicitly in a test module (``from tests.fixtures_data import tiny_dataset``).  The
"tiny" synthetic dataset is generated once per test session, whatever the number of
modules that import the fixture (pytest would otherwise make one session fixture per
importing module), and its decoded stimuli are cached once too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from training.data import StimulusCache
from training.synthetic import SyntheticDataset, generate_friends_like

_DATASETS: dict[Path, SyntheticDataset] = {}

requires_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None, reason="the ffmpeg command is needed to write mkv test files"
)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    """The "tiny" synthetic dataset (seed 0), generated once per session."""
    base = tmp_path_factory.getbasetemp()
    if base not in _DATASETS:
        _DATASETS[base] = generate_friends_like(base / "tiny-dataset", size="tiny", seed=0)
    return _DATASETS[base]


@pytest.fixture(scope="session")
def tiny_stimuli(tiny_dataset: SyntheticDataset) -> StimulusCache:
    """A StimulusCache over the tiny dataset's stimuli; decoded files persist for the session."""
    cache = StimulusCache(tiny_dataset.stimuli_dir, tiny_dataset.root.parent / "tiny-audio-cache")
    cache.prepare()
    return cache


def copy_runs(dataset: SyntheticDataset, subject: str, episodes: list[str], dest: Path) -> Path:
    """Copy the fMRIPrep files of some runs into ``dest`` (a derivatives folder) to damage them."""
    source = dataset.fmriprep_dir / subject
    for path in source.rglob(f"{subject}_ses-*_task-*"):
        if any(f"_task-{episode}_" in path.name for episode in episodes):
            target = dest / subject / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return dest


def bold_path(derivatives: Path, subject: str, episode: str) -> Path:
    """The preprocessed BOLD image of one run under ``derivatives``."""
    (path,) = (derivatives / subject).rglob(f"*_task-{episode}_*_desc-preproc_bold.nii.gz")
    return path


def write_clicks(path: Path, duration: float, clicks: list[float], rate: int = 16000) -> np.ndarray:
    """A quiet noise floor with unit clicks at the given times (s); returns the signal."""
    signal = 0.001 * np.random.default_rng(0).standard_normal(int(round(duration * rate)))
    for t in clicks:
        signal[int(round(t * rate))] = 0.9
    sf.write(path, signal.astype(np.float32), rate, subtype="PCM_16")
    return signal


def annex_link(path: Path, dataset_root: Path) -> Path:
    """Make ``path`` what datalad leaves for a file not fetched: a symbolic link, relative, to
    a missing ``.git/annex/objects/<xx>/<yy>/<key>/<key>`` of ``dataset_root``."""
    key = f"MD5E-s{len(path.name) * 1000}--{hashlib.md5(path.name.encode()).hexdigest()}{''.join(path.suffixes)}"
    target = dataset_root / ".git" / "annex" / "objects" / "Xq" / "9v" / key / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(os.path.relpath(target, path.parent))
    assert path.is_symlink() and not path.exists()
    return path


def write_soundtrack(path: Path, seconds: float, *, codec: str = "aac", seed: int = 0,
                     rate: int = 48000) -> np.ndarray:
    """An episode file as the releases hold it: mkv with a 48 kHz stereo ``codec`` (aac, ac3)
    soundtrack and a small video stream, made with the ffmpeg CLI. Returns the mono mix
    (float32, ``rate``) of the audio written: slowly modulated noise, different per seed."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * t / (5.0 + seed % 7) + seed)
    left = (0.25 * envelope * rng.standard_normal(n)).astype(np.float32)
    right = (0.8 * left + 0.05 * rng.standard_normal(n)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = path.with_name(f".{path.stem}.src.wav")
    sf.write(source, np.stack([left, right], axis=1), rate, subtype="PCM_16")
    try:
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source),
                        "-f", "lavfi", "-i", f"color=c=gray:size=16x16:rate=2:duration={seconds}",
                        "-map", "0:a", "-map", "1:v", "-c:a", codec, "-ar", str(rate), "-ac", "2",
                        "-c:v", "mpeg4", str(path)], check=True, capture_output=True, timeout=120)
    finally:
        source.unlink(missing_ok=True)
    return (left + right) / 2
