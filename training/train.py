"""Fine-tune SoundNet to predict brain activity: the training loop, resumable and distributed.

    python -m training.train configs/synthetic_conv4.toml [--set train.lr=1e-4 ...]
    torchrun --nproc-per-node 2 -m training.train configs/synthetic_conv4.toml --set train.windows_per_batch=2

or from Python: ``train(load_config(path)) -> TrainResult``.

What one run does, top to bottom (:func:`train_once`; the loop is :func:`_train`):

1. **Setup** (:func:`setup`): distributed process group when launched by torchrun (NCCL on
   GPUs, gloo on CPUs), device, threads (``run.threads``; the caller's count is restored
   after), seed, run directory (``run.out_dir/run.name``) with the config, locked for this run
   (``run.lock``; a second training on the same directory is refused).
2. **Data**: the split's training and validation episodes (:mod:`training.batches`).
3. **Model**: SoundNet-8 (pretrained, random for the null, or a given checkpoint) + one head
   per subject, in the configured condition (:mod:`training.model`); the frozen layers'
   output cached per episode where that is exact; the heads' input statistics measured.
4. **Optimiser**: AdamW on the trained parameters, ReduceLROnPlateau on the validation loss.
5. **Resume**: ``last.safetensors`` in the run directory, if any, restores everything
   (:mod:`training.state` documents the file).
6. **Epochs**: windows shuffled from (seed, epoch); per step (:func:`train_step`) the MSE, a
   divergence check, backward and the AdamW step (DDP averages gradients; each rank takes its
   share of every global batch); optional mid-epoch checkpoint. Then (:func:`end_epoch`) the
   trained BatchNorm layers' running statistics recomputed over the training windows, the
   validation loss (every TR of the validation runs, summed over ranks), the scheduler,
   ``best.safetensors`` (a HEAR checkpoint, :meth:`EncodingModel.save_pretrained`) when it
   improved, the curves and ``last.safetensors``; early stopping after
   ``early_stopping_patience`` epochs without improvement.

Resuming a run killed at any point gives the same result as an uninterrupted run with the
same seed: on CPU bit for bit with the same thread count (``tests/test_resume.py``); a
2-process gloo run matches the single-process run with the same global batch to float
rounding (``tests/test_distributed.py``). Divergence (a non-finite loss, or one above
``divergence_factor`` x the first step's) stops the run with :class:`TrainingDiverged` before
that step is applied; nothing diverged is written (``best.safetensors`` keeps the last good
model, ``status.json`` says what happened).

Threads: on a CPU shared with other processes, prefer ``run.threads = 1`` per process (or one
process per core under torchrun): a parallel region waits for its slowest thread, so it
stalls whenever another process holds one of its cores.

Leave-one-subject-out (``subjects.mode = "loso"``) trains the group model on every subject
but ``held_out`` (``<run>/group``), then only a new head for ``held_out`` on the frozen group
backbone (``<run>/<held_out>``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from hear_brainsoundnet import __version__
from hear_brainsoundnet.checkpoints import load_checkpoint, load_pretrained, read_config
from hear_brainsoundnet.files import atomic_write
from hear_brainsoundnet.soundnet import SoundNet8

from .batches import (Batch, EpisodeSet, batch_errors, batches_of, fit_head_statistics,
                      recalibrate_batchnorm, shard)
from .config import ConfigError, ExperimentConfig, load_config
from .data import DataSplits
from .data.loading import load_splits, prepare_data
from .model import EncodingModel
from .state import (RunStateError, TrainingProgress, load_training_state, read_run_config,
                    read_training_state_header, run_lock, save_training_state, write_curves)

log = logging.getLogger(__package__)  # "training" in a clone, "hear_brainsoundnet.training" installed
StepCallback = Callable[[TrainingProgress], None]
# Config keys that may change when a run is resumed (they do not change the result).
RESUMABLE_CHANGES = {"run.progress", "run.threads", "run.device", "train.resume"}


class TrainingDiverged(RuntimeError):
    """The loss became non-finite or exploded; nothing from the diverged steps was saved."""


@dataclass
class TrainResult:
    """What a finished run produced (paths are inside ``run_dir``)."""

    run_dir: Path
    best_checkpoint: Path  # best.safetensors: the lowest validation loss's model, a HEAR checkpoint
    last_checkpoint: Path  # last.safetensors: the resumable state
    best_epoch: int
    best_val_loss: float
    epochs: int  # epochs completed
    stop_reason: str  # "early_stopping" or "max_epochs"
    history: list[dict[str, Any]]
    subjects: list[str]
    target_names: dict[str, list[str]]
    curves_csv: Path
    curves_png: Path
    seconds: float  # training wall time over all sessions of this run
    config: ExperimentConfig
    stages: dict[str, "TrainResult"] = field(default_factory=dict)  # loso: "group" and held-out

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (paths as strings)."""
        return {"run_dir": str(self.run_dir), "best_checkpoint": str(self.best_checkpoint),
                "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
                "epochs": self.epochs, "stop_reason": self.stop_reason, "subjects": self.subjects,
                "seconds": round(self.seconds, 2), "condition": self.config.model.condition,
                "stages": {name: stage.summary() for name, stage in self.stages.items()}}


