"""Matplotlib for the pipeline's figures: the Agg backend (no display needed) and atomic PNG saving."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hear_brainsoundnet.files import atomic_write


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(figure: Any, path: str | os.PathLike) -> Path:
    """Lay out ``figure``, write it atomically to ``path`` as a 110-dpi PNG and close it."""
    plt = pyplot()
    try:
        figure.tight_layout()
        return atomic_write(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(figure)
