"""A run SIGKILLed in the middle of an epoch resumes and ends exactly like an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.fixtures_data import tiny_dataset  # noqa: F401  (session fixture)
from training.batches import load_splits
from training.config import load_config
from training.train import KILL_AFTER_STEPS_ENV

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, dataset_root: Path, out_dir: Path) -> Path:
    path.write_text(f"""
[run]
name = "resume"
out_dir = "{out_dir}"
seed = 7
threads = 1
progress = false
[data]
source = "synthetic"
synthetic_size = "tiny"
root = "{dataset_root}"
cache_dir = "{out_dir.parent / 'cache'}"
[model]
condition = "conv4"
kernel_trs = 3
[train]
lr = 3e-4
window_trs = 10
max_epochs = 3
early_stopping_patience = 0
checkpoint_every_steps = 4
[subjects]
ids = ["sub-01"]
""")
    return path


def run_training(config: Path, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(KILL_AFTER_STEPS_ENV, None)
    if kill_after is not None:
        env[KILL_AFTER_STEPS_ENV] = str(kill_after)
    return subprocess.run([sys.executable, "-m", "training.train", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys() if name.startswith(("model/", "optim/"))}


def progress(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["hear-brainsoundnet-training-state"])["progress"]


@pytest.mark.timeout(900)
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(tmp_path: Path, tiny_dataset) -> None:  # noqa: F811
    straight = write_config(tmp_path / "straight.toml", tiny_dataset.root, tmp_path / "straight")
    killed = write_config(tmp_path / "killed.toml", tiny_dataset.root, tmp_path / "killed")

    reference = run_training(straight)
    assert reference.returncode == 0, reference.stderr[-3000:]
    reference_dir = tmp_path / "straight" / "resume"

    # Die like a preempted job: SIGKILL at step 5 of epoch 1, a step after its mid-epoch
    # checkpoint (every 4 steps), so the resumed run redoes the step since that checkpoint.
    # One step per training window (windows_per_batch = 1); 10-TR windows tile each run.
    per_epoch = sum(episode.n_trs // 10 for episode in load_splits(load_config(killed)).train)
    assert per_epoch > 5, f"the tiny dataset gives {per_epoch} steps per epoch; the kill needs 6"
    first = run_training(killed, kill_after=per_epoch + 5)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    run_dir = tmp_path / "killed" / "resume"
    state = progress(run_dir / "last.safetensors")
    assert (state["epoch"], state["step"]) == (1, 4), "the kill must land inside an epoch"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
    # the killed process's lock file stays behind, naming it; the lock itself died with it
    assert json.loads((run_dir / "run.lock").read_text())["pid"] > 0

    second = run_training(killed)  # same command: resumes from last.safetensors
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed" in (run_dir / "train.log").read_text()

    # Same result, bit for bit: weights, AdamW moments, best model, curves.
    for name in ("last.safetensors", "best.safetensors"):
        a, b = tensors(reference_dir / name), tensors(run_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resuming"
    history = [(row["epoch"], row["train_loss"], row["val_loss"])
               for row in progress(run_dir / "last.safetensors")["history"]]
    expected = [(row["epoch"], row["train_loss"], row["val_loss"])
                for row in progress(reference_dir / "last.safetensors")["history"]]
    assert history == expected and len(history) == 3
    assert (run_dir / "curves.csv").read_text().count("\n") == 4  # header + 3 epochs, no duplicates
