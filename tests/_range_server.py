"""A small HTTP server with ``Range: bytes=a-b`` support, for the remote-input tests.

Run as a separate process (GDAL holds the GIL while it opens a URL, so a
server thread in the test process would never answer)::

    python tests/_range_server.py ROOT LOGFILE

It prints its port on the first line of stdout, serves the files under ROOT,
and appends one JSON line per request to LOGFILE:
``{"method", "path", "range", "sent"}``.
"""

from __future__ import annotations

import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(BaseHTTPRequestHandler):
    root: Path
    logfile: Path

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _log(self, rng: str | None, sent: int) -> None:
        with open(self.logfile, "a") as f:
            f.write(json.dumps({"method": self.command, "path": self.path, "range": rng, "sent": sent}) + "\n")

    def _serve(self, body: bool) -> None:
        f = self.root / self.path.lstrip("/").split("?")[0]
        rng = self.headers.get("Range")
        if not f.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._log(rng, 0)
            return
        data = f.read_bytes()
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m:
            lo = int(m.group(1))
            hi = min(int(m.group(2) or len(data) - 1), len(data) - 1)
            part = data[lo : hi + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(data)}")
        else:
            part = data
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(part)))
        self.send_header("Content-Type", "image/tiff")
        self.end_headers()
        if body:
            self.wfile.write(part)
        self._log(rng, len(part) if body else 0)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(False)


def main() -> None:
    Handler.root, Handler.logfile = Path(sys.argv[1]), Path(sys.argv[2])
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    print(srv.server_address[1], flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
