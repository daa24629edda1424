"""Import a checkpoint of the study (Freteault et al. 2025) into this project's format.

The study's code (``cNeuromod_encoding_2020``: ``convert_model.py``) saves each trained model
with ``torch.save`` as a dict::

    {"out_size": int, "output_layer": "conv7", "fmrihidden": int, "kernel_size": int,
     "power_transform": bool, "checkpoint": SoundNetEncoding_conv.state_dict()}

whose state dict holds ``soundnet.convN.0.{weight,bias}`` (Conv2d, kernels ``(k, 1)``),
``soundnet.convN.1.{weight,bias,running_mean,running_var,num_batches_tracked}`` (BatchNorm2d)
for conv1..conv7, ``soundnet.conv8.0.*`` / ``soundnet.conv8_2.0.*`` (the original object and
scene heads, kept untouched by the study) and ``encoding_fmri.{weight,bias}``, the brain head
(Conv2d ``(out_size, 1024, kernel_size, 1)``, padding ``kernel_size - 1`` before, output
cropped to the batch's TRs: a causal convolution).

:func:`import_study` reads such a file **without executing code** (``torch.load(...,
weights_only=True)``: anything but tensors and plain containers is refused, and so is the
study's raw training file, which pickles the model object), checks every tensor (name, shape,
dtype, finiteness; a missing or extra key is an error naming it) and writes one
:mod:`hear_brainsoundnet.checkpoints` file: the backbone (and conv8 heads), the brain head as
``extra.head.<subject>.*`` in :mod:`training.model`'s format, and a provenance naming the source
file, its sha256 and the study's fields. ``hear_brainsoundnet.load_model(OUT)`` then serves it
through the HEAR API, and :meth:`training.model.EncodingModel.from_pretrained` predicts brain activity.

Conventions, and what was chosen:

- **Input scaling: ``input_scale = 1.0``.** The study fed audio in [-1, 1] to SoundNet (not the
  original x256 scaling) with BatchNorm in train mode while training, and in eval mode (running
  statistics) for validation and testing. BatchNorm's running statistics follow the training
  batches (momentum 0.1), so after thousands of steps the saved ``running_mean`` /
  ``running_var`` describe activations of *unscaled* audio at the final weights, frozen layers
  included. Evaluating the imported network with running statistics on unscaled audio is
  therefore exactly what the study's own validation and test did; scaling by 256 instead would
  feed conv1's BatchNorm inputs 256 times larger than the statistics it stores. (Train-mode
  BatchNorm is invariant to the input scale, so there is no other scale to recover.)
- **BatchNorm in eval mode.** The HEAR plugin always uses running statistics (frozen features);
  the head's description records ``batchnorm_during_training = "batch-stats"`` (the study's
  train-mode BatchNorm everywhere).
- **Head alignment: kernel ``k`` -> ``k + 1``, last tap zero.** The study paired TR ``t`` of a
  batch with conv7 frame ``t`` of audio starting at the batch's first TR: that frame is centred
  0.45 s *before* TR ``t`` starts (conv7 frame ``j`` is centred on sample -10001.5 + 32768 j).
  This project represents TR ``u`` by the frame centred nearest the TR's middle (see
  :mod:`training.model`), about one hop later; the study's frame for TR ``u`` is this project's
  frame of TR ``u - 1`` to within 0.3 s. Study tap ``d`` (frame ``t - k + 1 + d``) thus becomes
  tap ``d`` over ``x[u - k + d]``, and the new last tap (the TR's own frame, which the study
  never saw) is zero. Exact equality is impossible anyway: the study computed frames on 60-80 TR
  batches with zero padding at each batch start, this project on the whole episode.
- **Head input standardisation**: the study's head reads raw conv7 features, so
  ``input_mean = 0`` and ``input_scale = 1``.
- ``power_transform = True`` (a square root of conv7 before the head) and an ``output_layer``
  other than conv7 have no equivalent in this project's head: such files are refused unless
  ``backbone_only`` (the backbone alone is imported, for HEAR).
- The file does not say which subject or condition it is: they come from the arguments, or from
  the file name as the study names its results (``sub-01_..._f_conv4_...``: subject ``sub-01``,
  condition ``conv4``; ``_NoInit``: ``null``; no ``_f_``: ``head``; a fine-tuning start other than
  conv4..conv7, or ``_NoInit`` with ``_f_``, names no condition of this project: it is left unset).

Command line::

    python -m training.import_study IN.pt OUT.safetensors [--subject sub-01] [--condition conv4]
        [--targets names.txt] [--backbone-only]
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from hear_brainsoundnet.checkpoints import load_checkpoint, save_checkpoint
from hear_brainsoundnet.files import sha256_file
from hear_brainsoundnet.soundnet import BACKBONE_LAYERS, HEAD_LAYERS, SPECS, SoundNet8, SoundNetConfig

from .config import CONDITIONS
from .model import BRAIN_HEAD_FORMULA, FEATURE_CHANNELS
from .timebase import FEATURE_LAYER

STUDY_FIELDS = ("out_size", "output_layer", "fmrihidden", "kernel_size", "power_transform", "checkpoint")
STUDY_TR = 1.49
STUDY_INPUT_SCALE = 1.0  # see the module docstring
STUDY_CODE = "https://github.com/brain-bzh/cNeuromod_encoding_2020 (convert_model.py, SoundNetEncoding_conv)"
# The conditions that fine-tune from a layer of the pretrained network (conv4..conv7).
FINE_TUNED_CONDITIONS = tuple(c for c in CONDITIONS if c.startswith("conv"))
_BN_PARAMETERS = ("weight", "bias", "running_mean", "running_var")


class StudyImportError(ValueError):
    """A study checkpoint file is unreadable, unsafe, or not in the layout the study's code writes."""


