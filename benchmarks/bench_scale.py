"""Full scale: one CNeuroMod subject's worth of data, generated, decoded, cached and trained on.

    .venv/bin/python benchmarks/bench_scale.py --hours 1.6            # reduced: 1 episode per season
    .venv/bin/python benchmarks/bench_scale.py                        # full: 36 h, 87,000 TRs (hours)
    .venv/bin/python benchmarks/bench_scale.py --data /big/disk/scale --threads 2

The data is the synthetic size ``subject`` (:data:`training.synthetic.SIZES`): seasons 1-4 of
23 episodes, two halves of about 11.75 min each (184 runs, about 87,000 TRs of 1.49 s, 36 h of
soundtrack as 16 kHz FLAC), 1000 parcels in the Algonauts HDF5 layout. ``--hours H`` keeps the
run length and the 1000 parcels and takes fewer episodes per season (at least one; each
episode is about 1.57 h of audio over its two halves), so a reduced run exercises the same
code at the same per-run sizes. An existing dataset in ``--data`` of the same shape is reused.

Each stage runs in a fresh child process, so that its peak memory is its own
(``os.wait4``'s ``ru_maxrss``, which counts every resident page, memory-mapped files
included; a sampler also reads the child's ``/proc/<pid>/status`` every 0.2 s and reports the
peaks of anonymous memory, ``RssAnon``, and of file pages mapped in, ``RssFile``):

1. **generate**: the streaming generator (one soundtrack and one run in memory at a time);
2. **decode**: read every brain file, decode and resample the split's soundtracks to
   22,050 Hz float32 (the audio cache; :func:`training.data.loading.prepare_data`);
3. **head** and **conv4**: one epoch each (``--epochs``) of ``python -m training.train``
   with the study's settings for sub-01 (80-TR windows, kernel 7, lr 1e-5): the frozen
   layers' features are computed and cached first (the "feature cache" time, from the
   run's ``status.json``), then training and validation (``epoch_seconds`` and
   ``val_seconds`` from ``curves.csv``).

It prints one markdown table (time, peak RSS, RssAnon / RssFile peaks per stage), the disk
used by each folder, and the run's sizes. Targets on the 2-core development machine at full
scale: peak RSS <= 4 GB per stage, a conv4 epoch <= 3 min. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import REPO, child_env, load_average, markdown_table  # noqa: E402

HOURS_PER_SEASON_EPISODE = 4 * 2 * 705.0 / 3600  # one episode in each of 4 seasons, two halves of ~705 s

GENERATE = """
import sys, time
from training.synthetic import generate_friends_like
t = time.perf_counter()
generate_friends_like(sys.argv[1], size="subject", episodes_per_season=int(sys.argv[2]))
print("seconds", time.perf_counter() - t)
"""

DECODE = """
import sys, time
from training.config import load_config
from training.data.loading import prepare_data
config = load_config(sys.argv[1])
t = time.perf_counter()
prepare_data(config)
print("seconds", time.perf_counter() - t)
"""

CONFIG = """# written by benchmarks/bench_scale.py
preset = "sub-01"
[run]
name = "{name}"
out_dir = "{runs}"
threads = {threads}
progress = false
[data]
source = "synthetic"
root = "{root}"
cache_dir = "{cache}"
synthetic_size = "subject"
train_seasons = [1, 2, 3]
test_seasons = [4]
[model]
condition = "{condition}"
[train]
max_epochs = {epochs}
early_stopping_patience = 0
resume = false
"""


def _status_kb(pid: int) -> dict[str, int]:
    """RssAnon / RssFile of a live process, in KiB (empty once it has exited)."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                values[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return values


def run_stage(argv: list[str], threads: int, log_path: Path) -> dict[str, float]:
    """Run ``argv`` in a fresh process; its wall time, peak RSS and peaks of RssAnon / RssFile (MB)."""
    peaks = {"RssAnon": 0, "RssFile": 0}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, cwd=REPO, env=child_env(threads), stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for key, value in _status_kb(process.pid).items():
                    peaks[key] = max(peaks[key], value)
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        done.set()
        sampler.join()
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed; see {log_path}:\n{log_path.read_text()[-3000:]}")
    return {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "rss_anon_mb": peaks["RssAnon"] / 1024, "rss_file_mb": peaks["RssFile"] / 1024}


def disk_mb(path: Path) -> float:
    """Bytes of the regular files under ``path`` (or of the file), in MB."""
    if path.is_file():
        return path.stat().st_size / 1e6
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6 if path.exists() else 0.0


