"""Experiment configuration: one dataclass per concern, loaded from one TOML file per experiment.

A file looks like::

    preset = "sub-01"            # optional: the study's (batch TRs, kernel, lr) for a subject

    [run]                        # where and how: RunConfig
    name = "sub01_conv4"
    [data]                       # which data: DataConfig
    source = "synthetic"
    [model]                      # which network and condition: ModelConfig
    condition = "conv4"
    [train]                      # the optimisation: TrainConfig
    lr = 1e-4
    [subjects]                   # individual / group / leave-one-subject-out: SubjectsConfig
    mode = "individual"
    ids = ["sub-01"]

Values are resolved in this order: dataclass defaults (the study's values), then the preset,
then the file, then command-line overrides (``--set train.lr=1e-4``). An unknown section or
key, or a value of the wrong type, raises :class:`ConfigError` naming the key and the file (or
the override) at fault. Keys with a fixed set of values (``model.condition``, ``data.source``, ...)
are typed with ``Literal``; :func:`check_choices` (run by :meth:`ExperimentConfig.validate`)
derives the allowed values from those types. Code sets values directly on the dataclasses (or
dotted keys with :meth:`ExperimentConfig.update`) and validates.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import tomli_w

# The fixed choices of the config's keys are these Literal types: the dataclasses' annotations
# use them, :func:`check_choices` derives the allowed values from them (so the type and the check
# cannot disagree), and the tuples below (for other modules' checks and argparse choices) too.
Condition = Literal["head", "conv7", "conv6", "conv5", "conv4", "null"]
BatchnormMode = Literal["frozen-eval", "eval", "batch-stats"]
SubjectMode = Literal["individual", "group", "loso"]
DataSource = Literal["synthetic", "algonauts", "fmriprep", "arrays"]
# The synthetic dataset's sizes: the keys of training.synthetic.SIZES (a test keeps them equal).
SyntheticSize = Literal["tiny", "default", "large", "subject"]
# nilearn.interfaces.fmriprep.load_confounds: strategies that need no other file, and levels.
ConfoundStrategy = Literal["high_pass", "motion", "wm_csf", "global_signal", "compcor", "scrub",
                           "non_steady_state"]
ConfoundLevel = Literal["basic", "power2", "derivatives", "full"]
Standardize = Literal["zscore_sample", "zscore", "psc", "none"]

CONDITIONS: tuple[str, ...] = typing.get_args(Condition)
BATCHNORM_MODES: tuple[str, ...] = typing.get_args(BatchnormMode)
SUBJECT_MODES: tuple[str, ...] = typing.get_args(SubjectMode)
DATA_SOURCES: tuple[str, ...] = typing.get_args(DataSource)
SYNTHETIC_SIZES: tuple[str, ...] = typing.get_args(SyntheticSize)
CONFOUND_STRATEGIES: tuple[str, ...] = typing.get_args(ConfoundStrategy)
CONFOUND_LEVELS: tuple[str, ...] = typing.get_args(ConfoundLevel)
STANDARDIZE: tuple[str, ...] = typing.get_args(Standardize)

# The study's per-subject choices for parcel models (study.md, "Fine-tuning protocol"):
# batch TRs, head kernel k in TRs, learning rate. "group" is the group model's.
STUDY_PRESETS: dict[str, dict[str, Any]] = {
    "sub-01": {"train.window_trs": 80, "model.kernel_trs": 7, "train.lr": 1e-5},
    "sub-02": {"train.window_trs": 80, "model.kernel_trs": 7, "train.lr": 1e-5},
    "sub-03": {"train.window_trs": 70, "model.kernel_trs": 5, "train.lr": 1e-4},
    "sub-04": {"train.window_trs": 80, "model.kernel_trs": 6, "train.lr": 1e-5},
    "sub-05": {"train.window_trs": 60, "model.kernel_trs": 7, "train.lr": 1e-6},
    "sub-06": {"train.window_trs": 70, "model.kernel_trs": 6, "train.lr": 1e-5},
    "group": {"train.window_trs": 75, "model.kernel_trs": 7, "train.lr": 1e-5},
}


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and its source."""