# ----------------------------------------------------------------------------------------------
# Distributed setup
# ----------------------------------------------------------------------------------------------

@dataclass
class Dist:
    """This process's place in the job: rank, world size, device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join torchrun's process group if launched by it; pick this rank's device."""
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda:")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        chosen = torch.device(device if device not in ("auto",) else ("cuda" if cuda else "cpu"))
        return Dist(device=chosen)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    chosen = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(chosen)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=chosen)


def all_sum(values: list[float], ctx: Dist) -> list[float]:
    """Sum ``values`` over ranks (float64)."""
    if ctx.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ----------------------------------------------------------------------------------------------
# Model construction
# ----------------------------------------------------------------------------------------------

def build_model(config: ExperimentConfig, n_targets: dict[str, int]) -> tuple[EncodingModel, list[str]]:
    """The :class:`EncodingModel` of ``config`` with its initial weights (the caller seeded torch).

    Returns the model and the subjects whose heads came from ``model.init`` (a model with brain
    heads: a run's ``best.safetensors`` or its export); the other heads start at zero and get
    their input statistics later.
    """
    init, condition = config.model.init, config.model.condition
    backbone = SoundNet8()  # seeded random initialisation: the null model's backbone
    heads: dict[str, torch.nn.Module] = {}
    if condition == "null" and init not in ("pretrained", "random"):
        raise ConfigError(f"model.init = {init!r}: the null condition always starts from a random "
                          "backbone; leave model.init unset")
    if condition != "null" and init != "random":
        state, heads = _initial_weights(init, n_targets)
        backbone.load_state_dict({k: v for k, v in state.items() if k.startswith("blocks.")})
    model = EncodingModel(n_targets, kernel_trs=config.model.kernel_trs, condition=condition,
                          batchnorm=config.model.batchnorm, backbone=backbone)
    for subject, head in heads.items():
        try:
            model.heads[subject].load_state_dict(head.state_dict())
        except RuntimeError as error:
            raise RunStateError(f"{init}: the head of {subject} does not fit this model "
                                f"(kernel_trs or targets differ): {error}") from None
    return model, sorted(heads)


def _initial_weights(init: str, subjects: Mapping[str, int]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.nn.Module]]:
    """The backbone tensors ``model.init`` names, and its heads of ``subjects`` if it has any."""
    if init == "pretrained":
        return load_pretrained().state_dict(), {}
    if isinstance(read_config(init).get("extra", {}).get("brain_head"), dict):
        source = EncodingModel.from_pretrained(init)  # never moves the seed: same draws as before
        return source.backbone.state_dict(), {s: h for s, h in source.heads.items() if s in subjects}
    return load_checkpoint(init).model.state_dict(), {}  # errors name the file


# ----------------------------------------------------------------------------------------------
# Run directory helpers
# ----------------------------------------------------------------------------------------------

def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=1, default=str)))


