"""What the stager tests share: an HTTP server on 127.0.0.1 that can misbehave on purpose, a RabbitMQ vhost of
the test's own (so stagers started here never take messages of the stack's running services), image files,
a site config, and stager processes (`vtorque run stager`, the command the services run)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vtorque.shared.image_catalog import toml_value

# -- images -------------------------------------------------------------------------------------------------

def make_image(path: Path, size: int, seed: int = 0) -> str:
    """A file of `size` pseudo-random bytes (fast: a repeated random block with a counter); its sha256."""
    block = hashlib.sha256(str(seed).encode()).digest() * (65536 // 32)
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        written, n = 0, 0
        while written < size:
            chunk = (n.to_bytes(8, "little") + block)[:min(len(block), size - written)]
            fh.write(chunk)
            h.update(chunk)
            written += len(chunk)
            n += 1
    return h.hexdigest()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- an HTTP server that misbehaves on purpose --------------------------------------------------------------

@dataclass
class Behaviour:
    path: Path
    drop_after: int | None = None  # first response only: close the connection after this many body bytes
    stall_after: int | None = None  # first response only: then send nothing for `stall_seconds`
    stall_seconds: float = 0.0
    stall_always: bool = False  # every response stalls (a server that hangs for good)
    rate: float | None = None  # bytes per second
    status: int = 200
    ranges: bool = True
    served: int = 0  # responses started


@dataclass
class Request:
    path: str
    range: str | None
    status: int


class ImageServer:
    def __init__(self) -> None:
        self.files: dict[str, Behaviour] = {}
        self.requests: list[Request] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, name: str, path: Path, **behaviour) -> str:
        self.files[f"/{name}"] = Behaviour(path, **behaviour)
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def gets(self, name: str) -> list[Request]:
        return [r for r in self.requests if r.path == f"/{name}"]

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        b = self.files.get(handler.path)
        if b is None or b.status != 200:
            status = 404 if b is None else b.status
            self.requests.append(Request(handler.path, handler.headers.get("Range"), status))
            handler.send_response(status)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        size = b.path.stat().st_size
        first = b.served == 0
        b.served += 1
        start, status = 0, 200
        asked = handler.headers.get("Range")
        if asked and b.ranges and asked.startswith("bytes=") and asked.endswith("-"):
            start, status = int(asked[6:-1]), 206
        self.requests.append(Request(handler.path, asked, status))
        handler.send_response(status)
        handler.send_header("Content-Length", str(size - start))
        handler.send_header("ETag", f'"{b.path.stat().st_mtime_ns}"')
        if b.ranges:
            handler.send_header("Accept-Ranges", "bytes")
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        handler.end_headers()
        sent, t0 = 0, time.monotonic()
        try:
            with open(b.path, "rb") as fh:
                fh.seek(start)
                while chunk := fh.read(64 * 1024):
                    if first and b.drop_after is not None and sent + len(chunk) > b.drop_after:
                        handler.wfile.write(chunk[:b.drop_after - sent])
                        handler.wfile.flush()
                        handler.connection.shutdown(socket.SHUT_RDWR)
                        handler.close_connection = True
                        return
                    if (first or b.stall_always) and b.stall_after is not None and sent >= b.stall_after:
                        time.sleep(b.stall_seconds)
                        if b.stall_always:
                            handler.close_connection = True
                            return
                        b.stall_after = None
                    handler.wfile.write(chunk)
                    sent += len(chunk)
                    if b.rate:
                        ahead = sent / b.rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError, OSError):
            handler.close_connection = True


# -- a vhost of the test's own ------------------------------------------------------------------------------

@contextlib.contextmanager
def vhost():
    """amqp URL of a fresh vhost and a user with rights there only (tests/conftest.py); deleted afterwards
    with all its queues."""
    from conftest import private_broker_for

    with private_broker_for() as broker:
        yield broker.url


# -- a site config and stager processes ---------------------------------------------------------------------

@dataclass
class Site:
    dir: Path
    broker_url: str
    store: Path
    catalog: dict[str, dict] = field(default_factory=dict)
    extra: str = ""

    @property
    def config(self) -> Path:
        return self.dir / "vtorque.toml"

    def write(self) -> Path:
        lines = [f"state_dir = {toml_value(str(self.dir / 'state'))}", "",
                 "[broker]", f"url = {toml_value(self.broker_url)}", "",
                 "[tracing]", f"dir = {toml_value(str(self.dir / 'traces'))}", "",
                 "[images]", f"store = {toml_value(str(self.store))}", "progress_interval = 0.2", self.extra, ""]
        for name, entry in self.catalog.items():
            lines.append(f"[images.catalog.{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
            lines.append("")
        self.config.write_text("\n".join(lines))
        return self.config

    def env(self, **more) -> dict:
        """No VTORQUE_* of the caller's (a shell may carry the stack's): the site's config only."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("VTORQUE_")}
        env.update(VTORQUE_CONFIG=str(self.config), **more)
        return env


class ServiceProcess:
    """`vtorque run SERVICE` with the site's config; ready once it logs that it consumes."""

    def __init__(self, site: Site, service: str, **env):
        self.log = site.dir / f"{service}-{uuid.uuid4().hex[:6]}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "vtorque.cli.main", "run", service],
                                     env=site.env(**env), stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "w"))
        deadline = time.monotonic() + 30
        while "consuming" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{service} did not start:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def text(self) -> str:
        try:
            return self.log.read_text()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def events_until(waiter, predicate, timeout: float = 60.0) -> list:
    """Events from an EventWaiter until `predicate(events)` holds; AssertionError with what came otherwise."""
    events: list = []
    deadline = time.monotonic() + timeout
    while not predicate(events):
        event = waiter.next(deadline)
        if event is None:
            raise AssertionError(f"timed out; got {[type(e).__name__ + ':' + e.job_id for e in events]}")
        events.append(event)
    return events
