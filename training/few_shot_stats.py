"""Few-shot results: curves with confidence bands, paired statistics across subjects, tables, plots.

Input: the long table of :func:`training.few_shot.run_few_shot` (checkpoint, task, k, draw,
fold, score, metric, ...). Within a checkpoint, folds are averaged per draw (a k-fold task's
score is the mean over its test folds, as heareval aggregates), then draws give the curve's
mean and a 95 % t confidence band.

Statistics (:func:`paired_stats`), for each task and k, the brain-aligned checkpoints against
the baseline (pretrained):

- ``unit="subject"`` (default; the study's): one pair per compared checkpoint (one per subject),
  its score and the baseline's averaged over the draws and folds both have (the same draws:
  draws do not depend on the checkpoint); Wilcoxon signed-rank on the differences.
- ``unit="draw"``: one pair per draw, the compared checkpoints' mean against the baseline;
  it tests whether *these* checkpoints beat the baseline across training subsets, not whether
  brain alignment helps across subjects (useful with one or two subjects).

Benjamini-Yekutieli FDR (valid under any dependence) across tasks, separately at each k, as the
study corrected across tasks. A task "improved significantly" when q < alpha and the median
difference is positive. When there are too few pairs for the exact test to reach alpha at all
(two-sided: fewer than 6 pairs; the smallest possible p with n pairs is 2 / 2**n), no p-value
is reported and the table says so.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from hear_brainsoundnet.files import atomic_write

from .evaluate import smallest_wilcoxon_p
from .figures import pyplot, save_png

PREDICTOR_NAMES = {"probe": "linear probe", "heareval": "heareval predictor"}
STATS_COLUMNS = ("task", "metric", "k", "unit", "baseline", "n_pairs", "mean_baseline",
                 "mean_compared", "mean_diff", "median_diff", "se_diff", "statistic", "p", "q",
                 "significant", "improved", "note")


def per_draw(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean over folds for each (checkpoint, task, metric, k, draw)."""
    return (scores.groupby(["checkpoint", "task", "metric", "k", "draw"], sort=True)["score"]
            .mean().reset_index())


