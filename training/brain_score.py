"""Brain-encoding score of any feature source: lagged ridge fitted on the training runs, scored
on the held-out season with the same evaluation as the fine-tuned models.

Command line (``hear-brainsoundnet brain-score ...``; in a clone ``python -m training brain-score``
or ``python -m training.brain_score``)::

    hear-brainsoundnet brain-score MODULE --config CONFIG [--model-file PATH]
        [--model-options JSON] [--out DIR] [--lags K] [--folds N] [--threads N]

``MODULE`` is a HEAR module name, loaded as heareval's runner loads one
(``hear_brainsoundnet``, ``hear_brainsoundnet.models.pretrained``, any third-party plugin
on the Python path), or a built-in source: ``:log-mel`` (64-band log-mel spectrogram),
``:soundnet`` (a SoundNet layer, ``--layer conv7`` by default, of ``--model-file``: a
fine-tuned run directory, a checkpoint, or the pretrained network by default) or ``:oracle``
(the synthetic dataset's true features; synthetic data only).

Protocol (:mod:`training.ridge`): the ridge is trained on the training **and validation**
runs of the config's split (the fine-tuned models used the validation runs for early stopping,
so every model has seen them in some way; the ridge chooses its penalty per target by
leave-one-episode-out cross-validation inside them) and never sees the held-out season, which
must not share a season with any training run. Lags: ``model.kernel_trs`` of the config (the
fine-tuned head's kernel) unless ``--lags`` says otherwise.

Outputs in ``--out``: ``encoding_table.csv`` / ``.md`` (per subject and target: held-out r
and r2, their chance level, the noise ceiling on the held-out runs when known, the chosen
penalty; the mean over auditory targets where the data say which targets are auditory),
``scores.csv`` / ``summary.csv`` (per run and target, :class:`training.evaluate.HeldOutResults`),
``models/<subject>/`` (the fitted ridge models, safetensors + JSON) and brain maps
``maps/map_r_<subject>.png|html`` when the data have an atlas.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .config import ConfigError, ExperimentConfig
from .evaluate import (EncodingScores, HeldOutResults, chance_r_sd, held_out_noise_ceiling,
                       results_from_scores, score_runs)
from .features import (FeatureError, FeatureSource, HearModuleFeatures, LogMelFeatures, OracleFeatures,
                       SoundNetFeatures, episode_feature_table, load_soundnet, parse_model_options)
from .ridge import DEFAULT_ALPHAS, SOLVERS, RidgeEncodingModel, Solver, fit_ridge_models

BUILTIN_SOURCES = (":log-mel", ":soundnet", ":oracle")
CHANCE_Z = 3.0  # |mean r| / chance sd above this is reported as above chance


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def make_source(name: str, config: ExperimentConfig, *, model_file: str | None = None,
                model_options: dict[str, Any] | None = None, layer: str = "conv7",
                device: str | None = None) -> FeatureSource:
    """The feature source ``name`` (a HEAR module or one of :data:`BUILTIN_SOURCES`)."""
    if name == ":log-mel":
        return LogMelFeatures()
    if name == ":oracle":
        if config.data.source != "synthetic":
            raise FeatureError(f":oracle needs the synthetic dataset's true features, but data.source = "
                               f"{config.data.source!r}: only simulated data have an oracle")
        return OracleFeatures(config.data.root)
    if name == ":soundnet":
        network, origin = load_soundnet(model_file or "pretrained")
        return SoundNetFeatures(network, layer, label=f"{origin}-{layer}", origin=str(model_file or "pretrained"))
    if name.startswith(":"):
        raise FeatureError(f"unknown built-in feature source {name!r}; choose one of {BUILTIN_SOURCES} "
                           "or give a HEAR module name")
    return HearModuleFeatures(name, model_file, model_options, device=device)


def check_held_out(config: ExperimentConfig, splits=None, source: str = "config") -> None:
    """Refuse a split whose held-out season overlaps the training runs (naming the values).

    Before loading: ``data.test_seasons`` sharing a season with ``data.train_seasons``; after
    (``splits`` given): a held-out run from a season that also has a training or validation
    run (e.g. explicit episode lists), or no held-out run at all.
    """
    from .data import season_of

    data = config.data
    shared = sorted(set(data.test_seasons) & set(data.train_seasons))
    if shared:
        raise ConfigError(f"{source}: data.test_seasons = {data.test_seasons} overlaps data.train_seasons = "
                          f"{data.train_seasons} (season {', '.join(map(str, shared))}): the held-out season "
                          "must not be trained on")
    if splits is None:
        return
    if not splits.test:
        raise ConfigError(f"{source}: the split has no held-out runs (data.test_seasons = {data.test_seasons}, "
                          f"data.test_episodes = {data.test_episodes})")
    trained = {e.name for e in splits.train + splits.validation}
    for episode in splits.test:
        season = season_of(episode.name)
        clash = sorted(name for name in trained if season_of(name) == season)
        if clash:
            raise ConfigError(f"{source}: held-out run {episode.name} is from season {season}, which also "
                              f"has training/validation runs {clash[:4]}: the held-out season must not "
                              "overlap the training runs (check data.test_episodes / data.train_episodes)")


def data_annotations(config: ExperimentConfig, splits
                     ) -> tuple[list[str] | None, dict[str, dict[str, np.ndarray]] | None, Any]:
    """(target kinds, held-out noise ceilings per subject, atlas) where the data know them."""
    if config.data.source != "synthetic":
        return None, None, (config.data.atlas or None)
    from .synthetic import SyntheticDataset

    dataset = SyntheticDataset.load(config.data.root)
    kinds = [parcel["kind"] for parcel in dataset.ground_truth()["parcels"]]
    ceilings = {}
    for subject in splits.target_names:
        runs = [e.name for e in splits.test if subject in e.targets]
        ceilings[subject] = held_out_noise_ceiling(dataset.root, subject, runs)
    return kinds, ceilings, dataset.atlas


# ----------------------------------------------------------------------------------------------
# The fit and the scores
# ----------------------------------------------------------------------------------------------

@dataclass
class BrainScore:
    """One feature source's ridge encoding models and held-out scores, per subject."""

    label: str
    scores: dict[str, EncodingScores]
    models: dict[str, RidgeEncodingModel]
    chance_sd: dict[str, np.ndarray]  # per subject and target: sd of the run-mean r at chance
    seconds: dict[str, float]  # "features", "fit"


