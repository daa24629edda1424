"""The project's command line: ``python -m training <command>``.

Commands::

    main        the main job: synthetic data -> training -> held-out evaluation -> HEAR -> report
    generate    write the synthetic Friends-like dataset         (training.synthetic)
    train       train one model from a TOML config               (training.train)
    evaluate    score trained runs on their held-out runs, compare them, draw brain maps
    hear-eval   run heareval over checkpoints and a tasks dir, aggregate the scores
    publish     export a run as a HEAR checkpoint / upload it    (training.publish)
    brain-score held-out encoding score of any HEAR module, ridge (training.brain_score)

The main job (``python -m training main``) is resumable: each finished step is recorded in
``<workdir>/main_job.json`` and skipped when the command is run again (training runs and
heareval also resume inside a step). ``--size tiny`` is the small setting the tests use.
Measured on the 2-core development machine (`time make demo`, clean clone): default 7.1 min;
`--size tiny` about 1 min.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hear_brainsoundnet.files import atomic_write

# ----------------------------------------------------------------------------------------------
# The main job's settings
# ----------------------------------------------------------------------------------------------

CONDITIONS = ("head", "conv4", "null")  # the baseline, the study's main model, the null
GROUP_CONDITION = "conv4"
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

    ``runs`` holds config overrides per kind of run (``head``, ``conv4``, ``null`` per subject
    and ``group``, the group conv4 model) applied on top of :data:`RUN_CONFIGS` (epoch caps
    that keep the job within its time); ``hear_suite`` is the size of the generated HEAR task
    suite (:data:`training.hear_eval.SUITES`).
    """

    data_size: str
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


@dataclass
class JobState:
    """``<workdir>/main_job.json``: the settings a work folder was made with and the finished steps."""

    path: Path
    settings: dict[str, Any]
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, settings: dict[str, Any]) -> "JobState":
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


def synthetic_ground_truth(root: str | os.PathLike, held_out: Mapping[str, Sequence[str]]):
    """(noise ceilings ``{subject: {"r": ..., "r2": ...}}`` on each subject's held-out runs
    ``held_out[subject]``, parcel kinds, atlas path) of the synthetic dataset at ``root``."""
    from .evaluate import held_out_noise_ceiling
    from .synthetic import SyntheticDataset

    dataset = SyntheticDataset.load(root)
    kinds = [parcel["kind"] for parcel in dataset.ground_truth()["parcels"]]
    ceilings = {s: held_out_noise_ceiling(root, s, runs) for s, runs in held_out.items()}
    return ceilings, kinds, dataset.atlas


def held_out_runs(splits) -> dict[str, list[str]]:
    """Each subject's held-out runs in ``splits`` (:class:`training.batches.DataSplits`)."""
    return {s: [e.name for e in splits.test if s in e.targets] for s in splits.target_names}


# ----------------------------------------------------------------------------------------------
# The main job
# ----------------------------------------------------------------------------------------------

