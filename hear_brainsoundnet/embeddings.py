"""The HEAR model: embeddings of a SoundNet-8 checkpoint, with true timestamps and chunking.

:class:`BrainSoundNetEmbedding` is what ``load_model`` returns (a ``torch.nn.Module`` with int
``sample_rate`` 22050, ``scene_embedding_size`` and ``timestamp_embedding_size``). Its options:

- ``timestamp_layer`` (default ``"conv4"``): the layer whose frames are the timestamp
  embeddings. conv4's hop is 1024 samples = 46.44 ms, under HEAR's suggested 50 ms, and its
  8,222-sample (373 ms) receptive field is short enough to localise events.
- ``scene_layer`` (default ``"conv7"``) and ``scene_pooling`` (default ``"mean"``, or
  ``"mean+max"``): the scene embedding pools **every** frame the network outputs for the clip.
  conv7 is the default because it is the representation the brain-aligned checkpoints are
  fine-tuned on (one conv7 frame = 1.486 s, about one fMRI volume), so the scene embedding
  carries what the fine-tuning changed; the mean is length-invariant and what HEAR baselines
  use. ``"mean+max"`` (2,048 values) adds the strongest response of each channel, which keeps
  short salient events that a mean over a long clip dilutes.
- ``chunk_seconds`` (default 60): how much audio one forward pass handles (see below).
- ``fast`` (default True): run the fused CPU inference path of :mod:`hear_brainsoundnet.fast`
  (BatchNorm folded, convolutions as large matrix products; equal to the plain network to
  1e-4 relative); ``False`` runs the plain layer-by-layer network.

Timestamps are frame centres derived from the architecture (:func:`soundnet.frame_geometry`):
frame ``j`` of a layer is centred on input sample ``first_centre + j * hop``, converted to ms as
``1000 * centre / 22050`` from exact integers and halves, so nothing accumulates. They are
computed and returned as **float64** (within 1e-8 ms of the exact centre for any clip length;
float32 would round them by up to 2 ms at 10 hours); on an MPS device, which has no float64,
they are returned on the CPU. The frames
kept are those whose centre lies inside the clip (``0 <= centre < n_samples``): the first is
within one hop of 0 ms and the last never exceeds the clip's duration (conv4's frame 0 is
centred at -12.4 ms and is dropped; the next is at 34.0 ms).

Short audio: the input is zero-padded at the end until the network outputs every frame
centred inside the clip (at least ``min_input_length``). A clip shorter than the first centre
(under 34 ms for conv4) is also zero-padded at the start, by just enough that one frame is
centred on the clip's middle; that frame is returned, timestamped at its true centre relative to
the clip. Scene embeddings of short clips pool the frames of the zero-padded input.

Long audio (up to 20 minutes): the input is cut into cores of ``chunk_seconds`` (a multiple of
the coarsest hop, so every chunk sees the same frame grid as the whole clip), each extended on
both sides by a margin of at least half the receptive field (conv7: 45,583 samples, rounded up
to 65,536). Each frame is taken from the one chunk whose core holds its centre: everything that
frame depends on lies inside that chunk, so the output equals a single pass over the whole clip
(to float rounding). Batches are also split so that one pass never sees more than
``chunk_seconds`` + 2 margins of audio in total, which bounds memory whatever the clip length.

Every network pass goes through :func:`_forward_layers`, the single place where a faster
inference path can be plugged in.

The embeddings are frozen features: they never depend on, or change, the module's train/eval
mode. ``model.train()`` sets the module's flag (so a training framework sees what it asked
for) but the network always runs with its stored BatchNorm statistics and never updates them.

Bad input is refused with an error naming the sound and sample: non-floating or non-finite
audio, and audio whose peak exceeds ``MAX_ABS_AMPLITUDE`` (100, i.e. 40 dB over HEAR's [-1, 1]:
such audio is on another scale, e.g. int16 PCM, and values near float32's limit overflow the
network into NaN). Embeddings are checked to be finite before they are returned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import torch
from torch import nn

from .fast import FastSoundNet
from .soundnet import (BACKBONE_LAYERS, SAMPLE_RATE, SPECS, SoundNet8, frame_geometry,
                       min_input_length, output_length)

TIMESTAMP_LAYER = "conv4"
SCENE_LAYER = "conv7"
SCENE_POOLINGS = ("mean", "mean+max")
DEFAULT_CHUNK_SECONDS = 60.0
# Largest accepted |sample|: HEAR audio is in [-1, 1]; a little over (resampling overshoot,
# hot mastering) is fine, 100x over is another scale (int16 PCM is 32768x).
MAX_ABS_AMPLITUDE = 100.0


def _forward_layers(model: SoundNet8 | FastSoundNet, waveform: torch.Tensor,
                    layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Run the network on ``waveform`` (batch, samples) and return ``{layer: (batch, C, frames)}``.

    The only call site of the network in this package; ``model`` is the plain network or its
    fused inference path (:class:`FastSoundNet`), which share this contract.
    """
    return model(waveform, layers=tuple(layers))


