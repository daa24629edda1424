"""Export a trained model with its model card, and publish it on a Hub.

- :func:`export` turns a run's ``best.safetensors`` (already a HEAR checkpoint: the SoundNet-8
  backbone, the brain heads as extra tensors, their description and the training provenance
  in its config; see :meth:`training.model.EncodingModel.save_pretrained`) into a folder ready
  for the Hub and for the HEAR plugin: ``model.safetensors`` (the same tensors, with the
  publication's fields added to the provenance: name, licence, whether the run finished, its
  curves), ``config.json`` (a copy of that header's config for the Hub page) and ``README.md``
  (the model card, from ``weights/model_card_template.md`` through
  :class:`hear_brainsoundnet.hub.HubCheckpoint`).
- :func:`publish` uploads such a folder to a Hub model repo with ``huggingface_hub`` and records
  the repo id, the commit (the pinned revision) and the file's sha256 in a manifest file
  (``weights/manifest.json`` format) whose path the caller gives: tests write a temporary one;
  only real published checkpoints belong in the shipped ``weights/manifest.json``.

The brain heads (``extra.head.<subject>.{weight,bias,input_mean,input_scale}``) predict a
subject's targets from conv7: see ``BRAIN_HEAD_FORMULA`` in :mod:`training.model`;
``EncodingModel.from_pretrained(folder)`` rebuilds the model from an export.

An unfinished run (killed, diverged, or still training: its ``last.safetensors`` records no
stop reason) is refused by :func:`export` unless ``allow_unfinished=True``
(``--allow-unfinished``); its best-so-far model is then exported and the provenance
(``training_status``) and the model card say so. :func:`publish` checks the name, the repo id,
the manifest file and the checkpoint before its first network call, so a bad argument never
leaves a half-made repository behind.

Command line::

    python -m training.publish export RUN_DIR OUT_DIR [--name NAME] [--allow-unfinished]
    python -m training.publish publish OUT_DIR --repo-id ORG/NAME --name NAME --manifest FILE [--endpoint URL]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from hear_brainsoundnet.checkpoints import CheckpointError, load_checkpoint
from hear_brainsoundnet.files import sha256_file
from hear_brainsoundnet.hub import (CHECKPOINT_FILENAME, NAME_PATTERN, HubCheckpoint, ManifestEntry,
                                    ManifestError, load_manifest, write_manifest)

from .model import EncodingModel
from .state import run_completion

LICENCE = "CC-BY-4.0"


class ExportError(ValueError):
    """An export or publication is refused before anything is written or uploaded."""


@dataclass
class Export:
    """An exported model folder."""

    folder: Path
    checkpoint: Path  # folder/model.safetensors
    card: Path  # folder/README.md
    sha256: str
    name: str


@dataclass
class Publication:
    """Where a checkpoint was published, as recorded in the manifest."""

    repo_id: str
    revision: str  # the commit: pin it
    filename: str
    sha256: str
    manifest: Path
    entry: ManifestEntry


def default_name(condition: str, subjects: list[str]) -> str:
    """A manifest-valid name from the model, e.g. ``conv4_sub_01`` or ``conv4_group``."""
    who = subjects[0] if len(subjects) == 1 else "group"
    name = re.sub(r"[^a-z0-9_]+", "_", f"{condition}_{who}".lower()).strip("_")
    return name if NAME_PATTERN.fullmatch(name) else f"m_{name}"


def _description(provenance: dict[str, Any]) -> str:
    """The model card's description, from a checkpoint's provenance."""
    subjects = list(provenance.get("subjects", []))
    condition = provenance.get("condition", "")
    what = {"head": "the pretrained SoundNet-8 with only a brain-encoding head fitted (baseline)",
            "null": "a randomly initialised SoundNet-8 with a brain-encoding head (null model)"}.get(
        condition, f"SoundNet-8 fine-tuned from {condition} to conv7 to predict brain activity")
    lines = [f"SoundNet-8 with a brain-encoding head: {what}, for "
             f"{'subject ' + subjects[0] if len(subjects) == 1 else 'subjects ' + ', '.join(subjects)}.",
             "",
             "**Intended use**: audio representations for downstream tasks through the HEAR API, and "
             "predictions of the training subjects' brain responses to audio (the `extra.head.*` "
             "tensors; see `brain_head` in the configuration). Not for clinical or diagnostic use."]
    if provenance.get("synthetic_data"):
        lines += ["", "**Demo model**: trained on the synthetic Friends-like dataset embedded in "
                  "hear-brainsoundnet (generated audio and simulated BOLD), not on real fMRI. It "
                  "shows the pipeline working end to end; it is not a brain-aligned network."]
    status = provenance.get("training_status") or {}
    if status and not status.get("finished"):
        lines += ["", f"**Unfinished run**: exported at the user's request before training "
                  f"ended ({status.get('epochs_completed')} of at most {status.get('max_epochs')} "
                  f"epochs); this is the best model so far (epoch "
                  f"{provenance.get('metrics', {}).get('best_epoch')})."]
    return "\n".join(lines)


def _training_status(best: Path, config: dict[str, Any], allow_unfinished: bool) -> dict[str, Any]:
    """Whether the run that wrote ``best`` finished; refuse an unfinished one unless allowed."""
    done = run_completion(best.parent)
    status = {"finished": bool(done["finished"]), "stop_reason": done["finished"],
              "epochs_completed": done["epochs"],
              "max_epochs": config.get("train", {}).get("max_epochs")}
    if not status["finished"] and not allow_unfinished:
        why = (f"it stopped after {done['epochs']} of at most {status['max_epochs']} epochs "
               "(killed, diverged or still training)" if done["known"] else
               f"there is no readable {best.parent / 'last.safetensors'} to tell whether it finished")
        raise ExportError(f"{best}: the run has not finished: {why}. Resume the training, or "
                          "export the best model so far with --allow-unfinished "
                          "(allow_unfinished=True); the model card then says so")
    return status


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an output folder that is a file, or that cannot be made, before writing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder; export writes a folder "
                          f"({CHECKPOINT_FILENAME}, config.json, README.md): choose another path")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"{out_dir}: cannot create the export folder ({error})") from None


def export(run: str | Path, out_dir: str | Path, *, name: str | None = None,
           allow_unfinished: bool = False) -> Export:
    """Export the best model of a run directory (or a ``best.safetensors`` file) to ``out_dir``.

    The checkpoint is the run's model with the publication's fields added to its provenance
    (``hear_brainsoundnet.load_model(out_dir / "model.safetensors")`` gives the same embeddings
    as the run's ``best.safetensors``), and the model card beside it. The run must have
    finished (its ``last.safetensors`` records a stop reason) unless ``allow_unfinished``.
    """
    run = Path(run)
    out_dir = Path(out_dir)
    best = run / "best.safetensors" if run.is_dir() else run
    if not best.is_file():
        raise FileNotFoundError(f"{best}: no best model (has the run finished an epoch?)")
    model = EncodingModel.from_pretrained(best)
    name = name or default_name(model.condition, model.subjects)
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"name {name!r} must match {NAME_PATTERN.pattern} (it becomes a module name)")
    status = _training_status(best, model.provenance.get("training_config", {}), allow_unfinished)
    _check_out_dir(out_dir)
    history_path = best.parent / "curves.csv"
    provenance = {**model.provenance, "name": name, "training_status": status, "licence": LICENCE,
                  "curves": history_path.name if history_path.is_file() else None}
    checkpoint_path = model.save_pretrained(out_dir / CHECKPOINT_FILENAME, provenance=provenance)
    card_path = out_dir / "README.md"
    card_path.unlink(missing_ok=True)  # regenerate: save_pretrained keeps an existing card
    HubCheckpoint(load_checkpoint(checkpoint_path)).save_pretrained(out_dir, model_card_kwargs={
        "name": name, "description": _description(provenance), "metrics": provenance.get("metrics", {})})
    return Export(out_dir, checkpoint_path, card_path, sha256_file(checkpoint_path), name)


def _publication_entry(name: str, repo_id: str, sha256: str, provenance: dict[str, Any],
                       revision: str) -> ManifestEntry:
    """The manifest entry of a publication (validated: errors name the field)."""
    description = _description(provenance)
    entry = ManifestEntry(
        name=name, description=description.split("\n")[0], source="hub", sha256=sha256,
        licence=LICENCE, card=f"{repo_id}/README.md",
        training={key: provenance.get(key) for key in ("condition", "subjects", "metrics", "seed",
                                                         "code_version", "synthetic_data",
                                                         "training_status")},
        repo_id=repo_id, filename=CHECKPOINT_FILENAME, revision=revision)
    entry.validate(f"publication {name!r}")
    return entry


def _existing_manifest(manifest: Path) -> dict[str, ManifestEntry]:
    """The entries already in ``manifest`` (none if it does not exist yet), checked writable."""
    if manifest.exists() and not manifest.is_file():
        raise ExportError(f"{manifest}: the manifest path is not a file")
    if not manifest.parent.is_dir():
        raise ExportError(f"{manifest}: its folder {manifest.parent} does not exist")
    if not os.access(manifest.parent, os.W_OK):
        raise ExportError(f"{manifest}: its folder is not writable")
    return load_manifest(manifest) if manifest.is_file() else {}


def publish(folder: str | Path, repo_id: str, *, name: str, manifest: str | Path,
            endpoint: str | None = None, token: str | None = None, private: bool = False,
            commit_message: str | None = None) -> Publication:
    """Upload an exported folder to ``repo_id`` and record it in the manifest file ``manifest``.

    Everything is checked before the first network call: the name and repo id (as the
    manifest and huggingface_hub would check them), the manifest file (readable, valid,
    writable folder) and the checkpoint (it loads in the plugin). The manifest entry pins the
    commit the upload created and the checkpoint's sha256; an entry of the same name is
    replaced, other entries are kept.
    """
    folder = Path(folder)
    manifest = Path(manifest)
    if not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
        raise ExportError(f"name {name!r} must match {NAME_PATTERN.pattern} (it becomes the module "
                          f"hear_brainsoundnet.models.<name>)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such export folder (make one with `python -m "
                                "training.publish export`)")
    checkpoint_path = folder / CHECKPOINT_FILENAME
    checkpoint = load_checkpoint(checkpoint_path)  # refuses anything the plugin could not load
    sha256 = sha256_file(checkpoint_path)
    provenance = checkpoint.provenance
    _publication_entry(name, repo_id, sha256, provenance, "0" * 40)  # repo id, fields: fail now
    entries = _existing_manifest(manifest)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                               commit_message=commit_message or f"hear-brainsoundnet {name}")
    entry = _publication_entry(name, repo_id, sha256, provenance, commit.oid)
    entries[name] = entry
    write_manifest(manifest, entries.values())
    return Publication(repo_id, commit.oid, CHECKPOINT_FILENAME, sha256, manifest, entry)


def main(argv: list[str] | None = None, prog: str = f"python -m {__package__}.publish") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("export", help="best model of a run -> HEAR checkpoint folder with model card")
    ex.add_argument("run", help="run directory (or its best.safetensors)")
    ex.add_argument("out_dir")
    ex.add_argument("--name", help="checkpoint name (default: condition_subject)")
    ex.add_argument("--allow-unfinished", action="store_true",
                    help="export the best model so far of a run that has not finished (the card says so)")
    pub = commands.add_parser("publish", help="upload an exported folder and record it in a manifest")
    pub.add_argument("folder")
    pub.add_argument("--repo-id", required=True)
    pub.add_argument("--name", required=True)
    pub.add_argument("--manifest", required=True, help="manifest file to update (weights/manifest.json format)")
    pub.add_argument("--endpoint", help="Hub URL (default: $HF_ENDPOINT or huggingface.co)")
    pub.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            result = export(args.run, args.out_dir, name=args.name,
                            allow_unfinished=args.allow_unfinished)
            print(json.dumps({"folder": str(result.folder), "checkpoint": str(result.checkpoint),
                              "sha256": result.sha256, "name": result.name}, indent=1))
        else:
            done = publish(args.folder, args.repo_id, name=args.name, manifest=args.manifest,
                           endpoint=args.endpoint, private=args.private)
            print(json.dumps({"repo_id": done.repo_id, "revision": done.revision, "sha256": done.sha256,
                              "manifest": str(done.manifest)}, indent=1))
    except (CheckpointError, ManifestError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
