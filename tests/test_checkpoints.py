"""The checkpoint format: round trip, and a clear refusal of every kind of bad file."""
import json
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hear_brainsoundnet import checkpoints
from hear_brainsoundnet.checkpoints import (CheckpointError, convert_sound8, load_checkpoint,
                                            pretrained_checkpoint, read_config, save_checkpoint)
from hear_brainsoundnet.soundnet import SoundNet8
from tests.signals import natural_like


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_sound8(out_path=tmp_path_factory.mktemp("ckpt") / "pretrained.safetensors")


def test_round_trip_is_bit_identical(converted, tmp_path):
    first = load_checkpoint(converted)
    again = save_checkpoint(tmp_path / "again.safetensors", first.model, provenance=first.provenance,
                            extra_tensors={"brain_head.weight": torch.ones(3, 1024, 5)},
                            extra_config={"brain_head": {"kernel": 5}})
    second = load_checkpoint(again)
    audio = torch.from_numpy(natural_like(12.0))[None]
    with torch.no_grad():
        a = first.model(audio, layers=("conv4", "conv7", "conv8"))
        b = second.model(audio, layers=("conv4", "conv7", "conv8"))
    for name in a:
        assert torch.equal(a[name], b[name])
    assert torch.equal(second.extra["brain_head.weight"], torch.ones(3, 1024, 5))
    assert second.config["extra"] == {"brain_head": {"kernel": 5}}
    assert second.provenance["source_sha256"] == checkpoints.SOUND8_SHA256
    assert not second.model.training


def test_config_records_architecture_and_provenance(converted):
    config = read_config(converted)
    assert config["architecture"] == "soundnet8"
    assert config["sample_rate"] == 22050 and config["input_scale"] == 256.0
    assert config["layers"][-2:] == ["conv8", "conv8_2"]
    assert {"code_version", "source_weights", "training_data", "condition"} <= set(config["provenance"])


def test_conversion_is_reproducible(converted, tmp_path):
    again = convert_sound8(out_path=tmp_path / "again.safetensors")
    assert checkpoints.sha256_file(again) == checkpoints.sha256_file(converted)


def test_pretrained_checkpoint_is_converted_once(tmp_path):
    path = pretrained_checkpoint(tmp_path)
    mtime = path.stat().st_mtime_ns
    assert pretrained_checkpoint(tmp_path) == path and path.stat().st_mtime_ns == mtime
    path.write_bytes(b"garbage")  # a damaged cache entry is converted again
    with pytest.warns(UserWarning, match="modified or damaged.*converting sound8.npy again"):
        assert load_checkpoint(pretrained_checkpoint(tmp_path)).config["architecture"] == "soundnet8"


def _tampered_cache(cache, edit):
    """Rewrite the cached pretrained checkpoint with ``edit`` applied to its tensors: a valid
    checkpoint, same config and provenance (source_sha256 included), other weights."""
    path = pretrained_checkpoint(cache)
    original = load_checkpoint(path)
    state = {k: v.clone() for k, v in original.model.state_dict().items()}
    edit(state)
    metadata = {"hear-brainsoundnet": json.dumps(original.config, sort_keys=True)}
    save_file(state, path, metadata=metadata)
    return path, original


def _flip_signs(state):
    weight = state["blocks.conv5.conv.weight"].view(-1)
    weight[:2000] = -weight[:2000]


def _flip_exponent(state):
    weight = state["blocks.conv2.conv.weight"].view(-1)
    bits = weight.view(torch.int32)
    index = int(((weight > 0.01) & (weight < 0.5)).nonzero()[0])
    bits[index] ^= 1 << 30  # the top exponent bit: a weight in (0.01, 0.5) becomes ~1e36-1e38


@pytest.mark.parametrize("edit", [_flip_signs, _flip_exponent], ids=["2000 signs", "one exponent"])
def test_tampered_pretrained_cache_is_converted_again(tmp_path, edit):
    """A cached conversion is verified on every load against the sha256 recorded when it was
    converted; a modified one is never used (before: only its provenance field was read)."""
    path, original = _tampered_cache(tmp_path, edit)
    audio = torch.from_numpy(natural_like(3.0))[None]
    with torch.no_grad():
        tampered = load_checkpoint(path).model(audio, layers=("conv7",))["conv7"]
        reference = original.model(audio, layers=("conv7",))["conv7"]
    assert not torch.allclose(tampered, reference, rtol=0.01, equal_nan=True)  # the edit matters
    with pytest.warns(UserWarning, match=f"{path}: sha256 [0-9a-f]{{64}} differs from [0-9a-f]{{64}}, "
                                         "recorded when it was converted"):
        again = pretrained_checkpoint(tmp_path)
    assert again == path
    with torch.no_grad():
        assert torch.equal(load_checkpoint(again).model(audio, layers=("conv7",))["conv7"], reference)
    assert (tmp_path / (path.name + ".sha256")).read_text().split()[0] == checkpoints.sha256_file(path)


