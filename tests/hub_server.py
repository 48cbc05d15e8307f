"""A tiny in-memory Hugging Face Hub look-alike, so tests can use the real ``huggingface_hub`` client offline.

The real Hub is unreachable from CI, but what we want to test is the genuine ``push_to_hub`` /
``from_pretrained`` code path, not a mock of it. This module serves just enough of the Hub HTTP API, as
called by ``huggingface_hub`` 2.4, for that path to run end to end:

* repos: ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``GET /api/{type}s/{id}[/revision/{rev}]``
* uploads: ``POST .../preupload/{rev}`` (always answers ``"regular"``: no LFS, no Xet, content travels inline
  as base64 in the commit) and ``POST .../commit/{rev}`` (NDJSON: header, file, deletedFile, deletedFolder)
* listing: ``GET .../tree/{rev}[/{path}]`` (``recursive``), ``POST .../paths-info/{rev}``,
  ``GET .../commits/{rev}``, ``GET .../refs``, ``POST/DELETE .../branch/{name}``
* downloads: ``HEAD``/``GET /[{type}s/]{id}/resolve/{rev}/{path}`` with ``ETag``, ``X-Repo-Commit`` and
  ``Content-Length``; misses answer 404 with ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``) because that header, not the status, is what the client maps to its exception types
* misc: ``POST /api/validate-yaml`` (model cards), ``GET /api/whoami-v2``, ``GET /api/agent-harnesses``

Every commit gets a fresh 40-hex id and keeps a full snapshot of the tree, so older revisions stay
downloadable. Stdlib only, so it can be used by any test without extra dependencies.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

USER = "me"
DEFAULT_BRANCH = "main"
REPO_TYPES = ("model", "dataset", "space", "kernel")
# What the real Hub puts in a new repo's initial commit (abridged): keeps `main` resolvable from the start.
INITIAL_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)


class HubError(Exception):
    """An error answered the way the Hub does: status, ``X-Error-Code`` and ``X-Error-Message``."""

    def __init__(self, status: int, message: str, code: str | None = None, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers


def git_blob_oid(data: bytes) -> str:
    """Git's blob id, which the Hub uses as ETag/oid of regular files (the client compares it too)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    """Timestamp in the exact format ``huggingface_hub.utils.parse_datetime`` accepts."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Commit:
    """One commit with a full snapshot of the repo's files (small test repos: copying is cheap)."""

    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: Mapping[str, bytes]


@dataclass
class Repo:
    """A repo's history: commits by id (in creation order) and branch heads."""

    repo_id: str
    repo_type: str
    private: bool
    created_at: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """Branch name, full commit id or a unique (>= 7 chars) id prefix, like the Hub."""
        oid = self.branches.get(revision)
        if oid is None and revision in self.commits:
            oid = revision
        if oid is None and len(revision) >= 7:
            matches = [c for c in self.commits if c.startswith(revision.lower())]
            oid = matches[0] if len(matches) == 1 else None
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def add_commit(self, branch: str, title: str, message: str, files: Mapping[str, bytes]) -> Commit:
        """Append a commit on ``branch`` with a brand-new id (random salt: identical trees still differ)."""
        parent = self.branches.get(branch)
        salt = os.urandom(16).hex()
        oid = hashlib.sha1(f"{parent}\n{title}\n{sorted(files)}\n{salt}".encode()).hexdigest()
        commit = Commit(oid, parent, title, message, _now(), dict(files))
        self.commits[oid] = commit
        self.branches[branch] = oid
        return commit


def _split_repo_id(repo_id: str) -> tuple[str, str]:
    namespace, _, name = repo_id.rpartition("/")
    return namespace, name


class HubState:
    """All repos of the local hub, behind one lock (the HTTP server is threaded)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.validated_cards: list[str] = []

    def get(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def create(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, f"You already created this {repo_type} repo")
        repo = Repo(repo_id, repo_type, private)
        repo.add_commit(DEFAULT_BRANCH, "initial commit", "", {".gitattributes": INITIAL_GITATTRIBUTES})
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def delete(self, repo_type: str, repo_id: str) -> None:
        self.get(repo_type, repo_id)
        del self.repos[(repo_type, repo_id)]


@dataclass
class Reply:
    """What a route answers; turned into an HTTP response by the handler."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(payload: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})


