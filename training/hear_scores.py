"""heareval's score files gathered into tables: a long CSV, a Markdown table and a bar chart.

:func:`collect_scores` reads every finished task's ``test.predicted-scores.json`` under each
checkpoint's embeddings folder; :func:`write_tables` writes ``hear_scores.csv`` / ``.md`` /
``.png``, naming under the Markdown table the task folders skipped as malformed.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from hear_brainsoundnet.files import atomic_write

from .figures import pyplot, save_png

SCORES_FILE = "test.predicted-scores.json"
PREDICTION_DONE = "prediction-done.json"
LOWER_IS_BETTER = ("segment_1s_er", "loss")


def read_scores(task_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows (one per test metric) from one embedding task folder's ``test.predicted-scores.json``.

    trainvaltest tasks have the scores under ``test``; k-fold tasks have one entry per test fold
    and ``aggregated_scores`` with ``<metric>_mean`` / ``_std``, which are used (std over folds
    is kept). Each row: task, metric, value, std, n_folds, primary (the task's first score).
    """
    task_dir = Path(task_dir)
    path = task_dir / SCORES_FILE
    try:
        results = json.loads(path.read_text())  # accepts heareval's bare Infinity / NaN
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable heareval scores ({error})") from None
    meta_path = task_dir / "task_metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
        primary = meta["evaluation"][0]
        task = meta.get("task_name", task_dir.name)
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
        raise ValueError(f"{meta_path}: cannot tell the task's primary score ({error!r})") from None
    rows = []
    if "aggregated_scores" in results:
        folds = [key for key, value in results.items()
                 if key != "aggregated_scores" and isinstance(value, dict) and "test_score" in value]
        aggregated = results["aggregated_scores"]
        names = [key[: -len("_mean")] for key in aggregated if key.endswith("_mean")]
        for name in names:
            if not name.startswith("test_") or name == "test_score":
                continue
            rows.append(_row(task, task_dir.name, name, aggregated[f"{name}_mean"],
                             aggregated.get(f"{name}_std"), len(folds), primary))
    elif isinstance(results.get("test"), dict):
        for name, value in results["test"].items():
            if name.startswith("test_") and name != "test_score":
                rows.append(_row(task, task_dir.name, name, value, None, 1, primary))
    else:
        raise ValueError(f"{path}: neither a 'test' entry nor 'aggregated_scores'")
    if not any(row["primary"] for row in rows):
        raise ValueError(f"{path}: no score for the task's primary metric {primary!r}")
    return rows


def _row(task: str, folder: str, name: str, value: Any, std: Any, n_folds: int,
         primary: str) -> dict[str, Any]:
    metric = name[len("test_"):]
    return {"task": task, "task_folder": folder, "metric": metric, "value": _float(value),
            "std": _float(std), "n_folds": n_folds, "primary": metric == primary,
            "higher_is_better": metric not in LOWER_IS_BETTER}


def _float(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)


def collect_scores(runs: Mapping[str, str | os.PathLike],
                   tasks: Iterable[str] | None = None) -> pd.DataFrame:
    """Every finished task's ``test.predicted-scores.json`` under each checkpoint's folder, as one table.

    ``runs`` maps a checkpoint label to the folder given to heareval as ``--embeddings-dir``
    (holding ``<module>/<task>/``); a task counts once heareval wrote ``prediction-done.json``.
    ``tasks`` keeps only those task folder names. Returns a long table with columns checkpoint,
    task, task_folder, metric, value, std, n_folds, primary, higher_is_better.
    """
    keep = set(tasks) if tasks is not None else None
    rows = []
    for label, folder in runs.items():
        for path in sorted(Path(folder).glob(f"*/*/{SCORES_FILE}")):
            if not (path.parent / PREDICTION_DONE).is_file():
                continue
            if keep is not None and path.parent.name not in keep:
                continue
            for row in read_scores(path.parent):
                rows.append({"checkpoint": label, **row})
    columns = ["checkpoint", "task", "task_folder", "metric", "value", "std", "n_folds",
               "primary", "higher_is_better"]
    return pd.DataFrame(rows, columns=columns)