def test_cache_without_a_recorded_sha256_is_converted_again(tmp_path, recwarn):
    path = pretrained_checkpoint(tmp_path)
    record = tmp_path / (path.name + ".sha256")
    digest = record.read_text().split()[0]
    _tampered_cache(tmp_path, _flip_signs)
    record.unlink()  # as a cache written by an older version: converted again, quietly
    assert pretrained_checkpoint(tmp_path) == path
    assert checkpoints.sha256_file(path) == digest == record.read_text().split()[0]
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_load_pretrained_uses_the_verified_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEAR_BRAINSOUNDNET_CACHE", str(tmp_path))
    path, original = _tampered_cache(tmp_path, _flip_signs)
    with pytest.warns(UserWarning, match="modified or damaged"):
        model = checkpoints.load_pretrained()
    for name, tensor in original.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_truncated_file(converted, tmp_path):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(converted.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors: truncated"):
        load_checkpoint(bad)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="tiny.safetensors: truncated"):
        load_checkpoint(tiny)


@pytest.mark.parametrize("kind", ["pickle", "torch.save", "npy"])
def test_pickles_are_refused(tmp_path, kind):
    path = tmp_path / f"weights.{kind}"
    state = SoundNet8().state_dict()
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"a": 1}))
    elif kind == "torch.save":
        torch.save(state, path)
    else:
        with open(path, "wb") as handle:  # np.save to a handle keeps the name as given
            np.save(handle, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match=f"{path.name}: this is .*pickles are refused"):
        load_checkpoint(path)


def _header_length(path):
    with open(path, "rb") as handle:
        return struct.unpack("<Q", handle.read(8))[0]


@pytest.mark.parametrize("low_byte", [0x78, 0x80, 0x88, 0x00])
def test_any_header_length_loads(tmp_path, low_byte):
    """The header length's low byte is any multiple of 8 (0x80 included: 1 header in 32); a
    checkpoint is told from a pickle by its structure, not by its first byte."""
    model = SoundNet8(SoundNet8().config)  # random init: only the file's structure matters
    probe = save_checkpoint(tmp_path / "probe.safetensors", model, provenance={"note": ""})
    base = _header_length(probe)
    # Each character of the note adds one header byte; safetensors pads the header to 8 bytes.
    pad = (low_byte - base) % 256
    path = save_checkpoint(tmp_path / "padded.safetensors", model, provenance={"note": "x" * pad})
    assert _header_length(path) & 0xFF == low_byte
    assert path.read_bytes()[0] == low_byte
    loaded = load_checkpoint(path)
    assert loaded.provenance["note"] == "x" * pad
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)


def test_a_truncated_checkpoint_is_called_truncated_whatever_its_first_byte(tmp_path):
    model = SoundNet8(SoundNet8().config)
    probe = save_checkpoint(tmp_path / "probe.safetensors", model, provenance={"note": ""})
    pad = (0x80 - _header_length(probe)) % 256
    path = save_checkpoint(tmp_path / "p.safetensors", model, provenance={"note": "x" * pad})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:_header_length(path) // 2])  # cut inside the header
    assert cut.read_bytes()[0] == 0x80
    with pytest.raises(CheckpointError, match="cut.safetensors: truncated"):
        load_checkpoint(cut)


def test_pickle_protocols_are_refused_whatever_the_first_byte(tmp_path):
    for protocol in range(2, 6):
        path = tmp_path / f"p{protocol}.bin"
        path.write_bytes(pickle.dumps({"a": list(range(100))}, protocol=protocol))
        with pytest.raises(CheckpointError, match="a Python pickle"):
            load_checkpoint(path)


def _rewrite(src, dst, tensors=None, config_edit=None, metadata=None):
    ck = load_checkpoint(src)
    state = {k: v.clone() for k, v in ck.model.state_dict().items()}
    if tensors:
        tensors(state)
    config = dict(ck.config)
    if config_edit:
        config_edit(config)
    meta = metadata if metadata is not None else {"hear-brainsoundnet": json.dumps(config)}
    save_file(state, dst, metadata=meta)
    return dst


def test_wrong_shape(converted, tmp_path):
    def shrink(state):
        state["blocks.conv4.conv.weight"] = state["blocks.conv4.conv.weight"][:64]
    bad = _rewrite(converted, tmp_path / "shape.safetensors", tensors=shrink)
    with pytest.raises(CheckpointError, match=r"shape\.safetensors: tensor 'blocks\.conv4\.conv\.weight' is "
                                              r"torch\.float32 \(64, 64, 8\).*\(128, 64, 8\)"):
        load_checkpoint(bad)


