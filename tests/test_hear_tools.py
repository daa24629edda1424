"""The real HEAR tools on our plugins, as subprocesses, the way users run them.

- ``hear-validator`` prints "Looks good!" for the default module, for every entry of the shipped
  manifest, for an entry published to the local hub (downloaded through huggingface_hub), and
  for a checkpoint file given with ``-m``.
- heareval's embeddings and predictions runners (through ``training.heareval_compat``) complete
  on generated scene, k-fold and event tasks for the pretrained checkpoint, with scores far
  above chance; on the event task the predicted onsets line up with the events the task placed.
"""
import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hear_brainsoundnet.checkpoints import load_checkpoint, pretrained_checkpoint, save_checkpoint

from hear_brainsoundnet.files import sha256_file
from hear_brainsoundnet.hub import (CHECKPOINT_FILENAME, DEFAULT_MANIFEST, HubCheckpoint, ManifestEntry,
                                    available_checkpoints, write_manifest)
from hear_brainsoundnet.soundnet import SoundNet8
from training.hear_tasks import event_task, kfold_task, scene_task

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SR = 22050
CONV4_HOP_MS = 1000 * 1024 / SR
# Small predictors that train in seconds yet converge: heareval's "faster" grid stops too early
# for scores to mean anything, its default grid takes minutes per task.
GRID = {"hidden_layers": [1], "hidden_dim": [256], "lr": [1e-3], "patience": [10],
        "max_epochs": [60], "check_val_every_n_epoch": [3], "batch_size": [16]}
EVENT_GRID = dict(GRID, batch_size=[256])
POSTPROCESSING = {"median_filter_ms": [150], "min_duration": [100]}


def tool_env() -> dict[str, str]:
    env = dict(os.environ)  # includes the hub fixture's HF_ENDPOINT / HF_HUB_CACHE when used
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def run(command: list, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=tool_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, command))} failed ({result.returncode}):\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def validate(module: str, cwd: Path, *args: str) -> str:
    out = run([BIN / "hear-validator", module, *args], cwd).stdout
    assert out.rstrip().endswith("Looks good!"), out[-2000:]
    return out


# ---- hear-validator ------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["hear_brainsoundnet"] + [
    f"hear_brainsoundnet.models.{name}" for name in available_checkpoints(DEFAULT_MANIFEST)])
def test_validator_passes_default_module_and_every_shipped_entry(module, tmp_path):
    out = validate(module, tmp_path)
    assert "Model sample rate is: 22050" in out and "Min timestamp 34.0362" in out
    assert "Received embedding of shape: (4, 1024)" in out


def test_validator_and_embeddings_runner_on_a_published_entry_and_a_file(hub_server, tmp_path, monkeypatch):
    network = SoundNet8()
    network.load_state_dict(load_checkpoint(pretrained_checkpoint()).model.state_dict(), strict=False)
    path = save_checkpoint(tmp_path / "sub01.safetensors", network, provenance={"condition": "test"})
    commit = HubCheckpoint(load_checkpoint(path)).push_to_hub("brain-org/sub01-conv4").oid
    manifest = write_manifest(tmp_path / "manifest.json", [ManifestEntry(
        name="published_sub01", description="test entry", source="hub", repo_id="brain-org/sub01-conv4",
        filename=CHECKPOINT_FILENAME, revision=commit, sha256=sha256_file(path), licence="CC-BY-4.0",
        card="README.md of the repo", training={"condition": "test"})])
    monkeypatch.setenv("HEAR_BRAINSOUNDNET_MANIFEST", str(manifest))  # the subprocesses' manifest
    validate("hear_brainsoundnet.models.published_sub01", tmp_path)
    assert hub_server.count("GET", f"/brain-org/sub01-conv4/resolve/{commit}/{CHECKPOINT_FILENAME}") == 1
    validate("hear_brainsoundnet", tmp_path, "-m", str(path))
    tasks = tmp_path / "tasks"
    scene_task(tasks, per_class=1)
    run([sys.executable, "-m", "training.heareval_compat", "embeddings", "hear_brainsoundnet",
         "--model", path, "--tasks-dir", tasks, "--embeddings-dir", tmp_path / "emb"], tmp_path)
    assert (tmp_path / "emb" / "hear_brainsoundnet" / "synth_scene-v1-full" / ".done.embeddings").is_file()