@dataclass
class RunConfig:
    """Where a run writes and how it behaves on this machine."""

    name: str = "run"  # the run directory is out_dir/name
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    progress: bool = True  # tqdm progress bars


@dataclass
class DataConfig:
    """Which brain data and soundtracks, how targets are extracted, and how episodes are split.

    ``source`` picks the reader:

    - ``synthetic``: the embedded Friends-like dataset, generated into ``root`` on first use
      at ``synthetic_size``.
    - ``algonauts``: the Algonauts 2025 release (a datalad clone of
      ``algonauts_2025.competitors``). **Two paths:** ``root`` = its ``fmri/`` folder and
      ``stimuli`` = its ``stimuli/movies/friends/`` folder. Each subject's Friends file is
      found by its BIDS entities (``sub-XX`` and ``task-friends``; Movie10 files beside it
      are ignored); ``brain_file`` names it explicitly instead (``{subject}`` is replaced
      by the subject id). A file not fetched yet says ``datalad get <path>``.
    - ``fmriprep``: CNeuroMod ``friends.fmriprep`` derivatives. **Two paths:** ``root`` = the
      derivatives folder (holding ``sub-XX/ses-YYY/func/``) and ``stimuli`` = the
      ``friends.stimuli`` folder; the targets are ``atlas`` (a labels image: parcels) or
      ``mask`` (voxels), by default expected at the path the shipped config names. Runs of
      ``space`` are read (space-T1w files are ignored); an atlas or mask on another grid is
      resampled to the BOLD grid (nearest neighbour) unless ``resample_atlas`` is false;
      ``smoothing_fwhm`` (mm, 0 = none), the ``confounds`` strategy of nilearn's
      ``load_confounds`` (with ``confounds_motion``, ``confounds_wm_csf``,
      ``confounds_global_signal``; an empty list = no confound regression) and the per-run
      ``standardize`` are the extraction settings (defaults: the study's, except smoothing).
    - ``arrays``: per-run .npy/.npz under ``root/<subject>``.

    ``stimuli`` is searched recursively for ``friends_s01e02a.mkv`` (or wav/flac/mp4):
    full-episode files (``friends_s01e01.mkv``) and other films are ignored. ``cache_dir``
    holds decoded audio, extracted targets and cached features (default ``root/cache``;
    point it outside a datalad clone). Every path is read relative to the working directory.

    Only runs with both fMRI and a soundtrack are split and decoded. Splits follow the
    study: the last season (or ``test_seasons``) is the test set, the other seasons (or
    ``train_seasons``) are split into training and validation by whole episode (both
    halves ``a``/``b`` on the same side; ``val_fraction`` of the episodes, drawn with
    ``split_seed``); explicit episode lists replace that rule.
    """

    source: DataSource = "synthetic"
    root: str = "data/synthetic"
    stimuli: str = ""  # default: the reader's own location under root
    cache_dir: str = ""  # default: root/cache
    synthetic_size: SyntheticSize = "default"  # training.synthetic.SIZES
    synthetic_seed: int = 0
    brain_file: str = ""  # algonauts: this HDF5 file ("{subject}" -> the subject id); default: found
    atlas: str = ""  # fmriprep: labels image (parcels)
    atlas_labels: str = ""  # fmriprep: region names, a BIDS dseg.tsv (index, name); default label-<value>
    mask: str = ""  # fmriprep: mask image (voxels)
    space: str = "MNI152NLin2009cAsym"  # fmriprep: template space of the runs read
    resample_atlas: bool = True  # fmriprep: atlas/mask on another grid -> BOLD grid (nearest)
    smoothing_fwhm: float = 0.0  # fmriprep: spatial smoothing in mm before extraction; 0: none
    # fmriprep: nilearn load_confounds strategy; the study's: cosine high-pass, 24 motion, WM + CSF
    confounds: list[ConfoundStrategy] = field(default_factory=lambda: ["high_pass", "motion", "wm_csf"])
    confounds_motion: ConfoundLevel = "full"  # basic (6), power2, derivatives or full (24)
    confounds_wm_csf: ConfoundLevel = "basic"
    confounds_global_signal: ConfoundLevel = "basic"  # used when "global_signal" is in confounds
    standardize: Standardize = "zscore_sample"  # per run: zscore_sample, zscore, psc or none
    tr: float = 1.49
    test_seasons: list[int] = field(default_factory=list)  # empty: the last season
    train_seasons: list[int] = field(default_factory=list)  # empty: every other season
    val_fraction: float = 0.25  # whole episodes of the train seasons drawn for validation
    split_seed: int = 0
    # An explicit split (episode ids such as "s01e02a") replaces the season rule when given.
    train_episodes: list[str] = field(default_factory=list)
    val_episodes: list[str] = field(default_factory=list)
    test_episodes: list[str] = field(default_factory=list)

    def confound_options(self) -> dict[str, Any] | bool:
        """Keyword arguments of nilearn's ``load_confounds``, or False for no regression."""
        if not self.confounds:
            return False
        options: dict[str, Any] = {"strategy": tuple(self.confounds)}
        for name in ("motion", "wm_csf", "global_signal"):
            if name in self.confounds:
                options[name] = getattr(self, f"confounds_{name}")
        return options


