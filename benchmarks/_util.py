"""Helpers shared by the benchmark scripts: timing, peak memory, child processes, machine peak.

Benchmarks print figures; they never assert them. Every configuration whose peak memory is
reported runs in a fresh child process (``run_child``), because a process's peak resident
memory only ever grows.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]


def natural_like_base(seconds: float = 60.0, seed: int = 0):
    """``seconds`` of natural-like float32 audio (speech-, music-, noise-like segments and
    silences, from ``tests/signals.py``), as a numpy array."""
    # Loaded by path: another distribution in the venv installs a top-level "tests" package.
    spec = importlib.util.spec_from_file_location("_bench_signals", REPO / "tests" / "signals.py")
    signals = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(signals)
    return signals.natural_like(seconds, seed=seed)


def tiled_audio(base, seconds: float, batch: int = 1, sample_rate: int = 22050):
    """(batch, samples) float32 tensor: ``base`` repeated to ``seconds`` (speed is content-blind)."""
    import numpy as np
    import torch

    n = int(round(seconds * sample_rate))
    tiled = np.tile(base, -(-n // len(base)))[:n]
    audio = torch.from_numpy(np.ascontiguousarray(tiled, dtype=np.float32))
    return audio[None] if batch == 1 else audio[None].repeat(batch, 1)  # no second copy of a long clip


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
                budget_s: float | None = None) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` timed calls (after ``warmup`` untimed ones).

    With ``budget_s``, stops early once the timed calls have used that much time (at least
    one call is always timed), so slow configurations keep the whole run short.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if budget_s is not None and sum(times) >= budget_s:
            break
    return statistics.median(times), times


def set_threads(n: int) -> None:
    """Pin torch (and the OpenMP/MKL pools it uses) to ``n`` threads."""
    import torch

    torch.set_num_threads(n)


def child_env(threads: int) -> dict[str, str]:
    """Environment for a child that must use ``threads`` threads from its first import on."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_child(script: Path, args: Sequence[str], threads: int, timeout_s: float = 600) -> dict:
    """Run ``script args`` in a fresh interpreter; it must print one JSON object as its last line."""
    result = subprocess.run([sys.executable, str(script), *args], env=child_env(threads),
                            capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    """The CPU's model name, core count and vector extensions, for the report's header."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2+FMA" if {"avx2", "fma"} <= flags else "no AVX2"
    return f"{name}, {os.cpu_count()} cores, {vector}"


def flops_per_cycle_per_core() -> int:
    """Single-precision FLOP per cycle and core, assuming two FMA units (Xeon server cores).

    AVX-512: 2 units x 16 lanes x 2 (multiply + add) = 64; AVX2: 2 x 8 x 2 = 32.
    """
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    return 64 if "avx512f" in flags else 32


def nominal_clock_ghz() -> float | None:
    """The nominal clock from /proc/cpuinfo (a VM often reports only this; turbo may be higher)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1]) / 1000
    except (OSError, ValueError):
        pass
    return None


def sgemm_gflops(threads: int, n: int = 2048, repeats: int = 7) -> float:
    """Best single-precision matrix-product rate (n x n x n) on ``threads`` threads: the
    practical peak that an MKL-bound workload can reach on this machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = min(_timed(lambda: torch.mm(a, b, out=out)) for _ in range(repeats))
    torch.set_num_threads(previous)
    return 2 * n ** 3 / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_average() -> str:
    """The 1-minute load average: other processes on a shared machine slow every figure."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (numbers already formatted by the caller)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
