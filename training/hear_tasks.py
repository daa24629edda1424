"""Small synthetic HEAR tasks, in the exact folder format heareval reads, with known answers.

Each generator writes ``<tasks_dir>/<name>-v1-full/`` (the ``<task>-<version>-<mode>`` naming
of hearpreprocess)::

    task_metadata.json       task_name, version, mode, embedding_type, prediction_type,
                             split_mode, splits, sample_duration, evaluation, ...
    labelvocabulary.csv      "idx,label", idx 0..n-1
    <split>.json             {"file.wav": ["label"]} or {"file.wav": [{"label", "start", "end"}]} (ms)
    22050/<split>/<file>.wav mono PCM_16, exactly sample_duration long

The tasks (all deterministic for a seed; sizes configurable, tens of clips by default):

- :func:`scene_task`: multiclass scenes (tone / noise / clicks / chirp), train/valid/test, top1_acc;
- :func:`kfold_task`: multiclass speech-like / music-like / noise-like, ``n_folds`` >= 3 folds;
- :func:`pitch_task`: harmonic tones of 12 MIDI pitches (C4..B4) with random timbre,
  pitch_acc and chroma_acc (vocabulary in pitch order, so idx % 12 is the chroma);
- :func:`event_task`: beeps and noise bursts placed at known times over quiet noise, onset
  F-measure (200 ms and 50 ms collars) and 1-s segment error rate;
- :func:`mixture_task`: multilabel scenes (one or two of the scene sounds mixed), mAP;
- :func:`numeric_label_tasks`: the same kinds of task with JSON-integer labels, exactly as
  hear-preprocess writes numeric labels (nsynth_pitch ``[60]``, libricount ``[0]``, maestro
  ``{"label": 60, ...}``).

:func:`write_task_suite` writes the named suites (:data:`SUITES`: ``default``, ``tiny``) that
:mod:`training.hear_eval` runs by default: the first four tasks with a small predictor grid.

``param_grid`` / ``postprocessing_grid`` go to ``evaluation_params`` (heareval's
``task_specific_param_grid`` / ``event_postprocessing_grid``): tests use them to train small
predictors quickly with meaningful scores.

Command line: ``python -m training.hear_tasks OUT_DIR [--seed 0] [--scale 1]``.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import soundfile as sf

SAMPLE_RATE = 22050
VERSION, MODE = "v1", "full"
SCENE_LABELS = ("chirp", "clicks", "noise", "tone")
KFOLD_LABELS = ("music_like", "noise_like", "speech_like")
PITCHES = tuple(range(60, 72))  # MIDI C4..B4: idx = pitch - 60, so idx % 12 is the chroma
EVENT_LABELS = ("beep", "burst")

Clip = Callable[[np.random.Generator, int], np.ndarray]
Label = Any  # a label as written to the split json: a string, or a number as hear-preprocess writes


# ----------------------------------------------------------------------------------------------
# Sounds (float64, peak about 1 before gain; n samples)
# ----------------------------------------------------------------------------------------------

def _t(n: int) -> np.ndarray:
    return np.arange(n) / SAMPLE_RATE


def _fade(x: np.ndarray, ms: float = 10.0) -> np.ndarray:
    ramp = min(len(x) // 2, int(ms * SAMPLE_RATE / 1000))
    if ramp:
        window = np.linspace(0.0, 1.0, ramp)
        x = x.copy()
        x[:ramp] *= window
        x[-ramp:] *= window[::-1]
    return x


def _band_noise(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spectrum[(freqs < low) | (freqs > high)] = 0
    out = np.fft.irfft(spectrum, n)
    return out / (np.abs(out).max() + 1e-12)


def harmonic(f0: float, n: int, rolloff: float = 1.0, n_harmonics: int = 6) -> np.ndarray:
    """A harmonic tone: partial k has amplitude k**-rolloff (below Nyquist only)."""
    t = _t(n)
    tone = sum(np.sin(2 * np.pi * f0 * k * t) / k ** rolloff
               for k in range(1, n_harmonics + 1) if f0 * k < SAMPLE_RATE / 2)
    return tone / np.abs(tone).max()


def tone(rng: np.random.Generator, n: int) -> np.ndarray:
    f0 = rng.uniform(200, 800)
    vibrato = 1 + 0.01 * np.sin(2 * np.pi * rng.uniform(3, 6) * _t(n))
    phase = 2 * np.pi * np.cumsum(f0 * vibrato) / SAMPLE_RATE
    return sum(np.sin(k * phase) / k for k in range(1, 5)) / 2.1


def noise(rng: np.random.Generator, n: int) -> np.ndarray:
    low = rng.uniform(200, 2000)
    return _band_noise(rng, n, low, low * rng.uniform(2, 6))


def clicks(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n)
    period = int(SAMPLE_RATE / rng.uniform(4, 12))
    out[rng.integers(period)::period] = 1.0
    return np.convolve(out, np.hanning(16), mode="same")


def chirp(rng: np.random.Generator, n: int) -> np.ndarray:
    f_start, f_stop = rng.uniform(200, 600), rng.uniform(2000, 6000)
    if rng.random() < 0.5:
        f_start, f_stop = f_stop, f_start
    freq = f_start * (f_stop / f_start) ** (_t(n) / _t(n)[-1])
    return np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)


def speech_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """Glottal pulses with a gliding pitch through three formant resonances, in syllables."""
    f0 = rng.uniform(90, 250) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(2, 4) * _t(n)))
    pulses = np.diff(np.floor(np.cumsum(f0 / SAMPLE_RATE)), prepend=0.0)
    spectrum = np.fft.rfft(pulses)
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    gain = sum(1 / (1 + ((freqs - f) / (f / 8)) ** 2) for f in
               (rng.uniform(500, 900), rng.uniform(1000, 1800), rng.uniform(2300, 3000)))
    out = np.fft.irfft(spectrum * gain, n)
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * _t(n) + rng.uniform(0, 6)), 0, None)
    out = out * syllables
    return out / (np.abs(out).max() + 1e-12)


def music_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """A sequence of decaying harmonic notes from a pentatonic scale."""
    out = np.zeros(n)
    note = int(SAMPLE_RATE * rng.uniform(0.15, 0.4))
    for start in range(0, n, note):
        length = min(note, n - start)
        f0 = 220 * 2 ** (rng.choice([0, 2, 4, 7, 9, 12, 14]) / 12)
        out[start:start + length] = harmonic(f0, length, rng.uniform(0.7, 1.5)) * np.exp(-4 * _t(length))
    return out


def noise_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """Broadband noise with a slow random amplitude envelope (wind, rain, traffic)."""
    envelope = np.interp(np.arange(n), np.linspace(0, n, 8), rng.uniform(0.3, 1.0, 8))
    return _band_noise(rng, n, 50, rng.uniform(4000, 10000)) * envelope


SCENE_SOUNDS: dict[str, Clip] = {"chirp": chirp, "clicks": clicks, "noise": noise, "tone": tone}
KFOLD_SOUNDS: dict[str, Clip] = {"music_like": music_like, "noise_like": noise_like,
                                 "speech_like": speech_like}


def _mix(rng: np.random.Generator, sound: np.ndarray) -> np.ndarray:
    """Random gain (peak 0.3-0.9) over a faint noise floor."""
    sound = sound / (np.abs(sound).max() + 1e-12) * rng.uniform(0.3, 0.9)
    return sound + 0.003 * rng.standard_normal(len(sound))


# ----------------------------------------------------------------------------------------------
# Writing a task folder
# ----------------------------------------------------------------------------------------------

def _write_wav(path: Path, audio: np.ndarray) -> None:
    sf.write(path, np.clip(audio, -1.0, 1.0).astype(np.float32), SAMPLE_RATE, subtype="PCM_16")


def write_task(tasks_dir: str | os.PathLike, name: str, *, embedding_type: str,
               prediction_type: str, split_mode: str, duration: float,
               evaluation: Sequence[str], labels: Sequence[str],
               splits: Mapping[str, Mapping[str, tuple[np.ndarray, Any]]],
               evaluation_params: Mapping[str, Any] | None = None,
               overwrite: bool = False) -> Path:
    """Write one task folder atomically (built beside it, then renamed into place).

    ``splits`` maps a split name to ``{filename: (audio, label)}``: a list of label names
    (scene) or of ``{"label", "start", "end"}`` events in ms (event). Audio must be exactly
    ``duration`` seconds long.
    """
    tasks_dir = Path(tasks_dir)
    target = tasks_dir / f"{name}-{VERSION}-{MODE}"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: task folder exists (pass overwrite=True to replace it)")
    n_samples = int(round(duration * SAMPLE_RATE))
    tasks_dir.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=tasks_dir))
    try:
        metadata: dict[str, Any] = {
            "task_name": name, "version": VERSION, "mode": MODE, "default_mode": MODE,
            "embedding_type": embedding_type, "prediction_type": prediction_type,
            "split_mode": split_mode, "splits": list(splits), "sample_duration": duration,
            "evaluation": list(evaluation),
        }
        if split_mode != "trainvaltest":
            metadata["nfolds"] = len(splits)
        if evaluation_params:
            metadata["evaluation_params"] = dict(evaluation_params)
        (build / "task_metadata.json").write_text(json.dumps(metadata, indent=4))
        with open(build / "labelvocabulary.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["idx", "label"])
            writer.writerows(enumerate(labels))
        for split, clips in splits.items():
            audio_dir = build / str(SAMPLE_RATE) / split
            audio_dir.mkdir(parents=True)
            for filename, (audio, _) in clips.items():
                if len(audio) != n_samples:
                    raise ValueError(f"{name}/{split}/{filename}: {len(audio)} samples, the task's "
                                     f"sample_duration {duration} s needs {n_samples}")
                _write_wav(audio_dir / filename, audio)
            (build / f"{split}.json").write_text(
                json.dumps({filename: label for filename, (_, label) in clips.items()}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(build, target)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return target


def _classification(rng: np.random.Generator, sounds: Mapping[str, Clip], split_counts: Mapping[str, int],
                    duration: float, values: Mapping[str, Label]) -> dict[str, dict[str, tuple[np.ndarray, list[Label]]]]:
    n = int(round(duration * SAMPLE_RATE))
    splits: dict[str, dict[str, tuple[np.ndarray, list[Label]]]] = {}
    for split, per_class in split_counts.items():
        clips = {}
        for label, make in sounds.items():
            for i in range(per_class):
                clips[f"{split}_{label}_{i:02d}.wav"] = (_mix(rng, _fade(make(rng, n))), [values[label]])
        splits[split] = clips
    return splits


def _label_values(classes: Sequence[str], label_values: Mapping[str, Label] | None) -> dict[str, Label]:
    """The label written for each class: its name, or ``label_values[name]`` (e.g. an integer, as
    hear-preprocess writes numeric labels: ``[60]``, ``{"label": 60, ...}``)."""
    if label_values is None:
        return {name: name for name in classes}
    if sorted(label_values) != sorted(classes):
        raise ValueError(f"label_values must give a label for each of {list(classes)}, got {list(label_values)}")
    values = [label_values[name] for name in classes]
    if len({str(v) for v in values}) != len(values):
        raise ValueError(f"label_values {values} are not distinct as strings (heareval compares str(label))")
    return {name: label_values[name] for name in classes}


def _evaluation_params(param_grid: Mapping[str, list] | None) -> dict[str, Any] | None:
    return {"task_specific_param_grid": dict(param_grid)} if param_grid else None


# ----------------------------------------------------------------------------------------------
# The tasks
# ----------------------------------------------------------------------------------------------

def scene_task(tasks_dir: str | os.PathLike, *, name: str = "synth_scene", per_class: int = 6,
               duration: float = 2.0, seed: int = 0, label_values: Mapping[str, Label] | None = None,
               param_grid: Mapping[str, list] | None = None, overwrite: bool = False) -> Path:
    """4 scene classes, ``per_class`` clips of each in train and half as many in valid/test.
    ``label_values`` maps each class of :data:`SCENE_LABELS` to the label written (default: its name)."""
    rng = np.random.default_rng(seed)
    values = _label_values(SCENE_LABELS, label_values)
    small = max(1, per_class // 2)
    splits = _classification(rng, SCENE_SOUNDS, {"train": per_class, "valid": small, "test": small},
                             duration, values)
    return write_task(tasks_dir, name, embedding_type="scene", prediction_type="multiclass",
                      split_mode="trainvaltest", duration=duration, evaluation=["top1_acc"],
                      labels=list(values.values()), splits=splits, overwrite=overwrite,
                      evaluation_params=_evaluation_params(param_grid))


def mixture_task(tasks_dir: str | os.PathLike, *, name: str = "synth_mixture", clips: Mapping[str, int] | None = None,
                 duration: float = 2.0, seed: int = 4, label_values: Mapping[str, Label] | None = None,
                 param_grid: Mapping[str, list] | None = None, overwrite: bool = False) -> Path:
    """Multilabel scenes: each clip mixes one or two of the 4 scene sounds, labelled with the
    sorted list of those present; scored by mAP (first) and d-prime."""
    rng = np.random.default_rng(seed)
    values = _label_values(SCENE_LABELS, label_values)
    n = int(round(duration * SAMPLE_RATE))
    splits: dict[str, dict[str, tuple[np.ndarray, list[Label]]]] = {}
    for split, count in (clips or {"train": 24, "valid": 8, "test": 8}).items():
        files = {}
        for i in range(count):
            present = sorted(rng.choice(SCENE_LABELS, size=int(rng.integers(1, 3)), replace=False).tolist())
            audio = sum(_fade(SCENE_SOUNDS[c](rng, n)) / len(present) for c in present)
            files[f"{split}_{i:03d}.wav"] = (_mix(rng, audio), [values[c] for c in present])
        splits[split] = files
    return write_task(tasks_dir, name, embedding_type="scene", prediction_type="multilabel",
                      split_mode="trainvaltest", duration=duration, evaluation=["mAP", "d_prime"],
                      labels=list(values.values()), splits=splits, overwrite=overwrite,
                      evaluation_params=_evaluation_params(param_grid))


def kfold_task(tasks_dir: str | os.PathLike, *, name: str = "synth_kfold", n_folds: int = 3,
               per_class: int = 3, duration: float = 2.0, seed: int = 1,
               label_values: Mapping[str, Label] | None = None,
               param_grid: Mapping[str, list] | None = None, overwrite: bool = False) -> Path:
    """3 classes, ``per_class`` clips of each in every one of ``n_folds`` (>= 3) folds.
    ``label_values`` maps each class of :data:`KFOLD_LABELS` to the label written."""
    if n_folds < 3:
        raise ValueError(f"heareval's k-fold needs at least 3 folds, got n_folds={n_folds}")
    rng = np.random.default_rng(seed)
    values = _label_values(KFOLD_LABELS, label_values)
    folds = {f"fold{i:02d}": per_class for i in range(n_folds)}
    splits = _classification(rng, KFOLD_SOUNDS, folds, duration, values)
    return write_task(tasks_dir, name, embedding_type="scene", prediction_type="multiclass",
                      split_mode="new_split_kfold", duration=duration, evaluation=["top1_acc"],
                      labels=list(values.values()), splits=splits, overwrite=overwrite,
                      evaluation_params=_evaluation_params(param_grid))


def pitch_task(tasks_dir: str | os.PathLike, *, name: str = "synth_pitch", per_pitch: int = 3,
               duration: float = 1.0, seed: int = 2, integer_labels: bool = False,
               param_grid: Mapping[str, list] | None = None, overwrite: bool = False) -> Path:
    """12 MIDI pitches (C4..B4) of harmonic tones with random timbre and level; labels are the
    MIDI numbers in pitch order: strings (``["60"]``), or with ``integer_labels`` JSON integers
    (``[60]``) as hear-preprocess writes nsynth_pitch."""
    rng = np.random.default_rng(seed)
    n = int(round(duration * SAMPLE_RATE))
    small = max(1, per_pitch // 2)
    splits: dict[str, dict[str, tuple[np.ndarray, list[str]]]] = {}
    for split, count in (("train", per_pitch), ("valid", small), ("test", small)):
        clips = {}
        for pitch in PITCHES:
            for i in range(count):
                f0 = 440.0 * 2 ** ((pitch - 69) / 12) * 2 ** (rng.uniform(-0.2, 0.2) / 12)
                sound = harmonic(f0, n, rolloff=rng.uniform(0.5, 2.0)) * np.exp(-rng.uniform(0.5, 3) * _t(n))
                label = pitch if integer_labels else str(pitch)
                clips[f"{split}_{pitch}_{i:02d}.wav"] = (_mix(rng, _fade(sound)), [label])
        splits[split] = clips
    return write_task(tasks_dir, name, embedding_type="scene", prediction_type="multiclass",
                      split_mode="trainvaltest", duration=duration,
                      evaluation=["pitch_acc", "chroma_acc"], labels=[str(p) for p in PITCHES],
                      splits=splits, overwrite=overwrite, evaluation_params=_evaluation_params(param_grid))


def place_events(rng: np.random.Generator, duration: float, n_events: int,
                 length_ms: tuple[float, float] = (250.0, 600.0), gap_ms: float = 300.0
                 ) -> list[tuple[int, int]]:
    """Non-overlapping (start, stop) sample ranges, ``gap_ms`` apart and away from the edges."""
    n = int(round(duration * SAMPLE_RATE))
    gap = int(gap_ms * SAMPLE_RATE / 1000)
    for _ in range(1000):
        lengths = rng.integers(int(length_ms[0] * SAMPLE_RATE / 1000),
                               int(length_ms[1] * SAMPLE_RATE / 1000), n_events)
        slack = n - lengths.sum() - gap * (n_events + 1)
        if slack < 0:
            continue
        cuts = np.sort(rng.integers(0, slack + 1, n_events))
        starts = gap * np.arange(1, n_events + 1) + np.concatenate([[0], np.cumsum(lengths)[:-1]]) + cuts
        return [(int(s), int(s + length)) for s, length in zip(starts, lengths)]
    raise ValueError(f"cannot place {n_events} events of {length_ms} ms in {duration} s")


def event_task(tasks_dir: str | os.PathLike, *, name: str = "synth_events",
               clips: Mapping[str, int] | None = None, duration: float = 4.0,
               events_per_clip: tuple[int, int] = (1, 3), seed: int = 3,
               label_values: Mapping[str, Label] | None = None,
               param_grid: Mapping[str, list] | None = None,
               postprocessing_grid: Mapping[str, list] | None = None,
               overwrite: bool = False) -> Path:
    """Beeps (harmonic tone bursts) and noise bursts at random known times over a quiet noise
    floor; labels are the exact onsets and offsets in ms. ``label_values`` maps ``beep`` and
    ``burst`` to the labels written (e.g. MIDI-like integers, as hear-preprocess writes maestro)."""
    rng = np.random.default_rng(seed)
    values = _label_values(EVENT_LABELS, label_values)
    clips = dict(clips or {"train": 24, "valid": 8, "test": 8})
    n = int(round(duration * SAMPLE_RATE))
    splits: dict[str, dict[str, tuple[np.ndarray, list[dict[str, Any]]]]] = {}
    for split, count in clips.items():
        files = {}
        for i in range(count):
            audio = 0.003 * rng.standard_normal(n)
            events = []
            for start, stop in place_events(rng, duration, int(rng.integers(events_per_clip[0],
                                                                             events_per_clip[1] + 1))):
                label = EVENT_LABELS[int(rng.integers(len(EVENT_LABELS)))]
                length = stop - start
                sound = (harmonic(rng.uniform(500, 1500), length) if label == "beep"
                         else _band_noise(rng, length, 1000, 8000))
                audio[start:stop] += _fade(sound, 5.0) * rng.uniform(0.3, 0.8)
                events.append({"label": values[label], "start": 1000.0 * start / SAMPLE_RATE,
                               "end": 1000.0 * stop / SAMPLE_RATE})
            files[f"{split}_{i:03d}.wav"] = (audio, events)
        splits[split] = files
    params: dict[str, Any] = {}
    if param_grid:
        params["task_specific_param_grid"] = dict(param_grid)
    if postprocessing_grid:
        params["event_postprocessing_grid"] = dict(postprocessing_grid)
    return write_task(tasks_dir, name, embedding_type="event", prediction_type="multilabel",
                      split_mode="trainvaltest", duration=duration,
                      evaluation=["event_onset_200ms_fms", "event_onset_50ms_fms", "segment_1s_er"],
                      labels=list(values.values()), splits=splits, evaluation_params=params or None,
                      overwrite=overwrite)


def make_tasks(tasks_dir: str | os.PathLike, *, seed: int = 0, scale: int = 1,
               overwrite: bool = False) -> list[Path]:
    """All four tasks with default settings, ``scale`` times the default number of clips."""
    return [scene_task(tasks_dir, per_class=6 * scale, seed=seed, overwrite=overwrite),
            kfold_task(tasks_dir, per_class=3 * scale, seed=seed + 1, overwrite=overwrite),
            pitch_task(tasks_dir, per_pitch=3 * scale, seed=seed + 2, overwrite=overwrite),
            event_task(tasks_dir, clips={"train": 24 * scale, "valid": 8 * scale, "test": 8 * scale},
                       seed=seed + 3, overwrite=overwrite)]


def numeric_label_tasks(tasks_dir: str | os.PathLike, *, seed: int = 0, scale: int = 1,
                        param_grid: Mapping[str, list] | None = None,
                        event_param_grid: Mapping[str, list] | None = None,
                        postprocessing_grid: Mapping[str, list] | None = None,
                        overwrite: bool = False) -> list[Path]:
    """Tasks whose labels are JSON integers, as hear-preprocess writes numeric labels:
    ``synth_pitch_int`` (scene multiclass, ``[60]``, like nsynth_pitch), ``synth_mixture_int``
    (scene multilabel, ``[0, 3]``), ``synth_count_int`` (k-fold multiclass, ``[0]``, like
    libricount's counts) and ``synth_events_int`` (events ``{"label": 60, ...}``, like maestro).
    The vocabularies list the same numbers (``idx,label`` / ``0,60``). ``event_param_grid``
    (default: ``param_grid``) is the event task's predictor grid: it has ~80 frames per clip."""
    grid = {"param_grid": param_grid}
    return [
        pitch_task(tasks_dir, name="synth_pitch_int", per_pitch=3 * scale, duration=2.0, seed=seed + 2,
                   integer_labels=True, overwrite=overwrite, **grid),
        mixture_task(tasks_dir, name="synth_mixture_int", seed=seed + 4, overwrite=overwrite,
                     clips={"train": 16 * scale, "valid": 6 * scale, "test": 6 * scale},
                     label_values={c: i for i, c in enumerate(SCENE_LABELS)}, **grid),
        kfold_task(tasks_dir, name="synth_count_int", per_class=3 * scale, seed=seed + 1, overwrite=overwrite,
                   label_values={c: i for i, c in enumerate(KFOLD_LABELS)}, **grid),
        event_task(tasks_dir, name="synth_events_int", seed=seed + 3, overwrite=overwrite,
                   clips={"train": 24 * scale, "valid": 8 * scale, "test": 8 * scale},
                   label_values={"beep": 60, "burst": 67}, postprocessing_grid=postprocessing_grid,
                   param_grid=event_param_grid or param_grid),
    ]


# ----------------------------------------------------------------------------------------------
# The named suites the main job evaluates on
# ----------------------------------------------------------------------------------------------

# A small predictor grid (one point of heareval's: one hidden layer, early stopping on the
# task's score), written into each task's metadata. Batches of 32 clips: with heareval's 1024
# a 72-clip task takes one step per epoch, and 60 such steps left the predictors undertrained,
# so that scores followed the embeddings' scale, not their content (pitch: pretrained 0.67 vs
# synthetic conv4 0.19, where a standardised logistic-regression probe gave 0.81-0.92 to both).
SUITE_GRID = {"hidden_layers": [1], "hidden_dim": [256], "lr": [1e-3], "max_epochs": [300],
              "patience": [10], "check_val_every_n_epoch": [3], "batch_size": [32]}
# Sizes of the generated suite: arguments of the task generators above.
SUITES: dict[str, dict[str, Any]] = {
    "default": {"grid": SUITE_GRID,
                # 2-s pitch clips: conv7's hop is 1.5 s, so 1-s clips give the scene embedding
                # about one frame (pretrained, with the earlier 60-step grid: pitch_acc 0.67
                # with 2 s, 0.44 with 1 s).
                "scene": {"per_class": 8}, "kfold": {"per_class": 4},
                "pitch": {"per_pitch": 6, "duration": 2.0},
                "event": {"clips": {"train": 24, "valid": 8, "test": 8}}},
    "tiny": {"grid": {**SUITE_GRID, "max_epochs": [15], "patience": [3], "hidden_dim": [64]},
             "scene": {"per_class": 3, "duration": 1.0}, "kfold": {"per_class": 2, "duration": 1.0},
             "pitch": {"per_pitch": 2, "duration": 0.5},
             "event": {"clips": {"train": 8, "valid": 3, "test": 3}, "duration": 3.0,
                       "events_per_clip": (1, 2)}},
}
EVENT_POSTPROCESSING = {"median_filter_ms": [150], "min_duration": [60]}


def write_task_suite(tasks_dir: str | os.PathLike, size: str = "default", seed: int = 0) -> list[Path]:
    """The generated HEAR suite :data:`SUITES` ``[size]`` (scene multiclass, k-fold, pitch and
    event tasks) with a small predictor grid in each task's metadata."""
    if size not in SUITES:
        raise ValueError(f"unknown task suite size {size!r}; choose one of {list(SUITES)}")
    suite = SUITES[size]
    grid = suite["grid"]
    return [
        scene_task(tasks_dir, seed=seed, param_grid=grid, overwrite=True, **suite["scene"]),
        kfold_task(tasks_dir, seed=seed + 1, param_grid=grid, overwrite=True, **suite["kfold"]),
        pitch_task(tasks_dir, seed=seed + 2, param_grid=grid, overwrite=True, **suite["pitch"]),
        event_task(tasks_dir, seed=seed + 3, param_grid=grid, overwrite=True,
                   postprocessing_grid=EVENT_POSTPROCESSING, **suite["event"]),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write small synthetic HEAR tasks.")
    parser.add_argument("tasks_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=1, help="multiply the number of clips")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    for path in make_tasks(args.tasks_dir, seed=args.seed, scale=args.scale, overwrite=args.overwrite):
        print(path)


if __name__ == "__main__":
    main()
