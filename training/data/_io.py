"""Small file helpers shared by :mod:`training.data`: atomic writes and cache keys.

Cache files are always written to a temporary file in the destination directory and
then moved into place with :func:`os.replace`, which is atomic on POSIX and Windows: a
reader (another process, a DataLoader worker, a run killed half-way) sees either no file
or a complete one, never a partial one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_path",
    "atomic_save_npy",
    "atomic_save_npz",
    "atomic_write_text",
    "file_identity",
    "hash_key",
]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` on success.

    The temporary file lives in the same directory so that :func:`os.replace` never
    crosses a file system.  On an exception the temporary file is removed and ``path``
    is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    """Save one array as ``.npy`` (memory-mappable) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        # A file object, not a name: np.save would append ".npy" to the temporary name.
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
    return path


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Save arrays into one uncompressed ``.npz`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file (UTF-8) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


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
