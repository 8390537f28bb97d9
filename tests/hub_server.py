"""A small in-memory Hugging Face Hub for tests, speaking the real Hub HTTP protocol.

The real ``huggingface_hub`` client (2.x) talks to it through ``HF_ENDPOINT``; nothing
leaves the loopback interface. Standard library only (PyYAML, if importable, is used to
fill ``cardData`` in repo info from a README's front matter).

What it models:

* users and organisations, authenticated by ``Authorization: Bearer <token>``; an
  unknown token gets 401 everywhere, a user may create or write repos only in their own
  namespace or an organisation they belong to (else 403), private repos answer 404
  (``X-Error-Code: RepoNotFound``) to everybody else;
* repos with branches, ``refs/pr/N`` pull-request refs and full-snapshot commits; like
  the real Hub, a new repo starts with one commit holding ``.gitattributes``;
* uploads: ``preupload`` (``lfs`` for files over 10 MB, binary suffixes or samples with a
  NUL byte, else ``regular``), the Git LFS batch protocol with single-part PUT and verify
  (tests run with ``HF_HUB_DISABLE_XET=1``), and the ndjson ``commit`` endpoint;
* reads: repo info (with ``safetensors`` parameter counts read from the weight files' headers
  and, with ``?blobs=true``, file sizes), tree, paths-info, refs, and ``resolve`` downloads with the ETag,
  ``X-Repo-Commit`` and ``X-Linked-*`` headers and single ``Range`` requests;
* test hooks: ``requests_log`` (method, path without query) and ``fail_next`` for fault
  injection (answered before the request is routed, after its body is read).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

try:  # optional: only used to expose README front matter as cardData
    import yaml
except ImportError:  # pragma: no cover
    yaml = None

LFS_THRESHOLD = 10 * 1024 * 1024
BINARY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack",
                   ".npy", ".npz", ".pkl", ".parquet", ".arrow", ".zip", ".gz", ".tar", ".zst", ".png", ".jpg")
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
GITATTRIBUTES = b"".join(
    f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n".encode() for suffix in BINARY_SUFFIXES
)
NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")
INVALID_TOKEN = "Invalid credentials in Authorization header"


def git_sha1(data: bytes) -> str:
    """The git blob id of ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Blob:
    """One file version. ``oid`` is the git blob id (of the pointer file for LFS blobs)."""

    data: bytes
    lfs: bool
    last_commit: str
    sha256: str
    oid: str

    @classmethod
    def make(cls, data: bytes, lfs: bool, commit: str) -> Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        return cls(data, lfs, commit, sha256, git_sha1(_lfs_pointer(sha256, len(data)) if lfs else data))

    @property
    def pointer(self) -> bytes:
        return _lfs_pointer(self.sha256, len(self.data))


@dataclass
class Commit:
    oid: str
    title: str
    date: str
    parents: list[str]
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str = field(default_factory=_now)
    refs: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1", ... -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    next_discussion: int = 1

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit | None:
        oid = self.refs.get(revision, revision)
        return self.commits.get(oid)


