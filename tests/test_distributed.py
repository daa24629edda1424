"""The same script under torchrun (2 processes, gloo on CPU) matches the single-process run.

Both runs use a global batch of 2 windows: one process takes both, or each of the two ranks
takes one and DistributedDataParallel averages the gradients. BatchNorm of the trained layers
normalises each window with its own statistics, and its running statistics are recomputed over
all training windows before each validation, so the two runs compute the same thing; only
float rounding differs (thread counts, summation order). Measured: losses agree to 1e-6
relative; 99.95 % of the weights to 1e-5 of their tensor's largest value, and the rest (weights
whose gradient is at rounding level, which Adam's normalisation turns into full steps) to
1.4e-4.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hear_brainsoundnet.checkpoints import load_pretrained
from tests.fixtures_data import tiny_dataset  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parent.parent
RELATIVE_TOLERANCE = 1e-5  # weights (all but 0.1 %) and losses
LOOSE_TOLERANCE = 1e-3  # every weight but a handful of rounding-level gradients (below)
LR = 3e-4  # train.lr of write_config


def write_config(path: Path, dataset_root: Path, out_dir: Path, threads: int) -> Path:
    path.write_text(f"""
[run]
name = "ddp"
out_dir = "{out_dir}"
seed = 3
threads = {threads}
progress = false
device = "cpu"
[data]
source = "synthetic"
synthetic_size = "tiny"
root = "{dataset_root}"
cache_dir = "{out_dir.parent / 'cache'}"
[model]
condition = "conv5"
kernel_trs = 3
[train]
lr = 3e-4
window_trs = 10
windows_per_batch = 2
max_epochs = 2
early_stopping_patience = 0
[subjects]
mode = "group"
ids = ["sub-01", "sub-02"]
""")
    return path


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys() if name.startswith("model/")}


def history(path: Path) -> list[dict]:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["hear-brainsoundnet-training-state"])["progress"]["history"]


@pytest.mark.timeout(900)
def test_two_gloo_processes_match_one(tmp_path: Path, tiny_dataset) -> None:  # noqa: F811
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    single = write_config(tmp_path / "single.toml", tiny_dataset.root, tmp_path / "single", threads=2)
    done = subprocess.run([sys.executable, "-m", "training.train", str(single)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    double = write_config(tmp_path / "double.toml", tiny_dataset.root, tmp_path / "double", threads=1)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "training.train", str(double)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    a = model_tensors(tmp_path / "single" / "ddp" / "last.safetensors")
    b = model_tensors(tmp_path / "double" / "ddp" / "last.safetensors")
    assert a.keys() == b.keys()
    steps = 2 * 50  # 2 epochs of at most 50 two-window steps on the tiny dataset
    worst = outliers = total = 0
    flipped = []
    for key in a:
        if not a[key].is_floating_point():
            assert torch.equal(a[key], b[key]), key
            continue
        scale = float(a[key].abs().max()) or 1.0
        difference = (a[key] - b[key]).abs()
        # Adam divides each gradient by its own running magnitude: where a gradient is at the
        # level of float rounding (a unit at a ReLU's edge, a head weight of a target with no
        # signal in a step), rounding decides the step's sign. Such a weight can move by up to
        # lr per step either way, whatever its tensor's scale (a fresh head's is about 1e-3):
        # a handful may do so; none may move further.
        beyond = difference > LOOSE_TOLERANCE * scale
        flipped += [(key, float(d)) for d in difference[beyond]]
        assert float(difference.max()) <= LR * steps, key
        outliers += int((difference > RELATIVE_TOLERANCE * scale).sum())
        total += a[key].numel()
        worst = max(worst, float(difference.max()) / scale)
    assert len(flipped) <= 5, flipped
    assert outliers <= 1e-3 * total, f"{outliers} of {total} weights differ by more than {RELATIVE_TOLERANCE:g}"
    print(f"weights beyond {RELATIVE_TOLERANCE:g} of their tensor's scale: {outliers} of {total}; "
          f"largest difference {worst:.2e} of the scale")
    pretrained = load_pretrained().state_dict()
    assert not torch.equal(a["model/backbone.blocks.conv5.conv.weight"], pretrained["blocks.conv5.conv.weight"])
    assert torch.equal(a["model/backbone.blocks.conv4.conv.weight"], pretrained["blocks.conv4.conv.weight"])
    # both runs trained (the weights moved) and saw the same validation losses
    h1, h2 = history(tmp_path / "single" / "ddp" / "last.safetensors"), history(tmp_path / "double" / "ddp" / "last.safetensors")
    assert [row["epoch"] for row in h1] == [row["epoch"] for row in h2] == [0, 1]
    for r1, r2 in zip(h1, h2):
        print(f"epoch {r1['epoch']}: validation loss {r1['val_loss']:.8f} (1 process) "
              f"{r2['val_loss']:.8f} (2 processes)")
        assert r1["val_loss"] == pytest.approx(r2["val_loss"], rel=RELATIVE_TOLERANCE)
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], rel=RELATIVE_TOLERANCE)
    assert (tmp_path / "double" / "ddp" / "status.json").is_file()