@dataclass
class Request:
    """A parsed request: method, unquoted path segments, query, body and headers."""

    method: str
    segments: list[str]
    query: dict[str, list[str]]
    body: bytes
    headers: Mapping[str, str]
    base_url: str

    def require_token(self) -> None:
        """Writes need a bearer token (any value), like on the Hub: catches a fixture that lost HF_TOKEN."""
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")

    def json(self) -> Any:
        return json.loads(self.body or b"{}")

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")


def _repo_url(base_url: str, repo_type: str, repo_id: str) -> str:
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return f"{base_url}/{prefix}{repo_id}"


# ------------------------------------------------------------------------------------------ tree helpers


def _folders(files: Mapping[str, bytes]) -> set[str]:
    """Every folder implied by the file paths (git stores no empty folders)."""
    return {path.rsplit("/", i)[0] for path in files for i in range(1, path.count("/") + 1)}


def _folder_oid(files: Mapping[str, bytes], folder: str) -> str:
    """A stable tree id for a folder: changes whenever a file below it changes."""
    inner = sorted(f"{p}:{git_blob_oid(d)}" for p, d in files.items() if p.startswith(folder + "/"))
    return hashlib.sha1("\n".join(inner).encode()).hexdigest()


def _entry(files: Mapping[str, bytes], path: str) -> dict[str, Any]:
    """A tree / paths-info entry, the JSON that ``RepoFile``/``RepoFolder`` are built from."""
    if path in files:
        return {"type": "file", "path": path, "oid": git_blob_oid(files[path]), "size": len(files[path])}
    return {"type": "directory", "path": path, "oid": _folder_oid(files, path)}


def _tree(files: Mapping[str, bytes], folder: str, recursive: bool) -> list[dict[str, Any]]:
    """Entries under ``folder`` ("" = root), direct children only unless ``recursive``."""
    prefix = f"{folder}/" if folder else ""
    if folder and folder not in _folders(files):
        raise HubError(404, f"Entry not found: {folder}", "EntryNotFound")
    paths = [p for p in sorted(set(files) | _folders(files)) if p.startswith(prefix)]
    if not recursive:
        paths = [p for p in paths if "/" not in p[len(prefix) :]]
    return [_entry(files, p) for p in paths]


# ------------------------------------------------------------------------------------------ repo routes


