"""A loopback stand-in for the Hugging Face Hub, for the download tests; it never listens beyond 127.0.0.1.

It answers exactly what `ovi.download` makes huggingface_hub 2.4.0 ask (read from its sources):

- `GET /api/models/<repo>[/revision/<rev>]?blobs=True` (`HfApi.model_info(files_metadata=True)`): the commit `sha`
  and `siblings` with `size`, `blobId`, `lfs`.
- `HEAD /<repo>/resolve/<rev>/<path>` (`get_hf_file_metadata`): `X-Repo-Commit`, `ETag`, `Content-Length`. Files of
  `LFS_MIN_SIZE` bytes or more answer like LFS/Xet files on the real hub: 302 to a second loopback server standing in
  for the CDN, with `X-Linked-Etag` (sha256) and `X-Linked-Size`; the client reads those and does not follow it.
- `GET` of a small file's resolve url, or of `<cdn>/repos/<repo>/<sha256>?<signature>`: the bytes, with
  `Range: bytes=N-` answered 206 + `Content-Range`, or 416 past the end.

Faults, each keyed by "repo/path": `drop_after[key] = n` cuts the connection after n body bytes of the next GET of
that file (once); `fail_next[key] = k` answers 503 to its next k GETs after that; `size_offset[key] = d` makes the
listing and the HEAD announce d bytes more than what is served; a key in `no_range` gets whole-file 200 answers to
Range requests, as from a proxy that drops the header. Every request is recorded in `hits`.

The servers stop at `stop()` (or leaving the `with` block), and by themselves after `lifetime_s` at the latest.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_MIN_SIZE = 64
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class HubFile:
    data: bytes

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def blob_id(self) -> str:  # git's object id, what the hub sends as the ETag of a non-LFS file
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def lfs(self) -> bool:
        return len(self.data) >= LFS_MIN_SIZE


@dataclass(frozen=True)
class Hit:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    kind: str  # "api", "head" (file metadata), "get" (file bytes, or the redirect to them), "other"
    key: str | None  # "repo/path" of the file concerned
    range: str | None
    auth: bool
    status: int


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], *, lifetime_s: float = 120.0):
        self.repos = {repo: {path: HubFile(bytes(d)) for path, d in files.items()} for repo, files in repos.items()}
        self.commits = {repo: hashlib.sha1(f"commit of {repo}".encode()).hexdigest() for repo in repos}
        self.hits: list[Hit] = []
        self.drop_after: dict[str, int] = {}
        self.fail_next: dict[str, int] = {}
        self.size_offset: dict[str, int] = {}
        self.no_range: set[str] = set()
        self.lifetime_s = lifetime_s
        self._lock = threading.Lock()
        self._servers: dict[str, tuple[ThreadingHTTPServer, threading.Thread]] = {}
        self._timer: threading.Timer | None = None

    # lifecycle
    def start(self) -> "FakeHub":
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer((LOOPBACK, 0), _handler_for(self, role))
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._servers[role] = (server, thread)
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        with self._lock:
            servers, self._servers = list(self._servers.values()), {}
            timer, self._timer = self._timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.hits.clear()
            self.drop_after.clear()
            self.fail_next.clear()
            self.size_offset.clear()
            self.no_range.clear()

    # addresses and what happened
    def _url(self, role: str) -> str:
        server, _ = self._servers[role]
        return f"http://{LOOPBACK}:{server.server_address[1]}"

    @property
    def url(self) -> str:
        return self._url("hub")

    @property
    def cdn_url(self) -> str:
        return self._url("cdn")

    def gets(self, key: str | None = None) -> list[Hit]:
        """Requests for file bytes (redirects to them included), of one file or of all."""
        with self._lock:
            return [h for h in self.hits if h.kind == "get" and (key is None or h.key == key)]

    def reported_size(self, key: str, f: HubFile) -> int:
        return len(f.data) + self.size_offset.get(key, 0)

    def _record(self, hit: Hit) -> None:
        with self._lock:
            self.hits.append(hit)

    def _take_fault(self, key: str) -> tuple[bool, int | None]:
        with self._lock:
            if key in self.drop_after:  # a pending cut comes first, then the 503s
                return False, self.drop_after.pop(key)
            if self.fail_next.get(key, 0) > 0:
                self.fail_next[key] -= 1
                return True, None
            return False, None


_RANGE = re.compile(r"\s*bytes\s*=\s*(\d+)\s*-\s*(\d*)\s*")


def _handler_for(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real hub; every response carries its length
        timeout = 10  # an idle kept-alive connection ends its thread after this

        def setup(self) -> None:
            super().setup()
            # headers and body go out in separate writes: without this, Nagle + delayed ACK stall each response
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

        # plumbing
        def _reply(self, status: int, headers: dict[str, str], body: bytes = b"", *, head: bool = False,
                   cut: int | None = None) -> None:
            self.send_response(status)
            headers = {"Content-Length": str(len(body)), **headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if head:
                return
            if cut is not None and cut < len(body):
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the body end early
                self.close_connection = True
                return
            self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, head: bool, extra: dict | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
            self._reply(status, {**headers, **(extra or {})}, body, head=head)

        def _hit(self, kind: str, key: str | None, status: int) -> None:
            auth = bool(self.headers.get("authorization"))
            hub._record(Hit(role, self.command, self.path, kind, key, self.headers.get("Range"), auth, status))

        # routing
        def _route(self, head: bool) -> None:
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            if role == "cdn":
                return self._cdn(path, head)
            if path.startswith("/api/models/"):
                return self._model_info(path[len("/api/models/"):], parse_qs(parts.query), head)
            if "/resolve/" in path:
                return self._resolve(path, head)
            self._hit("other", None, 404)
            self._error(404, "NotFound", f"no route for {path}", head)

        def _repo(self, repo: str, rev: str, head: bool, kind: str, key: str | None) -> dict | None:
            if repo not in hub.repos:
                self._hit(kind, key, 401)
                self._error(401, "RepoNotFound", "Repository not found", head)
                return None
            if rev not in ("main", hub.commits[repo]):
                self._hit(kind, key, 404)
                self._error(404, "RevisionNotFound", "Invalid rev id: " + rev, head)
                return None
            return hub.repos[repo]

        def _model_info(self, rest: str, query: dict, head: bool) -> None:
            repo, rev = rest.split("/revision/", 1) if "/revision/" in rest else (rest, "main")
            files = self._repo(repo, rev, head, "api", None)
            if files is None:
                return
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for path, f in sorted(files.items()):
                entry: dict = {"rfilename": path}
                if blobs:
                    size = hub.reported_size(f"{repo}/{path}", f)
                    entry.update(size=size, blobId=f.blob_id)
                    if f.lfs:
                        entry["lfs"] = {"size": size, "sha256": f.sha256, "pointerSize": 134}
                siblings.append(entry)
            info = {"_id": hub.commits[repo][:24], "id": repo, "modelId": repo, "sha": hub.commits[repo],
                    "private": False, "disabled": False, "gated": False, "tags": [], "siblings": siblings}
            self._hit("api", None, 200)
            self._reply(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), head=head)

        def _resolve(self, path: str, head: bool) -> None:
            repo, rest = path[1:].split("/resolve/", 1)
            rev, _, filename = rest.partition("/")
            key = f"{repo}/{filename}"
            kind = "head" if head else "get"
            files = self._repo(repo, rev, head, kind, key)
            if files is None:
                return
            commit = {"X-Repo-Commit": hub.commits[repo]}
            f = files.get(filename)
            if f is None:
                self._hit(kind, key, 404)
                return self._error(404, "EntryNotFound", f"{filename} does not exist", head, commit)
            if f.lfs:
                location = f"{hub.cdn_url}/repos/{quote(repo)}/{f.sha256}?X-Expires=3600&X-Signature=loopback"
                size = str(hub.reported_size(key, f))
                headers = {**commit, "Location": location, "ETag": f'"{f.sha256}"',
                           "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": size}
                self._hit(kind, key, 302)
                return self._reply(302, headers, head=head)
            self._bytes(f, key, head, {**commit, "ETag": f'"{f.blob_id}"'}, kind)

        def _cdn(self, path: str, head: bool) -> None:
            m = re.fullmatch(r"/repos/(.+)/([0-9a-f]{64})", path)
            found = None
            if m and m.group(1) in hub.repos:
                found = next(((p, f) for p, f in hub.repos[m.group(1)].items() if f.sha256 == m.group(2)), None)
            if found is None:
                self._hit("get", None, 404)
                return self._reply(404, {"Content-Type": "text/plain"}, b"NoSuchKey", head=head)
            key = f"{m.group(1)}/{found[0]}"
            self._bytes(found[1], key, head, {"ETag": f'"{found[1].sha256}"'}, "head" if head else "get")

        def _bytes(self, f: HubFile, key: str, head: bool, headers: dict[str, str], kind: str) -> None:
            fail, cut = (False, None) if head else hub._take_fault(key)
            if fail:
                self._hit(kind, key, 503)
                return self._error(503, "ServiceUnavailable", "try again later", head)
            data, status = f.data, 200
            headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            wanted = self.headers.get("Range")
            if wanted and key not in hub.no_range:
                m = _RANGE.fullmatch(wanted)
                start = int(m.group(1)) if m else len(data)
                if start >= len(data):
                    self._hit(kind, key, 416)
                    return self._reply(416, {**headers, "Content-Range": f"bytes */{len(data)}"}, head=head)
                end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
                data, status = data[start:end + 1], 206
                headers["Content-Range"] = f"bytes {start}-{end}/{len(f.data)}"
            elif head and role == "hub":
                headers["Content-Length"] = str(hub.reported_size(key, f))
            self._hit(kind, key, status)
            self._reply(status, headers, data, head=head, cut=cut)

    return Handler
