"""Experiment configuration: TOML files, presets, --set overrides, and clear errors for bad ones."""
from __future__ import annotations

from pathlib import Path

import pytest

from training.config import (STUDY_PRESETS, ConfigError, ExperimentConfig, config_from_dict, load_config,
                             parse_override)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_study_protocol() -> None:
    config = load_config(None)
    assert (config.train.weight_decay, config.train.lr_factor, config.train.lr_patience) == (1e-3, 0.1, 5)
    assert (config.train.early_stopping_patience, config.train.max_epochs) == (15, 1000)
    assert (config.train.window_trs, config.model.kernel_trs, config.train.lr) == (80, 7, 1e-5)
    assert config.model.condition == "conv4" and config.model.batchnorm == "frozen-eval"


def test_file_then_overrides_win_over_preset(tmp_path: Path) -> None:
    path = write(tmp_path, 'preset = "sub-03"\n[train]\nlr = 2e-4\n[model]\ncondition = "head"\n')
    config = load_config(path, ["train.max_epochs=7", "model.condition=conv5", "subjects.ids=['sub-03']"])
    # preset sub-03 = (70 TRs, k 5, lr 1e-4); the file's lr wins over it, --set over the file
    assert (config.train.window_trs, config.model.kernel_trs) == (70, 5)
    assert config.train.lr == 2e-4
    assert config.train.max_epochs == 7 and config.model.condition == "conv5"
    assert config.subjects.ids == ["sub-03"]


@pytest.mark.parametrize("subject", sorted(STUDY_PRESETS))
def test_every_study_preset_applies(subject: str) -> None:
    config = load_config(None, [f"preset={subject}"])
    assert config.train.window_trs == STUDY_PRESETS[subject]["train.window_trs"]
    assert config.train.lr == STUDY_PRESETS[subject]["train.lr"]


def test_integers_are_accepted_for_floats_and_round_trip(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[train]\nlr = 1\nweight_decay = 0\n"))
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    again = config_from_dict(config.to_dict())
    assert again == config
    reread = load_config(write(tmp_path, config.to_toml()))
    assert reread == config


@pytest.mark.parametrize("text, message", [
    ("[train]\nlrr = 1e-4\n", "unknown key 'train.lrr'"),
    ("[trainer]\nlr = 1e-4\n", "unknown key 'trainer'"),
    ("[train]\nlr = \"fast\"\n", "train.lr must be float, got str"),
    ("[model]\nkernel_trs = 5.5\n", "model.kernel_trs must be int, got float"),
    ("[train]\nmax_epochs = true\n", "train.max_epochs must be int, got bool"),
    ("[subjects]\nids = \"sub-01\"\n", "subjects.ids must be a list of str"),
    ("train = 3\n", "train must be a table"),
    ("[model]\ncondition = \"conv9\"\n", "model.condition = 'conv9'"),
    ("[train]\nlr = -1.0\n", "train.lr must be > 0"),
    ("[subjects]\nmode = \"loso\"\nids = [\"sub-01\", \"sub-02\"]\nheld_out = \"sub-07\"\n",
     "subjects.held_out = 'sub-07' must be one of subjects.ids"),
    ("[subjects]\nids = [\"sub-01\", \"sub-02\"]\n", "exactly one subject in individual mode"),
    ("preset = \"sub-09\"\n", "preset = 'sub-09'"),
    ("[train\nlr = 1\n", "not valid TOML"),
])
def test_bad_files_name_the_key_and_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_bad_overrides_name_the_override() -> None:
    with pytest.raises(ConfigError, match=r"--set train\.lrr=1: unknown key 'train\.lrr'"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("/nonexistent/experiment.toml")


def test_override_values_are_toml_or_bare_words() -> None:
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override("subjects.ids=['sub-01', 'sub-02']") == ("subjects.ids", ["sub-01", "sub-02"])
    assert parse_override("model.condition=conv4") == ("model.condition", "conv4")
    assert parse_override("run.progress=false") == ("run.progress", False)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    assert config.run.name  # every experiment names its run directory
