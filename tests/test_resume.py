"""A run SIGKILLed in the middle of an epoch resumes and ends exactly like an uninterrupted run;
a run directory written before a run's best model became a HEAR checkpoint is refused clearly."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.fixtures_data import tiny_dataset  # noqa: F401  (session fixture)
from training.config import load_config
from training.data.loading import load_splits

REPO = Path(__file__).resolve().parent.parent
# The training, in a process of its own that SIGKILLs itself, like a preempted job, once
# (epoch, step) is reached: the fault is injected through train()'s on_step callback.
KILLED_RUN = """
import os, signal, sys
from training.config import load_config
from training.train import train

def die_at(progress):
    if (progress.epoch, progress.step) == (int(sys.argv[2]), int(sys.argv[3])):
        os.kill(os.getpid(), signal.SIGKILL)

train(load_config(sys.argv[1]), on_step=die_at)
"""


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


def run_training(config: Path, kill_at: tuple[int, int] | None = None) -> subprocess.CompletedProcess:
    """``python -m training.train CONFIG``, or the same training killed at ``kill_at``."""
    command = (["-m", "training.train", str(config)] if kill_at is None else
               ["-c", KILLED_RUN, str(config), *map(str, kill_at)])
    return subprocess.run([sys.executable, *command], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
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
    first = run_training(killed, kill_at=(1, 5))
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


def write_retired_run(run_dir: Path, config) -> None:
    """A run directory as the code before HEAR-checkpoint run models wrote it: best and last
    in their own formats (tensors ``model/...``), config.json."""
    from safetensors.torch import save_file

    from training.model import EncodingModel

    model = EncodingModel({"sub-01": 4}, kernel_trs=3, condition="conv4")
    tensors = {f"model/{k}": v.contiguous() for k, v in model.state_dict().items()}
    run_dir.mkdir(parents=True)
    save_file(tensors, str(run_dir / "best.safetensors"), metadata={"hear-brainsoundnet-encoding-model": json.dumps(
        {"model": {"subjects": {"sub-01": 4}, "kernel_trs": 3, "condition": "conv4", "batchnorm": "frozen-eval"},
         "epoch": 0, "val_loss": 1.0})})
    save_file({**tensors, "rng/torch": torch.get_rng_state()}, str(run_dir / "last.safetensors"),
              metadata={"hear-brainsoundnet-training-state": json.dumps(
                  {"progress": {"epoch": 1, "step": 0, "finished": None}, "param_groups": []})})
    (run_dir / "config.json").write_text(json.dumps(config.to_dict()))


def test_a_run_of_the_retired_format_is_refused_naming_the_file_and_what_to_do(tmp_path, tiny_dataset, capsys) -> None:  # noqa: F811
    import hear_brainsoundnet
    from hear_brainsoundnet.checkpoints import CheckpointError
    from training.evaluate import score_checkpoint
    from training.model import EncodingModel
    from training.publish import export, main
    from training.state import RunStateError
    from training.train import train

    config = load_config(write_config(tmp_path / "old.toml", tiny_dataset.root, tmp_path / "old"))
    run_dir = config.run_dir
    write_retired_run(run_dir, config)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(RunStateError, match=rf"{re.escape(str(run_dir / 'last.safetensors'))}: a training state in "
                                            rf"the retired format .*train the run again \(delete "
                                            rf"{re.escape(str(run_dir))} or choose a new run\.name\)"):
        train(config)  # resuming it: refused before any data work, nothing written
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != "run.lock"} == before
    best = run_dir / "best.safetensors"
    retired = (rf"{re.escape(str(best))}: a training run's model in the retired 'hear-brainsoundnet-encoding-model' format "
               r".*train the run again \(delete its run directory or choose a new run\.name\)")
    for load in (EncodingModel.from_pretrained, lambda path: hear_brainsoundnet.load_model(str(path)),
                 lambda path: export(path.parent, tmp_path / "export"),
                 lambda path: score_checkpoint(path, [], 1.49)):
        with pytest.raises(CheckpointError, match=retired):
            load(best)
    assert main(["export", str(run_dir), str(tmp_path / "export")]) == 2
    assert "in the retired 'hear-brainsoundnet-encoding-model' format" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
