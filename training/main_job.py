"""The main job: synthetic data -> training -> held-out evaluation -> HEAR -> report.

:func:`run_main_job` (``python -m training main``) generates the embedded synthetic dataset,
trains head-only, conv4 and the random-init null per subject and a group conv4 model (the
experiment files of ``configs/``, pointed at the job's work folder and capped by the job's
:data:`SIZES`), fits the ridge baselines, scores everything on the held-out season, runs
heareval and the few-shot curves on a generated task suite, and writes the report.

The job is resumable: each finished step is recorded in ``<workdir>/main_job.json`` and skipped
when the job is run again (training runs and heareval also resume inside a step). A work folder
made with other settings (size, seed, the dataset's design, the task suite, the experiment
files' values) is refused rather than resumed on stale data. ``size="tiny"`` is the small
setting the tests use.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from hear_brainsoundnet.files import atomic_write

from .config import Condition, ExperimentConfig, SyntheticSize, load_config

# ----------------------------------------------------------------------------------------------
# What the main job trains and compares
# ----------------------------------------------------------------------------------------------

# Per subject: the baseline, the study's main model, the null.
TRAINED_CONDITIONS: tuple[Condition, ...] = ("head", "conv4", "null")
GROUP_CONDITION: Condition = "conv4"
# Lagged ridge encoding models fitted next to the trained ones (training.brain_score.BASELINES):
# frozen pretrained conv7, a log-mel spectrogram, the synthetic data's true features.
RIDGE_BASELINES = ("ridge-conv7", "ridge-log-mel", "oracle")
# (baseline, candidate) pairs compared per subject on the held-out runs.
COMPARISONS = (("head", "conv4"), ("ridge-conv7", "conv4"), ("ridge-log-mel", "conv4"), ("conv4", "oracle"),
               ("head", "null"), ("null", "ridge-conv7"), ("null", "ridge-log-mel"), ("head", "group"),
               ("conv4", "group"))

# The experiment files the main job trains (the repository's configs/; a wheel carries them as
# training/configs, see setup.cfg): the main job only points them at its own work folder and
# applies the size's caps.
CONFIGS_DIR = next((d for d in (Path(__file__).resolve().parent.parent / "configs",
                                Path(__file__).resolve().parent / "configs")
                    if (d / "synthetic_conv4.toml").is_file()),
                   Path(__file__).resolve().parent.parent / "configs")
RUN_CONFIGS = {"head": "synthetic_head.toml", "conv4": "synthetic_conv4.toml",
               "null": "synthetic_null.toml", "group": "synthetic_group.toml"}


@dataclass(frozen=True)
class JobSize:
    """What one size of the main job trains and evaluates.

    ``runs`` holds config values per kind of run (``head``, ``conv4``, ``null`` per subject
    and ``group``, the group conv4 model), dotted keys set on top of :data:`RUN_CONFIGS` (epoch
    caps that keep the job within its time); ``hear_suite`` is the size of the generated HEAR
    task suite (:data:`training.hear_tasks.SUITES`).
    """

    data_size: SyntheticSize
    runs: dict[str, dict[str, Any]]
    hear_suite: str
    hear_all_subjects: bool  # HEAR for every subject's conv4 (else: the group model only)


SIZES: dict[str, JobSize] = {
    "default": JobSize(
        data_size="default",
        runs={"head": {}, "null": {}, "conv4": {"train.max_epochs": 25}, "group": {"train.max_epochs": 25}},
        hear_suite="default", hear_all_subjects=True),
    "tiny": JobSize(
        data_size="tiny",
        runs={kind: {"train.max_epochs": 8 if kind in ("head", "null") else 2,
                     "train.early_stopping_patience": 2, "train.lr_patience": 1}
              for kind in RUN_CONFIGS},
        hear_suite="tiny", hear_all_subjects=False),
}


# ----------------------------------------------------------------------------------------------
# The work folder's record and the progress display
# ----------------------------------------------------------------------------------------------

@dataclass
class JobState:
    """``<workdir>/main_job.json``: the settings a work folder was made with and the finished steps."""

    path: Path
    settings: dict[str, Any]
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, settings: dict[str, Any]) -> "JobState":
        """The record at ``path``, or a new one; a record made with other settings is refused."""
        if not path.is_file():
            return cls(path, settings)
        saved = json.loads(path.read_text())
        if saved["settings"] != settings:
            changed = {k: (saved["settings"].get(k), v) for k, v in settings.items()
                       if saved["settings"].get(k) != v}
            raise SystemExit(f"{path.parent} holds a main job made with other settings {changed} "
                             "(saved, requested): pass another --workdir, or delete that folder")
        return cls(path, settings, saved["steps"])

    def done(self, step: str) -> bool:
        return step in self.steps

    def record(self, step: str, seconds: float, **info: Any) -> None:
        """Mark ``step`` finished (with its duration and ``info``) and rewrite the file atomically."""
        self.steps[step] = {"seconds": round(seconds, 2), **info}
        text = json.dumps({"settings": self.settings, "steps": self.steps}, indent=1)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


class Progress:
    """The main job's progress display: one bar over the steps, a line per step."""

    def __init__(self, steps: Sequence[str], enabled: bool):
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.start = time.perf_counter()
        self.bar = tqdm(total=len(steps), desc="main job", unit="step", disable=not enabled,
                        dynamic_ncols=True, position=0, leave=True)
        self.write = tqdm.write if enabled else (lambda _: None)

    def begin(self, step: str, skipped: bool) -> None:
        self.bar.set_postfix_str(step)
        elapsed = time.perf_counter() - self.start
        self.write(f"[main {self.bar.n + 1}/{self.bar.total} {elapsed / 60:4.1f} min] "
                   f"{step}{' (done before, skipped)' if skipped else ''}")

    def end(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------------------------
# The main job
# ----------------------------------------------------------------------------------------------

class MainJob:
    """The end-to-end demonstration on the embedded synthetic dataset (see :func:`run_main_job`).

    ``prog`` is the command line's name (``python -m training`` or ``hear-brainsoundnet``), for
    the command the report states.
    """

    def __init__(self, workdir: Path, report_dir: Path, size: str, seed: int, threads: int,
                 progress: bool, seeds: int = 1, prog: str = "python -m training"):
        if size not in SIZES:
            raise SystemExit(f"--size {size!r}: choose one of {', '.join(SIZES)}")
        if seeds < 1:
            raise SystemExit(f"--seeds {seeds}: train each condition with at least 1 seed")
        self.seeds = seeds
        self.workdir, self.report_dir = workdir, report_dir
        self.size, self.spec, self.seed, self.threads = size, SIZES[size], seed, threads
        self.progress_enabled = progress
        self.prog = prog
        self.data_dir = workdir / "data"
        self.runs_dir = workdir / "runs"
        self.timings: dict[str, float] = {}

    # -- what it trains --------------------------------------------------------------------------

    def subjects(self) -> list[str]:
        from .synthetic import SIZES as DATA_SIZES

        return DATA_SIZES[self.spec.data_size].subjects()

    def config(self, name: str, kind: str, subjects: list[str]) -> ExperimentConfig:
        """The config of one run: ``configs/`` :data:`RUN_CONFIGS` ``[kind]`` with the job's
        folders, seed, subjects and the size's values for ``kind``."""
        path = CONFIGS_DIR / RUN_CONFIGS[kind]
        if not path.is_file():
            raise SystemExit(f"{path}: missing; the main job trains the experiment files of the "
                             "repository's configs/ folder (installed as training/configs)")
        config = load_config(path)
        config.run.name, config.run.out_dir, config.run.seed = name, str(self.runs_dir), self.run_seed(name)
        config.run.threads, config.run.progress = self.threads, self.progress_enabled
        config.data.source, config.data.root = "synthetic", str(self.data_dir)
        config.data.synthetic_size, config.data.synthetic_seed = self.spec.data_size, self.seed
        config.subjects.mode = "individual" if len(subjects) == 1 else "group"
        config.subjects.ids = list(subjects)
        return config.update(self.spec.runs[kind], source=f"{path} (main job, size {self.size!r})")

    def runs(self) -> dict[str, tuple[str, list[str]]]:
        """Run name -> (kind of run, subjects), in training order."""
        runs = {}
        for subject in self.subjects():
            for condition in TRAINED_CONDITIONS:
                runs[f"{subject}_{condition}"] = (condition, [subject])
                for seed in self.extra_seeds():  # --seeds N: the same run with other seeds
                    runs[f"{subject}_{condition}_seed{seed}"] = (condition, [subject])
        runs[f"group_{GROUP_CONDITION}"] = ("group", self.subjects())
        return runs

    def extra_seeds(self) -> list[int]:
        """The seeds after ``--seed`` that ``--seeds N`` adds (run names end in ``_seed<k>``)."""
        return [self.seed + k for k in range(1, self.seeds)]

    def run_seed(self, name: str) -> int:
        """``run.seed`` of the run ``name``."""
        head, _, tail = name.rpartition("_seed")
        return int(tail) if head and tail.isdigit() else self.seed

    def hear_checkpoints(self) -> list[str]:
        """Run names exported as HEAR checkpoints: the brain-aligned (conv4) models."""
        names = [f"group_{GROUP_CONDITION}"]
        if self.spec.hear_all_subjects:
            names = [f"{s}_conv4" for s in self.subjects()] + names
        return names

    def best_models(self) -> dict[str, dict[str, Path]]:
        """Model label -> {subject: best.safetensors} of every trained run, as evaluated."""
        subjects = self.subjects()
        models = {c: {s: self.runs_dir / f"{s}_{c}" / "best.safetensors" for s in subjects}
                  for c in TRAINED_CONDITIONS}
        models["group"] = {s: self.runs_dir / f"group_{GROUP_CONDITION}" / "best.safetensors" for s in subjects}
        for seed in self.extra_seeds():  # scored as "<condition>@seed<k>", compared with nothing
            models.update({f"{c}@seed{seed}": {s: self.runs_dir / f"{s}_{c}_seed{seed}" / "best.safetensors"
                                               for s in subjects} for c in TRAINED_CONDITIONS})
        return models

    def recorded(self, step: str) -> dict[str, Any]:
        """What ``main_job.json`` recorded for the finished ``step``."""
        return json.loads((self.workdir / "main_job.json").read_text())["steps"][step]

    # -- steps -----------------------------------------------------------------------------------

    def step_generate(self) -> dict[str, Any]:
        from .synthetic import generate_friends_like

        dataset = generate_friends_like(self.data_dir, seed=self.seed, size=self.spec.data_size,
                                        overwrite=True)
        return {"subjects": list(dataset.subjects), "episodes": len(dataset.episodes)}

    def step_train(self, name: str) -> dict[str, Any]:
        from .train import train

        kind, subjects = self.runs()[name]
        result = train(self.config(name, kind, subjects))
        return {"best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
                "epochs": result.epochs, "stop_reason": result.stop_reason,
                "train_seconds": round(result.seconds, 1)}

    def step_export(self) -> dict[str, Any]:
        from .publish import export

        exported = {}
        for name in self.hear_checkpoints():
            folder = self.workdir / "hear_checkpoints" / name
            exported[name] = str(export(self.runs_dir / name, folder).checkpoint)
        return {"checkpoints": exported}

    def step_ridge(self, log: Callable[[str], None]) -> dict[str, Any]:
        """Ridge baselines (:data:`RIDGE_BASELINES`) fitted on the training and validation runs,
        with the head's lags (``model.kernel_trs``), scored on the held-out runs."""
        from .brain_score import baseline_scores
        from .data.loading import load_splits
        from .evaluate import results_from_scores

        config = self.config("evaluation", "head", self.subjects())
        scores, seconds = baseline_scores(config, load_splits(config), labels=RIDGE_BASELINES,
                                          threads=self.threads or None, log=log)
        results_from_scores(scores).save(self.workdir / "ridge")
        return {"ridge_seconds": {label: {k: round(v, 2) for k, v in timing.items()}
                                  for label, timing in seconds.items()}}

    def step_evaluate(self, log: Callable[[str], None]) -> dict[str, Any]:
        from .brain_score import data_annotations
        from .data.loading import load_splits
        from .evaluate import HeldOutResults, evaluate_models, results_from_scores

        config = self.config("evaluation", "head", self.subjects())
        splits = load_splits(config)
        kinds, ceilings, _ = data_annotations(config, splits)
        trained = evaluate_models(self.best_models(), splits.test, splits.tr, log=log)
        ridge = HeldOutResults.load(self.workdir / "ridge").scores
        results = results_from_scores({**trained.scores, **ridge}, comparisons=COMPARISONS,
                                      ceilings=ceilings, kinds=kinds)
        results.save(self.workdir / "evaluation")
        return {"test_runs": {s: len(results.scores[("head", s)].runs) for s in self.subjects()}}

    def step_hear_tasks(self) -> dict[str, Any]:
        from .hear_tasks import write_task_suite

        paths = write_task_suite(self.workdir / "hear_tasks", self.spec.hear_suite, seed=self.seed)
        return {"tasks": [p.name for p in paths]}

    def step_hear(self, log: Callable[[str], None]) -> dict[str, Any]:
        from .hear_eval import CheckpointSpec, run_hear_eval

        exported = self.recorded("export HEAR checkpoints")
        specs = [CheckpointSpec("pretrained", "pretrained")]
        specs += [CheckpointSpec(name, path) for name, path in exported["checkpoints"].items()]
        result = run_hear_eval(specs, self.workdir / "hear_tasks", self.workdir / "hear",
                               grid="default", grid_points=1, log=log)
        if result.failed:
            log("HEAR failures: " + "; ".join(f"{c.label}: {c.status} {c.error[:200]}" for c in result.failed))
        return {"failed": [c.label for c in result.failed]}

    def step_few_shot(self, log: Callable[[str], None]) -> dict[str, Any]:
        """Few-shot curves on the embeddings the HEAR step wrote (reused, not recomputed); the
        subjects' conv4 checkpoints are the paired comparison with pretrained, the group model
        is drawn but not tested (it is not one subject's)."""
        from .few_shot import DEFAULT_DRAWS, DEFAULT_KS, FewShotError, run_few_shot

        embeddings = self.workdir / "hear" / "embeddings"
        dirs = {p.name: p for p in sorted(embeddings.iterdir()) if p.is_dir()} if embeddings.is_dir() else {}
        if not dirs:  # the HEAR step logged why (it tolerates failed checkpoints)
            log("few-shot curves skipped: no checkpoint has heareval embeddings")
            return {"points": 0, "error": "no embeddings"}
        compare = [f"{s}_conv4" for s in self.subjects() if f"{s}_conv4" in dirs]
        try:
            result = run_few_shot(dirs, self.workdir / "hear" / "few_shot", DEFAULT_KS, DEFAULT_DRAWS,
                                  seed=self.seed, baseline="pretrained" if "pretrained" in dirs else None,
                                  compare=compare or None, progress=self.progress_enabled, log=log)
        except FewShotError as error:  # like a failed HEAR checkpoint: reported, not fatal
            log(f"few-shot curves failed: {error}")
            return {"points": 0, "error": str(error)}
        return {"points": len(result.scores)}

    def step_report(self) -> dict[str, Any]:
        from .evaluate import HeldOutResults, read_table
        from .report import ReportInputs, check_claims, write_report
        from .synthetic import SyntheticDataset

        dataset = SyntheticDataset.load(self.data_dir)
        held_out = HeldOutResults.load(self.workdir / "evaluation")
        curves = {s: {c: self.runs_dir / f"{s}_{c}" / "curves.csv" for c in TRAINED_CONDITIONS}
                  for s in self.subjects()}
        curves["group"] = {GROUP_CONDITION: self.runs_dir / f"group_{GROUP_CONDITION}" / "curves.csv"}
        hear_dir = self.workdir / "hear"
        hear_scores = read_table(hear_dir / "hear_scores.csv") if (hear_dir / "hear_scores.csv").is_file() else None
        inputs = ReportInputs(
            title="hear-brainsoundnet: the main job on the embedded synthetic dataset",
            settings={"command": f"{self.prog} main --size {self.size} --seed {self.seed}",
                      "work folder": str(self.workdir), "torch threads": self.threads or "default",
                      "experiments": ", ".join(f"`configs/{f}`" for f in RUN_CONFIGS.values())
                                     + f"; main-job caps: {self.spec.runs}"},
            data_facts=self.data_facts(dataset), training=self.training_table(), curves=curves,
            held_out=held_out, scatter_pairs=[("head", "conv4")], atlas=dataset.atlas,
            map_models=[(s, m) for s in self.subjects()[:1] for m in ("head", "conv4")],
            hear_scores=hear_scores, hear_status=json.loads((hear_dir / "hear_status.json").read_text()),
            few_shot_dir=hear_dir / "few_shot", timings=self.timings,
            claims=check_claims(held_out, n_seeds=self.seeds), notes=self.report_notes(held_out))
        readme = write_report(self.report_dir, inputs)
        return {"report": str(readme)}

    # -- the report's parts ----------------------------------------------------------------------

    def training_table(self):
        """One row per trained run: its experiment values and what its training step recorded."""
        import pandas as pd

        state = json.loads((self.workdir / "main_job.json").read_text())["steps"]
        training = []
        for name, (kind, subjects) in self.runs().items():
            info = state[f"train {name}"]
            config = self.config(name, kind, subjects)
            training.append({"run": name, "config": RUN_CONFIGS[kind], "condition": config.model.condition,
                             "subjects": ", ".join(subjects), "lr": config.train.lr,
                             "backbone_lr": config.train.lr * config.train.backbone_lr_scale,
                             "max_epochs": config.train.max_epochs,
                             "epochs": info["epochs"], "best_epoch": info["best_epoch"],
                             "best_val_loss": info["best_val_loss"], "stop": info["stop_reason"],
                             "train_seconds": info["train_seconds"]})
        return pd.DataFrame(training)

    def data_facts(self, dataset) -> dict[str, str]:
        """The report's description of the synthetic dataset and its split."""
        import pandas as pd

        data_config = dataset.config
        kinds = pd.Series([p["kind"] for p in dataset.ground_truth()["parcels"]]).value_counts().to_dict()
        first = self.subjects()[0]
        split = json.loads((self.runs_dir / f"{first}_head" / "data.json").read_text())["split"]
        return {"subjects": ", ".join(dataset.subjects),
                "runs": f"{sum(len(r) for r in dataset.runs.values())} half-episode runs of about "
                        f"{data_config.run_seconds:.0f} s, TR {dataset.tr} s",
                "split": f"train {len(split['train'])}, validation {len(split['validation'])}, "
                         f"test (held-out season) {len(split['test'])} episodes",
                "targets": f"{data_config.n_parcels} parcels: " + ", ".join(f"{n} {k}" for k, n in kinds.items()),
                "ground truth": f"{dataset.ground_truth_path.relative_to(self.workdir)}"}

    def report_notes(self, held_out) -> list[str]:
        """The report's caveats: synthetic data, the held-out runs' smallest p, the HEAR suite's size."""
        from .hear_task_validation import scan_tasks, test_set_sizes
        from .hear_tasks import SUITES

        test_sizes = test_set_sizes(scan_tasks(self.workdir / "hear_tasks")[0])
        n_runs = int(held_out.summary["n_runs"].min())
        return ["Synthetic data: the audio is generated and the BOLD simulated from known auditory "
                "features (training/synthetic.py), so the models show the pipeline working; they "
                "are not brain-aligned networks.",
                f"Held-out statistics use {held_out.summary['n_runs'].min()} test runs per subject: "
                f"the smallest possible two-sided Wilcoxon p is {2 * 0.5 ** n_runs:.2g}.",
                "The generated HEAR suite is small (test clips: "
                + ", ".join(f"{task} {'+'.join(map(str, n))}" for task, n in test_sizes.items())
                + f"): even in the largest, one clip moves an accuracy by "
                f"{1 / max(map(max, test_sizes.values())):.3f}, so differences of a clip or two are noise. "
                "Predictor grid (one point, trained to convergence): "
                f"{SUITES[self.spec.hear_suite]['grid']}."]

    # -- driver ----------------------------------------------------------------------------------

    def steps(self) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
        log = lambda message: self.progress.write(f"    {message}")  # noqa: E731
        steps = [("generate data", self.step_generate)]
        steps += [(f"train {name}", lambda n=name: self.step_train(n)) for name in self.runs()]
        steps += [("export HEAR checkpoints", self.step_export),
                  ("ridge baselines", lambda: self.step_ridge(log)),
                  ("evaluate held-out runs", lambda: self.step_evaluate(log)),
                  ("generate HEAR tasks", self.step_hear_tasks),
                  ("HEAR evaluation", lambda: self.step_hear(log)),
                  ("HEAR few-shot curves", lambda: self.step_few_shot(log)),
                  ("report", self.step_report)]
        return steps

    def settings(self) -> dict[str, Any]:
        """What a work folder is made with: size, seed(s) and the fingerprint of everything that
        shapes the results (the size's caps, the dataset's design, the task suite, the
        experiment files' values, not their text: a comment edit keeps a work folder valid)."""
        from .hear_tasks import SUITES
        from .state import STATE_FORMAT_VERSION
        from .synthetic import SIZES as DATA_SIZES

        # The run files' format: a work folder whose runs older code wrote is refused up front
        # (made with other settings), not half-way through at export.
        shaping = {"run_state_format": STATE_FORMAT_VERSION,
                   "job": asdict(self.spec), "data": asdict(DATA_SIZES[self.spec.data_size]),
                   "hear_suite": SUITES[self.spec.hear_suite],
                   "configs": {f: tomllib.loads((CONFIGS_DIR / f).read_text()) if (CONFIGS_DIR / f).is_file()
                               else None for f in sorted(RUN_CONFIGS.values())}}
        spec = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]
        return {"size": self.size, "seed": self.seed, "settings_sha256": spec,
                **({"seeds": self.seeds} if self.seeds > 1 else {})}

    def run(self) -> Path:
        """Run every step not finished before; return the report's README path."""
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.workdir.mkdir(parents=True, exist_ok=True)
        state = JobState.open(self.workdir / "main_job.json", self.settings())
        steps = self.steps()
        self.progress = Progress([name for name, _ in steps], self.progress_enabled)
        readme = self.report_dir / "README.md"
        try:
            for name, action in steps:
                # The report is rewritten unless it exists: it may have been deleted or moved.
                skipped = state.done(name) and (name != "report" or readme.is_file())
                self.progress.begin(name, skipped)
                if skipped:
                    self.timings[name] = state.steps[name]["seconds"]
                else:
                    start = time.perf_counter()
                    info = action()
                    self.timings[name] = time.perf_counter() - start
                    state.record(name, self.timings[name], **info)
                self.progress.end()
        finally:
            self.progress.close()
        return readme


def run_main_job(workdir: str | os.PathLike, report_dir: str | os.PathLike, *, size: str = "default",
                 seed: int = 0, threads: int = 0, progress: bool = True, seeds: int = 1,
                 prog: str = "python -m training") -> Path:
    """Generate the synthetic data, train head-only, conv4 and the random-init null per subject
    (``seeds`` seeds each) and a group conv4 model, fit the ridge baselines (frozen pretrained
    conv7, log-mel, the oracle), score all on the held-out season, run heareval on a generated task
    suite for the pretrained and brain-aligned checkpoints, and write the report; return the
    report's README path. Rerunning skips finished steps. ``prog`` names the command line in the
    report."""
    job = MainJob(Path(workdir), Path(report_dir), size, seed, threads, progress, seeds, prog=prog)
    return job.run()