# ----------------------------------------------------------------------------------------------
# Reading the file safely
# ----------------------------------------------------------------------------------------------

def read_study_file(path: str | Path) -> dict[str, Any]:
    """The study's dict from ``path``, loaded with ``weights_only=True`` (no code runs), after
    checking its fields' names and types. Raises :class:`StudyImportError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise StudyImportError(f"{path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), lines[-1] if lines else "")
        if "GLOBAL" not in detail:  # not a refused object: bytes that are no pickle at all
            raise StudyImportError(f"{path}: not a readable torch.save file ({detail})") from None
        raise StudyImportError(
            f"{path}: refused: the file holds Python objects other than tensors and plain containers "
            f"({detail.split('. Please use')[0]}); loading it fully could run arbitrary code. The study's "
            "raw training files pickle the whole model: convert them with the study's convert_model.py "
            "(in its own environment) to the dict of tensors this importer reads") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError) as error:
        raise StudyImportError(f"{path}: not a readable torch.save file ({type(error).__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(data, dict):
        raise StudyImportError(f"{path}: holds a {type(data).__name__}, not the study's dict with "
                               f"fields {list(STUDY_FIELDS)}")
    missing = [key for key in STUDY_FIELDS if key not in data]
    extra = sorted(str(key) for key in data if key not in STUDY_FIELDS)
    if missing or extra:
        raise StudyImportError(f"{path}: not the layout of the study's convert_model.py: "
                               f"missing field(s) {missing}, unexpected field(s) {extra}")
    for key, kind in (("out_size", int), ("kernel_size", int), ("fmrihidden", int),
                      ("output_layer", str), ("power_transform", bool)):
        value = data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise StudyImportError(f"{path}: field {key!r} is {value!r}, expected {kind.__name__}")
    if data["out_size"] < 1 or data["kernel_size"] < 1:
        raise StudyImportError(f"{path}: out_size {data['out_size']} and kernel_size "
                               f"{data['kernel_size']} must be positive")
    if data["output_layer"] not in BACKBONE_LAYERS:
        raise StudyImportError(f"{path}: output_layer {data['output_layer']!r} is not a SoundNet "
                               f"layer {list(BACKBONE_LAYERS)}")
    if not isinstance(data["checkpoint"], Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data["checkpoint"].items()):
        raise StudyImportError(f"{path}: field 'checkpoint' must be a state dict (names -> tensors)")
    return data


# ----------------------------------------------------------------------------------------------
# Checking and mapping the tensors
# ----------------------------------------------------------------------------------------------

def study_tensor_shapes(out_size: int, output_layer: str, kernel_size: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``SoundNetEncoding_conv.state_dict()`` and its shape, as the study's code makes them."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in BACKBONE_LAYERS + HEAD_LAYERS:
        spec = SPECS[name]
        shapes[f"soundnet.{name}.0.weight"] = (spec.out_channels, spec.in_channels, spec.kernel, 1)
        shapes[f"soundnet.{name}.0.bias"] = (spec.out_channels,)
        if spec.batchnorm:
            for parameter in _BN_PARAMETERS:
                shapes[f"soundnet.{name}.1.{parameter}"] = (spec.out_channels,)
            shapes[f"soundnet.{name}.1.num_batches_tracked"] = ()
    channels = SPECS[output_layer].out_channels
    shapes["encoding_fmri.weight"] = (out_size, channels, kernel_size, 1)
    shapes["encoding_fmri.bias"] = (out_size,)
    return shapes


def check_study_state(state: Mapping[str, torch.Tensor], fields: Mapping[str, Any], source: str) -> None:
    """Names, shapes, dtypes and finiteness of every tensor; errors name ``source`` and the tensor."""
    expected = study_tensor_shapes(fields["out_size"], fields["output_layer"], fields["kernel_size"])
    missing = [name for name in expected if name not in state]
    extra = sorted(name for name in state if name not in expected)
    if missing or extra:
        raise StudyImportError(f"{source}: the state dict does not match the study's "
                               f"SoundNetEncoding_conv (out_size={fields['out_size']}, output_layer="
                               f"{fields['output_layer']!r}, kernel_size={fields['kernel_size']}): "
                               f"missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise StudyImportError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the "
                                   f"study's model needs {shape}")
        if name.endswith("num_batches_tracked"):
            if tensor.dtype != torch.int64:
                raise StudyImportError(f"{source}: tensor {name!r} is {tensor.dtype}, expected torch.int64")
            continue
        if tensor.dtype != torch.float32:
            raise StudyImportError(f"{source}: tensor {name!r} is {tensor.dtype}, expected torch.float32")
        if not bool(torch.isfinite(tensor).all()):
            raise StudyImportError(f"{source}: tensor {name!r} contains NaN or infinite values")
        if name.endswith("running_var") and bool((tensor < 0).any()):
            raise StudyImportError(f"{source}: tensor {name!r} has negative variances")


def backbone_from_study(state: Mapping[str, torch.Tensor]) -> SoundNet8:
    """This project's :class:`SoundNet8` (with conv8 heads, ``input_scale`` 1.0) holding the
    study's backbone: Conv2d ``(out, in, k, 1)`` -> Conv1d ``(out, in, k)``, BatchNorm as is."""
    model = SoundNet8(SoundNetConfig(input_scale=STUDY_INPUT_SCALE, heads=HEAD_LAYERS))
    ours: dict[str, torch.Tensor] = {}
    for name in BACKBONE_LAYERS + HEAD_LAYERS:
        prefix = f"heads.{name}" if name in HEAD_LAYERS else f"blocks.{name}"
        ours[f"{prefix}.conv.weight"] = state[f"soundnet.{name}.0.weight"][..., 0]
        ours[f"{prefix}.conv.bias"] = state[f"soundnet.{name}.0.bias"]
        if SPECS[name].batchnorm:
            for parameter in _BN_PARAMETERS + ("num_batches_tracked",):
                ours[f"{prefix}.bn.{parameter}"] = state[f"soundnet.{name}.1.{parameter}"]
    model.load_state_dict({k: v.clone().contiguous() for k, v in ours.items()}, strict=True)
    return model.eval()