def _check_same_config(saved: dict[str, Any], config: ExperimentConfig, path: Path) -> None:
    """Refuse to resume ``path`` with a config that would change the result."""
    def flat(values: dict[str, Any]) -> dict[str, Any]:
        return {f"{s}.{k}": v for s, table in values.items() if isinstance(table, dict)
                for k, v in table.items()}
    old, new = flat(saved), flat(config.to_dict())
    changed = sorted(k for k in set(old) | set(new)
                     if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise RunStateError(f"{path}: this run was started with another configuration ({details}); "
                            "resume it with its own config, or choose a new run.name")


def _configure_logging(run_dir: Path, main: bool) -> None:
    """Epoch lines go to ``run_dir/train.log``; the console has the progress bars."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        if getattr(handler, "_training_run", False):
            log.removeHandler(handler)
            handler.close()
    if main:
        handler = logging.FileHandler(run_dir / "train.log", delay=True)  # a refused run writes none
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        handler._training_run = True  # type: ignore[attr-defined]
        log.addHandler(handler)


def _code_version() -> str:
    """Package version, plus the git commit when run from a checkout (and '.dirty' if modified)."""
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{__version__}+g{commit[:12]}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads (0: as they are), then give the caller back
    its own count, whatever happens. (Training never sizes the inter-op pool, which a process
    can size only once.)"""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class EpochTimer:
    """Where an epoch's time goes: assembling batches (data), the network (compute), validation.

    When the frozen layers' output is not cached they run while a batch is assembled; their
    time (``EpisodeSet.prefix_seconds``) counts as compute, not data.
    """

    def __init__(self, episodes: EpisodeSet):
        self.episodes = episodes
        self.start = self.validation_start = time.perf_counter()
        self.data = self.compute = 0.0

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        start, frozen = time.perf_counter(), self.episodes.prefix_seconds
        yield
        frozen = self.episodes.prefix_seconds - frozen
        self.data += time.perf_counter() - start - frozen
        self.compute += frozen

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.compute += time.perf_counter() - start

    def validating(self) -> None:
        self.validation_start = time.perf_counter()

    def columns(self, trs: int) -> dict[str, float]:
        """The epoch's timing columns of the curves; ``trs``: training TRs the epoch covered."""
        now = time.perf_counter()
        training = max(self.validation_start - self.start, 1e-9)
        return {"epoch_seconds": round(now - self.start, 3),
                "compute_fraction": round(self.compute / training, 4),
                "train_trs_per_second": round(trs / training, 1),
                "data_seconds": round(self.data, 3), "compute_seconds": round(self.compute, 3),
                "val_seconds": round(now - self.validation_start, 3)}


# ----------------------------------------------------------------------------------------------
# Setup (steps 1-5 of the module docstring)
# ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One run as :func:`setup` prepared it: what the epochs read and update."""

    config: ExperimentConfig
    ctx: Dist
    model: EncodingModel
    net: torch.nn.Module  # the model, wrapped by DistributedDataParallel under torchrun
    train_set: EpisodeSet
    val_set: EpisodeSet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    progress: TrainingProgress
    data: dict[str, Any]  # the data's description (data.json)
    cache_seconds: float
    code_version: str

    @property
    def dir(self) -> Path:
        return self.config.run_dir

    @property
    def bars(self) -> bool:
        """Whether this process shows progress bars."""
        return self.config.run.progress and self.ctx.main

    def save_state(self) -> None:
        if self.ctx.main:
            save_training_state(self.dir / "last.safetensors", self.model, self.optimizer,
                                self.scheduler, self.progress)

    def save_best(self, epoch: int, val_loss: float) -> None:
        """``best.safetensors``: the model as a HEAR checkpoint, with how it was trained."""
        if not self.ctx.main:
            return
        config = self.config
        self.model.save_pretrained(self.dir / "best.safetensors", provenance={
            "condition": config.model.condition, "subjects": self.model.subjects,
            "training_config": config.to_dict(), "training_data": self.data,
            "synthetic_data": config.data.source == "synthetic", "seed": config.run.seed,
            "initial_weights": (f"random (seed {config.run.seed})" if config.model.condition == "null"
                                else config.model.init),
            "metrics": {"best_val_loss_mse": val_loss, "best_epoch": epoch},
            "code_version": self.code_version})

    def write_status(self, status: str, **fields: Any) -> None:
        if self.ctx.main:
            _write_json(self.dir / "status.json", {"status": status, **fields})

    def diverged(self, message: str) -> TrainingDiverged:
        """Record the divergence (status, curves so far) and return the error to raise."""
        self.write_status("diverged", message=message)
        if self.ctx.main and self.progress.history:
            write_curves(self.dir, self.progress.history)
        log.error(message)
        return TrainingDiverged(f"{self.dir}: {message}")

    def result(self, stop_reason: str) -> TrainResult:
        p = self.progress
        return TrainResult(self.dir, self.dir / "best.safetensors", self.dir / "last.safetensors",
                           p.best_epoch, p.best_val_loss, p.epoch, stop_reason, p.history,
                           self.model.subjects, dict(self.model.target_names), self.dir / "curves.csv",
                           self.dir / "curves.png", p.seconds, self.config)


def setup(config: ExperimentConfig, data: DataSplits | None = None) -> Run:
    """Process group, run directory, data, model, optimiser: the run ready for its next epoch
    (resumed from ``last.safetensors`` when there is one)."""
    ctx = setup_distributed(config.run.device)
    _open_run_dir(config, ctx)
    torch.manual_seed(config.run.seed)
    splits = _load_data(config, data, ctx)
    subjects = config.subjects.ids
    model, initialised_heads = build_model(config, {s: len(splits.target_names[s]) for s in subjects})
    model = model.to(ctx.device)
    model.target_names, model.tr = {s: list(splits.target_names[s]) for s in subjects}, splits.tr
    train_set, val_set, cache_seconds = _episode_sets(config, splits, model, ctx)
    description = splits.describe()
    optimizer, scheduler = _optimizer(model, config)
    last = config.run_dir / "last.safetensors"
    if last.is_file():
        progress = load_training_state(last, model, optimizer, scheduler)
        log.info("resumed %s at epoch %d step %d", config.run_dir, progress.epoch, progress.step)
    else:
        progress = TrainingProgress()
        if set(initialised_heads) != set(subjects):
            mean, std = fit_head_statistics(model, train_set, ctx.device)
            for subject, head in model.heads.items():
                if subject not in initialised_heads:
                    head.set_input_statistics(mean, std)
        if ctx.main:
            _write_json(config.run_dir / "config.json", config.to_dict())
            atomic_write(config.run_dir / "config.toml", lambda tmp: Path(tmp).write_text(config.to_toml()))
            _write_json(config.run_dir / "data.json", description)
    net: torch.nn.Module = model
    if ctx.world > 1:
        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                      broadcast_buffers=False, find_unused_parameters=len(subjects) > 1)
    return Run(config, ctx, model, net, train_set, val_set, optimizer, scheduler, progress,
               description, cache_seconds, _code_version())


