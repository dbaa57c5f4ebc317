"""A tiny in-memory Hugging Face Hub, for testing push and pull without a network.

It speaks just enough of the Hub HTTP protocol for ``huggingface_hub`` 2.4 and ``transformers`` 5.24:
``create_repo``/``delete_repo``, ``create_commit`` (so ``push_to_hub``/``upload_folder``), ``create_branch``,
``repo_info``, ``list_repo_files``/``list_repo_tree``, ``get_paths_info``, ``list_repo_refs``,
``list_repo_commits``, ``hf_hub_download``/``snapshot_download`` and therefore ``from_pretrained``
(including ``trust_remote_code`` code download).

Design choices (and why):

* stdlib only (``http.server``), so tests need no extra dependency;
* every commit stores a full snapshot ``{path: bytes}`` under a fresh 40-hex sha and branches are just names
  pointing at shas, so ``revision=<sha>`` and ``revision="main"`` resolve like on the real Hub;
* ``preupload`` answers ``"regular"`` for every file, so clients never try LFS or Xet and file bytes arrive
  base64-encoded inside the NDJSON commit body (fine for tiny test models);
* file ETags are git blob sha1s, as on the Hub, so clients can skip unchanged files and the cache layout
  (``blobs/<etag>``) looks real.

Clients read ``HF_ENDPOINT`` when ``huggingface_hub`` is imported, so point them at :attr:`FakeHub.endpoint`
from a subprocess (see ``tests/hub_utils.py``) or before the first import.

Usage::

    with FakeHub() as hub:            # or hub = FakeHub().start(); ...; hub.stop()
        print(hub.endpoint)           # http://127.0.0.1:<port>
        ...
        print(hub.log)                # [(method, path, status), ...] for debugging

or from a shell: ``python tests/fake_hub.py --port 8765``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_USER = "fake-user"  # namespace for repo ids given without one, and the whoami answer
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha(data: bytes) -> str:
    """Git's blob id, which the Hub uses as ETag/oid of regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    files: dict[str, bytes]  # full snapshot of the repo at this commit
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid
    created_at: str = field(default_factory=_now)

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit sha -> commit (None if unknown)."""
        oid = self.branches.get(revision, revision if _SHA_RE.match(revision) else None)
        return self.commits.get(oid) if oid else None

    def add_commit(self, branch: str, title: str, message: str, files: dict[str, bytes]) -> Commit:
        parent = self.branches.get(branch)
        # Any unique 40-hex string is a valid "sha" for clients; mixing in the counter keeps identical
        # trees committed twice distinct, like real git commits with different timestamps.
        seed = f"{self.repo_id}|{parent}|{len(self.commits)}|{title}|" + "|".join(
            f"{p}:{git_blob_sha(d)}" for p, d in sorted(files.items())
        )
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, files)
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit


class HubError(Exception):
    """Raised inside handlers; becomes an HTTP error with the Hub's ``X-Error-Code`` header."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None, **extra: str):
        super().__init__(message)
        self.status, self.code, self.commit, self.extra = status, code, commit, extra


