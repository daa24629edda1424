"""Fine-tuning throughput per condition, with and without the frozen-feature cache.

    .venv/bin/python benchmarks/bench_training.py                 # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_training.py --threads 1 --window-trs 70 --steps 10

For every training condition (``head``, ``conv7`` .. ``conv4``, ``null``, and ``conv4`` with the
study's BatchNorm behaviour, ``batch-stats``) it times the steps of the real training code
(:mod:`training.batches` windows -> :class:`training.model.EncodingModel` -> MSE -> backward ->
fused AdamW) on natural-like audio, one window of ``--window-trs`` TRs (the study: 60-80) per
step, and prints:

- **TRs/s**: training TRs per second of wall time (forward + backward + optimiser step + batch
  assembly), with the frozen layers' output cached per episode (computed once; its one-off
  cost is the "cache s" column, per hour of audio) and without (the frozen layers run on every
  window, without autograd);
- **compute %**: the fraction of the step's wall time spent in the network (forward, backward,
  optimiser; the frozen layers count as compute) rather than in assembling the batch (slicing
  the cache or the audio memory map, stacking targets): the data pipeline's overhead;
- a full :func:`training.train.train` run of 2 epochs (conv4, cached) whose per-epoch
  ``compute_fraction`` (time in forward/backward/step over the epoch's training wall time) is
  what the run directory's ``curves.csv`` reports.

Numbers are medians over ``--steps`` steps after one warm-up step. The load average is printed:
other processes on the same cores slow every figure.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import load_average, markdown_table, natural_like_base, set_threads  # noqa: E402

TR = 1.49
CASES = [("head", "frozen-eval"), ("conv7", "frozen-eval"), ("conv6", "frozen-eval"),
         ("conv5", "frozen-eval"), ("conv4", "frozen-eval"), ("conv4", "batch-stats"),
         ("null", "frozen-eval")]


def make_episodes(n_episodes: int, n_trs: int, n_targets: int):
    """Episodes of natural-like audio with random z-scored targets (speed is content-blind)."""
    from training.data import Episode

    rng = np.random.default_rng(0)
    base = natural_like_base(60.0)
    episodes = []
    for index in range(n_episodes):
        n = int(n_trs * TR * 22050) + 22050
        audio = np.roll(np.tile(base, -(-n // len(base)))[:n], 7919 * index).astype(np.float32)
        targets = rng.standard_normal((n_trs, n_targets)).astype(np.float32)
        episodes.append(Episode(f"s01e{index + 1:02d}a", audio, {"sub-01": targets}))
    return episodes


def time_condition(condition: str, batchnorm: str, cached: bool, episodes, args) -> dict:
    import torch

    from hear_brainsoundnet.checkpoints import load_pretrained
    from hear_brainsoundnet.soundnet import SoundNet8
    from training.batches import EpisodeSet, batch_errors
    from training.model import EncodingModel

    torch.manual_seed(0)
    backbone = SoundNet8()
    if condition != "null":
        backbone.load_state_dict({k: v for k, v in load_pretrained().state_dict().items()
                                  if k.startswith("blocks.")})
    model = EncodingModel({"sub-01": args.targets}, kernel_trs=args.kernel, condition=condition,
                          batchnorm=batchnorm, backbone=backbone)
    with torch.no_grad():
        for head in model.heads.values():
            head.conv.weight.normal_(0, 1e-3)  # a trained head: gradients reach the backbone
    episode_set = EpisodeSet("train", episodes, model, TR, args.window_trs, use_cache=cached)
    start = time.perf_counter()
    episode_set.build_cache()
    cache_seconds = time.perf_counter() - start
    audio_hours = sum(len(e.waveform) for e in episodes) / 22050 / 3600
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6,
                                  weight_decay=1e-3, fused=True)
    model.train()
    windows = episode_set.train_windows(seed=0, epoch=0)
    steps, data_times, compute_times = [], [], []
    for index in range(args.steps + 1):
        item = windows[index % len(windows)]
        tick = time.perf_counter()
        prefix_before = episode_set.prefix_seconds
        batch = episode_set.batch([item])
        tock = time.perf_counter()
        errors, counts = batch_errors(model, batch)
        loss = (errors / counts).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = time.perf_counter()
        prefix = episode_set.prefix_seconds - prefix_before
        if index:  # the first step warms up allocators and kernels
            steps.append(done - tick)
            data_times.append(tock - tick - prefix)
            compute_times.append(done - tock + prefix)
    step = statistics.median(steps)
    return {"trs_per_s": args.window_trs / step, "step_ms": 1000 * step,
            "compute": sum(compute_times) / (sum(compute_times) + sum(data_times)),
            "cache_s_per_hour": cache_seconds / audio_hours if episode_set.use_cache else None,
            "cacheable": model.prefix_cacheable}


def full_run(episodes, args) -> list[dict]:
    """Two epochs of the real loop (conv4, cached) on the same episodes; its curves' figures."""
    from training.data import DataSplits
    from training.config import load_config
    from training.data import Split
    from training.train import train

    out = Path(tempfile.mkdtemp(prefix="bench-training-"))
    try:
        config = load_config(None, [
            "model.condition=conv4", f"model.kernel_trs={args.kernel}", f"train.window_trs={args.window_trs}",
            "train.max_epochs=2", "train.lr=1e-6", f"run.out_dir={out}", "run.name=bench", "run.progress=false",
            f"run.threads={args.threads}"])
        split = Split(tuple(e.name for e in episodes[:-1]), (episodes[-1].name,))
        data = DataSplits(episodes[:-1], episodes[-1:], [], TR, {"sub-01": [f"t{i}" for i in range(args.targets)]},
                          split, {"sub-01": "benchmark"}, {"sub-01": {}})
        return train(config, data).history
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window-trs", type=int, default=80, help="TRs per window (the study: 60-80)")
    parser.add_argument("--kernel", type=int, default=7, help="head kernel in TRs")
    parser.add_argument("--targets", type=int, default=210, help="targets (the study's MIST parcels: 210)")
    parser.add_argument("--episodes", type=int, default=4, help="episodes of 160 TRs (about 4 min each)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    print(f"load average at start: {load_average()}; torch threads: {args.threads}; window "
          f"{args.window_trs} TRs, head kernel {args.kernel}, {args.targets} targets")
    episodes = make_episodes(args.episodes, max(160, 2 * args.window_trs), args.targets)
    rows = []
    for condition, batchnorm in CASES:
        label = condition if batchnorm == "frozen-eval" else f"{condition} ({batchnorm}, study)"
        cached = time_condition(condition, batchnorm, True, episodes, args)
        plain = time_condition(condition, batchnorm, False, episodes, args)
        rows.append([label,
                     f"{cached['trs_per_s']:.0f}" if cached["cacheable"] else "n/a (not exact)",
                     f"{100 * cached['compute']:.1f}" if cached["cacheable"] else "",
                     f"{cached['cache_s_per_hour']:.0f}" if cached["cacheable"] else "",
                     f"{plain['trs_per_s']:.0f}", f"{100 * plain['compute']:.1f}",
                     f"{cached['trs_per_s'] / plain['trs_per_s']:.1f}x" if cached["cacheable"] else ""])
        print(f"  {label}: done", file=sys.stderr)
    print()
    print(markdown_table(["condition", "TRs/s cached", "compute % cached", "cache s / h of audio",
                          "TRs/s uncached", "compute % uncached", "speed-up"], rows))
    history = full_run(episodes, args)
    print()
    print("train() conv4 (cached), per epoch: " + "; ".join(
        f"epoch {row['epoch']}: compute fraction {100 * row['compute_fraction']:.1f} %, "
        f"{row['train_trs_per_second']:.0f} TRs/s, data {row['data_seconds']:.3f} s, "
        f"compute {row['compute_seconds']:.3f} s, validation {row['val_seconds']:.2f} s" for row in history))
    print(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