@dataclass
class ModelConfig:
    """The encoding model and the training condition.

    ``condition``: ``head`` (backbone frozen, the baseline), ``conv7`` .. ``conv4`` (train
    convX..conv7 and the head; conv4 is the study's main model), ``null`` (random-init backbone,
    frozen, head trained). ``init``: ``pretrained`` (SoundNet's original weights), ``random``,
    the path of a hear-brainsoundnet checkpoint whose backbone starts the run, or the
    ``best.safetensors`` of another run, whose backbone and heads (for the subjects it has)
    start this one (e.g. fine-tuning from a fitted head-only model).
    ``batchnorm``: ``frozen-eval`` keeps frozen layers on their running statistics (the
    baseline is then the pretrained network; frozen features can be cached) while trained
    layers normalise with each window's statistics; ``eval`` uses running statistics
    everywhere; ``batch-stats`` is the study's behaviour (every layer normalises with window
    statistics, nothing can be cached).
    """

    condition: Condition = "conv4"
    init: str = "pretrained"
    kernel_trs: int = 7
    batchnorm: BatchnormMode = "frozen-eval"


@dataclass
class TrainConfig:
    """The optimisation (defaults: the study's protocol)."""

    lr: float = 1e-5
    backbone_lr_scale: float = 1.0  # the backbone's lr is lr x this (the study: one lr for all)
    weight_decay: float = 1e-3  # AdamW
    window_trs: int = 80  # consecutive TRs of one run per training window
    windows_per_batch: int = 1  # global batch, split across DDP ranks (the study: 1)
    max_epochs: int = 1000
    lr_factor: float = 0.1  # ReduceLROnPlateau
    lr_patience: int = 5
    early_stopping_patience: int = 15  # epochs without improvement; 0 disables early stopping
    cache_features: bool = True  # cache frozen layers' outputs where that is exact
    checkpoint_every_steps: int = 0  # also save the resumable state mid-epoch; 0: epoch ends only
    divergence_factor: float = 100.0  # stop when a step's loss exceeds this x the first step's
    resume: bool = True  # continue from run_dir/last.safetensors when it exists


@dataclass
class SubjectsConfig:
    """Whose brain: one subject, a group (one head each), or leave-one-subject-out."""

    mode: SubjectMode = "individual"
    ids: list[str] = field(default_factory=lambda: ["sub-01"])
    held_out: str = ""  # loso: this subject gets only a new head on the group backbone


