"""The metadata lookup on SIGTERM, against a real local HTTP server standing in for it.

GCE_METADATA_HOST (google-auth's variable) points the code at a ThreadingHTTPServer on
127.0.0.1 that answers like the Compute Engine metadata server: 403 without the
Metadata-Flavor header, ``Metadata-Flavor: Google`` on every answer. Off Compute Engine (a
hanging server, a closed port, a DNS lookup that never returns) the answer must be None,
fast and silent, because it runs while a preempted VM has 30 s left.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from utils.loop import gce
from utils.loop.gce import PreemptionFacts, describe, preemption_facts

ROOT = "/computeMetadata/v1/instance/"


class FakeMetadata(ThreadingHTTPServer):
    """Answers preempted and scheduling/?recursive=true; records the requests' headers."""

    daemon_threads = True

    def __init__(self, preempted: str = "FALSE", scheduling: dict | None = None,
                 delay_s: float = 0.0, flavor_back: bool = True) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.answers = {ROOT + "preempted": preempted,
                        ROOT + "scheduling/?recursive=true": json.dumps(scheduling or {})}
        self.delay_s = delay_s
        self.flavor_back = flavor_back
        self.seen: list[tuple[str, str | None]] = []  # (path, Metadata-Flavor header)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeMetadata

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Metadata-Flavor")))
        time.sleep(self.server.delay_s)
        body = self.server.answers.get(self.path)
        if self.headers.get("Metadata-Flavor") != "Google":
            status, body = 403, "Missing required header: Metadata-Flavor"
        else:
            status, body = (200, body) if body is not None else (404, "not found")
        data = body.encode()
        self.send_response(status)
        if self.server.flavor_back:
            self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", "application/text")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Start a FakeMetadata with the given answers and point GCE_METADATA_HOST at it."""
    servers: list[FakeMetadata] = []

    def start(**kwargs) -> FakeMetadata:
        server = FakeMetadata(**kwargs)
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        monkeypatch.setenv("GCE_METADATA_HOST", server.host)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_spot_vm_preempted_and_deleted(serve) -> None:
    server = serve(preempted="TRUE", scheduling={
        "automaticRestart": "FALSE", "instanceTerminationAction": "DELETE",
        "onHostMaintenance": "TERMINATE", "preemptible": "TRUE", "provisioningModel": "SPOT"})
    facts = preemption_facts()
    assert facts == PreemptionFacts(preempted=True, termination_action="DELETE",
                                    provisioning_model="SPOT")
    assert sorted(server.seen) == [(ROOT + "preempted", "Google"),
                                   (ROOT + "scheduling/?recursive=true", "Google")]
    assert describe(facts) == ("Compute Engine preempted this Spot VM; it will be deleted, so "
                               "its local disk (and any checkpoint not uploaded) is lost")


def test_a_stop_that_is_not_a_preemption(serve) -> None:
    serve(preempted="FALSE", scheduling={"instanceTerminationAction": "STOP",
                                         "preemptible": "FALSE", "provisioningModel": "STANDARD"})
    facts = preemption_facts()
    assert facts == PreemptionFacts(preempted=False, termination_action="STOP",
                                    provisioning_model="STANDARD")
    assert describe(facts) == "a stop request (not a preemption)"


def test_preempted_and_stopped_and_legacy_preemptible(serve) -> None:
    serve(preempted="TRUE\n", scheduling={"instanceTerminationAction": "STOP",
                                          "preemptible": "TRUE"})
    facts = preemption_facts()
    assert facts == PreemptionFacts(True, "STOP", "PREEMPTIBLE")
    assert describe(facts) == ("Compute Engine preempted this preemptible VM; it will be "
                               "stopped, so its persistent disk survives (Local SSD data does "
                               "not)")


def test_without_scheduling_the_preemption_is_still_reported(serve) -> None:
    server = serve(preempted="TRUE")
    del server.answers[ROOT + "scheduling/?recursive=true"]  # 404
    facts = preemption_facts()
    assert facts == PreemptionFacts(preempted=True)
    assert describe(facts) == "Compute Engine preempted this VM"


