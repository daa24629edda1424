"""HEAR evaluation across checkpoints: task validation, aggregation of real heareval output, and
real runner runs with a malformed task, a broken checkpoint and an interrupted run."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from training import hear_eval, hear_scores, hear_task_validation, hear_tasks
from training.evaluate import read_table
from training.hear_eval import CheckpointSpec
from training.hear_task_validation import TaskError

FIXTURE = Path(__file__).parent / "data" / "heareval_output"
ROOT = Path(__file__).resolve().parent.parent
KNOWN = ("top1_acc", "pitch_acc", "chroma_acc", "event_onset_200ms_fms", "event_onset_50ms_fms",
         "segment_1s_er", "mAP")
# A small predictor grid: heareval's default grid trains for up to 500 epochs per point.
GRID = {"hidden_layers": [1], "hidden_dim": [64], "max_epochs": [20], "patience": [5],
        "check_val_every_n_epoch": [1], "lr": [1e-3]}


def _scores(label: str, task: str) -> dict:
    return json.loads((FIXTURE / label / "hear_brainsoundnet" / task / hear_scores.SCORES_FILE).read_text())


# ----------------------------------------------------------------------------------------------
# Aggregation of real heareval output (tests/data/heareval_output, see its README)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def collected():
    runs = {label: FIXTURE / label for label in ("pretrained", "perturbed")}
    return hear_scores.collect_scores(runs)


def test_collect_reads_every_task_and_checkpoint(collected):
    primary = collected[collected["primary"]]
    assert sorted(primary["task"].unique()) == ["synth_events", "synth_kfold", "synth_pitch", "synth_scene"]
    assert sorted(primary["checkpoint"].unique()) == ["perturbed", "pretrained"]
    assert len(primary) == 8
    # The primary score is the first of each task's evaluation list.
    assert dict(zip(primary["task"], primary["metric"])) == {
        "synth_events": "event_onset_200ms_fms", "synth_kfold": "top1_acc",
        "synth_pitch": "pitch_acc", "synth_scene": "top1_acc"}


def test_trainvaltest_values_are_the_test_entry(collected):
    raw = _scores("pretrained", "synth_events-v1-full")["test"]
    rows = collected[(collected["checkpoint"] == "pretrained") & (collected["task"] == "synth_events")]
    values = dict(zip(rows["metric"], rows["value"]))
    assert values["event_onset_200ms_fms"] == raw["test_event_onset_200ms_fms"]
    assert values["segment_1s_er"] == raw["test_segment_1s_er"]
    assert values["event_onset_50ms_fms_precision"] == raw["test_event_onset_50ms_fms_precision"]
    assert rows["n_folds"].eq(1).all() and rows["std"].isna().all()
    lower = set(rows.loc[~rows["higher_is_better"], "metric"])
    assert {"segment_1s_er", "loss"} <= lower


def test_kfold_values_are_the_aggregated_mean_and_std(collected):
    raw = _scores("perturbed", "synth_kfold-v1-full")
    folds = [raw[k]["test_top1_acc"] for k in ("fold00", "fold01", "fold02")]
    row = collected[(collected["checkpoint"] == "perturbed") & (collected["task"] == "synth_kfold")
                    & collected["primary"]].iloc[0]
    assert row["value"] == raw["aggregated_scores"]["test_top1_acc_mean"]
    assert row["value"] == pytest.approx(np.mean(folds))
    assert row["std"] == pytest.approx(np.std(folds, ddof=1))  # pandas' std over folds
    assert row["n_folds"] == 3


def test_tables_and_chart(collected, tmp_path):
    files = hear_scores.write_tables(collected, tmp_path)
    markdown = files["md"].read_text()
    kfold = _scores("pretrained", "synth_kfold-v1-full")["aggregated_scores"]
    assert f"{kfold['test_top1_acc_mean']:.3f} ± {kfold['test_top1_acc_std']:.3f}" in markdown
    header = markdown.splitlines()[0]
    assert header.index("pretrained") < header.index("perturbed")  # checkpoints in given order
    table = hear_scores.primary_table(collected)
    assert table.shape == (4, 4)  # task, metric, two checkpoints
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = read_table(files["csv"])
    assert len(again) == len(collected)


def test_infinity_and_unfinished_tasks(tmp_path):
    """heareval writes bare ``Infinity`` (Python's json) for some scores; a task without
    ``prediction-done.json`` (interrupted) is not collected."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "pretrained", run)
    task = run / "hear_brainsoundnet" / "synth_scene-v1-full"
    text = (task / hear_scores.SCORES_FILE).read_text()
    raw = json.loads(text)
    raw["test"]["test_loss"] = math.inf
    (task / hear_scores.SCORES_FILE).write_text(json.dumps(raw, indent=4))
    assert "Infinity" in (task / hear_scores.SCORES_FILE).read_text()
    (run / "hear_brainsoundnet" / "synth_pitch-v1-full" / hear_scores.PREDICTION_DONE).unlink()
    scores = hear_scores.collect_scores({"x": run})
    assert "synth_pitch" not in set(scores["task"])
    loss = scores[(scores["task"] == "synth_scene") & (scores["metric"] == "loss")]["value"].item()
    assert loss == math.inf


def test_unreadable_scores_name_the_file(tmp_path):
    task = tmp_path / "m" / "t"
    task.mkdir(parents=True)
    (task / hear_scores.SCORES_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"t/test.predicted-scores.json: unreadable"):
        hear_scores.read_scores(task)


# ----------------------------------------------------------------------------------------------
# Task validation
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def scene(tmp_path) -> Path:
    return hear_tasks.scene_task(tmp_path / "tasks", per_class=2, duration=0.5)


def _edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def test_a_generated_task_is_valid(scene):
    info = hear_task_validation.validate_task(scene, known_scores=KNOWN)
    assert info.name == "synth_scene-v1-full" and info.primary_score == "top1_acc"
    assert info.splits == ("train", "valid", "test")


def test_test_set_sizes_count_the_test_clips(tmp_path):
    tasks = tmp_path / "tasks"
    hear_tasks.scene_task(tasks, per_class=2, duration=0.5)  # 4 classes x 1 test clip
    hear_tasks.kfold_task(tasks, per_class=3, duration=0.5)  # 3 folds of 3 classes x 3 clips
    hear_tasks.pitch_task(tasks, per_pitch=2, duration=0.5)  # 12 pitches x 1 test clip
    infos, problems = hear_task_validation.scan_tasks(tasks)
    assert not problems
    assert hear_task_validation.test_set_sizes(infos) == {"synth_kfold": (9, 9, 9), "synth_pitch": (12,), "synth_scene": (4,)}
    # pre-split folds count the same way
    _edit_json(tasks / "synth_kfold-v1-full" / "task_metadata.json", lambda m: m.update(split_mode="presplit_kfold"))
    infos, problems = hear_task_validation.scan_tasks(tasks)
    assert not problems and hear_task_validation.test_set_sizes(infos)["synth_kfold"] == (9, 9, 9)


@pytest.mark.parametrize("breakage, message", [
    (lambda t: (t / "task_metadata.json").unlink(), "missing task_metadata.json"),
    (lambda t: (t / "task_metadata.json").write_text("{"), "task_metadata.json is not valid JSON"),
    (lambda t: _edit_json(t / "task_metadata.json", lambda m: m.pop("evaluation")), r"lacks \['evaluation'\]"),
    (lambda t: _edit_json(t / "task_metadata.json", lambda m: m.update(split_mode="random")),
     "unknown split_mode 'random'"),
    (lambda t: _edit_json(t / "task_metadata.json", lambda m: m.update(evaluation=["accuracy"])),
     r"unknown score\(s\) \['accuracy'\]"),
    (lambda t: (t / "labelvocabulary.csv").write_text("label,idx\ntone,0\n"), "header 'idx,label'"),
    (lambda t: _edit_json(t / "train.json", lambda m: m.update({next(iter(m)): ["dog"]})),
     r"train.json: .* label\(s\) \['dog'\] that are not in labelvocabulary.csv"),
    (lambda t: _edit_json(t / "test.json", lambda m: m.update({next(iter(m)): ["tone", "noise"]})),
     "test.json: labels of .* are malformed"),
    (lambda t: next((t / "22050" / "valid").iterdir()).unlink(), r"1 file\(s\) of valid.json missing"),
    (lambda t: shutil.rmtree(t / "22050"), "no audio folder"),
])
def test_malformed_task_errors_name_the_task_and_file(scene, breakage, message):
    breakage(scene)
    with pytest.raises(TaskError, match=message) as error:
        hear_task_validation.validate_task(scene, known_scores=KNOWN)
    assert "synth_scene-v1-full" in str(error.value)


# ---- numeric labels, as hear-preprocess writes them -----------------------------------------------

@pytest.fixture
def numeric_tasks(tmp_path) -> Path:
    tasks = tmp_path / "tasks"
    hear_tasks.numeric_label_tasks(tasks)
    return tasks


def test_integer_labelled_tasks_are_valid_and_match_heareval_lookup(numeric_tasks):
    import pandas as pd
    from heareval.score import label_vocab_as_dict

    infos, problems = hear_task_validation.scan_tasks(numeric_tasks)
    assert problems == {}
    assert [i.name for i in infos] == ["synth_count_int-v1-full", "synth_events_int-v1-full",
                                       "synth_mixture_int-v1-full", "synth_pitch_int-v1-full"]
    assert hear_task_validation.test_set_sizes(infos) == {"synth_count_int": (9, 9, 9), "synth_events_int": (8,),
                                               "synth_mixture_int": (6,), "synth_pitch_int": (12,)}
    pitch = numeric_tasks / "synth_pitch_int-v1-full"
    assert (pitch / "labelvocabulary.csv").read_text().splitlines()[:2] == ["idx,label", "0,60"]
    train = json.loads((pitch / "train.json").read_text())
    assert all(isinstance(v[0], int) for v in train.values()) and [60] in train.values()
    events = json.loads((numeric_tasks / "synth_events_int-v1-full" / "test.json").read_text())
    assert {e["label"] for es in events.values() for e in es} == {60, 67}
    # Every label resolves through heareval's own lookup (label_to_idx[str(label)]).
    for info in infos:
        label_to_idx = label_vocab_as_dict(pd.read_csv(info.path / "labelvocabulary.csv"), key="label", value="idx")
        for split in info.splits:
            for value in json.loads((info.path / f"{split}.json").read_text()).values():
                for label in value:
                    label = label["label"] if isinstance(label, dict) else label
                    assert isinstance(label, int) and str(label) in label_to_idx


@pytest.mark.parametrize("task, breakage, message", [
    # 60.0 is "60.0" as a string: heareval's label_to_idx["60.0"] would raise KeyError
    ("synth_pitch_int", lambda t: _edit_json(t / "test.json", lambda m: m.update({next(iter(m)): [60.0]})),
     r"test.json: .* label\(s\) \['60.0'\] that are not in labelvocabulary.csv \(compared as strings"),
    ("synth_pitch_int", lambda t: _edit_json(t / "train.json", lambda m: m.update({next(iter(m)): [None]})),
     "train.json: labels of .* are malformed"),
    ("synth_pitch_int", lambda t: _edit_json(t / "train.json", lambda m: m.update({next(iter(m)): [[60]]})),
     "train.json: labels of .* are malformed"),
    ("synth_mixture_int", lambda t: _edit_json(t / "valid.json", lambda m: m.update({next(iter(m)): [0, 9]})),
     r"valid.json: .* label\(s\) \['9'\] that are not in"),
    ("synth_events_int", lambda t: _edit_json(t / "test.json", lambda m: m[next(iter(m))][0].update(label=True)),
     "test.json: labels of .* are malformed"),
    # "060" and "60" are both the integer 60 to pandas, hence the same label to heareval
    ("synth_pitch_int", lambda t: (t / "labelvocabulary.csv").write_text(
        (t / "labelvocabulary.csv").read_text().replace("1,61", "1,060")), r"label\(s\) \['60'\] more than once"),
    ("synth_pitch_int", lambda t: (t / "labelvocabulary.csv").write_text("idx,label\n0,60\n2,61\n"),
     "must number its labels 0..1"),
    # pandas reads NA as missing; heareval would then look the label up as "nan"
    ("synth_pitch_int", lambda t: (t / "labelvocabulary.csv").write_text(
        (t / "labelvocabulary.csv").read_text().replace("1,61", "1,NA")), "line 3: a label pandas reads as missing"),
])
def test_numeric_labels_compared_as_heareval_does(numeric_tasks, task, breakage, message):
    path = numeric_tasks / f"{task}-v1-full"
    breakage(path)
    with pytest.raises(TaskError, match=message) as error:
        hear_task_validation.validate_task(path, known_scores=KNOWN + ("d_prime",))
    assert path.name in str(error.value)


def test_string_labels_that_look_numeric_match_integer_vocabulary(numeric_tasks):
    """JSON "60" and JSON 60 are the same label to heareval (str of either is "60")."""
    path = numeric_tasks / "synth_pitch_int-v1-full"
    _edit_json(path / "train.json", lambda m: m.update({k: [str(v[0])] for k, v in m.items()}))
    assert hear_task_validation.validate_task(path, known_scores=KNOWN).split_sizes == (36, 12, 12)


def test_malformed_task_stops_the_command_unless_skipped(tmp_path):
    """Nothing runs (no embeddings) and the exit status is non-zero; the message names the task
    and the way out."""
    tasks = tmp_path / "tasks"
    hear_tasks.scene_task(tasks, per_class=2, duration=0.5)
    (tasks / "broken-v1-full").mkdir()
    (tasks / "broken-v1-full" / "task_metadata.json").write_text("{}")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "training", "hear-eval", "pretrained", "--tasks-dir",
                             str(tasks), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "broken-v1-full" in result.stderr and "--skip-malformed" in result.stderr
    assert "1 malformed task folder(s), nothing was run" in result.stderr
    assert not (out / "embeddings").exists()
    with pytest.raises(hear_task_validation.MalformedTasksError, match="broken-v1-full") as error:
        hear_eval.run_hear_eval([CheckpointSpec.parse("pretrained")], tasks, out, log=lambda _: None)
    assert list(error.value.problems) == ["broken-v1-full"]


def test_skipped_tasks_are_named_under_the_table(collected, tmp_path):
    files = hear_scores.write_tables(collected, tmp_path, skipped={"broken-v1-full": "task broken-v1-full: lacks x"})
    markdown = files["md"].read_text()
    assert "Skipped 1 malformed task folder(s) (not scored):" in markdown
    assert "- `broken-v1-full`: task broken-v1-full: lacks x" in markdown
    assert "Skipped" not in hear_scores.write_tables(collected, tmp_path / "plain")["md"].read_text()


def test_checkpoint_spec_parsing():
    assert CheckpointSpec.parse("runs/sub-01_conv4/hear.safetensors") == \
        CheckpointSpec("hear", "runs/sub-01_conv4/hear.safetensors")
    assert CheckpointSpec.parse("conv4=a/b.safetensors") == CheckpointSpec("conv4", "a/b.safetensors")
    assert CheckpointSpec.parse("pretrained").label == "pretrained"
    with pytest.raises(ValueError, match="label"):
        CheckpointSpec.parse("a b=x.safetensors")


# ----------------------------------------------------------------------------------------------
# Real runs: malformed task, a checkpoint that fails in the middle, interruption and resume
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tasks dir with one valid scene task and one malformed task, and three checkpoints:
    the pretrained network, a corrupt file (in the middle), a perturbed copy of the pretrained."""
    import torch

    from hear_brainsoundnet.checkpoints import load_checkpoint, pretrained_checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("hear_eval")
    tasks = root / "tasks"
    hear_tasks.scene_task(tasks, per_class=4, duration=1.0, param_grid=GRID)
    broken = tasks / "broken-v1-full"
    broken.mkdir()
    (broken / "task_metadata.json").write_text(json.dumps({"task_name": "broken"}))
    (root / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    checkpoint = load_checkpoint(pretrained_checkpoint())
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in checkpoint.model.blocks["conv7"].parameters():
            parameter.add_(0.05 * parameter.std() * torch.randn_like(parameter))
    save_checkpoint(root / "perturbed.safetensors", checkpoint.model, provenance={"condition": "test"})
    specs = ["pretrained", f"corrupt={root / 'corrupt.safetensors'}",
             f"perturbed={root / 'perturbed.safetensors'}"]
    return root, tasks, specs


def _done_marker(out: Path, label: str, marker: str) -> Path:
    return out / "embeddings" / label / hear_eval.MODULE / "synth_scene-v1-full" / marker


def test_interrupted_run_resumes_and_reports_failures(workspace):
    root, tasks, specs = workspace
    out = root / "out"
    # 1. Start the command and kill it (SIGKILL, its whole process group) once the first
    #    checkpoint's embeddings are done, while its predictions run.
    argv = [sys.executable, "-m", "training", "hear-eval", *specs, "--tasks-dir", str(tasks),
            "--out", str(out), "--grid-points", "1", "--skip-malformed"]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    first = _done_marker(out, "pretrained", hear_eval.EMBEDDINGS_DONE)
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.exists(), "the embeddings of the first checkpoint never finished"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not _done_marker(out, "pretrained", hear_scores.PREDICTION_DONE).exists()
    embedded_at = first.stat().st_mtime_ns

    # 2. Resume: the first checkpoint's embeddings are not redone, the corrupt checkpoint is
    #    reported, the one after it still runs, the malformed task is reported and skipped.
    messages: list[str] = []
    result = hear_eval.run_hear_eval([CheckpointSpec.parse(s) for s in specs], tasks, out,
                                     grid_points=1, skip_malformed=True, log=messages.append)
    outcome = {o.label: o for o in result.checkpoints}
    assert outcome["pretrained"].ran == ["predictions"]
    assert first.stat().st_mtime_ns == embedded_at
    assert outcome["corrupt"].status == "failed"
    assert "corrupt.safetensors" in outcome["corrupt"].error and outcome["corrupt"].ran == []
    assert outcome["perturbed"].status == "ok" and outcome["perturbed"].ran == ["embeddings", "predictions"]
    assert list(result.task_problems) == ["broken-v1-full"]
    assert "lacks" in result.task_problems["broken-v1-full"]
    assert any("broken-v1-full" in m for m in messages)
    assert result.tasks == ["synth_scene-v1-full"]
    primary = result.scores[result.scores["primary"]]
    assert sorted(primary["checkpoint"]) == ["perturbed", "pretrained"]
    # 4 classes, 2 test clips each: chance is 0.25; pretrained SoundNet separates tones, noise,
    # clicks and chirps easily.
    assert primary.set_index("checkpoint")["value"]["pretrained"] >= 0.5
    status = json.loads((out / "hear_status.json").read_text())
    assert [c["status"] for c in status["checkpoints"]] == ["ok", "failed", "ok"]
    assert (out / "hear_scores.md").read_text().count("synth_scene") == 1
    assert "- `broken-v1-full`: task broken-v1-full: task_metadata.json lacks" in (out / "hear_scores.md").read_text()

    # 3. A third run does no work at all.
    again = hear_eval.run_hear_eval([CheckpointSpec.parse(s) for s in specs], tasks, out, grid_points=1,
                                    skip_malformed=True, log=lambda _: None)
    assert [o.ran for o in again.checkpoints] == [[], [], []]
    assert again.scores.equals(result.scores)
