"""The ``evaluate`` command's work: score trained runs on the held-out runs of their data split,
compare them with a baseline, and draw their brain maps."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .evaluate import HeldOutResults


def run_models(texts: Sequence[str]) -> dict[str, Path]:
    """``[LABEL=]RUN`` arguments -> {label: best model file}; a run directory stands for its
    ``best.safetensors``, the label defaults to the directory's name."""
    runs = {}
    for text in texts:
        label, sep, path = text.partition("=")
        path = Path(path if sep else label)
        label = label if sep else path.name
        best = path / "best.safetensors" if path.is_dir() else path
        if not best.is_file():
            raise SystemExit(f"{best}: no such model file (give a run directory or its best.safetensors)")
        runs[label] = best
    return runs


def evaluate_runs(runs: Mapping[str, Path], out: str | os.PathLike, *, baseline: str | None = None,
                  atlas: str | None = None, log: Callable[[str], None] = print
                  ) -> tuple[HeldOutResults, dict[str, Path]]:
    """Score the models ``runs`` ({label: model file}) on the held-out runs of the first run's
    data split (its ``config.toml``, with the subjects every model has), compare each with
    ``baseline`` (default: the first), save the tables into ``out`` and, when an atlas is known
    (``atlas``, the config's, or the synthetic data's), a brain map per model and subject.
    Returns the results and the files written."""
    from .brain_score import data_annotations
    from .config import load_config
    from .data.loading import load_splits
    from .evaluate import evaluate_models
    from .model import EncodingModel

    if baseline and baseline not in runs:
        raise SystemExit(f"--baseline {baseline!r} is not one of the runs {list(runs)}")
    config_path = next(iter(runs.values())).parent / "config.toml"
    config = load_config(config_path)
    models = {label: {s: path for s in EncodingModel.from_pretrained(path).heads} for label, path in runs.items()}
    subjects = sorted({s for files in models.values() for s in files})
    config.subjects.ids, config.subjects.mode = subjects, "group" if len(subjects) > 1 else "individual"
    config.subjects.held_out = ""
    splits = load_splits(config.validate(f"{config_path} (with the models' subjects {subjects})"))
    baseline = baseline or next(iter(runs))
    kinds, ceilings, data_atlas = data_annotations(config, splits)
    pairs = [(baseline, label) for label in runs if label != baseline]
    results = evaluate_models(models, splits.test, splits.tr, comparisons=pairs, ceilings=ceilings,
                              kinds=kinds, log=log)
    files = results.save(out)
    atlas = atlas or config.data.atlas or data_atlas
    if atlas:
        from .report import brain_map

        for (model, subject), scores in results.scores.items():
            stem = Path(out) / f"map_r_{model}_{subject}"
            brain_map(scores.mean("r"), atlas, f"{stem}.png", f"{stem}.html", title=f"{subject} {model}: held-out r")
            files[f"map_{model}_{subject}"] = Path(f"{stem}.png")
    return results, files
