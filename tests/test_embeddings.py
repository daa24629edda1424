"""Embeddings: true frame-centre timestamps, empirical alignment, short and long audio, chunking."""
from fractions import Fraction

import numpy as np
import pytest
import torch

from hear_brainsoundnet.checkpoints import load_pretrained
from hear_brainsoundnet.embeddings import (BrainSoundNetEmbedding, _forward_layers, context_margin,
                                           plan_chunks, select_frames)
from hear_brainsoundnet.soundnet import (BACKBONE_LAYERS, SAMPLE_RATE, frame_geometry,
                                         min_input_length, output_length)
from tests.signals import natural_like

SR = SAMPLE_RATE


@pytest.fixture(scope="module")
def network():
    return load_pretrained()


@pytest.fixture(scope="module")
def model(network):
    return BrainSoundNetEmbedding(network)


def audio(seconds: float, n_sounds: int = 1, seed: int = 0) -> torch.Tensor:
    clips = [natural_like(seconds, seed=seed + i) for i in range(n_sounds)]
    return torch.from_numpy(np.stack(clips))


# ---- timestamps --------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds", [1.07, 1.98, 4.0, 2.74])
def test_timestamps_are_true_centres_inside_the_clip(model, seconds):
    n = int(seconds * SR)  # as hear-validator builds its clips
    emb, ts = model.timestamp_embeddings(audio(seconds, 2)[:, :n])
    geometry = frame_geometry("conv4")
    assert emb.dtype == torch.float32 and ts.shape == emb.shape[:2] and emb.shape[2] == 128
    assert torch.equal(ts[0], ts[1])
    # conv4: frame j centred on sample -547/2 + 1024 j; frame 0 (-12.4 ms) lies before the clip.
    assert geometry.first_centre == Fraction(-547, 2) and geometry.hop == 1024
    expected = [1000 * (-273.5 + 1024 * j) / SR for j in range(1, emb.shape[1] + 1)]
    np.testing.assert_allclose(ts[0].numpy(), expected, atol=1e-3)
    assert ts[0, 0].item() == pytest.approx(34.036, abs=1e-3)
    assert ts.max().item() <= 1000 * seconds  # never past the end (hear-validator's error)
    assert ts.max().item() > 1000 * seconds - 1000 * 1024 / SR  # the last hop is covered
    assert np.ptp(np.diff(ts[0].numpy())) < 1e-3


def test_timestamps_do_not_drift_over_twenty_minutes():
    selection = select_frames("conv4", 20 * 60 * SR)
    ts = selection.timestamps_ms()
    assert len(ts) == 25840
    # Frame 25840 is centred on sample -273.5 + 1024 * 25840 exactly; float64 keeps it to 1e-9 ms.
    assert ts[-1].item() == pytest.approx(1000 * (-273.5 + 1024 * 25840) / SR, abs=1e-6)
    assert ts[-1].item() == pytest.approx(1_199_990.0, abs=10)  # ends within a hop of 20:00


