"""Run heareval 2021.1.3's runners on today's PyTorch and Lightning, without editing heareval.

Two known breakages, shimmed at run time in this process only:

- torch >= 2.6 loads checkpoints with ``weights_only=True`` by default and refuses the
  Lightning checkpoints the predictions runner reloads (``UnpicklingError: Weights only load
  failed``). Those files are written by the same run a moment earlier, so full unpickling is
  safe here: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set (torch reads it at each load).
- Lightning >= 1.6 removed ``FitLoop.current_epoch``; heareval still assigns
  ``trainer.fit_loop.current_epoch = best_epoch`` before testing, the assignment silently
  creates an unused attribute, and event tasks then crash with ``KeyError: <epoch>`` looking up
  the post-processing chosen at that epoch (hear-eval-kit issue #432). The shim gives
  ``FitLoop`` a ``current_epoch`` property backed by ``epoch_progress.current.completed``
  (what ``trainer.current_epoch`` reads), upstream's suggested fix.

Usage (same arguments as heareval's own entry points)::

    python -m training.heareval_compat embeddings MODULE --tasks-dir T --embeddings-dir E [...]
    python -m training.heareval_compat predictions E/MODULE/TASK... [--grid ...] [...]

Lightning writes its logs under ``./logs`` relative to the working directory.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

RUNNERS = {"embeddings": "heareval.embeddings.runner", "predictions": "heareval.predictions.runner"}


def _fit_loop_current_epoch() -> None:
    from pytorch_lightning.loops.fit_loop import FitLoop

    if isinstance(getattr(FitLoop, "current_epoch", None), property):
        return  # already shimmed, or a Lightning that has it again

    def get(self: FitLoop) -> int:
        return self.epoch_progress.current.completed

    def set_(self: FitLoop, epoch: int) -> None:
        self.epoch_progress.current.completed = epoch

    FitLoop.current_epoch = property(get, set_, doc="Settable epoch (shim for heareval on Lightning >= 1.6)")


def apply_patches() -> None:
    """Apply both shims to this process (idempotent)."""
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    _fit_loop_current_epoch()


def command(runner: str, args: Sequence[str]) -> list[str]:
    """The argv that runs heareval's ``runner`` ("embeddings" or "predictions") with the shims."""
    if runner not in RUNNERS:
        raise ValueError(f"unknown heareval runner {runner!r}; choose one of {list(RUNNERS)}")
    return [sys.executable, "-m", __name__, runner, *map(str, args)]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in RUNNERS:
        sys.exit(f"usage: python -m training.heareval_compat {{{'|'.join(RUNNERS)}}} ARGS...\n"
                 "(ARGS as for python -m heareval.<runner>.runner)")
    apply_patches()
    import importlib

    runner = importlib.import_module(RUNNERS[argv[0]]).runner  # a click command
    runner.main(args=argv[1:], prog_name=f"heareval_compat {argv[0]}")


if __name__ == "__main__":
    main()