# ---- heareval runners ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def heareval_run(tmp_path_factory):
    """Embeddings (one runner call) and predictions (one runner call) for three tasks."""
    work = tmp_path_factory.mktemp("heareval")
    tasks = work / "tasks"
    names = [scene_task(tasks, param_grid=GRID).name, kfold_task(tasks, param_grid=GRID).name,
             event_task(tasks, param_grid=EVENT_GRID, postprocessing_grid=POSTPROCESSING).name]
    run([sys.executable, "-m", "training.heareval_compat", "embeddings", "hear_brainsoundnet",
         "--tasks-dir", tasks, "--embeddings-dir", work / "embeddings"], work)
    out = work / "embeddings" / "hear_brainsoundnet"
    run([sys.executable, "-m", "training.heareval_compat", "predictions",
         *[out / name for name in names], "--grid-points", "1"], work)
    return {name.split("-")[0]: out / name for name in names}


def scores(task_dir: Path) -> dict:
    return json.loads((task_dir / "test.predicted-scores.json").read_text())


def test_embeddings_runner_output(heareval_run):
    for task_dir in heareval_run.values():
        assert (task_dir / ".done.embeddings").is_file() and (task_dir / "prediction-done.json").is_file()
    scene = heareval_run["synth_scene"]
    n_test = len(json.loads((scene / "test.json").read_text()))
    assert json.loads((scene / "test.embedding-dimensions.json").read_text()) == [n_test, 1024]
    events = heareval_run["synth_events"]
    n_frames, dim = json.loads((events / "test.embedding-dimensions.json").read_text())
    assert dim == 128 and n_frames == 8 * 86  # 8 clips of 4 s: conv4 frames centred inside
    timestamps = json.loads((events / "test" / "test_000.wav.timestamps.json").read_text())
    expected = 1000 * (-273.5 + 1024 * np.arange(1, 87)) / SR
    np.testing.assert_allclose(timestamps, expected, atol=1e-3)


def test_scene_and_kfold_scores_are_far_above_chance(heareval_run):
    assert scores(heareval_run["synth_scene"])["test"]["test_top1_acc"] >= 0.8  # chance 0.25
    kfold = scores(heareval_run["synth_kfold"])
    assert sorted(key for key in kfold if key.startswith("fold")) == ["fold00", "fold01", "fold02"]
    assert kfold["aggregated_scores"]["test_top1_acc_mean"] >= 0.8  # chance 0.33


def test_event_onsets_line_up_with_the_placed_events(heareval_run):
    from heareval.score import available_scores

    task = heareval_run["synth_events"]
    model_f = scores(task)["test"]["test_event_onset_200ms_fms"]
    with open(task / "test.predictions.pkl", "rb") as handle:  # written by heareval in this test
        predictions = pickle.load(handle)
    predicted, targets = predictions["predicted_events"], predictions["target_events"]
    labels = {"beep": 0, "burst": 1}
    f200 = available_scores["event_onset_200ms_fms"](label_to_idx=labels)
    # Chance: the same predicted events, each scored against another clip's events.
    files = sorted(targets)
    rotated = {name: predicted.get(files[(i + 1) % len(files)], []) for i, name in enumerate(files)}
    chance = f200(rotated, targets)[0][1]
    assert model_f >= 0.8 and chance <= 0.4 and model_f - chance >= 0.5, (model_f, chance)
    # Alignment: each placed onset is matched by a predicted onset of the same label; heareval
    # labels a frame by its centre, so a predicted onset lags the true one by under one hop
    # (half a hop on average). Wrong timestamps (a drifting hop, a missing offset) would not.
    errors = []
    for name, events in targets.items():
        for event in events:
            onsets = [p["start"] for p in predicted.get(name, []) if p["label"] == event["label"]]
            if onsets:
                errors.append(min(onsets, key=lambda onset: abs(onset - event["start"])) - event["start"])
    assert len(errors) >= 0.9 * sum(len(events) for events in targets.values())
    assert -CONV4_HOP_MS / 2 <= np.median(errors) <= CONV4_HOP_MS, errors
    assert np.mean(np.abs(errors) <= 2 * CONV4_HOP_MS) >= 0.8, errors


# ---- integer-labelled tasks (hear-preprocess's numeric labels), end to end --------------------------