def ridge_scores(source: FeatureSource, splits, *, lags: int, label: str | None = None,
                 alphas: Sequence[float] = DEFAULT_ALPHAS, n_splits: int | None = None,
                 solver: Solver = "eigen", threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None) -> BrainScore:
    """Fit ``source``'s ridge models on the training + validation runs of ``splits``
    (:class:`training.data.episodes.DataSplits`) and score them on its held-out runs."""
    label = label or source.label
    trained = splits.train + splits.validation
    start = time.perf_counter()
    if log:
        log(f"{label}: features of {len(trained) + len(splits.test)} episodes")
    features = episode_feature_table(source, trained + splits.test, splits.tr, cache_dir)
    feature_seconds = time.perf_counter() - start
    subjects = list(splits.target_names)
    targets = {s: {e.name: e.targets[s] for e in trained if s in e.targets} for s in subjects}
    provenance = {s: {"source": source.describe(), "label": label, "target_names": splits.target_names[s],
                      "tr": splits.tr, "held_out_runs": [e.name for e in splits.test if s in e.targets]}
                  for s in subjects}
    start = time.perf_counter()
    models = fit_ridge_models(features, targets, lags=lags, alphas=alphas, n_splits=n_splits,
                              solver=solver, threads=threads, configs=provenance)
    fit_seconds = time.perf_counter() - start
    scores, chance = {}, {}
    for subject in subjects:
        truth = {e.name: e.targets[subject] for e in splits.test if subject in e.targets}
        if not truth:
            raise ValueError(f"{subject} has no held-out runs among {[e.name for e in splits.test][:6]}")
        predictions = models[subject].predict_runs(features, {run: y.shape[0] for run, y in truth.items()})
        scores[subject] = score_runs(truth, predictions, splits.target_names[subject], model=label)
        chance[subject] = chance_r_sd(truth, predictions)
    if log:
        log(f"{label}: features {feature_seconds:.1f} s, ridge fits {fit_seconds:.1f} s")
    return BrainScore(label, scores, models, chance, {"features": feature_seconds, "fit": fit_seconds})


