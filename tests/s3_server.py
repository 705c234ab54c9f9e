"""A real S3-compatible server for the tests: moto's server mode on 127.0.0.1, reached through s3fs.

``s3_server`` (a pytest fixture, see ``conftest.py``) starts one :class:`moto.server.ThreadedMotoServer`
per test session on a free local port behind a :class:`Proxy` the test controls, and points every
S3 client of the process (and of the processes it starts) at it through ``AWS_ENDPOINT_URL`` and
dummy credentials. Each test gets a fresh bucket. ``proxy.cut()`` makes the storage unreachable
(connections are refused, open ones reset) until ``proxy.restore()``; moto keeps its data in
memory, so the server itself is never restarted. No other address is ever contacted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """A TCP forwarder 127.0.0.1:port -> 127.0.0.1:target that can be cut and restored."""

    def __init__(self, target: int):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                _reset(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while self.up.is_set() and (data := src.recv(1 << 16)):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        self.up.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            _reset(s)

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def _reset(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        s.close()


ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    """A running server: ``endpoint`` (through the proxy), ``proxy``, and ``bucket()`` for a new bucket."""

    endpoint: str
    direct: str
    proxy: Proxy

    def env(self) -> dict[str, str]:
        """The environment that points S3 clients (s3fs, boto3, the AWS CLI) at this server."""
        return {**ENV, "AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def bucket(self) -> str:
        """A new empty bucket; its name."""
        import boto3

        name = f"vlp-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.direct, **_creds()).create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in ``bucket``, read directly (not through the proxy)."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.direct, **_creds())
        out = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)


def _creds() -> dict:
    return {
        "aws_access_key_id": ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": ENV["AWS_DEFAULT_REGION"],
    }


def start() -> tuple[S3Server, object]:
    """Start moto's server and its proxy; ``(server, stop)``."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    moto.start()
    proxy = Proxy(port)
    server = S3Server(f"http://127.0.0.1:{proxy.port}", f"http://127.0.0.1:{port}", proxy)

    def stop() -> None:
        proxy.close()
        moto.stop()

    return server, stop


def apply_env(server: S3Server, monkeypatch) -> None:
    """Point this process's S3 clients at ``server`` and forget s3fs's cached filesystems."""
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    with contextlib.suppress(ImportError):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    os.environ.pop("AWS_PROFILE", None)
