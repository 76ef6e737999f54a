"""A local folder served over HTTP on 127.0.0.1 behind Basic auth, with byte ranges (tests only).

fsspec reads a Parquet file over HTTP with range requests, which Python's own file server does
not answer; this one does, and it refuses every request without the right credentials, so a
test knows the credentials in a URL's `user:pass@` were really used.
"""
from __future__ import annotations

import base64
import os
import re
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class _Handler(SimpleHTTPRequestHandler):
    server: "HttpLake"

    def log_message(self, *args):  # one line per request on stderr otherwise
        pass

    def _authorised(self) -> bool:
        ok = self.headers.get("Authorization") == self.server.expected_auth
        self.server.requests.append((self.command, self.path, ok))
        if not ok:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="lake"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        return ok

    def do_HEAD(self):
        if self._authorised():
            super().do_HEAD()

    def do_GET(self):
        if not self._authorised():
            return
        path = self.translate_path(self.path)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m is None or not os.path.isfile(path):
            return super().do_GET()
        size = os.path.getsize(path)
        start = int(m.group(1))
        stop = min(int(m.group(2)) + 1 if m.group(2) else size, size)
        if start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with open(path, "rb") as f:  # the served folder is local test data
            f.seek(start)
            data = f.read(stop - start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class HttpLake(ThreadingHTTPServer):
    """Serve `folder` on 127.0.0.1 (a free port) to `user:password` only; stop with `close()`."""

    daemon_threads = True

    def __init__(self, folder, user: str, password: str):
        super().__init__(("127.0.0.1", 0), partial(_Handler, directory=str(folder)))
        self.expected_auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, authorised)
        self.url = f"http://{user}:{password}@127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()
