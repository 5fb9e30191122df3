"""A loopback Hugging Face Hub emulator for tests (standard library only) and the `hub` pytest fixture.

It implements the HTTP subset that `huggingface_hub` 2.x and `transformers` 5.x use to push and load model repos
(as the client sends it: `huggingface_hub/hf_api.py`, `_commit_api.py`, `file_download.py`, `lfs.py`, and
`utils/_http.py` for the `X-Error-Code` header that types errors):

- `POST /api/repos/create`, `DELETE /api/repos/delete`, `GET /api/whoami-v2`, `POST /api/validate-yaml`
- `GET  /api/{models,datasets,spaces}/<repo>[/revision/<rev>]`         repo info (`sha`, `siblings`)
- `POST /api/<type>s/<repo>/preupload/<rev>`                             `uploadMode` per file (regular by default)
- `POST /api/<type>s/<repo>/commit/<rev>[?create_pr=1]`                  ndjson commit: file, lfsFile, deleted*
- `GET  /api/<type>s/<repo>/tree/<rev>[/<path>]?recursive=`             listing
- `POST /api/<type>s/<repo>/paths-info/<rev>`                           form-encoded `paths=`
- `GET  /api/<type>s/<repo>/refs`, `GET /api/<type>s/<repo>/commits/<rev>`
- `POST|DELETE /api/<type>s/<repo>/branch/<name>`, `POST /api/<type>s/<repo>/tag/<rev>`
- `HEAD|GET /[<type>s/]<repo>/resolve/<rev>/<path>`                      `X-Repo-Commit`, `ETag`, `Content-Length`
- `POST /[<type>s/]<repo>.git/info/lfs/objects/batch`, `PUT /_lfs/<oid>`, `POST /_lfs/verify`   (basic LFS)

Repos keep a git-like history: every commit gets a fresh 40-hex sha and an immutable snapshot {path: bytes};
branches (`main`, `refs/pr/N`, ...) and tags point at commits; a revision is a branch, a tag, a full sha or a
unique sha prefix (7+ characters). Missing things answer 404 with the `X-Error-Code` the client types errors by
(`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`).

Every file is answered `uploadMode: "regular"` at preupload (content travels base64 inside the commit, so neither
Xet nor LFS is involved) unless its path matches `server.lfs_patterns`; those take the git-LFS batch path, which
the client only uses with `HF_HUB_DISABLE_XET=1` (the fixture sets it).

Reliability hooks: `server.fail_next(method, path_regex, status=500 | "drop", times=1)` makes the next matching
request(s) answer that status (with `X-Error-Code: InjectedFault`) or close the connection without answering;
`server.requests` logs every request (method, path, query, status, fault) for assertions.

Authorisation: by default any token (or none) is accepted. `HubServer(tokens={"hf_x": "write", "hf_y": "read"})`
answers 401 "Invalid credentials in Authorization header" to a request without a listed token, and 403 to a
write (POST, PUT or DELETE, except paths-info and validate-yaml) with a read token. LFS transfers (`/_lfs/`) stand
for the real Hub's pre-signed storage URLs and are not checked.

Fixture: `hub` (function scope; `from hub_server import hub` in a test module) starts a fresh server and returns a
`Hub` with `.server` (the HubServer), `.endpoint`, `.env` (os.environ plus HF_ENDPOINT, HF_HOME=<tmp>/hf_home,
HF_TOKEN=hf_dummy, HF_HUB_DISABLE_TELEMETRY/XET/PROGRESS_BARS=1, NO_PROXY, HF_HUB_OFFLINE=0), `.home` and
`.run_python(code, *args, cwd=, env=)`. `running_hub(directory, **server_kwargs)` is the same as a context manager,
for module-scoped fixtures. Because `huggingface_hub` reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` when it is imported
(and conftest.py sets `HF_HUB_OFFLINE=1`), run client code in subprocesses with `env=hub.env`.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

DEFAULT_USER = "testuser"
REPO_TYPES = ("model", "dataset", "space")
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")


def git_blob_sha1(data: bytes) -> str:
    """What `git hash-object` prints, the oid the Hub gives regular files (and
    `huggingface_hub.utils.sha.git_hash`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}Z"


