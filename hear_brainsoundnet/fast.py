"""A fast inference path for a trained :class:`~hear_brainsoundnet.soundnet.SoundNet8` on CPU.

Why the plain model is slow: SoundNet's cost sits in conv1 (1 -> 16 channels, kernel 64) and
conv2 (16 -> 32, kernel 32), about 45 of its 57 MFLOP per second of audio, and a direct
convolution with one or sixteen input channels keeps the vector units mostly idle.

What this module does instead, for every block (conv + BatchNorm + ReLU + max-pool):

- **BatchNorm and the x256 input scale are folded into the convolution** (eval mode only):
  ``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
- **Each convolution is a few large matrix products over the padded, channels-last input,
  with no im2col copy.** For stride ``s`` and kernel ``k``, one matrix row computes ``R``
  consecutive outputs from a window of ``span = s*(R-1) + k`` input frames (a banded,
  Toeplitz weight matrix of ``K`` rows). Consecutive rows of a matrix product must start
  exactly ``K`` floats apart for BLAS to read the input in place; rows ``u*m + q`` (``q`` in
  ``0..m-1``, ``m = ceil(span / (s*R))``) do, so ``m`` products over shifted views of the
  same buffer produce every output, written interleaved straight into the output buffer.
  ``R`` > 1 trades zero-padding FLOPs (``K / (k*C_in)``, 1.25x for conv1) for a matrix
  product wide enough to run near the machine's peak: conv1 alone would otherwise be a
  product with 16 output columns (see ``OUTPUTS_PER_ROW``). Where the rows are few and the
  weight large (conv5..conv8 on short clips) one product over a copy of the rows is cheaper
  than reading the weight ``m`` times; each call picks the cheaper of the two.
- **ReLU, bias and max-pool are fused after the product**: ``relu`` and ``+ bias`` commute
  with ``max``, so pooling runs first on the raw products (a tree of elementwise maxima over
  cache-sized blocks) and bias + ReLU touch only the pooled output.
- Long inputs are processed in blocks of rows sized so that each thread's share of a block's
  products stays in its core's L2 cache; the batch is folded into the rows, so a batch costs
  one set of products. Memory beyond the input is a few channels-last copies of the
  activations and one block of products: about 15 MB for a 60 s pass (0.2-0.3 MB per s).

The result equals the layer-by-layer model up to float32 rounding (checked against it to
1e-4 relative in ``tests/test_fast.py``) with identical frame counts. Inputs on other devices
than the CPU run the plain model (this path is tuned for CPU caches; on a GPU the plain
cuDNN model is already fast).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .soundnet import BACKBONE_LAYERS, HEAD_LAYERS, Block, BlockSpec, SoundNet8, block_output_length

# Outputs per matrix row R, per layer, as (on one thread, on several threads). conv1: R = 8
# makes the product 128 columns wide (16 channels x 8 outputs) for 1.25x the FLOPs; R = 1
# would be 16 columns and run at half the speed. From conv2 on, C_in * kernel >= 512 already
# makes a good product with R = 1; but conv2's 16 products of 32 columns split badly across
# threads, and R = 4 (5 products of 128 columns, 1.25x the FLOPs) is faster there on 2
# threads though slower on one (measure with benchmarks/bench_embeddings.py before changing).
OUTPUTS_PER_ROW = {"conv1": (8, 8), "conv2": (1, 4)}
# Bytes of product output per block: small enough to stay in a core's L2 cache (2 MB here)
# together with the weights, large enough for the product to amortise its set-up.
BLOCK_BYTES = 1 << 20


def fold_batchnorm(block: Block, input_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``(out, in, k)`` and bias ``(out,)`` of ``block``'s convolution with its eval-mode
    BatchNorm and an input scale folded in, float32 (per-channel factors computed in float64)."""
    weight = block.conv.weight.detach()
    scale = torch.full((weight.shape[0],), float(input_scale), dtype=torch.float64,
                       device=weight.device)
    bias = block.conv.bias.detach().double()
    if block.bn is not None:
        bn = block.bn
        factor = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        scale = scale * factor
        bias = (bias - bn.running_mean.double()) * factor + bn.bias.detach().double()
    return weight * scale.float()[:, None, None], bias.float()


