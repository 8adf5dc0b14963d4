"""A Hugging Face Hub-protocol HTTP server on 127.0.0.1 for tests.

Faithful enough that the real ``huggingface_hub`` client (2.x, and 1.x: same routes and headers)
and transformers work unmodified through ``HF_ENDPOINT``: repository creation, README metadata
validation, preupload (every file is answered "regular", so contents come inline in the commit),
NDJSON commits applied atomically, branches, pull requests (``refs/pr/N``), repository info and
trees, refs, and ``resolve`` downloads with ``X-Repo-Commit``, ``ETag`` and ``Content-Length``.
With ``state.lfs`` set, ``*.safetensors`` files are answered "lfs" and travel through the LFS
batch API (basic transfer + verify), as on the Hub for clients with ``HF_HUB_DISABLE_XET=1``;
downloads of LFS files then carry ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``.
Errors carry the ``X-Error-Code`` values the client maps to its exceptions (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``). Private repositories answer 401 without the owner's
token. Two fault switches act on the next commit request, after its body has been read: answer
HTTP 500, or drop the connection without answering.

Routes and payloads follow huggingface_hub's ``hf_api.py``, ``_commit_api.py``,
``file_download.py`` and ``utils/_http.py``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
_INITIAL_ATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file, which the Hub uses as the ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, bytes]
    lfs: frozenset[str] = frozenset()  # paths stored through the LFS batch API


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1" -> commit sha
    created: str = field(  # the one date format the client parses
        default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"))

    def resolve(self, revision: str) -> Commit | None:
        revision = revision.removeprefix("refs/heads/")
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if _COMMIT_HASH.match(revision):
            return self.commits.get(revision)
        return None

    def branches(self) -> list[str]:
        return [name for name in self.refs if not name.startswith("refs/")]

    def pull_requests(self) -> list[str]:
        return [name for name in self.refs if name.startswith("refs/pr/")]


class HubError(Exception):
    """An HTTP error answer, with the X-Error-Code the client interprets."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


