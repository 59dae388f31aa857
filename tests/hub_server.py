"""A local, stdlib-only stand-in for the Hugging Face Hub, for push -> pull round-trip tests.

`HubServer` runs a `http.server.ThreadingHTTPServer` on 127.0.0.1 (random free port) in a background thread and
keeps repos in a temporary directory. It implements just enough of the Hub HTTP API for the *real*
`huggingface_hub` client - and therefore `transformers`' `push_to_hub` / `from_pretrained` - to create a model
repo, commit files to it and download them back by repo id.

Endpoints (all for model repos, ids are always `namespace/name`):

- `POST /api/repos/create`: `HfApi.create_repo`. Answers 409 when the repo exists, which `exist_ok=True` accepts.
  `private` / `visibility` are honoured: a private repo is invisible (401 `RepoNotFound`) without the server token.
  A new repo gets an empty initial commit on `main`, like the Hub's "initial commit".
- `GET /api/whoami-v2`: the user behind the token, used for repo ids without a namespace.
- `POST /api/validate-yaml`: called by `create_commit` whenever a `README.md` is committed (transformers pushes a
  model card). The metadata is accepted as is: there is no YAML parser in the standard library.
- `POST /api/models/{repo}/preupload/{revision}`: tells the client how to upload each file. The answer is always
  `uploadMode: "regular"`, so every file - weights included - travels base64-encoded inside the commit NDJSON.
  This is what keeps the client off Xet: it only reaches `hf_xet` (or the legacy LFS batch API) for files the
  server marked `"lfs"`, so neither Xet nor LFS endpoints are needed. `oid` is the git blob sha1 of the file
  already at that path, which the client compares to skip unchanged files.
- `POST /api/models/{repo}/commit/{revision}`: `create_commit` / `upload_folder` / `upload_file` /
  `delete_file` / `delete_folder`. Reads the NDJSON lines `header`, `file`, `deletedFile` and `deletedFolder`,
  checks `parentCommit`, and returns `commitOid` / `commitUrl`.
- `GET /api/models/{repo}` and `GET /api/models/{repo}/revision/{revision}`: `model_info` / `repo_info` (also
  behind `repo_exists`, `revision_exists`, `resolve_revision` and `snapshot_download`): `sha`, `private` and
  `siblings` (with `size` / `blobId` when `blobs=true`).
- `GET /api/models/{repo}/tree/{revision}[/{path}]`: `list_repo_tree` / `list_repo_files` and the file listing of
  `snapshot_download`, recursive or not, in a single page.
- `POST /api/models/{repo}/paths-info/{revision}`: `get_paths_info` (used by copy operations and `HfFileSystem`).
- `HEAD` / `GET /{repo}/resolve/{revision}/{path}`: `hf_hub_download` / `get_hf_file_metadata`. Answers directly
  (no redirect to a CDN) with `X-Repo-Commit` (the resolved commit, which the client uses for its `refs/` and
  `snapshots/` cache layout), `ETag` (the git blob sha1, which names the cached blob), `Content-Length` and
  single-range `Range` support. Files are never LFS here, so `X-Linked-Etag` / `X-Linked-Size` are not needed,
  and no `X-Xet-Hash` header is ever sent, so downloads never use Xet either.

Revisions are branch names (only `main` exists: branches and pull requests are not implemented) or full 40-hex
commit shas, so that an old commit stays downloadable after new pushes. Errors carry the `X-Error-Code` header
the client maps onto its exceptions: `RepoNotFound`, `RevisionNotFound` and `EntryNotFound` (the latter with
`X-Repo-Commit`, so the client can cache the miss). Requests to any other route get a plain 404 and are recorded
in `HubServer.unhandled_requests`.

Pointing a client at the server:

- subprocesses: pass `env=hub.env()` - `HF_ENDPOINT`, `HF_HUB_OFFLINE=0` and a private `HF_HOME`, which
  `huggingface_hub` reads once, at import time, plus the server's token in `HF_TOKEN`;
- this process: `with hub.patch_client(): ...` patches the module-level values `huggingface_hub` derived from
  those variables when it was imported (see `HubServer.patch_client`).

The module deliberately imports nothing from the project under test, and only the standard library at import
time (`huggingface_hub` is imported lazily by `patch_client`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import threading
import traceback
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["DEFAULT_TOKEN", "DEFAULT_USER", "HubServer"]

DEFAULT_TOKEN = "hf_test"
DEFAULT_USER = "test-user"
DEFAULT_BRANCH = "main"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_COPY_CHUNK = 1 << 20

# Environment variables that would override what `HubServer.env()` sets up (another cache, token file or the
# staging endpoint); they are removed from the environment handed to clients.
_CONFLICTING_ENV_VARS = (
    "HUGGINGFACE_CO_STAGING",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_TOKEN_PATH",
    "HUGGING_FACE_HUB_TOKEN",
)


def _now() -> str:
    """Current UTC time in the Hub's date format (`2024-01-31T12:00:00.000Z`)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_sha1(content: bytes) -> str:
    """Git object id of a blob: the `oid` / `ETag` the Hub reports for a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubHTTPError(Exception):
    """An error answered to the client as an HTTP status, with the Hub's `X-Error-*` headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


