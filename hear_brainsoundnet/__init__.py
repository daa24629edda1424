"""hear-brainsoundnet: brain-aligned SoundNet-8 checkpoints behind the HEAR 2021 API.

HEAR plugins (modules the HEAR tools import by name):

- ``hear_brainsoundnet``: ``load_model()`` loads the pretrained SoundNet-8;
  ``load_model(NAME_OR_PATH)`` any manifest checkpoint or checkpoint file
  (``hear-validator hear_brainsoundnet -m PATH``, heareval ``--model PATH``). A name is looked
  up in the manifest only; an argument is a path when it has a ``/`` or ends in
  ``.safetensors`` (``./NAME`` for a file or folder in the working directory).
- ``hear_brainsoundnet.models.<name>``: one module per manifest entry, whose bare
  ``load_model()`` loads that checkpoint (see :mod:`hear_brainsoundnet.models`).

``load_model`` options (heareval: ``--model-options '{"scene_pooling": "mean+max"}'``):
``timestamp_layer`` ("conv4"), ``scene_layer`` ("conv7"), ``scene_pooling`` ("mean" or
"mean+max"), ``chunk_seconds`` (60); see :mod:`hear_brainsoundnet.embeddings`.
"""
from __future__ import annotations

import inspect

import torch

from ._version import __version__
from .embeddings import BrainSoundNetEmbedding

_OPTIONS = tuple(name for name, parameter in
                 inspect.signature(BrainSoundNetEmbedding).parameters.items()
                 if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "checkpoint")


def load_model(model_file_path: str = "", **options) -> BrainSoundNetEmbedding:
    """The HEAR model of a checkpoint: a manifest name, a checkpoint path (with a ``/`` or
    ending in ``.safetensors``), or "" (pretrained)."""
    from .checkpoints import load_checkpoint
    from .hub import resolve_checkpoint

    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown load_model option(s) {unknown}; known: {list(_OPTIONS)}")
    path = resolve_checkpoint(model_file_path)
    return BrainSoundNetEmbedding(load_checkpoint(path).model, checkpoint=str(path), **options)


def _check_model(model: object) -> BrainSoundNetEmbedding:
    if not isinstance(model, BrainSoundNetEmbedding):
        raise TypeError(f"model must come from hear_brainsoundnet.load_model, got {type(model).__name__}")
    return model


def get_scene_embeddings(audio: torch.Tensor, model: BrainSoundNetEmbedding) -> torch.Tensor:
    """(n_sounds, scene_embedding_size) float32 for float32 audio (n_sounds, n_samples) at 22,050 Hz."""
    return _check_model(model).scene_embeddings(audio)


def get_timestamp_embeddings(audio: torch.Tensor, model: BrainSoundNetEmbedding
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_sounds, n_frames, timestamp_embedding_size) float32, and frame centres (n_sounds,
    n_frames) in ms as float64 (exact to 1e-8 ms at any clip length)."""
    return _check_model(model).timestamp_embeddings(audio)