def _info(req: Request, repo: Repo, commit: Commit) -> Reply:
    """Repo info as ``ModelInfo``/``DatasetInfo`` parse it; ``blobs=true`` adds sizes and blob ids."""
    blobs = req.flag("blobs")
    siblings = [
        {"rfilename": p, **({"size": len(d), "blobId": git_blob_oid(d)} if blobs else {})}
        for p, d in sorted(commit.files.items())
    ]
    namespace, _ = _split_repo_id(repo.repo_id)
    return json_reply(
        {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": namespace or None,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
    )


def _preupload(req: Request, repo: Repo, revision: str) -> Reply:
    """Always "regular": keeps both LFS and Xet out of the picture. ``oid`` lets the client skip no-ops."""
    req.require_token()
    head = repo.resolve(revision)
    files = head.files
    answers = [
        {
            "path": f["path"],
            "uploadMode": "regular",
            "shouldIgnore": False,
            "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None,
        }
        for f in req.json().get("files", [])
    ]
    return json_reply({"files": answers, "commitOid": head.oid})


def _apply_operation(files: dict[str, bytes], key: str, value: Mapping[str, Any]) -> None:
    """Apply one NDJSON commit line to the working tree."""
    path = value.get("path", "")
    if key == "file":
        content = value["content"]
        files[path] = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
    elif key == "deletedFile":
        if files.pop(path, None) is None:
            raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
    elif key == "deletedFolder":
        doomed = [p for p in files if p.startswith(path.rstrip("/") + "/")]
        if not doomed:
            raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
        for p in doomed:
            del files[p]
    elif key == "lfsFile":
        raise HubError(400, "LocalHub has no LFS storage: preupload must answer 'regular' for every file")
    else:
        raise HubError(400, f"Unsupported commit operation: {key}")


def _commit(req: Request, repo: Repo, revision: str) -> Reply:
    """NDJSON commit on a branch; ``parentCommit`` is checked like the Hub does (412 when stale)."""
    req.require_token()
    if req.flag("create_pr"):
        raise HubError(400, "LocalHub does not support pull requests (create_pr)")
    if revision not in repo.branches:
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
    lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
    header = next((line["value"] for line in lines if line["key"] == "header"), {})
    head = repo.resolve(revision)
    parent = header.get("parentCommit")
    if parent and not head.oid.startswith(parent.lower()):
        raise HubError(412, "A commit has happened since. Please refresh and try again.")
    files = dict(head.files)
    for line in lines:
        if line["key"] != "header":
            _apply_operation(files, line["key"], line["value"])
    commit = repo.add_commit(revision, header.get("summary", ""), header.get("description", ""), files)
    url = _repo_url(req.base_url, repo.repo_type, repo.repo_id)
    return json_reply({"success": True, "commitOid": commit.oid, "commitUrl": f"{url}/commit/{commit.oid}"})


def _paths_info(req: Request, commit: Commit) -> Reply:
    """Form-encoded ``paths`` (repeated); unknown paths are silently left out, like on the Hub."""
    form = parse_qs(req.body.decode())
    known = set(commit.files) | _folders(commit.files)
    return json_reply([_entry(commit.files, p) for p in form.get("paths", []) if p in known])


def _history(req: Request, repo: Repo, revision: str) -> Reply:
    """``list_repo_commits``: newest first, following parents from ``revision``."""
    out: list[dict[str, Any]] = []
    commit: Commit | None = repo.resolve(revision)
    while commit is not None:
        out.append(
            {
                "id": commit.oid,
                "title": commit.title,
                "message": commit.message,
                "date": commit.date,
                "authors": [{"user": USER, "avatar": None}],
            }
        )
        commit = repo.commits.get(commit.parent) if commit.parent else None
    return json_reply(out)


def _refs(repo: Repo) -> Reply:
    heads = repo.branches.items()
    branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in heads]
    return json_reply({"branches": branches, "converts": [], "tags": [], "pullRequests": []})


def _branch(req: Request, repo: Repo, branch: str) -> Reply:
    req.require_token()
    if req.method == "DELETE":
        if repo.branches.pop(branch, None) is None:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        return json_reply({})
    if branch in repo.branches:
        raise HubError(409, f"Reference already exists: refs/heads/{branch}")
    start = req.json().get("startingPoint") or DEFAULT_BRANCH
    repo.branches[branch] = repo.resolve(start).oid
    return json_reply({})


def _repo_api(req: Request, state: HubState, repo_type: str, repo_id: str, rest: list[str]) -> Reply:
    """Everything under ``/api/{type}s/{namespace}/{name}/...``."""
    repo = state.get(repo_type, repo_id)
    action, args = (rest[0], rest[1:]) if rest else ("", [])
    get_or_head = req.method in ("GET", "HEAD")
    if action == "" and get_or_head:
        return _info(req, repo, repo.resolve(DEFAULT_BRANCH))
    if action == "revision" and get_or_head and len(args) == 1:
        return _info(req, repo, repo.resolve(args[0]))
    if action == "tree" and get_or_head and args:
        files = repo.resolve(args[0]).files
        return json_reply(_tree(files, "/".join(args[1:]).strip("/"), req.flag("recursive")))
    if action == "paths-info" and req.method == "POST" and len(args) == 1:
        return _paths_info(req, repo.resolve(args[0]))
    if action == "preupload" and req.method == "POST" and len(args) == 1:
        return _preupload(req, repo, args[0])
    if action == "commit" and req.method == "POST" and len(args) == 1:
        return _commit(req, repo, args[0])
    if action == "commits" and get_or_head and len(args) == 1:
        return _history(req, repo, args[0])
    if action == "refs" and get_or_head:
        return _refs(repo)
    if action == "branch" and req.method in ("POST", "DELETE") and len(args) == 1:
        return _branch(req, repo, args[0])
    raise HubError(404, f"LocalHub does not implement {req.method} /api/.../{'/'.join(rest)}")


