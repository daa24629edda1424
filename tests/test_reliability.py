"""Faults around a run directory: a second writer, a killed lock holder, a corrupt config.json.

The lock tests use two real processes: a holder that takes the lock as a training does, and
``python -m training.train`` (or ``train()`` here) as the second writer.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import load_config
from training.state import LOCK_FILENAME, RunLockedError, RunStateError, run_lock
from training.train import train

REPO = Path(__file__).resolve().parent.parent
HOLD = """
import sys, time
from pathlib import Path
from training.state import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def config_for(tmp_path: Path):
    """A run config; nothing in these tests gets as far as reading its data."""
    return load_config(None, [
        "data.source=synthetic", "data.synthetic_size=tiny", f"data.root={tmp_path / 'data'}",
        f"data.cache_dir={tmp_path / 'cache'}", f"run.out_dir={tmp_path / 'runs'}", "run.name=locked",
        "run.progress=false", "run.threads=1"])


@pytest.fixture
def holder(tmp_path):
    """Another process holding the run directory's lock, as a running training does."""
    run_dir = tmp_path / "runs" / "locked"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline().strip() == "locked"
        yield process, run_dir
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def test_a_second_training_is_refused_naming_the_holder(holder, tmp_path):
    process, run_dir = holder
    config_path = tmp_path / "locked.toml"
    config_path.write_text(config_for(tmp_path).to_toml())
    second = subprocess.run([sys.executable, "-m", "training.train", str(config_path)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert (f"error: {run_dir}: another training is writing this run directory (pid {process.pid} on "
            f"{socket.gethostname()}, started ") in second.stderr
    assert "choose another run.name" in second.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILENAME]  # it wrote nothing
    with pytest.raises(RunLockedError, match=f"pid {process.pid}"):
        train(config_for(tmp_path))  # in this process too
    assert process.poll() is None  # the holder was not disturbed


def test_a_killed_holder_leaves_no_stale_lock(holder, tmp_path):
    process, run_dir = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run_dir / LOCK_FILENAME).is_file()  # the file stays; the lock went with the process
    with run_lock(run_dir) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("content, message", [
    ('{"run": {"name": "locked"', r"config.json: corrupt run configuration \(JSONDecodeError"),
    ("[1, 2]", r"config.json: corrupt run configuration \(expected an object of sections\)"),
    ('{"run": 3}', r"config.json: corrupt run configuration \(expected an object of sections\)"),
    (b"\xff\xfe{}", r"config.json: corrupt run configuration \(UnicodeDecodeError"),
    (None, r"config.json: missing, but the run directory holds a training state"),
])
def test_a_corrupt_run_config_is_named_and_releases_the_lock(tmp_path, content, message):
    """Resuming reads the run's config.json first; damage there is an error naming the file
    (before: a raw JSONDecodeError or FileNotFoundError, after the data had been prepared)."""
    config = config_for(tmp_path)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "last.safetensors").write_bytes(b"")  # a state to resume: config.json is read first
    if isinstance(content, bytes):
        (run_dir / "config.json").write_bytes(content)
    elif content is not None:
        (run_dir / "config.json").write_text(content)
    with pytest.raises(RunStateError, match=message):
        train(config)
    assert not (tmp_path / "data").exists()  # refused before any data work
    with run_lock(run_dir):  # released although train() raised
        pass
