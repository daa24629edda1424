"""The report folder: a Markdown summary with tables and PNG figures (and HTML brain maps).

Everything in the report is computed from the files the pipeline wrote (training curves,
held-out scores, HEAR scores); nothing is typed in by hand. :func:`write_report` is what the
main job calls; the figure functions can be used on their own.

Layout::

    <report>/README.md                     the summary
    <report>/figures/learning_curves.png   validation (and training) loss per epoch
    <report>/figures/scatter_<subject>.png per-parcel held-out r, baseline vs candidate
    <report>/figures/map_*.png|html        brain maps (static and interactive)
    <report>/figures/hear_scores.png       HEAR bar chart
    <report>/tables/*.csv                  the numbers behind the tables
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from hear_brainsoundnet.files import atomic_write

from .evaluate import (
    HeldOutResults,
    comparison_table,
    parcel_values_to_img,
    render_brain_map,
)
from .figures import pyplot, save_png
from .hear_scores import plot_scores, primary_markdown

# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def plot_learning_curves(curves: Mapping[str, Mapping[str, str | os.PathLike]], path: str | os.PathLike) -> Path:
    """One panel per group (e.g. subject), one line per run: validation loss (solid) and
    training loss (dotted) per epoch, the best epoch marked.

    ``curves`` maps a panel title to ``{run label: curves.csv}`` (the training runs' files).
    """
    plt = pyplot()
    panels = list(curves)
    columns = min(4, max(1, len(panels)))
    rows = int(np.ceil(len(panels) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows), squeeze=False)
    colours = {}
    for axis, panel in zip(axes.flat, panels):
        for label, csv_path in curves[panel].items():
            history = pd.read_csv(csv_path)
            colour = colours.setdefault(label, f"C{len(colours) % 10}")
            axis.plot(history["epoch"], history["val_loss"], color=colour, label=label)
            axis.plot(history["epoch"], history["train_loss"], color=colour, linestyle=":", alpha=0.7)
            best = history["val_loss"].idxmin()
            axis.plot(history["epoch"][best], history["val_loss"][best], "o", color=colour, markersize=4)
        axis.set_title(panel, fontsize=9)
        axis.set_xlabel("epoch", fontsize=8)
        axis.set_ylabel("MSE (z-scored targets)", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.suptitle("Learning curves (solid: validation, dotted: training; dot: best epoch)", fontsize=9)
    return save_png(figure, path)


def plot_score_scatter(comparison: pd.DataFrame, path: str | os.PathLike, *, title: str = "") -> Path:
    """Per-target held-out score of the baseline (x) against the candidate (y).

    ``comparison`` is one (subject, baseline, candidate, metric) slice of
    :attr:`HeldOutResults.comparisons`; points are coloured by ``kind`` when present, and
    targets with a significant difference (BY FDR) are drawn filled.
    """
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(4.4, 4.2))
    kinds = comparison["kind"] if "kind" in comparison else pd.Series(["target"] * len(comparison))
    for i, kind in enumerate(dict.fromkeys(kinds)):
        rows = comparison[kinds.to_numpy() == kind]
        significant = rows["significant"].astype(bool)
        colour = f"C{i}"
        if significant.any():
            axis.scatter(rows["mean_baseline"][significant], rows["mean_candidate"][significant], s=22,
                         color=colour, label=f"{kind} (significant)")
        if (~significant).any():
            axis.scatter(rows["mean_baseline"][~significant], rows["mean_candidate"][~significant], s=22,
                         facecolors="none", edgecolors=colour, label=f"{kind}")
    values = np.concatenate([comparison["mean_baseline"], comparison["mean_candidate"]])
    low, high = min(0.0, float(values.min())) - 0.02, float(values.max()) + 0.02
    axis.plot([low, high], [low, high], color="grey", linewidth=0.8)
    metric = comparison["metric"].iloc[0]
    axis.set_xlim(low, high)
    axis.set_ylim(low, high)
    axis.set_xlabel(f"{comparison['baseline'].iloc[0]}: held-out {metric}", fontsize=9)
    axis.set_ylabel(f"{comparison['candidate'].iloc[0]}: held-out {metric}", fontsize=9)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7, loc="upper left")
    axis.grid(alpha=0.3)
    return save_png(figure, path)


def brain_map(values: np.ndarray, atlas, png: str | os.PathLike, html: str | os.PathLike, *,
              title: str, bg_img: Any = "MNI152", vmax: float | None = None) -> list[Path]:
    """Parcel ``values`` drawn on the brain through ``atlas`` (PNG + interactive HTML).

    ``bg_img="MNI152"`` uses nilearn's bundled template (the atlas must be in MNI space, as the
    synthetic atlas and the study's atlases are); None draws the map alone.
    """
    if isinstance(bg_img, str) and bg_img == "MNI152":
        from nilearn.datasets import load_mni152_template

        bg_img = load_mni152_template(resolution=2)
    img = parcel_values_to_img(values, atlas)
    # The threshold hides the background (exactly 0), not any parcel's value.
    return render_brain_map(img, png, html_path=html, title=title, bg_img=bg_img, vmax=vmax,
                            threshold=1e-9)


# ----------------------------------------------------------------------------------------------
# Claims: what the synthetic data must show, checked on the numbers
# ----------------------------------------------------------------------------------------------

@dataclass
class Claim:
    """A statement the report checks, the numbers behind it and whether they support it."""

    statement: str
    evidence: str
    holds: bool


def _slice(comparisons: pd.DataFrame, baseline: str, candidate: str, metric: str) -> pd.DataFrame:
    return comparisons[(comparisons["baseline"] == baseline) & (comparisons["candidate"] == candidate)
                       & (comparisons["metric"] == metric)]


def _pair_claim(table: pd.DataFrame, baseline: str, candidate: str, metric: str, kind: str,
                statement: str) -> Claim | None:
    """A claim "candidate beats baseline" from :func:`comparison_table` rows: it holds when,
    for every subject, the pooled test across the ``kind`` targets has p < 0.05 with a positive
    mean difference; the evidence gives, per subject, k of N targets significant after BY FDR."""
    rows = table[(table["baseline"] == baseline) & (table["candidate"] == candidate) & (table["metric"] == metric)]
    if rows.empty:
        return None
    evidence = "; ".join(
        f"{r['subject']}: {r['mean_candidate']:.3f} vs {r['mean_baseline']:.3f} (mean {metric} over {r['n']} "
        f"{kind} parcels, {r['mean_diff']:+.3f}), pooled p = {r['pooled_p']:.2g} over {r['n_runs']} runs; "
        f"significant gain in {r['k_gain']} of {r['n']} {kind} parcels"
        + (f", loss in {r['k_loss']}" if r["k_loss"] else "") for _, r in rows.iterrows())
    holds = bool(((rows["pooled_p"] < 0.05) & (rows["mean_diff"] > 0)).all())
    return Claim(statement, evidence, holds)


#: (baseline, candidate, statement): what the main job checks, each on r and r2.
CLAIM_PAIRS = (
    ("head", "conv4", "conv4 beats head-only (frozen pretrained conv7, trained head)"),
    ("ridge-conv7", "conv4", "conv4 beats a ridge on frozen pretrained conv7 (penalty by CV)"),
    ("ridge-log-mel", "conv4", "conv4 beats a ridge on a 64-band log-mel spectrogram"),
    ("conv4", "group", "the group conv4 model beats the individual conv4 model"),
    ("conv4", "oracle", "the oracle (true features, ridge) beats conv4"),
    ("null", "ridge-conv7", "ridge on pretrained conv7 beats the random-init null"),
    ("null", "ridge-log-mel", "ridge on log-mel beats the random-init null"),
)


def check_claims(held_out: HeldOutResults, *, pairs: Sequence[tuple[str, str, str]] = CLAIM_PAIRS,
                 driven: str = "auditory", noise: str = "noise", metrics: Sequence[str] = ("r", "r2"),
                 noise_tolerance: float = 0.1, n_seeds: int = 1) -> list[Claim]:
    """Every claim of the report, computed from ``held_out`` (a claim that fails says so):

    - each pair of :data:`CLAIM_PAIRS` whose models were scored, on each metric: per subject the
      pooled Wilcoxon test across runs over the ``driven`` parcels and "k of N" parcels with a
      significant gain (BY FDR), see :func:`training.evaluate.comparison_table`;
    - pure-``noise`` parcels stay near zero for every model;
    - no model exceeds the noise ceiling of the held-out runs (median fraction <= 1.05).

    The statistics are across held-out runs of one fitted model per condition (``n_seeds`` = 1):
    they say whether that fitted model is better on new stimuli, not whether training is.
    """
    claims: list[Claim] = []
    if held_out.comparisons.empty or "kind" not in held_out.comparisons:
        return claims
    scored = {model for model, _ in held_out.scores}
    present = [(b, c, s) for b, c, s in pairs if b in scored and c in scored]
    table = comparison_table(held_out, [(b, c) for b, c, _ in present], kind=driven, metrics=metrics)
    condition = ("conditional on one fitted model per condition" if n_seeds <= 1
                 else f"seed {0} models; spread over {n_seeds} seeds below")
    for baseline, candidate, statement in present:
        for metric in metrics:
            claim = _pair_claim(table, baseline, candidate, metric, driven,
                                f"{statement}: held-out {metric}, {driven} parcels (Wilcoxon across runs, "
                                f"{condition})")
            if claim is not None:
                claims.append(claim)
    summary = held_out.summary
    column = f"mean_r_{noise}"
    if column in summary:
        worst = summary.loc[summary[column].abs().idxmax()]
        evidence = (f"mean r over {noise} parcels between {summary[column].min():+.3f} and "
                    f"{summary[column].max():+.3f} across models and subjects "
                    f"(largest: {worst['model']}, {worst['subject']})")
        claims.append(Claim(f"pure-{noise} parcels stay near zero (|mean r| < {noise_tolerance})", evidence,
                            bool((summary[column].abs() < noise_tolerance).all())))
    if "ceiling_fraction_r" in summary and summary["ceiling_fraction_r"].notna().any():
        by_model = summary.groupby("model")["ceiling_fraction_r"].mean()
        evidence = ", ".join(f"{m}: {v:.0%}" for m, v in by_model.sort_values(ascending=False).items())
        claims.append(Claim("no model exceeds the noise ceiling of the held-out runs (median over parcels of "
                            "held-out r / ceiling r, mean over subjects, at most 105 %)", evidence,
                            bool((by_model <= 1.05).all())))
    return claims


def seed_spread(summary: pd.DataFrame, metrics: Sequence[str] = ("mean_r_auditory", "mean_r2_auditory")
                ) -> pd.DataFrame:
    """Per subject and condition trained with several seeds (models ``c`` and ``c@seed<k>``):
    the number of seeds and the mean, sd, min and max over seeds of each summary column."""
    models = summary["model"].astype(str)
    with_seeds = {m.split("@seed")[0] for m in models if "@seed" in m}
    rows = []
    for (subject, base), part in summary.assign(base=models.str.split("@seed").str[0]).groupby(["subject", "base"]):
        if base not in with_seeds:
            continue
        row: dict[str, Any] = {"subject": subject, "model": base, "seeds": len(part)}
        for metric in metrics:
            if metric in part:
                values = part[metric].astype(float)
                row.update({f"{metric}_mean": values.mean(), f"{metric}_sd": values.std(ddof=1) if len(values) > 1 else np.nan,
                            f"{metric}_min": values.min(), f"{metric}_max": values.max()})
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# The Markdown report
# ----------------------------------------------------------------------------------------------

def _markdown_table(frame: pd.DataFrame, floatfmt: str = ".3f", formats: Mapping[str, str] | None = None) -> str:
    """``frame`` as a Markdown table: floats with ``floatfmt`` unless ``formats`` names the column."""
    formats = formats or {}
    # tabulate formats every number of a column with that column's format: integers need their own.
    columns = [formats.get(c, ".0f" if pd.api.types.is_integer_dtype(frame[c]) else floatfmt)
               for c in frame.columns]
    return frame.to_markdown(index=False, floatfmt=columns)


@dataclass
class ReportInputs:
    """Everything :func:`write_report` puts together (paths are files the pipeline wrote)."""

    title: str
    settings: dict[str, Any]
    data_facts: dict[str, Any]
    training: pd.DataFrame  # one row per run: subject, model, epochs, best_epoch, best_val_loss, seconds
    curves: dict[str, dict[str, Path]]  # panel -> run label -> curves.csv
    held_out: HeldOutResults
    scatter_pairs: list[tuple[str, str]]  # (baseline, candidate) drawn as scatter plots
    atlas: Path | None = None
    map_models: list[tuple[str, str]] = field(default_factory=list)  # (subject, model) r maps
    hear_scores: pd.DataFrame | None = None
    hear_status: dict[str, Any] | None = None
    few_shot_dir: Path | None = None  # training.few_shot's output folder (few_shot.md + plots)
    timings: dict[str, float] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _few_shot_section(few_shot_dir: Path | None, figures: Path) -> list[str]:
    """The few-shot curves' section: training.few_shot's own markdown, its plots copied beside
    the report's figures (the difference plot first)."""
    if few_shot_dir is None or not (Path(few_shot_dir) / "few_shot.md").is_file():
        return []
    few_shot_dir = Path(few_shot_dir)
    lines = ["## Few-shot curves (HEAR tasks, linear probe on the same embeddings)", "",
             "k training examples per class (per label for multilabel tasks), seeded draws shared by "
             "every checkpoint; validation and test splits untouched; regularisation chosen on validation.",
             "", (few_shot_dir / "few_shot.md").read_text().replace("### ", "#### ")]
    plots = sorted(few_shot_dir.glob("few_shot_*.png"), key=lambda p: p.name != "few_shot_difference.png")
    for plot in plots:
        target = figures / plot.name
        data = plot.read_bytes()
        atomic_write(target, lambda tmp, d=data: Path(tmp).write_bytes(d))
        lines += [f"![{plot.stem}](figures/{plot.name})"]
    return lines + [""]


def _auditory_section(held: HeldOutResults, tables: Path) -> list[str]:
    """Per subject and compared pair, over the auditory parcels: k of N significant parcels and
    the pooled test (:func:`training.evaluate.comparison_table`), and the seeds' spread."""
    lines: list[str] = []
    if "kind" in held.comparisons and (held.comparisons["kind"] == "auditory").any() and held.scores:
        pairs = list(dict.fromkeys(zip(held.comparisons["baseline"], held.comparisons["candidate"])))
        table = comparison_table(held, pairs, kind="auditory")
        atomic_write(tables / "comparisons_auditory.csv", lambda tmp: table.to_csv(tmp, index=False))
        lines += ["### Per subject over the auditory parcels", "",
                  "`k_gain` / `k_loss` of `n`: auditory parcels with a significant difference (Wilcoxon across "
                  "runs, BY FDR over all parcels); `pooled_p`: Wilcoxon across runs of the per-run difference "
                  "averaged over the auditory parcels. Both are conditional on one fitted model per condition: "
                  "they test the fitted models on new stimuli, not training variability.", "",
                  _markdown_table(table, formats={"pooled_p": ".2g", "k_gain": ".0f", "k_loss": ".0f"}), ""]
    spread = seed_spread(held.summary)
    if not spread.empty:
        atomic_write(tables / "seed_spread.csv", lambda tmp: spread.to_csv(tmp, index=False))
        lines += ["### Spread over seeds", "", "Each condition trained with several seeds (`run.seed`); "
                  "mean auditory held-out r and r2 over seeds.", "", _markdown_table(spread), ""]
    return lines


def write_report(report_dir: str | os.PathLike, inputs: ReportInputs) -> Path:
    """Write figures, tables and ``README.md`` into ``report_dir``; return the README's path."""
    report_dir = Path(report_dir)
    figures, tables = report_dir / "figures", report_dir / "tables"
    for folder in (figures, tables):
        folder.mkdir(parents=True, exist_ok=True)
    lines = _summary_section(inputs)
    lines += _training_section(inputs, figures)
    lines += _held_out_section(inputs, figures, tables)
    lines += _brain_maps_section(inputs, figures)
    lines += _hear_section(inputs, figures, tables)
    lines += _few_shot_section(inputs.few_shot_dir, figures)
    lines += _run_time_and_notes_section(inputs)
    readme = report_dir / "README.md"
    return atomic_write(readme, lambda tmp: Path(tmp).write_text("\n".join(lines)))


def _summary_section(inputs: ReportInputs) -> list[str]:
    """Title and settings, the claims table, the data facts."""
    lines = [f"# {inputs.title}", ""]
    lines += [f"- **{key}**: {value}" for key, value in inputs.settings.items()]
    lines += [""]
    if inputs.claims:
        lines += ["## What the synthetic data show", "",
                  "| claim | holds | evidence |", "|:--|:--|:--|"]
        lines += [f"| {c.statement} | {'yes' if c.holds else '**no**'} | {c.evidence} |" for c in inputs.claims]
        lines += [""]
    if inputs.data_facts:
        lines += ["## Data", ""] + [f"- {key}: {value}" for key, value in inputs.data_facts.items()] + [""]
    return lines


def _training_section(inputs: ReportInputs, figures: Path) -> list[str]:
    """The training runs' table and the learning curves figure."""
    lines = ["## Training", "", _markdown_table(inputs.training, formats={"lr": "g", "backbone_lr": "g",
                                                                          "train_seconds": ".1f"}), ""]
    if inputs.curves:
        plot_learning_curves(inputs.curves, figures / "learning_curves.png")
        lines += ["![learning curves](figures/learning_curves.png)", ""]
    return lines


def _held_out_section(inputs: ReportInputs, figures: Path, tables: Path) -> list[str]:
    """Held-out encoding scores, the significance counts of the comparisons, the auditory-parcel
    tests and the scatter plots; the tables behind them as CSV."""
    held = inputs.held_out
    lines = ["## Brain encoding on the held-out runs", "",
             "Per parcel and run: Pearson r and r2 (`sklearn.metrics.r2_score`), then the mean "
             "over runs. `ceiling_fraction_r` (`_r2`): median over parcels of held-out r (r2) / the noise "
             "ceiling r (r2) of the same held-out runs, the score of an oracle that knows the noiseless "
             "signal. `ridge-*` and `oracle`: lagged ridge encoding models (penalty per parcel by "
             "leave-one-episode-out cross-validation on the training and validation runs).", ""]
    shown = [c for c in ("subject", "model", "n_runs", "mean_r", "mean_r_auditory", "mean_r2_auditory",
                         "mean_r_weak", "mean_r_noise", "best_r2", "best_target", "ceiling_fraction_r",
                         "ceiling_fraction_r2")
             if c in held.summary]
    lines += [_markdown_table(held.summary[shown]), "", "All columns: `tables/encoding_summary.csv`.", ""]
    if not held.comparisons.empty:
        counts = (held.comparisons.assign(loss=lambda t: t["significant"] & (t["median_diff"] < 0))
                  .groupby(["subject", "baseline", "candidate", "metric"], sort=False)
                  .agg(targets=("target", "count"), significant_gain=("gain", "sum"),
                       significant_loss=("loss", "sum"), mean_diff=("mean_diff", "mean"))
                  .reset_index())
        lines += ["### Comparisons (Wilcoxon signed-rank across held-out runs, Benjamini-Yekutieli FDR "
                  "over parcels, q < 0.05)", "", _markdown_table(counts), ""]
        atomic_write(tables / "comparison_counts.csv", lambda tmp: counts.to_csv(tmp, index=False))
        lines += _auditory_section(held, tables)
        for baseline, candidate in inputs.scatter_pairs:
            for subject in dict.fromkeys(held.comparisons["subject"]):
                part = _slice(held.comparisons, baseline, candidate, "r")
                part = part[part["subject"] == subject]
                if part.empty:
                    continue
                name = f"scatter_{candidate}_vs_{baseline}_{subject}.png"
                plot_score_scatter(part, figures / name, title=f"{subject}: {candidate} vs {baseline}")
                lines += [f"![{name}](figures/{name})"]
        lines += [""]
    for name, frame in (("summary", held.summary), ("comparisons", held.comparisons)):
        atomic_write(tables / f"encoding_{name}.csv", lambda tmp, f=frame: f.to_csv(tmp, index=False))
    return lines


def _brain_maps_section(inputs: ReportInputs, figures: Path) -> list[str]:
    """Held-out r maps of the chosen (subject, model) pairs, on one colour scale."""
    if inputs.atlas is None or not inputs.map_models:
        return []
    held = inputs.held_out
    lines = ["### Brain maps", "", "Held-out r per parcel (mean over runs), drawn on the MNI152 "
             "template through the atlas; the HTML files are interactive.", ""]
    vmax = max(float(np.max(np.abs(held.scores[key].mean("r")))) for key in
               [(m, s) for s, m in inputs.map_models])
    for subject, model in inputs.map_models:
        stem = f"map_r_{model}_{subject}"
        brain_map(held.scores[(model, subject)].mean("r"), inputs.atlas, figures / f"{stem}.png",
                  figures / f"{stem}.html", title=f"{subject} {model}: held-out r", vmax=vmax)
        lines += [f"![{stem}](figures/{stem}.png) ([interactive](figures/{stem}.html))", ""]
    return lines


def _hear_section(inputs: ReportInputs, figures: Path, tables: Path) -> list[str]:
    """The HEAR scores' table and chart, then the skipped tasks and failed checkpoints."""
    lines: list[str] = []
    if inputs.hear_scores is not None and not inputs.hear_scores.empty:
        plot_scores(inputs.hear_scores, figures / "hear_scores.png")
        atomic_write(tables / "hear_scores.csv", lambda tmp: inputs.hear_scores.to_csv(tmp, index=False))
        lines += ["## Downstream tasks (HEAR)", "",
                  "Test score of each task's primary metric (± std over folds for k-fold tasks), "
                  "heareval's shallow predictors on frozen embeddings.", "",
                  primary_markdown(inputs.hear_scores), "", "![HEAR scores](figures/hear_scores.png)", ""]
    if inputs.hear_status:
        failed = [c for c in inputs.hear_status.get("checkpoints", []) if c["status"] != "ok"]
        for task, problem in inputs.hear_status.get("task_problems", {}).items():
            lines += [f"- malformed task skipped: `{task}`: {problem}"]
        for c in failed:
            lines += [f"- checkpoint `{c['label']}`: {c['status']}: {c['error'].splitlines()[0] if c['error'] else ''}"]
        if failed or inputs.hear_status.get("task_problems"):
            lines += [""]
    return lines


def _run_time_and_notes_section(inputs: ReportInputs) -> list[str]:
    """Each stage's run time and the notes."""
    lines: list[str] = []
    if inputs.timings:
        frame = pd.DataFrame([{"stage": k, "seconds": round(v, 1)} for k, v in inputs.timings.items()])
        lines += ["## Run time", "", _markdown_table(frame, floatfmt=".1f"),
                  "", f"Total: {sum(inputs.timings.values()) / 60:.1f} min.", ""]
    if inputs.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in inputs.notes] + [""]
    return lines