def test_hear_eval_scores_every_integer_labelled_task(tmp_path):
    """``python -m training hear-eval`` on tasks labelled with JSON integers (scene multiclass,
    multilabel, k-fold, events) exits 0 and scores every task, above chance where it is known."""
    from training.hear_tasks import numeric_label_tasks

    tasks = tmp_path / "tasks"
    names = [p.name for p in numeric_label_tasks(tasks, param_grid=GRID, event_param_grid=EVENT_GRID,
                                                 postprocessing_grid=POSTPROCESSING)]
    out = tmp_path / "hear"
    result = run([sys.executable, "-m", "training", "hear-eval", "pretrained", "--tasks-dir", tasks,
                  "--out", out, "--grid-points", "1"], ROOT, timeout=1500)
    assert "skipped" not in result.stderr.lower()
    status = json.loads((out / "hear_status.json").read_text())
    assert status["task_problems"] == {} and status["checkpoints"][0]["status"] == "ok"
    assert sorted(status["checkpoints"][0]["tasks_done"]) == sorted(names)
    table = {row["task"]: row for row in csv.DictReader(open(out / "hear_scores.csv")) if row["primary"] == "True"}
    assert sorted(table) == ["synth_count_int", "synth_events_int", "synth_mixture_int", "synth_pitch_int"]
    values = {task: float(row["value"]) for task, row in table.items()}
    assert {row["metric"] for row in table.values()} == {"top1_acc", "event_onset_200ms_fms", "mAP", "pitch_acc"}
    assert values["synth_count_int"] >= 0.6, values  # 3 classes: chance 0.33
    assert values["synth_pitch_int"] >= 0.25, values  # 12 pitches: chance 0.08
    assert values["synth_events_int"] >= 0.5, values
    assert values["synth_mixture_int"] >= 0.6, values  # mAP of random scores: about the label rate
    print(values)


# ---- the task generator and the compatibility shim -------------------------------------------------

def test_generated_tasks_follow_the_hear_format_and_are_reproducible(tmp_path):
    import soundfile as sf

    from training.hear_tasks import make_tasks, pitch_task

    paths = make_tasks(tmp_path / "a", seed=4)
    again = make_tasks(tmp_path / "b", seed=4)
    for path, twin in zip(paths, again):
        meta = json.loads((path / "task_metadata.json").read_text())
        assert path.name == f"{meta['task_name']}-v1-full"
        vocabulary = (path / "labelvocabulary.csv").read_text().splitlines()
        assert vocabulary[0] == "idx,label"
        labels = [line.split(",", 1)[1] for line in vocabulary[1:]]
        assert [int(line.split(",")[0]) for line in vocabulary[1:]] == list(range(len(labels)))
        assert len(meta["splits"]) >= 3
        for split in meta["splits"]:
            clips = json.loads((path / f"{split}.json").read_text())
            assert clips == json.loads((twin / f"{split}.json").read_text())
            for name, label in clips.items():
                info = sf.info(path / "22050" / split / name)
                assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")
                assert info.frames == round(meta["sample_duration"] * SR)
                if meta["embedding_type"] == "scene":
                    assert len(label) == 1 and label[0] in labels
                else:
                    spans = sorted((e["start"], e["end"]) for e in label)
                    assert all(e["label"] in labels for e in label)
                    assert all(0 < s < e < 1000 * meta["sample_duration"] for s, e in spans)
                    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
            name = next(iter(clips))
            assert ((path / "22050" / split / name).read_bytes()
                    == (twin / "22050" / split / name).read_bytes())
    assert [json.loads((p / "task_metadata.json").read_text())["split_mode"] for p in paths] == \
        ["trainvaltest", "new_split_kfold", "trainvaltest", "trainvaltest"]
    pitch = (paths[2] / "labelvocabulary.csv").read_text().splitlines()[1:]
    assert pitch == [f"{i},{60 + i}" for i in range(12)]  # idx % 12 is the chroma
    with pytest.raises(FileExistsError, match="synth_pitch-v1-full: task folder exists"):
        pitch_task(tmp_path / "a")
    with pytest.raises(ValueError, match="at least 3 folds"):
        kfold_task(tmp_path / "c", n_folds=2)


def test_compat_shim_gives_lightning_a_settable_epoch(monkeypatch):
    import pytorch_lightning as pl

    from training.heareval_compat import apply_patches, command

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0")  # restored after the test
    apply_patches()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit_loop.current_epoch = 7  # what heareval does before testing an event model
    assert trainer.current_epoch == 7
    assert command("predictions", ["a", 3])[-4:] == ["training.heareval_compat", "predictions", "a", "3"]
    with pytest.raises(ValueError, match="unknown heareval runner 'score'"):
        command("score", [])
