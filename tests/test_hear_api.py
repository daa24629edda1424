"""The HEAR API of hear_brainsoundnet and of the per-checkpoint modules, and every bad input."""
import importlib
import json
import re
import struct

import numpy as np
import pytest
import torch

import hear_brainsoundnet
from hear_brainsoundnet import get_scene_embeddings, get_timestamp_embeddings, load_model
from hear_brainsoundnet.checkpoints import (CheckpointError, load_checkpoint, pretrained_checkpoint,
                                            save_checkpoint)
from hear_brainsoundnet.hub import UnknownCheckpointError
from hear_brainsoundnet.soundnet import SoundNet8
from tests.signals import natural_like

SR = 22050


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def clips():
    return torch.from_numpy(np.stack([natural_like(2.5, seed=s) for s in (1, 2)]))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A backbone-only checkpoint whose conv7 differs from the pretrained one."""
    network = SoundNet8()
    network.load_state_dict(load_checkpoint(pretrained_checkpoint()).model.state_dict(), strict=False)
    with torch.no_grad():
        network.blocks["conv7"].conv.weight.mul_(1.5)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "finetuned.safetensors", network,
                           provenance={"condition": "test"})


def test_bare_load_model_meets_the_contract(model):
    assert isinstance(model, torch.nn.Module) and not model.training
    assert type(model.sample_rate) is int and model.sample_rate == 22050
    assert type(model.scene_embedding_size) is int and model.scene_embedding_size == 1024
    assert type(model.timestamp_embedding_size) is int and model.timestamp_embedding_size == 128
    assert model.checkpoint == str(pretrained_checkpoint())


def test_outputs_are_float32_finite_and_shaped(model, clips):
    scene = get_scene_embeddings(clips, model)
    emb, ts = get_timestamp_embeddings(clips, model)
    assert scene.dtype == emb.dtype == torch.float32
    assert scene.shape == (2, 1024) and emb.shape == (2, 54, 128) and ts.shape == (2, 54)
    assert torch.isfinite(scene).all() and torch.isfinite(emb).all()
    assert scene.device == emb.device == clips.device
    assert not torch.allclose(scene[0], scene[1])


def test_options_change_layers_and_pooling(clips):
    both = load_model(scene_pooling="mean+max")
    assert both.scene_embedding_size == 2048 and get_scene_embeddings(clips, both).shape == (2, 2048)
    conv3 = load_model(timestamp_layer="conv3", scene_layer="conv5")
    emb, ts = get_timestamp_embeddings(clips, conv3)
    assert conv3.timestamp_embedding_size == emb.shape[2] == 64
    assert np.diff(ts[0].numpy()).mean() == pytest.approx(1000 * 512 / SR, abs=1e-3)
    assert get_scene_embeddings(clips, conv3).shape == (2, 256) == (2, conv3.scene_embedding_size)


@pytest.mark.parametrize("options, error, message", [
    ({"pooling": "max"}, TypeError, r"unknown load_model option\(s\) \['pooling'\]; known: \['timestamp_layer'"),
    ({"timestamp_layer": "conv9"}, ValueError, "timestamp_layer='conv9' is not a layer of this checkpoint"),
    ({"scene_layer": "fc"}, ValueError, "scene_layer='fc' is not a layer"),
    ({"scene_pooling": "median"}, ValueError, r"scene_pooling='median'; choose one of \['mean', 'mean\+max'\]"),
    ({"chunk_seconds": 0}, ValueError, "chunk_seconds must be a positive number"),
    # JSON model options come typed; a bool is not seconds and a string is not a switch
    ({"chunk_seconds": True}, ValueError, "chunk_seconds must be a positive number of seconds, got True"),
    ({"chunk_seconds": "60"}, ValueError, "chunk_seconds must be a positive number of seconds, got '60'"),
    ({"fast": "no"}, ValueError, "fast must be true or false, got 'no'"),
    ({"fast": 0}, ValueError, "fast must be true or false, got 0"),
])
def test_bad_options_are_clear_errors(options, error, message):
    with pytest.raises(error, match=message):
        load_model(**options)


def test_any_checkpoint_file_loads_by_path(model, finetuned, clips):
    other = load_model(str(finetuned))
    assert other.checkpoint == str(finetuned) and other.scene_embedding_size == 1024
    ours, theirs = get_scene_embeddings(clips, other), get_scene_embeddings(clips, model)
    assert (ours - theirs).abs().max() > 1e-3  # conv7 changed, so the scene embedding did
    torch.testing.assert_close(get_timestamp_embeddings(clips, other)[0],
                               get_timestamp_embeddings(clips, model)[0])  # conv4 did not


def test_per_checkpoint_module_is_a_plugin(model, finetuned, clips):
    plugin = importlib.import_module("hear_brainsoundnet.models.pretrained")
    assert plugin.CHECKPOINT == "pretrained"
    assert "hear_brainsoundnet.models.pretrained" in hear_brainsoundnet.models.available()
    default = plugin.load_model()
    torch.testing.assert_close(plugin.get_scene_embeddings(clips, default), get_scene_embeddings(clips, model))
    assert plugin.load_model(str(finetuned)).checkpoint == str(finetuned)  # an explicit file wins
    with pytest.raises(ModuleNotFoundError, match="'nope' is not a checkpoint of the manifest .*available: "
                                                  "hear_brainsoundnet.models.pretrained"):
        importlib.import_module("hear_brainsoundnet.models.nope")


def test_unknown_checkpoint_name_is_a_clear_error():
    with pytest.raises(UnknownCheckpointError, match=r"unknown checkpoint 'sub99_conv4': not a name in the "
                                                     r"manifest .*manifest.json \(known: pretrained\); a "
                                                     r"checkpoint file is given as a path"):
        load_model("sub99_conv4")
    with pytest.raises(CheckpointError, match="missing.safetensors: no such checkpoint file"):
        load_model("/no/such/missing.safetensors")


def test_corrupt_or_foreign_checkpoint_files_are_clear_errors(tmp_path, finetuned):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(finetuned.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="corrupt.safetensors: truncated"):
        load_model(str(corrupt))
    foreign = tmp_path / "foreign.safetensors"
    raw = finetuned.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    config = json.loads(header["__metadata__"]["hear-brainsoundnet"])
    config["architecture"] = "vggish"
    header["__metadata__"]["hear-brainsoundnet"] = json.dumps(config)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    foreign.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])
    with pytest.raises(CheckpointError, match="foreign.safetensors: wrong architecture 'vggish'"):
        load_model(str(foreign))


# ---- bad audio ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, hint", [
    ((SR,), r"got shape \(22050,\); for one sound use audio.unsqueeze\(0\)"),
    ((2, 1, SR), r"got shape \(2, 1, 22050\); mono only: .*use audio.squeeze\(1\)")])
def test_wrong_number_of_dimensions(model, shape, hint):
    for fn in (get_scene_embeddings, get_timestamp_embeddings):
        with pytest.raises(ValueError, match="audio must be 2-D \\(n_sounds, n_samples\\), " + hint):
            fn(torch.zeros(shape), model)


def test_float64_is_converted_to_float32(model, clips):
    scene = get_scene_embeddings(clips.double(), model)
    emb, _ = get_timestamp_embeddings(clips.double(), model)
    assert scene.dtype == emb.dtype == torch.float32
    torch.testing.assert_close(scene, get_scene_embeddings(clips, model))
    torch.testing.assert_close(emb, get_timestamp_embeddings(clips, model)[0])


def test_integer_pcm_is_refused(model, clips):
    pcm = (clips * 32767).to(torch.int16)
    with pytest.raises(TypeError, match=r"audio is torch.int16: pass float32 in \[-1, 1\] at 22050 Hz "
                                        r"\(for int16 PCM: audio.float\(\) / 32768\)"):
        get_scene_embeddings(pcm, model)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_audio_is_refused(model, clips, value):
    bad = clips.clone()
    bad[1, 5] = value
    bad[1, 9] = value
    with pytest.raises(ValueError, match=r"audio contains 2 NaN or infinite value\(s\), "
                                         r"the first in sound 1 at sample 5"):
        get_timestamp_embeddings(bad, model)


@pytest.mark.parametrize("shape", [(0, SR), (2, 0)])
def test_empty_audio_is_refused(model, shape):
    with pytest.raises(ValueError, match=r"audio is empty: shape \(%d, %d\)" % shape):
        get_scene_embeddings(torch.zeros(shape), model)


@pytest.mark.parametrize("value", [3e38, -3e38, 32767.0, 101.0])
def test_audio_far_outside_unit_range_is_refused(model, clips, value):
    """Finite audio on another scale (int16 PCM as float, or 3e38, which overflows the network
    into NaN embeddings) is refused, naming where it peaks."""
    bad = clips.clone()
    bad[1, 1234] = value
    for fn in (get_scene_embeddings, get_timestamp_embeddings):
        with pytest.raises(ValueError, match=rf"audio peaks at {re.escape(f'{abs(value):.3g}')} \(sound 1, "
                                             r"sample 1234\): "
                                             r"HEAR audio is in \[-1, 1\] and values over 100 are refused"):
            fn(bad, model)


def test_audio_a_little_over_full_scale_is_accepted(model, clips):
    hot = clips / clips.abs().max() * 100.0  # the limit itself: 40 dB over full scale
    scene = get_scene_embeddings(hot, model)
    emb, _ = get_timestamp_embeddings(clips * 1.5, model)
    assert torch.isfinite(scene).all() and torch.isfinite(emb).all()


def test_embeddings_that_overflow_are_an_error(tmp_path, clips):
    """A checkpoint whose finite weights overflow float32 on valid audio: an error naming the
    checkpoint and sound, never NaN embeddings (heareval's runner would assert on them)."""
    network = SoundNet8()
    network.load_state_dict(load_checkpoint(pretrained_checkpoint()).model.state_dict(), strict=False)
    with torch.no_grad():
        for layer in ("conv2", "conv3"):  # finite weights, 1e50 together: past float32's 3.4e38
            network.blocks[layer].conv.weight.mul_(1e25)
    path = save_checkpoint(tmp_path / "overflow.safetensors", network)
    model = load_model(str(path))
    with pytest.raises(FloatingPointError, match=r"the scene embeddings of sound 0 are not finite: "
                                                 r"checkpoint .*overflow.safetensors overflows float32"):
        get_scene_embeddings(clips, model)
    with pytest.raises(FloatingPointError, match=r"the conv4 embeddings of sound 0 are not finite"):
        get_timestamp_embeddings(clips, model)


def test_timestamps_are_float64(model, clips):
    """Exact frame centres: float64 (float32 rounds them by up to 2 ms at 10 hours)."""
    _, ts = get_timestamp_embeddings(clips, model)
    assert ts.dtype == torch.float64
    exact = [1000 * (-273.5 + 1024 * j) / SR for j in range(1, ts.shape[1] + 1)]
    assert ts[0].tolist() == pytest.approx(exact, abs=1e-9)


def test_audio_and_model_on_different_devices(model):
    with pytest.raises(ValueError, match="audio is on meta but the model is on cpu: move one of them"):
        get_scene_embeddings(torch.zeros(1, SR, device="meta"), model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_outputs_match_cpu(clips):
    gpu = load_model().to("cuda")
    with pytest.raises(ValueError, match="audio is on cpu but the model is on cuda:0"):
        get_scene_embeddings(clips, gpu)
    scene = get_scene_embeddings(clips.cuda(), gpu)
    emb, ts = get_timestamp_embeddings(clips.cuda(), gpu)
    assert scene.device.type == emb.device.type == "cuda"
    cpu = load_model()
    torch.testing.assert_close(scene.cpu(), get_scene_embeddings(clips, cpu), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ts.cpu(), get_timestamp_embeddings(clips, cpu)[1])


def test_wrong_types_are_refused(model, clips):
    with pytest.raises(TypeError, match="audio must be a torch.Tensor .*got ndarray"):
        get_scene_embeddings(clips.numpy(), model)
    with pytest.raises(TypeError, match="model must come from hear_brainsoundnet.load_model, got SoundNet8"):
        get_timestamp_embeddings(clips, SoundNet8())