class FakeHub:
    """An in-memory Hub served on ``127.0.0.1`` from a daemon thread. See the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, user: str = DEFAULT_USER):
        self.host, self.port, self.user = host, port, user
        self.repos: dict[tuple[str, str], Repo] = {}  # (repo_type, repo_id) -> Repo
        self.log: list[tuple[str, str, int]] = []  # (method, path, status), for debugging failed tests
        self.lock = threading.RLock()  # one lock for all state: requests are tiny, contention is irrelevant
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state helpers -------------------------------------------------------------------------------------
    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def get_commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps httpx's pooled connections alive; every response below therefore sets Content-Length.
    protocol_version = "HTTP/1.1"
    fake_hub: FakeHub  # set on the per-server subclass

    def log_message(self, format: str, *args: object) -> None:  # silence stderr; use FakeHub.log instead
        pass

    # -- plumbing ------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, ctype: str = "application/json"
    ) -> None:
        """Send a response; for HEAD the headers (Content-Length included) describe ``body`` but it is not sent."""
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.fake_hub.log.append((self.command, self.path, status))

    def _json(self, obj: object, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode())

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        # Split before unquoting so that a quoted revision like "refs%2Fpr%2F1" stays one segment.
        parts = [unquote(p) for p in url.path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        try:
            with self.fake_hub.lock:
                self._route(parts, query, body)
        except HubError as e:
            headers = {"X-Error-Message": str(e)}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:  # lets clients cache "file does not exist at this commit" (.no_exist/)
                headers["X-Repo-Commit"] = e.commit
            self._send(e.status, json.dumps({"error": str(e), **e.extra}).encode(), headers)
        except Exception as e:  # a bug in the fake: answer 500 (clients then raise) instead of hanging them
            message = f"fake hub crashed: {e!r}"
            self._send(500, json.dumps({"error": message}).encode(), {"X-Error-Message": message})
            raise

    do_GET = do_HEAD = do_POST = do_DELETE = _dispatch

    # -- routing -------------------------------------------------------------------------------------------
    def _route(self, parts: list[str], query: dict[str, str], body: bytes) -> None:
        hub, method = self.fake_hub, self.command
        if parts[:2] == ["api", "whoami-v2"]:
            return self._json(
                {"type": "user", "name": hub.user, "orgs": [], "auth": {"accessToken": {"role": "write"}}}
            )
        if parts[:2] == ["api", "validate-yaml"]:  # called whenever a README.md is committed
            return self._json({"errors": [], "warnings": []})
        if parts[:2] == ["api", "repos"] and method in ("POST", "DELETE") and len(parts) == 3:
            return self._repos_create_or_delete(parts[2], json.loads(body or b"{}"))
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in ("models", "datasets", "spaces"):
            repo = hub.get_repo(parts[1][:-1], f"{parts[2]}/{parts[3]}")
            return self._api(repo, parts[4:], query, body)
        # File download: /{ns}/{name}/resolve/{rev}/{path}, prefixed with "datasets"/"spaces" for those types.
        repo_type = "model"
        if parts and parts[0] in ("datasets", "spaces"):
            repo_type, parts = parts[0][:-1], parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo = hub.get_repo(repo_type, f"{parts[0]}/{parts[1]}")
            return self._resolve(repo, revision=parts[3], path="/".join(parts[4:]))
        raise HubError(404, f"fake hub: no route for {method} {self.path}")

    def _repos_create_or_delete(self, action: str, payload: dict) -> None:
        hub = self.fake_hub
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
        key = (repo_type, repo_id)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{hub.endpoint}/{prefix}{repo_id}"
        if action == "create":
            if key in hub.repos:  # create_repo(exist_ok=True) still reads "url" from this 409 body
                raise HubError(409, "You already created this repo", url=url)
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = hub.repos[key] = Repo(repo_id, repo_type, private)
            # Like the Hub: a new repo starts with one commit holding a .gitattributes file.
            gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            repo.add_commit("main", "initial commit", "", {".gitattributes": gitattributes})
            return self._json({"url": url, "name": repo_id})
        if action == "delete":
            hub.get_repo(repo_type, repo_id)
            del hub.repos[key]
            return self._send(200)
        raise HubError(404, f"unknown repos action {action}")

    def _api(self, repo: Repo, rest: list[str], query: dict[str, str], body: bytes) -> None:
        method, op = self.command, (rest[0] if rest else "")
        if method == "GET" and op in ("", "revision"):  # repo_info
            return self._json(self._info(repo, rest[1] if op else "main"))
        if method == "GET" and op == "tree":
            commit = self.fake_hub.get_commit(repo, rest[1])
            recursive = query.get("recursive") in ("True", "true", "1")
            return self._json(self._tree(commit, "/".join(rest[2:]), recursive))
        if method == "POST" and op == "paths-info":
            commit = self.fake_hub.get_commit(repo, rest[1])
            # huggingface_hub posts this one form-encoded (paths=a&paths=b), not as JSON.
            paths = set(parse_qs(body.decode()).get("paths", []))
            return self._json([e for e in self._tree(commit, "", True) if e["path"] in paths])
        if method == "GET" and op == "refs":
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()]
            return self._json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        if method == "GET" and op == "commits":
            commit, history = self.fake_hub.get_commit(repo, rest[1]), []
            while commit is not None:  # newest first, following first parents
                history.append({
                    "id": commit.oid, "title": commit.title, "message": commit.message, "date": commit.date,
                    "authors": [{"user": self.fake_hub.user}],
                })
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return self._json(history)
        if method == "POST" and op == "preupload":
            commit = repo.resolve(rest[1])
            old = commit.files if commit else {}
            files = json.loads(body)["files"]
            # "oid" lets the client drop files whose content is unchanged from the commit.
            return self._json({"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_sha(old[f["path"]]) if f["path"] in old else None}
                for f in files
            ]})
        if method == "POST" and op == "commit":
            return self._commit(repo, rest[1], body, query)
        if op == "branch" and len(rest) == 2:
            return self._branch(repo, rest[1], json.loads(body or b"{}"))
        raise HubError(404, f"fake hub: no API route for {method} {self.path}")

    # -- endpoints -----------------------------------------------------------------------------------------
    def _info(self, repo: Repo, revision: str) -> dict:
        commit = self.fake_hub.get_commit(repo, revision)
        return {
            "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.oid, "private": repo.private,
            "lastModified": commit.date, "createdAt": repo.created_at, "tags": [], "downloads": 0, "likes": 0,
            "siblings": [{"rfilename": p, "size": len(d)} for p, d in sorted(commit.files.items())],
        }

    @staticmethod
    def _tree(commit: Commit, path: str, recursive: bool) -> list[dict]:
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries: dict[str, dict] = {}
        for p, data in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            sub = p[len(prefix):].split("/")
            # Directories are entries of their own; a non-recursive listing shows only the first level.
            for depth in range(1, len(sub)) if recursive else range(1, min(len(sub), 2)):
                d = prefix + "/".join(sub[:depth])
                tree_oid = hashlib.sha1(d.encode()).hexdigest()  # any stable 40-hex id will do
                entries.setdefault(d, {"type": "directory", "path": d, "oid": tree_oid, "size": 0})
            if recursive or len(sub) == 1:
                entries[p] = {"type": "file", "path": p, "oid": git_blob_sha(data), "size": len(data)}
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        return list(entries.values())

    def _commit(self, repo: Repo, branch: str, body: bytes, query: dict[str, str]) -> None:
        if query.get("create_pr"):
            raise HubError(501, "fake hub: create_pr is not supported")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch} (commits must target a branch)", "RevisionNotFound")
        files = dict(repo.commits[repo.branches[branch]].files)
        header: dict = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:  # lfsFile / copies: never requested, since preupload says "regular" for everything
                raise HubError(400, f"fake hub: unsupported commit operation {key!r}")
        parent = header.get("parentCommit")
        if parent and parent != repo.branches[branch]:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = repo.add_commit(branch, header.get("summary") or "update", header.get("description") or "", files)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        url = f"{self.fake_hub.endpoint}/{prefix}{repo.repo_id}/commit/{commit.oid}"
        self._json({"commitUrl": url, "commitOid": commit.oid, "pullRequestUrl": None})

    def _branch(self, repo: Repo, branch: str, payload: dict) -> None:
        if self.command == "DELETE":
            if repo.branches.pop(branch, None) is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            return self._send(200)
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        repo.branches[branch] = self.fake_hub.get_commit(repo, payload.get("startingPoint") or "main").oid
        return self._send(200)

    def _resolve(self, repo: Repo, revision: str, path: str) -> None:
        commit = self.fake_hub.get_commit(repo, revision)
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=commit.oid)
        headers = {"ETag": f'"{git_blob_sha(data)}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        status, rng = 200, re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range") or "")
        if rng and self.command == "GET":  # resumed download of an .incomplete file
            start, end = int(rng[1]), int(rng[2]) if rng[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            status, data = 206, data[start : end + 1]
        self._send(status, data, headers, ctype="application/octet-stream")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the in-memory fake Hugging Face Hub.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    with FakeHub(args.host, args.port) as hub:
        print(f"Fake Hub at {hub.endpoint}; use: export HF_ENDPOINT={hub.endpoint} HF_TOKEN=dummy", flush=True)
        print("Ctrl-C to stop.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
