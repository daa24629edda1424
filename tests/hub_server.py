"""A local Hugging Face Hub on 127.0.0.1 for tests: the real ``huggingface_hub`` client talks to it.

It speaks the part of the Hub protocol that ``huggingface_hub`` 2.4 uses for model repos:

- download: ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}`` with ``ETag`` (the git
  blob sha1, as the Hub sends for regular files), ``X-Repo-Commit``, ``Content-Length`` and
  byte ranges; 404s carry ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` /
  ``EntryNotFound`` so the client raises its specific errors; ``GET /api/models/{repo_id}``
  (``/revision/{rev}``) and ``/api/models/{repo_id}/tree/{rev}`` for ``model_info`` and
  ``snapshot_download``;
- upload: ``POST /api/repos/create``, ``/api/validate-yaml``,
  ``/api/models/{repo_id}/preupload/{rev}`` (every file answered ``uploadMode: regular``, so
  the client inlines it base64 in the commit: no LFS or Xet transfer) and
  ``/api/models/{repo_id}/commit/{rev}`` (ndjson: header, file, deletedFile, deletedFolder;
  ``parentCommit`` checked); each commit gets a new 40-hex id.

State lives in memory. The server runs in a daemon thread on an ephemeral port, refuses request
bodies over ``max_body_bytes`` and stops itself after ``max_lifetime_s``.

Faults: with ``cut_downloads_at = N``, every file download stops at byte ``N`` of the file: the
answer announces the full length, sends the bytes before ``N`` (none for a range starting at or
after it) and closes the connection, like a connection cut half-way that never recovers.

Use::

    with HubServer() as hub:
        commit = hub.add_file("org/model", "model.safetensors", data)
        hub.url            # pass as endpoint= or HF_ENDPOINT
        hub.commits("org/model"), hub.requests
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_INFO = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_PREUPLOAD = re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")
_COMMIT = re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file, which the Hub uses as ETag and oid of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]  # the full snapshot at this commit


@dataclass
class Repo:
    repo_id: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # commit ids, oldest first


class HubError(Exception):
    """An error answer: HTTP status, message, and the X-Error-Code the client dispatches on."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}
        self.extra = extra or {}