class HubError(Exception):
    """Raised by route handlers; becomes a JSON error response."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


@dataclass
class Request:
    method: str
    segments: list[str]  # path segments, each percent-decoded
    query: dict[str, list[str]]
    headers: Any  # email.message.Message: case-insensitive .get()
    body: bytes
    user: str | None

    def param(self, name: str) -> str | None:
        return self.query.get(name, [None])[0]

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_json(cls, payload: Any, status: int = 200, content_type: str = "application/json") -> Response:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": content_type})


class HubServer:
    """In-memory Hub on ``127.0.0.1``; see the module docstring. Use as a context manager."""

    def __init__(self, port: int = 0, tokens: dict[str, str] | None = None,
                 orgs: dict[str, list[str]] | None = None) -> None:
        self.port = port
        self.tokens = dict(tokens or {})
        self.orgs = {name: list(members) for name, members in (orgs or {}).items()}
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests_log: list[tuple[str, str]] = []
        self.errors: list[str] = []  # tracebacks of server bugs (answered with 500)
        self._faults: list[list[Any]] = []  # [remaining, status, path_contains]
        self._tickets: dict[str, tuple[tuple[str, str], str, int]] = {}  # LFS upload ticket -> (repo, oid, size)
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False
        httpd.hub = self  # type: ignore[attr-defined]
        self._httpd, self.port = httpd, httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, name="hub-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- test helpers
    def reset(self) -> None:
        """Forget all repos, logged requests, pending faults and upload tickets."""
        with self._lock:
            self.repos.clear()
            self.requests_log.clear()
            self.errors.clear()
            self._faults.clear()
            self._tickets.clear()

    def fail_next(self, count: int, status: int = 500, path_contains: str = "") -> None:
        """Answer the next ``count`` requests whose path contains ``path_contains`` with ``status``."""
        with self._lock:
            self._faults.append([count, status, path_contains])

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Content of every file of a repo at a branch, PR ref or commit id."""
        commit = self.repo(repo_id, repo_type).resolve(revision)
        if commit is None:
            raise KeyError(revision)
        return {path: blob.data for path, blob in commit.files.items()}

    def seed(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model", private: bool = False) -> str:
        """Create (or update) a repo directly, bypassing HTTP; returns the new commit id."""
        with self._lock:
            repo = self.repos.get((repo_type, repo_id)) or self._new_repo(repo_type, repo_id, private)
            head = repo.commits[repo.refs["main"]]
            oid = secrets.token_hex(20)
            blobs = dict(head.files)
            for path, data in files.items():
                lfs = len(data) > LFS_THRESHOLD or path.endswith(BINARY_SUFFIXES)
                blobs[path] = Blob.make(data, lfs, oid)
                if lfs:
                    repo.lfs_objects[blobs[path].sha256] = data
            repo.commits[oid] = Commit(oid, "Seed files", _now(), [head.oid], blobs)
            repo.refs["main"] = oid
            return oid

    # ----------------------------------------------------------------- HTTP entry point
    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> Response:
        split = urlsplit(raw_path)
        path = split.path
        with self._lock:
            self.requests_log.append((method, path))
            for fault in self._faults:
                if fault[0] > 0 and fault[2] in path:
                    fault[0] -= 1
                    return _error(HubError(fault[1], f"Injected fault ({fault[1]})"))
            try:
                user = self._authenticate(path, headers.get("Authorization"))
                segments = [unquote(s) for s in path.strip("/").split("/")]
                request = Request(method, segments, parse_qs(split.query), headers, body, user)
                return self._route(request)
            except HubError as err:
                return _error(err)
            except Exception:  # noqa: BLE001 - a server bug must reach the client as a 500
                self.errors.append(traceback.format_exc())
                return _error(HubError(500, "Internal test server error"))

    def _authenticate(self, path: str, authorization: str | None) -> str | None:
        if path.startswith("/_lfs/") or not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, INVALID_TOKEN)
        return self.tokens[token]

    def _route(self, req: Request) -> Response:
        seg, method = req.segments, req.method
        if seg[0] == "_lfs" and len(seg) == 3:
            return self._lfs_transfer(req, seg[1], seg[2])
        if seg[0] == "api":
            if seg[1:] == ["whoami-v2"] and method == "GET":
                return self._whoami(req)
            if seg[1:] == ["validate-yaml"] and method == "POST":
                return self._validate_yaml(req)
            if seg[1:] == ["repos", "create"] and method == "POST":
                return self._create_repo(req)
            if seg[1] in TYPES and len(seg) >= 4:
                return self._repo_api(req, TYPES[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:])
        repo_type, rest = ("model", seg)
        if seg[0] in TYPES and seg[0] != "models":
            repo_type, rest = TYPES[seg[0]], seg[1:]
        if len(rest) == 6 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(req, repo_type, f"{rest[0]}/{rest[1][:-4]}")
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(req, repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]))
        raise HubError(404, f"Not found: {method} /{'/'.join(seg)}")

    def _repo_api(self, req: Request, repo_type: str, repo_id: str, rest: list[str]) -> Response:
        action, method = (rest[0] if rest else ""), req.method
        if not rest and method == "GET":
            return self._info(req, repo_type, repo_id, "main")
        if action == "revision" and len(rest) == 2 and method == "GET":
            return self._info(req, repo_type, repo_id, rest[1])
        if action == "tree" and len(rest) >= 2 and method == "GET":
            return self._tree(req, repo_type, repo_id, rest[1], "/".join(rest[2:]))
        if action == "paths-info" and len(rest) == 2 and method == "POST":
            return self._paths_info(req, repo_type, repo_id, rest[1])
        if action == "preupload" and len(rest) == 2 and method == "POST":
            return self._preupload(req, repo_type, repo_id, rest[1])
        if action == "commit" and len(rest) == 2 and method == "POST":
            return self._commit(req, repo_type, repo_id, rest[1])
        if action == "branch" and len(rest) == 2 and method == "POST":
            return self._branch(req, repo_type, repo_id, rest[1])
        if action == "refs" and len(rest) == 1 and method == "GET":
            return self._refs(req, repo_type, repo_id)
        raise HubError(404, f"Not found: {method} {action}")

    # ----------------------------------------------------------------- permissions
    def _can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.orgs.get(namespace, ()))

    def _get_repo(self, req: Request, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._can_write(req.user, repo.namespace)):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and not self._can_write(req.user, repo.namespace):
            if req.user is None:
                raise HubError(401, "You must be authenticated to write to this repo")
            raise HubError(403, f"You don't have the rights to write to {repo_type}s/{repo_id}")
        return repo

    def _get_commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ----------------------------------------------------------------- account and repos
    def _whoami(self, req: Request) -> Response:
        if req.user is None:
            raise HubError(401, INVALID_TOKEN)
        orgs = [{"type": "org", "name": org, "fullname": org, "roleInOrg": "write"}
                for org, members in self.orgs.items() if req.user in members]
        return Response.of_json({
            "type": "user", "id": git_sha1(req.user.encode())[:24], "name": req.user,
            "fullname": req.user.title(), "email": f"{req.user}@example.test", "emailVerified": True,
            "avatarUrl": "", "isPro": False, "canPay": False, "orgs": orgs,
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
        })

    def _validate_yaml(self, req: Request) -> Response:
        try:
            _front_matter(str(req.json().get("content", "")))
        except (ValueError, TypeError) as err:
            return Response.of_json({"errors": [{"message": str(err)}], "warnings": []}, 400)
        return Response.of_json({"errors": [], "warnings": []})

    def _new_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type, repo_id, private)
        oid = secrets.token_hex(20)
        repo.commits[oid] = Commit(oid, "initial commit", repo.created_at, [],
                                   {".gitattributes": Blob.make(GITATTRIBUTES, False, oid)})
        repo.refs["main"] = oid
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def _create_repo(self, req: Request) -> Response:
        body = req.json()
        if req.user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace, name = body.get("organization") or req.user, str(body.get("name", ""))
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX or not NAME_RE.match(name):
            raise HubError(400, f"Invalid repo type or name: {repo_type} {name!r}")
        if not self._can_write(req.user, namespace):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace}")
        repo_id = f"{namespace}/{name}"
        existing = self.repos.get((repo_type, repo_id))
        if existing is not None:
            raise HubError(409, f"You already created this {repo_type} repo", url=self._repo_url(existing))
        private = body.get("visibility", "private" if body.get("private") else "public") != "public"
        repo = self._new_repo(repo_type, repo_id, private)
        return Response.of_json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _info(self, req: Request, repo_type: str, repo_id: str, revision: str) -> Response:
        repo = self._get_repo(req, repo_type, repo_id)
        commit = self._get_commit(repo, revision)
        with_blobs = _truthy(req.param("blobs"))
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(blob.data), blobId=blob.oid)
                if blob.lfs:
                    sibling["lfs"] = {"size": len(blob.data), "sha256": blob.sha256, "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": git_sha1(repo_id.encode())[:24], "id": repo_id, "author": repo.namespace, "sha": commit.oid,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "createdAt": repo.created_at, "lastModified": commit.date, "siblings": siblings,
        }
        if repo_type == "model":
            info["modelId"] = repo_id
            counts = _safetensors_parameters(commit.files)
            if counts:  # like the Hub: parameter counts per dtype, read from the safetensors headers
                info["safetensors"] = {"parameters": counts, "total": sum(counts.values())}
        readme = commit.files.get("README.md")
        try:
            card = _front_matter(readme.data.decode(errors="replace")) if readme else None
        except (ValueError, TypeError):
            card = None
        if card:
            info["cardData"] = card
        return Response.of_json(info)

    def _refs(self, req: Request, repo_type: str, repo_id: str) -> Response:
        repo = self._get_repo(req, repo_type, repo_id)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o}
                    for n, o in repo.refs.items() if not n.startswith("refs/")]
        prs = [{"name": n, "ref": n, "targetCommit": o} for n, o in repo.refs.items() if n.startswith("refs/pr/")]
        payload: dict[str, Any] = {"branches": branches, "tags": [], "converts": []}
        if _truthy(req.param("include_prs")):
            payload["pullRequests"] = prs
        return Response.of_json(payload)

    def _branch(self, req: Request, repo_type: str, repo_id: str, branch: str) -> Response:
        repo = self._get_repo(req, repo_type, repo_id, write=True)
        if branch in repo.refs:
            raise HubError(409, "Reference already exists")
        repo.refs[branch] = self._get_commit(repo, req.json().get("startingPoint") or "main").oid
        return Response.of_json({})

    # ----------------------------------------------------------------- listing
    def _entry(self, repo: Repo, path: str, blob: Blob | None, expand: bool) -> dict[str, Any]:
        if blob is None:
            return {"type": "directory", "oid": git_sha1(path.encode()), "size": 0, "path": path}
        entry: dict[str, Any] = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
        if expand:
            commit = repo.commits[blob.last_commit]
            entry["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": commit.date}
        return entry

    def _tree(self, req: Request, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
        repo = self._get_repo(req, repo_type, repo_id)
        files = self._get_commit(repo, revision).files
        recursive, expand = _truthy(req.param("recursive")), _truthy(req.param("expand"))
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        below = sorted(p for p in files if p.startswith(prefix))
        if prefix and not below:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        folders: dict[str, None] = {}
        listed: list[str] = []
        for file_path in below:
            parts = file_path[len(prefix):].split("/")
            if recursive:
                folders.update({prefix + "/".join(parts[:i]): None for i in range(1, len(parts))})
                listed.append(file_path)
            elif len(parts) > 1:
                folders[prefix + parts[0]] = None
            else:
                listed.append(file_path)
        entries = [self._entry(repo, folder, None, expand) for folder in folders]
        entries += [self._entry(repo, p, files[p], expand) for p in listed]
        return Response.of_json(entries)

    def _paths_info(self, req: Request, repo_type: str, repo_id: str, revision: str) -> Response:
        repo = self._get_repo(req, repo_type, repo_id)
        files = self._get_commit(repo, revision).files
        if "json" in (req.headers.get("Content-Type") or ""):
            form = {k: v if isinstance(v, list) else [str(v)] for k, v in req.json().items()}
        else:
            form = parse_qs(req.body.decode())
        expand = _truthy(form.get("expand", [""])[0])
        entries = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in files:
                entries.append(self._entry(repo, path, files[path], expand))
            elif any(p.startswith(path + "/") for p in files):
                entries.append(self._entry(repo, path, None, expand))
        return Response.of_json(entries)

    # ----------------------------------------------------------------- upload
    def _preupload(self, req: Request, repo_type: str, repo_id: str, revision: str) -> Response:
        repo = self._get_repo(req, repo_type, repo_id, write=True)
        files = self._get_commit(repo, revision).files
        answers = []
        for item in req.json().get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = size > LFS_THRESHOLD or path.lower().endswith(BINARY_SUFFIXES) or b"\0" in sample
            existing = files.get(path)
            oid = None if existing is None else (existing.sha256 if lfs else git_sha1(existing.data))
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return Response.of_json({"files": answers})

    def _lfs_batch(self, req: Request, repo_type: str, repo_id: str) -> Response:
        repo = self._get_repo(req, repo_type, repo_id, write=True)
        body = req.json()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS operation is supported by the test server")
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs_objects:
                ticket = secrets.token_hex(16)
                self._tickets[ticket] = ((repo_type, repo_id), oid, size)
                answer["actions"] = {"upload": {"href": f"{self.url}/_lfs/{ticket}/upload"},
                                     "verify": {"href": f"{self.url}/_lfs/{ticket}/verify"}}
            objects.append(answer)
        payload = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        return Response.of_json(payload, content_type="application/vnd.git-lfs+json")

    def _lfs_transfer(self, req: Request, ticket: str, action: str) -> Response:
        if ticket not in self._tickets:
            raise HubError(403, "Unknown or expired LFS upload ticket")
        key, oid, size = self._tickets[ticket]
        repo = self.repos.get(key)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if action == "upload" and req.method == "PUT":
            if len(req.body) != size or hashlib.sha256(req.body).hexdigest() != oid:
                raise HubError(400, "Uploaded content does not match the announced oid and size")
            repo.lfs_objects[oid] = req.body
            return Response(200, b"", {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'})
        if action == "verify" and req.method == "POST":
            body = req.json()
            stored = repo.lfs_objects.get(body.get("oid", ""))
            if stored is None or len(stored) != body.get("size"):
                raise HubError(404, f"LFS object {oid} was not uploaded")
            return Response.of_json({"success": True})
        raise HubError(405, f"Unsupported LFS transfer {req.method} {action}")

    def _commit(self, req: Request, repo_type: str, repo_id: str, revision: str) -> Response:
        repo = self._get_repo(req, repo_type, repo_id, write=True)
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        create_pr = _truthy(req.param("create_pr"))
        if create_pr:
            base, target = self._get_commit(repo, parent or revision), f"refs/pr/{repo.next_discussion}"
        else:
            if revision not in repo.refs:
                raise HubError(404, f"Invalid rev id: {revision} is not a branch", "RevisionNotFound")
            base, target = repo.commits[repo.refs[revision]], revision
            if parent and not base.oid.startswith(parent):
                raise HubError(412, f"Parent commit {parent} is not the head of {revision}")
        oid = hashlib.sha1(secrets.token_bytes(16)).hexdigest()
        files = dict(base.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = str(value.get("path", "")).strip("/")
            if key == "file":
                raw = value.get("content", "")
                data = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                files[path] = Blob.make(data, False, oid)
            elif key == "lfsFile":
                data = repo.lfs_objects.get(value.get("oid", ""))
                if data is None:
                    raise HubError(400, f"LFS object {value.get('oid')} for {path} was never uploaded")
                files[path] = Blob.make(data, True, oid)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}")
        repo.commits[oid] = Commit(oid, str(header.get("summary", "")), _now(), [base.oid], files)
        repo.refs[target] = oid
        if create_pr:
            repo.next_discussion += 1
        payload = {"success": True, "commitOid": oid, "commitUrl": f"{self._repo_url(repo)}/commit/{oid}",
                   "pullRequestUrl": None}
        if create_pr:
            payload["pullRequestUrl"] = f"{self._repo_url(repo)}/discussions/{target.rsplit('/', 1)[1]}"
        return Response.of_json(payload)

    # ----------------------------------------------------------------- download
    def _resolve(self, req: Request, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
        repo = self._get_repo(req, repo_type, repo_id)
        commit = self._get_commit(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", **{"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.sha256 if blob.lfs else blob.oid}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        data, status = blob.data, 200
        match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", req.headers.get("Range") or "")
        if match and (match.group(1) or match.group(2)):
            total = len(data)
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), total - 1) if match.group(2) else total - 1
            else:
                start, end = max(total - int(match.group(2)), 0), total - 1
            if start >= total or start > end:
                return Response(416, b"", {**headers, "Content-Range": f"bytes */{total}"})
            data, status = data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        return Response(status, data, headers)


def _safetensors_parameters(files: dict[str, Blob]) -> dict[str, int]:
    """Parameters per dtype over every ``*.safetensors`` file, from their JSON headers."""
    counts: dict[str, int] = {}
    for path, blob in files.items():
        if not path.endswith(".safetensors") or len(blob.data) < 8:
            continue
        size = int.from_bytes(blob.data[:8], "little")
        try:
            header = json.loads(blob.data[8:8 + size])
        except ValueError:
            continue
        for name, tensor in header.items():
            if name == "__metadata__" or not isinstance(tensor, dict):
                continue
            numel = 1
            for dim in tensor.get("shape", []):
                numel *= int(dim)
            counts[tensor.get("dtype", "F32")] = counts.get(tensor.get("dtype", "F32"), 0) + numel
    return counts


def _front_matter(content: str) -> dict[str, Any] | None:
    """The YAML metadata block of a README (None without one or without PyYAML); raises if malformed."""
    if not content.startswith("---"):
        return None
    match = re.match(r"^---\s*\n(.*?)\n?---\s*(\n|$)", content, re.DOTALL)
    if match is None:
        raise ValueError("README.md metadata block is not closed by '---'")
    if yaml is None:
        return None
    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"Invalid YAML in README.md metadata: {err}") from err
    if not isinstance(data, dict):
        raise TypeError("README.md metadata must be a YAML mapping")
    return data


def _error(err: HubError) -> Response:
    response = Response.of_json({"error": err.message, **{k: v for k, v in err.extra.items() if k == "url"}},
                                err.status)
    response.headers["X-Error-Message"] = err.message.encode("ascii", "replace").decode()
    if err.code:
        response.headers["X-Error-Code"] = err.code
    response.headers.update({k: v for k, v in err.extra.items() if k.startswith("X-")})
    return response


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        body = self._read_body()
        response = self.server.hub.handle(self.command, self.path, self.headers, body)  # type: ignore[attr-defined]
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log lines."""
