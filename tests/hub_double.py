"""A HuggingFace hub double on loopback: serves one model repo the way ``snapshot_download`` reads it.

What it answers: the repo info (``/api/models/<repo>`` and ``/revision/<rev>``), the file tree
(``/api/models/<repo>/tree/<sha>``) and each file (``HEAD``/``GET /<repo>/resolve/<sha>/<file>``
with ``X-Repo-Commit`` and ``ETag``); anything else is 404. Point a server at it with
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE=0``. Only the real hub proves the rest: authentication, gated
repos, redirects to a CDN, Xet storage, rate limits.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "c0ffee" * 6 + "c0ff"  # 40 hex digits


@contextmanager
def serving_repo(repo_id: str, folder: Path) -> Iterator[str]:
    """Serve the files of ``folder`` as hub repo ``repo_id``; yields the endpoint URL."""
    files = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    api = f"/api/models/{repo_id}"
    resolve = f"/{repo_id}/resolve/"

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, send_body: bool) -> None:
            path = self.path.split("?")[0]
            headers = {"Content-Type": "application/json"}
            if path == api or path.startswith(f"{api}/revision/"):
                siblings = [{"rfilename": name} for name in files]
                body = json.dumps({"id": repo_id, "sha": COMMIT, "siblings": siblings}).encode()
            elif path.startswith(f"{api}/tree/"):
                tree = [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in files.items()
                ]
                body = json.dumps(tree).encode()
            elif path.startswith(resolve) and (name := path[len(resolve) :].partition("/")[2]) in files:
                body = files[name]
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