def _open_run_dir(config: ExperimentConfig, ctx: Dist) -> None:
    """Create the run directory and its log; refuse what cannot resume, before any data work."""
    windows = config.train.windows_per_batch
    if windows % ctx.world:
        raise ConfigError(f"train.windows_per_batch = {windows} must be a multiple "
                          f"of the number of processes ({ctx.world}): it is the global batch")
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    _configure_logging(run_dir, ctx.main)
    last = run_dir / "last.safetensors"
    if last.is_file() and not config.train.resume:
        raise RunStateError(f"{last}: the run directory already holds a run; set "
                            "train.resume = true to continue it or choose a new run.name")
    if last.is_file():  # resuming: only with the run's own config and a state this version reads
        _check_same_config(read_run_config(run_dir / "config.json"), config, run_dir / "config.json")
        read_training_state_header(last)


def _load_data(config: ExperimentConfig, data: DataSplits | None, ctx: Dist) -> DataSplits:
    """The configured subjects' splits: ``data`` if given, else read (checked and decoded once,
    by rank 0, then read by every rank)."""
    plan = None
    if data is None:
        if ctx.main:
            plan = prepare_data(config)
        if ctx.world > 1:
            dist.barrier()
    splits = data if data is not None else load_splits(config, plan)
    return splits.restricted_to(config.subjects.ids)


def _episode_sets(config: ExperimentConfig, splits: DataSplits, model: EncodingModel,
                  ctx: Dist) -> tuple[EpisodeSet, EpisodeSet, float]:
    """Training and validation episodes with their frozen features cached (where exact), and
    the seconds the cache took."""
    cfg, bars = config.train, config.run.progress and ctx.main
    sets = [EpisodeSet(name, episodes, model, splits.tr, cfg.window_trs, cfg.cache_features, bars)
            for name, episodes in (("train", splits.train), ("validation", splits.validation))]
    start = time.perf_counter()
    folder = splits.feature_cache_dir
    if folder is not None and ctx.world > 1:  # one rank computes, the others read
        if ctx.main:
            for episodes in sets:
                episodes.build_cache(ctx.device, folder)
        dist.barrier()
    for episodes in sets:
        episodes.build_cache(ctx.device, folder)
    return sets[0], sets[1], time.perf_counter() - start


