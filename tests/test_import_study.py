"""Importing the study's checkpoints (training.import_study) from files written in its exact layout.

The files are made here the way the study's code makes them: a model with the attribute names of
its ``SoundNetEncoding_conv`` / ``SoundNet8_pytorch`` (Conv2d / BatchNorm2d on ``(1, 1, T, 1)``
tensors), whose ``state_dict()`` goes into ``convert_model.py``'s dict, saved with ``torch.save``.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hear_brainsoundnet
from hear_brainsoundnet.checkpoints import load_checkpoint, read_config
from hear_brainsoundnet.files import sha256_file
from hear_brainsoundnet.embeddings import select_frames
from training.import_study import StudyImportError, import_study, names_from_filename, study_tensor_shapes

ROOT = Path(__file__).resolve().parents[1]
SR = 22050
# The study's SoundNet8_pytorch.define_module(): (in, out, kernel, stride, padding, pool after)
STUDY_LAYERS = {"conv1": (1, 16, 64, 2, 32, 8), "conv2": (16, 32, 32, 2, 16, 8), "conv3": (32, 64, 16, 2, 8, 1),
                "conv4": (64, 128, 8, 2, 4, 1), "conv5": (128, 256, 4, 2, 2, 4), "conv6": (256, 512, 4, 2, 2, 1),
                "conv7": (512, 1024, 4, 2, 2, 1)}


class StudySoundNet(nn.Module):
    """The study's SoundNet8_pytorch module structure (names and layers), forward to any layer."""

    def __init__(self):
        super().__init__()
        for name, (cin, cout, k, s, p, _) in STUDY_LAYERS.items():
            setattr(self, name, nn.Sequential(nn.Conv2d(cin, cout, (k, 1), (s, 1), (p, 0), bias=True),
                                              nn.BatchNorm2d(cout), nn.ReLU(inplace=True)))
        self.conv8 = nn.Sequential(nn.Conv2d(1024, 1000, (8, 1), (2, 1), (0, 0), bias=True))
        self.conv8_2 = nn.Sequential(nn.Conv2d(1024, 401, (8, 1), (2, 1), (0, 0), bias=True))

    def forward(self, x: torch.Tensor, output: str) -> torch.Tensor:
        for name, (*_, pool) in STUDY_LAYERS.items():
            x = getattr(self, name)(x)
            if pool > 1:
                x = nn.functional.max_pool2d(x, (pool, 1), (pool, 1))
            if name == output:
                return x
        raise ValueError(output)


class StudyEncoding(nn.Module):
    """The study's SoundNetEncoding_conv: attribute names ``soundnet`` and ``encoding_fmri``."""

    def __init__(self, out_size: int, kernel_size: int):
        super().__init__()
        self.soundnet = StudySoundNet()
        self.encoding_fmri = nn.Conv2d(1024, out_size, kernel_size=(kernel_size, 1), padding=(kernel_size - 1, 0))


def study_model(out_size: int = 5, kernel_size: int = 3, seed: int = 0) -> StudyEncoding:
    """A study model with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = StudyEncoding(out_size, kernel_size)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
                module.num_batches_tracked.fill_(12345)
    return model.eval()


def save_as_study(model: StudyEncoding, path: Path, **overrides) -> Path:
    """convert_model.py's dict, written with torch.save."""
    data = {"out_size": model.encoding_fmri.out_channels, "output_layer": "conv7", "fmrihidden": 1000,
            "kernel_size": model.encoding_fmri.kernel_size[0], "power_transform": False,
            "checkpoint": model.state_dict()}
    data.update(overrides)
    torch.save(data, path)
    return path


NAME = "sub-03_friends_MIST_ROI_SoundNetEncoding_conv_0700515_5e-01_1e-04_1e-03_opt110_f_conv4_wbid1.pt"


@pytest.fixture
def study(tmp_path):
    model = study_model()
    return model, save_as_study(model, tmp_path / NAME)


def test_state_dict_names_are_the_studys(study):
    model, _ = study
    assert set(model.state_dict()) == set(study_tensor_shapes(5, "conv7", 3))
    assert model.state_dict()["soundnet.conv1.0.weight"].shape == (16, 1, 64, 1)