# ------------------------------------------------------------------------------------------ other routes


def _repo_id_from_body(body: Mapping[str, Any]) -> str:
    return f"{body.get('organization') or USER}/{body['name']}"


def _create_repo(req: Request, state: HubState) -> Reply:
    """409 still carries ``url``: ``create_repo(exist_ok=True)`` reads it from the error response."""
    req.require_token()
    body = req.json()
    repo_type = body.get("type") or "model"
    repo_id = _repo_id_from_body(body)
    url = _repo_url(req.base_url, repo_type, repo_id)
    private = bool(body.get("private")) or body.get("visibility") == "private"
    try:
        state.create(repo_type, repo_id, private)
    except HubError as err:
        return json_reply({"error": err.message, "url": url}, status=err.status)
    return json_reply({"url": url, "name": repo_id, "id": repo_id})


def _delete_repo(req: Request, state: HubState) -> Reply:
    req.require_token()
    body = req.json()
    state.delete(body.get("type") or "model", _repo_id_from_body(body))
    return json_reply({})


def _validate_yaml(req: Request, state: HubState) -> Reply:
    """Accept any card whose front matter is closed; a real YAML check would need PyYAML (not stdlib)."""
    content = req.json().get("content", "")
    state.validated_cards.append(content)
    if content.startswith("---") and "\n---" not in content[3:]:
        error = {"message": "Front matter is not closed by a '---' line"}
        return json_reply({"errors": [error], "warnings": []}, status=400)
    return json_reply({"errors": [], "warnings": []})


def _whoami() -> Reply:
    token = {"displayName": "local-hub", "role": "write"}
    return json_reply(
        {
            "type": "user",
            "name": USER,
            "fullname": USER,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": token},
        }
    )


def _resolve(req: Request, state: HubState, repo_type: str, segments: list[str]) -> Reply:
    """``/{id}/resolve/{rev}/{path}``: headers the client needs for caching; 404s tagged with X-Error-Code."""
    repo = state.get(repo_type, "/".join(segments[:2]))
    commit = repo.resolve(segments[3])
    path = "/".join(segments[4:])
    if path not in commit.files:
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound", **{"X-Repo-Commit": commit.oid})
    data = commit.files[path]
    headers = {
        "Content-Type": "application/octet-stream",
        "ETag": f'"{git_blob_oid(data)}"',
        "X-Repo-Commit": commit.oid,
        "Accept-Ranges": "bytes",
    }
    return _ranged(req.headers.get("Range"), data, headers)


