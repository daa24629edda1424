"""Small file helpers shared by :mod:`training.data`: atomic writes of arrays and text, cache keys.

Every write goes through :func:`hear_brainsoundnet.files.atomic_write` (the project's one
atomic-write routine: a temporary file in the destination directory, fsync, then
:func:`os.replace`), so a reader (another process, a DataLoader worker, a run killed half-way)
sees either no file or a complete one, never a partial one.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from hear_brainsoundnet.files import atomic_write
from .errors import DataError

__all__ = [
    "atomic_save_npy",
    "drop_resident_pages",
    "atomic_save_npz",
    "atomic_write_text",
    "file_identity",
    "hash_key",
    "is_unfetched",
    "require_file",
]


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    """Save one array as ``.npy`` (memory-mappable) atomically."""
    def write(tmp: str) -> None:
        # A file object, not a name: np.save would append ".npy" to the temporary name.
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)

    return atomic_write(path, write)


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Save arrays into one uncompressed ``.npz`` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    return atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file (UTF-8) atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def file_identity(path: str | Path) -> dict[str, Any]:
    """Identity of a file for cache keys: resolved path, size and modification time (ns).

    Reading the content would be safer but costs as much as the work the cache saves;
    size + mtime is what ``make`` and most build caches use.
    """
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def hash_key(obj: Any) -> str:
    """SHA-256 hex digest of a JSON-serialisable description (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_unfetched(path: str | Path) -> bool:
    """True for a broken symbolic link: a git-annex (datalad) file whose content is not fetched.

    datalad clones hold every file as a link into ``.git/annex/objects/``; until
    ``datalad get`` fetches the content the link points at nothing.
    """
    path = Path(path)
    return path.is_symlink() and not path.exists()


def require_file(path: str | Path, what: str, why: str = "") -> Path:
    """``path`` if it is a readable file, else a :class:`DataError` saying what is wrong.

    ``what`` names the file's role ("HDF5 file", "brain mask"), ``why`` is appended to the
    message (" (needed for ...)").  A broken git-annex link gets the command that fixes it
    (``datalad get <path>``) rather than a bare "not found": on a datalad clone the file is
    listed but has no content until fetched.
    """
    path = Path(path)
    if is_unfetched(path):
        target = os.readlink(path)
        if "annex/objects" in target.replace(os.sep, "/"):
            raise DataError(f"{path}: {what}{why} not fetched (a git-annex link with no content): datalad get {path}")
        raise DataError(f"{path}: {what}{why} is a broken symbolic link (to {target})")
    if not path.is_file():
        raise DataError(f"{path}: {what} not found{why}")
    return path


def drop_resident_pages(array: np.ndarray) -> None:
    """Let the kernel drop the pages of a memory-mapped array that were read (a no-op for an
    array in memory). A decoded soundtrack is a memory map; pages read stay resident and count
    in the process's RSS until unmapped, so a pass over 36 h of audio would hold all of it
    (11 GB) although each run is needed only once. The data stay on disk: a later read pages
    them in again."""
    handle = getattr(array, "_mmap", None)
    if isinstance(handle, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        handle.madvise(mmap.MADV_DONTNEED)
