"""One HEAR plugin module per checkpoint: ``hear_brainsoundnet.models.<name>``.

For every entry of the manifest (see :mod:`hear_brainsoundnet.hub`), and for ``pretrained``,
``import hear_brainsoundnet.models.<name>`` gives a module with the three HEAR functions whose
bare ``load_model()`` loads that checkpoint. So each checkpoint runs by name::

    hear-validator hear_brainsoundnet.models.pretrained
    python -m heareval.embeddings.runner hear_brainsoundnet.models.<name> --tasks-dir tasks

and heareval writes its embeddings under ``<embeddings-dir>/hear_brainsoundnet.models.<name>/``,
one folder per checkpoint. The modules are made on import from the manifest in use
(``$HEAR_BRAINSOUNDNET_MANIFEST`` or ``weights/manifest.json``), so a user's own manifest works
without generating files. ``available()`` (or ``python -m hear_brainsoundnet.hub list``) lists
them.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

from .. import get_scene_embeddings, get_timestamp_embeddings
from .. import load_model as _load_model
from ..hub import NAME_PATTERN, available_checkpoints, manifest_path


def available() -> list[str]:
    """The plugin module names, ``hear_brainsoundnet.models.<name>``, of the manifest in use."""
    return [f"{__name__}.{name}" for name in available_checkpoints()]


def _plugin_loader(name: str):
    def load_model(model_file_path: str = "", **options):
        """HEAR ``load_model``: this module's checkpoint, unless a file path is given."""
        return _load_model(model_file_path or name, **options)

    load_model.__qualname__ = load_model.__name__
    return load_model


class _CheckpointModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``hear_brainsoundnet.models.<name>`` for each checkpoint name and builds the module."""

    def find_spec(self, fullname: str, path=None, target=None):
        prefix = __name__ + "."
        name = fullname[len(prefix):] if fullname.startswith(prefix) else ""
        if not NAME_PATTERN.fullmatch(name):
            return None
        if name not in available_checkpoints():
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: {name!r} is not a checkpoint of the manifest "
                f"{manifest_path()}; available: {', '.join(available())}", name=fullname)
        return importlib.machinery.ModuleSpec(fullname, self, origin=f"checkpoint {name!r}")

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        name = module.__name__.rsplit(".", 1)[1]
        module.__doc__ = f"HEAR plugin for the checkpoint {name!r} of hear-brainsoundnet."
        module.CHECKPOINT = name
        module.load_model = _plugin_loader(name)
        module.get_scene_embeddings = get_scene_embeddings
        module.get_timestamp_embeddings = get_timestamp_embeddings


if not any(isinstance(finder, _CheckpointModules) for finder in sys.meta_path):
    sys.meta_path.append(_CheckpointModules())