def encoding_table(score: BrainScore, kinds: Sequence[str] | None = None,
                   ceilings: dict[str, dict[str, np.ndarray]] | None = None) -> pd.DataFrame:
    """One row per (subject, target): held-out mean r and r2, the chance sd of r and ``z``
    (mean r / chance sd), the held-out noise ceiling and fraction when known, the penalty."""
    rows = []
    for subject, s in score.scores.items():
        frame = pd.DataFrame({"subject": subject, "model": score.label, "target": s.targets,
                              "n_runs": len(s.runs), "r": s.mean("r"), "r2": s.mean("r2"),
                              "chance_sd_r": score.chance_sd[subject],
                              "best_alpha": score.models[subject].best_alphas})
        frame.insert(6, "z", frame["r"] / frame["chance_sd_r"])
        if kinds is not None:
            frame.insert(3, "kind", list(kinds))
        if ceilings and subject in ceilings:
            frame["ceiling_r"] = ceilings[subject]["r"]
            frame["ceiling_r2"] = ceilings[subject]["r2"]
            with np.errstate(divide="ignore", invalid="ignore"):
                frame["fraction_of_ceiling_r"] = np.where(frame["ceiling_r"] > 0, frame["r"] / frame["ceiling_r"],
                                                          np.nan)
        rows.append(frame)
    return pd.concat(rows, ignore_index=True)


def table_markdown(table: pd.DataFrame, label: str, command: str) -> str:
    """The encoding table as Markdown, with a per-subject summary (mean over auditory targets
    where the target kinds are known, else over all targets)."""
    lines = [f"# Brain-encoding score: {label}", "", *([f"Command: `{command}`", ""] if command else []),
             "Lagged ridge (penalty per target by leave-one-episode-out CV on the training runs), "
             "held-out season. `z`: mean r over the chance sd of r (Bartlett's variance for "
             "independent autocorrelated series); |z| < 3 is within noise of 0.", ""]
    summary = []
    for subject, rows in table.groupby("subject", sort=False):
        entry: dict[str, Any] = {"subject": subject, "n_targets": len(rows), "mean_r": rows["r"].mean(),
                                 "mean_r2": rows["r2"].mean(),
                                 "targets_above_chance": int((rows["z"] > CHANCE_Z).sum())}
        if "kind" in rows:
            auditory = rows[rows["kind"] == "auditory"]
            if len(auditory):
                entry.update({"mean_r_auditory": auditory["r"].mean(), "mean_r2_auditory": auditory["r2"].mean(),
                              "auditory_above_chance": f"{int((auditory['z'] > CHANCE_Z).sum())} of {len(auditory)}"})
        if "fraction_of_ceiling_r" in rows:
            entry["median_fraction_of_ceiling_r"] = float(np.nanmedian(rows["fraction_of_ceiling_r"]))
        summary.append(entry)
    lines += ["## Summary", "", pd.DataFrame(summary).to_markdown(index=False, floatfmt=".3f"), "",
              "## Per target", "", table.to_markdown(index=False, floatfmt=".3f"), ""]
    return "\n".join(lines)


def write_outputs(out_dir: str | os.PathLike, score: BrainScore, *, kinds=None, ceilings=None, atlas=None,
                  command: str = "") -> dict[str, Path]:
    """Write the tables, the held-out results, the fitted models and the maps into ``out_dir``."""
    from hear_brainsoundnet.files import atomic_write

    out_dir = Path(out_dir)
    table = encoding_table(score, kinds, ceilings)
    written = {"table_csv": atomic_write(out_dir / "encoding_table.csv", lambda tmp: table.to_csv(tmp, index=False)),
               "table_md": atomic_write(out_dir / "encoding_table.md",
                                        lambda tmp: Path(tmp).write_text(table_markdown(table, score.label, command)))}
    results: HeldOutResults = results_from_scores({(score.label, s): v for s, v in score.scores.items()},
                                                  ceilings=ceilings, kinds=kinds)
    written.update(results.save(out_dir))
    for subject, model in score.models.items():
        written[f"model_{subject}"] = model.save_pretrained(out_dir / "models" / subject)
    if atlas is not None:
        from .report import brain_map

        for subject, s in score.scores.items():
            stem = out_dir / "maps" / f"map_r_{subject}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            brain_map(s.mean("r"), atlas, f"{stem}.png", f"{stem}.html",
                      title=f"{subject} {score.label}: held-out r")
            written[f"map_{subject}"] = Path(f"{stem}.png")
    return written


# ----------------------------------------------------------------------------------------------
# The main job's ridge baselines
# ----------------------------------------------------------------------------------------------

#: The ridge baselines of the main job: label -> built-in source.
BASELINES = {"ridge-conv7": ":soundnet", "ridge-log-mel": ":log-mel", "oracle": ":oracle"}