@dataclass
class ExperimentConfig:
    """Everything one training run needs."""

    preset: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    subjects: SubjectsConfig = field(default_factory=SubjectsConfig)

    def validate(self, source: str = "config") -> "ExperimentConfig":
        """Check values (not only types); raise :class:`ConfigError` naming the key."""

        def bad(key: str, message: str) -> ConfigError:
            return ConfigError(f"{source}: {key} {message}")

        check_choices(self, source)
        if self.preset and self.preset not in STUDY_PRESETS:
            raise bad("preset", f"= {self.preset!r}; known presets: {', '.join(STUDY_PRESETS)}")
        positive = {"train.lr": self.train.lr, "train.backbone_lr_scale": self.train.backbone_lr_scale,
                    "train.window_trs": self.train.window_trs,
                    "train.windows_per_batch": self.train.windows_per_batch,
                    "train.max_epochs": self.train.max_epochs, "model.kernel_trs": self.model.kernel_trs,
                    "data.tr": self.data.tr, "train.divergence_factor": self.train.divergence_factor}
        for key, value in positive.items():
            if not value > 0:
                raise bad(key, f"must be > 0, got {value!r}")
        for key, value in {"train.weight_decay": self.train.weight_decay,
                           "train.lr_patience": self.train.lr_patience,
                           "train.early_stopping_patience": self.train.early_stopping_patience,
                           "train.checkpoint_every_steps": self.train.checkpoint_every_steps,
                           "run.threads": self.run.threads}.items():
            if value < 0:
                raise bad(key, f"must be >= 0, got {value!r}")
        if not self.data.smoothing_fwhm >= 0:
            raise bad("data.smoothing_fwhm", f"must be >= 0 (mm; 0: no smoothing), got {self.data.smoothing_fwhm!r}")
        if len(self.subjects.ids) > 1 and self.data.brain_file and "{subject}" not in self.data.brain_file:
            raise bad("data.brain_file", f"= {self.data.brain_file!r} names one file for "
                      f"{len(self.subjects.ids)} subjects; put {{subject}} where the subject id goes")
        if not 0 <= self.data.val_fraction < 1:
            raise bad("data.val_fraction", f"must be in [0, 1), got {self.data.val_fraction!r}")
        if not 0 < self.train.lr_factor < 1:
            raise bad("train.lr_factor", f"must be in (0, 1), got {self.train.lr_factor!r}")
        if not self.subjects.ids:
            raise bad("subjects.ids", "is empty: name at least one subject")
        if len(set(self.subjects.ids)) != len(self.subjects.ids):
            raise bad("subjects.ids", f"lists a subject twice: {self.subjects.ids}")
        if self.subjects.mode == "individual" and len(self.subjects.ids) != 1:
            raise bad("subjects.ids", f"must name exactly one subject in individual mode, got "
                      f"{self.subjects.ids} (use mode = \"group\" for a group model)")
        if self.subjects.mode == "loso":
            if self.subjects.held_out not in self.subjects.ids:
                raise bad("subjects.held_out", f"= {self.subjects.held_out!r} must be one of "
                          f"subjects.ids {self.subjects.ids} in loso mode")
            if len(self.subjects.ids) < 2:
                raise bad("subjects.ids", "needs at least two subjects in loso mode")
        elif self.subjects.held_out:
            raise bad("subjects.held_out", f"is only used in loso mode (mode is {self.subjects.mode!r})")
        return self

    def update(self, values: Mapping[str, Any], source: str = "values") -> "ExperimentConfig":
        """Set dotted keys (``{"train.max_epochs": 8}``), each checked as a file's value is, then
        validate; ``source`` names the values in errors. Returns this config."""
        for key, value in values.items():
            _set(self, key, value, source)
        return self.validate(source)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


# Section name -> its dataclass, e.g. "train" -> TrainConfig.
SECTIONS: dict[str, type] = {name: hint for name, hint in typing.get_type_hints(ExperimentConfig).items()
                             if name != "preset"}