class HubServer:
    """An in-memory Hub served on ``127.0.0.1:<ephemeral port>``; a context manager."""

    def __init__(self, *, max_lifetime_s: float = 900.0, max_body_bytes: int = 512 << 20):
        self.max_lifetime_s = max_lifetime_s
        self.max_body_bytes = max_body_bytes
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.cut_downloads_at: int | None = None  # fault injection: see the module docstring
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the hub server is not running (use it as a context manager)")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-server",
                                        daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if self._timer is not None:
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def use(self, monkeypatch: Any, cache_dir: str | Path) -> None:
        """Point ``huggingface_hub`` (this process, and subprocesses via the environment) at
        this server and at ``cache_dir``. The client reads these settings when it is imported,
        hence the patched constants."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            self.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", self.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    # -- fixture API ------------------------------------------------------------------------

    def create_repo(self, repo_id: str) -> str:
        """Create ``repo_id`` with an initial commit (as the Hub does); return that commit."""
        with self._lock:
            if repo_id in self.repos:
                raise ValueError(f"repo {repo_id} already exists")
            self.repos[repo_id] = Repo(repo_id)
            return self._commit(repo_id, "main", "initial commit",
                                {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                                deletions=())

    def add_file(self, repo_id: str, filename: str, data: bytes, *, branch: str = "main",
                 message: str | None = None) -> str:
        """Commit ``data`` as ``filename`` (creating the repo if needed); return the commit id."""
        with self._lock:
            if repo_id not in self.repos:
                self.create_repo(repo_id)
            return self._commit(repo_id, branch, message or f"add {filename}", {filename: data},
                                deletions=())

    def commits(self, repo_id: str) -> list[str]:
        """Commit ids of ``repo_id``, oldest first."""
        with self._lock:
            return list(self._repo(repo_id).order)

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self._resolve(repo_id, branch).oid

    def file(self, repo_id: str, filename: str, revision: str = "main") -> bytes:
        with self._lock:
            return self._resolve(repo_id, revision).files[filename]

    def count(self, method: str, fragment: str = "") -> int:
        """How many ``method`` requests whose path contains ``fragment`` arrived."""
        with self._lock:
            return sum(1 for m, path in self.requests if m == method and fragment in path)

    # -- state (caller holds the lock) ------------------------------------------------------

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def _resolve(self, repo_id: str, revision: str) -> Commit:
        repo = self._repo(repo_id)
        oid = repo.branches.get(revision, revision)
        if oid not in repo.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    def _commit(self, repo_id: str, branch: str, message: str, additions: dict[str, bytes],
                deletions: tuple[str, ...], parent_commit: str | None = None) -> str:
        repo = self._repo(repo_id)
        parent = repo.branches.get(branch)
        if parent is None and repo.order:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if parent_commit is not None and parent_commit != parent:
            raise HubError(412, f"parent commit {parent_commit} is not the head {parent} of {branch}")
        files = dict(repo.commits[parent].files) if parent else {}
        for path in deletions:
            folder = path.rstrip("/") + "/"
            doomed = [name for name in files if name == path or name.startswith(folder)]
            if not doomed:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for name in doomed:
                del files[name]
        files.update(additions)
        oid = hashlib.sha1(f"{repo_id}\0{parent}\0{message}\0{next(self._counter)}".encode()
                           + b"".join(hashlib.sha256(files[k]).digest() for k in sorted(files))
                           ).hexdigest()
        repo.commits[oid] = Commit(oid, parent, message, files)
        repo.order.append(oid)
        repo.branches[branch] = oid
        return oid

    # -- request handling (returns status, headers, body) -----------------------------------

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes
               ) -> tuple[int, dict[str, str], bytes]:
        split = urlsplit(raw_path)
        path, query = split.path, parse_qs(split.query)
        with self._lock:
            self.requests.append((method, path))
            if method in ("GET", "HEAD") and (match := _RESOLVE.match(path)):
                return self._resolve_file(match, headers, cut=method == "GET")
            if method == "GET" and (match := _INFO.match(path)):
                return _json(self._model_info(unquote(match["repo"]), unquote(match["rev"] or "main")))
            if method == "GET" and (match := _TREE.match(path)):
                return _json(self._tree(match, query))
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(_read_json(body))
            if method == "POST" and path == "/api/validate-yaml":
                return _json({"errors": [], "warnings": []})
            if method == "POST" and (match := _PREUPLOAD.match(path)):
                return _json(self._preupload(match, _read_json(body)))
            if method == "POST" and (match := _COMMIT.match(path)):
                if query.get("create_pr"):
                    raise HubError(400, "pull requests are not supported by the test hub")
                return _json(self._apply_commit(match, body))
        raise HubError(404, f"{method} {path} is not part of the test hub")

    def _resolve_file(self, match: re.Match, headers: Any, cut: bool = False
                      ) -> tuple[int, dict[str, str], bytes]:
        repo_id, filename = unquote(match["repo"]), unquote(match["path"])
        commit = self._resolve(repo_id, unquote(match["rev"]))
        if filename not in commit.files:
            raise HubError(404, f"Entry not found: {filename}", "EntryNotFound",
                           {"X-Repo-Commit": commit.oid})
        data = commit.files[filename]
        out = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": commit.oid,
               "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        status, start = 200, 0
        ranged = re.fullmatch(r"bytes=(\d+)-", headers.get("Range", "") or "")
        if ranged and int(ranged[1]) < len(data):
            status, start = 206, int(ranged[1])
            out["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if cut and self.cut_downloads_at is not None:
            # Announce the whole body, send part of it; _serve then drops the connection.
            out["Content-Length"] = str(len(data) - start)
            return status, out, data[start:max(start, self.cut_downloads_at)]
        return status, out, data[start:]

    def _model_info(self, repo_id: str, revision: str) -> dict[str, Any]:
        commit = self._resolve(repo_id, revision)
        return {"id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": False,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                "siblings": [{"rfilename": name} for name in sorted(commit.files)]}

    def _tree(self, match: re.Match, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        commit = self._resolve(unquote(match["repo"]), unquote(match["rev"]))
        prefix = unquote(match["path"] or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for name in sorted(commit.files):
            if prefix and not name.startswith(prefix + "/"):
                continue
            rest = name[len(prefix) + 1:] if prefix else name
            if not recursive and "/" in rest:
                folder = (prefix + "/" if prefix else "") + rest.split("/", 1)[0]
                if folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
                continue
            data = commit.files[name]
            entries.append({"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name})
        return entries

    def _create_repo(self, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, f"the test hub only hosts model repos, not {payload.get('type')}")
        repo_id = f"{payload.get('organization') or 'test-user'}/{payload['name']}"
        if repo_id in self.repos:
            # The Hub's 409 still carries the url: create_repo(exist_ok=True) reads it.
            raise HubError(409, "You already created this model repo", None,
                           {"X-Error-Message": "You already created this model repo"},
                           {"url": f"{self.url}/{repo_id}"})
        self.create_repo(repo_id)
        return _json({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _preupload(self, match: re.Match, payload: dict[str, Any]) -> dict[str, Any]:
        commit = self._resolve(unquote(match["repo"]), unquote(match["rev"]))
        files = []
        for item in payload.get("files", []):
            existing = commit.files.get(item["path"])
            files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_sha1(existing) if existing is not None else None})
        return {"files": files, "commitOid": commit.oid}

    def _apply_commit(self, match: re.Match, body: bytes) -> dict[str, Any]:
        repo_id, branch = unquote(match["repo"]), unquote(match["rev"])
        if _HEX40.match(branch):
            raise HubError(400, "commits must target a branch, not a commit id")
        self._resolve(repo_id, branch)
        header: dict[str, Any] = {}
        additions: dict[str, bytes] = {}
        deletions: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                additions[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append(value["path"] + ("/" if key == "deletedFolder" else ""))
            else:
                raise HubError(400, f"unsupported commit operation {key!r} (the test hub asked "
                                    "for regular uploads only)")
        if not header.get("summary"):
            raise HubError(400, "commit header with a summary is required")
        oid = self._commit(repo_id, branch, header["summary"], additions, tuple(deletions),
                           parent_commit=header.get("parentCommit"))
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                "success": True, "pullRequestUrl": None}


def _json(payload: Any) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _read_json(body: bytes) -> Any:
    try:
        return json.loads(body or b"{}")
    except json.JSONDecodeError as error:
        raise HubError(400, f"invalid JSON body ({error})") from None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer has a length
    hub: HubServer

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if sum(map(len, chunks)) > self.hub.max_body_bytes:
                    raise HubError(413, "request body too large for the test hub")
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body_bytes:
            raise HubError(413, "request body too large for the test hub")
        return self.rfile.read(length) if length else b""

    def _serve(self, method: str) -> None:
        try:
            body = self._body() if method == "POST" else b""
            status, headers, payload = self.hub.handle(method, self.path, self.headers, body)
        except HubError as error:
            status, payload = error.status, json.dumps({"error": str(error), **error.extra}).encode()
            headers = {"Content-Type": "application/json", **error.headers}
            if error.code:
                headers.update({"X-Error-Code": error.code, "X-Error-Message": str(error)})
            if status == 413:
                self.close_connection = True
        self.send_response(status)
        length = int(headers.pop("Content-Length", len(payload)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)
        if length != len(payload) and method != "HEAD":
            self.close_connection = True  # a body cut short (cut_downloads_at)

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_message(self, format: str, *args: Any) -> None:  # requests are kept in hub.requests
        pass
