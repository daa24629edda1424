"""SoundNet-8 (Aytar, Vondrick & Torralba, 2016) as a PyTorch module, and its time base.

The network is a stack of 1-D convolutions over raw audio at 22,050 Hz. Every block is
``Conv1d -> BatchNorm1d -> ReLU -> (MaxPool1d)``; conv8 (objects) and conv8_2 (scenes) are
optional linear heads on conv7. The input scaling to SoundNet's [-256, 256] range is part of
the model: callers pass waveforms in [-1, 1].

Frame geometry (hop, centre of each frame, receptive field, output length) is derived from the
layer table below, never hard-coded, so that timestamps and alignment follow the architecture.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Sequence

import torch
from torch import nn

SAMPLE_RATE = 22050
INPUT_SCALE = 256.0
BN_EPS = 1e-5


@dataclass(frozen=True)
class BlockSpec:
    """One block of SoundNet-8: a 1-D convolution, optional BatchNorm+ReLU, optional max-pool."""

    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    pool: int = 1  # max-pool kernel = stride; 1 means no pooling
    batchnorm: bool = True  # conv8 heads are plain linear convolutions


BACKBONE = (
    BlockSpec("conv1", 1, 16, 64, 2, 32, pool=8),
    BlockSpec("conv2", 16, 32, 32, 2, 16, pool=8),
    BlockSpec("conv3", 32, 64, 16, 2, 8),
    BlockSpec("conv4", 64, 128, 8, 2, 4),
    BlockSpec("conv5", 128, 256, 4, 2, 2, pool=4),
    BlockSpec("conv6", 256, 512, 4, 2, 2),
    BlockSpec("conv7", 512, 1024, 4, 2, 2),
)
HEADS = (
    BlockSpec("conv8", 1024, 1000, 8, 2, 0, batchnorm=False),  # ImageNet objects
    BlockSpec("conv8_2", 1024, 401, 8, 2, 0, batchnorm=False),  # Places scenes
)
SPECS = {spec.name: spec for spec in BACKBONE + HEADS}
BACKBONE_LAYERS = tuple(spec.name for spec in BACKBONE)
HEAD_LAYERS = tuple(spec.name for spec in HEADS)


def _chain(layer: str) -> tuple[BlockSpec, ...]:
    """The blocks an input goes through to reach ``layer``'s output, in order."""
    if layer not in SPECS:
        raise ValueError(f"unknown SoundNet layer {layer!r}; known: {', '.join(SPECS)}")
    if layer in HEAD_LAYERS:
        return BACKBONE + (SPECS[layer],)
    return BACKBONE[: BACKBONE_LAYERS.index(layer) + 1]