# ------------------------------------------------------------------------------------------------- repository model
@dataclass
class StoredFile:
    data: bytes
    lfs: bool = False

    @property
    def oid(self) -> str:
        return git_blob_sha1(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        """The Hub's ETag: the git oid for regular files, the sha256 (as X-Linked-Etag) for LFS files."""
        return self.sha256 if self.lfs else self.oid


@dataclass
class Commit:
    sha: str
    parent: str | None
    summary: str
    description: str
    files: dict[str, StoredFile]
    timestamp: float


@dataclass
class Repo:
    repo_id: str
    repo_type: str = "model"
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)   # sha -> commit, in creation order
    branches: dict[str, str] = field(default_factory=dict)     # name (main, refs/pr/1, ...) -> sha
    tags: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.tags:
            return self.commits[self.tags[revision]]
        for prefix in ("refs/heads/", "refs/tags/"):
            if revision.startswith(prefix):
                return self.resolve(revision[len(prefix):])
        if _SHA_RE.match(revision):
            found = [c for sha, c in self.commits.items() if sha.startswith(revision)]
            if len(found) == 1:
                return found[0]
        return None

    def history(self, sha: str) -> list[Commit]:
        """Commits reachable from `sha`, newest first."""
        out = []
        while sha is not None:
            commit = self.commits[sha]
            out.append(commit)
            sha = commit.parent
        return out


@dataclass
class LoggedRequest:
    method: str
    path: str              # as sent (still percent-encoded), without the query string
    query: dict            # parse_qs of the query string
    headers: dict          # names lower-cased
    body: bytes
    status: int | None = None
    fault: str | None = None   # "status" or "drop" when fail_next answered it
    time: float = field(default_factory=time.monotonic)

    def json(self):
        return json.loads(self.body)

    def ndjson(self) -> list:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]

    def __repr__(self) -> str:
        fault = f" fault={self.fault}" if self.fault else ""
        return f"<{self.method} {self.path} -> {self.status}{fault}>"


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern
    status: int | str
    times: int


class _HttpError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


def _not_found(code: str, message: str) -> _HttpError:
    return _HttpError(404, message, code)


