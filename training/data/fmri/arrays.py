"""A plain per-run array cache of :class:`~training.data.fmri.runs.BrainRuns` (one ``.npy`` per
run and a JSON sidecar, as the study stored its data): written and read back."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_save_npy, atomic_write_text
from ..errors import DataError
from .runs import TR_TOLERANCE, BrainRuns, natural_key

__all__ = ["read_npz_cache", "write_npz_cache"]

_CACHED_RUN = re.compile(r"task-(?P<task>[a-zA-Z0-9]+)")
_EPISODE_LIKE = re.compile(r"(?<![a-zA-Z0-9])(s\d+e\d+[a-z]?)(?![a-zA-Z0-9])")


def write_npz_cache(brain: BrainRuns, out_dir: str | Path) -> Path:
    """Write a :class:`BrainRuns` as plain per-run arrays, the study's format.

    Layout: ``out_dir/<subject>/<subject>_task-<episode>_bold.npy`` (float32,
    ``(n_TR, n_targets)``, memory-mappable) and ``out_dir/<subject>/<subject>_runs.json``
    (TR, target names, source, sessions, noise ceiling).  Every file is written
    atomically.

    Returns
    -------
    :class:`pathlib.Path`
        The subject folder, to pass to :func:`read_npz_cache`.
    """
    folder = Path(out_dir) / brain.subject
    for episode, array in brain.runs.items():
        atomic_save_npy(folder / f"{brain.subject}_task-{episode}_bold.npy", array.astype(np.float32))
    meta = {
        "subject": brain.subject,
        "tr": brain.tr,
        "target_names": brain.target_names,
        "source": brain.source,
        "sessions": brain.sessions,
        "episodes": brain.episodes,
        "noise_ceiling": None if brain.noise_ceiling is None else brain.noise_ceiling.tolist(),
    }
    atomic_write_text(folder / f"{brain.subject}_runs.json", json.dumps(meta, indent=1))
    return folder


def read_npz_cache(
    folder: str | Path,
    subject: str | None = None,
    *,
    tr: float | None = None,
    target_names: Sequence[str] | None = None,
) -> BrainRuns:
    """Read per-run arrays (``.npy`` or ``.npz``) from a folder.

    Works with what :func:`write_npz_cache` writes and with any folder of per-run arrays
    whose file names contain ``task-<episode>`` or a Friends id (``s01e02a``).  A
    ``.npz`` must hold one array (or one named ``data``/``bold``).

    Parameters
    ----------
    folder : :obj:`str` or :class:`pathlib.Path`
        The folder of arrays.
    subject : :obj:`str`, optional
        Default: from ``<subject>_runs.json`` or the folder name.
    tr : :obj:`float`, optional
        Needed when there is no JSON sidecar; if both are given they must agree.
    target_names : sequence of :obj:`str`, optional
        Default: from the sidecar, else ``"target-0000"``, ...

    Returns
    -------
    BrainRuns

    Raises
    ------
    DataError
        No arrays, unknown TR, an unreadable file, inconsistent shapes, NaNs.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    meta, tr = _read_sidecar(folder, tr)
    subject = subject or meta.get("subject") or folder.name
    runs: dict[str, np.ndarray] = {}
    for path in sorted(list(folder.glob("*.npy")) + list(folder.glob("*.npz")), key=lambda p: natural_key(p.name)):
        match = _CACHED_RUN.search(path.name) or _EPISODE_LIKE.search(path.stem)
        if match is None:
            continue
        episode = match.group(1)
        array = _load_run_array(path)
        if episode in runs:
            raise DataError(f"{path}: a second file for episode {episode}")
        if not np.all(np.isfinite(array)):
            raise DataError(f"{path}: contains NaN or infinite values")
        runs[episode] = array
    if not runs:
        raise DataError(f"{folder}: no per-run .npy/.npz file with an episode id in its name")
    shapes = {array.shape[1:] for array in runs.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise DataError(f"{folder}: runs have inconsistent or non-2-D shapes {sorted(shapes)}")
    n_targets = next(iter(runs.values())).shape[1]
    names = target_names or meta.get("target_names") or [f"target-{i:04d}" for i in range(n_targets)]
    ceiling = meta.get("noise_ceiling")
    return BrainRuns(
        subject=subject,
        tr=float(tr),
        target_names=list(names),
        runs=runs,
        source=meta.get("source") or f"npz-cache:{folder.resolve()}",
        sessions=meta.get("sessions", {}),
        noise_ceiling=None if ceiling is None else np.asarray(ceiling),
    )


def _read_sidecar(folder: Path, tr: float | None) -> tuple[dict[str, Any], float]:
    """The folder's ``*_runs.json`` (``{}`` if none) and the TR: ``tr``, checked against the
    sidecar's, or the sidecar's."""
    metas = sorted(folder.glob("*_runs.json"))
    meta: dict[str, Any] = {}
    if metas:
        try:
            meta = json.loads(metas[0].read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{metas[0]}: cannot read JSON: {exc}") from exc
    if tr is None:
        tr = meta.get("tr")
        if tr is None:
            raise DataError(f"{folder}: no *_runs.json with the TR; pass tr=")
    elif "tr" in meta and abs(float(meta["tr"]) - tr) > TR_TOLERANCE:
        raise DataError(f"{metas[0]}: TR {meta['tr']} s differs from tr={tr} s")
    return meta, tr


def _load_run_array(path: Path) -> np.ndarray:
    """The array of one ``.npy``, or of a ``.npz`` holding one (or one named ``data``/``bold``)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return loaded
        with loaded:
            keys = list(loaded.keys())
            key = next((k for k in ("data", "bold") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise DataError(f"{path}: several arrays {keys} and none named 'data' or 'bold'")
            return loaded[key]
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read array (truncated or corrupt?): {exc}") from exc
