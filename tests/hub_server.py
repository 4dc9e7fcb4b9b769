"""A local stand-in for the Hugging Face Hub's file API: what huggingface_hub asks when it downloads a model.

    GET  /api/models/REPO/revision/REV    {"id", "sha"}: the commit a branch points at (snapshot_download)
    GET  /api/models/REPO/tree/REV        the repository's files (snapshot_download)
    HEAD /REPO/resolve/REV/FILE           the file's metadata: X-Repo-Commit, ETag, Content-Length
    GET  /REPO/resolve/REV/FILE           its bytes, from the offset a Range header asks for

An unknown repository or file answers 404 with the Hub's X-Error-Code. `faults[(repo, file)] = 'drop'` sends all
but the file's last kilobyte once, then closes the connection. Every request lands in `requests` as (method, path,
Range header).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path


class HubServer:
    def __init__(self, repos: dict[str, Path]) -> None:
        """repos: repository id -> a folder whose files it serves."""
        self.files = {r: {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()} for r, d in repos.items()}
        self.commits = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}
        self.faults: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                server.answer(self, body=False)

            def do_GET(self) -> None:
                server.answer(self, body=True)

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _split(self, path: str) -> tuple[str | None, str]:
        """(the repository a path names, the rest of the path)."""
        for repo in sorted(self.files, key=len, reverse=True):
            if path == repo or path.startswith(repo + "/"):
                return repo, path[len(repo) :]
        return None, path

    def answer(self, handler: http.server.BaseHTTPRequestHandler, *, body: bool) -> None:
        path = handler.path.split("?")[0]
        self.requests.append((handler.command, path, handler.headers.get("Range")))
        api = path.startswith("/api/models/")
        repo, rest = self._split(path.removeprefix("/api/models/") if api else path.lstrip("/"))
        if repo is None:
            return self._error(handler, 404, "RepoNotFound")
        if api and rest.startswith("/tree/"):
            listing = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for n, d in
                       self.files[repo].items()]  # fmt: skip
            return self._json(handler, listing)
        if api:
            return self._json(handler, {"id": repo, "modelId": repo, "sha": self.commits[repo]})
        name = rest.split("/", 3)[-1] if rest.startswith("/resolve/") else ""
        if name not in self.files[repo]:
            return self._error(handler, 404, "EntryNotFound", repo)
        self._file(handler, repo, name, body)

    def _file(self, handler, repo: str, name: str, body: bool) -> None:
        data = self.files[repo][name]
        start = int(handler.headers["Range"].split("=")[1].split("-")[0]) if handler.headers.get("Range") else 0
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", self.commits[repo])
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Accept-Ranges", "bytes")
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Content-Length", str(len(data) - start))
        handler.end_headers()
        if not body:
            return
        if self.faults.get((repo, name)) == "drop":
            del self.faults[(repo, name)]
            handler.wfile.write(data[start : len(data) - 1000])
            handler.wfile.flush()
            handler.close_connection = True
            return
        handler.wfile.write(data[start:])

    def _json(self, handler, value) -> None:
        data = json.dumps(value).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command == "GET":
            handler.wfile.write(data)

    def _error(self, handler, status: int, code: str, repo: str | None = None) -> None:
        data = json.dumps({"error": code}).encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        if repo:
            handler.send_header("X-Repo-Commit", self.commits[repo])
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command == "GET":
            handler.wfile.write(data)
