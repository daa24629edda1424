"""Export to a HEAR checkpoint (loads in the plugin, passes hear-validator), model card, Hub publishing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import hear_brainsoundnet
from hear_brainsoundnet.checkpoints import CheckpointError, load_checkpoint
from hear_brainsoundnet.files import sha256_file
from hear_brainsoundnet.hub import DEFAULT_MANIFEST, ManifestError, fetch, load_manifest
from tests.fixtures_data import tiny_dataset  # noqa: F401  (session fixture)
from training.config import load_config
from training.data.loading import load_splits
from training.model import EncodingModel
from training.publish import ExportError, export, main, publish
from training.state import STATE_FORMAT
from training.train import train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_dataset):  # noqa: F811
    """A conv7 model trained for two epochs on the tiny synthetic dataset, and its config."""
    out = tmp_path_factory.mktemp("publish")
    config = load_config(None, [
        "data.source=synthetic", "data.synthetic_size=tiny", f"data.root={tiny_dataset.root}",
        f"data.cache_dir={out / 'cache'}", "model.condition=conv7", "model.kernel_trs=3",
        "train.window_trs=10", "train.lr=1e-4", "train.max_epochs=2", f"run.out_dir={out}",
        "run.name=conv7", "run.progress=false"])
    return train(config), config


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory: pytest.TempPathFactory):
    result, _ = trained
    return export(result.run_dir, tmp_path_factory.mktemp("export") / "conv7_sub_01")


def test_export_carries_backbone_heads_provenance_and_card(trained, exported) -> None:
    result, config = trained
    checkpoint = load_checkpoint(exported.checkpoint)
    assert exported.name == "conv7_sub_01" and exported.sha256 == sha256_file(exported.checkpoint)
    model = EncodingModel.from_pretrained(result.best_checkpoint)
    for key, value in checkpoint.model.state_dict().items():  # the best model's backbone
        assert torch.equal(value, model.backbone.state_dict()[key]), key
    assert sorted(checkpoint.extra) == ["head.sub-01.bias", "head.sub-01.input_mean",
                                        "head.sub-01.input_scale", "head.sub-01.weight"]
    head = checkpoint.config["extra"]["brain_head"]
    assert head["subjects"] == ["sub-01"] and head["kernel_trs"] == 3 and head["tr"] == 1.49
    assert head["targets"]["sub-01"] == result.target_names["sub-01"]
    provenance = checkpoint.provenance
    assert provenance["condition"] == "conv7" and provenance["subjects"] == ["sub-01"]
    assert provenance["seed"] == config.run.seed and provenance["synthetic_data"] is True
    assert provenance["metrics"]["best_val_loss_mse"] == pytest.approx(result.best_val_loss)
    assert provenance["training_config"] == config.to_dict()
    assert provenance["training_data"]["split"]["train"]  # which episodes it learnt from
    assert provenance["code_version"].startswith(hear_brainsoundnet.__version__)
    card = exported.card.read_text()
    assert "CC-BY-4.0" in card and "Demo model" in card and "conv7_sub_01" in card
    assert "Intended use" in card and "best_val_loss_mse" in card
    assert json.loads((exported.folder / "config.json").read_text())["provenance"]["condition"] == "conv7"
    assert provenance["training_status"] == {"finished": True, "stop_reason": "max_epochs",
                                             "epochs_completed": 2, "max_epochs": 2}
    added = {"name", "training_status", "licence", "curves"}  # all that export adds to the run's
    assert {k: v for k, v in provenance.items() if k not in added} == load_checkpoint(result.best_checkpoint).provenance
    assert "Unfinished run" not in card


def test_exported_heads_predict_like_the_trained_model(trained, exported) -> None:
    result, config = trained
    trained_model = EncodingModel.from_pretrained(result.best_checkpoint)
    brain_model = EncodingModel.from_pretrained(exported.folder)
    episode = load_splits(config).test[0]
    n_trs = episode.targets["sub-01"].shape[0]
    a = trained_model.predict_run(episode.waveform, n_trs, "sub-01")
    b = brain_model.predict_run(episode.waveform, n_trs, "sub-01")
    assert np.array_equal(a, b)  # the same tensors: export only adds provenance and the card
    assert a.shape == (n_trs, len(brain_model.target_names["sub-01"])) and np.abs(a).max() > 0
    assert brain_model.tr == 1.49 and brain_model.provenance["name"] == exported.name


def test_the_hear_plugin_gives_a_runs_best_model_the_embeddings_of_its_export(trained, exported) -> None:
    """A run's best.safetensors is a HEAR checkpoint: hear_brainsoundnet.load_model serves it
    as it is, with the embeddings of the exported checkpoint."""
    best = load_checkpoint(trained[0].best_checkpoint)
    published = load_checkpoint(exported.checkpoint)
    for key, value in best.model.state_dict().items():
        assert torch.equal(value, published.model.state_dict()[key]), key
    assert best.extra.keys() == published.extra.keys()
    assert all(torch.equal(best.extra[key], published.extra[key]) for key in best.extra)
    audio = torch.rand(2, 3 * 22050, generator=torch.Generator().manual_seed(0)) * 2 - 1
    from_run = hear_brainsoundnet.load_model(str(trained[0].best_checkpoint))
    from_export = hear_brainsoundnet.load_model(str(exported.checkpoint))
    scene = hear_brainsoundnet.get_scene_embeddings(audio, from_run)
    assert torch.equal(scene, hear_brainsoundnet.get_scene_embeddings(audio, from_export))
    frames, timestamps = hear_brainsoundnet.get_timestamp_embeddings(audio, from_run)
    frames_export, timestamps_export = hear_brainsoundnet.get_timestamp_embeddings(audio, from_export)
    assert torch.equal(frames, frames_export) and torch.equal(timestamps, timestamps_export)
    assert scene.abs().max() > 0 and frames.shape[:2] == timestamps.shape


def test_the_hear_plugin_loads_the_export(exported) -> None:
    model = hear_brainsoundnet.load_model(str(exported.checkpoint))
    audio = torch.rand(2, 3 * 22050) * 2 - 1
    scene = hear_brainsoundnet.get_scene_embeddings(audio, model)
    frames, timestamps = hear_brainsoundnet.get_timestamp_embeddings(audio, model)
    assert scene.shape == (2, model.scene_embedding_size) and torch.isfinite(scene).all()
    assert frames.shape[:2] == timestamps.shape and torch.isfinite(frames).all()


@pytest.mark.timeout(600)
def test_hear_validator_passes_on_the_export(exported) -> None:
    validator = shutil.which("hear-validator") or str(Path(sys.executable).parent / "hear-validator")
    done = subprocess.run([validator, "hear_brainsoundnet", "-m", str(exported.checkpoint)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Looks good!" in done.stdout


def test_publish_uploads_and_pins_the_commit_in_a_manifest(exported, hub_server, tmp_path) -> None:
    manifest = tmp_path / "manifest.json"
    shipped = DEFAULT_MANIFEST.read_bytes() if DEFAULT_MANIFEST.is_file() else None
    done = publish(exported.folder, "brainsoundnet/conv7-sub-01", name=exported.name, manifest=manifest,
                   endpoint=hub_server.url, token="test-token")
    assert done.revision == hub_server.head("brainsoundnet/conv7-sub-01")
    assert done.sha256 == exported.sha256
    assert hub_server.file("brainsoundnet/conv7-sub-01", "model.safetensors", done.revision) == \
        exported.checkpoint.read_bytes()
    assert "README.md" in hub_server.repos["brainsoundnet/conv7-sub-01"].commits[done.revision].files
    entry = load_manifest(manifest)[exported.name]
    assert (entry.repo_id, entry.revision, entry.sha256, entry.licence) == \
        ("brainsoundnet/conv7-sub-01", done.revision, exported.sha256, "CC-BY-4.0")
    # the recorded entry resolves through the real download path, sha256-checked
    assert fetch(entry, endpoint=hub_server.url).read_bytes() == exported.checkpoint.read_bytes()
    # publishing unchanged files makes no new commit; a second entry keeps the first one
    again = publish(exported.folder, "brainsoundnet/conv7-sub-01", name="conv7_copy", manifest=manifest,
                    endpoint=hub_server.url, token="test-token")
    assert again.revision == done.revision and len(hub_server.commits("brainsoundnet/conv7-sub-01")) == 2
    assert sorted(load_manifest(manifest)) == ["conv7_copy", exported.name]
    assert (DEFAULT_MANIFEST.read_bytes() if DEFAULT_MANIFEST.is_file() else None) == shipped


def test_bad_exports_and_uploads_are_refused(tmp_path, trained, exported, hub_server, capsys) -> None:
    with pytest.raises(FileNotFoundError, match="no best model"):
        export(tmp_path, tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(exported.checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="broken/model.safetensors: truncated"):
        publish(broken, "brainsoundnet/x", name="x", manifest=tmp_path / "m.json", endpoint=hub_server.url)
    assert not (tmp_path / "m.json").exists() and "brainsoundnet/x" not in hub_server.repos
    assert main(["export", str(tmp_path), str(tmp_path / "out2")]) == 2
    assert "no best model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must match"):
        export(trained[0].run_dir, tmp_path / "out3", name="Bad-Name")


# ---- refusals: unfinished runs, bad destinations, bad publications -----------------------------

def unfinished_copy(run_dir: Path, dest: Path) -> Path:
    """A copy of a finished run made to look killed after its first of two epochs: what its
    last.safetensors would hold (no stop reason, epoch 1)."""
    shutil.copytree(run_dir, dest)
    last = dest / "last.safetensors"
    with safe_open(str(last), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        state = json.loads(handle.metadata()[STATE_FORMAT])
    state["progress"].update(finished=None, epoch=1)
    save_file(tensors, last, metadata={STATE_FORMAT: json.dumps(state)})
    return dest


def test_unfinished_runs_export_only_when_asked(trained, tmp_path, capsys) -> None:
    run = unfinished_copy(trained[0].run_dir, tmp_path / "killed")
    with pytest.raises(ExportError, match=r"killed/best.safetensors: the run has not finished: it stopped "
                                          r"after 1 of at most 2 epochs .*--allow-unfinished"):
        export(run, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert main(["export", str(run), str(tmp_path / "refused")]) == 2
    assert "the run has not finished" in capsys.readouterr().err
    done = export(run, tmp_path / "asked", allow_unfinished=True)
    status = load_checkpoint(done.checkpoint).provenance["training_status"]
    assert status == {"finished": False, "stop_reason": None, "epochs_completed": 1, "max_epochs": 2}
    card = done.card.read_text()
    assert "**Unfinished run**: exported at the user's request before training ended (1 of at most 2 epochs)" in card
    assert main(["export", str(run), str(tmp_path / "cli"), "--allow-unfinished"]) == 0
    assert load_checkpoint(tmp_path / "cli" / "model.safetensors").provenance["training_status"] == status


def test_a_lone_best_model_cannot_prove_it_finished(trained, tmp_path) -> None:
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(trained[0].best_checkpoint, lone / "best.safetensors")
    with pytest.raises(ExportError, match=r"there is no readable .*lone/last.safetensors to tell whether it finished"):
        export(lone / "best.safetensors", tmp_path / "out")
    assert export(lone / "best.safetensors", tmp_path / "out", allow_unfinished=True).checkpoint.is_file()


def test_export_to_a_file_is_refused_before_writing(trained, tmp_path, capsys) -> None:
    target = tmp_path / "taken"
    target.write_text("not a folder")
    with pytest.raises(ExportError, match=r"taken: exists and is not a folder; export writes a folder"):
        export(trained[0].run_dir, target)
    with pytest.raises(ExportError, match=r"taken/sub: cannot create the export folder"):
        export(trained[0].run_dir, target / "sub")
    assert target.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert main(["export", str(trained[0].run_dir), str(target)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def _corrupt_manifest(tmp_path: Path) -> Path:
    (tmp_path / "corrupt.json").write_text("{not json")
    return tmp_path / "corrupt.json"


@pytest.mark.parametrize("change, error, message", [
    ({"name": "Bad-Name"}, ExportError, "name 'Bad-Name' must match"),
    ({"name": "pretrained"}, ManifestError, "the name 'pretrained' is reserved"),
    ({"repo_id": "no-slash"}, ManifestError, "repo_id must look like 'org/name', got 'no-slash'"),
    ({"repo_id": "brainsoundnet/a--b"}, ManifestError, "repo_id 'brainsoundnet/a--b' is refused by huggingface_hub"),
    ({"manifest": lambda tmp: tmp}, ExportError, "the manifest path is not a file"),
    ({"manifest": lambda tmp: tmp / "absent" / "m.json"}, ExportError, "its folder .*absent does not exist"),
    ({"manifest": _corrupt_manifest}, ManifestError, "corrupt.json: not valid JSON"),
    ({"folder": lambda tmp: tmp / "no-export"}, FileNotFoundError, "no-export: no such export folder"),
])
def test_publish_checks_everything_before_the_first_request(exported, hub_server, tmp_path, change,
                                                             error, message) -> None:
    """Before: a bad name created the repository and pushed two commits, then failed."""
    arguments = {"folder": exported.folder, "repo_id": "brainsoundnet/checked", "name": "checked",
                 "manifest": tmp_path / "m.json"}
    arguments.update({key: value(tmp_path) if callable(value) else value for key, value in change.items()})
    folder, repo_id = arguments.pop("folder"), arguments.pop("repo_id")
    with pytest.raises(error, match=message):
        publish(folder, repo_id, endpoint=hub_server.url, token="test-token", **arguments)
    assert hub_server.requests == [] and hub_server.repos == {}
    assert not (tmp_path / "m.json").exists()
