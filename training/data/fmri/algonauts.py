"""The Algonauts 2025 release's parcellated HDF5 files to :class:`~training.data.fmri.runs.BrainRuns`.

:func:`find_algonauts_h5` picks a subject's Friends file by its BIDS entities
(``task-friends``); :func:`read_algonauts_h5` reads it: one dataset per run named
``ses-XXX_task-<episode>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import require_file
from ..errors import DataError
from .runs import DEFAULT_TR, BrainRuns, log_repeats, natural_key, normalize_subject

__all__ = ["bids_entities", "find_algonauts_h5", "read_algonauts_h5"]

_H5_RUN = re.compile(r"^(?:ses-(?P<ses>[a-zA-Z0-9]+)_)?task-(?P<task>[a-zA-Z0-9]+)(?:_run-(?P<run>[a-zA-Z0-9]+))?$")
_BIDS_ENTITY = re.compile(r"^(?P<key>[a-zA-Z0-9]+)-(?P<value>[a-zA-Z0-9]+)$")


def bids_entities(name: str) -> dict[str, str]:
    """BIDS entities of a file name: ``"sub-01_task-friends_desc-s1_bold.h5"`` ->
    ``{"sub": "01", "task": "friends", "desc": "s1"}`` (the suffix, ``bold``, is not one)."""
    stem = Path(name).name.split(".", 1)[0]
    return {m["key"]: m["value"] for part in stem.split("_") if (m := _BIDS_ENTITY.match(part))}


def find_algonauts_h5(root: str | Path, subject: str, *, task: str = "friends") -> Path:
    """A subject's HDF5 file for ``task`` under ``root`` (the release's ``fmri/`` folder).

    The Algonauts 2025 release holds, in ``fmri/sub-01/func/``, the Friends file
    (``..._task-friends_..._bold.h5``) beside Movie10 files (``task-movie10``, one of them
    ``desc-cropped``).  Files whose ``task`` entity is another task are ignored; among the
    rest, files naming ``task`` win over files with no task entity.  The chosen file may be
    a git-annex link that was not fetched: :func:`read_algonauts_h5` says so.

    Raises
    ------
    DataError
        No file for this subject and task (the message lists the other tasks' files found),
        or several (set ``data.brain_file`` to choose one).
    """
    root = Path(root)
    subject = normalize_subject(subject)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (data.root: the release's fmri/ folder)")
    # glob lists unfetched annex links too (they are names; is_file() would drop them).
    found = sorted({p for pattern in (f"{subject}/**/*.h5", f"**/{subject}_*.h5") for p in root.glob(pattern)})
    found = [p for p in found if bids_entities(p.name).get("sub", subject[4:]) == subject[4:]]
    tasks = {p: bids_entities(p.name).get("task") for p in found}
    named = [p for p in found if tasks[p] == task]
    chosen = named or [p for p in found if tasks[p] is None]
    if len(chosen) == 1:
        return chosen[0]
    if not chosen:
        others = ", ".join(str(p.relative_to(root)) for p in found) or "none"
        raise DataError(
            f"{root}: no HDF5 file for {subject} and task-{task} (looked for {subject}/**/*.h5 and "
            f"**/{subject}_*.h5; found: {others})"
        )
    raise DataError(
        f"{root}: several HDF5 files for {subject} and task-{task}: "
        f"{', '.join(str(p.relative_to(root)) for p in chosen)}; set data.brain_file to the one to use"
    )


def read_algonauts_h5(
    h5_path: str | Path,
    subject: str | None = None,
    *,
    tr: float = DEFAULT_TR,
    target_names: Sequence[str] | None = None,
    episodes: Iterable[str] | None = None,
) -> BrainRuns:
    """Read one subject's Algonauts-2025-style HDF5 file (already parcellated).

    The file holds one dataset per run, named ``ses-XXX_task-<episode>`` (optionally with
    ``_run-N``), shaped ``(n_TR, n_parcels)``.  The episode id is the part after
    ``task-``.  An episode present twice (repeated viewing) keeps its first session (the
    datasets sorted by name, i.e. by session) and one INFO log line names the others.

    Parameters
    ----------
    h5_path : :obj:`str` or :class:`pathlib.Path`
        The subject's ``.h5`` file.
    subject : :obj:`str`, optional
        Subject label; default: the ``sub-XX`` entity of the file name.
    tr : :obj:`float`, default=:data:`DEFAULT_TR`
        Repetition time (the HDF5 files do not store it).
    target_names : sequence of :obj:`str`, optional
        Parcel names; default ``"parcel-0001"``, ``"parcel-0002"``, ... (column order).
    episodes : iterable of :obj:`str`, optional
        Read only these episodes.

    Returns
    -------
    BrainRuns

    Raises
    ------
    DataError
        The file is missing (or an unfetched git-annex link), truncated or not HDF5; a
        dataset name does not follow the convention; runs with different numbers of
        parcels; non-finite values.
    """
    path = Path(h5_path)
    subject = normalize_subject(subject if subject is not None else _subject_of(path))
    require_file(path, "HDF5 file")
    runs, sessions, repeats = _read_h5_runs(path, None if episodes is None else set(episodes))
    log_repeats(f"{subject} ({path.name})", repeats)
    n_targets = next(iter(runs.values())).shape[1]
    if target_names is None:
        target_names = [f"parcel-{i + 1:04d}" for i in range(n_targets)]
    elif len(target_names) != n_targets:
        raise DataError(f"{path}: {n_targets} parcels but {len(target_names)} target names given")
    return BrainRuns(
        subject=subject,
        tr=tr,
        target_names=list(target_names),
        runs=runs,
        source=f"algonauts-h5:{path.resolve()}",
        sessions=sessions,
    )


def _subject_of(path: Path) -> str:
    """The ``sub-XX`` entity of a file name; DataError if it has none."""
    found = re.search(r"(?:^|_)(sub-[a-zA-Z0-9]+)", path.name)
    if found is None:
        raise DataError(f"{path}: no 'sub-XX' in the file name; pass subject=")
    return found.group(1)


def _read_h5_runs(
    path: Path, wanted: set[str] | None
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, list[str]]]:
    """Runs (episode -> array), their sessions and the ignored repeats of an Algonauts file.

    Datasets are visited in natural name order, i.e. by session, so an episode's first session
    is the one kept; ``wanted`` (None: all) limits the episodes read.
    """
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: cannot open HDF5 file (truncated or not HDF5?): {exc}") from exc
    runs: dict[str, np.ndarray] = {}
    sessions: dict[str, str] = {}
    repeats: dict[str, list[str]] = {}
    first_names: dict[str, str] = {}
    with handle:
        for name in sorted(handle.keys(), key=natural_key):
            match = _H5_RUN.match(name)
            if match is None:
                raise DataError(f"{path}: dataset '{name}' is not named 'ses-XXX_task-<episode>'")
            episode = match["task"]
            if wanted is not None and episode not in wanted:
                continue
            if episode in runs:  # names sort by session: the first session is kept
                repeats.setdefault(episode, [f"'{first_names[episode]}'"]).append(f"'{name}'")
                continue
            first_names[episode] = name
            n_parcels = next(iter(runs.values())).shape[1] if runs else None
            runs[episode] = _h5_run_array(path, name, handle[name], n_parcels)
            sessions[episode] = match["ses"] or ""
    if not runs:
        requested = f" for the {len(wanted)} requested episodes ({', '.join(sorted(wanted)[:4])}...)" if wanted else ""
        raise DataError(f"{path}: no run dataset found{requested}")
    return runs, sessions, repeats


def _h5_run_array(path: Path, name: str, dataset: Any, n_parcels: int | None) -> np.ndarray:
    """One run's dataset as a checked float32 ``(n_TR, n_parcels)`` array (``n_parcels``: the
    other runs' count, None for the first)."""
    import h5py

    if not isinstance(dataset, h5py.Dataset):
        raise DataError(f"{path}: '{name}' is a group, expected a dataset")
    try:
        array = np.asarray(dataset[()], dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read dataset '{name}' (corrupt file?): {exc}") from exc
    if array.ndim != 2:
        raise DataError(f"{path}: dataset '{name}' has shape {array.shape}, expected (n_TR, n_parcels)")
    if n_parcels is not None and array.shape[1] != n_parcels:
        raise DataError(f"{path}: dataset '{name}' has {array.shape[1]} parcels, others have {n_parcels}")
    if not np.all(np.isfinite(array)):
        raise DataError(f"{path}: dataset '{name}' contains NaN or infinite values")
    return array