# ------------------------------------------------------------------------------------------------------- the server
class HubServer:
    """The emulator. `start()` serves on 127.0.0.1 (a free port unless one is given); `stop()` shuts it down."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, user: str = DEFAULT_USER, lfs_patterns=(),
                 tokens: dict[str, str] | None = None):
        self.user = user
        self.lfs_patterns = list(lfs_patterns)   # fnmatch patterns answered uploadMode "lfs" at preupload
        self.tokens = tokens                     # token -> "read" | "write"; None accepts any request
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[LoggedRequest] = []
        self.unhandled: list[LoggedRequest] = []   # requests no route matched (answered 404 without error code)
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------- test helpers
    def fail_next(self, method: str, path_regex: str, status: int | str = 500, times: int = 1) -> None:
        """The next `times` requests with this method ("*" for any) whose path (percent-encoded, no query) matches
        `path_regex` (re.search) answer `status` with `X-Error-Code: InjectedFault`, or, with `status="drop"`, see
        the connection closed without an answer (the client gets "Server disconnected without sending a response").
        Faults queue up in call order; the request log marks the requests they answered (`fault`)."""
        if status != "drop" and not isinstance(status, int):
            raise ValueError(f"status must be an int or 'drop', got {status!r}")
        with self._lock:
            self._faults.append(_Fault(method.upper(), re.compile(path_regex), status, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def requests_matching(self, method: str | None = None, path_regex: str = "") -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r.method == method.upper()) and re.search(path_regex, r.path)]

    def get_repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def commit_shas(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Shas of the history of `revision`, oldest first (the first one is the repo's initial commit)."""
        repo = self.get_repo(repo_id, repo_type)
        return [c.sha for c in reversed(repo.history(repo.resolve(revision).sha))]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        commit = self.get_repo(repo_id, repo_type).resolve(revision)
        return {path: f.data for path, f in commit.files.items()}

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo directly (as `POST /api/repos/create` does): one initial commit holding .gitattributes."""
        with self._lock:
            repo = Repo(repo_id, repo_type, private)
            self.repos[(repo_type, repo_id)] = repo
            commit = self._new_commit(repo, None, "initial commit", "", {".gitattributes": StoredFile(GITATTRIBUTES)})
            repo.branches["main"] = commit.sha
            return repo

    # ---------------------------------------------------------------------------------------- internals
    def _new_commit(self, repo: Repo, parent: str | None, summary: str, description: str, files) -> Commit:
        self._counter += 1
        seed = json.dumps([repo.repo_id, parent, summary, self._counter, time.time_ns(),
                           sorted((p, f.oid) for p, f in files.items())]).encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), parent, summary, description, dict(files), time.time())
        repo.commits[commit.sha] = commit
        return commit

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method in (method, "*") and fault.pattern.search(path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _check_token(self, method: str, path: str, headers: dict) -> None:
        if self.tokens is None or path.startswith("/_lfs/"):
            return
        role = self.tokens.get(headers.get("authorization", "").removeprefix("Bearer ").strip())
        if role is None:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        reads = ("/paths-info/", "/api/validate-yaml")
        if role != "write" and method in ("POST", "PUT", "DELETE") and not any(r in path for r in reads):
            raise _HttpError(403, f"You don't have the rights to write to {path}: this token is read-only")

    def _url_prefix(self, repo_type: str) -> str:
        return "" if repo_type == "model" else f"{repo_type}s/"

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _not_found("RepoNotFound", f"Repository Not Found for url: {repo_type} {repo_id}.")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _not_found("RevisionNotFound", f"Invalid rev id: {revision}")
        return commit


# ------------------------------------------------------------------------------------------------------ the routes
_TYPE = r"(?P<type>models|datasets|spaces)"
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_API_ROUTES = [
    ("GET", rf"^/api/{_TYPE}/{_REPO}/revision/(?P<rev>[^/]+)$", "repo_info"),
    ("GET", rf"^/api/{_TYPE}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", "tree"),
    ("POST", rf"^/api/{_TYPE}/{_REPO}/preupload/(?P<rev>[^/]+)$", "preupload"),
    ("POST", rf"^/api/{_TYPE}/{_REPO}/commit/(?P<rev>[^/]+)$", "commit"),
    ("POST", rf"^/api/{_TYPE}/{_REPO}/paths-info/(?P<rev>[^/]+)$", "paths_info"),
    ("GET", rf"^/api/{_TYPE}/{_REPO}/refs$", "refs"),
    ("GET", rf"^/api/{_TYPE}/{_REPO}/commits/(?P<rev>[^/]+)$", "commits"),
    ("POST", rf"^/api/{_TYPE}/{_REPO}/branch/(?P<branch>.+)$", "create_branch"),
    ("DELETE", rf"^/api/{_TYPE}/{_REPO}/branch/(?P<branch>.+)$", "delete_branch"),
    ("POST", rf"^/api/{_TYPE}/{_REPO}/tag/(?P<rev>.+)$", "create_tag"),
    ("GET", rf"^/api/{_TYPE}/{_REPO}$", "repo_info"),
    ("POST", r"^/api/repos/create$", "create"),
    ("DELETE", r"^/api/repos/delete$", "delete"),
    ("GET", r"^/api/whoami-v2$", "whoami"),
    ("POST", r"^/api/validate-yaml$", "validate_yaml"),
    ("POST", r"^/_lfs/verify$", "lfs_verify"),
    ("PUT", r"^/_lfs/(?P<oid>[0-9a-f]{64})$", "lfs_put"),
    ("POST", rf"^/(?:(?P<type>datasets|spaces)/)?{_REPO}\.git/info/lfs/objects/batch$", "lfs_batch"),
    ("HEAD", rf"^/(?:(?P<type>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
    ("GET", rf"^/(?:(?P<type>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
]
_API_ROUTES = [(method, re.compile(pattern), name) for method, pattern, name in _API_ROUTES]


def _repo_type(match: dict) -> str:
    t = match.get("type")
    return "model" if t in (None, "models") else t[:-1]


def _make_handler(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "HubEmulator/1.0"

        def log_message(self, format, *args):  # keep pytest output clean
            pass

        # ------------------------------------------------------------------------------- plumbing
        def _dispatch(self):
            split = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = self._read_chunked()
            headers = {key.lower(): value for key, value in self.headers.items()}
            record = LoggedRequest(self.command, split.path, parse_qs(split.query), headers, body)
            with server._lock:
                server.requests.append(record)

            fault = server._take_fault(self.command, split.path)
            if fault is not None and fault.status == "drop":
                record.fault = "drop"
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if fault is not None:
                record.fault = "status"
                return self._error(record, _HttpError(fault.status, "Injected fault", "InjectedFault"))

            try:
                server._check_token(self.command, split.path, headers)
            except _HttpError as error:
                return self._error(record, error)
            for method, pattern, name in _API_ROUTES:
                match = pattern.match(split.path)
                if method == self.command and match:
                    params = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    try:
                        with server._lock:
                            getattr(self, f"_route_{name}")(record, params)
                    except _HttpError as error:
                        self._error(record, error)
                    return
            with server._lock:
                server.unhandled.append(record)
            self._error(record, _HttpError(404, f"No emulated route for {self.command} {split.path}"))

        def _read_chunked(self) -> bytes:
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()

        def _send(self, record, status: int, body: bytes = b"", content_type="application/json", headers=None,
                  content_length: int | None = None):
            record.status = status
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)

        def _json(self, record, payload, status: int = 200, headers=None, content_type="application/json"):
            self._send(record, status, json.dumps(payload).encode(), content_type, headers)

        def _error(self, record, error: _HttpError):
            headers = {"X-Error-Message": error.message}
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
            self._json(record, {"error": error.message}, error.status, headers)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

        # ------------------------------------------------------------------------------- helpers
        def _body_json(self, record) -> dict:
            try:
                return json.loads(record.body or b"{}")
            except json.JSONDecodeError as error:
                raise _HttpError(400, f"Invalid JSON body: {error}") from error

        def _repo_and_commit(self, params) -> tuple[Repo, Commit]:
            repo = server._repo(_repo_type(params), params["repo"])
            return repo, server._commit(repo, params.get("rev") or "main")

        def _entry(self, path: str, stored: StoredFile) -> dict:
            entry = {"type": "file", "oid": stored.oid, "size": len(stored.data), "path": path}
            if stored.lfs:
                entry["lfs"] = {"oid": stored.sha256, "size": len(stored.data), "pointerSize": 134}
            return entry

        def _folders(self, files: dict) -> set[str]:
            return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}

        def _folder_entry(self, commit: Commit, folder: str) -> dict:
            oid = hashlib.sha1(f"tree {commit.sha} {folder}".encode()).hexdigest()
            return {"type": "directory", "oid": oid, "size": 0, "path": folder}

        # ------------------------------------------------------------------------------- routes
        def _route_whoami(self, record, params):
            self._json(record, {"type": "user", "id": "0" * 24, "name": server.user, "fullname": "Test User",
                                "email": None, "orgs": [], "isPro": False,
                                "auth": {"type": "access_token",
                                         "accessToken": {"displayName": "dummy", "role": "write"}}})

        def _route_validate_yaml(self, record, params):
            self._json(record, {"errors": [], "warnings": []})

        def _route_create(self, record, params):
            body = self._body_json(record)
            repo_type = body.get("type") or "model"
            if repo_type not in REPO_TYPES:
                raise _HttpError(400, f"Invalid repo type {repo_type!r}")
            name = body.get("name")
            if not name:
                raise _HttpError(400, "Missing repo name")
            repo_id = f"{body.get('organization') or server.user}/{name}"
            url = f"{server.endpoint}/{server._url_prefix(repo_type)}{repo_id}"
            if (repo_type, repo_id) in server.repos:
                return self._json(record, {"error": "You already created this model repo", "url": url}, 409)
            private = body.get("visibility") == "private" or bool(body.get("private"))
            server.create_repo(repo_id, repo_type, private)
            self._json(record, {"url": url, "name": repo_id, "id": repo_id})

        def _route_delete(self, record, params):
            body = self._body_json(record)
            repo_id = f"{body.get('organization') or server.user}/{body.get('name')}"
            key = (body.get("type") or "model", repo_id)
            if key not in server.repos:
                raise _not_found("RepoNotFound", f"Repository Not Found: {repo_id}")
            del server.repos[key]
            self._json(record, {})

        def _route_repo_info(self, record, params):
            repo, commit = self._repo_and_commit(params)
            namespace = repo.repo_id.split("/")[0]
            info = {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                    "author": namespace, "sha": commit.sha, "lastModified": _iso(commit.timestamp),
                    "createdAt": _iso(repo.created), "private": repo.private, "disabled": False, "gated": False,
                    "tags": [], "downloads": 0, "likes": 0,
                    "siblings": [{"rfilename": path} for path in sorted(commit.files)]}
            if repo.repo_type == "model":
                info["modelId"] = repo.repo_id
            self._json(record, info)

        def _route_tree(self, record, params):
            repo, commit = self._repo_and_commit(params)
            base = (params.get("path") or "").strip("/")
            recursive = record.query.get("recursive", ["false"])[0].lower() in ("1", "true")
            folders = self._folders(commit.files)
            if base and base not in folders:
                raise _not_found("EntryNotFound", f"{base} does not exist on {params['rev']}")
            prefix = f"{base}/" if base else ""

            def wanted(path):
                return path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])

            entries = [self._folder_entry(commit, f) for f in sorted(folders) if wanted(f)]
            entries += [self._entry(p, f) for p, f in sorted(commit.files.items()) if wanted(p)]
            self._json(record, entries)

        def _route_paths_info(self, record, params):
            repo, commit = self._repo_and_commit(params)
            ctype = self.headers.get("Content-Type", "")
            if "json" in ctype:
                paths = self._body_json(record).get("paths", [])
            else:
                paths = parse_qs(record.body.decode()).get("paths", [])
            folders = self._folders(commit.files)
            out = []
            for path in paths:
                path = path.strip("/")
                if path in commit.files:
                    out.append(self._entry(path, commit.files[path]))
                elif path in folders:
                    out.append(self._folder_entry(commit, path))
            self._json(record, out)

        def _route_refs(self, record, params):
            repo = server._repo(_repo_type(params), params["repo"])
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                        for n, s in repo.branches.items() if not n.startswith("refs/")]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in repo.tags.items()]
            prs = [{"name": n, "ref": n, "targetCommit": s}
                   for n, s in repo.branches.items() if n.startswith("refs/pr/")]
            payload = {"branches": branches, "converts": [], "tags": tags}
            if record.query.get("include_prs", ["0"])[0] in ("1", "true", "True"):
                payload["pullRequests"] = prs
            self._json(record, payload)

        def _route_commits(self, record, params):
            repo, commit = self._repo_and_commit(params)
            self._json(record, [{"id": c.sha, "title": c.summary, "message": c.description,
                                 "authors": [{"user": server.user, "avatar": None}], "date": _iso(c.timestamp)}
                                for c in repo.history(commit.sha)])

        def _route_create_branch(self, record, params):
            repo = server._repo(_repo_type(params), params["repo"])
            body = self._body_json(record)
            branch = params["branch"]
            if branch in repo.branches and not body.get("exist_ok"):
                raise _HttpError(409, f"Reference already exists: refs/heads/{branch}")
            start = server._commit(repo, body.get("startingPoint") or "main")
            repo.branches[branch] = start.sha
            self._json(record, {})

        def _route_delete_branch(self, record, params):
            repo = server._repo(_repo_type(params), params["repo"])
            if params["branch"] not in repo.branches:
                raise _not_found("RevisionNotFound", f"Invalid rev id: {params['branch']}")
            del repo.branches[params["branch"]]
            self._json(record, {})

        def _route_create_tag(self, record, params):
            repo, commit = self._repo_and_commit(params)
            tag = self._body_json(record).get("tag")
            if not tag:
                raise _HttpError(400, "Missing tag")
            if tag in repo.tags:
                raise _HttpError(409, f"Tag {tag} already exists")
            repo.tags[tag] = commit.sha
            self._json(record, {})

        def _route_preupload(self, record, params):
            repo, commit = self._repo_and_commit(params)
            files = []
            for item in self._body_json(record).get("files", []):
                path = item["path"]
                lfs = item.get("size", 0) > 0 and any(fnmatch.fnmatch(path, p) for p in server.lfs_patterns)
                existing = commit.files.get(path)
                oid = None
                if existing is not None:
                    oid = existing.sha256 if lfs else existing.oid
                files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": oid})
            self._json(record, {"files": files, "commitOid": commit.sha})

        def _route_commit(self, record, params):
            repo = server._repo(_repo_type(params), params["repo"])
            revision = params["rev"]
            base = server._commit(repo, revision)
            create_pr = record.query.get("create_pr", ["0"])[0] in ("1", "true", "True")
            if not create_pr and revision not in repo.branches:
                raise _HttpError(400, f"Cannot commit to {revision}: not a branch")
            try:
                lines = record.ndjson()
            except json.JSONDecodeError as error:
                raise _HttpError(400, f"Invalid ndjson: {error}") from error
            if not lines or lines[0].get("key") != "header":
                raise _HttpError(400, "The first ndjson line must be the header")
            header = lines[0]["value"]
            parent = header.get("parentCommit")
            if parent is not None and not create_pr and parent != base.sha:
                raise _HttpError(412, f"A commit has happened since. Please refresh and try again. ({parent})")
            start = server._commit(repo, parent) if parent is not None else base
            files = dict(start.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    raw = value.get("content", "")
                    data = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                    files[path] = StoredFile(data)
                elif key == "lfsFile":
                    data = server.lfs_objects.get(value.get("oid"))
                    if data is None:
                        raise _HttpError(422, f"LFS object {value.get('oid')} for {path} was never uploaded")
                    files[path] = StoredFile(data, lfs=True)
                elif key == "deletedFile":
                    if path not in files:
                        raise _not_found("EntryNotFound", f"A file with this name doesn't exist: {path}")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise _not_found("EntryNotFound", f"A folder with this name doesn't exist: {path}")
                    for p in doomed:
                        del files[p]
                else:
                    raise _HttpError(400, f"Unsupported ndjson key {key!r}")
            commit = server._new_commit(repo, start.sha, header.get("summary", ""), header.get("description", ""),
                                        files)
            prefix = f"{server.endpoint}/{server._url_prefix(repo.repo_type)}{repo.repo_id}"
            payload = {"success": True, "commitOid": commit.sha, "commitUrl": f"{prefix}/commit/{commit.sha}",
                       "hookOutput": ""}
            if create_pr:
                number = 1 + sum(1 for b in repo.branches if b.startswith("refs/pr/"))
                repo.branches[f"refs/pr/{number}"] = commit.sha
                payload["pullRequestUrl"] = f"{prefix}/discussions/{number}"
            else:
                repo.branches[revision] = commit.sha
            self._json(record, payload)

        def _route_resolve(self, record, params):
            repo, commit = self._repo_and_commit(params)
            path = params["path"]
            stored = commit.files.get(path)
            if stored is None:
                raise _not_found("EntryNotFound", f"Entry not found: {path} at {commit.sha}")
            headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{stored.oid}"', "Accept-Ranges": "bytes"}
            if stored.lfs:
                headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(len(stored.data))})
            self._send(record, 200, stored.data, "application/octet-stream", headers)

        def _route_lfs_batch(self, record, params):
            server._repo(_repo_type(params), params["repo"])
            body = self._body_json(record)
            if body.get("operation") != "upload":
                raise _HttpError(400, "Only the upload operation is emulated")
            objects = []
            for obj in body.get("objects", []):
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in server.lfs_objects:
                    entry["authenticated"] = True
                    entry["actions"] = {"upload": {"href": f"{server.endpoint}/_lfs/{obj['oid']}", "header": {}},
                                        "verify": {"href": f"{server.endpoint}/_lfs/verify", "header": {}}}
                objects.append(entry)
            self._json(record, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                       content_type="application/vnd.git-lfs+json")

        def _route_lfs_put(self, record, params):
            if hashlib.sha256(record.body).hexdigest() != params["oid"]:
                raise _HttpError(400, "LFS content does not match its oid")
            server.lfs_objects[params["oid"]] = record.body
            self._send(record, 200)

        def _route_lfs_verify(self, record, params):
            body = self._body_json(record)
            data = server.lfs_objects.get(body.get("oid"))
            if data is None or len(data) != body.get("size"):
                raise _HttpError(404, f"LFS object {body.get('oid')} not found")
            self._json(record, {})

    return Handler


# ------------------------------------------------------------------------------------------------------ the fixture
@dataclass
class Hub:
    """What the `hub` fixture returns."""

    server: HubServer
    env: dict          # environment for client subprocesses
    home: Path         # HF_HOME of those subprocesses

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def run_python(self, code: str, *args: str, cwd=None, env: dict | None = None, timeout: float = 120,
                   check: bool = True) -> subprocess.CompletedProcess:
        """Run `python -c code *args` in the hub environment (stdin closed); fail with its output unless rc 0."""
        proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd,
                              env=env if env is not None else self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"subprocess failed (rc {proc.returncode})\n--- stdout\n{proc.stdout}\n--- stderr\n"
                        f"{proc.stderr}\n--- requests\n{self.server.requests}")
        return proc


def hub_env(endpoint: str, home: str | os.PathLike, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update({
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_TOKEN": "hf_dummy",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "PYTHONUNBUFFERED": "1",
    })
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_MODULES_CACHE", "HF_TOKEN_PATH", "HF_DATASETS_OFFLINE",
                 "HF_XET_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(name, None)
    return env


@contextlib.contextmanager
def running_hub(directory: str | os.PathLike, **server_kwargs):
    """Start an emulator; yield a `Hub` whose subprocess env uses `directory/hf_home` as HF_HOME."""
    server = HubServer(**server_kwargs).start()
    home = Path(directory) / "hf_home"
    home.mkdir(parents=True, exist_ok=True)
    try:
        yield Hub(server, hub_env(server.endpoint, home), home)
    finally:
        server.stop()


@pytest.fixture
def hub(tmp_path):
    """A running emulator plus the environment that points client subprocesses at it (fresh per test)."""
    with running_hub(tmp_path) as running:
        yield running