def primary_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Wide table of each task's primary score: one row per task, one column per checkpoint."""
    primary = scores[scores["primary"]]
    table = primary.pivot_table(index=["task", "metric"], columns="checkpoint", values="value",
                                aggfunc="first", sort=False)
    order = list(dict.fromkeys(scores["checkpoint"]))
    return table.reindex(columns=[c for c in order if c in table.columns]).reset_index()


def _cell(value: float, std: float) -> str:
    if not np.isfinite(std):
        return f"{value:.3f}"
    return f"{value:.3f} ± {std:.3f}"


def primary_markdown(scores: pd.DataFrame) -> str:
    """Markdown table of the primary scores (± std over folds for k-fold tasks)."""
    primary = scores[scores["primary"]].copy()
    primary["cell"] = [_cell(v, s) for v, s in zip(primary["value"], primary["std"])]
    wide = primary.pivot_table(index=["task", "metric"], columns="checkpoint", values="cell",
                               aggfunc="first", sort=False)
    order = [c for c in dict.fromkeys(scores["checkpoint"]) if c in wide.columns]
    return wide.reindex(columns=order).reset_index().to_markdown(index=False)


def plot_scores(scores: pd.DataFrame, png_path: str | os.PathLike, title: str = "HEAR tasks") -> Path:
    """Grouped bar chart of each task's primary score per checkpoint (error bars: std over folds)."""
    plt = pyplot()
    primary = scores[scores["primary"]]
    tasks = list(dict.fromkeys(primary["task"]))
    checkpoints = list(dict.fromkeys(primary["checkpoint"]))
    width = 0.8 / max(1, len(checkpoints))
    figure, axes = plt.subplots(figsize=(1.6 + 1.5 * len(tasks) * max(1, len(checkpoints)) ** 0.5, 3.8))
    for i, label in enumerate(checkpoints):
        rows = primary[primary["checkpoint"] == label].set_index("task")
        values = [rows["value"].get(t, np.nan) for t in tasks]
        errors = [rows["std"].get(t, np.nan) for t in tasks]
        positions = np.arange(len(tasks)) + (i - (len(checkpoints) - 1) / 2) * width
        # NaN errors (tasks without folds) draw no error bar at all.
        axes.bar(positions, values, width, yerr=np.asarray(errors, dtype=float), capsize=2, label=label)
    metric = primary.drop_duplicates("task").set_index("task")["metric"]
    axes.set_xticks(np.arange(len(tasks)), [f"{t}\n{metric[t]}" for t in tasks], fontsize=8)
    axes.set_ylabel("test score (primary metric)")
    axes.set_title(title)
    axes.legend(fontsize=8, loc="best")
    axes.grid(axis="y", alpha=0.3)
    return save_png(figure, png_path)


def skipped_markdown(skipped: Mapping[str, str]) -> str:
    """Markdown lines naming the task folders that were skipped as malformed, and why."""
    if not skipped:
        return ""
    lines = [f"Skipped {len(skipped)} malformed task folder(s) (not scored):", ""]
    lines += [f"- `{name}`: {problem.splitlines()[0]}" for name, problem in sorted(skipped.items())]
    return "\n".join(lines)


def write_tables(scores: pd.DataFrame, out_dir: str | os.PathLike, stem: str = "hear_scores",
                 skipped: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Write the long CSV, the Markdown table of primary scores and the bar chart into ``out_dir``.

    ``skipped`` (task folder -> problem) is listed under the Markdown table, so that a table
    with fewer tasks than the tasks directory says which are missing and why.
    """
    out_dir = Path(out_dir)
    if scores.empty:
        raise ValueError("no HEAR scores to write: no task finished for any checkpoint")
    notes = skipped_markdown(skipped or {})
    markdown = primary_markdown(scores) + "\n" + (f"\n{notes}\n" if notes else "")
    paths = {
        "csv": atomic_write(out_dir / f"{stem}.csv", lambda tmp: scores.to_csv(tmp, index=False)),
        "md": atomic_write(out_dir / f"{stem}.md", lambda tmp: Path(tmp).write_text(markdown)),
        "png": plot_scores(scores, out_dir / f"{stem}.png"),
    }
    return paths