def test_wrong_dtype_and_nan(converted, tmp_path):
    def half(state):
        state["blocks.conv1.conv.bias"] = state["blocks.conv1.conv.bias"].half()
    with pytest.raises(CheckpointError, match="blocks.conv1.conv.bias' is torch.float16"):
        load_checkpoint(_rewrite(converted, tmp_path / "dtype.safetensors", tensors=half))

    def nan(state):
        state["blocks.conv2.bn.weight"][3] = float("nan")
    with pytest.raises(CheckpointError, match="nan.safetensors: tensor 'blocks.conv2.bn.weight' contains NaN"):
        load_checkpoint(_rewrite(converted, tmp_path / "nan.safetensors", tensors=nan))


def test_wrong_architecture(converted, tmp_path):
    def other(config):
        config["architecture"] = "resnet50"
    with pytest.raises(CheckpointError, match="arch.safetensors: wrong architecture 'resnet50'"):
        load_checkpoint(_rewrite(converted, tmp_path / "arch.safetensors", config_edit=other))

    def drop(state):
        del state["heads.conv8.conv.weight"]
    with pytest.raises(CheckpointError, match=r"missing \['heads\.conv8\.conv\.weight'\]"):
        load_checkpoint(_rewrite(converted, tmp_path / "missing.safetensors", tensors=drop))

    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3)}, plain)
    with pytest.raises(CheckpointError, match="plain.safetensors: not a hear-brainsoundnet checkpoint"):
        load_checkpoint(plain)


def test_sha256_mismatch(converted, tmp_path):
    copy = tmp_path / "copy.safetensors"
    shutil.copy(converted, copy)
    with pytest.raises(CheckpointError, match=r"copy\.safetensors: sha256 mismatch: expected 0{64}"):
        load_checkpoint(copy, expected_sha256="0" * 64)
    assert load_checkpoint(copy, expected_sha256=checkpoints.sha256_file(converted)).path == copy


def test_wrong_sound8_is_refused_before_unpickling(tmp_path):
    fake = tmp_path / "sound8.npy"
    np.save(fake, np.array([{"conv1": {}}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match="sound8.npy: sha256 mismatch"):
        convert_sound8(fake, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_save_is_atomic(converted, tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    shutil.copy(converted, target)
    before = target.read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(checkpoints, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(target, SoundNet8())
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_header_length_lie_is_detected(converted, tmp_path):
    data = bytearray(converted.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    bad = tmp_path / "header.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header.safetensors: truncated or not a safetensors file"):
        load_checkpoint(bad)


def _raw_header_file(path, header, body=b""):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return path


@pytest.mark.parametrize("header, message", [
    (b"[1, 2, 3]", "corrupt safetensors header: a JSON list, not an object of tensors"),
    (b"[" * 100_000 + b"]" * 100_000, r"corrupt safetensors header \(JSON nested too deeply\)"),
    (b'"text"', "corrupt safetensors header: a JSON str"),
    ({"w": {"dtype": "F32", "shape": [1]}}, "tensor 'w' has no valid data_offsets"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", 4]}}, "tensor 'w' has no valid data_offsets"),
    ({"w": [0, 4]}, "tensor 'w' has no valid data_offsets"),
    ({"__metadata__": ["hear-brainsoundnet"]}, "not a hear-brainsoundnet checkpoint"),
    ({"__metadata__": {"hear-brainsoundnet": 3}}, "the 'hear-brainsoundnet' metadata is not a string"),
    ({"__metadata__": {"hear-brainsoundnet": "[" * 100_000}}, r"corrupt config in the header \(JSON nested"),
    ({"__metadata__": {"hear-brainsoundnet": json.dumps({"format": "hear-brainsoundnet",
                                                          "format_version": "1"})}},
     "format_version '1' is not an integer"),
])
def test_malformed_headers_name_the_file(tmp_path, header, message):
    """A header that parses as JSON but is not a safetensors header (a list, nesting deeper
    than Python's parser allows, entries without offsets) is a CheckpointError naming the
    file, never an AttributeError, KeyError or RecursionError."""
    path = _raw_header_file(tmp_path / "odd.safetensors", header)
    with pytest.raises(CheckpointError, match=f"odd.safetensors: .*{message}"):
        load_checkpoint(path)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -256.0, True, "256"])
def test_invalid_input_scale_is_refused(converted, tmp_path, scale):
    path = tmp_path / "scale.safetensors"
    ck = load_checkpoint(converted)
    config = {**ck.config, "input_scale": scale}
    save_file(ck.model.state_dict(), path, metadata={"hear-brainsoundnet": json.dumps(config)})
    with pytest.raises(CheckpointError, match=r"scale.safetensors: invalid config \(input_scale must be "
                                              r"a finite positive number"):
        load_checkpoint(path)
