"""The fast inference path equals the plain layer-by-layer SoundNet-8 (1e-4 relative) with the
same frame counts, for every layer, input length, batch size and product strategy.

Runs in about 15 s on two idle cores (longer when other processes share them).
"""
import numpy as np
import pytest
import torch

from hear_brainsoundnet.checkpoints import load_pretrained
from hear_brainsoundnet.fast import FastSoundNet, fold_batchnorm
from hear_brainsoundnet.soundnet import (BACKBONE_LAYERS, HEAD_LAYERS, SoundNet8, SoundNetConfig,
                                         frame_geometry, min_input_length, output_length)
from tests.signals import natural_like

ALL_LAYERS = BACKBONE_LAYERS + HEAD_LAYERS
TOLERANCE = 1e-4
CONV7_HOP = frame_geometry("conv7").hop  # 32,768 samples


@pytest.fixture(scope="module")
def pretrained():
    return load_pretrained()


@pytest.fixture(scope="module")
def fast(pretrained):
    return FastSoundNet.from_model(pretrained)


@pytest.fixture(scope="module")
def randomised():
    """A model with random weights and BatchNorm statistics, half the BN scales negative:
    folding a negative scale into the weights must not break ReLU-then-max-pool."""
    generator = torch.Generator().manual_seed(0)
    model = SoundNet8(SoundNetConfig(heads=HEAD_LAYERS))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                values = values.abs() + 0.1
            elif name.endswith("conv.weight"):
                values = values / (tensor.shape[1] * tensor.shape[2]) ** 0.5
            tensor.copy_(values)
    return model.eval()


