"""Feature sources for linear encoding models: one feature vector per TR of a run.

A :class:`FeatureSource` turns an episode's soundtrack (float32 mono at 22,050 Hz, as
:class:`training.data.StimulusCache` decodes it) into an ``(n_TR, n_features)`` array aligned
with the run's volumes: TR ``t`` covers the audio ``[t * TR, (t + 1) * TR)``. Volumes keep
coming after the soundtrack ends (the scanner does not stop with the audio), so the audio is
extended with silence up to the run's end, as the fine-tuned models do.

Sources:

- :class:`SoundNetFeatures`: frozen layers of any SoundNet-8 checkpoint (the pretrained
  network, a HEAR checkpoint file, or a fine-tuned run's ``best.safetensors``: its backbone
  on running statistics, i.e. the brain-aligned features under a fresh readout). ``conv7``
  frames (hop 1.486 s, about one TR) are paired with TRs exactly as the fine-tuned head pairs
  them (:func:`training.timebase.tr_frames`: the frame centred nearest the TR's midpoint); finer
  layers are averaged over the frames centred inside each TR.
- :class:`LogMelFeatures`: a 64-band log-mel spectrogram (torchaudio), frames averaged per TR.
- :class:`OracleFeatures`: the synthetic dataset's true feature regressors (the oracle; only
  the synthetic data have them).
- :class:`HearModuleFeatures`: any HEAR module by name, loaded as heareval's runner loads one
  (``importlib.import_module``, ``load_model(model_file or "", **options)``,
  ``get_timestamp_embeddings``); its timestamp embeddings are averaged over the timestamps
  falling inside each TR. A TR without any timestamp is an error, never silently zero.

Long runs (about 12 min at real scale) are processed in chunks of bounded length.
"""
from __future__ import annotations

import abc
import hashlib
import importlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from hear_brainsoundnet.soundnet import SAMPLE_RATE, SoundNet8, frame_geometry, output_length

#: Sample rates the HEAR API allows.
HEAR_SAMPLE_RATES = (16000, 22050, 32000, 44100, 48000)
DEFAULT_CHUNK_SECONDS = 60.0
# Audio either side of a HEAR chunk's core: embeddings there see the real neighbouring audio
# (exact for models whose receptive field is under 2 x this).
DEFAULT_CONTEXT_SECONDS = 10.0


class FeatureError(ValueError):
    """A feature source cannot produce features for a run (bad module, bad timestamps...)."""


def run_samples(n_trs: int, tr: float, sample_rate: int = SAMPLE_RATE) -> int:
    """Samples of audio spanning ``n_trs`` volumes."""
    return int(math.ceil(n_trs * tr * sample_rate))


def padded_audio(waveform: np.ndarray, n_samples: int) -> np.ndarray:
    """``waveform`` as float32, cut or extended with silence to ``n_samples``."""
    out = np.zeros(n_samples, dtype=np.float32)
    n = min(n_samples, len(waveform))
    out[:n] = np.asarray(waveform[:n], dtype=np.float32)
    return out


class TRPooler:
    """Running per-TR means of embeddings whose time stamps fall inside each TR.

    TR ``t`` holds the stamps in ``[t * tr, (t + 1) * tr)`` (seconds); stamps outside the run
    are ignored. :meth:`result` refuses a run with a TR that got no stamp.
    """

    def __init__(self, n_trs: int, tr: float):
        self.n_trs, self.tr = n_trs, tr
        self.sums: np.ndarray | None = None
        self.counts = np.zeros(n_trs, dtype=np.int64)
        self.span = [math.inf, -math.inf]

    def add(self, embeddings: np.ndarray, seconds: np.ndarray) -> None:
        """Add ``(n, D)`` embeddings stamped at ``seconds`` ``(n,)``."""
        if len(seconds):
            self.span = [min(self.span[0], float(seconds.min())), max(self.span[1], float(seconds.max()))]
        index = np.floor(np.asarray(seconds, dtype=np.float64) / self.tr).astype(np.int64)
        keep = (index >= 0) & (index < self.n_trs)
        if self.sums is None:
            self.sums = np.zeros((self.n_trs, embeddings.shape[1]), dtype=np.float64)
        np.add.at(self.sums, index[keep], np.asarray(embeddings, dtype=np.float64)[keep])
        self.counts += np.bincount(index[keep], minlength=self.n_trs)

    def result(self, what: str) -> np.ndarray:
        """``(n_TR, D)`` float32 means; a :class:`FeatureError` naming ``what`` if a TR is empty."""
        empty = np.flatnonzero(self.counts == 0)
        if self.sums is None or empty.size:
            first = int(empty[0]) if empty.size else 0
            span = (f"{self.span[0]:.3f} s to {self.span[1]:.3f} s" if self.span[0] <= self.span[1]
                    else "no timestamps at all")
            raise FeatureError(
                f"{what}: the timestamps do not cover the run: {empty.size} of {self.n_trs} TRs "
                f"(TR = {self.tr} s) hold no timestamp, the first TR {first} "
                f"[{first * self.tr:.3f} s, {(first + 1) * self.tr:.3f} s); timestamps span {span}")
        return (self.sums / self.counts[:, None]).astype(np.float32)


