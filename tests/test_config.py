"""Experiment configuration: TOML files, presets, --set overrides, and clear errors for bad ones."""
from __future__ import annotations

from pathlib import Path

import pytest

from training.config import STUDY_PRESETS, ConfigError, ExperimentConfig, load_config, parse_override

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
    ("[data]\nconfounds = [\"high_pass\", \"motions\"]\n", "data.confounds[1] = 'motions'"),
    ("[data]\nconfounds_motion = \"all\"\n", "data.confounds_motion = 'all'; choose one of basic"),
    ("[data]\nstandardize = \"zscore_ddof\"\n", "data.standardize = 'zscore_ddof'"),
    ("[data]\nsmoothing_fwhm = -8\n", "data.smoothing_fwhm must be >= 0"),
    ("[train]\nweight_decay = nan\n", "train.weight_decay must be a finite number, got nan"),
    ("[train]\nweight_decay = inf\n", "train.weight_decay must be a finite number, got inf"),
    ("[train]\nlr = inf\n", "train.lr must be a finite number, got inf"),
    ("[data]\ntr = inf\n", "data.tr must be a finite number, got inf"),
    ("[data]\ntr = -inf\n", "data.tr must be a finite number, got -inf"),
    ("[data]\nresample_atlas = \"yes\"\n", "data.resample_atlas must be bool"),
    ("[data]\nbrain_file = \"a.h5\"\n[subjects]\nmode = \"group\"\nids = [\"sub-01\", \"sub-02\"]\n",
     "data.brain_file = 'a.h5' names one file for 2 subjects; put {subject}"),
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
    for bad in ("train.weight_decay=nan", "train.lr=inf", "data.tr=inf"):
        with pytest.raises(ConfigError, match=f"--set {bad}: .* must be a finite number"):
            load_config(None, [bad])


def test_a_directory_or_unreadable_file_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path}: a directory, not a config file"):
        load_config(tmp_path)
    binary = tmp_path / "weights.toml"
    binary.write_bytes(b"\x80\x04\x95 not text")
    with pytest.raises(ConfigError, match="weights.toml: not a readable TOML file"):
        load_config(binary)
    from training.train import main  # the command line says it too, without a traceback

    assert main([str(tmp_path)]) == 2


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


def test_real_data_settings_are_config_keys() -> None:
    """Every extraction setting of the fMRIPrep reader is a --set away (issue: "unknown key")."""
    config = load_config(CONFIGS / "cneuromod_sub01.toml", [
        "data.root=/data/friends.fmriprep", "data.stimuli=/data/friends.stimuli", "data.resample_atlas=false",
        "data.smoothing_fwhm=6", "data.confounds=['high_pass', 'motion', 'global_signal']",
        "data.confounds_motion=basic", "data.standardize=none", "data.space=T1w",
        "data.atlas_labels=/data/mist.tsv"])
    assert (config.data.root, config.data.stimuli) == ("/data/friends.fmriprep", "/data/friends.stimuli")
    assert config.data.resample_atlas is False and config.data.smoothing_fwhm == 6.0
    assert config.data.confound_options() == {"strategy": ("high_pass", "motion", "global_signal"),
                                              "motion": "basic", "global_signal": "basic"}
    assert (config.data.standardize, config.data.space, config.data.atlas_labels) == ("none", "T1w", "/data/mist.tsv")
    assert load_config(None, ["data.confounds=[]"]).data.confound_options() is False


def test_shipped_real_data_configs_state_the_study_settings() -> None:
    """Only the paths are the user's: the rest is the study's protocol."""
    for name in ("cneuromod_sub01.toml", "cneuromod_sub01_stg.toml"):
        data = load_config(CONFIGS / name).data
        assert data.source == "fmriprep" and data.smoothing_fwhm == 8.0 and data.resample_atlas
        assert data.confound_options() == {"strategy": ("high_pass", "motion", "wm_csf"),
                                           "motion": "full", "wm_csf": "basic"}
        assert data.standardize == "zscore_sample" and (data.train_seasons, data.test_seasons) == ([1, 2, 3], [4])
    assert load_config(CONFIGS / "cneuromod_sub01.toml").data.atlas == "data/atlases/MIST_ROI.nii.gz"
    assert load_config(CONFIGS / "cneuromod_sub01_stg.toml").data.mask == "data/atlases/STG_mask.nii.gz"
    friends = load_config(CONFIGS / "friends_sub01.toml")
    assert friends.data.source == "algonauts" and not friends.data.brain_file
    assert (friends.data.train_seasons, friends.data.test_seasons) == ([1, 2, 3], [4])
    assert (friends.train.window_trs, friends.model.kernel_trs, friends.train.lr) == (80, 7, 1e-5)