class FusedBlock(nn.Module):
    """One SoundNet block (conv, folded BatchNorm, ReLU, max-pool) as strided matrix products.

    Takes and returns channels-last activations ``(batch, frames, channels)``. The input is
    laid out as consecutive *units* of ``row_frames`` frames; unit ``u`` holds the start of
    matrix rows ``u*groups .. u*groups + groups - 1``, i.e. of ``groups * R`` consecutive
    convolution outputs.
    """

    def __init__(self, block: Block, input_scale: float = 1.0, outputs_per_row: int = 1,
                 block_bytes: int = BLOCK_BYTES, copy_rows: bool | None = None):
        super().__init__()
        spec: BlockSpec = block.spec
        self.spec = spec
        self.relu = block.bn is not None  # heads (conv8, conv8_2) are linear
        weight, bias = fold_batchnorm(block, input_scale)
        c_out, c_in, kernel = weight.shape
        stride, rows = spec.stride, outputs_per_row
        self.rows = rows
        self.step = stride * rows  # input frames between two consecutive matrix rows
        self.span = stride * (rows - 1) + kernel  # input frames one matrix row reads
        self.groups = math.ceil(self.span / self.step)
        self.row_frames = self.groups * self.step  # K / c_in
        # Rows: (frame j of the window, input channel); columns: (output r of the row, channel).
        toeplitz = weight.new_zeros(self.row_frames, c_in, rows, c_out)
        for r in range(rows):  # output r of a row reads frames stride*r .. stride*r + kernel - 1
            toeplitz[stride * r: stride * r + kernel, :, r, :] = weight.permute(2, 1, 0)
        self.register_buffer("weight", toeplitz.view(self.row_frames * c_in, rows * c_out))
        self.register_buffer("bias", bias)
        if spec.pool & (spec.pool - 1):
            raise ValueError(f"{spec.name}: max-pool of {spec.pool} is not a power of two")
        # Units (groups of matrix rows) per block, per thread: a block's products fill about
        # block_bytes, and a pool window never straddles two blocks.
        self.align = spec.pool // math.gcd(self.groups * rows, spec.pool)
        units = max(1, block_bytes // (4 * self.groups * rows * c_out))
        self.block_units = max(self.align, units - units % self.align)
        self.copy_rows = copy_rows  # None: choose per call (see _products); tests force both

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, frames_in, c_in)`` -> ``(batch, frames_out, c_out)``, frames as SoundNet8."""
        spec = self.spec
        batch, frames_in, c_in = x.shape
        n_out = block_output_length(spec, frames_in)
        if n_out < 1:
            raise ValueError(f"{spec.name}: {frames_in} input frames give no output")
        # Matrix rows per batch item: enough for n_out outputs, and for every row an output
        # needs to read only this item's frames (the batch is one long buffer).
        needed_rows = math.ceil(n_out * spec.pool / self.rows)
        units = math.ceil((self.step * (needed_rows - 1) + self.span) / self.row_frames)
        units = math.ceil(units / self.align) * self.align
        frames_item = units * self.row_frames
        buffer = self._padded_input(x, frames_item)
        n_units = batch * units
        c_out = spec.out_channels
        conv_per_unit = self.groups * self.rows
        out = x.new_empty(batch * units * conv_per_unit // spec.pool, c_out)
        # Copying the rows writes n_rows * span * c_in floats; shifted products instead read
        # the weight (groups - 1) more times: copy when that is the smaller cost.
        copy_rows = self.copy_rows if self.copy_rows is not None else \
            n_units * self.groups * self.span * c_in < (self.groups - 1) * self.weight.numel()
        if spec.pool == 1:
            self._products(buffer, 0, n_units, out.view(n_units, self.groups, -1), copy_rows)
            self._bias_relu(out)
        else:
            # Each thread takes a share of a block's rows: a block per thread keeps each
            # thread's share in its own core's cache and halves the synchronisations.
            block = self.block_units * torch.get_num_threads()
            scratch = x.new_empty(min(block, n_units), self.groups, self.rows * c_out)
            for start in range(0, n_units, block):  # block edges are aligned to the pool
                stop = min(start + block, n_units)
                products = scratch[: stop - start]
                self._products(buffer, start, stop, products, copy_rows)
                pooled = out[start * conv_per_unit // spec.pool: stop * conv_per_unit // spec.pool]
                self._max_pool(products.view(-1, spec.pool * c_out), pooled)
                self._bias_relu(pooled)  # while the block is in cache
        return out.view(batch, -1, c_out)[:, :n_out]

    def _bias_relu(self, x: torch.Tensor) -> None:
        x.add_(self.bias)
        if self.relu:
            x.relu_()

    def _padded_input(self, x: torch.Tensor, frames_item: int) -> torch.Tensor:
        """The input zero-padded to ``frames_item`` frames per item, flat, plus a zero tail
        for the shifted views of the last rows."""
        batch, frames_in, c_in = x.shape
        pad = self.spec.padding
        tail = (self.groups - 1) * self.step * c_in
        flat = x.new_empty(batch * frames_item * c_in + tail)
        padded = flat[: batch * frames_item * c_in].view(batch, frames_item, c_in)
        keep = min(frames_in, frames_item - pad)
        padded[:, :pad].zero_()
        padded[:, pad: pad + keep] = x[:, :keep]
        padded[:, pad + keep:].zero_()
        flat[batch * frames_item * c_in:].zero_()
        return flat

    def _products(self, flat: torch.Tensor, start: int, stop: int, out: torch.Tensor,
                  copy_rows: bool) -> None:
        """Matrix rows of units ``start .. stop`` into ``out`` ``(stop-start, groups, R*c_out)``.

        Either ``groups`` products over shifted in-place views of ``flat`` (no copy, the weight
        is read ``groups`` times), or one product over a copy of the overlapping rows (better
        when there are few rows and a large weight, as in conv5..conv8).
        """
        c_in = self.spec.in_channels
        k = self.row_frames * c_in
        if copy_rows:
            width = self.span * c_in
            rows = flat.as_strided(((stop - start) * self.groups, width), (self.step * c_in, 1),
                                   flat.storage_offset() + start * k).contiguous()
            torch.mm(rows, self.weight[:width], out=out.view(rows.shape[0], -1))
            return
        for group in range(self.groups):
            rows = flat.as_strided((stop - start, k), (k, 1),
                                   flat.storage_offset() + start * k + group * self.step * c_in)
            torch.mm(rows, self.weight, out=out[:, group])

    @staticmethod
    def _max_pool(products: torch.Tensor, out: torch.Tensor) -> None:
        """Max over the ``pool`` outputs laid side by side in each row of ``products`` (which
        it overwrites), as a tree of halves computed in place: no temporaries."""
        channels = out.shape[1]
        width = products.shape[1]
        while width > 2 * channels:
            width //= 2
            torch.maximum(products[:, :width], products[:, width: 2 * width], out=products[:, :width])
        torch.maximum(products[:, :channels], products[:, channels: 2 * channels], out=out)


class FastSoundNet(nn.Module):
    """Inference-only SoundNet-8 with the same ``forward`` contract as :class:`SoundNet8`.

    Build it with :meth:`from_model` from a model in eval mode. It keeps a reference to that
    model for its layer checks and for inputs on other devices than the CPU. Outputs are
    ``(batch, channels, frames)`` float32, possibly non-contiguous views (they are transposes
    of channels-last activations; call ``.contiguous()`` if needed).
    """

    def __init__(self, model: SoundNet8, block_bytes: int = BLOCK_BYTES,
                 copy_rows: bool | None = None):
        super().__init__()
        if model.training:
            raise ValueError("FastSoundNet folds BatchNorm running statistics: call model.eval() first")
        self.plain = model
        self._options = {"block_bytes": block_bytes, "copy_rows": copy_rows}
        scale = model.config.input_scale
        rows = {name: OUTPUTS_PER_ROW.get(name, (1, 1)) for name in BACKBONE_LAYERS}
        self.blocks = nn.ModuleDict({
            name: FusedBlock(model.blocks[name], scale if name == "conv1" else 1.0, rows[name][0],
                             **self._options) for name in BACKBONE_LAYERS})
        # Variants for several threads, where they differ (see OUTPUTS_PER_ROW).
        self.threaded_blocks = nn.ModuleDict({
            name: FusedBlock(model.blocks[name], scale if name == "conv1" else 1.0, rows[name][1],
                             **self._options)
            for name in BACKBONE_LAYERS if rows[name][1] != rows[name][0]})
        # The conv8 heads hold 80% of the weights and embeddings never use them: they are
        # folded at their first use, from the model as it is then.
        self.heads = nn.ModuleDict()

    @classmethod
    def from_model(cls, model: SoundNet8, block_bytes: int = BLOCK_BYTES,
                   copy_rows: bool | None = None) -> "FastSoundNet":
        """The fast path of ``model`` in eval mode (its weights are copied, so later changes to
        ``model`` are not seen). ``block_bytes`` sizes the cache blocks; ``copy_rows`` forces
        one of the two product strategies (None: chosen per call, the fastest)."""
        return cls(model, block_bytes, copy_rows)

    @property
    def layers(self) -> tuple[str, ...]:
        return self.plain.layers

    @property
    def sample_rate(self) -> int:
        return self.plain.sample_rate

    @torch.no_grad()
    def forward(self, waveform: torch.Tensor,
                layers: Sequence[str] = ("conv7",)) -> dict[str, torch.Tensor]:
        if waveform.device.type != "cpu":
            return self.plain(waveform, layers)
        if waveform.dtype != torch.float32:
            raise ValueError(f"waveform must be float32, got {waveform.dtype}")
        layers, deepest = self.plain.check_input(waveform, layers)
        wanted = set(layers)
        blocks = dict(self.blocks)
        if torch.get_num_threads() > 1:
            blocks.update(self.threaded_blocks)
        x = waveform.unsqueeze(-1)  # channels-last, one channel
        outputs: dict[str, torch.Tensor] = {}
        for name in BACKBONE_LAYERS[: deepest + 1]:
            x = blocks[name](x)
            if name in wanted:
                outputs[name] = x.transpose(1, 2)
        for name in HEAD_LAYERS:
            if name in wanted:
                if name not in self.heads:
                    self.heads[name] = FusedBlock(self.plain.heads[name], **self._options)
                outputs[name] = self.heads[name](x).transpose(1, 2)
        return {name: outputs[name] for name in layers}