def _optimizer(model: EncodingModel, config: ExperimentConfig
               ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.ReduceLROnPlateau]:
    """AdamW on the trained parameters (the backbone's lr scaled), ReduceLROnPlateau on the
    validation loss."""
    cfg = config.train
    groups = [{"params": [p for p in model.heads.parameters() if p.requires_grad], "lr": cfg.lr},
              {"params": [p for p in model.backbone.parameters() if p.requires_grad],
               "lr": cfg.lr * cfg.backbone_lr_scale}]
    # fused: one kernel for every parameter instead of one per tensor; the same update
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience)
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def train(config: ExperimentConfig, data: DataSplits | None = None, *,
          on_step: StepCallback | None = None) -> TrainResult:
    """Train the model ``config`` describes (both stages in leave-one-subject-out mode).

    ``data`` (from :func:`training.data.loading.load_splits`, with every configured subject) saves
    re-reading the data when several models train on the same subjects. ``on_step`` is called
    with the run's progress after every optimiser step (tests inject faults there).
    """
    if config.subjects.mode != "loso":
        return train_once(config, data, on_step=on_step)
    held_out = config.subjects.held_out
    group_config = dataclasses.replace(
        config, run=dataclasses.replace(config.run, name=f"{config.run.name}/group"),
        subjects=dataclasses.replace(config.subjects, mode="group", held_out="",
                                     ids=[s for s in config.subjects.ids if s != held_out]))
    group = train_once(group_config, data, on_step=on_step)
    head_config = dataclasses.replace(
        config, run=dataclasses.replace(config.run, name=f"{config.run.name}/{held_out}"),
        model=dataclasses.replace(config.model, condition="head", init=str(group.best_checkpoint)),
        subjects=dataclasses.replace(config.subjects, mode="individual", ids=[held_out], held_out=""))
    head = train_once(head_config, data, on_step=on_step)
    return dataclasses.replace(head, config=config, stages={"group": group, held_out: head})


def train_once(config: ExperimentConfig, data: DataSplits | None = None, *,
               on_step: StepCallback | None = None) -> TrainResult:
    """One run: individual or group model (see the module docstring), holding the run
    directory's lock (:func:`training.state.run_lock`: a second writer is refused) and
    ``run.threads`` torch threads (the caller's count is restored after)."""
    with torch_threads(config.run.threads):
        if int(os.environ.get("RANK", "0")) != 0:  # only rank 0 writes the run directory
            return _train(config, data, on_step)
        with run_lock(config.run_dir):
            return _train(config, data, on_step)


def _train(config: ExperimentConfig, data: DataSplits | None, on_step: StepCallback | None) -> TrainResult:
    """The run, top to bottom: setup, then per epoch its steps and its end."""
    run = setup(config, data)
    progress, cfg = run.progress, config.train
    if progress.finished:  # a finished run is returned as it is
        return run.result(progress.finished)
    run.write_status("running", pid=os.getpid())
    session_start = time.perf_counter() - progress.seconds
    epochs = tqdm(range(progress.epoch, cfg.max_epochs), desc=run.dir.name, unit="epoch",
                  disable=not run.bars, initial=progress.epoch, total=cfg.max_epochs)
    for epoch in epochs:
        timer = EpochTimer(run.train_set)
        batches = list(batches_of(run.train_set.train_windows(config.run.seed, epoch),
                                  cfg.windows_per_batch, drop_last=cfg.windows_per_batch > 1))
        if not batches:
            raise ConfigError(f"train.windows_per_batch = {cfg.windows_per_batch} is more than the "
                              f"{len(run.train_set.train_windows(config.run.seed, epoch))} training windows")
        train_epoch(run, epoch, batches, timer, on_step)
        end_epoch(run, epoch, len(batches) * cfg.windows_per_batch * cfg.window_trs, timer, session_start)
        last = progress.history[-1]
        epochs.set_postfix(train=f"{last['train_loss']:.4f}", val=f"{last['val_loss']:.4f}",
                           best=f"{progress.best_val_loss:.4f}")
        if progress.finished:
            break
    run.write_status("complete", stop_reason=progress.finished, best_epoch=progress.best_epoch,
                     best_val_loss=progress.best_val_loss, cache_seconds=round(run.cache_seconds, 3))
    if run.ctx.world > 1:
        dist.barrier()
    return run.result(progress.finished or "max_epochs")


