"""The encoding model: SoundNet-8 features -> a causal temporal head per subject, and its conditions.

Network. ``EncodingModel`` = the SoundNet-8 backbone (conv1..conv7) + one linear causal temporal
convolution per subject from conv7's 1024 channels to that subject's targets (parcels or
voxels): kernel ``k`` TRs, left context ``k - 1`` TRs, with bias (the study's head). A group
model has one backbone and one head per subject.

Frames and TRs. conv7's hop is 32,768 samples (1.48608 s at 22,050 Hz) and a TR is 1.49 s
(32,854.5 samples): one frame per TR, but not exactly. **TR ``t`` of a run (acquired over
``[t * TR, (t + 1) * TR)`` of the episode's audio) is represented by the conv7 frame whose
centre is nearest the TR's midpoint** ``(t + 1/2) * TR``, computed in exact rational
arithmetic on episode sample positions (ties go to the later frame), so there is no drift over
long runs: the frame index grows by one per TR and skips one frame every ~380 TRs, where the
88.5-sample difference has added up to a hop. This is the study's pairing "audio chunk t with
volume t"; the frame's 4.1 s receptive field extends ~1.3 s past the TR's end, and the head
learns the haemodynamic delay from the ``k - 1`` preceding TRs. Frames are computed on the
whole episode's audio (so windows see the real preceding audio, not zeros); only TRs before
the run's first volume, which have no audio, enter the head as zeros (the study's causal left
padding, now only at a run's start).

Head input scaling and initialisation. With BatchNorm on its running statistics the pretrained
conv7 features are sparse and small (about 3 % non-zero, std ~0.03 on natural audio; a third of
the channels can stay exactly zero over a minute of audio), so a head on raw features would
need weights ~100x larger than the study's learning rates can reach. Each head therefore
standardises its input with a per-channel mean and scale measured once on the training audio
before training (fixed buffers, saved with the head; a scale below 10 % of the mean channel's
is raised to it, so channels silent in training are not amplified where they wake up). It is a
reparametrisation of the same linear head that makes one learning rate work for every
condition. The head starts at zero (predicting each target's mean, 0 for z-scored runs): a
linear model has no symmetry to break, and a channel silent in training then keeps a zero
weight instead of a random one.

Conditions. ``head``: backbone frozen (the baseline); ``conv7`` .. ``conv4``: train convX..conv7
and the head; ``null``: a randomly initialised backbone (seeded), frozen, with a trained head:
the random-features control of the head-only baseline. The frozen layers form the *prefix* and
the trained ones the *trunk*; the prefix runs without autograd, and when its BatchNorm uses
running statistics its output is a fixed function of the audio that can be computed once per
episode and cached (``prefix_layer``'s frames) with the exact same result.

BatchNorm (``batchnorm``). The bias of a convolution whose BatchNorm uses window statistics is
not trained: its exact gradient is zero (BN subtracts the window mean), and Adam would amplify
the rounding noise in that gradient into steps of size ``lr``. ``frozen-eval`` (default) keeps
frozen layers on running statistics
and normalises trained layers with each window's own statistics (:class:`WindowBatchNorm`:
statistics per window, so results do not depend on how windows are grouped into batches or
spread over DDP ranks); ``eval`` uses running statistics everywhere (BN affine parameters still
train); ``batch-stats`` is the study's behaviour (window statistics everywhere, frozen layers
included; nothing can be cached).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from hear_brainsoundnet.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from hear_brainsoundnet.embeddings import layer_frames
from hear_brainsoundnet.fast import FastSoundNet
from hear_brainsoundnet.soundnet import (BACKBONE_LAYERS, SAMPLE_RATE, SPECS, SoundNet8,
                                         block_output_length, frame_geometry, output_length)

from .config import BATCHNORM_MODES, CONDITIONS
from .data import DEFAULT_TR
from .timebase import FEATURE_LAYER, tr_frames, tr_samples

FEATURE_CHANNELS = SPECS[FEATURE_LAYER].out_channels
MIN_SCALE_FRACTION = 0.1  # head input scales are at least this fraction of the mean channel's
EPISODE_CHUNK_SAMPLES = 60 * SAMPLE_RATE  # audio per pass when computing whole-episode features
BRAIN_HEAD_FORMULA = (
    "prediction[t, :] = bias + sum_{d=0}^{k-1} sum_c weight[:, c, d] * x[c, t - k + 1 + d], with "
    "x[c, u] = (conv7[c, frame(u)] - input_mean[c]) / input_scale[c] for u >= 0 and 0 before the "
    "run's first TR; frame(u) = the conv7 frame whose centre is nearest the middle of TR u, "
    "(u + 1/2) * TR * 22050 samples (conv7 frame j is centred on sample -10001.5 + 32768 j)")


# ----------------------------------------------------------------------------------------------
# Conditions
# ----------------------------------------------------------------------------------------------

def trained_layers(condition: str) -> tuple[str, ...]:
    """Backbone layers trained in ``condition`` (the head is always trained)."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose one of {', '.join(CONDITIONS)}")
    if condition in ("head", "null"):
        return ()
    return BACKBONE_LAYERS[BACKBONE_LAYERS.index(condition):]