def baseline_scores(config: ExperimentConfig, splits, *, labels: Sequence[str] = tuple(BASELINES),
                    threads: int | None = None, log: Callable[[str], None] | None = None
                    ) -> tuple[dict[tuple[str, str], EncodingScores], dict[str, dict[str, float]]]:
    """Held-out scores ``{(label, subject): EncodingScores}`` of the ridge baselines ``labels``
    (:data:`BASELINES`: frozen pretrained conv7, log-mel, and the oracle on synthetic data) with
    the config's lags (``model.kernel_trs``), and their timings ``{label: {"features", "fit"}}``."""
    unknown = [label for label in labels if label not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose among {list(BASELINES)}")
    check_held_out(config, splits)
    cache = splits.feature_cache_dir / "encoding" if splits.feature_cache_dir else None
    scores, seconds = {}, {}
    for label in labels:
        result = ridge_scores(make_source(BASELINES[label], config), splits, lags=config.model.kernel_trs,
                              label=label, threads=threads, cache_dir=cache, log=log)
        scores.update({(label, subject): value for subject, value in result.scores.items()})
        seconds[label] = result.seconds
    return scores, seconds


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

# Run on its own: ``python -m training.brain_score`` in a clone, the installed package's name otherwise.
DEFAULT_PROG = f"python -m {__package__}.brain_score"


def build_parser(prog: str = DEFAULT_PROG) -> argparse.ArgumentParser:
    """The command's arguments; ``prog`` is the command line's name in usage and help."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help=f"HEAR module name, or a built-in source: {', '.join(BUILTIN_SOURCES)}")
    parser.add_argument("--config", required=True, help="experiment TOML (data, split, subjects, model.kernel_trs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for training (repeatable)")
    parser.add_argument("--model-file", help="passed to the module's load_model (heareval --model); for "
                        ":soundnet a run directory, best.safetensors or checkpoint (default: pretrained)")
    parser.add_argument("--model-options", help="JSON object passed to load_model as keyword arguments")
    parser.add_argument("--layer", default="conv7", help=":soundnet layer (default conv7)")
    parser.add_argument("--label", help="name of the model in the tables (default: the module)")
    parser.add_argument("--out", help="output folder (default: brain_score/<label>)")
    parser.add_argument("--lags", type=int, help="causal lags in TRs (default: the config's model.kernel_trs)")
    parser.add_argument("--folds", type=int, help="GroupKFold folds (default: leave one episode out)")
    parser.add_argument("--solver", default="eigen", choices=SOLVERS,
                        help="penalty search: one eigendecomposition (default) or himalaya's RidgeCV (same model)")
    parser.add_argument("--threads", type=int, help="torch and BLAS threads (default: the config's run.threads, "
                        "else all cores)")
    parser.add_argument("--device", help="device of the HEAR model (default: cuda if available, else cpu)")
    return parser


def run(args: argparse.Namespace, log: Callable[[str], None] = print, command: str = "") -> Path:
    """Do what the command line asks; return the Markdown table's path. ``command`` (the command
    line as typed) is recorded in the table."""
    import torch

    from .config import load_config
    from .data.loading import load_splits

    config = load_config(Path(args.config), list(args.overrides))
    threads = args.threads or config.run.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)  # feature extraction; the ridge's BLAS gets the same limit
    check_held_out(config, source=str(args.config))
    source = make_source(args.module, config, model_file=args.model_file,
                         model_options=parse_model_options(args.model_options), layer=args.layer,
                         device=args.device)
    label = args.label or (args.module.lstrip(":") if args.module != ":soundnet" else source.label)
    splits = load_splits(config)
    check_held_out(config, splits, source=str(args.config))
    kinds, ceilings, atlas = data_annotations(config, splits)
    cache = splits.feature_cache_dir / "encoding" if splits.feature_cache_dir else None
    score = ridge_scores(source, splits, lags=args.lags or config.model.kernel_trs, label=label,
                         n_splits=args.folds, solver=args.solver, threads=threads, cache_dir=cache, log=log)
    out = Path(args.out or Path("brain_score") / label.replace("/", "_"))
    written = write_outputs(out, score, kinds=kinds, ceilings=ceilings, atlas=atlas, command=command)
    return written["table_md"]


def main(argv: Sequence[str] | None = None, prog: str = DEFAULT_PROG) -> int:
    """The command line (``prog``: its name, e.g. ``hear-brainsoundnet brain-score`` when the
    project's command line hands it the arguments); 0 on success, 2 on an input error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    try:
        table = run(args, command=" ".join([prog, *argv]))
    except (FeatureError, ConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table.read_text())
    print(f"wrote {table.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