# ----------------------------------------------------------------------------------------------
# Chunk planning (pure arithmetic on the frame geometry)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """One forward pass: input samples ``[start, stop)`` supply global frames ``frames[layer]``."""

    start: int
    stop: int
    frames: dict[str, tuple[int, int]]


def context_margin(layers: Sequence[str]) -> int:
    """Samples of context each chunk needs on both sides: half the largest receptive field,
    rounded up to a multiple of the coarsest hop (so chunk starts stay on the frame grid)."""
    geometries = [frame_geometry(layer) for layer in layers]
    grid = max(g.hop for g in geometries)
    half = max(Fraction(g.receptive_field - 1, 2) for g in geometries)
    return math.ceil(half / grid) * grid


def _frames_before(layer: str, sample: int, total: int) -> int:
    """How many of ``layer``'s ``total`` frames are centred before input sample ``sample``."""
    geometry = frame_geometry(layer)
    count = math.ceil((sample - geometry.first_centre) / geometry.hop)
    return min(max(count, 0), total)


def plan_chunks(n_samples: int, layers: Sequence[str], chunk_samples: int) -> list[Chunk]:
    """Cut an input of ``n_samples`` into passes whose outputs equal one pass over all of it.

    Cores are ``chunk_samples`` long (rounded down to a multiple of the coarsest hop ``H``, at
    least ``H``); each pass covers its core plus :func:`context_margin` on both sides, clipped
    to the signal; each frame comes from the pass whose core holds its centre. Because every
    pass starts on a multiple of ``H``, its frame ``i`` is global frame ``i + start // hop``.
    """
    grid = max(frame_geometry(layer).hop for layer in layers)
    margin = context_margin(layers)
    core = max(grid, chunk_samples // grid * grid)
    totals = {layer: output_length(layer, n_samples) for layer in layers}
    if n_samples <= core + 2 * margin:
        return [Chunk(0, n_samples, {layer: (0, totals[layer]) for layer in layers})]
    starts = list(range(0, n_samples, core))
    chunks = []
    for index, core_start in enumerate(starts):
        first, last = index == 0, index == len(starts) - 1
        core_stop = core_start + core
        frames = {layer: (0 if first else _frames_before(layer, core_start, totals[layer]),
                          totals[layer] if last else _frames_before(layer, core_stop, totals[layer]))
                  for layer in layers}
        chunks.append(Chunk(max(0, core_start - margin),
                            n_samples if last else min(n_samples, core_stop + margin), frames))
    return chunks


def layer_frames(model: SoundNet8 | FastSoundNet, waveform: torch.Tensor, wanted: dict[str, tuple[int, int]],
                 chunk_samples: int) -> dict[str, torch.Tensor]:
    """Frames ``[j0, j1)`` of each layer in ``wanted`` for ``waveform`` (batch, samples).

    Equal to slicing one pass over the whole waveform, computed in bounded memory: time is cut
    by :func:`plan_chunks` and the batch is split so that a pass holds at most about
    ``chunk_samples`` + 2 margins of audio.
    """
    layers = list(wanted)
    batch, n_samples = waveform.shape
    pieces: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    for chunk in plan_chunks(n_samples, layers, chunk_samples):
        keep = {layer: (max(j0, wanted[layer][0]), min(j1, wanted[layer][1]))
                for layer, (j0, j1) in chunk.frames.items()}
        if all(j1 <= j0 for j0, j1 in keep.values()):
            continue
        length = chunk.stop - chunk.start
        rows = max(1, (chunk_samples + 2 * context_margin(layers)) // length)
        outputs: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
        for row in range(0, batch, rows):
            result = _forward_layers(model, waveform[row:row + rows, chunk.start:chunk.stop], layers)
            for layer in layers:
                offset = chunk.start // frame_geometry(layer).hop
                j0, j1 = keep[layer]
                if j1 - offset > result[layer].shape[-1]:
                    raise AssertionError(f"chunk [{chunk.start}, {chunk.stop}) lacks {layer} frame "
                                         f"{j1 - 1}: chunk plan inconsistent with the network")
                outputs[layer].append(result[layer][..., max(j0 - offset, 0):max(j1 - offset, 0)])
        for layer in layers:
            pieces[layer].append(torch.cat(outputs[layer], dim=0))
    return {layer: torch.cat(pieces[layer], dim=-1) for layer in layers}


# ----------------------------------------------------------------------------------------------
# Timestamps and padding
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FrameSelection:
    """Which frames of ``layer`` describe a clip of ``n_samples``, and how to pad the input."""

    layer: str
    n_samples: int
    pad_left: int  # zeros before the clip (only for clips shorter than the first frame centre)
    padded_length: int  # input length after zero-padding at both ends
    first: int  # frames [first, stop) of the padded input are centred inside the clip
    stop: int

    def timestamps_ms(self, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """True centres of the selected frames, in ms from the clip's first sample (float64)."""
        geometry = frame_geometry(self.layer)
        centres = (torch.arange(self.first, self.stop, dtype=torch.float64) * geometry.hop
                   + float(geometry.first_centre - self.pad_left))
        return centres * (1000.0 / sample_rate)


def _length_for_frames(layer: str, n_frames: int, at_least: int) -> int:
    """Smallest input length >= ``at_least`` for which ``layer`` outputs ``n_frames`` frames."""
    high = max(at_least, 1)
    while output_length(layer, high) < n_frames:
        high *= 2
    low = at_least - 1
    while high - low > 1:
        mid = (low + high) // 2
        if output_length(layer, mid) >= n_frames:
            high = mid
        else:
            low = mid
    return high


def select_frames(layer: str, n_samples: int) -> FrameSelection:
    """The frames centred inside a clip of ``n_samples`` (at least one) and the padding they need."""
    centre0, hop = frame_geometry(layer).first_centre, frame_geometry(layer).hop
    first_centre_inside = centre0 + max(0, math.ceil(-centre0 / hop)) * hop
    pad_left = 0
    if first_centre_inside >= n_samples:
        # Clip shorter than the first centre: shift it right so that frame sits on its middle.
        pad_left = math.ceil(first_centre_inside - Fraction(n_samples, 2))
    # The clip occupies [pad_left, pad_left + n_samples) of the padded input.
    first = max(0, math.ceil((pad_left - centre0) / hop))
    stop = math.ceil((pad_left + n_samples - centre0) / hop)
    padded = _length_for_frames(layer, stop, max(n_samples + pad_left, min_input_length(layer)))
    return FrameSelection(layer, n_samples, pad_left, padded, first, stop)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------

def check_audio(audio: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``audio`` as float32 (n_sounds, n_samples) on ``device``, or a ValueError/TypeError saying why not.

    Documented coercion: any floating dtype (float64, float16, bfloat16) is converted to float32.
    Integer PCM (e.g. int16) is refused: its scale is ambiguous and HEAR asks for [-1, 1].
    """
    if not isinstance(audio, torch.Tensor):
        raise TypeError(f"audio must be a torch.Tensor (n_sounds, n_samples), got {type(audio).__name__}")
    if audio.dim() != 2:
        hint = ("; for one sound use audio.unsqueeze(0)" if audio.dim() == 1 else
                "; mono only: for (n_sounds, 1, n_samples) use audio.squeeze(1)" if audio.dim() == 3
                else "")
        raise ValueError(f"audio must be 2-D (n_sounds, n_samples), got shape {tuple(audio.shape)}{hint}")
    if audio.shape[0] == 0 or audio.shape[1] == 0:
        raise ValueError(f"audio is empty: shape {tuple(audio.shape)} (need at least one sound "
                         "of at least one sample)")
    if not audio.is_floating_point():
        raise TypeError(f"audio is {audio.dtype}: pass float32 in [-1, 1] at {SAMPLE_RATE} Hz "
                        "(for int16 PCM: audio.float() / 32768)")
    if audio.device != device:
        raise ValueError(f"audio is on {audio.device} but the model is on {device}: "
                         f"move one of them (audio.to({str(device)!r}) or model.to({str(audio.device)!r}))")
    audio = audio.float()
    # amax/amin propagate NaN and reach +-inf: a check without clip-sized temporaries
    # (a boolean mask of a 20-minute batch costs ~175 MB of peak memory).
    extremes = torch.stack([audio.amax(), audio.amin()])
    if not bool(torch.isfinite(extremes).all()):
        finite = torch.isfinite(audio)
        sound, sample = (int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"audio contains {int((~finite).sum())} NaN or infinite value(s), the first "
                         f"in sound {sound} at sample {sample}")
    peak = float(extremes.abs().max())
    if peak > MAX_ABS_AMPLITUDE:
        sound, sample = (int(i) for i in (audio.abs() == peak).nonzero()[0])
        raise ValueError(f"audio peaks at {peak:.3g} (sound {sound}, sample {sample}): HEAR audio is "
                         f"in [-1, 1] and values over {MAX_ABS_AMPLITUDE:g} are refused (int16 PCM? "
                         "divide by 32768)")
    return audio


def _check_finite(embeddings: torch.Tensor, what: str, checkpoint: str | None) -> torch.Tensor:
    """``embeddings`` unchanged, or a FloatingPointError naming the first sound that overflowed."""
    finite = torch.isfinite(embeddings).flatten(1).all(dim=1)
    if not bool(finite.all()):
        sound = int((~finite).nonzero()[0])
        raise FloatingPointError(f"the {what} of sound {sound} are not finite: checkpoint "
                                 f"{checkpoint or '(in memory)'} overflows float32 on this audio")
    return embeddings


def _check_options(chunk_seconds: object, fast: object) -> None:
    """Refuse option values of the wrong type (``True`` is an int to Python, not seconds)."""
    if not (isinstance(chunk_seconds, (int, float)) and not isinstance(chunk_seconds, bool)
            and math.isfinite(chunk_seconds) and chunk_seconds > 0):
        raise ValueError(f"chunk_seconds must be a positive number of seconds, got {chunk_seconds!r}")
    if not isinstance(fast, bool):
        raise ValueError(f"fast must be true or false, got {fast!r}")


# ----------------------------------------------------------------------------------------------
# The HEAR model
# ----------------------------------------------------------------------------------------------

class BrainSoundNetEmbedding(nn.Module):
    """A SoundNet-8 checkpoint behind the HEAR API (see the module docstring for the options)."""

    sample_rate: int = SAMPLE_RATE

    def __init__(self, network: SoundNet8, *, timestamp_layer: str = TIMESTAMP_LAYER,
                 scene_layer: str = SCENE_LAYER, scene_pooling: str = "mean",
                 chunk_seconds: float = DEFAULT_CHUNK_SECONDS, fast: bool = True,
                 checkpoint: str | None = None):
        super().__init__()
        for option, layer in (("timestamp_layer", timestamp_layer), ("scene_layer", scene_layer)):
            if layer not in network.layers:
                raise ValueError(f"{option}={layer!r} is not a layer of this checkpoint; "
                                 f"choose one of {list(network.layers)}")
        if scene_pooling not in SCENE_POOLINGS:
            raise ValueError(f"scene_pooling={scene_pooling!r}; choose one of {list(SCENE_POOLINGS)}")
        _check_options(chunk_seconds, fast)
        self.network = network.eval()
        # What every forward pass runs: the fused CPU path (same outputs to 1e-4, several
        # times faster; see hear_brainsoundnet.fast), or the plain layer-by-layer network.
        self.runner = FastSoundNet.from_model(self.network) if fast else self.network
        self.timestamp_layer = timestamp_layer
        self.scene_layer = scene_layer
        self.scene_pooling = scene_pooling
        self.chunk_samples = int(chunk_seconds * SAMPLE_RATE)
        self.checkpoint = checkpoint
        channels = SPECS[scene_layer].out_channels
        self.scene_embedding_size = int(channels * (2 if scene_pooling == "mean+max" else 1))
        self.timestamp_embedding_size = int(SPECS[timestamp_layer].out_channels)
        self.eval()  # frozen features: BatchNorm must use its stored statistics

    def train(self, mode: bool = True) -> "BrainSoundNetEmbedding":
        """Set the module's flag only: the network stays in eval mode (frozen features)."""
        super().train(mode)
        self.network.eval()
        if isinstance(self.runner, nn.Module):
            self.runner.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def _layer_frames(self, padded: torch.Tensor, wanted: dict[str, tuple[int, int]]
                      ) -> dict[str, torch.Tensor]:
        """:func:`layer_frames` in eval mode, whatever mode a caller set on ``self.network``
        directly; every module's mode is restored afterwards."""
        training = {module: module.training for module in self.network.modules() if module.training}
        try:
            for module in training:
                module.training = False
            with torch.no_grad():
                return layer_frames(self.runner, padded, wanted, self.chunk_samples)
        finally:
            for module, mode in training.items():
                module.training = mode

    def extra_repr(self) -> str:
        return (f"checkpoint={self.checkpoint!r}, timestamp_layer={self.timestamp_layer!r}, "
                f"scene_layer={self.scene_layer!r}, scene_pooling={self.scene_pooling!r}, "
                f"chunk_samples={self.chunk_samples}")

    def frames(self, audio: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (n_sounds, frames, C) of ``layer`` centred inside the clip, and their timestamps (ms)."""
        audio = check_audio(audio, self.device)
        selection = select_frames(layer, audio.shape[1])
        padding = (selection.pad_left, selection.padded_length - selection.pad_left - audio.shape[1])
        padded = nn.functional.pad(audio, padding) if any(padding) else audio
        out = self._layer_frames(padded, {layer: (selection.first, selection.stop)})[layer]
        _check_finite(out, f"{layer} embeddings", self.checkpoint)
        # float64: exact centres to 1e-8 ms at any length (MPS has no float64: CPU there)
        device = audio.device if audio.device.type != "mps" else torch.device("cpu")
        timestamps = selection.timestamps_ms().to(device=device)
        return out.transpose(1, 2).contiguous(), timestamps.expand(audio.shape[0], -1).contiguous()

    def timestamp_embeddings(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HEAR ``get_timestamp_embeddings``: (n_sounds, T, size) float32 and (n_sounds, T)
        frame centres in ms, float64."""
        return self.frames(audio, self.timestamp_layer)

    def scene_embeddings(self, audio: torch.Tensor) -> torch.Tensor:
        """HEAR ``get_scene_embeddings``: every ``scene_layer`` frame of the clip, pooled."""
        audio = check_audio(audio, self.device)
        n_samples = max(audio.shape[1], min_input_length(self.scene_layer))
        padding = n_samples - audio.shape[1]
        padded = nn.functional.pad(audio, (0, padding)) if padding else audio
        total = output_length(self.scene_layer, n_samples)
        out = self._layer_frames(padded, {self.scene_layer: (0, total)})[self.scene_layer]
        pooled = out.mean(dim=-1)
        if self.scene_pooling == "mean+max":
            pooled = torch.cat([pooled, out.amax(dim=-1)], dim=1)
        return _check_finite(pooled, "scene embeddings", self.checkpoint)


__all__ = ["BrainSoundNetEmbedding", "BACKBONE_LAYERS", "MAX_ABS_AMPLITUDE", "SCENE_POOLINGS",
           "check_audio", "layer_frames", "plan_chunks", "select_frames"]
