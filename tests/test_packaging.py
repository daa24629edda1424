"""The wheel carries what an installed package needs: the checkpoint manifest and the experiment
files of the main job, and finds them when installed outside the repository. The training code
installs as ``hear_brainsoundnet.training`` (no generic top-level ``training`` package) with a
``hear-brainsoundnet`` console script."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: an old build/ folder in the checkout could leak stale modules into it.
    source = out / "source"
    local = {".git", ".venv", "build", "dist", "runs", "data", "report", ".cache"}  # top level only

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n == "__pycache__" or n.endswith(".egg-info")
                or (Path(folder) == REPO and n in local)}

    shutil.copytree(REPO, source, ignore=ignore)
    # No build isolation: the locked setuptools of the environment, no network.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(source)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("hear_brainsoundnet-*.whl")
    return path


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"hear_brainsoundnet/weights/manifest.json", "hear_brainsoundnet/weights/model_card_template.md",
                "hear_brainsoundnet/training/configs/synthetic_conv4.toml",
                "hear_brainsoundnet/training/configs/synthetic_head.toml",
                "hear_brainsoundnet/training/configs/friends_sub01.toml", "hear_brainsoundnet/embeddings.py",
                "hear_brainsoundnet/training/train.py", "hear_brainsoundnet/training/data/fmri/fmriprep.py"}
    assert expected <= names, sorted(expected - names)
    # Every module of both packages ships (a subpackage missing from setup.cfg would not).
    sources = {f"hear_brainsoundnet/{p.relative_to(REPO / 'hear_brainsoundnet').as_posix()}"
               for p in (REPO / "hear_brainsoundnet").rglob("*.py")}
    sources |= {f"hear_brainsoundnet/training/{p.relative_to(REPO / 'training').as_posix()}"
                for p in (REPO / "training").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"hear_brainsoundnet"}, top_level
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "hear-brainsoundnet = hear_brainsoundnet.training.cli:main" in \
        zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_package_finds_its_manifest_and_configs(wheel, tmp_path):
    """Unpacked away from the repository (as pip installs it), the package reads its own copies."""
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = ("import hear_brainsoundnet.hub as hub, hear_brainsoundnet.training.main_job as main_job; "
            "print(hub.DEFAULT_MANIFEST); print(main_job.CONFIGS_DIR)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr[-2000:]
    manifest, configs = (Path(line) for line in done.stdout.split())
    assert manifest == target / "hear_brainsoundnet" / "weights" / "manifest.json"
    assert configs == target / "hear_brainsoundnet" / "training" / "configs"
    assert (configs / "synthetic_conv4.toml").read_text() == (REPO / "configs" / "synthetic_conv4.toml").read_text()


def test_console_script_from_the_installed_wheel(wheel, tmp_path):
    """pip installs the ``hear-brainsoundnet`` command; it runs the training package's command line
    from the wheel's files, away from the repository, and no ``training`` package is importable."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    script = target / "bin" / "hear-brainsoundnet"
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0 and done.stdout.startswith("usage: hear-brainsoundnet"), done.stderr[-2000:]
    for command in ("main", "train", "hear-eval", "brain-score"):
        assert command in done.stdout
    done = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0 and done.stdout.startswith("usage: hear-brainsoundnet train"), done.stderr[-2000:]
    code = ("import importlib.util, hear_brainsoundnet.training.train as t; "
            "print(t.__file__); print(importlib.util.find_spec('training'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    module, training_spec = done.stdout.split()[0], done.stdout.split("\n")[1]
    assert Path(module) == target / "hear_brainsoundnet" / "training" / "train.py"
    assert training_spec == "None"