# ---- the Literal choices -------------------------------------------------------------------------

def _literal_keys() -> dict[str, tuple[str, ...]]:
    """Every config key annotated with a Literal (or a list of one) and its allowed values."""
    import typing

    from training.config import SECTIONS

    keys = {}
    for section, cls in SECTIONS.items():
        for name, annotation in typing.get_type_hints(cls).items():
            if typing.get_origin(annotation) is list:
                (annotation,) = typing.get_args(annotation)
            if typing.get_origin(annotation) is typing.Literal:
                keys[f"{section}.{name}"] = typing.get_args(annotation)
    return keys


def test_the_fixed_choices_are_literal_types_and_their_exported_names() -> None:
    import typing

    from training import config as c

    keys = _literal_keys()
    assert keys["model.condition"] == c.CONDITIONS == ("head", "conv7", "conv6", "conv5", "conv4", "null")
    assert keys["model.batchnorm"] == c.BATCHNORM_MODES == ("frozen-eval", "eval", "batch-stats")
    assert keys["subjects.mode"] == c.SUBJECT_MODES and keys["data.source"] == c.DATA_SOURCES
    assert keys["data.confounds"] == c.CONFOUND_STRATEGIES and keys["data.standardize"] == c.STANDARDIZE
    for level in ("confounds_motion", "confounds_wm_csf", "confounds_global_signal"):
        assert keys[f"data.{level}"] == c.CONFOUND_LEVELS
    assert typing.get_args(c.Condition) == c.CONDITIONS


def test_synthetic_sizes_are_the_generators_sizes() -> None:
    from training.config import SYNTHETIC_SIZES
    from training.synthetic import SIZES

    assert set(SYNTHETIC_SIZES) == set(SIZES)
    for size in SIZES:
        assert load_config(None, [f"data.synthetic_size={size}"]).data.synthetic_size == size


@pytest.mark.parametrize("key", sorted(_literal_keys()))
def test_every_literal_key_accepts_its_choices_and_refuses_others(key: str) -> None:
    """Each choice of each Literal key loads (from a file's value) and a value outside them is
    refused naming the key, the value and every choice; a non-string names the type."""
    choices = _literal_keys()[key]
    is_list = key == "data.confounds"
    needs = {"subjects.mode=loso": ["subjects.ids=['sub-01', 'sub-02']", "subjects.held_out=sub-02"]}
    for choice in choices:
        value = f"['{choice}']" if is_list else f"'{choice}'"
        config = load_config(None, [f"{key}={value}", *needs.get(f"{key}={choice}", [])])
        section, name = key.split(".")
        got = getattr(getattr(config, section), name)
        assert got == ([choice] if is_list else choice)
    bad = "['no-such']" if is_list else "'no-such'"
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"{key}={bad}"])
    shown = f"{key}[0]" if is_list else key
    assert f"{shown} = 'no-such'; choose one of {', '.join(choices)}" in str(error.value)
    with pytest.raises(ConfigError, match=rf"{key}(\[0\])? must be str, got int 3"):
        load_config(None, [f"{key}={'[3]' if is_list else '3'}"])


def test_values_set_directly_are_checked_by_validate() -> None:
    """The check lives in validate(), so a config built in code is held to the same choices."""
    config = ExperimentConfig()
    config.model.condition = "conv9"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="built in code: model.condition = 'conv9'; choose one of head, conv7"):
        config.validate("built in code")
    config.model.condition = "conv5"
    config.data.confounds = ["motion", "scrubbing"]  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"data.confounds\[1\] = 'scrubbing'"):
        config.validate()


def test_update_sets_dotted_keys_with_the_files_checks() -> None:
    config = load_config(None)
    assert config.update({"train.max_epochs": 3, "train.lr": 1, "model.condition": "head"}, "my values") is config
    assert (config.train.max_epochs, config.train.lr, config.model.condition) == (3, 1.0, "head")
    assert isinstance(config.train.lr, float)
    with pytest.raises(ConfigError, match="my values: train.max_epochs must be int, got str '3'"):
        config.update({"train.max_epochs": "3"}, "my values")
    with pytest.raises(ConfigError, match="my values: unknown key 'train.epochs'"):
        config.update({"train.epochs": 3}, "my values")
    with pytest.raises(ConfigError, match="my values: model.batchnorm = 'frozen'; choose one of"):
        config.update({"model.batchnorm": "frozen"}, "my values")
