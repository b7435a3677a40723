"""A TCP proxy that limits every connection's bandwidth, for transfer tests and benches.

Real object stores cap each stream (GCS: ~200 MiB/s from a VM; a home link ~1 MB/s), which is
what makes parallel streams pay; the emulator on localhost has no such cap. ThrottleProxy
forwards raw TCP to the emulator, each connection limited to ``rate`` bytes/s in each
direction, and injects faults at that boundary: ``stall`` stops forwarding a connection (the
client must notice and retry on a new one), ``corrupt`` flips one byte of a request body (the
client must detect it and resend). ProxiedEmulator announces the emulator at the proxy's
address (``-external-url``), so the resumable-upload session URLs it hands out come back
through the proxy too.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gcs_emulator import GcsEmulator

_REQUEST_LINE = re.compile(rb"(GET|POST|PUT|DELETE|PATCH) (/\S*) HTTP/1\.1\r\n")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
# Small kernel buffers on the proxy's side, so what the client has sent is close to what has
# gone through the limit (the client's own send buffer still holds some).
_SOCKET_BUFFER = 64 * 1024


class _Fault:
    """One armed fault: applies to the next ``count`` requests whose head contains pattern."""

    def __init__(self, pattern: bytes, count: int) -> None:
        self.pattern = pattern
        self.count = count


class ThrottleProxy:
    """127.0.0.1:port -> target, every connection limited to ``rate`` bytes/s each way.

    ``rate`` may change at any time (None: unlimited) and applies to open connections too.
    ``requests`` records "METHOD path" of every request seen, in order, and ``bodies`` the
    Content-Length of each (what one request carried). ``target`` is called
    for each new connection, so the proxy can start before the server it forwards to.
    """

    def __init__(self, target: Callable[[], tuple[str, int]], rate: float | None = None) -> None:
        self.target = target
        self.rate = rate
        self.requests: list[str] = []
        self.bodies: list[int] = []
        self.connections = 0
        self.stalled = 0  # connections stopped by stall()
        self.corrupted = 0  # bytes flipped by corrupt()
        self._stalls: list[_Fault] = []
        self._corrupts: list[_Fault] = []
        self._cond = threading.Condition()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._closing = threading.Event()

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThrottleProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection (stalled ones included)."""
        self._closing.set()
        if self._listener is not None:
            self._listener.close()
        with self._cond:
            for sock in list(self._open):
                _close(sock)

    def __enter__(self) -> ThrottleProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Unlimited, nothing armed, nothing recorded (stalled connections stay stalled)."""
        with self._cond:
            self.rate = None
            self.requests.clear()
            self.bodies.clear()
            self.stalled = self.corrupted = 0
            self._stalls.clear()
            self._corrupts.clear()

    def stall(self, pattern: bytes, count: int = 1) -> None:
        """The next ``count`` connections that send a request head containing pattern stop
        forwarding from that request on, both ways, until the proxy stops: to the client the
        link went silent mid-request."""
        with self._cond:
            self._stalls.append(_Fault(pattern, count))

    def corrupt(self, pattern: bytes, count: int = 1) -> None:
        """Flip the first body byte of the next ``count`` requests with a non-empty body whose
        head contains pattern."""
        with self._cond:
            self._corrupts.append(_Fault(pattern, count))

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until predicate() (checked whenever the proxy records something) holds."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def count(self, pattern: str) -> int:
        """How many recorded requests contain pattern."""
        with self._cond:
            return sum(pattern in r for r in self.requests)

    # ------------------------------------------------------------------ internals

    def _take(self, faults: list[_Fault], head: bytes) -> bool:
        with self._cond:
            for fault in faults:
                if fault.count > 0 and fault.pattern in head:
                    fault.count -= 1
                    return True
        return False

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target(), timeout=10)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
            stop = threading.Event()
            with self._cond:
                self.connections += 1
                self._open.update((client, upstream))
                self._cond.notify_all()
            threading.Thread(target=self._pump, args=(client, upstream, stop, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, stop, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, stop: threading.Event,
              requests: bool) -> None:
        """Copy src to dst at the rate limit; the client-to-server side also watches requests
        (their heads, for the log and the faults) and corrupts a body when told."""
        next_send = time.monotonic()
        flip_in = -1  # body bytes to skip before the byte to flip (-1: none pending)
        try:
            while not stop.is_set():
                rate = self.rate
                block = 256 * 1024 if rate is None else int(min(max(rate / 50, 4096), 262144))
                data = src.recv(block)
                if not data:
                    break
                if requests:
                    data, flip_in = self._inspect(data, flip_in, stop)
                    if stop.is_set():
                        return  # stalled: hold the connection open, forward nothing
                if rate is not None:
                    next_send = max(next_send, time.monotonic()) + len(data) / rate
                    time.sleep(max(0.0, next_send - time.monotonic()))
                dst.sendall(data)
        except OSError:
            pass
        if not stop.is_set():
            stop.set()
            with self._cond:
                self._open.difference_update((src, dst))
            _close(src)
            _close(dst)

    def _inspect(self, data: bytes, flip_in: int, stop: threading.Event) -> tuple[bytes, int]:
        """Record request lines; apply a stall or a corruption armed for one of them."""
        if flip_in >= 0 and flip_in < len(data):  # the byte to flip is in this block
            data, flip_in = _flipped(data, flip_in), -1
            self._record_flip()
        elif flip_in >= 0:
            flip_in -= len(data)
        for match in _REQUEST_LINE.finditer(data):
            head_end = data.find(b"\r\n\r\n", match.start())
            head = data[match.start():head_end if head_end >= 0 else len(data)]
            length = _CONTENT_LENGTH.search(head)
            with self._cond:
                self.requests.append(f"{match[1].decode()} {match[2].decode()}")
                self.bodies.append(int(length[1]) if length else 0)
                self._cond.notify_all()
            if self._take(self._stalls, head):
                stop.set()
                with self._cond:
                    self.stalled += 1
                    self._cond.notify_all()
                return data, -1
            if length and int(length[1]) > 0 and head_end >= 0 and self._take(self._corrupts,
                                                                                head):
                body = head_end + 4
                if body < len(data):
                    data = _flipped(data, body)
                    self._record_flip()
                else:
                    flip_in = body - len(data)
        return data, flip_in

    def _record_flip(self) -> None:
        with self._cond:
            self.corrupted += 1
            self._cond.notify_all()


def _flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


class ProxiedEmulator(GcsEmulator):
    """A fake-gcs-server that announces itself (``-external-url``) at a ThrottleProxy's
    address, so every request, resumable-upload chunks included, goes through the proxy.

    ``url`` is the proxy's (what clients use); ``direct_url`` bypasses it (for checks that
    must not be throttled or faulted).
    """

    def __init__(self, workdir: Path, rate: float | None = None) -> None:
        super().__init__(workdir)
        self.proxy = ThrottleProxy(lambda: ("127.0.0.1", self.port), rate).start()

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def direct_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        super().stop()
        self.proxy.stop()
