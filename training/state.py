"""Files of a run directory: the resumable training state, the lock, the curves.

Everything is safetensors + JSON (no pickles) and written atomically (temporary file, fsync,
rename), so a run killed at any instant, SIGKILL included, leaves either the previous file or
the new one:

- ``best.safetensors``: the model with the lowest validation loss so far, a HEAR checkpoint
  written by :meth:`training.model.EncodingModel.save_pretrained` (the backbone as
  SoundNet-8 tensors, the subject heads as ``extra.head.*`` tensors, ``extra.brain_head`` and
  ``provenance`` in the config: epoch, validation loss, training config and data). Load it
  with ``EncodingModel.from_pretrained`` or, for embeddings, ``hear_brainsoundnet.load_model``.
- ``last.safetensors``: the training state, everything needed to continue (format below).
- ``curves.csv`` / ``curves.png``: training and validation loss per epoch (rewritten from the
  history in ``last.safetensors``, so a resumed run never duplicates rows).
- ``run.lock``: held (``flock``) by the one training that writes the directory; it names the
  holder (pid, host, start time). The operating system releases it when that process ends in
  any way, SIGKILL included, so a killed run leaves no stale lock: the file stays, unlocked.

The training state (``last.safetensors``), format version 2:

- tensors ``model/<name>``: the :class:`~training.model.EncodingModel`'s ``state_dict()`` as
  it is now (not the best epoch's); ``optim/<i>/<slot>``: AdamW's state of trained parameter
  ``i`` (``step``, ``exp_avg``, ``exp_avg_sq``); ``rng/torch``: torch's CPU random state.
- metadata: one key, ``hear-brainsoundnet-training-state``, a JSON object with
  ``format_version`` (2), ``progress`` (the fields of :class:`TrainingProgress`),
  ``scheduler`` (``ReduceLROnPlateau.state_dict()``) and ``param_groups`` (AdamW's, with the
  parameters as indices).

A state without ``format_version`` (written before a run's best model became a HEAR
checkpoint) is refused with a message saying to train the run again.

A run is *finished* when ``last.safetensors`` records a stop reason (``early_stopping`` or
``max_epochs``, :func:`run_completion`); a killed or diverged run is not.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs are not locked there
    fcntl = None  # type: ignore[assignment]

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hear_brainsoundnet.files import atomic_write

from .model import EncodingModel

STATE_FORMAT = "hear-brainsoundnet-training-state"
STATE_FORMAT_VERSION = 2
CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "best", "epoch_seconds",
                 "compute_fraction", "train_trs_per_second", "data_seconds", "compute_seconds",
                 "val_seconds")


LOCK_FILENAME = "run.lock"


class RunStateError(ValueError):
    """A run file is missing, corrupt, or belongs to another model or configuration."""


class RunLockedError(RunStateError):
    """Another process is writing the run directory."""


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold the exclusive lock of ``run_dir`` (created if needed) while the block runs.

    A second writer gets :class:`RunLockedError` naming the directory and the holder at once,
    rather than waiting. ``flock`` locks belong to the open file, so the operating system
    drops the lock when the holder exits, however it exits: there are no stale locks.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILENAME
    with open(path, "a+", encoding="utf-8") as handle:  # "a+": keep the holder's note until locked
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                raise RunLockedError(
                    f"{run_dir}: another training is writing this run directory "
                    f"({_holder(handle.read())}); wait for it to end, or choose another run.name "
                    "or run.out_dir") from None
            except OSError as error:  # e.g. a network file system without locks
                raise RunStateError(f"{path}: cannot lock the run directory ({error}); use a "
                                    "run.out_dir on a local disk") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        handle.flush()
        yield path  # closing the file on the way out releases the lock


def _holder(note: str) -> str:
    """The lock holder as a phrase, from the note it wrote into the lock file."""
    try:
        info = json.loads(note)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "holder not yet recorded"


def read_run_config(path: Path) -> dict[str, Any]:
    """The configuration a run directory was started with (``config.json``), or an error
    naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunStateError(f"{path}: missing, but the run directory holds a training state; "
                            "restore the file or choose a new run.name") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise RunStateError(f"{path}: corrupt run configuration ({type(error).__name__}: {error}); "
                            "restore it, or choose a new run.name") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()
                                              if not isinstance(v, str)):
        raise RunStateError(f"{path}: corrupt run configuration (expected an object of sections)")
    return value


@dataclass
class TrainingProgress:
    """Where a run stands: saved in the training state, so a resumed run continues exactly."""

    epoch: int = 0  # epochs completed: the next one to run
    step: int = 0  # steps of epoch ``epoch`` already taken (a mid-epoch checkpoint)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch (curves.csv)
    best_val_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    first_loss: float | None = None  # the run's first step's loss: the divergence reference
    train_sq: float = 0.0  # squared errors of epoch ``epoch`` so far (its training loss)
    train_count: float = 0.0  # and how many values they sum over
    seconds: float = 0.0  # training wall time over all sessions of the run
    finished: str | None = None  # the stop reason once the run has ended

    @property
    def train_loss(self) -> float:
        """Mean squared error over this epoch's steps so far."""
        return self.train_sq / max(self.train_count, 1.0)


