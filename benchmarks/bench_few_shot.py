"""Cost of the few-shot sweep (training.few_shot) over the generated HEAR suite.

    .venv/bin/python benchmarks/bench_few_shot.py                       # default suite, 5 checkpoints
    .venv/bin/python benchmarks/bench_few_shot.py --draws 10 --ks 1,2,4,8,16,32 --work /tmp/fsb

What the main job would add: its heareval step already runs heareval's embeddings runner for
the pretrained checkpoint and the brain-aligned ones; the few-shot sweep reuses those
embeddings. So this script first makes the embeddings (pretrained plus perturbed copies
standing in for the 4 conv4 checkpoints: every weight times 1 + 5 % Gaussian noise, seeded;
timed separately, not part of the added cost, and reused when ``--work`` already has them),
then times :func:`training.few_shot.run_few_shot` from scratch (the added cost: probes,
tables, plots) and once more on the finished folder (a resume with nothing left to do).
It prints figures and asserts nothing. The load average is printed: other processes on the
same cores slow every figure.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import REPO, load_average, markdown_table  # noqa: E402


def make_checkpoints(folder: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """The pretrained checkpoint and ``n - 1`` perturbed copies (stand-ins for conv4 models)."""
    import torch

    from hear_brainsoundnet.checkpoints import load_checkpoint, pretrained_checkpoint, save_checkpoint

    paths = {"pretrained": pretrained_checkpoint()}
    generator = torch.Generator().manual_seed(seed)
    for i in range(1, n):
        path = folder / f"perturbed{i}.safetensors"
        if not path.is_file():
            model = load_checkpoint(paths["pretrained"]).model
            with torch.no_grad():
                for name, tensor in model.state_dict().items():
                    if tensor.is_floating_point() and "running" not in name:
                        tensor.mul_(1 + 0.05 * torch.randn(tensor.shape, generator=generator))
            save_checkpoint(path, model, provenance={"condition": "benchmark: pretrained x (1 + 5% noise)"})
        paths[f"sub-{i:02d}_perturbed"] = path
    return paths


def embed(label: str, checkpoint: Path, tasks: Path, emb_root: Path) -> float:
    """heareval's embeddings runner for one checkpoint: seconds (0 when every task is done:
    the runner would only spend its start-up, tensorflow import included, to skip them)."""
    done = list((emb_root / label).glob("*/*/.done.embeddings"))
    if len(done) == len([t for t in tasks.iterdir() if t.is_dir()]):
        return 0.0
    start = time.perf_counter()
    argv = [sys.executable, "-m", "training.heareval_compat", "embeddings", "hear_brainsoundnet",
            "--model", str(checkpoint), "--tasks-dir", str(tasks), "--embeddings-dir", str(emb_root / label)]
    log = emb_root / f"{label}.log"
    with open(log, "w") as handle:
        code = subprocess.run(argv, cwd=emb_root, stdout=handle, stderr=subprocess.STDOUT,
                              env={**__import__("os").environ, "PYTHONPATH": str(REPO)}).returncode
    if code != 0:
        raise SystemExit(f"embeddings runner failed for {label} (exit {code}); see {log}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="working folder (kept; default: a temporary one)")
    parser.add_argument("--suite", default="default", choices=("default", "tiny"))
    parser.add_argument("--checkpoints", type=int, default=5, help="pretrained + N-1 perturbed (default 5)")
    parser.add_argument("--ks", default="1,2,4,8,16,32")
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()

    from training.few_shot import run_few_shot
    from training.hear_tasks import write_task_suite

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_few_shot_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {load_average()}; work folder {work}")
    tasks = work / "tasks"
    if not tasks.is_dir():
        write_task_suite(tasks, args.suite)
    emb_root = work / "embeddings"
    emb_root.mkdir(exist_ok=True)
    checkpoints = make_checkpoints(work, args.checkpoints)
    embed_seconds = {label: embed(label, path, tasks, emb_root) for label, path in checkpoints.items()}
    print(f"embeddings (heareval runner, part of the main job already): "
          f"{sum(embed_seconds.values()):.1f} s for {len(checkpoints)} checkpoints (0: reused from --work)")

    out = work / "few_shot"
    shutil.rmtree(out, ignore_errors=True)
    dirs = {label: emb_root / label for label in checkpoints}
    start, cpu = time.perf_counter(), time.process_time()
    result = run_few_shot(dirs, out, args.ks, args.draws, baseline="pretrained", progress=False,
                          log=lambda m: None)
    fresh, fresh_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    again = run_few_shot(dirs, out, args.ks, args.draws, baseline="pretrained", progress=False,
                         log=lambda m: None)
    resume = time.perf_counter() - start

    per_task = result.scores.groupby("task").size()
    rows = [[task, int(n)] for task, n in per_task.items()]
    print(markdown_table(["task", "points (checkpoint x k x draw x fold)"], rows))
    print(f"\nfew-shot sweep from scratch: {fresh:.1f} s wall, {fresh_cpu:.1f} s CPU ({result.computed} "
          f"points, {result.fits} probe fits, ks {args.ks}, {args.draws} draws, {len(checkpoints)} checkpoints; skipped: "
          f"{len(result.skipped)} messages); rerun on the finished folder: {resume:.1f} s "
          f"({again.computed} points)")
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