def train_epoch(run: Run, epoch: int, batches: list[list], timer: EpochTimer,
                on_step: StepCallback | None) -> None:
    """The optimiser steps of ``epoch`` from ``progress.step`` on (a resumed epoch starts where
    its mid-epoch checkpoint was taken)."""
    ctx, progress, every = run.ctx, run.progress, run.config.train.checkpoint_every_steps
    run.model.train()
    steps = tqdm(range(progress.step, len(batches)), desc=f"epoch {epoch}", leave=False,
                 disable=not run.bars, initial=progress.step, total=len(batches))
    for step in steps:
        with timer.loading():
            batch = run.train_set.batch(shard(batches[step], ctx.rank, ctx.world), ctx.device)
        with timer.computing():
            loss, sq, n = train_step(run, batch, epoch, step)
        progress.train_sq, progress.train_count = progress.train_sq + sq, progress.train_count + n
        progress.step = step + 1
        steps.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if every and progress.step % every == 0 and progress.step < len(batches):
            run.save_state()
        if on_step is not None:
            on_step(progress)


def train_step(run: Run, batch: Batch, epoch: int, step: int) -> tuple[float, float, float]:
    """One AdamW step on ``batch``, unless the loss diverged (checked on the loss every rank
    agrees on, before the step is applied). Returns that loss and the step's squared errors
    and their count, summed over ranks."""
    errors, counts = batch_errors(run.net, batch)
    loss = (errors / counts).mean()  # each window's MSE, averaged (DDP: over all ranks)
    sq, n, loss_value = all_sum([float(errors.detach().sum()), float(counts.sum()),
                                 float(loss.detach())], run.ctx)
    loss_value /= run.ctx.world
    progress = run.progress
    if progress.first_loss is None:
        progress.first_loss = loss_value
    limit = run.config.train.divergence_factor * max(progress.first_loss, 1e-12)
    if not math.isfinite(loss_value) or loss_value > limit:
        raise run.diverged(f"loss diverged at epoch {epoch} step {step}: {loss_value:.4g} (first step "
                           f"{progress.first_loss:.4g}, limit {limit:.4g}) with lr "
                           f"{run.optimizer.param_groups[0]['lr']:.3g}; lower train.lr")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return loss_value, sq, n


def end_epoch(run: Run, epoch: int, trs: int, timer: EpochTimer, session_start: float) -> None:
    """Validate (after recomputing the trained BatchNorm statistics), step the scheduler, keep
    the best model, decide whether to stop, then write the curves and the training state.
    ``trs``: training TRs the epoch covered."""
    progress, cfg = run.progress, run.config.train
    timer.validating()
    recalibrate_batchnorm(run.model, run.train_set, run.ctx.device)
    val_loss = validation_loss(run.model, run.val_set, run.ctx)
    train_loss = progress.train_loss
    if not math.isfinite(val_loss):
        raise run.diverged(f"validation loss is {val_loss} at epoch {epoch}; lower train.lr")
    run.scheduler.step(val_loss)
    improved = val_loss < progress.best_val_loss
    lr = run.optimizer.param_groups[0]["lr"]
    progress.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                             "best": improved, **timer.columns(trs)})
    if improved:
        progress.best_val_loss, progress.best_epoch, progress.bad_epochs = val_loss, epoch, 0
        run.save_best(epoch, val_loss)
    else:
        progress.bad_epochs += 1
    progress.epoch, progress.step, progress.train_sq, progress.train_count = epoch + 1, 0, 0.0, 0.0
    progress.seconds = time.perf_counter() - session_start
    if 0 < cfg.early_stopping_patience <= progress.bad_epochs:
        progress.finished = "early_stopping"
    elif epoch + 1 == cfg.max_epochs:
        progress.finished = "max_epochs"
    if run.ctx.main:
        write_curves(run.dir, progress.history, plot=bool(progress.finished))
    run.save_state()
    log.info("epoch %d train %.5f val %.5f lr %.3g%s", epoch, train_loss, val_loss, lr,
             " (best)" if improved else "")


def validation_loss(model: EncodingModel, episodes: EpisodeSet, ctx: Dist, batch_windows: int = 4) -> float:
    """Mean squared error over every TR x target x subject of ``episodes`` (eval mode), summed
    over ranks."""
    model.eval()
    sq = count = 0.0
    with torch.no_grad():
        for group in batches_of(shard(episodes.eval_windows(), ctx.rank, ctx.world), batch_windows, False):
            errors, counts = batch_errors(model, episodes.batch(group, ctx.device, evaluation=True))
            sq += float(errors.sum())
            count += float(counts.sum())
    sq, count = all_sum([sq, count], ctx)
    return sq / count if count else float("nan")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None, prog: str = f"python -m {__package__}.train") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment TOML file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        result = train(config)
    except (ConfigError, RunStateError, TrainingDiverged, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 3 if isinstance(error, TrainingDiverged) else 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.summary(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