def test_the_flavor_header_is_required_and_sent(serve, monkeypatch) -> None:
    """The server refuses a request without the header: the code must send it."""
    server = serve(preempted="TRUE", scheduling={"instanceTerminationAction": "DELETE"})
    assert preemption_facts() is not None
    assert {flavor for _, flavor in server.seen} == {"Google"}
    monkeypatch.setattr(gce, "FLAVOR_HEADER", "X-Other")  # a request without it: 403 -> None
    assert preemption_facts() is None
    assert (ROOT + "preempted", None) in server.seen


def test_a_server_that_is_not_the_metadata_server(serve) -> None:
    """A 200 without ``Metadata-Flavor: Google`` back (a captive portal, a proxy) is not it."""
    serve(preempted="TRUE", flavor_back=False)
    assert preemption_facts() is None


def test_a_hanging_server_gives_none_within_the_timeout(serve, capsys) -> None:
    server = serve(preempted="TRUE", delay_s=3.0)
    began = time.monotonic()
    assert preemption_facts(timeout_s=0.3) is None
    assert time.monotonic() - began < 0.8  # the deadline, plus slack for a loaded machine
    assert len(server.seen) == 2  # both were asked, at once
    assert capsys.readouterr() == ("", "")


def test_a_closed_port_gives_none_fast(monkeypatch, capsys) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{port}")
    began = time.monotonic()
    assert preemption_facts() is None
    assert time.monotonic() - began < 0.5  # refused at once: no waiting for the deadline
    assert capsys.readouterr() == ("", "")


def test_a_dns_lookup_that_hangs_gives_none_in_time(monkeypatch, capsys) -> None:
    """No socket timeout covers name resolution; the deadline must still hold."""
    release = threading.Event()
    asked: list[str] = []

    def hanging_getaddrinfo(host, *args, **kwargs):
        asked.append(host)
        release.wait(10)
        raise socket.gaierror("no such host")

    monkeypatch.delenv("GCE_METADATA_HOST", raising=False)
    monkeypatch.delenv("GCE_METADATA_ROOT", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", hanging_getaddrinfo)
    try:
        began = time.monotonic()
        assert preemption_facts() is None
        assert time.monotonic() - began < 1.0
        assert asked and set(asked) == {"metadata.google.internal"}
    finally:
        release.set()
    assert capsys.readouterr() == ("", "")


def test_the_real_default_host_answers_in_time_or_not_at_all(monkeypatch) -> None:
    """Off Google Cloud (as here) None; on a GCE VM real facts; never slower than the deadline."""
    monkeypatch.delenv("GCE_METADATA_HOST", raising=False)
    monkeypatch.delenv("GCE_METADATA_ROOT", raising=False)
    began = time.monotonic()
    facts = preemption_facts()
    assert time.monotonic() - began < 1.0
    assert facts is None or isinstance(facts, PreemptionFacts)


def test_host_variables_follow_google_auth(monkeypatch) -> None:
    monkeypatch.delenv("GCE_METADATA_HOST", raising=False)
    monkeypatch.delenv("GCE_METADATA_ROOT", raising=False)
    assert gce.metadata_host() == "metadata.google.internal"
    monkeypatch.setenv("GCE_METADATA_ROOT", "10.0.0.1:8080")
    assert gce.metadata_host() == "10.0.0.1:8080"
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    assert gce.metadata_host() == "127.0.0.1:9"


def test_describe_off_gce_is_empty() -> None:
    assert describe(None) == ""


@pytest.mark.parametrize("garbage", ["[" * 60_000, '{"provisioningModel": ' + "[" * 900 + "]" * 900
                                     + "}", '{"instanceTerminationAction": {"a": 1}}',
                                     "\xff\xfe not json", '"SPOT"', "{" * 70_000])
def test_garbage_scheduling_is_not_said_and_never_raises(serve, garbage) -> None:
    """Whatever the scheduling answer holds (JSON nested past the parser's recursion limit,
    non-string values, a body past the size bound), the preemption is still reported."""
    server = serve(preempted="TRUE")
    server.answers[ROOT + "scheduling/?recursive=true"] = garbage
    began = time.monotonic()
    assert preemption_facts() == PreemptionFacts(preempted=True)
    assert time.monotonic() - began < 1.0


def test_an_oversized_answer_is_not_read(serve) -> None:
    serve(preempted="TRUE" + " " * (gce._MAX_BODY + 10))
    assert preemption_facts() is None