def head_from_study(state: Mapping[str, torch.Tensor], subject: str) -> dict[str, torch.Tensor]:
    """The study's ``encoding_fmri`` as :func:`training.model.head_tensors` names it, with one
    more tap (zero) for the TR's own frame (see "Head alignment" in the module docstring)."""
    weight = state["encoding_fmri.weight"][..., 0]  # (targets, 1024, k)
    weight = torch.cat([weight, weight.new_zeros(*weight.shape[:2], 1)], dim=2)
    return {f"head.{subject}.weight": weight.contiguous(),
            f"head.{subject}.bias": state["encoding_fmri.bias"].clone(),
            f"head.{subject}.input_mean": torch.zeros(FEATURE_CHANNELS),
            f"head.{subject}.input_scale": torch.ones(FEATURE_CHANNELS)}


# ----------------------------------------------------------------------------------------------
# Naming: subject and condition
# ----------------------------------------------------------------------------------------------

def names_from_filename(name: str) -> tuple[str | None, str | None]:
    """(subject, condition) as the study's result file names give them, or None where they don't."""
    subject = re.search(r"(?<![A-Za-z0-9])(sub-[A-Za-z0-9]+)", name)
    condition = None
    if "SoundNetEncoding_conv" in name:  # the study's result_name(): ..._opt110[_NoInit][_f_conv4]_...
        # --finetuneStart takes any layer (conv1..conv8, pools); only conv4..conv7 from the
        # pretrained network are conditions of this project. A random init with fine-tuning, or
        # an earlier start, is none of them: left unset, the provenance does not guess.
        finetuned = re.search(r"_f_([A-Za-z0-9]+?)(?=_wbid|_\d{6,}|_|\.|$)", name)
        if "_NoTrain" in name:
            condition = None  # an untrained model: none of this project's conditions
        elif "_NoInit" in name:
            condition = None if finetuned else "null"
        elif finetuned:
            condition = finetuned.group(1) if finetuned.group(1) in FINE_TUNED_CONDITIONS else None
        else:
            condition = "head"
    return (subject.group(1) if subject else None), condition


def _targets(out_size: int, targets: Sequence[str] | None, source: str) -> list[str]:
    if targets is None:
        return [f"target-{i:04d}" for i in range(out_size)]
    targets = [str(t) for t in targets]
    if len(targets) != out_size:
        raise StudyImportError(f"{source}: {len(targets)} target names given, the head has {out_size} outputs")
    return targets


