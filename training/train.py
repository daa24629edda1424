"""Fine-tune SoundNet to predict brain activity: the training loop, resumable and distributed.

    python -m training.train configs/synthetic_conv4.toml [--set train.lr=1e-4 ...]
    torchrun --nproc-per-node 2 -m training.train configs/synthetic_conv4.toml --set train.windows_per_batch=2

or from Python: ``train(load_config(path)) -> TrainResult``.

What one run does, top to bottom (:func:`train_once`):

1. **Setup**: distributed process group when launched by torchrun (NCCL on GPUs, gloo on
   CPUs), device, threads, seed, run directory (``run.out_dir/run.name``) with the config,
   locked for this run (``run.lock``; a second training on the same directory is refused).
2. **Data**: the split's training and validation episodes (:mod:`training.batches`).
3. **Model**: SoundNet-8 (pretrained, random for the null, or a given checkpoint) + one head
   per subject, in the configured condition (:mod:`training.model`); the frozen layers'
   output cached per episode where that is exact; the heads' input statistics measured.
4. **Optimiser**: AdamW on the trained parameters, ReduceLROnPlateau on the validation loss.
5. **Resume**: ``last.safetensors`` in the run directory, if any, restores everything.
6. **Epochs**: windows shuffled from (seed, epoch); per step the MSE, a divergence check,
   backward and the AdamW step (DDP averages gradients; each rank takes its share of every
   global batch); optional mid-epoch checkpoint. Then the trained BatchNorm layers' running
   statistics recomputed over the training windows, the validation loss (every TR of the
   validation runs, summed over ranks), the scheduler, ``best.safetensors`` when it improved,
   the curves and ``last.safetensors``; early stopping after ``early_stopping_patience``
   epochs without improvement.

Resuming a run killed at any point gives the same result as an uninterrupted run with the
same seed: on CPU bit for bit with the same thread count (``tests/test_resume.py``); a
2-process gloo run matches the single-process run with the same global batch to float
rounding (``tests/test_distributed.py``). Divergence (a non-finite loss, or one above
``divergence_factor`` x the first step's) stops the run with :class:`TrainingDiverged` before
that step is applied; nothing diverged is written (``best.safetensors`` keeps the last good
model, ``status.json`` says what happened).

Threads: on a CPU shared with other processes, prefer ``run.threads = 1`` per process (or one
process per core under torchrun): two-thread parallel regions stall whenever another process
holds a core (measured here: the frozen-feature cache 15-40x slower at 2 threads under load,
not at all slower at 1).

Leave-one-subject-out (``subjects.mode = "loso"``) trains the group model on every subject
but ``held_out`` (``<run>/group``), then only a new head for ``held_out`` on the frozen group
backbone (``<run>/<held_out>``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from hear_brainsoundnet.checkpoints import load_checkpoint, load_pretrained

from hear_brainsoundnet.files import atomic_write
from hear_brainsoundnet.soundnet import SoundNet8

from .batches import (DataSplits, EpisodeSet, batch_errors, batches_of, fit_head_statistics,
                      load_splits, prepare_data, recalibrate_batchnorm, shard)
from .config import ConfigError, ExperimentConfig, load_config
from .model import EncodingModel
from .state import (RunStateError, is_model_file, load_training_state, read_model_file,
                    read_run_config, run_lock, save_model, save_training_state, write_curves)

log = logging.getLogger("training")
KILL_AFTER_STEPS_ENV = "HEAR_BRAINSOUNDNET_KILL_AFTER_STEPS"  # test hook: SIGKILL after N steps
# Config keys that may change when a run is resumed (they do not change the result).
RESUMABLE_CHANGES = {"run.progress", "run.threads", "run.device", "train.resume"}


class TrainingDiverged(RuntimeError):
    """The loss became non-finite or exploded; nothing from the diverged steps was saved."""


@dataclass
class TrainResult:
    """What a finished run produced (paths are inside ``run_dir``)."""

    run_dir: Path
    best_checkpoint: Path  # best.safetensors: the EncodingModel with the lowest validation loss
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

    Returns the model and the subjects whose heads came from ``model.init`` (a run's
    ``best.safetensors``); the other heads start at zero and get their input statistics later.
    """
    init, condition = config.model.init, config.model.condition
    backbone = SoundNet8()  # seeded random initialisation: the null model's backbone
    heads: dict[str, dict[str, torch.Tensor]] = {}
    if condition == "null" and init not in ("pretrained", "random"):
        raise ConfigError(f"model.init = {init!r}: the null condition always starts from a random "
                          "backbone; leave model.init unset")
    if condition != "null" and init != "random":
        if init == "pretrained":
            state = load_pretrained().state_dict()
        elif is_model_file(init):  # another run's model: its backbone and heads
            state, _ = read_model_file(init)
            heads = {s: {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"heads.{s}.")}
                     for s in n_targets if any(k.startswith(f"heads.{s}.") for k in state)}
            state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        else:  # a hear-brainsoundnet checkpoint (validated, errors name the file)
            state = load_checkpoint(init).model.state_dict()
        backbone.load_state_dict({k: v for k, v in state.items() if k.startswith("blocks.")})
    model = EncodingModel(n_targets, kernel_trs=config.model.kernel_trs, condition=condition,
                          batchnorm=config.model.batchnorm, backbone=backbone)
    for subject, tensors in heads.items():
        try:
            model.heads[subject].load_state_dict(tensors)
        except RuntimeError as error:
            raise RunStateError(f"{init}: the head of {subject} does not fit this model "
                                f"(kernel_trs or targets differ): {error}") from None
    return model, sorted(heads)


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