class FeatureSource(abc.ABC):
    """Something that maps an episode's audio to one feature vector per TR."""

    label: str = "features"

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What the features are, as JSON (saved with every fitted encoding model)."""

    @abc.abstractmethod
    def episode_features(self, name: str, waveform: np.ndarray, n_trs: int, tr: float) -> np.ndarray:
        """``(n_trs, n_features)`` float32 for episode ``name`` (audio at 22,050 Hz)."""

    def cache_key(self) -> str | None:
        """A digest identifying these features (weights included), or None: do not cache."""
        return None


def episode_feature_table(source: FeatureSource, episodes: Sequence, tr: float,
                          cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """``{episode name: (n_TR, n_features)}`` for :class:`training.data.episodes.Episode` objects.

    Each episode gets features for its longest run (``Episode.n_trs``); a shorter run of
    another subject uses the first rows. With ``cache_dir`` and a cacheable source, features
    are kept as ``.npy`` files keyed by the source, the audio and the run length.
    """
    from .data._io import atomic_save_npy

    key = source.cache_key() if cache_dir is not None else None
    table = {}
    for episode in episodes:
        path = None
        if key is not None:
            audio = _audio_identity(episode.waveform)
            digest = hashlib.sha256(f"{key}/{audio}/{episode.n_trs}/{tr}".encode()).hexdigest()[:20]
            path = Path(cache_dir) / f"{episode.name}_{source.label}_{digest}.npy"
            if path.is_file():
                table[episode.name] = np.load(path)
                continue
        features = source.episode_features(episode.name, episode.waveform, episode.n_trs, tr)
        if features.shape[0] != episode.n_trs or features.ndim != 2:
            raise FeatureError(f"{source.label}, episode {episode.name}: features of shape "
                               f"{features.shape}, expected ({episode.n_trs}, n_features)")
        if not np.isfinite(features).all():
            raise FeatureError(f"{source.label}, episode {episode.name}: features contain NaN or "
                               "infinite values")
        if path is not None:
            atomic_save_npy(path, features)
        table[episode.name] = features
    return table


def _audio_identity(waveform: np.ndarray) -> str:
    filename = getattr(waveform, "filename", None)
    if isinstance(waveform, np.memmap) and filename:
        stat = Path(filename).stat()
        return f"{Path(filename).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(np.ascontiguousarray(waveform, dtype=np.float32).tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# SoundNet layers
# ----------------------------------------------------------------------------------------------

def load_soundnet(spec: str | os.PathLike) -> tuple[SoundNet8, str]:
    """A SoundNet-8 network in eval mode and a label, from ``spec``:

    ``"pretrained"`` (the original weights), a fine-tuned run directory or its
    ``best.safetensors`` (the backbone as trained, BatchNorm on running statistics), or a HEAR
    checkpoint file / manifest name of :mod:`hear_brainsoundnet`.
    """
    from hear_brainsoundnet.checkpoints import load_checkpoint, load_pretrained
    from hear_brainsoundnet.hub import resolve_checkpoint

    text = str(spec)
    if text == "pretrained":
        return load_pretrained(), "pretrained"
    path = Path(text)
    if path.is_dir() and (path / "best.safetensors").is_file():
        path = path / "best.safetensors"
    if path.is_file():  # a run's best model is a checkpoint too: its backbone as trained
        return load_checkpoint(path).model, path.parent.name if path.name == "best.safetensors" else path.stem
    if path.is_dir():
        raise FeatureError(f"{path}: a directory without best.safetensors (not a training run)")
    return load_checkpoint(resolve_checkpoint(text)).model, text


class SoundNetFeatures(FeatureSource):
    """Frames of one SoundNet layer per TR (see the module docstring for the alignment)."""

    def __init__(self, network: SoundNet8, layer: str = "conv7", *, label: str | None = None,
                 origin: str = "", chunk_seconds: float = DEFAULT_CHUNK_SECONDS):
        from hear_brainsoundnet.fast import FastSoundNet

        if layer not in network.layers:
            raise FeatureError(f"layer {layer!r} is not a layer of this SoundNet; choose one of "
                               f"{list(network.layers)}")
        self.network = network.eval()
        self.layer, self.origin = layer, origin
        self.label = label or f"soundnet-{layer}"
        self.chunk_samples = int(chunk_seconds * SAMPLE_RATE)
        on_cpu = next(network.parameters()).device.type == "cpu"
        self.runner = FastSoundNet.from_model(self.network) if on_cpu else self.network

    def describe(self) -> dict[str, Any]:
        return {"kind": "soundnet", "layer": self.layer, "origin": self.origin,
                "alignment": ("conv7 frame centred nearest each TR's midpoint" if self.layer == "conv7"
                              else "mean of the frames centred inside each TR")}

    def cache_key(self) -> str:
        digest = hashlib.sha256(f"soundnet/{self.layer}".encode())
        for name, tensor in sorted(self.network.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def episode_features(self, name: str, waveform: np.ndarray, n_trs: int, tr: float) -> np.ndarray:
        from hear_brainsoundnet.embeddings import layer_frames
        from .model import EpisodeGeometry
        from .timebase import tr_frames

        if self.layer == "conv7":
            # the fine-tuned head's pairing, on the same zero-extended audio
            geometry = EpisodeGeometry(n_trs, len(waveform), tr=tr, prefix="conv7", context=0,
                                       window_trs=1, name=f"episode {name}")
            n_samples, frames = geometry.n_samples, tr_frames(n_trs, tr)
        else:
            n_samples, frames = run_samples(n_trs + 1, tr), None
        audio = torch.from_numpy(padded_audio(waveform, n_samples))[None]
        device = next(self.network.parameters()).device
        total = output_length(self.layer, n_samples)
        with torch.no_grad():
            out = layer_frames(self.runner, audio.to(device), {self.layer: (0, total)},
                               self.chunk_samples)[self.layer][0].T.cpu().numpy()
        if frames is not None:
            return np.ascontiguousarray(out[frames], dtype=np.float32)
        centres = frame_geometry(self.layer).centre_seconds(total).numpy()
        pooler = TRPooler(n_trs, tr)
        pooler.add(out, centres)
        return pooler.result(f"{self.label}, episode {name}")


# ----------------------------------------------------------------------------------------------
# Log-mel spectrogram
# ----------------------------------------------------------------------------------------------

class LogMelFeatures(FeatureSource):
    """``n_mels``-band log-mel spectrogram (dB of power), frames averaged per TR.

    Frames of ``n_fft`` samples every ``hop`` samples without centring padding, so frame ``j``
    is centred on sample ``j * hop + n_fft / 2``; the audio is processed in chunks that overlap
    by ``n_fft - hop`` samples, which gives exactly the frames of one pass.
    """

    def __init__(self, n_mels: int = 64, n_fft: int = 1024, hop: int = 512,
                 chunk_seconds: float = DEFAULT_CHUNK_SECONDS, label: str = "log-mel"):
        import torchaudio

        self.n_mels, self.n_fft, self.hop, self.label = n_mels, n_fft, hop, label
        self.chunk_frames = max(1, int(chunk_seconds * SAMPLE_RATE) // hop)
        self.transform = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=n_fft, hop_length=hop, n_mels=n_mels, center=False, power=2.0)

    def describe(self) -> dict[str, Any]:
        return {"kind": "log-mel", "n_mels": self.n_mels, "n_fft": self.n_fft, "hop": self.hop,
                "sample_rate": SAMPLE_RATE, "scale": "10 * log10(power + 1e-10)",
                "alignment": "mean of the frames centred inside each TR"}

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()

    def episode_features(self, name: str, waveform: np.ndarray, n_trs: int, tr: float) -> np.ndarray:
        audio = torch.from_numpy(padded_audio(waveform, run_samples(n_trs, tr)))
        n_frames = (len(audio) - self.n_fft) // self.hop + 1
        pooler = TRPooler(n_trs, tr)
        with torch.no_grad():
            for first in range(0, n_frames, self.chunk_frames):
                stop = min(n_frames, first + self.chunk_frames)
                piece = audio[first * self.hop:(stop - 1) * self.hop + self.n_fft]
                mel = self.transform(piece)  # (n_mels, stop - first)
                db = 10.0 * torch.log10(mel + 1e-10)
                centres = (np.arange(first, stop) * self.hop + self.n_fft / 2) / SAMPLE_RATE
                pooler.add(db.T.numpy(), centres)
        return pooler.result(f"{self.label}, episode {name}")


# ----------------------------------------------------------------------------------------------
# The synthetic oracle
# ----------------------------------------------------------------------------------------------

class OracleFeatures(FeatureSource):
    """The true feature regressors of the synthetic dataset at ``root`` (HRF-convolved, per TR).

    An encoding model on them is the best any feature extractor can do under a linear readout:
    it bounds every model below the noise ceiling.
    """

    label = "oracle"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / "ground_truth_features.npz"
        if not path.is_file():
            raise FeatureError(f"{self.root}: no ground_truth_features.npz; the oracle exists only for "
                               "the synthetic dataset (data.source = 'synthetic')")
        with np.load(path, allow_pickle=False) as data:
            self.features = {key[len("features_"):]: data[key] for key in data.files
                             if key.startswith("features_")}
            self.names = [str(n) for n in data["feature_names"]]

    def describe(self) -> dict[str, Any]:
        return {"kind": "oracle", "root": str(self.root), "features": self.names,
                "definition": "ground-truth feature regressors convolved with the Glover HRF, at each TR"}

    def episode_features(self, name: str, waveform: np.ndarray, n_trs: int, tr: float) -> np.ndarray:
        if name not in self.features:
            raise FeatureError(f"{self.root}/ground_truth_features.npz: no true features for episode "
                               f"{name!r}")
        values = self.features[name]
        if values.shape[0] < n_trs:
            raise FeatureError(f"{self.root}: true features of {name} have {values.shape[0]} TRs, "
                               f"the run has {n_trs}")
        return np.ascontiguousarray(values[:n_trs], dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Any HEAR module
# ----------------------------------------------------------------------------------------------

def load_hear_module(module_name: str, model_file: str | None = None,
                     model_options: Mapping[str, Any] | None = None, device: str | None = None):
    """``(module, model)`` as heareval's embeddings runner loads them, with the API checked.

    Raises :class:`FeatureError` naming the module for a missing function or attribute, an
    invalid ``sample_rate`` or a ``load_model`` that rejects the options.
    """
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise FeatureError(f"HEAR module {module_name!r} cannot be imported: {error}") from None
    missing = [f for f in ("load_model", "get_timestamp_embeddings") if not callable(getattr(module, f, None))]
    if missing:
        raise FeatureError(f"{module_name!r} is not a HEAR module: it has no {' or '.join(missing)} "
                           f"function ({getattr(module, '__file__', None) or module_name})")
    options = dict(model_options or {})
    try:
        model = module.load_model(model_file or "", **options)
    except TypeError as error:
        raise FeatureError(f"{module_name}.load_model({model_file or ''!r}, **{options}) failed: {error}") from None
    rate = getattr(model, "sample_rate", None)
    if rate is None:
        raise FeatureError(f"{module_name!r} is not a HEAR module: its model has no sample_rate attribute")
    if isinstance(rate, bool) or not isinstance(rate, int) or rate not in HEAR_SAMPLE_RATES:
        raise FeatureError(f"{module_name}: model.sample_rate = {rate!r}; HEAR needs a Python int among "
                           f"{list(HEAR_SAMPLE_RATES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if hasattr(model, "to"):
        model.to(device)
    return module, model


class HearModuleFeatures(FeatureSource):
    """Timestamp embeddings of a HEAR module, averaged over the timestamps inside each TR.

    The run's audio (resampled from 22,050 Hz to the module's ``sample_rate`` when they
    differ, with torchaudio's resampler as everywhere in this project) is cut into cores of
    ``chunk_seconds``, each passed with ``context_seconds`` of real audio on both sides;
    embeddings are kept from the core whose span holds their timestamp. When the module's hop
    is a whole number of samples (probed on the first seconds), chunks start on multiples of it,
    so that they reproduce the frames of one pass over the run; otherwise a chunk's frames may
    sit up to one hop away from those of one pass.
    """

    def __init__(self, module_name: str, model_file: str | None = None,
                 model_options: Mapping[str, Any] | None = None, *, device: str | None = None,
                 chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
                 context_seconds: float = DEFAULT_CONTEXT_SECONDS, label: str | None = None):
        self.module_name, self.model_file = module_name, model_file
        self.model_options = dict(model_options or {})
        self.module, self.model = load_hear_module(module_name, model_file, self.model_options, device)
        self.sample_rate = int(self.model.sample_rate)
        self.chunk_seconds, self.context_seconds = chunk_seconds, context_seconds
        self.label = label or module_name

    @property
    def device(self) -> torch.device:
        parameters = list(self.model.parameters()) if hasattr(self.model, "parameters") else []
        return parameters[0].device if parameters else torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        version = getattr(self.module, "__version__", None)
        return {"kind": "hear", "module": self.module_name, "model_file": self.model_file or "",
                "model_options": self.model_options, "module_version": version,
                "sample_rate": self.sample_rate, "chunk_seconds": self.chunk_seconds,
                "context_seconds": self.context_seconds,
                "alignment": "mean of the timestamp embeddings whose timestamp falls inside each TR"}

    def _audio(self, waveform: np.ndarray, n_trs: int, tr: float) -> torch.Tensor:
        audio = torch.from_numpy(padded_audio(waveform, run_samples(n_trs, tr)))
        if self.sample_rate != SAMPLE_RATE:
            import torchaudio

            audio = torchaudio.functional.resample(audio, SAMPLE_RATE, self.sample_rate)
        return audio[:run_samples(n_trs, tr, self.sample_rate)]

    def _embed(self, piece: torch.Tensor, what: str) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            result = self.module.get_timestamp_embeddings(piece[None].to(self.device), self.model)
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise FeatureError(f"{what}: get_timestamp_embeddings must return (embeddings, timestamps), "
                               f"got {type(result).__name__}")
        embeddings, stamps = (torch.as_tensor(x).detach().cpu() for x in result)
        if embeddings.dim() != 3 or stamps.dim() != 2 or embeddings.shape[:2] != stamps.shape:
            raise FeatureError(f"{what}: embeddings {tuple(embeddings.shape)} and timestamps "
                               f"{tuple(stamps.shape)} must be (1, T, D) and (1, T)")
        if not (torch.isfinite(embeddings).all() and torch.isfinite(stamps).all()):
            raise FeatureError(f"{what}: embeddings or timestamps contain NaN or infinite values")
        return embeddings[0].double().numpy(), stamps[0].double().numpy() / 1000.0

    def _grid(self, audio: torch.Tensor, what: str) -> int:
        """The module's hop in samples when it is a whole number (else 1), from a short probe:
        chunks then start on the module's own frame grid, so they give the frames of one pass."""
        _, seconds = self._embed(audio[:min(len(audio), 5 * self.sample_rate)], what)
        if len(seconds) < 3:
            return 1
        hop = float(np.median(np.diff(seconds))) * self.sample_rate
        return int(round(hop)) if hop >= 1 and abs(hop - round(hop)) < 1e-3 else 1

    def episode_features(self, name: str, waveform: np.ndarray, n_trs: int, tr: float) -> np.ndarray:
        what = f"HEAR module {self.module_name}, episode {name}"
        audio = self._audio(waveform, n_trs, tr)
        rate, n = self.sample_rate, len(audio)
        grid = self._grid(audio, what) if n > self.chunk_seconds * rate else 1
        core = max(grid, math.ceil(self.chunk_seconds * rate / grid) * grid)
        context = math.ceil(self.context_seconds * rate / grid) * grid
        pooler = TRPooler(n_trs, tr)
        for start in range(0, n, core):
            stop = min(n, start + core)
            a, b = max(0, start - context), min(n, stop + context)
            embeddings, seconds = self._embed(audio[a:b], what)
            seconds = seconds + a / rate
            keep = (seconds >= start / rate) & ((seconds < stop / rate) | (stop == n))
            pooler.add(embeddings[keep], seconds[keep])
        return pooler.result(what)


def parse_model_options(text: str | None) -> dict[str, Any]:
    """``--model-options`` JSON (an object) as a dict, or a :class:`FeatureError` saying why not."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise FeatureError(f"--model-options {text!r} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise FeatureError(f"--model-options {text!r} must be a JSON object, got {type(value).__name__}")
    return value

