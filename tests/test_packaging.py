"""The wheel carries what an installed package needs: the checkpoint manifest and the experiment
files of the main job, and finds them when installed outside the repository."""
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
                "training/configs/synthetic_conv4.toml", "training/configs/synthetic_head.toml",
                "training/configs/friends_sub01.toml", "hear_brainsoundnet/embeddings.py", "training/train.py"}
    assert expected <= names, sorted(expected - names)
    assert not any(name.startswith(("tests/", "benchmarks/", "configs/", "weights/")) for name in names)


def test_installed_package_finds_its_manifest_and_configs(wheel, tmp_path):
    """Unpacked away from the repository (as pip installs it), the package reads its own copies."""
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = ("import hear_brainsoundnet.hub as hub, training.cli as cli; "
            "print(hub.DEFAULT_MANIFEST); print(cli.CONFIGS_DIR)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr[-2000:]
    manifest, configs = (Path(line) for line in done.stdout.split())
    assert manifest == target / "hear_brainsoundnet" / "weights" / "manifest.json"
    assert configs == target / "training" / "configs"
    assert (configs / "synthetic_conv4.toml").read_text() == (REPO / "configs" / "synthetic_conv4.toml").read_text()