def existing_shape(root: Path) -> int | None:
    """Episodes per season of a complete ``subject`` dataset in ``root``, else None."""
    description = root / "dataset_description.json"
    if not description.is_file():
        return None
    manifest = json.loads(description.read_text())["SyntheticFriends"]
    return manifest["config"]["episodes_per_season"] if manifest["size"] == "subject" else None


def train_stage(work: Path, condition: str, args: argparse.Namespace) -> dict[str, float]:
    """One training run of ``condition`` in a fresh process, with its per-epoch figures."""
    name = f"scale_{condition}"
    config = work / "logs" / f"{name}.toml"
    config.write_text(CONFIG.format(name=name, runs=work / "runs", threads=args.threads, root=work / "dataset",
                                    cache=work / "cache", condition=condition, epochs=args.epochs))
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time: this times one epoch
    figures = run_stage([sys.executable, "-m", "training.train", str(config)], args.threads,
                        work / "logs" / f"{name}.log")
    status = json.loads((run_dir / "status.json").read_text())
    rows = list(csv.DictReader(open(run_dir / "curves.csv")))
    epoch = rows[-1]
    train_s = float(epoch["epoch_seconds"]) - float(epoch["val_seconds"])
    figures.update(cache_seconds=float(status.get("cache_seconds", float("nan"))), train_seconds=train_s,
                   val_seconds=float(epoch["val_seconds"]), epoch_seconds=float(epoch["epoch_seconds"]),
                   trs_per_second=float(epoch["train_trs_per_second"]))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "scale",
                        help="work folder: dataset/, cache/, runs/, logs/ (default: data/scale)")
    parser.add_argument("--hours", type=float, default=None,
                        help="about this many hours of soundtrack (default: the full 36 h)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--conditions", default="head,conv4")
    args = parser.parse_args(argv)
    episodes = 23 if args.hours is None else max(1, round(args.hours / HOURS_PER_SEASON_EPISODE))
    work = args.data.resolve()
    root, logs = work / "dataset", work / "logs"  # the generator wants an empty folder of its own
    logs.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {load_average()}; {episodes} episode(s) per season x 4 seasons x 2 halves")
    stages: dict[str, dict[str, float]] = {}
    have = existing_shape(root)
    if have is not None and have != episodes:
        raise SystemExit(f"{root} holds a dataset of {have} episodes per season; use another --data")
    if have is None:
        stages["generate"] = run_stage([sys.executable, "-c", GENERATE, str(root), str(episodes)],
                                       args.threads, logs / "generate.log")
    decode_config = logs / "scale_decode.toml"
    decode_config.write_text(CONFIG.format(name="decode", runs=work / "runs", threads=args.threads, root=root,
                                           cache=work / "cache", condition="head", epochs=1))
    stages["decode + audio cache"] = run_stage([sys.executable, "-c", DECODE, str(decode_config)],
                                               args.threads, logs / "decode.log")
    for condition in args.conditions.split(","):
        stages[f"train {condition}"] = train_stage(work, condition, args)
    truth = json.loads((root / "ground_truth.json").read_text())
    n_trs = sum(truth["n_trs"].values())
    hours = sum(truth["n_trs"].values()) * 1.49 / 3600
    print(f"\n{len(truth['n_trs'])} runs, {n_trs} TRs, {hours:.1f} h of soundtrack, "
          f"{len(truth['parcels'])} parcels, threads {args.threads}, load average at end: {load_average()}\n")
    rows = []
    for name, f in stages.items():
        rows.append([name, f"{f['seconds']:.0f}", f"{f['peak_rss_mb']:.0f}", f"{f['rss_anon_mb']:.0f}",
                     f"{f['rss_file_mb']:.0f}",
                     f"{f['cache_seconds']:.0f}" if "cache_seconds" in f else "",
                     f"{f['train_seconds']:.0f} + {f['val_seconds']:.0f}" if "train_seconds" in f else "",
                     f"{f['trs_per_second']:.0f}" if "trs_per_second" in f else ""])
    print(markdown_table(["stage", "wall s", "peak RSS MB", "RssAnon MB", "RssFile MB",
                          "feature cache s", "epoch: train + val s", "train TRs/s"], rows))
    print()
    folders = {"stimuli (FLAC)": root / "stimuli", "brain (HDF5)": root / "algonauts",
               "audio cache (22,050 Hz float32)": work / "cache" / "audio",
               "all caches (audio, features, targets)": work / "cache", "runs": work / "runs", "everything": work}
    print(markdown_table(["disk", "MB"], [[k, f"{disk_mb(v):.0f}"] for k, v in folders.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