def test_imported_embeddings_equal_the_studys_own_forward(study, tmp_path):
    model, path = study
    out = import_study(path, tmp_path / "out.safetensors")
    hear = hear_brainsoundnet.load_model(str(out))
    rng = np.random.default_rng(0)
    n = int(2.3 * SR)
    audio = torch.from_numpy(0.3 * rng.standard_normal((2, n)).astype(np.float32))
    embeddings, timestamps = hear_brainsoundnet.get_timestamp_embeddings(audio, hear)
    scene = hear_brainsoundnet.get_scene_embeddings(audio, hear)
    # timestamp embeddings: the conv4 frames centred inside the clip (zero padding around it)
    selection = select_frames("conv4", n)
    padded = torch.zeros(2, selection.padded_length)
    padded[:, selection.pad_left:selection.pad_left + n] = audio  # unscaled, as the study fed it
    with torch.no_grad():
        conv4 = model.soundnet(padded.view(2, 1, -1, 1), "conv4")[..., 0][..., selection.first:selection.stop]
        # scene embeddings: the mean of every conv7 frame of the clip
        conv7 = model.soundnet(audio.view(2, 1, -1, 1), "conv7")[..., 0].mean(dim=2)
    for ours, reference in ((embeddings.transpose(1, 2), conv4), (scene, conv7)):
        assert ours.shape == reference.shape
        assert float(reference.abs().max()) > 0.1
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    assert timestamps.shape == embeddings.shape[:2]


def test_checkpoint_config_and_provenance(study, tmp_path):
    _, path = study
    out = import_study(path, tmp_path / "out.safetensors")
    config = read_config(out)
    assert config["input_scale"] == 1.0 and config["heads"] == ["conv8", "conv8_2"]
    provenance = config["provenance"]
    assert provenance["source_file"] == NAME and provenance["source_sha256"] == sha256_file(path)
    assert provenance["study_fields"] == {"out_size": 5, "output_layer": "conv7", "fmrihidden": 1000,
                                          "kernel_size": 3, "power_transform": False}
    assert provenance["subjects"] == ["sub-03"] and provenance["condition"] == "conv4"
    head = config["extra"]["brain_head"]
    assert head["kernel_trs"] == 4 and head["subjects"] == ["sub-03"] and len(head["targets"]["sub-03"]) == 5
    checkpoint = load_checkpoint(out)
    assert checkpoint.model.blocks["conv3"].bn.num_batches_tracked.item() == 12345


def test_brain_head_reproduces_the_studys_head(study, tmp_path):
    """On the same conv7 frames, the imported head gives the study's encoding_fmri output for the
    same TR when this project's column for TR t holds study frame t + 1 (the study's frame of TR t
    is this project's frame of TR t - 1: see the alignment in the module docstring)."""
    from training.model import EncodingModel

    model, path = study
    out = import_study(path, tmp_path / "out.safetensors")
    encoding = EncodingModel.from_pretrained(out)
    head = read_config(out)["extra"]["brain_head"]
    k, n = 3, 12
    torch.manual_seed(1)
    emb = torch.rand(1024, n + 1)  # study frames 0..n
    with torch.no_grad():
        study_out = model.encoding_fmri(emb[None, :, :, None])[0, :, :n, 0].T  # (TRs, targets), cropped as the study did
        columns = torch.zeros(1, 1024, k + n)  # kernel k + 1: k context columns, then n TRs
        columns[0, :, k - 1:] = emb  # column of TR u holds study frame u + 1; TR -1 holds frame 0
        valid = torch.zeros(1, k + n, dtype=torch.bool)
        valid[0, k - 1:] = True
        ours = encoding.head("sub-03", columns, valid)[0]
    assert ours.shape == (n, 5)
    torch.testing.assert_close(ours, study_out, rtol=1e-5, atol=1e-5)
    assert head["tr"] == encoding.tr == 1.49 and encoding.kernel_trs == 4


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the raw pickle below, on purpose
def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    model = study_model()
    path = tmp_path / "sub-01_evil.pt"
    torch.save({"out_size": 5, "output_layer": "conv7", "fmrihidden": 1000, "kernel_size": 3,
                "power_transform": False, "checkpoint": model.state_dict(), "x": Exploit()}, path)
    with pytest.raises(StudyImportError, match="refused: the file holds Python objects") as error:
        import_study(path, tmp_path / "out.safetensors")
    assert str(path) in str(error.value)
    raw = tmp_path / "sub-01_raw.pt"
    raw.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(StudyImportError, match=str(raw)):
        import_study(raw, tmp_path / "out.safetensors")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_the_studys_raw_training_file_is_refused(tmp_path):
    """Its training script saved {'model': <the module>, 'net': state dict, ...}: a pickled class."""
    model = study_model()
    path = tmp_path / "sub-01_training.pt"
    torch.save({"model": model, "net": model.state_dict(), "hyperparameters": {"kernel_size": 3}}, path)
    with pytest.raises(StudyImportError, match="convert_model.py"):
        import_study(path, tmp_path / "out.safetensors")


