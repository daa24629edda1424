"""SoundNet-8 in PyTorch reproduces the original network: checked against numpy, BN statistics, geometry."""
import numpy as np
import pytest
import torch

from hear_brainsoundnet.checkpoints import load_pretrained, read_sound8_npy
from hear_brainsoundnet.soundnet import (BACKBONE_LAYERS, HEAD_LAYERS, SPECS, SoundNet8,
                                         SoundNetConfig, frame_geometry, min_input_length,
                                         output_length)
from tests.signals import natural_like


@pytest.fixture(scope="module")
def sound8():
    return read_sound8_npy()


@pytest.fixture(scope="module")
def pretrained():
    return load_pretrained()


def numpy_block(x: np.ndarray, layer: dict, spec, scale_bn: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One block computed from sound8.npy's raw arrays with numpy only: (pre-BN, output).

    x is (in_channels, T); weights are (k, 1, in, out) as stored in the original file.
    """
    w = layer["weights"][:, 0].astype(np.float64)  # (k, in, out)
    padded = np.pad(x.astype(np.float64), ((0, 0), (spec.padding, spec.padding)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, spec.kernel, axis=1)[:, ::spec.stride]
    pre = np.einsum("itk,kio->ot", windows, w) + layer["biases"][:, None]
    out = (pre - layer["mean"][:, None]) / np.sqrt(layer["var"][:, None] + 1e-5)
    out = np.maximum(out * layer["gamma"][:, None] + layer["beta"][:, None], 0)
    if spec.pool > 1:
        t = out.shape[1] // spec.pool * spec.pool
        out = out[:, :t].reshape(out.shape[0], -1, spec.pool).max(axis=2)
    return pre, out


def test_conversion_matches_numpy_forward_of_original_weights(sound8, pretrained):
    audio = natural_like(3.0, seed=1)
    x = audio[None] * 256.0
    with torch.no_grad():
        ours = pretrained(torch.from_numpy(audio)[None], layers=("conv1", "conv2", "conv3"))
    for name in ("conv1", "conv2", "conv3"):
        _, x = numpy_block(x, sound8[name], SPECS[name])
        got = ours[name][0].double().numpy()
        assert got.shape == x.shape
        rel = np.abs(got - x).max() / np.abs(x).max()
        assert rel < 1e-4, f"{name}: relative error {rel:.2e}"


def test_heads_match_numpy(sound8, pretrained):
    audio = natural_like(12.0, seed=2)
    with torch.no_grad():
        out = pretrained(torch.from_numpy(audio)[None], layers=("conv7", "conv8", "conv8_2"))
    conv7 = out["conv7"][0].double().numpy()
    for head in HEAD_LAYERS:
        w = sound8[head]["weights"][:, 0].astype(np.float64)
        windows = np.lib.stride_tricks.sliding_window_view(conv7, 8, axis=1)[:, ::2]
        expected = np.einsum("itk,kio->ot", windows, w) + sound8[head]["biases"][:, None]
        got = out[head][0].double().numpy()
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4


def test_batchnorm_statistics_need_the_x256_scaling(sound8):
    """The stored running variances match real activations only when input is scaled to [-256, 256]."""
    audio = np.concatenate([natural_like(4.0, seed=s) for s in range(3)])

    def variance_ratios(scale: float) -> list[float]:
        x, ratios = audio[None] * scale, []
        for name in ("conv1", "conv2", "conv3"):
            pre, x = numpy_block(x, sound8[name], SPECS[name])
            ratios.append(float(np.median(pre.var(axis=1) / sound8[name]["var"])))
        return ratios

    scaled, unscaled = variance_ratios(256.0), variance_ratios(1.0)
    assert all(0.1 < r < 10 for r in scaled), scaled
    assert unscaled[0] < 1e-3 and unscaled[0] == pytest.approx(scaled[0] / 256**2, rel=1e-6)


@pytest.mark.parametrize("layer", BACKBONE_LAYERS + HEAD_LAYERS)
def test_output_lengths_follow_stride_arithmetic(pretrained, layer):
    lengths = [min_input_length(layer), min_input_length(layer) + 1, 5000, 32767, 32768, 32769,
               100_000, 22050 * 3 + 17]
    with torch.no_grad():
        for n in lengths:
            expected = output_length(layer, n)
            if expected == 0:
                continue
            got = pretrained(torch.zeros(2, n), layers=(layer,))[layer]
            assert got.shape[-1] == expected, (layer, n)
    assert output_length(layer, min_input_length(layer) - 1) == 0


def test_too_short_input_is_a_clear_error(pretrained):
    n = min_input_length("conv7") - 1
    with pytest.raises(ValueError, match=f"{n} samples are too short for conv7"):
        pretrained(torch.zeros(1, n))
    # Thanks to the zero padding, far less than one conv7 hop (32,768 samples) gives a frame.
    assert min_input_length("conv7") == 4574 and output_length("conv7", 22050) == 2


def test_sixty_seconds_lengths_from_reference():
    expected = {"conv1": 82687, "conv2": 5168, "conv3": 2585, "conv4": 1293, "conv5": 161,
                "conv6": 81, "conv7": 41}
    assert {name: output_length(name, 1_323_000) for name in expected} == expected


def test_time_base():
    assert frame_geometry("conv4").hop == 1024
    assert frame_geometry("conv7").hop == 32768
    assert frame_geometry("conv7").hop / 22050 == pytest.approx(1.48608, abs=1e-5)
    assert 4.0 < frame_geometry("conv7").receptive_field / 22050 < 4.2


@pytest.mark.parametrize("layer", ["conv1", "conv2", "conv4", "conv5", "conv7"])
def test_receptive_field_and_centre_from_gradients(pretrained, layer):
    """Frame j depends only on inputs inside its derived receptive field, centred where derived."""
    geometry = frame_geometry(layer)
    n = 8 * geometry.receptive_field
    audio = torch.from_numpy(natural_like(n / 22050 + 0.01, seed=3)[:n])[None].requires_grad_(True)
    out = pretrained(audio, layers=(layer,))[layer]
    j = out.shape[-1] // 2
    out[0, :, j].sum().backward()
    support = torch.nonzero(audio.grad[0]).flatten().double()
    centre = float(geometry.first_centre) + j * geometry.hop
    half = (geometry.receptive_field - 1) / 2
    assert support.min() >= centre - half - 1e-9 and support.max() <= centre + half + 1e-9
    # The support is not much narrower than the derived field (max-pools pass one path each).
    assert support.max() - support.min() > 0.5 * geometry.receptive_field


def test_config_rejects_unknown_head_and_sample_rate():
    with pytest.raises(ValueError, match="unknown SoundNet head"):
        SoundNetConfig(heads=("conv9",))
    with pytest.raises(ValueError, match="22050 Hz"):
        SoundNetConfig(sample_rate=16000)
    with pytest.raises(ValueError, match="not in this model"):
        SoundNet8()(torch.zeros(1, 100_000), layers=("conv8",))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, True, "256", None])
def test_config_rejects_an_input_scale_that_is_not_a_finite_positive_number(scale):
    """A NaN scale gave NaN features, a negative one inverted the waveform: both silently."""
    with pytest.raises(ValueError, match=f"input_scale must be a finite positive number, got {scale!r}"):
        SoundNetConfig(input_scale=scale)
    assert SoundNetConfig(input_scale=256).input_scale == 256.0


def test_freeze_stops_gradients_up_to_the_layer():
    model = SoundNet8()
    model.freeze("conv3")
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.split(".")[1] in ("conv1", "conv2", "conv3")}