def test_timestamps_are_exact_in_float64_at_ten_hours():
    """At 10 h a float32 millisecond value is rounded by up to 2 ms; the float64 centres the
    model returns stay within 1e-6 ms of the exact rational centre."""
    n = 10 * 3600 * SR
    selection = select_frames("conv4", n)
    ts = selection.timestamps_ms()
    assert ts.dtype == torch.float64
    geometry = frame_geometry("conv4")
    frames = torch.arange(selection.first, selection.stop, dtype=torch.float64)
    exact = [Fraction(1000) * (geometry.first_centre + j * geometry.hop) / SR
             for j in (selection.first, selection.stop // 2, selection.stop - 1)]
    picked = ts[[0, selection.stop // 2 - selection.first, -1]].tolist()
    assert all(abs(Fraction(value) - e) < Fraction(1, 10**6) for value, e in zip(picked, exact))
    assert len(ts) == len(frames) and ts[-1] < 1000 * n / SR
    rounding = (ts.float().double() - ts).abs().max().item()
    assert 1.0 < rounding <= 2.0  # what float32 would have cost


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_embeddings_do_not_depend_on_or_change_the_mode(fast):
    """After .train() the embeddings equal the eval-mode ones, BatchNorm statistics are not
    updated, and the mode the user set is kept (before: the plain path normalised with batch
    statistics and overwrote the stored ones)."""
    network = load_pretrained()  # a private copy: its statistics must stay the checkpoint's
    stored = {name: tensor.clone() for name, tensor in network.state_dict().items()}
    model = BrainSoundNetEmbedding(network, fast=fast)
    x = audio(3.0, n_sounds=2, seed=3)
    scene, (frames, ts) = model.scene_embeddings(x), model.timestamp_embeddings(x)

    def same_everything() -> None:
        assert torch.equal(model.scene_embeddings(x), scene)
        assert all(torch.equal(a, b) for a, b in zip(model.timestamp_embeddings(x), (frames, ts)))
        for name, tensor in network.state_dict().items():
            assert torch.equal(tensor, stored[name]), f"{name} changed"

    assert model.train() is model and model.training and not model.network.training
    same_everything()
    assert model.training  # the calls did not change the mode
    model.network.train()  # even set directly on the network: eval statistics, mode restored
    same_everything()
    assert all(module.training for module in model.network.modules())
    model.eval()
    assert not any(module.training for module in model.modules())
    same_everything()


@pytest.mark.parametrize("layer", BACKBONE_LAYERS)
def test_every_clip_length_keeps_exactly_the_frames_centred_inside(layer):
    geometry = frame_geometry(layer)
    for n in list(range(1, 300, 7)) + list(range(300, 120_000, 997)) + [23593, 43659, 88200]:
        selection = select_frames(layer, n)
        ts = selection.timestamps_ms().numpy()
        assert len(ts) >= 1 and ts.min() >= 0 and ts.max() < 1000 * n / SR, (layer, n)
        assert output_length(layer, selection.padded_length) >= selection.stop
        if selection.pad_left == 0:  # every frame centred inside [0, n) is there, none outside
            centres = [geometry.first_centre + j * geometry.hop for j in range(selection.stop + 2)]
            inside = [j for j, c in enumerate(centres) if 0 <= c < n]
            assert (selection.first, selection.stop) == (inside[0], inside[-1] + 1), (layer, n)
        else:  # too short for any frame: the one frame is centred on the clip's middle
            assert len(ts) == 1 and abs(ts[0] * SR / 1000 - (n - 1) / 2) <= 0.5 + 1e-9, (layer, n)


@pytest.mark.parametrize("layer", BACKBONE_LAYERS)
def test_an_impulse_moves_the_frames_around_its_timestamp(network, layer):
    """Empirical alignment: a click at a known time changes the frames whose timestamp is
    nearest; the change-weighted mean timestamp is within one hop of the click."""
    model = BrainSoundNetEmbedding(network, timestamp_layer=layer)
    hop_ms = 1000 * frame_geometry(layer).hop / SR
    background = 0.01 * torch.randn(1, 12 * SR, generator=torch.Generator().manual_seed(1))
    quiet, ts = model.timestamp_embeddings(background)
    for sample in (30_000, 100_001, 150_000, 200_777):
        clicked = background.clone()
        clicked[0, sample] += 0.9
        change = (model.timestamp_embeddings(clicked)[0] - quiet).abs().sum(-1)[0]
        click_ms = 1000 * sample / SR
        nearest = (ts[0] - click_ms).abs().argmin()
        assert change[nearest] > 0, (layer, sample)
        centroid = float((change * ts[0]).sum() / change.sum())
        assert abs(centroid - click_ms) < hop_ms, (layer, sample, centroid - click_ms, hop_ms)
        if layer == "conv4":
            assert abs(centroid - click_ms) < hop_ms / 2


# ---- short audio ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 100, 221, 222, 750, 751, 4573, 4574, 22050])
def test_short_audio_gives_valid_embeddings(model, n):
    x = 0.5 * torch.rand(2, n, generator=torch.Generator().manual_seed(n)) - 0.25
    emb, ts = model.timestamp_embeddings(x)
    scene = model.scene_embeddings(x)
    assert emb.shape[0] == 2 and emb.shape[1] >= 1 and scene.shape == (2, 1024)
    assert torch.isfinite(emb).all() and torch.isfinite(scene).all()
    assert ts.min() >= 0 and ts.max() < 1000 * n / SR
    assert not torch.equal(scene[0], scene[1])  # the content still matters


def test_short_scene_pads_to_the_network_minimum(network, model):
    x = audio(0.1)  # 2,205 samples, conv7 needs 4,574
    padded = torch.nn.functional.pad(x, (0, min_input_length("conv7") - x.shape[1]))
    with torch.no_grad():
        expected = network(padded, layers=("conv7",))["conv7"].mean(-1)
    torch.testing.assert_close(model.scene_embeddings(x), expected)


# ---- scene pooling -------------------------------------------------------------------------------

def test_scene_is_the_mean_of_every_conv7_frame(network, model):
    x = audio(9.0)
    with torch.no_grad():
        conv7 = network(x, layers=("conv7",))["conv7"]
    assert conv7.shape[-1] == 7
    torch.testing.assert_close(model.scene_embeddings(x), conv7.mean(-1))
    both = BrainSoundNetEmbedding(network, scene_pooling="mean+max")
    assert both.scene_embedding_size == 2048
    torch.testing.assert_close(both.scene_embeddings(x), torch.cat([conv7.mean(-1), conv7.amax(-1)], 1))


def test_batch_and_single_clip_agree_and_are_deterministic(model):
    x = audio(3.0, n_sounds=3)
    batch = model.scene_embeddings(x)
    torch.testing.assert_close(model.scene_embeddings(x[1:2]), batch[1:2])
    assert torch.equal(model.scene_embeddings(x), batch)
    emb, _ = model.timestamp_embeddings(x)
    torch.testing.assert_close(model.timestamp_embeddings(x[2:])[0], emb[2:])


# ---- long audio: chunking --------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [("conv4",), ("conv7",), ("conv3", "conv7"), ("conv5",)])
def test_chunk_plan_covers_each_frame_once_with_its_whole_receptive_field(layers):
    grid = max(frame_geometry(layer).hop for layer in layers)
    for n in (5 * SR, 61 * SR + 17, 3 * 60 * SR + 1234, 20 * 60 * SR):
        chunks = plan_chunks(n, layers, 20 * SR)
        assert len(chunks) > 1 or n <= 20 * SR + 2 * context_margin(layers)
        for layer in layers:
            g = frame_geometry(layer)
            ranges = [chunk.frames[layer] for chunk in chunks]
            assert ranges[0][0] == 0 and ranges[-1][1] == output_length(layer, n)
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # a partition
            for chunk, (j0, j1) in zip(chunks, ranges):
                assert chunk.start % grid == 0
                if j1 <= j0:
                    continue
                half = Fraction(g.receptive_field - 1, 2)
                low = g.first_centre + j0 * g.hop - half
                high = g.first_centre + (j1 - 1) * g.hop + half
                assert chunk.start == 0 or low >= chunk.start, (layer, n, chunk)
                assert chunk.stop == n or high < chunk.stop, (layer, n, chunk)
                offset = chunk.start // g.hop
                assert j1 - offset <= output_length(layer, chunk.stop - chunk.start)


def test_long_audio_in_chunks_equals_one_pass(network):
    """Three minutes with 20-s chunks (10 passes) against one pass over the whole clip."""
    x = audio(180.0, seed=5)
    model = BrainSoundNetEmbedding(network, chunk_seconds=20.0)
    assert len(plan_chunks(x.shape[1], ["conv4"], model.chunk_samples)) == 10
    with torch.no_grad():
        one_pass = _forward_layers(network, x, ("conv4", "conv7"))
    emb, ts = model.timestamp_embeddings(x)
    selection = select_frames("conv4", x.shape[1])
    expected = one_pass["conv4"][..., selection.first:selection.stop].transpose(1, 2)
    assert emb.shape == expected.shape == (1, 3876, 128)
    assert (emb - expected).abs().max().item() < 1e-5
    scene = model.scene_embeddings(x)
    assert (scene - one_pass["conv7"].mean(-1)).abs().max().item() < 1e-5
    assert ts[0, -1].item() <= 180_000


def test_chunked_batches_stay_within_the_pass_budget(network, monkeypatch):
    """A batch of long clips is split so that one pass holds about chunk_seconds of audio."""
    from hear_brainsoundnet import embeddings

    seen = []
    real = embeddings._forward_layers

    def spy(model, waveform, layers):
        seen.append(tuple(waveform.shape))
        return real(model, waveform, layers)

    monkeypatch.setattr(embeddings, "_forward_layers", spy)
    model = BrainSoundNetEmbedding(network, chunk_seconds=5.0)
    budget = model.chunk_samples + 2 * context_margin(["conv7"])  # 5 s + 2 x 2.97 s
    model.scene_embeddings(audio(12.0, n_sounds=3))
    assert len(seen) > 3 and all(rows * length <= max(budget, length) for rows, length in seen)
    seen.clear()
    model.scene_embeddings(audio(2.0, n_sounds=5))  # 10 s in all: one pass for the batch
    assert seen == [(5, 2 * SR)]