class MainJob:
    """The end-to-end demonstration on the embedded synthetic dataset (see :func:`run_main_job`)."""

    def __init__(self, workdir: Path, report_dir: Path, size: str, seed: int, threads: int,
                 progress: bool, seeds: int = 1):
        if size not in SIZES:
            raise SystemExit(f"--size {size!r}: choose one of {', '.join(SIZES)}")
        if seeds < 1:
            raise SystemExit(f"--seeds {seeds}: train each condition with at least 1 seed")
        self.seeds = seeds
        self.workdir, self.report_dir = workdir, report_dir
        self.size, self.spec, self.seed, self.threads = size, SIZES[size], seed, threads
        self.progress_enabled = progress
        self.data_dir = workdir / "data"
        self.runs_dir = workdir / "runs"
        self.timings: dict[str, float] = {}

    # -- helpers -------------------------------------------------------------------------------

    def subjects(self) -> list[str]:
        from .synthetic import SIZES as DATA_SIZES

        return DATA_SIZES[self.spec.data_size].subjects()

    def config(self, name: str, kind: str, subjects: list[str]):
        """The config of one run: ``configs/`` :data:`RUN_CONFIGS` ``[kind]`` with the job's
        folders, seed, subjects and the size's overrides."""
        from .config import load_config

        path = CONFIGS_DIR / RUN_CONFIGS[kind]
        if not path.is_file():
            raise SystemExit(f"{path}: missing; the main job trains the experiment files of the "
                             "repository's configs/ folder (installed as training/configs)")
        values = {"run.name": name, "run.out_dir": str(self.runs_dir), "run.seed": self.run_seed(name),
                  "run.threads": self.threads, "run.progress": self.progress_enabled,
                  "data.source": "synthetic", "data.root": str(self.data_dir),
                  "data.synthetic_size": self.spec.data_size, "data.synthetic_seed": self.seed,
                  "subjects.mode": "individual" if len(subjects) == 1 else "group",
                  "subjects.ids": subjects, **self.spec.runs[kind]}
        return load_config(path, [f"{k}={json.dumps(v)}" for k, v in values.items()])

    def runs(self) -> dict[str, tuple[str, list[str]]]:
        """Run name -> (kind of run, subjects), in training order."""
        runs = {}
        for subject in self.subjects():
            for condition in CONDITIONS:
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

    # -- steps ---------------------------------------------------------------------------------

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
        from .batches import load_splits
        from .brain_score import baseline_scores
        from .evaluate import results_from_scores

        config = self.config("evaluation", "head", self.subjects())
        scores, seconds = baseline_scores(config, load_splits(config), labels=RIDGE_BASELINES,
                                          threads=self.threads or None, log=log)
        results_from_scores(scores).save(self.workdir / "ridge")
        return {"ridge_seconds": {label: {k: round(v, 2) for k, v in timing.items()}
                                  for label, timing in seconds.items()}}

    def step_evaluate(self, log: Callable[[str], None]) -> dict[str, Any]:
        from .batches import load_splits
        from .evaluate import HeldOutResults, evaluate_models, results_from_scores

        subjects = self.subjects()
        config = self.config("evaluation", "head", subjects)
        splits = load_splits(config)
        models = {c: {s: self.runs_dir / f"{s}_{c}" / "best.safetensors" for s in subjects}
                  for c in CONDITIONS}
        models["group"] = {s: self.runs_dir / f"group_{GROUP_CONDITION}" / "best.safetensors" for s in subjects}
        for seed in self.extra_seeds():  # scored as "<condition>@seed<k>", compared with nothing
            models.update({f"{c}@seed{seed}": {s: self.runs_dir / f"{s}_{c}_seed{seed}" / "best.safetensors"
                                               for s in subjects} for c in CONDITIONS})
        ceilings, kinds, _ = synthetic_ground_truth(self.data_dir, held_out_runs(splits))
        trained = evaluate_models(models, splits.test, splits.tr, log=log)
        ridge = HeldOutResults.load(self.workdir / "ridge").scores
        results = results_from_scores({**trained.scores, **ridge}, comparisons=COMPARISONS,
                                      ceilings=ceilings, kinds=kinds)
        results.save(self.workdir / "evaluation")
        return {"test_runs": {s: len(results.scores[("head", s)].runs) for s in subjects}}

    def step_hear_tasks(self) -> dict[str, Any]:
        from .hear_eval import write_task_suite

        paths = write_task_suite(self.workdir / "hear_tasks", self.spec.hear_suite, seed=self.seed)
        return {"tasks": [p.name for p in paths]}

    def step_hear(self, log: Callable[[str], None]) -> dict[str, Any]:
        from .hear_eval import CheckpointSpec, run_hear_eval

        exported = json.loads((self.workdir / "main_job.json").read_text())["steps"]["export HEAR checkpoints"]
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
        from .few_shot import DEFAULT_DRAWS, DEFAULT_KS, run_few_shot

        from .few_shot import FewShotError

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
        import pandas as pd

        from .evaluate import HeldOutResults, read_table
        from .hear_eval import SUITES, scan_tasks, test_set_sizes
        from .report import ReportInputs, check_claims, write_report
        from .synthetic import SyntheticDataset

        dataset = SyntheticDataset.load(self.data_dir)
        state = json.loads((self.workdir / "main_job.json").read_text())["steps"]
        held_out = HeldOutResults.load(self.workdir / "evaluation")
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
        curves = {s: {c: self.runs_dir / f"{s}_{c}" / "curves.csv" for c in CONDITIONS}
                  for s in self.subjects()}
        curves["group"] = {GROUP_CONDITION: self.runs_dir / f"group_{GROUP_CONDITION}" / "curves.csv"}
        hear_dir = self.workdir / "hear"
        hear_scores = read_table(hear_dir / "hear_scores.csv") if (hear_dir / "hear_scores.csv").is_file() else None
        hear_status = json.loads((hear_dir / "hear_status.json").read_text())
        test_sizes = test_set_sizes(scan_tasks(self.workdir / "hear_tasks")[0])
        data_config = dataset.config
        kinds = pd.Series([p["kind"] for p in dataset.ground_truth()["parcels"]]).value_counts().to_dict()
        first = self.subjects()[0]
        split = json.loads((self.runs_dir / f"{first}_head" / "data.json").read_text())["split"]
        inputs = ReportInputs(
            title="hear-brainsoundnet: the main job on the embedded synthetic dataset",
            settings={"command": f"python -m training main --size {self.size} --seed {self.seed}",
                      "work folder": str(self.workdir), "torch threads": self.threads or "default",
                      "experiments": ", ".join(f"`configs/{f}`" for f in RUN_CONFIGS.values())
                                     + f"; main-job caps: {self.spec.runs}"},
            data_facts={"subjects": ", ".join(dataset.subjects),
                        "runs": f"{sum(len(r) for r in dataset.runs.values())} half-episode runs of about "
                                f"{data_config.run_seconds:.0f} s, TR {dataset.tr} s",
                        "split": f"train {len(split['train'])}, validation {len(split['validation'])}, "
                                 f"test (held-out season) {len(split['test'])} episodes",
                        "targets": f"{data_config.n_parcels} parcels: " + ", ".join(f"{n} {k}" for k, n in kinds.items()),
                        "ground truth": f"{dataset.ground_truth_path.relative_to(self.workdir)}"},
            training=pd.DataFrame(training), curves=curves, held_out=held_out,
            scatter_pairs=[("head", "conv4")], atlas=dataset.atlas,
            map_models=[(s, m) for s in self.subjects()[:1] for m in ("head", "conv4")],
            hear_scores=hear_scores, hear_status=hear_status, few_shot_dir=hear_dir / "few_shot",
            timings=self.timings,
            claims=check_claims(held_out, n_seeds=self.seeds),
            notes=["Synthetic data: the audio is generated and the BOLD simulated from known auditory "
                   "features (training/synthetic.py), so the models show the pipeline working; they "
                   "are not brain-aligned networks.",
                   f"Held-out statistics use {held_out.summary['n_runs'].min()} test runs per subject: "
                   f"the smallest possible two-sided Wilcoxon p is "
                   f"{2 * 0.5 ** int(held_out.summary['n_runs'].min()):.2g}.",
                   "The generated HEAR suite is small (test clips: "
                   + ", ".join(f"{task} {'+'.join(map(str, n))}" for task, n in test_sizes.items())
                   + f"): even in the largest, one clip moves an accuracy by "
                   f"{1 / max(map(max, test_sizes.values())):.3f}, so differences of a clip or two are noise. "
                   "Predictor grid (one point, trained to convergence): "
                   f"{SUITES[self.spec.hear_suite]['grid']}."])
        readme = write_report(self.report_dir, inputs)
        return {"report": str(readme)}

    # -- driver --------------------------------------------------------------------------------

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

    def run(self) -> Path:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The fingerprint of everything that shapes the results (the size's caps, the dataset's
        # design, the task suite, the experiment files): a work folder made otherwise is refused,
        # rather than resumed on stale data.
        import hashlib
        import tomllib

        from .hear_eval import SUITES
        from .synthetic import SIZES as DATA_SIZES

        settings = {"job": asdict(self.spec), "data": asdict(DATA_SIZES[self.spec.data_size]),
                    "hear_suite": SUITES[self.spec.hear_suite],
                    # the files' values, not their text: a comment edit keeps a work folder valid
                    "configs": {f: tomllib.loads((CONFIGS_DIR / f).read_text()) if (CONFIGS_DIR / f).is_file()
                                else None for f in sorted(RUN_CONFIGS.values())}}
        spec = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        state = JobState.open(self.workdir / "main_job.json",
                              {"size": self.size, "seed": self.seed, "settings_sha256": spec,
                               **({"seeds": self.seeds} if self.seeds > 1 else {})})
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
                 seed: int = 0, threads: int = 0, progress: bool = True, seeds: int = 1) -> Path:
    """Generate the synthetic data, train head-only, conv4 and the random-init null per subject
    (``seeds`` seeds each) and a group conv4 model, fit the ridge baselines (frozen pretrained
    conv7, log-mel, the oracle), score all on the held-out season, run heareval on a generated task
    suite for the pretrained and brain-aligned checkpoints, and write the report; return the
    report's README path. Rerunning skips finished steps."""
    job = MainJob(Path(workdir), Path(report_dir), size, seed, threads, progress, seeds)
    return job.run()


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def cmd_main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    workdir = args.workdir or f"runs/main-{args.size}"
    readme = run_main_job(workdir, args.out, size=args.size, seed=args.seed, threads=args.threads,
                          progress=not args.no_progress, seeds=args.seeds)
    print(f"report: {readme} ({(time.perf_counter() - start) / 60:.1f} min this session)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score run directories on the held-out runs of the first run's data split."""
    from .batches import load_splits
    from .config import load_config
    from .evaluate import evaluate_models
    from .state import read_model_file

    runs = {}
    for text in args.runs:
        label, sep, path = text.partition("=")
        path = Path(path if sep else label)
        label = label if sep else path.name
        best = path / "best.safetensors" if path.is_dir() else path
        if not best.is_file():
            raise SystemExit(f"{best}: no such model file (give a run directory or its best.safetensors)")
        runs[label] = best
    if args.baseline and args.baseline not in runs:
        raise SystemExit(f"--baseline {args.baseline!r} is not one of the runs {list(runs)}")
    first = next(iter(runs.values()))
    config = load_config(first.parent / "config.toml")
    models = {label: {s: path for s in read_model_file(path)[1]["model"]["subjects"]}
              for label, path in runs.items()}
    subjects = sorted({s for files in models.values() for s in files})
    config.subjects.ids, config.subjects.mode = subjects, "group" if len(subjects) > 1 else "individual"
    config.subjects.held_out = ""
    splits = load_splits(config)
    baseline = args.baseline or next(iter(runs))
    pairs = [(baseline, label) for label in runs if label != baseline]
    ceilings = kinds = None
    atlas = args.atlas or (config.data.atlas or None)
    if config.data.source == "synthetic":  # the embedded data carry their ground truth
        ceilings, kinds, synthetic_atlas = synthetic_ground_truth(config.data.root, held_out_runs(splits))
        atlas = atlas or synthetic_atlas
    results = evaluate_models(models, splits.test, splits.tr, comparisons=pairs, ceilings=ceilings,
                              kinds=kinds, log=print)
    files = results.save(args.out)
    print(results.summary.to_string(index=False))
    if atlas:
        from .report import brain_map

        for (model, subject), scores in results.scores.items():
            stem = Path(args.out) / f"map_r_{model}_{subject}"
            brain_map(scores.mean("r"), atlas, f"{stem}.png", f"{stem}.html",
                      title=f"{subject} {model}: held-out r")
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def cmd_hear_eval(args: argparse.Namespace) -> int:
    from .hear_eval import CheckpointSpec, run_hear_eval, write_task_suite

    tasks_dir = Path(args.tasks_dir) if args.tasks_dir else Path(args.out) / "generated_tasks"
    if not args.tasks_dir and not tasks_dir.is_dir():
        write_task_suite(tasks_dir, args.suite)
    from .few_shot import check_args

    try:
        specs = [CheckpointSpec.parse(text) for text in args.checkpoints]
        check_args(args, [spec.label for spec in specs])  # before hours of embeddings, not after
        result = run_hear_eval(specs, tasks_dir, args.out, grid=args.grid, grid_points=args.grid_points,
                               skip_malformed=args.skip_malformed)
    except (ValueError, FileNotFoundError) as error:  # MalformedTasksError, FewShotError: ValueErrors
        raise SystemExit(f"error: {error}") from None
    if not result.scores.empty:
        print((Path(args.out) / "hear_scores.md").read_text())
    for name in result.task_problems:
        print(f"skipped malformed task {name} (--skip-malformed)", file=sys.stderr)
    for outcome in result.failed:
        print(f"checkpoint {outcome.label}: {outcome.status}: {outcome.error or outcome.tasks_failed}",
              file=sys.stderr)
    few_shot_sweep(args, result)
    return 1 if len(result.failed) == len(result.checkpoints) else 0


def few_shot_sweep(args: argparse.Namespace, result: Any) -> None:
    """``hear-eval --few-shot KS``: few-shot curves on the embeddings heareval just wrote
    (``OUT/embeddings/<label>``), reused for every k and draw; nothing when not asked."""
    from .few_shot import FewShotError, run_from_args

    embeddings = Path(args.out) / "embeddings"
    dirs = {c.label: embeddings / c.label for c in result.checkpoints if (embeddings / c.label).is_dir()}
    try:
        few = run_from_args(args, dirs, Path(args.out) / "few_shot", tasks=result.tasks)
    except FewShotError as error:
        raise SystemExit(f"error: {error}") from None
    if few is not None:
        print((Path(args.out) / "few_shot" / "few_shot.md").read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    main = commands.add_parser("main", help="the main job on the embedded synthetic dataset")
    main.add_argument("--out", default="report", help="report folder (default: report)")
    main.add_argument("--workdir", help="data, runs and intermediate results (default: runs/main-SIZE)")
    main.add_argument("--size", default="default", choices=sorted(SIZES),
                      help="default (about 7 min on 2 cores) or tiny (for tests, about 1 min)")
    main.add_argument("--quick", dest="size", action="store_const", const="tiny", help="same as --size tiny")
    main.add_argument("--seed", type=int, default=0)
    main.add_argument("--seeds", type=int, default=1,
                      help="train each per-subject condition with N seeds (--seed, --seed + 1, ...) and "
                           "report the spread (default 1; the group model keeps one seed)")
    main.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    main.add_argument("--no-progress", action="store_true", help="no progress display")
    main.set_defaults(func=cmd_main)

    # These keep their own command lines (main() hands them the arguments): listed for --help.
    commands.add_parser("generate", help="synthetic dataset: python -m training generate OUT_DIR "
                        "[--size tiny|default|large] [--seed N] [--overwrite]", add_help=False)
    commands.add_parser("train", help="train a model: python -m training train CONFIG [--set KEY=VALUE ...]",
                        add_help=False)
    commands.add_parser("publish", help="python -m training publish {export,publish} ...", add_help=False)
    commands.add_parser("brain-score", help="held-out encoding score of any HEAR module under a lagged ridge: "
                        "python -m training brain-score MODULE --config CONFIG [--model-file PATH] "
                        "[--model-options JSON] [--out DIR]", add_help=False)

    ev = commands.add_parser("evaluate", help="score runs on their held-out runs and compare them")
    ev.add_argument("runs", nargs="+", metavar="[LABEL=]RUN_DIR",
                    help="run directories (or best.safetensors files); the first one's config gives the data")
    ev.add_argument("--baseline", help="label the others are compared with (default: the first)")
    ev.add_argument("--out", default="evaluation", help="output folder for the CSV tables")
    ev.add_argument("--atlas", help="labels image of the parcels, for brain maps (default: the data's atlas, "
                    "if the config names one or the data are synthetic)")
    ev.set_defaults(func=cmd_evaluate)

    he = commands.add_parser("hear-eval", help="heareval over checkpoints and a tasks dir")
    he.add_argument("checkpoints", nargs="+", metavar="[LABEL=]CHECKPOINT",
                    help="checkpoint files or manifest names (e.g. pretrained)")
    he.add_argument("--tasks-dir", help="HEAR task folders (default: a generated suite in OUT/generated_tasks)")
    he.add_argument("--suite", default="default", choices=("default", "tiny"),
                    help="size of the generated suite when no --tasks-dir is given")
    he.add_argument("--out", default="hear", help="output folder (default: hear)")
    he.add_argument("--grid", default="default", choices=("default", "fast", "faster"))
    he.add_argument("--grid-points", type=int, default=1)
    he.add_argument("--skip-malformed", action="store_true",
                    help="score the valid tasks and list malformed task folders as skipped "
                         "(default: a malformed task folder is an error and nothing runs)")
    from .few_shot import add_few_shot_arguments

    add_few_shot_arguments(he)  # --few-shot KS --draws N ...: off unless --few-shot is given
    he.set_defaults(func=cmd_hear_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Relative names: the package is ``training`` in a clone and ``hear_brainsoundnet.training`` installed.
    delegated = {"generate": ".synthetic", "train": ".train", "publish": ".publish", "brain-score": ".brain_score"}
    if argv and argv[0] in delegated:
        import importlib

        return importlib.import_module(delegated[argv[0]], __package__).main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)