def _kill_hook() -> int | None:
    value = os.environ.get(KILL_AFTER_STEPS_ENV)
    return int(value) if value else None


def _configure_logging(run_dir: Path, main: bool) -> None:
    """Epoch lines go to ``run_dir/train.log``; the console has the progress bars."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        if getattr(handler, "_training_run", False):
            log.removeHandler(handler)
    if main:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        handler._training_run = True  # type: ignore[attr-defined]
        log.addHandler(handler)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def evaluate(model: EncodingModel, episodes: EpisodeSet, ctx: Dist, batch_windows: int = 4) -> float:
    """Mean squared error over every TR x target x subject of ``episodes`` (eval mode)."""
    model.eval()
    sq = count = 0.0
    with torch.no_grad():
        for group in batches_of(shard(episodes.eval_windows(), ctx.rank, ctx.world), batch_windows, False):
            errors, counts = batch_errors(model, episodes.batch(group, ctx.device, evaluation=True))
            sq += float(errors.sum())
            count += float(counts.sum())
    sq, count = all_sum([sq, count], ctx)
    return sq / count if count else float("nan")


def train(config: ExperimentConfig, data: DataSplits | None = None) -> TrainResult:
    """Train the model ``config`` describes (both stages in leave-one-subject-out mode).

    ``data`` (from :func:`training.batches.load_splits`, with every configured subject) saves
    re-reading the data when several models train on the same subjects.
    """
    if config.subjects.mode != "loso":
        return train_once(config, data)
    held_out = config.subjects.held_out
    group_config = dataclasses.replace(
        config, run=dataclasses.replace(config.run, name=f"{config.run.name}/group"),
        subjects=dataclasses.replace(config.subjects, mode="group", held_out="",
                                     ids=[s for s in config.subjects.ids if s != held_out]))
    group = train_once(group_config, data)
    head_config = dataclasses.replace(
        config, run=dataclasses.replace(config.run, name=f"{config.run.name}/{held_out}"),
        model=dataclasses.replace(config.model, condition="head", init=str(group.best_checkpoint)),
        subjects=dataclasses.replace(config.subjects, mode="individual", ids=[held_out], held_out=""))
    head = train_once(head_config, data)
    return dataclasses.replace(head, config=config, stages={"group": group, held_out: head})


def train_once(config: ExperimentConfig, data: DataSplits | None = None) -> TrainResult:
    """One run: individual or group model (see the module docstring), holding the run
    directory's lock (:func:`training.state.run_lock`): a second writer is refused."""
    if int(os.environ.get("RANK", "0")) != 0:  # only rank 0 writes the run directory
        return _train_once(config, data)
    with run_lock(config.run_dir):
        return _train_once(config, data)