# ----------------------------------------------------------------------------------------------
# The import
# ----------------------------------------------------------------------------------------------

def import_study(in_path: str | Path, out_path: str | Path, *, subject: str | None = None,
                 condition: str | None = None, targets: Sequence[str] | None = None,
                 backbone_only: bool = False) -> Path:
    """Convert the study's checkpoint ``in_path`` into a checkpoint file ``out_path``; return it.

    ``subject`` / ``condition`` default to what the file name says (the study's naming);
    ``targets`` names the head's outputs (default ``target-0000``...). With ``backbone_only``
    the brain head is left out (required for ``power_transform`` or a non-conv7 head).
    """
    in_path = Path(in_path)
    source = str(in_path)
    data = read_study_file(in_path)
    fields = {key: data[key] for key in STUDY_FIELDS if key != "checkpoint"}
    state = data["checkpoint"]
    check_study_state(state, fields, source)
    named_subject, named_condition = names_from_filename(in_path.name)
    subject = subject or named_subject
    condition = condition or named_condition
    if condition is not None and condition not in CONDITIONS:
        raise StudyImportError(f"{source}: condition {condition!r} is not one of {list(CONDITIONS)}")
    provenance: dict[str, Any] = {
        "source_weights": f"study checkpoint {in_path.name} (Freteault et al. 2025, {STUDY_CODE})",
        "source_file": in_path.name, "source_sha256": sha256_file(in_path), "study_fields": fields,
        "input_scale_note": "1.0: the study fed unscaled audio; its BatchNorm running statistics "
                            "were accumulated on it (see training.import_study)",
        "training_data": "CNeuroMod Friends (the study's fMRI); not recorded in the file",
        "imported_by": "training.import_study",
    }
    if subject:
        provenance["subjects"] = [subject]
    if condition:
        provenance["condition"] = condition
    extra_tensors: dict[str, torch.Tensor] = {}
    extra_config: dict[str, Any] = {}
    if not backbone_only:
        if fields["power_transform"] or fields["output_layer"] != FEATURE_LAYER:
            raise StudyImportError(
                f"{source}: the study's head reads {fields['output_layer']}"
                f"{' through a square root (power_transform)' if fields['power_transform'] else ''}; "
                f"this project's brain head reads raw {FEATURE_LAYER}: pass backbone_only "
                "(--backbone-only) to import the backbone alone")
        if not subject:
            raise StudyImportError(f"{source}: which subject is this head for? The file name has no "
                                   "sub-XX: pass subject (--subject sub-01)")
        extra_tensors = head_from_study(state, subject)
        extra_config = {"brain_head": {
            "type": "causal temporal convolution", "feature_layer": FEATURE_LAYER,
            "kernel_trs": fields["kernel_size"] + 1, "tr": STUDY_TR, "subjects": [subject],
            "targets": {subject: _targets(fields["out_size"], targets, source)},
            "formula": BRAIN_HEAD_FORMULA, "tensors": sorted(extra_tensors),
            "batchnorm_during_training": "batch-stats",
            "alignment": f"the study's kernel of {fields['kernel_size']} TRs with one more tap, zero, "
                         "for the TR's own frame: the study paired TR t with the conv7 frame this "
                         "project assigns to TR t-1 (to within 0.3 s)"}}
    model = backbone_from_study(state)
    out_path = Path(out_path)
    # Written beside the target and loaded as the plugin loads it before it takes the name: a
    # file that fails that check is never left where a user would load it.
    staged = out_path.with_name(f".{out_path.name}.importing")
    try:
        save_checkpoint(staged, model, provenance=provenance, extra_tensors=extra_tensors,
                        extra_config=extra_config)
        load_checkpoint(staged)
        os.replace(staged, out_path)
    finally:
        staged.unlink(missing_ok=True)
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}.import_study",
                                     description="Import a checkpoint saved by the study's code "
                                                 "(convert_model.py) as a hear-brainsoundnet checkpoint.")
    parser.add_argument("input", help="the study's .pt file (a torch.save dict; loaded without running code)")
    parser.add_argument("output", help="the .safetensors checkpoint to write")
    parser.add_argument("--subject", help="subject of the brain head (default: sub-XX from the file name)")
    parser.add_argument("--condition", choices=CONDITIONS, help="training condition (default: from the file name)")
    parser.add_argument("--targets", help="text file with one target (parcel/voxel) name per line")
    parser.add_argument("--backbone-only", action="store_true", help="leave the brain head out")
    args = parser.parse_args(argv)
    try:
        targets = None
        if args.targets:
            lines = Path(args.targets).read_text().splitlines()
            targets = [line.strip() for line in lines if line.strip()]
        out = import_study(args.input, args.output, subject=args.subject, condition=args.condition,
                           targets=targets, backbone_only=args.backbone_only)
    except (StudyImportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{out}  sha256 {sha256_file(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