@dataclass(frozen=True)
class FrameGeometry:
    """Where the frames of one layer's output sit in the input waveform, in samples.

    Frame ``j`` is centred on input sample ``first_centre + j * hop`` (a half-integer is the
    midpoint between two samples) and depends on input samples
    ``[first_centre - (receptive_field - 1) / 2, first_centre + (receptive_field - 1) / 2]
    + j * hop`` (indices outside the signal are the zero padding).
    """

    layer: str
    hop: int
    first_centre: Fraction
    receptive_field: int

    def centre_samples(self, n_frames: int) -> torch.Tensor:
        """Centres of frames ``0 .. n_frames - 1`` in input samples, float64."""
        j = torch.arange(n_frames, dtype=torch.float64)
        return float(self.first_centre) + j * self.hop

    def centre_seconds(self, n_frames: int, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """Centres of frames ``0 .. n_frames - 1`` in seconds, float64, without drift."""
        return self.centre_samples(n_frames) / sample_rate


def frame_geometry(layer: str) -> FrameGeometry:
    """Hop, first frame centre and receptive field of ``layer``, derived from the layer table.

    Working backwards from the layer: an output position ``x`` of a convolution (kernel k,
    stride s, padding p) is centred on input position ``s * x - p + (k - 1) / 2`` and spans
    ``k`` inputs; a max-pool of size m maps ``x`` to ``m * x + (m - 1) / 2`` and spans ``m``.
    """
    hop = 1
    centre = Fraction(0)  # centre of frame 0, in the coordinates of the current layer's input
    span = 1  # receptive field, in samples of the current layer's input
    for spec in reversed(_chain(layer)):
        if spec.pool > 1:
            centre = spec.pool * centre + Fraction(spec.pool - 1, 2)
            span = (span - 1) * spec.pool + spec.pool
            hop *= spec.pool
        centre = spec.stride * centre - spec.padding + Fraction(spec.kernel - 1, 2)
        span = (span - 1) * spec.stride + spec.kernel
        hop *= spec.stride
    return FrameGeometry(layer=layer, hop=hop, first_centre=centre, receptive_field=span)


def block_output_length(spec: BlockSpec, n_frames: int) -> int:
    """Frames one block (convolution, then max-pool) outputs for ``n_frames`` input frames.

    The one place this formula lives: the plain and fused networks and the training trunk use it.
    May be 0 or negative when the input is too short.
    """
    return ((n_frames + 2 * spec.padding - spec.kernel) // spec.stride + 1) // spec.pool


def output_length(layer: str, n_samples: int) -> int:
    """Number of frames ``layer`` outputs for an input of ``n_samples`` samples (0 if too short)."""
    length = n_samples
    for spec in _chain(layer):
        length = block_output_length(spec, length)
        if length <= 0:
            return 0
    return length


def min_input_length(layer: str) -> int:
    """Smallest number of input samples for which ``layer`` outputs at least one frame."""
    n = 1
    while output_length(layer, n) < 1:
        n *= 2
    low, high = n // 2, n  # output_length is monotonic in n: bisect
    while high - low > 1:
        mid = (low + high) // 2
        if output_length(layer, mid) >= 1:
            high = mid
        else:
            low = mid
    return high


class Block(nn.Module):
    """Conv1d, then BatchNorm1d + ReLU (backbone blocks), then max-pool (where the table says)."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.spec = spec
        self.conv = nn.Conv1d(spec.in_channels, spec.out_channels, spec.kernel, spec.stride,
                              spec.padding)
        self.bn = nn.BatchNorm1d(spec.out_channels, eps=BN_EPS) if spec.batchnorm else None
        self.pool = nn.MaxPool1d(spec.pool, spec.pool) if spec.pool > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = torch.relu(self.bn(x))
        if self.pool is not None:
            x = self.pool(x)
        return x


@dataclass
class SoundNetConfig:
    """What defines a SoundNet-8 instance: which heads exist and how input is scaled."""

    sample_rate: int = SAMPLE_RATE
    input_scale: float = INPUT_SCALE
    heads: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.heads = tuple(self.heads)
        unknown = [h for h in self.heads if h not in HEAD_LAYERS]
        if unknown:
            raise ValueError(f"unknown SoundNet head(s) {unknown}; known: {list(HEAD_LAYERS)}")
        if int(self.sample_rate) != SAMPLE_RATE:
            raise ValueError(f"SoundNet-8 runs at {SAMPLE_RATE} Hz, got sample_rate={self.sample_rate}")
        self.sample_rate = SAMPLE_RATE
        # A NaN, infinite, zero or negative scale would silently give NaN or inverted features.
        if (isinstance(self.input_scale, bool) or not isinstance(self.input_scale, (int, float))
                or not math.isfinite(self.input_scale) or self.input_scale <= 0):
            raise ValueError(f"input_scale must be a finite positive number, got {self.input_scale!r}")
        self.input_scale = float(self.input_scale)

    @property
    def layers(self) -> tuple[str, ...]:
        return BACKBONE_LAYERS + self.heads


class SoundNet8(nn.Module):
    """SoundNet-8: conv1..conv7 (+ optional conv8 / conv8_2) on mono 22,050 Hz audio.

    ``forward(waveform, layers)`` takes ``(batch, samples)`` float audio in [-1, 1], scales it
    by ``config.input_scale`` and returns ``{layer: (batch, channels, frames)}`` for each
    requested layer, stopping after the deepest one. ``geometry(layer)`` tells where each
    output frame sits in the input.
    """

    def __init__(self, config: SoundNetConfig | None = None):
        super().__init__()
        self.config = config or SoundNetConfig()
        self.blocks = nn.ModuleDict({spec.name: Block(spec) for spec in BACKBONE})
        self.heads = nn.ModuleDict({name: Block(SPECS[name]) for name in self.config.heads})

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def layers(self) -> tuple[str, ...]:
        return self.config.layers

    @staticmethod
    def geometry(layer: str) -> FrameGeometry:
        return frame_geometry(layer)

    def check_input(self, waveform: torch.Tensor, layers: Iterable[str]) -> tuple[list[str], int]:
        """Validate a forward call; return the requested layers and the index of the deepest
        backbone block to run (``len(BACKBONE_LAYERS)`` when a conv8 head is asked for)."""
        layers = list(layers)
        if not layers:
            raise ValueError("ask for at least one layer")
        missing = [name for name in layers if name not in self.layers]
        if missing:
            raise ValueError(f"layer(s) {missing} not in this model; it has {list(self.layers)}")
        if waveform.dim() != 2:
            raise ValueError(f"waveform must be (batch, samples), got shape {tuple(waveform.shape)}")
        for name in layers:
            if output_length(name, waveform.shape[-1]) < 1:
                raise ValueError(f"{waveform.shape[-1]} samples are too short for {name}: it needs at "
                                 f"least {min_input_length(name)} samples (pad the audio)")
        deepest = max(BACKBONE_LAYERS.index(n) if n in BACKBONE_LAYERS else len(BACKBONE_LAYERS)
                      for n in layers)
        return layers, deepest

    def forward(self, waveform: torch.Tensor,
                layers: Sequence[str] = ("conv7",)) -> dict[str, torch.Tensor]:
        layers, deepest = self.check_input(waveform, layers)
        wanted = set(layers)
        x = waveform.unsqueeze(1) * self.config.input_scale
        outputs: dict[str, torch.Tensor] = {}
        for name in BACKBONE_LAYERS[: deepest + 1]:
            x = self.blocks[name](x)
            if name in wanted:
                outputs[name] = x
        for name in self.config.heads:
            if name in wanted:
                outputs[name] = self.heads[name](x)
        return {name: outputs[name] for name in layers}

    def freeze(self, up_to: str | None) -> None:
        """Stop gradients for every block up to and including ``up_to`` (None: freeze nothing)."""
        if up_to is None:
            return
        stop = BACKBONE_LAYERS.index(up_to)
        for name in BACKBONE_LAYERS[: stop + 1]:
            for parameter in self.blocks[name].parameters():
                parameter.requires_grad_(False)


def count_parameters(module: nn.Module) -> int:
    """Trainable and frozen parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in module.parameters())