def _train_once(config: ExperimentConfig, data: DataSplits | None = None) -> TrainResult:
    # ---- 1. setup --------------------------------------------------------------------------
    ctx = setup_distributed(config.run.device)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    cfg_train, seed = config.train, config.run.seed
    if cfg_train.windows_per_batch % ctx.world:
        raise ConfigError(f"train.windows_per_batch = {cfg_train.windows_per_batch} must be a multiple "
                          f"of the number of processes ({ctx.world}): it is the global batch")
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    _configure_logging(run_dir, ctx.main)
    last_path, best_path = run_dir / "last.safetensors", run_dir / "best.safetensors"
    if last_path.is_file() and not cfg_train.resume:
        raise RunStateError(f"{last_path}: the run directory already holds a run; set "
                            "train.resume = true to continue it or choose a new run.name")
    if last_path.is_file():  # resuming: only with the run's own config, checked before any work
        _check_same_config(read_run_config(run_dir / "config.json"), config, run_dir / "config.json")
    progress_bars = config.run.progress and ctx.main
    torch.manual_seed(seed)

    # ---- 2. data ---------------------------------------------------------------------------
    plan = None
    if data is None:
        if ctx.main:
            plan = prepare_data(config)  # brain data checked, split's audio decoded: once, not per rank
        if ctx.world > 1:
            dist.barrier()
    splits = data if data is not None else load_splits(config, plan)
    subjects = config.subjects.ids
    splits = splits.restricted_to(subjects)

    # ---- 3. model --------------------------------------------------------------------------
    model, initialised_heads = build_model(config, {s: len(splits.target_names[s]) for s in subjects})
    model = model.to(ctx.device)
    make_set = lambda name, episodes: EpisodeSet(  # noqa: E731
        name, episodes, model, splits.tr, cfg_train.window_trs, cfg_train.cache_features, progress_bars)
    train_set = make_set("train", splits.train)
    val_set = make_set("validation", splits.validation)
    t0 = time.perf_counter()
    feature_dir = splits.feature_cache_dir
    if feature_dir is not None and ctx.world > 1:  # one rank computes, the others read
        if ctx.main:
            train_set.build_cache(ctx.device, feature_dir)
            val_set.build_cache(ctx.device, feature_dir)
        dist.barrier()
    train_set.build_cache(ctx.device, feature_dir)
    val_set.build_cache(ctx.device, feature_dir)
    cache_seconds = time.perf_counter() - t0

    # ---- 4. optimiser ----------------------------------------------------------------------
    groups = [{"params": [p for p in model.heads.parameters() if p.requires_grad], "lr": cfg_train.lr},
              {"params": [p for p in model.backbone.parameters() if p.requires_grad],
               "lr": cfg_train.lr * cfg_train.backbone_lr_scale}]
    # fused: one kernel for every parameter (5-20x faster than the default on CPU), same update
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg_train.lr,
                                  weight_decay=cfg_train.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg_train.lr_factor, patience=cfg_train.lr_patience)

    # ---- 5. resume or start ----------------------------------------------------------------
    progress: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "best_val_loss": math.inf,
                                "best_epoch": -1, "bad_epochs": 0, "first_loss": None,
                                "partial": [0.0, 0.0], "seconds": 0.0, "finished": None}
    if last_path.is_file():
        progress = load_training_state(last_path, model, optimizer)
        scheduler.load_state_dict(progress.pop("scheduler"))
        log.info("resumed %s at epoch %d step %d", run_dir, progress["epoch"], progress["step"])
    else:
        if set(initialised_heads) != set(subjects):
            mean, std = fit_head_statistics(model, train_set, ctx.device)
            for subject, head in model.heads.items():
                if subject not in initialised_heads:
                    head.set_input_statistics(mean, std)
        if ctx.main:
            _write_json(run_dir / "config.json", config.to_dict())
            atomic_write(run_dir / "config.toml", lambda tmp: Path(tmp).write_text(config.to_toml()))
            _write_json(run_dir / "data.json", splits.describe())
    if ctx.main and not progress["finished"]:  # a finished run is returned as it is (below)
        _write_json(run_dir / "status.json", {"status": "running", "pid": os.getpid()})

    net: torch.nn.Module = model
    if ctx.world > 1:
        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                      broadcast_buffers=False, find_unused_parameters=len(subjects) > 1)

    def save_state() -> None:
        if ctx.main:
            save_training_state(last_path, model, optimizer, {**progress, "scheduler": scheduler.state_dict()})

    def result(stop_reason: str) -> TrainResult:
        csv_path, png_path = run_dir / "curves.csv", run_dir / "curves.png"
        return TrainResult(run_dir, best_path, last_path, progress["best_epoch"], progress["best_val_loss"],
                           progress["epoch"], stop_reason, progress["history"], subjects,
                           {s: splits.target_names[s] for s in subjects}, csv_path, png_path,
                           progress["seconds"], config)

    def diverged(message: str) -> TrainingDiverged:
        if ctx.main:
            _write_json(run_dir / "status.json", {"status": "diverged", "message": message})
            if progress["history"]:
                write_curves(run_dir, progress["history"])
        log.error(message)
        return TrainingDiverged(f"{run_dir}: {message}")

    if progress["finished"]:
        return result(progress["finished"])

    # ---- 6. epochs -------------------------------------------------------------------------
    kill_after, steps_done = _kill_hook(), 0
    session_start = time.perf_counter() - progress["seconds"]
    epochs = tqdm(range(progress["epoch"], cfg_train.max_epochs), desc=run_dir.name, unit="epoch",
                  disable=not progress_bars, initial=progress["epoch"], total=cfg_train.max_epochs)
    stop_reason = "max_epochs"
    for epoch in epochs:
        epoch_start = time.perf_counter()
        model.train()
        batches = list(batches_of(train_set.train_windows(seed, epoch), cfg_train.windows_per_batch,
                                  drop_last=cfg_train.windows_per_batch > 1))
        if not batches:
            raise ConfigError(f"train.windows_per_batch = {cfg_train.windows_per_batch} is more than "
                              f"the {len(train_set.train_windows(seed, epoch))} training windows")
        data_seconds = compute_seconds = 0.0
        steps = tqdm(range(progress["step"], len(batches)), desc=f"epoch {epoch}", leave=False,
                     disable=not progress_bars, initial=progress["step"], total=len(batches))
        for step in steps:
            tick = time.perf_counter()
            prefix_before = train_set.prefix_seconds
            batch = train_set.batch(shard(batches[step], ctx.rank, ctx.world), ctx.device)
            tock = time.perf_counter()
            prefix_time = train_set.prefix_seconds - prefix_before  # frozen layers: compute, not data
            errors, counts = batch_errors(net, batch)
            loss = (errors / counts).mean()  # each window's MSE, averaged (DDP: over all ranks)
            sq, n, loss_value = all_sum([float(errors.detach().sum()), float(counts.sum()),
                                         float(loss.detach())], ctx)
            loss_value /= ctx.world
            # divergence: checked on the loss every rank agrees on, before the step is applied
            if progress["first_loss"] is None:
                progress["first_loss"] = loss_value
            limit = cfg_train.divergence_factor * max(progress["first_loss"], 1e-12)
            if not math.isfinite(loss_value) or loss_value > limit:
                raise diverged(f"loss diverged at epoch {epoch} step {step}: {loss_value:.4g} (first step "
                               f"{progress['first_loss']:.4g}, limit {limit:.4g}) with lr "
                               f"{optimizer.param_groups[0]['lr']:.3g}; lower train.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = time.perf_counter()
            data_seconds += tock - tick - prefix_time
            compute_seconds += done - tock + prefix_time

            progress["partial"] = [progress["partial"][0] + sq, progress["partial"][1] + n]
            progress["step"] = step + 1
            steps.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            every = cfg_train.checkpoint_every_steps
            if every and progress["step"] % every == 0 and progress["step"] < len(batches):
                save_state()
            steps_done += 1
            if kill_after is not None and steps_done >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: die like a preempted job

        val_start = time.perf_counter()
        recalibrate_batchnorm(model, train_set, ctx.device)
        val_loss = evaluate(model, val_set, ctx)
        train_loss = progress["partial"][0] / max(progress["partial"][1], 1.0)
        if not math.isfinite(val_loss):
            raise diverged(f"validation loss is {val_loss} at epoch {epoch}; lower train.lr")
        scheduler.step(val_loss)
        improved = val_loss < progress["best_val_loss"]
        epoch_seconds = time.perf_counter() - epoch_start
        progress["history"].append({
            "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
            "lr": optimizer.param_groups[0]["lr"], "best": improved, "epoch_seconds": round(epoch_seconds, 3),
            "compute_fraction": round(compute_seconds / max(val_start - epoch_start, 1e-9), 4),
            "train_trs_per_second": round(len(batches) * cfg_train.windows_per_batch * cfg_train.window_trs
                                          / max(val_start - epoch_start, 1e-9), 1),
            "data_seconds": round(data_seconds, 3), "compute_seconds": round(compute_seconds, 3),
            "val_seconds": round(time.perf_counter() - val_start, 3)})
        if improved:
            progress.update(best_val_loss=val_loss, best_epoch=epoch, bad_epochs=0)
            if ctx.main:
                save_model(best_path, model, epoch=epoch, val_loss=val_loss, config=config.to_dict(),
                           target_names={s: splits.target_names[s] for s in subjects}, tr=splits.tr,
                           data=splits.describe())
        else:
            progress["bad_epochs"] += 1
        progress.update(epoch=epoch + 1, step=0, partial=[0.0, 0.0],
                        seconds=time.perf_counter() - session_start)
        if 0 < cfg_train.early_stopping_patience <= progress["bad_epochs"]:
            stop_reason = "early_stopping"
        if stop_reason == "early_stopping" or epoch + 1 == cfg_train.max_epochs:
            progress["finished"] = stop_reason
        if ctx.main:
            write_curves(run_dir, progress["history"], plot=bool(progress["finished"]))
        save_state()
        epochs.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}",
                           best=f"{progress['best_val_loss']:.4f}")
        log.info("epoch %d train %.5f val %.5f lr %.3g%s", epoch, train_loss, val_loss,
                 optimizer.param_groups[0]["lr"], " (best)" if improved else "")
        if progress["finished"]:
            break

    if ctx.main:
        _write_json(run_dir / "status.json", {"status": "complete", "stop_reason": progress["finished"],
                                             "best_epoch": progress["best_epoch"],
                                             "best_val_loss": progress["best_val_loss"],
                                             "cache_seconds": round(cache_seconds, 3)})
    if ctx.world > 1:
        dist.barrier()
    return result(progress["finished"] or stop_reason)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
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
