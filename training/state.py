"""Files of a run directory: the trained model, the resumable training state, the curves.

Everything is safetensors + JSON (no pickles) and written atomically (temporary file, fsync,
rename), so a run killed at any instant, SIGKILL included, leaves either the previous file or
the new one:

- ``best.safetensors``: the model with the lowest validation loss so far (tensors ``model/...``;
  metadata: the model's description, epoch, validation loss, target names, config).
- ``last.safetensors``: everything needed to continue: model, AdamW moments, the torch RNG
  state, and as JSON the epoch and step to continue from, the scheduler, early-stopping and
  divergence bookkeeping, the partial sums of an interrupted epoch and the curve history.
- ``curves.csv`` / ``curves.png``: training and validation loss per epoch (rewritten from the
  history in ``last.safetensors``, so a resumed run never duplicates rows).
- ``run.lock``: held (``flock``) by the one training that writes the directory; it names the
  holder (pid, host, start time). The operating system releases it when that process ends in
  any way, SIGKILL included, so a killed run leaves no stale lock: the file stays, unlocked.

A run is *finished* when ``last.safetensors`` records a stop reason (``early_stopping`` or
``max_epochs``, :func:`run_completion`); a killed or diverged run is not.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import socket
import time
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

MODEL_FORMAT = "hear-brainsoundnet-encoding-model"
STATE_FORMAT = "hear-brainsoundnet-training-state"
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


def _save(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], fmt: str) -> Path:
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    # One metadata key: safetensors would write several in a random order (bytes would vary).
    header = {fmt: json.dumps(metadata, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def _load(path: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise RunStateError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            if fmt not in header:
                raise RunStateError(f"{path}: not a {fmt} file (metadata keys: {sorted(header)})")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except SafetensorError as error:
        raise RunStateError(f"{path}: corrupt or not a safetensors file ({error})") from None
    try:
        metadata = json.loads(header[fmt])
    except (json.JSONDecodeError, RecursionError) as error:
        raise RunStateError(f"{path}: corrupt {fmt} metadata ({error})") from None
    if not isinstance(metadata, dict):
        raise RunStateError(f"{path}: corrupt {fmt} metadata (not a JSON object)")
    return tensors, metadata


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


def _with_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{name}": tensor for name, tensor in tensors.items()}


def _strip_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


def load_model_state(model: EncodingModel, state: Mapping[str, torch.Tensor], path: Path) -> None:
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


# -- the model --------------------------------------------------------------------------------

def save_model(path: Path, model: EncodingModel, **metadata: Any) -> Path:
    """Write ``model`` with its description and ``metadata`` (epoch, val_loss, targets, config)."""
    return _save(path, _with_prefix(model.state_dict(), "model/"),
                 {"model": model.describe(), **metadata}, MODEL_FORMAT)


def is_model_file(path: str | Path) -> bool:
    """True if ``path`` is a file written by :func:`save_model` (a run's best model)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return MODEL_FORMAT in (handle.metadata() or {})
    except (OSError, SafetensorError):
        return False


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The raw ``(state dict, metadata)`` of a model file written by :func:`save_model`."""
    tensors, metadata = _load(Path(path), MODEL_FORMAT)
    return _strip_prefix(tensors, "model/"), metadata


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[EncodingModel, dict[str, Any]]:
    """Rebuild the :class:`EncodingModel` saved at ``path`` (eval mode) and its metadata."""
    path = Path(path)
    state, metadata = read_model_file(path)
    description = metadata["model"]
    model = EncodingModel(description["subjects"], kernel_trs=description["kernel_trs"],
                          condition=description["condition"], batchnorm=description["batchnorm"])
    load_model_state(model, state, path)
    return model.to(device).eval(), metadata


# -- the resumable state ----------------------------------------------------------------------

def save_training_state(path: Path, model: EncodingModel, optimizer: torch.optim.Optimizer,
                        progress: Mapping[str, Any]) -> Path:
    """Write model, optimizer moments, RNG state and the JSON ``progress`` to ``path``."""
    optim = optimizer.state_dict()
    tensors = _with_prefix(model.state_dict(), "model/")
    for index, slots in optim["state"].items():
        for slot, value in slots.items():
            tensors[f"optim/{index}/{slot}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng/torch"] = torch.get_rng_state()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in optim["param_groups"]]
    return _save(path, tensors, {"progress": dict(progress), "param_groups": groups}, STATE_FORMAT)


def load_training_state(path: Path, model: EncodingModel,
                        optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote; return the ``progress`` dict."""
    tensors, metadata = _load(path, STATE_FORMAT)
    load_model_state(model, _strip_prefix(tensors, "model/"), path)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in _strip_prefix(tensors, "optim/").items():
        index, slot = name.split("/")
        state.setdefault(int(index), {})[slot] = tensor
    groups = metadata["param_groups"]
    expected = sum(len(group["params"]) for group in optimizer.state_dict()["param_groups"])
    if sum(len(group["params"]) for group in groups) != expected:
        raise RunStateError(f"{path}: optimizer state for another set of trained parameters")
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng/torch"])
    return metadata["progress"]


# -- curves -----------------------------------------------------------------------------------

def write_curves(run_dir: Path, history: list[Mapping[str, Any]], plot: bool = True) -> tuple[Path, Path]:
    """``curves.csv`` and (if ``plot``: drawing costs ~0.3 s, so runs draw it once at the end)
    ``curves.png``: training and validation loss per epoch, from ``history``."""
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