def audio(n_samples: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Speech-, music-, noise- and silence-like test audio, (batch, n_samples) float32."""
    rows = [natural_like(n_samples / 22050 + 0.05, seed=seed + b)[:n_samples] for b in range(batch)]
    return torch.from_numpy(np.stack(rows))


def layers_for(n_samples: int, model: SoundNet8) -> list[str]:
    return [name for name in model.layers if output_length(name, n_samples) >= 1]


def assert_agrees(plain: SoundNet8, fast: FastSoundNet, x: torch.Tensor, layers=None) -> None:
    """Same keys, shapes and frame counts; per item, max |fast - plain| <= 1e-4 * max |plain|."""
    layers = layers or layers_for(x.shape[-1], plain)
    with torch.no_grad():
        expected = plain(x, layers)
    got = fast(x, layers)
    assert list(got) == list(expected)
    for name in layers:
        assert got[name].shape == expected[name].shape, name
        assert got[name].shape[-1] == output_length(name, x.shape[-1]), name
        assert got[name].dtype == torch.float32
        for item in range(x.shape[0]):
            scale = expected[name][item].abs().max()
            error = (got[name][item] - expected[name][item]).abs().max()
            assert error <= TOLERANCE * scale, \
                f"{name}, length {x.shape[-1]}, item {item}: relative error {error / scale:.2e}"


# Lengths: the shortest that reaches conv7, shorter than one conv7 hop, one hop, several,
# and long enough for the conv8 heads (8 conv7 frames) and for several blocks in conv1.
@pytest.mark.parametrize("n_samples", [min_input_length("conv7"), 9001, 20000, CONV7_HOP,
                                       70001, 12 * 22050 + 5])
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_matches_plain_on_natural_audio(pretrained, fast, n_samples, batch):
    assert_agrees(pretrained, fast, audio(n_samples, batch, seed=n_samples))


def test_shallow_layers_on_audio_too_short_for_conv5(pretrained, fast):
    n = min_input_length("conv5") - 1
    assert_agrees(pretrained, fast, audio(n, batch=2), ["conv1", "conv2", "conv3", "conv4"])
    assert_agrees(pretrained, fast, audio(min_input_length("conv2"), batch=2), ["conv1", "conv2"])


@pytest.fixture
def threads(request):
    """Run the test on ``request.param`` torch threads (the fast path picks its conv2 variant
    by thread count), then restore the session's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("copy_rows", [True, False])
@pytest.mark.parametrize("block_bytes", [1 << 20, 1 << 16])
def test_both_product_strategies_small_blocks_and_thread_variants(pretrained, copy_rows, block_bytes,
                                                                   threads):
    """Shifted in-place products and copied rows, with blocks so small that conv1, conv2 and
    conv5 cross many block boundaries, on one and two threads: all equal the plain model."""
    fast = FastSoundNet.from_model(pretrained, block_bytes=block_bytes, copy_rows=copy_rows)
    assert_agrees(pretrained, fast, audio(3 * 22050 + 3, batch=2, seed=5))
    assert_agrees(pretrained, fast, audio(5000, batch=1, seed=6))


def test_negative_batchnorm_scales_and_random_weights(randomised):
    assert (randomised.blocks["conv1"].bn.weight < 0).any()
    fast = FastSoundNet.from_model(randomised)
    assert_agrees(randomised, fast, audio(12 * 22050, batch=2, seed=7))


def test_extreme_signals(pretrained, fast):
    """Silence (outputs are ReLU(bias) only), full-scale noise, and a clipped square wave."""
    n = 3 * 22050
    t = torch.arange(n) / 22050
    noise = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 2 - 1
    signals = torch.stack([torch.zeros(n), noise,
                           torch.sign(torch.sin(2 * torch.pi * 440 * t))])
    assert_agrees(pretrained, fast, signals)


def test_frame_counts_follow_output_length_for_every_length(fast):
    """Around every edge where a layer gains a frame (output_length is the plain model's count,
    see test_soundnet), for all layers at once."""
    edges = {base + offset for base in range(min_input_length("conv7"), 2 * CONV7_HOP, 4099)
             for offset in (0, 1, 16, 256)}
    for n in sorted(edges):
        got = fast(torch.zeros(1, n), BACKBONE_LAYERS)
        expected = [output_length(name, n) for name in BACKBONE_LAYERS]
        assert [v.shape[-1] for v in got.values()] == expected, n


def test_returns_only_the_requested_layers_in_order(fast):
    x = audio(40000)
    out = fast(x, ("conv7", "conv1", "conv4"))
    assert list(out) == ["conv7", "conv1", "conv4"]
    assert list(fast(x)) == ["conv7"]


def test_bad_input_is_refused_like_the_plain_model(pretrained, fast):
    with pytest.raises(ValueError, match="too short for conv7"):
        fast(torch.zeros(1, min_input_length("conv7") - 1))
    with pytest.raises(ValueError, match=r"\(batch, samples\)"):
        fast(torch.zeros(40000))
    with pytest.raises(ValueError, match="float32"):
        fast(torch.zeros(1, 40000, dtype=torch.float64))
    with pytest.raises(ValueError, match="not in this model"):
        fast(torch.zeros(1, 40000), ["conv9"])
    plain = SoundNet8()  # fresh modules are in training mode
    with pytest.raises(ValueError, match="eval"):
        FastSoundNet.from_model(plain)


def test_folded_weights_equal_batchnorm_then_conv(pretrained):
    """fold_batchnorm is the algebra the fast path rests on, checked on one block directly."""
    block = pretrained.blocks["conv3"]
    x = torch.randn(2, 32, 100, generator=torch.Generator().manual_seed(3))
    weight, bias = fold_batchnorm(block, input_scale=2.0)
    assert weight.dtype == bias.dtype == torch.float32
    folded = torch.nn.functional.conv1d(x, weight, bias, block.spec.stride, block.spec.padding)
    with torch.no_grad():
        expected = block.bn(block.conv(2.0 * x))
    assert (folded - expected).abs().max() <= TOLERANCE * expected.abs().max()


def test_hear_api_with_fast_path_equals_plain_path():
    """Through the HEAR API (chunked, padded, batched): load_model(fast=True) is the default and
    agrees with fast=False, timestamps identical, for a clip shorter than conv4's first frame
    centre, a short clip and a clip cut into several chunks."""
    import hear_brainsoundnet as hear

    plain = hear.load_model("", fast=False, chunk_seconds=6)
    fast = hear.load_model("", chunk_seconds=6)
    assert isinstance(fast.runner, FastSoundNet)
    for n_samples, batch in ((500, 2), (3 * 22050, 2), (20 * 22050 + 11, 1)):
        x = audio(n_samples, batch, seed=n_samples)
        expected, got = hear.get_scene_embeddings(x, plain), hear.get_scene_embeddings(x, fast)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= TOLERANCE * expected.abs().max()
        (expected, times), (got, got_times) = (hear.get_timestamp_embeddings(x, plain),
                                               hear.get_timestamp_embeddings(x, fast))
        assert torch.equal(got_times, times) and got.shape == expected.shape
        assert (got - expected).abs().max() <= TOLERANCE * expected.abs().max()


def test_inputs_off_the_cpu_run_the_plain_model(monkeypatch):
    """The fast path is tuned for CPU caches; on another device (here "meta", which needs no
    GPU) the plain model runs, with the same output shapes."""
    model = SoundNet8().to("meta").eval()
    fast = FastSoundNet.from_model(model)
    calls, plain_forward = [], SoundNet8.forward
    monkeypatch.setattr(SoundNet8, "forward", lambda self, *args, **kwargs:
                        calls.append(1) or plain_forward(self, *args, **kwargs))
    out = fast(torch.zeros(2, 40000, device="meta"), ("conv4", "conv7"))
    assert calls and out["conv7"].device.type == "meta"
    assert out["conv4"].shape == (2, 128, output_length("conv4", 40000))