def prefix_layer(condition: str) -> str:
    """The last frozen layer: its output is what the trained layers (or the head) read."""
    trained = trained_layers(condition)
    return FEATURE_LAYER if not trained else BACKBONE_LAYERS[BACKBONE_LAYERS.index(trained[0]) - 1]


# ----------------------------------------------------------------------------------------------
# Trunk geometry (the TR time base is in training/timebase.py)
# ----------------------------------------------------------------------------------------------

def _trunk_length(layers: Sequence[str], n_frames: int) -> int:
    """Output length of ``layers`` (consecutive backbone blocks) for ``n_frames`` input frames."""
    for name in layers:
        n_frames = block_output_length(SPECS[name], n_frames)
    return n_frames


@dataclass(frozen=True)
class WindowSlice:
    """What one window of TRs needs from its episode.

    The trunk reads prefix frames ``[prefix_start, prefix_stop)``; of its conv7 output, frames
    ``gather`` feed the head (one per TR from ``max(0, start - context)``), after ``n_zero``
    zero columns for context TRs before the run's start. ``samples`` is the audio
    ``[s0, s1)`` whose prefix output holds those frames from index ``prefix_start - s0 // hop``.
    """

    start: int
    n_trs: int
    n_zero: int
    prefix_start: int
    prefix_stop: int
    gather: np.ndarray
    samples: tuple[int, int]


