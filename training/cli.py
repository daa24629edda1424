"""The project's command line: ``hear-brainsoundnet <command>`` (``python -m training <command>``
in a clone).

Commands::

    main        the main job: synthetic data -> training -> held-out evaluation -> HEAR -> report
    generate    write the synthetic Friends-like dataset         (training.synthetic)
    train       train one model from a TOML config               (training.train)
    evaluate    score trained runs on their held-out runs, compare them, draw brain maps
    hear-eval   run heareval over checkpoints and a tasks dir, aggregate the scores
    publish     export a run as a HEAR checkpoint / upload it    (training.publish)
    brain-score held-out encoding score of any HEAR module, ridge (training.brain_score)

This module only parses arguments and hands them to the module doing the work: the main job is
:mod:`training.main_job` (resumable: a second run skips finished steps; ``--size tiny`` is the
small setting the tests use), ``evaluate`` is :mod:`training.evaluate_runs`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any, Sequence

# The command line's name in help texts and the report: the repository's training/ folder is the
# package ``training`` in a clone (run as ``python -m training``) and installs as
# ``hear_brainsoundnet.training``, run by the ``hear-brainsoundnet`` console script (setup.cfg).
PROG = "python -m training" if __package__ == "training" else "hear-brainsoundnet"

# Commands with their own command line (the module's ``main(argv)``), by relative module name.
DELEGATED = {"generate": ".synthetic", "train": ".train", "publish": ".publish", "brain-score": ".brain_score"}


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def cmd_main(args: argparse.Namespace) -> int:
    from .main_job import run_main_job

    start = time.perf_counter()
    workdir = args.workdir or f"runs/main-{args.size}"
    readme = run_main_job(workdir, args.out, size=args.size, seed=args.seed, threads=args.threads,
                          progress=not args.no_progress, seeds=args.seeds, prog=PROG)
    print(f"report: {readme} ({(time.perf_counter() - start) / 60:.1f} min this session)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate_runs import evaluate_runs, run_models

    results, files = evaluate_runs(run_models(args.runs), args.out, baseline=args.baseline, atlas=args.atlas)
    print(results.summary.to_string(index=False))
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def cmd_hear_eval(args: argparse.Namespace) -> int:
    from .few_shot import check_args
    from .hear_eval import CheckpointSpec, run_hear_eval
    from .hear_tasks import write_task_suite

    tasks_dir = Path(args.tasks_dir) if args.tasks_dir else Path(args.out) / "generated_tasks"
    if not args.tasks_dir and not tasks_dir.is_dir():
        write_task_suite(tasks_dir, args.suite)
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


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

def add_main_command(commands: Any) -> None:
    from .main_job import SIZES

    main = commands.add_parser("main", help="the main job on the embedded synthetic dataset")
    main.add_argument("--out", default="report", help="report folder (default: report)")
    main.add_argument("--workdir", help="data, runs and intermediate results (default: runs/main-SIZE)")
    main.add_argument("--size", default="default", choices=sorted(SIZES),
                      help="default (the README's run) or tiny (the tests' setting, a few times faster)")
    main.add_argument("--quick", dest="size", action="store_const", const="tiny", help="same as --size tiny")
    main.add_argument("--seed", type=int, default=0)
    main.add_argument("--seeds", type=int, default=1,
                      help="train each per-subject condition with N seeds (--seed, --seed + 1, ...) and "
                           "report the spread (default 1; the group model keeps one seed)")
    main.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    main.add_argument("--no-progress", action="store_true", help="no progress display")
    main.set_defaults(func=cmd_main)


def add_delegated_commands(commands: Any) -> None:
    """The commands with their own command line (:func:`main` hands them the arguments): listed
    for ``--help``; ``PROG COMMAND --help`` shows theirs."""
    from .config import SYNTHETIC_SIZES

    commands.add_parser("generate", add_help=False, help=f"synthetic dataset: {PROG} generate OUT_DIR "
                        f"[--size {'|'.join(SYNTHETIC_SIZES)}] [--seed N] [--overwrite]")
    commands.add_parser("train", add_help=False,
                        help=f"train a model: {PROG} train CONFIG [--set KEY=VALUE ...]")
    commands.add_parser("publish", add_help=False, help=f"{PROG} publish {{export,publish}} ...")
    commands.add_parser("brain-score", add_help=False,
                        help=f"held-out encoding score of any HEAR module under a lagged ridge: {PROG} "
                        "brain-score MODULE --config CONFIG [--model-file PATH] [--model-options JSON] "
                        "[--out DIR]")


def add_evaluate_command(commands: Any) -> None:
    ev = commands.add_parser("evaluate", help="score runs on their held-out runs and compare them")
    ev.add_argument("runs", nargs="+", metavar="[LABEL=]RUN_DIR",
                    help="run directories (or best.safetensors files); the first one's config gives the data")
    ev.add_argument("--baseline", help="label the others are compared with (default: the first)")
    ev.add_argument("--out", default="evaluation", help="output folder for the CSV tables")
    ev.add_argument("--atlas", help="labels image of the parcels, for brain maps (default: the data's atlas, "
                    "if the config names one or the data are synthetic)")
    ev.set_defaults(func=cmd_evaluate)


def add_hear_eval_command(commands: Any) -> None:
    from .few_shot import HEAREVAL_GRIDS, add_few_shot_arguments
    from .hear_tasks import SUITES

    he = commands.add_parser("hear-eval", help="heareval over checkpoints and a tasks dir")
    he.add_argument("checkpoints", nargs="+", metavar="[LABEL=]CHECKPOINT",
                    help="checkpoint files or manifest names (e.g. pretrained)")
    he.add_argument("--tasks-dir", help="HEAR task folders (default: a generated suite in OUT/generated_tasks)")
    he.add_argument("--suite", default="default", choices=sorted(SUITES),
                    help="size of the generated suite when no --tasks-dir is given")
    he.add_argument("--out", default="hear", help="output folder (default: hear)")
    he.add_argument("--grid", default="default", choices=HEAREVAL_GRIDS, help="heareval's predictor grid")
    he.add_argument("--grid-points", type=int, default=1)
    he.add_argument("--skip-malformed", action="store_true",
                    help="score the valid tasks and list malformed task folders as skipped "
                         "(default: a malformed task folder is an error and nothing runs)")
    add_few_shot_arguments(he)  # --few-shot KS --draws N ...: off unless --few-shot is given
    he.set_defaults(func=cmd_hear_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="hear-brainsoundnet's command line: the "
                                     "main job, data, training, evaluation, HEAR, publishing.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_main_command(commands)
    add_delegated_commands(commands)
    add_evaluate_command(commands)
    add_hear_eval_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        # Relative names: the package is ``training`` in a clone, ``hear_brainsoundnet.training`` installed.
        module = importlib.import_module(DELEGATED[argv[0]], __package__)
        return module.main(argv[1:], prog=f"{PROG} {argv[0]}")
    args = build_parser().parse_args(argv)
    return args.func(args)