def _load_state_dict(model: EncodingModel, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load a model state dict, refusing one of another architecture with an error naming ``path``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RunStateError(f"{path}: holds a different model (missing {missing[:4]}, unexpected "
                            f"{unexpected[:4]}); it was written for another condition, subject list "
                            "or architecture")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise RunStateError(f"{path}: {name} is {tuple(tensor.shape)}, this model needs "
                                f"{tuple(expected[name].shape)} (another number of targets or kernel?)")
    model.load_state_dict(state)


def save_training_state(path: Path, model: EncodingModel, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
                        progress: TrainingProgress) -> Path:
    """Write the training state (see the module docstring) to ``path``, atomically."""
    optim = optimizer.state_dict()
    tensors = {f"model/{name}": tensor for name, tensor in model.state_dict().items()}
    for index, slots in optim["state"].items():
        for slot, value in slots.items():
            tensors[f"optim/{index}/{slot}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng/torch"] = torch.get_rng_state()
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in optim["param_groups"]]
    header = {"format_version": STATE_FORMAT_VERSION, "progress": dataclasses.asdict(progress),
              "scheduler": scheduler.state_dict(), "param_groups": groups}
    # One metadata key: safetensors would write several in a random order (bytes would vary).
    metadata = {STATE_FORMAT: json.dumps(header, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_training_state_header(path: Path) -> dict[str, Any]:
    """The JSON header of the training state at ``path``, after checking its format and version
    (errors name the file and say what to do)."""
    if not path.is_file():
        raise RunStateError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as error:
        raise RunStateError(f"{path}: corrupt or not a safetensors file ({error}); delete the run "
                            "directory (or choose a new run.name) to start again") from None
    if STATE_FORMAT not in metadata:
        raise RunStateError(f"{path}: not a training state (metadata keys: {sorted(metadata)})")
    try:
        header = json.loads(metadata[STATE_FORMAT])
    except (json.JSONDecodeError, RecursionError) as error:
        raise RunStateError(f"{path}: corrupt training state metadata ({error})") from None
    if not isinstance(header, dict):
        raise RunStateError(f"{path}: corrupt training state metadata (not a JSON object)")
    version = header.get("format_version")
    if version != STATE_FORMAT_VERSION:
        what = ("the retired format written before a run's best model became a HEAR checkpoint"
                if version is None else f"format version {version!r}")
        raise RunStateError(f"{path}: a training state in {what}; this version resumes only format "
                            f"{STATE_FORMAT_VERSION}: train the run again (delete {path.parent} or "
                            "choose a new run.name)")
    return header


def load_training_state(path: Path, model: EncodingModel, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau) -> TrainingProgress:
    """Restore what :func:`save_training_state` wrote (model, optimiser, scheduler, torch's
    random state) and return the run's progress."""
    header = read_training_state_header(path)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    _load_state_dict(model, {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}, path)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optim/"):
            _, index, slot = name.split("/")
            state.setdefault(int(index), {})[slot] = tensor
    groups = header["param_groups"]
    expected = sum(len(group["params"]) for group in optimizer.state_dict()["param_groups"])
    if sum(len(group["params"]) for group in groups) != expected:
        raise RunStateError(f"{path}: optimizer state for another set of trained parameters")
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(header["scheduler"])
    torch.set_rng_state(tensors["rng/torch"])
    try:
        return TrainingProgress(**header["progress"])
    except TypeError as error:
        raise RunStateError(f"{path}: corrupt progress in the training state ({error})") from None


def run_completion(run_dir: Path) -> dict[str, Any]:
    """Whether the run in ``run_dir`` finished, from its ``last.safetensors`` (header only):
    ``{"finished": stop reason or None, "epochs": completed, "known": False if there is no
    readable training state}``."""
    path = Path(run_dir) / "last.safetensors"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            progress = json.loads((handle.metadata() or {})[STATE_FORMAT])["progress"]
        return {"finished": progress.get("finished"), "epochs": int(progress.get("epoch", 0)),
                "known": True}
    except (OSError, SafetensorError, KeyError, TypeError, ValueError):
        return {"finished": None, "epochs": None, "known": False}


# -- curves -----------------------------------------------------------------------------------

def write_curves(run_dir: Path, history: list[Mapping[str, Any]], plot: bool = True) -> tuple[Path, Path]:
    """``curves.csv`` and (if ``plot``: drawing is slow next to an epoch of a small run, so runs
    draw it once, at the end) ``curves.png``: training and validation loss per epoch."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CURVE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    csv_path = atomic_write(run_dir / "curves.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    png_path = run_dir / "curves.png"
    return csv_path, plot_curves(png_path, history, title=run_dir.name) if plot else png_path


def plot_curves(path: Path, history: list[Mapping[str, Any]], title: str = "") -> Path:
    """Training and validation loss against epoch, best epoch marked (matplotlib, Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    epochs = [row["epoch"] for row in history]
    for key, label in (("train_loss", "training"), ("val_loss", "validation")):
        values = [row[key] if math.isfinite(row[key]) else float("nan") for row in history]
        axis.plot(epochs, values, marker="." if len(epochs) < 50 else None, label=label)
    best = [row for row in history if row.get("best")]
    if best:
        axis.axvline(best[-1]["epoch"], color="grey", linestyle=":", label=f"best (epoch {best[-1]['epoch']})")
    axis.set_xlabel("epoch")
    axis.set_ylabel("MSE")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return path