class EpisodeGeometry:
    """Frames, padding and window slices of one episode for a given prefix layer and window size.

    The episode's input is its audio, extended with zeros at the end (silence after the episode)
    far enough that the last TR's frame and the trunk's margins exist. Every window of
    ``window_trs`` TRs gets a prefix range of the same length, so windows stack into batches.
    """

    def __init__(self, n_trs: int, n_audio: int, *, tr: float, prefix: str, context: int,
                 window_trs: int, name: str = "episode"):
        self.name, self.n_trs, self.n_audio, self.prefix, self.context = name, n_trs, n_audio, prefix, context
        self.window_trs = window_trs
        self.frames = tr_frames(n_trs, tr)
        g7, gp = frame_geometry(FEATURE_LAYER), frame_geometry(prefix)
        self.ratio = g7.hop // gp.hop  # prefix frames per conv7 frame
        self.trunk = BACKBONE_LAYERS[BACKBONE_LAYERS.index(prefix) + 1:]
        # conv7 frames of margin on each side so that the needed frames' receptive fields lie
        # inside the trunk's input (no trunk margin when the prefix is conv7 itself).
        half = Fraction(g7.receptive_field - gp.receptive_field, 2) + gp.first_centre - g7.first_centre
        self.margin = 0 if not self.trunk else math.ceil(max(half, 0) / g7.hop) + 1
        span = window_trs + context
        span_frames = math.ceil(span * tr_samples(tr) / g7.hop) + 1  # frames spanned, at most
        self.prefix_length = self.ratio * (span_frames + 2 * self.margin)
        last = int(self.frames[-1]) + self.margin + 1 if n_trs else 0
        need = math.ceil(g7.first_centre + last * g7.hop + Fraction(g7.receptive_field - 1, 2)) + 1
        self.n_samples = max(n_audio, need)
        self.n_prefix = output_length(prefix, self.n_samples)
        if n_trs < window_trs:
            raise ValueError(f"{name}: {n_trs} TRs, fewer than train.window_trs = {window_trs}; "
                             "lower window_trs or drop the run")
        if self.n_prefix < self.prefix_length:
            raise ValueError(f"{name}: too short for windows of {window_trs} TRs")

    def window(self, start: int) -> WindowSlice:
        """The slice for TRs ``[start, start + window_trs)``."""
        n = self.window_trs
        if start < 0 or start + n > self.n_trs:
            raise IndexError(f"{self.name}: window [{start}, {start + n}) outside 0..{self.n_trs}")
        first_tr = max(0, start - self.context)
        frames = self.frames[first_tr:start + n]
        r = self.ratio
        a = r * (int(frames[0]) - self.margin)
        a = min(max(a, 0), (self.n_prefix - self.prefix_length) // r * r)
        b = a + self.prefix_length
        gather = frames - a // r
        out_length = _trunk_length(self.trunk, self.prefix_length)
        if gather[0] < 0 or gather[-1] >= out_length:
            raise AssertionError(f"{self.name}: window {start} needs frames outside the trunk output")
        return WindowSlice(start, n, self.context - (start - first_tr), a, b, gather,
                           self.prefix_samples(a, b))

    def prefix_samples(self, a: int, b: int) -> tuple[int, int]:
        """Audio ``[s0, s1)`` whose prefix output contains frames ``[a, b)`` exactly.

        ``s0`` is a multiple of the prefix hop (so the frame grid is the episode's), and every
        frame's receptive field lies inside ``[s0, s1)`` unless it reaches past the episode's
        ends, where the crop ends too (so the padding is the episode's).
        """
        g = frame_geometry(self.prefix)
        half = Fraction(g.receptive_field - 1, 2)
        s0 = max(0, math.floor((g.first_centre + a * g.hop - half) / g.hop) * g.hop)
        s1 = min(self.n_samples, math.ceil(g.first_centre + (b - 1) * g.hop + half) + 1)
        return s0, s1

    def windows(self, offset: int = 0) -> list[int]:
        """Starts of consecutive, non-overlapping windows beginning at TR ``offset``."""
        return list(range(offset, self.n_trs - self.window_trs + 1, self.window_trs))


def crop_audio(waveform: np.ndarray | torch.Tensor, s0: int, s1: int) -> torch.Tensor:
    """``waveform[s0:s1]`` as float32, zero-extended where ``s1`` is past the audio's end."""
    piece = torch.as_tensor(np.array(waveform[s0:min(s1, len(waveform))], dtype=np.float32))  # copy: memmaps are read-only
    if piece.shape[0] < s1 - s0:
        piece = nn.functional.pad(piece, (0, s1 - s0 - piece.shape[0]))
    return piece


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

class WindowBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training-mode statistics are per window (per batch element).

    In eval mode it is a plain BatchNorm1d. In training mode each window is normalised by its
    own mean and variance over time, and the running statistics move once per call towards the
    mean over windows. A batch of B windows, or B DDP ranks with one window each, compute the
    same outputs and gradients. The trainer recomputes the
    running statistics exactly over all training windows before each validation
    (:func:`training.batches.recalibrate_batchnorm`): an exponential average over the last few
    windows, with weights that changed in between, would make the validation loss noisy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        mean = x.mean(dim=2, keepdim=True)
        var = x.var(dim=2, unbiased=False, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        y = y * self.weight[:, None] + self.bias[:, None]
        if self.track_running_stats:
            with torch.no_grad():
                n = x.shape[2]
                # momentum None: the plain average of every call since the last reset
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(mean.mean(dim=(0, 2)), alpha=m)
                self.running_var.mul_(1 - m).add_(var.mean(dim=(0, 2)) * n / max(n - 1, 1), alpha=m)
                self.num_batches_tracked.add_(1)
        return y


class CausalHead(nn.Module):
    """Linear temporal convolution 1024 -> n_targets over ``kernel`` TRs, with bias.

    ``forward(features, valid)`` takes ``(B, 1024, kernel - 1 + n)`` conv7 features (one column
    per TR, the first ``kernel - 1`` are context) and a ``(B, kernel - 1 + n)`` mask that is 0
    for TRs before the run's start; it standardises the input with the fixed per-channel
    ``input_mean`` / ``input_scale``, zeroes masked columns and returns ``(B, n, n_targets)``.
    """

    def __init__(self, n_targets: int, kernel: int, channels: int = FEATURE_CHANNELS):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(channels, n_targets, kernel)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("input_mean", torch.zeros(channels))
        self.register_buffer("input_scale", torch.ones(channels))

    @property
    def n_targets(self) -> int:
        return self.conv.out_channels

    def set_input_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the input standardisation (``std`` floored at 10 % of its mean over channels)."""
        floor = max(MIN_SCALE_FRACTION * float(std.mean()), 1e-12)
        self.input_mean.copy_(mean)
        self.input_scale.copy_(std.clamp_min(floor))

    def forward(self, features: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        x = (features - self.input_mean[:, None]) / self.input_scale[:, None]
        if valid is not None:
            x = x * valid[:, None, :].to(x.dtype)
        return self.conv(x).transpose(1, 2)


def _swap_batchnorm(block: nn.Module) -> None:
    """Replace ``block.bn`` by a :class:`WindowBatchNorm` holding the same parameters and buffers."""
    old = block.bn
    new = WindowBatchNorm(old.num_features, eps=old.eps, momentum=old.momentum)
    new.load_state_dict(old.state_dict())
    block.bn = new


class EncodingModel(nn.Module):
    """SoundNet-8 backbone + one causal temporal head per subject, in a training condition.

    ``subjects`` maps subject id -> number of targets; ``target_names`` (optional) names them
    and ``tr`` is the TR the heads were fitted at: both are saved with the model.
    ``backbone`` defaults to a seeded random SoundNet-8 (the caller loads pretrained weights
    into it). Forward computation is split so that the trainer can cache what does not change:
    :meth:`prefix` (frozen layers, no grad), :meth:`trunk` (trained layers), :meth:`head`.
    Files: :meth:`save_pretrained` and :meth:`from_pretrained` (see the module docstring).
    """

    def __init__(self, subjects: Mapping[str, int], *, kernel_trs: int = 7, condition: str = "conv4",
                 batchnorm: str = "frozen-eval", backbone: SoundNet8 | None = None,
                 target_names: Mapping[str, Sequence[str]] | None = None, tr: float = DEFAULT_TR):
        super().__init__()
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"unknown batchnorm mode {batchnorm!r}; choose one of {BATCHNORM_MODES}")
        if kernel_trs < 1:
            raise ValueError(f"kernel_trs must be >= 1, got {kernel_trs}")
        if not subjects:
            raise ValueError("an encoding model needs at least one subject")
        self.target_names = {s: list(names) for s, names in (target_names or {}).items()}
        for subject, names in self.target_names.items():
            if subject not in subjects or len(names) != subjects[subject]:
                raise ValueError(f"target_names of {subject!r}: {len(names)} names for a subject with "
                                 f"{subjects.get(subject, 'no')} targets")
        self.tr = tr
        self.provenance: dict[str, Any] = {}  # what from_pretrained read; save_pretrained's default
        self.condition, self.batchnorm, self.kernel_trs = condition, batchnorm, kernel_trs
        self.trained = trained_layers(condition)
        self.prefix_layer = prefix_layer(condition)
        self.frozen = BACKBONE_LAYERS[:BACKBONE_LAYERS.index(self.prefix_layer) + 1]
        self.backbone = backbone if backbone is not None else SoundNet8()
        if self.backbone.config.heads:
            raise ValueError("the encoding backbone is conv1..conv7 only; drop conv8 heads first")
        batch_stat_layers = {"frozen-eval": self.trained, "eval": (),
                             "batch-stats": BACKBONE_LAYERS}[batchnorm]
        for name in batch_stat_layers:
            _swap_batchnorm(self.backbone.blocks[name])
        self._batch_stat_layers = tuple(batch_stat_layers)
        for name in self.frozen:
            for parameter in self.backbone.blocks[name].parameters():
                parameter.requires_grad_(False)
        for name in self.trained:
            if name in batch_stat_layers:
                # BN subtracts each window's mean, so this bias has an exactly zero gradient;
                # Adam would turn the float-rounding noise in it into steps of size lr.
                self.backbone.blocks[name].conv.bias.requires_grad_(False)
        self.heads = nn.ModuleDict({subject: CausalHead(n, kernel_trs) for subject, n in subjects.items()})
        # The fused copy of the frozen layers, built on first use. Kept in a dict, not as an
        # attribute: nn.Module would register it as a submodule (and save it with the model).
        self._fast: dict[str, FastSoundNet] = {}

    @property
    def subjects(self) -> list[str]:
        return list(self.heads)

    @property
    def prefix_cacheable(self) -> bool:
        """True when the prefix is a fixed function of the audio (running-statistics BN)."""
        return not any(name in self._batch_stat_layers for name in self.frozen)

    def train(self, mode: bool = True) -> "EncodingModel":
        """Training mode for layers that use window statistics; everything else stays in eval."""
        super().train(mode)
        for name in BACKBONE_LAYERS:
            self.backbone.blocks[name].train(mode and name in self._batch_stat_layers)
        return self

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._fast.clear()  # the fused copy of the frozen layers must be rebuilt
        return super().load_state_dict(*args, **kwargs)

    def frozen_network(self) -> nn.Module:
        """What runs the frozen layers: the fused inference path (:mod:`hear_brainsoundnet.fast`)
        when they use running statistics (same numbers to float rounding, faster on CPU),
        else the backbone itself."""
        if not self.prefix_cacheable or next(self.parameters()).device.type != "cpu":
            return self.backbone  # (on a GPU the frozen blocks, in eval mode, run on cuDNN)
        if "prefix" not in self._fast:
            self._fast["prefix"] = FastSoundNet.from_model(plain_backbone(self))
        return self._fast["prefix"]

    def prefix(self, audio: torch.Tensor) -> torch.Tensor:
        """Frozen layers on ``(B, samples)`` audio -> ``(B, C, frames)`` of ``prefix_layer``."""
        with torch.no_grad():
            return self.frozen_network()(audio, layers=(self.prefix_layer,))[self.prefix_layer].contiguous()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Trained layers on prefix frames ``(B, C, F)`` -> conv7 frames ``(B, 1024, F')``."""
        for name in self.trained:
            x = self.backbone.blocks[name](x)
        return x

    def head(self, subject: str, features: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``subject``'s predictions ``(B, n, n_targets)`` from gathered conv7 columns."""
        if subject not in self.heads:
            raise KeyError(f"no head for subject {subject!r}; this model has {self.subjects}")
        return self.heads[subject](features, valid)

    def forward(self, prefix: torch.Tensor, windows: Sequence[WindowSlice],
                rows: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Predictions ``{subject: (B_s, n, n_targets)}`` for the windows ``rows[subject]`` index.

        ``prefix`` is ``(B, C, prefix_length)``, each window's prefix frames stacked.
        """
        features, valid = self.features_from_prefix(prefix, windows)
        return {subject: self.head(subject, features[index], valid[index]) for subject, index in rows.items()}

    def features_from_prefix(self, prefix: torch.Tensor, windows: Sequence[WindowSlice]) -> tuple[torch.Tensor, torch.Tensor]:
        """Head inputs ``(B, 1024, k - 1 + n)`` and validity mask ``(B, k - 1 + n)`` of a batch.

        ``prefix`` is ``(B, C, prefix_length)``: each window's prefix frames, stacked.
        """
        conv7 = self.trunk(prefix)
        columns = self.kernel_trs - 1 + windows[0].n_trs
        out = conv7.new_zeros(len(windows), conv7.shape[1], columns)
        valid = torch.zeros(len(windows), columns, dtype=torch.bool, device=conv7.device)
        for i, window in enumerate(windows):
            index = torch.as_tensor(window.gather, device=conv7.device)
            out[i, :, window.n_zero:] = conv7[i].index_select(1, index)
            valid[i, window.n_zero:] = True
        return out, valid

    @torch.no_grad()
    def episode_features(self, waveform: np.ndarray | torch.Tensor, geometry: EpisodeGeometry,
                         layer: str | None = None) -> torch.Tensor:
        """Frames ``(C, n)`` of ``layer`` (default: the prefix layer) over a whole episode, in eval mode.

        Computed in bounded memory, chunk by chunk, equal to one pass over the episode's
        zero-extended audio (:func:`hear_brainsoundnet.embeddings.layer_frames`). Only meaningful
        for layers on running statistics (the cache, evaluation).
        """
        layer = layer or self.prefix_layer
        if layer in self.frozen and self.prefix_cacheable:
            network = self.frozen_network()
        else:  # trained layers, as they are now, on running statistics
            network = plain_backbone(self).to(next(self.parameters()).device)
            if next(network.parameters()).device.type == "cpu":
                network = FastSoundNet.from_model(network)
        device = next(self.parameters()).device
        audio = crop_audio(waveform, 0, geometry.n_samples).to(device)[None]
        total = output_length(layer, geometry.n_samples)
        return layer_frames(network, audio, {layer: (0, total)}, EPISODE_CHUNK_SAMPLES)[layer][0].contiguous()

    @torch.no_grad()
    def predict_run(self, waveform: np.ndarray | torch.Tensor, n_trs: int, subject: str, *,
                    tr: float | None = None) -> np.ndarray:
        """Predicted targets ``(n_trs, n_targets)`` of a whole run from its episode's audio (eval
        mode); ``tr`` defaults to the model's."""
        tr = self.tr if tr is None else tr
        geometry = EpisodeGeometry(n_trs, len(waveform), tr=tr, prefix=FEATURE_LAYER,
                                   context=self.kernel_trs - 1, window_trs=min(n_trs, 1), name="run")
        conv7 = self.episode_features(waveform, geometry, FEATURE_LAYER)
        columns = conv7.new_zeros(1, conv7.shape[0], self.kernel_trs - 1 + n_trs)
        columns[0, :, self.kernel_trs - 1:] = conv7.index_select(1, torch.as_tensor(geometry.frames, device=conv7.device))
        valid = torch.zeros(1, columns.shape[2], dtype=torch.bool, device=conv7.device)
        valid[0, self.kernel_trs - 1:] = True
        was_training = self.training
        self.eval()
        try:
            return self.head(subject, columns, valid)[0].cpu().numpy()
        finally:
            self.train(was_training)

    def save_pretrained(self, path: str | Path, *, provenance: Mapping[str, Any] | None = None) -> Path:
        """Write this model as a HEAR checkpoint (atomically) and return its path.

        ``path`` is a ``.safetensors`` file, or a folder (``model.safetensors`` in it, as on the
        Hub); ``provenance`` (default: :attr:`provenance`) is stored as the checkpoint's.
        """
        heads = head_tensors(self)
        brain_head = {"type": "causal temporal convolution", "feature_layer": FEATURE_LAYER,
                      "condition": self.condition, "kernel_trs": self.kernel_trs, "tr": self.tr,
                      "subjects": self.subjects, "targets": self.target_names,
                      "formula": BRAIN_HEAD_FORMULA, "tensors": sorted(heads),
                      "batchnorm_during_training": self.batchnorm}
        return save_checkpoint(_model_file(path), plain_backbone(self), extra_tensors=heads,
                               provenance=self.provenance if provenance is None else provenance,
                               extra_config={"brain_head": brain_head})

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu") -> "EncodingModel":
        """The model saved at ``path`` (a file or a folder, as :meth:`save_pretrained` takes),
        in eval mode, with its :attr:`provenance`. Loading never moves the caller's torch seed.

        Errors (:class:`~hear_brainsoundnet.checkpoints.CheckpointError`) name the file: not a
        checkpoint (a run model of the retired format says what to do), or no brain head.
        """
        path = _model_file(path)
        with torch.random.fork_rng(devices=[]):  # building modules draws random initial weights
            checkpoint = load_checkpoint(path)
            head = checkpoint.config.get("extra", {}).get("brain_head")
            if not isinstance(head, dict):
                raise CheckpointError(f"{path}: no brain head in this checkpoint (a plain SoundNet-8?); "
                                      "brain predictions need a model saved by training (best.safetensors) "
                                      "or exported by training.publish")
            try:
                subjects = {s: int(checkpoint.extra[f"head.{s}.weight"].shape[0]) for s in head["subjects"]}
                model = cls(subjects, kernel_trs=head["kernel_trs"], tr=head["tr"],
                            # files exported before the head recorded its condition kept it in the provenance
                            condition=head.get("condition") or checkpoint.provenance.get("condition", "head"),
                            batchnorm=head.get("batchnorm_during_training", "frozen-eval"),
                            target_names=head.get("targets"))
            except (KeyError, TypeError, ValueError) as error:
                raise CheckpointError(f"{path}: invalid brain_head in the config ({type(error).__name__}: "
                                      f"{error})") from None
        model.backbone.load_state_dict({k: v for k, v in checkpoint.model.state_dict().items()
                                        if k.startswith("blocks.")})  # not SoundNet's conv8 heads
        load_heads(model, checkpoint.extra, str(path))
        model.provenance = dict(checkpoint.provenance)
        return model.to(device).eval()


def _model_file(path: str | Path) -> Path:
    """``path``, or the Hub's file name inside it when it is a folder."""
    path = Path(path)
    if path.is_dir():
        from hear_brainsoundnet.hub import CHECKPOINT_FILENAME  # imports huggingface_hub: only here

        return path / CHECKPOINT_FILENAME
    return path


def plain_backbone(model: EncodingModel) -> SoundNet8:
    """A plain :class:`SoundNet8` (standard BatchNorm) with ``model``'s backbone weights, in eval mode."""
    with torch.random.fork_rng(devices=[]):  # its throw-away initialisation must not move the seed
        backbone = SoundNet8()
    backbone.load_state_dict(model.backbone.state_dict())
    return backbone.eval()


def head_tensors(model: EncodingModel) -> dict[str, torch.Tensor]:
    """Every head's tensors, named ``head.<subject>.{weight,bias,input_mean,input_scale}``."""
    tensors = {}
    for subject, head in model.heads.items():
        tensors[f"head.{subject}.weight"] = head.conv.weight
        tensors[f"head.{subject}.bias"] = head.conv.bias
        tensors[f"head.{subject}.input_mean"] = head.input_mean
        tensors[f"head.{subject}.input_scale"] = head.input_scale
    return tensors


def load_heads(model: EncodingModel, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Load :func:`head_tensors`-named tensors into ``model``'s heads; errors name ``source``."""
    for subject, head in model.heads.items():
        for name, target in (("weight", head.conv.weight), ("bias", head.conv.bias),
                             ("input_mean", head.input_mean), ("input_scale", head.input_scale)):
            key = f"head.{subject}.{name}"
            if key not in tensors:
                raise ValueError(f"{source}: no tensor {key!r} (heads stored: "
                                 f"{sorted({k.split('.')[1] for k in tensors if k.startswith('head.')})})")
            if tensors[key].shape != target.shape:
                raise ValueError(f"{source}: {key} is {tuple(tensors[key].shape)}, the model needs "
                                 f"{tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensors[key])