def check_choices(config: ExperimentConfig, source: str = "config") -> None:
    """The one check of every key annotated with a ``Literal`` (or a list of one): raise
    :class:`ConfigError` naming the key, the value and the choices."""
    for section_name, section_type in SECTIONS.items():
        section = getattr(config, section_name)
        for name, annotation in typing.get_type_hints(section_type).items():
            key, value = f"{section_name}.{name}", getattr(section, name)
            if typing.get_origin(annotation) is list:
                (annotation,) = typing.get_args(annotation)
                items = {f"{key}[{i}]": item for i, item in enumerate(value)}
            else:
                items = {key: value}
            if typing.get_origin(annotation) is not Literal:
                continue
            allowed = typing.get_args(annotation)
            for item_key, item in items.items():
                if item not in allowed:
                    raise ConfigError(f"{source}: {item_key} = {item!r}; choose one of {', '.join(allowed)}")


def _type_name(annotation: Any) -> str:
    return "str" if typing.get_origin(annotation) is Literal else annotation.__name__


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """``value`` as ``annotation`` (int -> float allowed; bool never counts as a number). A
    ``Literal`` of strings is checked as ``str`` here, its choices by :func:`check_choices`."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list of {_type_name(item_type)}, "
                              f"got {type(value).__name__} {value!r}")
        return [_coerce(item, item_type, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin is Literal:
        annotation = str
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        # TOML reads nan and inf: no setting of a run means anything with them (an inf lr
        # diverges at once, a NaN weight decay silently poisons every weight)
        raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
    if annotation in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be {annotation.__name__}, got bool {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{source}: {key} must be {annotation.__name__}, "
                          f"got {type(value).__name__} {value!r}")
    return value


def _set(config: ExperimentConfig, key: str, value: Any, source: str) -> None:
    """Set the dotted ``key`` (``section.name`` or ``preset``) after checking name and type."""
    if key == "preset":
        config.preset = _coerce(value, str, key, source)
        return
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        known = ", ".join(["preset", *(f"[{s}]" for s in SECTIONS)])
        raise ConfigError(f"{source}: unknown key {key!r}; known: {known}")
    hints = typing.get_type_hints(SECTIONS[section])
    if name not in hints:
        raise ConfigError(f"{source}: unknown key {key!r}; keys of [{section}]: {', '.join(hints)}")
    setattr(getattr(config, section), name, _coerce(value, hints[name], key, source))


def _flatten(table: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; sections must be tables."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if key == "preset":
            flat[key] = value
        elif key not in SECTIONS:
            known = ", ".join(["preset", *(f"[{s}]" for s in SECTIONS)])
            raise ConfigError(f"{source}: unknown key {key!r}; known: {known}")
        elif not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a table ([{key}]), got {type(value).__name__}")
        else:
            for name, item in value.items():
                flat[f"{key}.{name}"] = item
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 1e-4)``; the value is read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words need no quotes: --set model.condition=conv4
    return key, value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read a TOML experiment file (or only defaults when ``path`` is None), apply ``overrides``.

    Raises :class:`ConfigError` for an unknown key, a wrong type or a bad value, naming the key
    and the file or override.
    """
    file_values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            file_values = _flatten(tomllib.loads(path.read_text()), source)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: a directory, not a config file (give the .toml file, e.g. "
                              f"configs/synthetic_conv4.toml)") from None
        except (PermissionError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not a readable TOML file ({error})") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML ({error})") from None
    override_values = [(text, *parse_override(text)) for text in overrides]

    config = ExperimentConfig()
    preset = file_values.get("preset", "")
    for text, key, value in override_values:
        if key == "preset":
            preset = value
    if preset:
        _set(config, "preset", preset, source)
        if preset not in STUDY_PRESETS:
            raise ConfigError(f"{source}: preset = {preset!r}; known presets: {', '.join(STUDY_PRESETS)}")
        for key, value in STUDY_PRESETS[preset].items():
            _set(config, key, value, f"preset {preset!r}")
    for key, value in file_values.items():
        _set(config, key, value, source)
    for text, key, value in override_values:
        _set(config, key, value, f"--set {text}")
    return config.validate(source if not override_values else f"{source} (with --set overrides)")