def _ranged(range_header: str | None, data: bytes, headers: dict[str, str]) -> Reply:
    """Honour a single ``bytes=a-b`` range (used by resumed downloads and HfFileSystem)."""
    if not range_header or not range_header.startswith("bytes=") or "," in range_header:
        return Reply(200, data, headers)
    start_s, _, end_s = range_header[len("bytes=") :].partition("-")
    if not start_s:  # suffix range: last N bytes
        start, end = max(len(data) - int(end_s), 0), len(data) - 1
    else:
        start, end = int(start_s), min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
    if start >= len(data) and data:
        return Reply(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
    headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
    return Reply(206, data[start : end + 1], headers)


def route(req: Request, state: HubState) -> Reply:
    """Dispatch on path segments (already unquoted one by one, so ``%2F`` stays inside its segment)."""
    seg = req.segments
    if seg[:1] == ["api"]:
        return _api(req, state, seg[1:])
    repo_type = "model"
    if seg and seg[0].endswith("s") and seg[0][:-1] in REPO_TYPES and seg[0] != "models":
        repo_type, seg = seg[0][:-1], seg[1:]
    if len(seg) >= 5 and seg[2] == "resolve" and req.method in ("GET", "HEAD"):
        return _resolve(req, state, repo_type, seg)
    raise HubError(404, f"LocalHub does not implement {req.method} /{'/'.join(req.segments)}")


def _api(req: Request, state: HubState, seg: list[str]) -> Reply:
    simple = {
        ("POST", "repos/create"): lambda: _create_repo(req, state),
        ("DELETE", "repos/delete"): lambda: _delete_repo(req, state),
        ("POST", "validate-yaml"): lambda: _validate_yaml(req, state),
        ("GET", "whoami-v2"): _whoami,
        ("GET", "agent-harnesses"): lambda: json_reply({"standardEnvVars": [], "harnesses": {}}),
    }
    handler = simple.get((req.method, "/".join(seg)))
    if handler is not None:
        return handler()
    if seg[:1] == ["telemetry"]:
        return json_reply({})
    if len(seg) >= 3 and seg[0].endswith("s") and seg[0][:-1] in REPO_TYPES:
        return _repo_api(req, state, seg[0][:-1], f"{seg[1]}/{seg[2]}", seg[3:])
    raise HubError(404, f"LocalHub does not implement {req.method} /api/{'/'.join(seg)}")


# ------------------------------------------------------------------------------------------ HTTP plumbing


class _Server(ThreadingHTTPServer):
    """Carries the shared state and a request log for the handler threads."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: HubState) -> None:
        super().__init__(address, _Handler)
        self.state = state
        self.request_log: list[tuple[str, str, int]] = []


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive (httpx pools connections); every reply carries a Content-Length."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: Any) -> None:
        """Silence the default stderr access log; ``LocalHub.requests`` keeps a structured one instead."""

    def _handle(self) -> None:
        req = self._parse()
        try:
            with self.server.state.lock:
                reply = route(req, self.server.state)
        except HubError as err:
            reply = _error_reply(err)
        except (KeyError, ValueError) as err:  # malformed client payloads (bad JSON, missing keys)
            reply = _error_reply(HubError(400, f"Bad request: {err!r}"))
        except Exception as err:  # a LocalHub bug: answer 500 so the test fails loudly instead of hanging
            reply = _error_reply(HubError(500, f"LocalHub internal error: {err!r}"))
        self.server.request_log.append((self.command, self.path, reply.status))
        self._send(reply)

    def _parse(self) -> Request:
        split = urlsplit(self.path)
        segments = [unquote(s) for s in split.path.split("/") if s]
        host, port = self.server.server_address[:2]
        return Request(
            self.command,
            segments,
            parse_qs(split.query),
            self._read_body(),
            self.headers,
            f"http://{host}:{port}",
        )

    def _read_body(self) -> bytes:
        """Read the whole body (also chunked), so keep-alive connections stay in sync."""
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers
            pass
        return b"".join(chunks)

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    # http.server looks handlers up as `do_<METHOD>`; all verbs share one router.
    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle


def _error_reply(err: HubError) -> Reply:
    reply = json_reply({"error": err.message}, status=err.status)
    reply.headers["X-Error-Message"] = err.message
    if err.code:
        reply.headers["X-Error-Code"] = err.code
    reply.headers.update(err.headers)
    return reply


# ------------------------------------------------------------------------------------------ public API


class LocalHub:
    """A running local hub on ``127.0.0.1:<random free port>``; use as a context manager.

    Example::

        with LocalHub() as hub:
            HfApi(endpoint=hub.url, token="x").create_repo("me/tiny")
            assert len(hub.commits("me/tiny")) == 1  # the initial .gitattributes commit
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = HubState()
        self._server = _Server((host, port), self.state)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[tuple[str, str, int]]:
        """``(method, raw path, status)`` of every request served so far, oldest first."""
        return list(self._server.request_log)

    @property
    def validated_cards(self) -> list[str]:
        """Contents posted to ``/api/validate-yaml`` (model card checks), oldest first."""
        with self.state.lock:
            return list(self.state.validated_cards)

    def start(self) -> LocalHub:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """All commits of a repo, oldest first (including the initial one made by ``create_repo``)."""
        with self.state.lock:
            return list(self.state.get(repo_type, repo_id).commits.values())

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of a repo at ``revision`` (branch or commit id)."""
        with self.state.lock:
            return dict(self.state.get(repo_type, repo_id).resolve(revision).files)

    def repo_ids(self, repo_type: str = "model") -> list[str]:
        with self.state.lock:
            return [rid for (rtype, rid) in self.state.repos if rtype == repo_type]