def _repo_not_found(repo_id: str, *, authenticated: bool) -> HubHTTPError:
    # Like the Hub: 401 when anonymous (the repo might be private), 404 otherwise; the code is what matters.
    status = HTTPStatus.NOT_FOUND if authenticated else HTTPStatus.UNAUTHORIZED
    return HubHTTPError(status, f"Repository not found: {repo_id}", code="RepoNotFound")


def _validate_path_in_repo(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise HubHTTPError(HTTPStatus.BAD_REQUEST, f"Invalid path in repo: {path!r}")
    return path


@dataclass(frozen=True)
class _FileEntry:
    """A file of a commit: its content lives in the blob store under `sha256`."""

    size: int
    oid: str  # git blob sha1: `oid` in listings, `ETag` on downloads
    sha256: str


@dataclass(frozen=True)
class _Commit:
    sha: str
    parent: str | None
    title: str
    description: str
    date: str
    files: Mapping[str, _FileEntry]


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha
    commits: dict[str, _Commit] = field(default_factory=dict)  # commit sha -> commit


class _Store:
    """Repos, commits and a content-addressed blob directory; all metadata changes happen under one lock."""

    def __init__(self, root: Path) -> None:
        self.blob_dir = root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()

    # -- blobs -------------------------------------------------------------------------------------------------

    def put_blob(self, content: bytes) -> _FileEntry:
        sha256 = hashlib.sha256(content).hexdigest()
        path = self.blob_dir / sha256
        if not path.exists():
            tmp = self.blob_dir / f".{sha256}.{uuid.uuid4().hex}.tmp"
            tmp.write_bytes(content)
            os.replace(tmp, path)
        return _FileEntry(size=len(content), oid=_git_blob_sha1(content), sha256=sha256)

    def blob_path(self, entry: _FileEntry) -> Path:
        return self.blob_dir / entry.sha256

    # -- repos and revisions -----------------------------------------------------------------------------------

    def create_repo(self, repo_id: str, *, private: bool) -> bool:
        """Create `repo_id` with an empty initial commit on `main`; False if it already exists."""
        with self._lock:
            if repo_id in self._repos:
                return False
            repo = _Repo(repo_id=repo_id, private=private, created_at=_now())
            self._add_commit(repo, DEFAULT_BRANCH, parent=None, files={}, title="initial commit", description="")
            self._repos[repo_id] = repo
            return True

    def get_repo(self, repo_id: str, *, authenticated: bool) -> _Repo:
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None or (repo.private and not authenticated):
            raise _repo_not_found(repo_id, authenticated=authenticated)
        return repo

    def resolve(self, repo: _Repo, revision: str) -> _Commit:
        """The commit a branch name or a full commit sha points to."""
        with self._lock:
            sha = repo.branches.get(revision)
            if sha is None and _COMMIT_SHA_RE.fullmatch(revision) and revision in repo.commits:
                sha = revision
            if sha is None:
                raise HubHTTPError(
                    HTTPStatus.NOT_FOUND,
                    f"Invalid rev id: {revision} (only branch names and full commit shas are supported)",
                    code="RevisionNotFound",
                )
            return repo.commits[sha]

    def commit(
        self,
        repo: _Repo,
        branch: str,
        *,
        additions: Mapping[str, _FileEntry],
        deleted_files: list[str],
        deleted_folders: list[str],
        title: str,
        description: str,
        parent_commit: str | None,
    ) -> _Commit:
        """Apply deletions then additions on top of `branch` and move the branch to the new commit."""
        with self._lock:
            if branch not in repo.branches:
                if branch in repo.commits:
                    raise HubHTTPError(HTTPStatus.BAD_REQUEST, "Commits can only be pushed to a branch, not a sha")
                raise HubHTTPError(HTTPStatus.NOT_FOUND, f"Invalid rev id: {branch}", code="RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            if parent_commit is not None and not head.sha.startswith(parent_commit):
                raise HubHTTPError(
                    HTTPStatus.PRECONDITION_FAILED,
                    f"A commit has happened since {parent_commit}: '{branch}' is at {head.sha}",
                )
            files = dict(head.files)
            for path in deleted_files:
                if files.pop(path, None) is None:
                    raise HubHTTPError(
                        HTTPStatus.NOT_FOUND,
                        f"A file with this name doesn't exist: {path}",
                        code="EntryNotFound",
                    )
            for folder in deleted_folders:
                prefix = folder.rstrip("/") + "/"
                doomed = [path for path in files if path.startswith(prefix)]
                if not doomed:
                    raise HubHTTPError(
                        HTTPStatus.NOT_FOUND,
                        f"A folder with this name doesn't exist: {folder}",
                        code="EntryNotFound",
                    )
                for path in doomed:
                    del files[path]
            files.update(additions)
            return self._add_commit(
                repo, branch, parent=head.sha, files=files, title=title, description=description
            )

    @staticmethod
    def _add_commit(
        repo: _Repo,
        branch: str,
        *,
        parent: str | None,
        files: dict[str, _FileEntry],
        title: str,
        description: str,
    ) -> _Commit:
        date = _now()
        # Unique and content-dependent; the nonce keeps two identical commits apart.
        identity = {
            "parent": parent,
            "tree": sorted((path, entry.oid) for path, entry in files.items()),
            "title": title,
            "description": description,
            "date": date,
            "nonce": uuid.uuid4().hex,
        }
        sha = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        commit = _Commit(sha=sha, parent=parent, title=title, description=description, date=date, files=files)
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit


def _file_json(path: str, entry: _FileEntry) -> dict[str, Any]:
    return {"type": "file", "path": path, "size": entry.size, "oid": entry.oid}


def _folder_json(path: str, files: Mapping[str, _FileEntry]) -> dict[str, Any]:
    prefix = path + "/"
    children = sorted((p, e.oid) for p, e in files.items() if p.startswith(prefix))
    tree_id = hashlib.sha1(json.dumps(children).encode()).hexdigest()
    return {"type": "directory", "path": path, "size": 0, "oid": tree_id}


def _folders_of(files: Mapping[str, _FileEntry]) -> set[str]:
    folders = set()
    for path in files:
        parts = path.split("/")[:-1]
        folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return folders


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: HubServer) -> None:
        super().__init__(address, _HubRequestHandler)
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def track(self, connection: socket.socket, *, open_: bool) -> None:
        with self._connections_lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        """Close kept-alive client connections, so that their handler threads end with the server."""
        with self._connections_lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: _HubHTTPServer

    # -- plumbing ----------------------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, open_=True)

    def finish(self) -> None:
        self.server.track(self.connection, open_=False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        """Silence the per-request access log; requests are recorded in `HubServer.requests` instead."""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF closing the chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self, method: str) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        hub._record(method, split.path)
        try:
            # Always consume the body first: with keep-alive, an unread body would corrupt the next request.
            self.body = self._read_body()
            self.authenticated = self._check_token()
            handler, params = self._route(method, split.path)
            if handler is None:
                hub._record_unhandled(method, self.path)
                raise HubHTTPError(HTTPStatus.NOT_FOUND, f"Not implemented by the test Hub: {method} {split.path}")
            handler(**params)
        except HubHTTPError as error:
            self._send_error(error)
        except ConnectionError:  # the client went away (e.g. an interrupted download): nothing to answer
            self.close_connection = True
        except Exception as error:  # a bug in the server: report it to the client and on stderr
            traceback.print_exc(file=sys.stderr)
            hub._record_error(method, self.path, error)
            self._send_error(HubHTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}"))

    def _check_token(self) -> bool:
        authorization = self.headers.get("Authorization")
        if authorization is None:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.server.hub.token:
            # Exactly the Hub's message: the client then reports a plain 401 instead of "repo not found".
            raise HubHTTPError(HTTPStatus.UNAUTHORIZED, "Invalid credentials in Authorization header")
        return True

    def _require_token(self) -> None:
        if not self.authenticated:
            raise HubHTTPError(HTTPStatus.UNAUTHORIZED, "Invalid credentials in Authorization header")

    def _send(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(payload).encode())

    def _send_error(self, error: HubHTTPError) -> None:
        # Header values must be single-line latin-1: escape anything else (paths may be any unicode).
        header_message = " ".join(error.message.split()).encode("ascii", "backslashreplace").decode()
        headers = {"X-Error-Message": header_message, **error.headers}
        if error.code is not None:
            headers["X-Error-Code"] = error.code
        self._send(error.status, json.dumps({"error": error.message}).encode(), headers=headers)

    def _json_body(self) -> dict[str, Any]:
        try:
            payload = json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubHTTPError(HTTPStatus.BAD_REQUEST, f"Invalid JSON body: {error}") from error
        if not isinstance(payload, dict):
            raise HubHTTPError(HTTPStatus.BAD_REQUEST, "The JSON body must be an object")
        return payload

    def _flag(self, name: str) -> bool:
        return self.query.get(name, [""])[-1].lower() in ("1", "true")

    # -- routing -----------------------------------------------------------------------------------------------

    def _route(self, method: str, raw_path: str) -> tuple[Any, dict[str, str]]:
        """Find the handler; path segments are split *before* unquoting, so that `%2F` stays inside a segment."""
        segments = [unquote(segment) for segment in raw_path.split("/")[1:]]
        if segments[:1] == ["api"]:
            rest = segments[1:]
            if method == "POST" and rest == ["repos", "create"]:
                return self._create_repo, {}
            if method == "GET" and rest == ["whoami-v2"]:
                return self._whoami, {}
            if method == "POST" and rest == ["validate-yaml"]:
                return self._validate_yaml, {}
            if len(rest) >= 3 and rest[0] == "models":
                repo_id, action, args = f"{rest[1]}/{rest[2]}", rest[3:4], rest[4:]
                if method == "GET" and not action:
                    return self._repo_info, {"repo_id": repo_id, "revision": DEFAULT_BRANCH}
                if method == "GET" and action == ["revision"] and len(args) == 1:
                    return self._repo_info, {"repo_id": repo_id, "revision": args[0]}
                if method == "GET" and action == ["tree"] and args:
                    return self._tree, {"repo_id": repo_id, "revision": args[0], "path": "/".join(args[1:])}
                if method == "POST" and action == ["paths-info"] and len(args) == 1:
                    return self._paths_info, {"repo_id": repo_id, "revision": args[0]}
                if method == "POST" and action == ["preupload"] and len(args) == 1:
                    return self._preupload, {"repo_id": repo_id, "revision": args[0]}
                if method == "POST" and action == ["commit"] and len(args) == 1:
                    return self._commit, {"repo_id": repo_id, "revision": args[0]}
            return None, {}
        if method in ("GET", "HEAD") and len(segments) >= 5 and segments[2] == "resolve":
            return self._resolve, {
                "repo_id": f"{segments[0]}/{segments[1]}",
                "revision": segments[3],
                "path": "/".join(segments[4:]),
            }
        return None, {}

    # -- endpoints ---------------------------------------------------------------------------------------------

    def _create_repo(self) -> None:
        self._require_token()
        hub = self.server.hub
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type != "model":
            raise HubHTTPError(HTTPStatus.BAD_REQUEST, f"The test Hub only hosts model repos, not {repo_type!r}")
        namespace, name = payload.get("organization") or hub.username, payload.get("name") or ""
        if not (_NAME_RE.fullmatch(namespace) and _NAME_RE.fullmatch(name)):
            raise HubHTTPError(HTTPStatus.BAD_REQUEST, f"Invalid repo name: {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{hub.endpoint}/{repo_id}"
        if not hub._store.create_repo(repo_id, private=private):
            self._send_json({"error": "You already created this model repo", "url": url}, HTTPStatus.CONFLICT)
            return
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _whoami(self) -> None:
        self._require_token()
        hub = self.server.hub
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(hub.username.encode()).hexdigest()[:24],
                "name": hub.username,
                "fullname": hub.username,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _validate_yaml(self) -> None:
        self._send_json({"errors": [], "warnings": []})

    def _repo_info(self, repo_id: str, revision: str) -> None:
        repo = self.server.hub._store.get_repo(repo_id, authenticated=self.authenticated)
        commit = self.server.hub._store.resolve(repo, revision)
        with_blobs = self._flag("blobs")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
            siblings.append(sibling)
        namespace = repo_id.split("/")[0]
        self._send_json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": namespace,
                "sha": commit.sha,
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

    def _tree(self, repo_id: str, revision: str, path: str) -> None:
        store = self.server.hub._store
        commit = store.resolve(store.get_repo(repo_id, authenticated=self.authenticated), revision)
        path = path.strip("/")
        prefix = path + "/" if path else ""
        files = {p: e for p, e in commit.files.items() if p.startswith(prefix)}
        if path and not files:
            raise HubHTTPError(
                HTTPStatus.NOT_FOUND,
                f"{path} does not exist or is not a folder at {revision}",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.sha},
            )
        recursive = self._flag("recursive")
        entries = []
        for folder in sorted(_folders_of(files)):
            relative = folder[len(prefix) :]
            if folder.startswith(prefix) and relative and (recursive or "/" not in relative):
                entries.append(_folder_json(folder, commit.files))
        for file_path, entry in sorted(files.items()):
            if recursive or "/" not in file_path[len(prefix) :]:
                entries.append(_file_json(file_path, entry))
        self._send_json(entries)

    def _paths_info(self, repo_id: str, revision: str) -> None:
        store = self.server.hub._store
        commit = store.resolve(store.get_repo(repo_id, authenticated=self.authenticated), revision)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = self._json_body().get("paths", [])
        else:
            paths = parse_qs(self.body.decode()).get("paths", [])
        folders = _folders_of(commit.files)
        entries = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                entries.append(_file_json(path, commit.files[path]))
            elif path in folders:
                entries.append(_folder_json(path, commit.files))
        self._send_json(entries)

    def _preupload(self, repo_id: str, revision: str) -> None:
        self._require_token()
        if self._flag("create_pr"):
            raise HubHTTPError(HTTPStatus.BAD_REQUEST, "Pull requests are not supported by the test Hub")
        store = self.server.hub._store
        commit = store.resolve(store.get_repo(repo_id, authenticated=True), revision)
        try:
            paths = [item["path"] for item in self._json_body()["files"]]
        except (KeyError, TypeError) as error:
            raise HubHTTPError(HTTPStatus.BAD_REQUEST, f"Malformed preupload payload: {error!r}") from error
        files = []
        for path in paths:
            existing = commit.files.get(path)
            files.append(
                {
                    "path": path,
                    "uploadMode": "regular",  # never "lfs": keeps the client off the LFS and Xet upload paths
                    "shouldIgnore": False,
                    "oid": existing.oid if existing is not None else None,
                }
            )
        self._send_json({"files": files, "commitOid": commit.sha})

    def _commit(self, repo_id: str, revision: str) -> None:
        self._require_token()
        if self._flag("create_pr"):
            raise HubHTTPError(HTTPStatus.BAD_REQUEST, "Pull requests are not supported by the test Hub")
        hub = self.server.hub
        repo = hub._store.get_repo(repo_id, authenticated=True)
        header: dict[str, Any] = {}
        additions: dict[str, _FileEntry] = {}
        deleted_files: list[str] = []
        deleted_folders: list[str] = []
        for line in self.body.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    if not isinstance(value, dict):
                        raise TypeError("the header value must be an object")
                    header = value
                elif key == "file":
                    path = _validate_path_in_repo(value["path"])
                    if value.get("encoding", "utf-8") == "base64":
                        content = base64.b64decode(value["content"], validate=True)
                    else:
                        content = value["content"].encode()
                    additions[path] = hub._store.put_blob(content)
                elif key == "deletedFile":
                    deleted_files.append(_validate_path_in_repo(value["path"]))
                elif key == "deletedFolder":
                    deleted_folders.append(_validate_path_in_repo(value["path"].rstrip("/")))
                elif key == "lfsFile":
                    raise HubHTTPError(
                        HTTPStatus.BAD_REQUEST,
                        "The test Hub stores no LFS objects: preupload always answers uploadMode='regular'",
                    )
                else:
                    raise HubHTTPError(HTTPStatus.BAD_REQUEST, f"Unknown commit operation: {key!r}")
            except (ValueError, KeyError, TypeError, AttributeError) as error:  # bad JSON, base64 or fields
                raise HubHTTPError(HTTPStatus.BAD_REQUEST, f"Malformed commit line: {error!r}") from error
        title = header.get("summary") or ""
        if not title:
            raise HubHTTPError(HTTPStatus.BAD_REQUEST, "A commit needs a summary")
        commit = hub._store.commit(
            repo,
            revision,
            additions=additions,
            deleted_files=deleted_files,
            deleted_folders=deleted_folders,
            title=title,
            description=header.get("description") or "",
            parent_commit=header.get("parentCommit"),
        )
        self._send_json(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{commit.sha}",
                "commit": {"oid": commit.sha, "url": f"{hub.endpoint}/{repo_id}/commit/{commit.sha}"},
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        store = self.server.hub._store
        commit = store.resolve(store.get_repo(repo_id, authenticated=self.authenticated), revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubHTTPError(
                HTTPStatus.NOT_FOUND,
                f"Entry not found: {path} at {revision}",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.sha},
            )
        start, end = 0, entry.size - 1
        status = HTTPStatus.OK
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{entry.oid}"',
            "Accept-Ranges": "bytes",
        }
        range_header = self.headers.get("Range")
        if range_header is not None:
            start, end = self._parse_range(range_header, entry.size)
            status = HTTPStatus.PARTIAL_CONTENT
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD" or length == 0:
            return
        with open(store.blob_path(entry), "rb") as blob:
            blob.seek(start)
            remaining = length
            while remaining:
                chunk = blob.read(min(_COPY_CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)

    @staticmethod
    def _parse_range(value: str, size: int) -> tuple[int, int]:
        """Inclusive `(start, end)` of a single `bytes=` range, or a 416 error."""
        match = _RANGE_RE.fullmatch(value.strip())
        unsatisfiable = HubHTTPError(
            HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
            f"Unsupported or unsatisfiable range {value!r} for a file of {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
        if match is None or match.groups() == ("", ""):
            raise unsatisfiable
        first, last = match.groups()
        if first == "":  # suffix range: the last N bytes
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
        if start >= size or start > end:
            raise unsatisfiable
        return start, end


class HubServer:
    """A local Hub API server, started on 127.0.0.1 at a random free port; see the module docstring.

    Usage::

        with HubServer() as hub:
            subprocess.run([...], env=hub.env(), check=True)  # another process
            with hub.patch_client():  # this process
                HfApi().create_repo("org/tiny", exist_ok=True)

    Args:
        token: the only token accepted. Writes need it, and so do reads of private repos.
        username: namespace of repos created without one (and the `whoami` answer).
        root: where repos and the default `HF_HOME` live; a temporary directory removed by `stop()` if not given.
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        username: str = DEFAULT_USER,
        root: str | os.PathLike[str] | None = None,
    ) -> None:
        self.token = token
        self.username = username
        self._root_arg = Path(root) if root is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._log_lock = threading.Lock()
        self._requests: list[tuple[str, str]] = []
        self._unhandled: list[tuple[str, str]] = []
        self._errors: list[tuple[str, str, str]] = []
        self.root: Path | None = None
        self._store: _Store

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        if self._httpd is not None:
            raise RuntimeError("HubServer already started")
        if self._root_arg is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="hub_server_")
            self.root = Path(self._tmp.name)
        else:
            self.root = self._root_arg
            self.root.mkdir(parents=True, exist_ok=True)
        self._store = _Store(self.root / "storage")
        self._httpd = _HubHTTPServer(("127.0.0.1", 0), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._httpd = self._thread = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """Base URL of the server, the value for `HF_ENDPOINT` / `HfApi(endpoint=...)`."""
        if self._httpd is None:
            raise RuntimeError("HubServer is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def hf_home(self) -> Path:
        """Default `HF_HOME` of clients set up by `env()` / `patch_client()` (cache under `hf_home / "hub"`)."""
        if self.root is None:
            raise RuntimeError("HubServer is not running")
        return self.root / "hf_home"

    # -- request log -------------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str]]:
        """`(method, path)` of every request received so far, oldest first."""
        with self._log_lock:
            return list(self._requests)

    @property
    def unhandled_requests(self) -> list[tuple[str, str]]:
        """`(method, path)` of requests to routes this server does not implement (answered 404)."""
        with self._log_lock:
            return list(self._unhandled)

    @property
    def errors(self) -> list[tuple[str, str, str]]:
        """`(method, path, error)` of requests that crashed the server (answered 500)."""
        with self._log_lock:
            return list(self._errors)

    def _record(self, method: str, path: str) -> None:
        with self._log_lock:
            self._requests.append((method, path))

    def _record_unhandled(self, method: str, path: str) -> None:
        with self._log_lock:
            self._unhandled.append((method, path))

    def _record_error(self, method: str, path: str, error: Exception) -> None:
        with self._log_lock:
            self._errors.append((method, path, repr(error)))

    # -- client configuration ----------------------------------------------------------------------------------

    def env_overrides(self, *, hf_home: str | os.PathLike[str] | None = None) -> dict[str, str]:
        """The variables that point a freshly started `huggingface_hub` at this server."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",  # read as a fallback of HF_HUB_OFFLINE
            "HF_HOME": str(hf_home if hf_home is not None else self.hf_home),
            "HF_TOKEN": self.token,
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }

    def env(
        self,
        base: Mapping[str, str] | None = None,
        *,
        hf_home: str | os.PathLike[str] | None = None,
    ) -> dict[str, str]:
        """A complete environment for a subprocess that should talk to this server.

        `base` (default: `os.environ`) plus `env_overrides()`, minus the variables that would redirect the cache,
        the token or the endpoint elsewhere. Pass another `hf_home` to start from an empty cache.
        """
        env = dict(os.environ if base is None else base)
        for name in _CONFLICTING_ENV_VARS:
            env.pop(name, None)
        env.update(self.env_overrides(hf_home=hf_home))
        return env

    @contextlib.contextmanager
    def patch_client(self, *, hf_home: str | os.PathLike[str] | None = None) -> Iterator[None]:
        """Point the `huggingface_hub` already imported in this process at this server, then restore it.

        `huggingface_hub.constants` reads `HF_ENDPOINT`, `HF_HUB_OFFLINE` and `HF_HOME` once, at import time, and a
        few values are derived from them then; all of those are patched:

        - `constants.ENDPOINT`, the default of every `HfApi(endpoint=None)` and of most functions;
        - `constants.HUGGINGFACE_CO_URL_TEMPLATE`, from which `hf_hub_url` (hence `hf_hub_download`) builds URLs;
        - `constants.HF_URL_HOSTS`, the hosts whose web URLs `parse_hf_uri` recognizes;
        - `constants.HF_HUB_OFFLINE`, which `is_offline_mode()` returns and which blocks every request when true;
        - `constants.HF_HUB_CACHE` / `HF_ASSETS_CACHE`, the default cache, moved under `hf_home`;
        - `constants.HF_HUB_DISABLE_TELEMETRY`, so that no telemetry call reaches the server;
        - `huggingface_hub.hf_api.api.endpoint`: the module-level `HfApi` behind `huggingface_hub.create_repo`,
          `upload_folder`, `model_info`... was built with the import-time endpoint;
        - `transformers.utils.hub._hf_api` (if transformers is imported): its cached `HfApi`, reset so that it is
          rebuilt against the server, and put back afterwards.

        The variables of `env_overrides()` are also set in `os.environ` (token included, which the client reads
        on each call), so that subprocesses started inside the block reach the server too.
        Redirect-related values (`utils._http._HUB_ORIGINS`) are left alone: this server never redirects.
        """
        from huggingface_hub import constants, hf_api

        hf_home = Path(hf_home) if hf_home is not None else self.hf_home
        endpoint = self.endpoint
        patches: list[tuple[object, str, object]] = [
            (constants, "ENDPOINT", endpoint),
            (constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
            (constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname}),
            (constants, "HF_HUB_OFFLINE", False),
            (constants, "HF_HUB_CACHE", str(hf_home / "hub")),
            (constants, "HF_ASSETS_CACHE", str(hf_home / "assets")),
            (constants, "HF_HUB_DISABLE_TELEMETRY", True),
            (hf_api.api, "endpoint", endpoint),
        ]
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            patches.append((transformers_hub, "_hf_api", None))

        env_names = [*_CONFLICTING_ENV_VARS, *self.env_overrides(hf_home=hf_home)]
        saved_env = {name: os.environ.get(name) for name in env_names}
        saved_attrs = [(target, name, getattr(target, name)) for target, name, _ in patches]
        try:
            for name in _CONFLICTING_ENV_VARS:
                os.environ.pop(name, None)
            os.environ.update(self.env_overrides(hf_home=hf_home))
            for target, name, value in patches:
                setattr(target, name, value)
            yield
        finally:
            for target, name, value in reversed(saved_attrs):
                setattr(target, name, value)
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


if __name__ == "__main__":
    # Manual use: `python tests/hub_server.py`, then run clients with the printed environment.
    with HubServer() as _hub:
        for _name, _value in _hub.env_overrides().items():
            print(f"export {_name}={_value}")
        print("# serving, Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