class HubState:
    """Repositories, tokens and fault switches; every mutation happens under one lock, so a
    commit is visible entirely or not at all."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = dict(tokens)  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.fail_next_commit: int | None = None
        self.drop_next_commit = False
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, had a token)
        # Answer "lfs" for *.safetensors in preupload (clients must then use the LFS batch API,
        # i.e. run with HF_HUB_DISABLE_XET=1); off by default, when every file comes inline.
        self.lfs = False
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded but not committed
        self._counter = 0

    def new_sha(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("\0".join((*parts, str(self._counter))).encode()).hexdigest()

    def create_repo(self, repo_id: str, owner: str, private: bool) -> Repo:
        repo = Repo(repo_id=repo_id, owner=owner, private=private)
        sha = self.new_sha(repo_id, "initial commit")
        repo.commits[sha] = Commit(sha, None, "initial commit",
                                   {".gitattributes": _INITIAL_ATTRIBUTES})
        repo.refs["main"] = sha
        self.repos[repo_id] = repo
        return repo


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer

    # -- plumbing -------------------------------------------------------------------------------
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        return

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _user(self) -> str | None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return None
        user = self.state.tokens.get(header[len("Bearer "):].strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _body(self) -> bytes:
        return self.payload

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        # Read the whole body before any answer, errors included: a body left unread would be
        # parsed as the next request on this keep-alive connection.
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.payload = self._read_chunked()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            self.payload = self.rfile.read(length) if length else b""
        with self.state.lock:
            self.state.requests.append((method, url.path, "Authorization" in self.headers))
        try:
            self._route(method, url.path)
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            body = b"" if method == "HEAD" else json.dumps({"error": err.message}).encode()
            self._send(err.status, body, headers)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _read_chunked(self) -> bytes:
        data = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                self.rfile.readline()
                return bytes(data)
            data += self.rfile.read(size)
            self.rfile.readline()

    # -- routing --------------------------------------------------------------------------------
    def _route(self, method: str, path: str) -> None:
        raw = path.strip("/").split("/")
        parts = [unquote(p) for p in raw]
        if method == "GET" and path in ("/api/whoami-v2", "/api/whoami"):
            return self._whoami()
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo()
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml()
        if method == "PUT" and len(parts) == 3 and parts[:2] == ["api", "test-lfs-upload"]:
            return self._lfs_store(parts[2])
        if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") \
                and parts[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{parts[0]}/{parts[1].removesuffix('.git')}"
            return self._lfs_batch(repo_id) if parts[5] == "batch" else self._lfs_verify(repo_id)
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            return self._model_api(method, repo_id, rest)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise HubError(404, f"no route for {method} {path}")

    def _model_api(self, method: str, repo_id: str, rest: list[str]) -> None:
        if method == "GET" and not rest:
            return self._info(repo_id, "main")
        if method == "GET" and rest[0] == "revision" and len(rest) == 2:
            return self._info(repo_id, rest[1])
        if method == "GET" and rest == ["refs"]:
            return self._refs(repo_id)
        if method == "GET" and rest[0] == "tree" and len(rest) >= 2:
            return self._tree(repo_id, rest[1], "/".join(rest[2:]))
        if method == "POST" and rest[0] == "preupload" and len(rest) == 2:
            return self._preupload(repo_id, rest[1])
        if method == "POST" and rest[0] == "commit" and len(rest) == 2:
            return self._commit(repo_id, rest[1])
        if method == "POST" and rest[0] == "branch" and len(rest) == 2:
            return self._create_branch(repo_id, rest[1])
        raise HubError(404, f"no route for {method} /api/models/{repo_id}/{'/'.join(rest)}")

    # -- access control -------------------------------------------------------------------------
    def _readable(self, repo_id: str) -> Repo:
        user = self._user()
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            # The Hub does not reveal whether a private repo exists: 401 without a token.
            status = 401 if repo is not None and user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str) -> Repo:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        repo = self.state.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.owner != user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _commit_at(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- endpoints ------------------------------------------------------------------------------
    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        self._json(200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                         "auth": {"type": "access_token",
                                  "accessToken": {"displayName": "test", "role": "write"}}})

    def _create_repo(self) -> None:
        payload = json.loads(self._body() or b"{}")
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, "this test server only hosts model repositories")
        owner = payload.get("organization") or user
        name = payload.get("name") or ""
        if not re.match(r"^[\w.-]+$", name):
            raise HubError(400, f"invalid repository name {name!r}")
        repo_id = f"{owner}/{name}"
        url = f"{self.endpoint}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._json(409, {"error": "You already created this model repo",
                                        "url": url})
            if owner != user:
                raise HubError(403, f"You don't have the rights to create a model under {owner}")
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.state.create_repo(repo_id, owner, private)
        self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self) -> None:
        payload = json.loads(self._body() or b"{}")
        content = payload.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        errors = []
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as err:
                errors.append({"message": f"invalid YAML: {err}"})
        status = 400 if errors else 200
        self._json(status, {"errors": errors, "warnings": []})

    def _info(self, repo_id: str, revision: str) -> None:
        repo = self._readable(repo_id)
        commit = self._commit_at(repo, revision)
        blobs = self.query.get("blobs") in ("1", "true", "True")
        siblings = []
        for path, data in sorted(commit.files.items()):
            sibling: dict[str, object] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(data), blobId=git_blob_sha(data))
            siblings.append(sibling)
        self._json(200, {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id,
            "modelId": repo_id, "author": repo.owner, "sha": commit.sha, "private": repo.private,
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "library_name": "transformers", "siblings": siblings, "createdAt": repo.created,
            "lastModified": repo.created,
        })

    def _refs(self, repo_id: str) -> None:
        repo = self._readable(repo_id)

        def ref(name: str, full: str) -> dict[str, str]:
            return {"name": name, "ref": full, "targetCommit": repo.refs[name]}

        payload = {"branches": [ref(b, f"refs/heads/{b}") for b in repo.branches()],
                   "converts": [], "tags": []}
        if self.query.get("include_prs"):
            payload["pullRequests"] = [ref(p, p) for p in repo.pull_requests()]
        self._json(200, payload)

    def _tree(self, repo_id: str, revision: str, prefix: str) -> None:
        repo = self._readable(repo_id)
        commit = self._commit_at(repo, revision)
        recursive = self.query.get("recursive") in ("1", "true", "True")
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        entries, folders = [], set()
        for path, data in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest and not recursive:
                folders.add(base + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(base + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append({"type": "file", "oid": git_blob_sha(data), "size": len(data),
                            "path": path})
        if prefix and not entries and not folders:
            raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
        dirs = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f}
                for f in sorted(folders)]
        self._json(200, dirs + entries)

    def _preupload(self, repo_id: str, revision: str) -> None:
        repo = self._writable(repo_id)
        if not self.query.get("create_pr"):
            self._commit_at(repo, revision)
        payload = json.loads(self._body() or b"{}")
        def mode(path: str) -> str:
            return "lfs" if self.state.lfs and path.endswith(".safetensors") else "regular"

        files = [{"path": f["path"], "uploadMode": mode(f["path"]), "shouldIgnore": False}
                 for f in payload.get("files", [])]
        self._json(200, {"files": files, "commitOid": repo.refs["main"]})

    def _create_branch(self, repo_id: str, branch: str) -> None:
        body = json.loads(self._body() or b"{}")
        with self.state.lock:
            repo = self._writable(repo_id)
            if branch in repo.refs:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = self._commit_at(repo, body.get("startingPoint") or "main")
            repo.refs[branch] = start.sha
        self._json(200, {})

    def _commit(self, repo_id: str, revision: str) -> None:
        body = self._body()  # faults strike after the upload, as they would on a real Hub
        with self.state.lock:
            drop, self.state.drop_next_commit = self.state.drop_next_commit, False
            fail, self.state.fail_next_commit = self.state.fail_next_commit, None
        if drop:
            self.close_connection = True
            return
        if fail is not None:
            raise HubError(fail, "Internal Error - We're working hard to fix this as soon as "
                                 "possible!")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        create_pr = self.query.get("create_pr") in ("1", "true")
        with self.state.lock:
            repo = self._writable(repo_id)
            parent = self._commit_at(repo, revision)
            if header.get("parentCommit") and header["parentCommit"] != parent.sha:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files, lfs = dict(parent.files), set(parent.lfs)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"unsupported encoding for {value.get('path')}")
                    files[value["path"]] = base64.b64decode(value["content"])
                    lfs.discard(value["path"])
                elif key == "lfsFile":
                    data = self.state.lfs_objects.get(value.get("oid", ""))
                    if data is None or value.get("algo") != "sha256":
                        raise HubError(400, f"LFS object for {value.get('path')} was not uploaded")
                    files[value["path"]] = data
                    lfs.add(value["path"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise HubError(404, "A file with this name doesn't exist",
                                       "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(prefix)}
                else:
                    # Preupload answered "regular" for every file: LFS pointers are a client bug.
                    raise HubError(400, f"unsupported commit operation {key!r}")
            message = header.get("summary") or "Update"
            sha = self.state.new_sha(repo_id, parent.sha, message)
            repo.commits[sha] = Commit(sha, parent.sha, message, files,
                                       frozenset(p for p in lfs if p in files))
            answer = {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                      "success": True}
            if create_pr:
                number = len(repo.pull_requests()) + 1
                repo.refs[f"refs/pr/{number}"] = sha
                answer["pullRequestUrl"] = f"{self.endpoint}/{repo_id}/discussions/{number}"
            else:
                repo.refs[revision.removeprefix("refs/heads/")
                          if not _COMMIT_HASH.match(revision) else "main"] = sha
        self._json(200, answer)

    def _lfs_batch(self, repo_id: str) -> None:
        self._writable(repo_id)
        payload = json.loads(self._body() or b"{}")
        if payload.get("operation") != "upload":
            raise HubError(400, "this test server only accepts LFS uploads")
        objects = []
        for obj in payload.get("objects", []):
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs_objects:  # already stored: nothing to send
                answer["actions"] = {
                    "upload": {"href": f"{self.endpoint}/api/test-lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.endpoint}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(answer)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_store(self, oid: str) -> None:
        if hashlib.sha256(self.payload).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match sha256 {oid}")
        with self.state.lock:
            self.state.lfs_objects[oid] = self.payload
        self._send(200)

    def _lfs_verify(self, repo_id: str) -> None:
        self._writable(repo_id)
        payload = json.loads(self._body() or b"{}")
        data = self.state.lfs_objects.get(payload.get("oid", ""))
        if data is None or len(data) != payload.get("size"):
            raise HubError(404, "LFS object not found")
        self._json(200, {"success": True})

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._readable(repo_id)
        commit = self._commit_at(repo, revision)
        headers = {"X-Repo-Commit": commit.sha}
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", headers)
        data = commit.files[path]
        headers["ETag"] = f'"{git_blob_sha(data)}"'
        if path in commit.lfs:  # the Hub names LFS files by their sha256
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        headers["Accept-Ranges"] = "bytes"
        status = 200
        ranged = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if ranged and method == "GET":
            start = int(ranged.group(1))
            stop = int(ranged.group(2)) + 1 if ranged.group(2) else len(data)
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            data, status = data[start:stop], 206
        self._send(status, data, headers, "application/octet-stream", head=method == "HEAD")


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


@dataclass
class HubServer:
    """A running server: ``endpoint`` for HF_ENDPOINT, ``state`` for inspection and faults."""

    endpoint: str
    state: HubState

    def fail_next_commit(self, status: int = 500) -> None:
        with self.state.lock:
            self.state.fail_next_commit = status

    def drop_next_commit(self) -> None:
        with self.state.lock:
            self.state.drop_next_commit = True

    def head(self, repo_id: str, ref: str = "main") -> str | None:
        repo = self.state.repos.get(repo_id)
        return repo.refs.get(ref) if repo else None

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        repo = self.state.repos[repo_id]
        return dict(repo.commits[repo.refs[ref]].files)


@contextlib.contextmanager
def serve_hub(tokens: dict[str, str] | None = None) -> Iterator[HubServer]:
    """Run the server on a random port for the duration of the ``with`` block."""
    state = HubState(tokens or {})
    server = _HubHTTPServer(state)
    # A short poll interval keeps shutdown (once per test) fast.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="test-hub",
                              daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield HubServer(endpoint=f"http://{host}:{port}", state=state)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