def _edited(tmp_path, edit, **overrides) -> Path:
    model = study_model()
    state = model.state_dict()
    edit(state)
    data = {"out_size": 5, "output_layer": "conv7", "fmrihidden": 1000, "kernel_size": 3,
            "power_transform": False, "checkpoint": state, **overrides}
    path = tmp_path / "sub-01_bad.pt"
    torch.save(data, path)
    return path


@pytest.mark.parametrize("edit, overrides, message", [
    (lambda s: s.pop("soundnet.conv5.1.running_var"), {}, r"missing \['soundnet.conv5.1.running_var'\]"),
    (lambda s: s.update(maskattention=torch.zeros(5, 3)), {}, r"unexpected \['maskattention'\]"),
    (lambda s: s.update({"soundnet.conv2.0.weight": torch.zeros(32, 16, 16, 1)}), {},
     r"'soundnet.conv2.0.weight' has shape \(32, 16, 16, 1\), the study's model needs \(32, 16, 32, 1\)"),
    (lambda s: None, {"kernel_size": 5}, r"'encoding_fmri.weight' has shape \(5, 1024, 3, 1\).*\(5, 1024, 5, 1\)"),
    (lambda s: s["encoding_fmri.bias"].__setitem__(0, float("nan")), {}, "'encoding_fmri.bias' contains NaN"),
    (lambda s: s.update({"soundnet.conv1.0.bias": s["soundnet.conv1.0.bias"].double()}), {},
     "'soundnet.conv1.0.bias' is torch.float64"),
    (lambda s: None, {"power_transform": True}, "power_transform.*--backbone-only"),
    (lambda s: None, {"out_size": "210"}, "field 'out_size' is '210', expected int"),
    (lambda s: None, {"extra_field": 1}, r"unexpected field\(s\) \['extra_field'\]"),
])
def test_bad_files_are_refused_naming_the_tensor(tmp_path, edit, overrides, message):
    path = _edited(tmp_path, edit, **overrides)
    with pytest.raises(StudyImportError, match=message) as error:
        import_study(path, tmp_path / "out.safetensors")
    assert str(path) in str(error.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_backbone_only_and_a_missing_subject(tmp_path):
    path = save_as_study(study_model(), tmp_path / "model.pt", power_transform=True)
    out = import_study(path, tmp_path / "backbone.safetensors", backbone_only=True)
    assert read_config(out)["extra"] == {}
    assert not load_checkpoint(out).extra
    plain = save_as_study(study_model(), tmp_path / "model2.pt")
    with pytest.raises(StudyImportError, match="which subject"):
        import_study(plain, tmp_path / "x.safetensors")
    assert read_config(import_study(plain, tmp_path / "y.safetensors", subject="sub-02"))["provenance"]["subjects"] == ["sub-02"]


def test_names_from_the_studys_file_names():
    assert names_from_filename(NAME) == ("sub-03", "conv4")
    assert names_from_filename("sub-01_friends_MIST_ROI_SoundNetEncoding_conv_0700515_opt110_wbid2.pt") == ("sub-01", "head")
    assert names_from_filename("sub-05_x_SoundNetEncoding_conv_0600715_opt110_NoInit_wbid3.pt") == ("sub-05", "null")
    assert names_from_filename("weights.pt") == (None, None)
    # Fine-tuning from conv1 (or a pool) or from a random init is none of this project's conditions.
    assert names_from_filename("sub-01_x_SoundNetEncoding_conv_0700515_opt110_f_conv1_wbid1.pt") == ("sub-01", None)
    assert names_from_filename("sub-01_x_SoundNetEncoding_conv_0700515_opt110_f_pool2_wbid1.pt") == ("sub-01", None)
    assert names_from_filename("sub-01_x_SoundNetEncoding_conv_0700515_opt110_NoInit_f_conv4_wbid1.pt") == ("sub-01", None)
    assert names_from_filename("sub-02_x_SoundNetEncoding_conv_0700515_opt110_f_conv5_20220101.pt") == ("sub-02", "conv5")


def test_command_line(study, tmp_path):
    _, path = study
    out = tmp_path / "cli.safetensors"
    done = subprocess.run([sys.executable, "-m", "training.import_study", str(path), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == sha256_file(out)
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a torch file")
    done = subprocess.run([sys.executable, "-m", "training.import_study", str(bad), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "junk.pt: not a readable torch.save file" in done.stderr
    assert json.loads(json.dumps(read_config(out)))["provenance"]["imported_by"] == "training.import_study"
