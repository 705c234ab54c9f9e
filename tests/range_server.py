"""A local http server for a folder of shards that answers ``Range: bytes=a-b`` requests (206), as a
web server or a CDN does, and counts the bytes it sends. Used by the byte-offset resume tests
(tests/test_data_offsets.py) and by tools/bench/resume.py (there in a child process)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import re
import threading
from collections.abc import Callable
from pathlib import Path


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 64  # concurrent range reads queue, not time out (http.server's default is 5)


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Files of ``root``; ``Range`` answered with 206 when ``ranges`` (else the whole file, 200), 416
    for a start past the end; ``count(n)`` is called with the bytes of each chunk sent."""

    disable_nagle_algorithm = True  # headers and body go out at once, as a production server sends them

    def __init__(self, *args, root: Path, count: Callable[[int], None], ranges: bool = True, **kw):
        self.root, self.count, self.ranges = root, count, ranges
        super().__init__(*args, **kw)

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "") if self.ranges else None
        start, end = (int(wanted[1]), min(size, int(wanted[2]) + 1 if wanted[2] else size)) if wanted else (0, size)
        if start >= size and wanted:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        with open(path, "rb") as f, contextlib.suppress(OSError):  # a reader that stops early closes its end
            f.seek(start)
            left = end - start
            while left:
                chunk = f.read(min(left, 1 << 20))
                self.wfile.write(chunk)
                self.count(len(chunk))
                left -= len(chunk)

    def log_message(self, *args):
        pass


def make_server(root: Path, count: Callable[[int], None], ranges: bool = True) -> Server:
    """A :class:`Server` for ``root`` on a free port of 127.0.0.1 (not started)."""
    return Server(("127.0.0.1", 0), functools.partial(RangeHandler, root=root, count=count, ranges=ranges))


@contextlib.contextmanager
def serve(root: Path, ranges: bool = True):
    """``(base url, sent)`` of a server for ``root`` on a thread of this process; ``sent[0]`` is the
    bytes sent so far (set it to 0 to count afresh)."""
    sent = [0]

    def count(n: int) -> None:
        sent[0] += n

    server = make_server(root, count, ranges)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", sent
    finally:
        server.shutdown()
        server.server_close()