def curve_table(scores: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per (checkpoint, task, k): mean over draws, a t confidence band (NaN with one draw), n draws."""
    draws = per_draw(scores)
    rows = []
    for (checkpoint, task, metric, k), group in draws.groupby(["checkpoint", "task", "metric", "k"], sort=True):
        values = group["score"].to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        n = len(values)
        mean = float(values.mean()) if n else math.nan
        half = (float(stats.t.ppf(0.5 + level / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
                if n > 1 else math.nan)
        rows.append({"checkpoint": checkpoint, "task": task, "metric": metric, "k": int(k),
                     "mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n_draws": n})
    return pd.DataFrame(rows, columns=["checkpoint", "task", "metric", "k", "mean", "ci_low",
                                       "ci_high", "n_draws"])


def _pairs(draws: pd.DataFrame, baseline: str, compare: Sequence[str], unit: str
           ) -> dict[tuple[str, str, int], tuple[np.ndarray, float, float, str]]:
    """(task, metric, k) -> (differences, mean baseline, mean compared, note) for the chosen unit.

    Only draws both sides have are paired. A compared checkpoint with no draw in common with the
    baseline gives no pair and is named in the note; when nothing can be paired the differences
    are empty (the row says why instead of showing a NaN difference)."""
    wide = draws.pivot_table(index=["task", "metric", "k", "draw"], columns="checkpoint",
                             values="score", aggfunc="first")
    if baseline not in wide.columns:
        return {}
    out = {}
    for (task, metric, k), group in wide.groupby(level=["task", "metric", "k"], sort=True):
        base = group[baseline]
        present = [c for c in compare if c in group.columns and group[c].notna().any()]
        if not present or base.notna().sum() == 0:
            continue
        apart = [c for c in present if group[[baseline, c]].dropna().empty]
        note = (f"no draws in common with {baseline}: {', '.join(apart)} (left out)" if apart else "")
        paired = [c for c in present if c not in apart]
        if unit == "subject":
            diffs, cands = [], []
            for c in paired:
                both = group[[baseline, c]].dropna()
                diffs.append(float((both[c] - both[baseline]).mean()))
                cands.append(float(both[c].mean()))
            out[(task, metric, int(k))] = (np.array(diffs, dtype=float), float(base.mean()),
                                           float(np.mean(cands)) if cands else math.nan, note)
        else:
            both = group[[baseline, *paired]].dropna()
            if paired and both.empty:
                note = "; ".join(filter(None, [note, f"no draw has {baseline} and all of {', '.join(paired)}"]))
            if not paired or both.empty:
                out[(task, metric, int(k))] = (np.array([], dtype=float), float(base.mean()), math.nan, note)
                continue
            mean_c = both[paired].mean(axis=1)
            out[(task, metric, int(k))] = ((mean_c - both[baseline]).to_numpy(dtype=float),
                                           float(both[baseline].mean()), float(mean_c.mean()), note)
    return out


def _wilcoxon(diffs: np.ndarray, alpha: float, alternative: str, unit: str) -> tuple[float, float, str]:
    """(statistic, p, note); p is NaN with a note when the test cannot reach alpha."""
    n = len(diffs)
    floor = smallest_wilcoxon_p(n, alternative) if n else 1.0
    if floor >= alpha:
        what = "subjects' checkpoints" if unit == "subject" else "draws"
        return math.nan, math.nan, (f"too few pairs for a test: {n} {what}; the smallest possible "
                                    f"{alternative} p is {floor:.3g} >= {alpha}")
    if np.all(diffs == 0):
        return 0.0, 1.0, "all differences are zero"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exact test with ties falls back to the normal approximation
        test = stats.wilcoxon(diffs, alternative=alternative)
    return float(test.statistic), float(test.pvalue), ""


def paired_stats(scores: pd.DataFrame, baseline: str = "pretrained",
                 compare: Sequence[str] | None = None, *, unit: str = "subject",
                 alpha: float = 0.05, alternative: str = "two-sided") -> pd.DataFrame:
    """Per (task, k): Wilcoxon signed-rank of compared minus baseline, BY-FDR across tasks at each k.

    ``compare``: the brain-aligned checkpoints (default: every checkpoint but ``baseline``).
    See the module docstring for ``unit``. Columns: :data:`STATS_COLUMNS`.
    """
    if unit not in ("subject", "draw"):
        raise ValueError(f"unit must be 'subject' or 'draw', got {unit!r}")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    labels = list(dict.fromkeys(scores["checkpoint"]))
    compare = [c for c in labels if c != baseline] if compare is None else list(compare)
    unknown = [c for c in [baseline, *compare] if c not in labels]
    if unknown:
        raise ValueError(f"checkpoint(s) {unknown} have no few-shot scores; have {labels}")
    if baseline in compare:
        raise ValueError(f"the baseline {baseline!r} cannot also be compared with itself")
    rows = []
    for (task, metric, k), (diffs, mean_b, mean_c, pair_note) in _pairs(per_draw(scores), baseline, compare,
                                                                      unit).items():
        if len(diffs):
            statistic, p, note = _wilcoxon(diffs, alpha, alternative, unit)
            note = "; ".join(filter(None, [pair_note, note]))
        else:  # nothing paired: the note says why, no test
            statistic, p, note = math.nan, math.nan, pair_note
        se = float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan
        rows.append({"task": task, "metric": metric, "k": k, "unit": unit, "baseline": baseline,
                     "n_pairs": len(diffs), "mean_baseline": mean_b, "mean_compared": mean_c,
                     "mean_diff": float(diffs.mean()) if len(diffs) else math.nan,
                     "median_diff": float(np.median(diffs)) if len(diffs) else math.nan,
                     "se_diff": se, "statistic": statistic, "p": p, "q": math.nan, "note": note})
    table = pd.DataFrame(rows, columns=[c for c in STATS_COLUMNS if c not in ("significant", "improved")])
    for k, index in table.groupby("k").groups.items():
        tested = [i for i in index if np.isfinite(table.at[i, "p"])]
        if tested:  # BY over the tasks that have a test at this k
            table.loc[tested, "q"] = stats.false_discovery_control(table.loc[tested, "p"].to_numpy(), method="by")
    table["significant"] = table["q"] < alpha
    table["improved"] = table["significant"] & (table["median_diff"] > 0)
    return table[list(STATS_COLUMNS)].sort_values(["k", "task"]).reset_index(drop=True)


def summary_lines(table: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """One line per k: "improved significantly on n of N tasks" (and worse, and untestable)."""
    lines = []
    for k, group in table.groupby("k", sort=True):
        n_tasks = len(group)
        tested = group[np.isfinite(group["q"])]
        better, worse = int(group["improved"].sum()), int((group["significant"] & ~group["improved"]).sum())
        line = (f"k={k}: improved significantly on {better} of {n_tasks} tasks, worse on {worse} "
                f"(Wilcoxon signed-rank, BY-FDR q < {alpha} across tasks)")
        if len(tested) < n_tasks:
            notes = sorted(set(group.loc[~np.isfinite(group["q"]), "note"]))
            line += f"; {n_tasks - len(tested)} task(s) without a test: {'; '.join(notes)}"
        lines.append(line)
    return lines


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def plot_task(curves: pd.DataFrame, task: str, path: str | os.PathLike, predictor: str = "probe") -> Path:
    """Score vs k (log axis) for one task: a line per checkpoint, its 95 % band over draws."""
    plt = pyplot()
    rows = curves[curves["task"] == task]
    figure, axes = plt.subplots(figsize=(5.2, 3.6))
    for label, group in rows.groupby("checkpoint", sort=False):
        group = group.sort_values("k")
        line, = axes.plot(group["k"], group["mean"], marker="o", ms=3, label=label)
        if group["ci_low"].notna().any():
            axes.fill_between(group["k"], group["ci_low"], group["ci_high"], color=line.get_color(), alpha=0.15)
    axes.set_xscale("log", base=2)
    ks = sorted(rows["k"].unique())
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.set_xlabel("training examples per class (k)")
    axes.set_ylabel(f"test {rows['metric'].iloc[0]}" if len(rows) else "test score")
    axes.set_title(f"{task}: few-shot {PREDICTOR_NAMES.get(predictor, predictor)}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return save_png(figure, path)


def plot_differences(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Compared minus baseline vs k, one line per task (band: ± 1 s.e. over pairs), mean over tasks."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5.6, 3.8))
    for task, group in table.groupby("task", sort=True):
        group = group.sort_values("k")
        line, = axes.plot(group["k"], group["mean_diff"], marker="o", ms=3, lw=1, label=task)
        se = group["se_diff"].fillna(0)
        axes.fill_between(group["k"], group["mean_diff"] - se, group["mean_diff"] + se,
                          color=line.get_color(), alpha=0.12)
    # The mean over tasks only where every task has a point: a k that only large tasks reach
    # would otherwise average a different set of tasks.
    per_k = table.groupby("k")["mean_diff"]
    overall = per_k.mean()[per_k.count() == table["task"].nunique()]
    axes.plot(overall.index, overall.values, color="black", lw=2.2, label="mean over tasks")
    axes.axhline(0, color="grey", lw=0.8, ls="--")
    axes.set_xscale("log", base=2)
    ks = sorted(table["k"].unique())
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.set_xlabel("training examples per class (k)")
    baseline = table["baseline"].iloc[0] if len(table) else "baseline"
    axes.set_ylabel(f"brain-aligned minus {baseline}\n(band: ± 1 s.e. over pairs)")
    axes.set_title("Few-shot difference across tasks")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return save_png(figure, path)


def _fmt(value: float, digits: int = 3) -> str:
    return "" if not np.isfinite(value) else f"{value:.{digits}f}"


def markdown(curves: pd.DataFrame, table: pd.DataFrame, lines: Sequence[str], skipped: Sequence[str],
             predictor: str = "probe") -> str:
    """The report section: curves (mean [95 % band]) per task and k, then the statistics."""
    cells = curves.assign(cell=[f"{_fmt(m)} [{_fmt(lo)}, {_fmt(hi)}]" if np.isfinite(lo) else _fmt(m)
                                for m, lo, hi in zip(curves["mean"], curves["ci_low"], curves["ci_high"])])
    order = list(dict.fromkeys(curves["checkpoint"]))
    wide = cells.pivot_table(index=["task", "metric", "k"], columns="checkpoint", values="cell",
                             aggfunc="first").reindex(columns=order).reset_index()
    parts = [f"### Few-shot test scores (mean over draws [95 % band]; {PREDICTOR_NAMES.get(predictor, predictor)})",
             "", wide.to_markdown(index=False)]
    if len(table):
        shown = table.assign(p=table["p"].map(_fmt), q=table["q"].map(_fmt),
                             mean_diff=table["mean_diff"].map(lambda v: _fmt(v, 4)),
                             median_diff=table["median_diff"].map(lambda v: _fmt(v, 4)))
        parts += ["", f"### Brain-aligned vs {table['baseline'].iloc[0]} (paired over {table['unit'].iloc[0]}s)",
                  "", *[f"- {line}" for line in lines], "",
                  shown[["task", "metric", "k", "n_pairs", "mean_diff", "median_diff", "p", "q",
                         "improved", "note"]].to_markdown(index=False)]
    if skipped:
        parts += ["", "### Skipped", "", *[f"- {message}" for message in skipped]]
    return "\n".join(parts) + "\n"


@dataclass
class Outputs:
    stats: pd.DataFrame
    summary: list[str]
    files: dict[str, Path] = field(default_factory=dict)


def write_outputs(scores: pd.DataFrame, out_dir: str | os.PathLike, *, baseline: str | None = "pretrained",
                  compare: Sequence[str] | None = None, unit: str = "subject", alpha: float = 0.05,
                  skipped: Sequence[str] = ()) -> Outputs:
    """few_shot.csv (long), few_shot_curves.csv, few_shot_stats.csv, few_shot.md and the plots."""
    out_dir = Path(out_dir)
    predictor = str(scores["predictor"].iloc[0]) if "predictor" in scores and len(scores) else "probe"
    files = {"csv": atomic_write(out_dir / "few_shot.csv", lambda tmp: scores.to_csv(tmp, index=False))}
    curves = curve_table(scores)
    files["curves"] = atomic_write(out_dir / "few_shot_curves.csv", lambda tmp: curves.to_csv(tmp, index=False))
    table = pd.DataFrame(columns=list(STATS_COLUMNS))
    if baseline is not None and not scores.empty and baseline in set(scores["checkpoint"]):
        table = paired_stats(scores, baseline, compare, unit=unit, alpha=alpha)
        files["stats"] = atomic_write(out_dir / "few_shot_stats.csv", lambda tmp: table.to_csv(tmp, index=False))
    lines = summary_lines(table, alpha) if len(table) else []
    files["md"] = atomic_write(out_dir / "few_shot.md",
                               lambda tmp: Path(tmp).write_text(markdown(curves, table, lines, skipped, predictor)))
    for task in sorted(curves["task"].unique()):
        files[f"plot {task}"] = plot_task(curves, task, out_dir / f"few_shot_{_slug(task)}.png", predictor)
    if len(table):
        files["plot difference"] = plot_differences(table, out_dir / "few_shot_difference.png")
    return Outputs(table, lines, files)
