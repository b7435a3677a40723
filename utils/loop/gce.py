"""Ask the Compute Engine metadata server why we got SIGTERM and what happens to the VM next.

A Spot VM gets about 30 s between the preemption notice (SIGTERM) and power-off, and its
termination action decides whether its local disk outlives it: STOP keeps the boot disk,
DELETE loses it with any checkpoint not yet uploaded. The preemption line says which, so
the operator knows whether the next start resumes from the disk or from the bucket.

This runs inside the SIGTERM handling, so it must never cost the save its time: both lookups
run at once on daemon threads and the answer is given up after ``timeout_s``, whatever
hangs (a DNS lookup of metadata.google.internal off Google Cloud can take 20-30 s, and no
socket timeout covers it). Off Compute Engine the result is None, silently: no log line and
no exception. Whatever the server sends (a body past ``_MAX_BODY``, JSON nested deep enough
to exhaust the parser's recursion, values of any type) is read as "not said": nothing can
raise out of the lookup and cost the emergency checkpoint. Standard library only, so it runs
where google-auth is not installed.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from dataclasses import dataclass

DEFAULT_HOST = "metadata.google.internal"
# Required on every request (the server refuses one without it) and sent back on every answer.
FLAVOR_HEADER, FLAVOR = "Metadata-Flavor", "Google"
PREEMPTED = "instance/preempted"
SCHEDULING = "instance/scheduling/?recursive=true"
_MAX_BODY = 64 * 1024  # the real answers take a few hundred bytes; a longer one is not read
_MAX_VALUE = 64  # characters of a reported value ("SPOT", "DELETE"); anything longer is ignored
# The metadata server is link-local: an http_proxy from the environment must never see it.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class PreemptionFacts:
    """What the metadata server says about this VM at the moment of the signal.

    ``termination_action``: "STOP", "DELETE" or "" (not reported, e.g. a standard VM).
    ``provisioning_model``: "SPOT", "STANDARD", ..., "PREEMPTIBLE" for a legacy preemptible
    VM that reports no model, or "" when unknown.
    """

    preempted: bool
    termination_action: str = ""
    provisioning_model: str = ""


def metadata_host() -> str:
    """host[:port] of the metadata server, overridable the way google-auth does it.

    google-auth reads GCE_METADATA_HOST, then its old name GCE_METADATA_ROOT (GCE_METADATA_IP
    only serves its "are we on GCE" ping, not metadata reads, so it is not used here).
    """
    for var in ("GCE_METADATA_HOST", "GCE_METADATA_ROOT"):
        value = os.environ.get(var, "").strip().strip("/")
        if value:
            return value
    return DEFAULT_HOST


def _get(url: str, timeout_s: float) -> str | None:
    """The body of a 200 answer that comes from a metadata server, else None (never raises)."""
    request = urllib.request.Request(url, headers={FLAVOR_HEADER: FLAVOR})
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            # A captive portal or a proxy answering 200 to anything is not the metadata server.
            if response.status != 200 or response.headers.get(FLAVOR_HEADER) != FLAVOR:
                return None
            body = response.read(_MAX_BODY + 1)
            return body.decode("utf-8", "replace") if len(body) <= _MAX_BODY else None
    except Exception:  # noqa: BLE001 - off GCE every failure (DNS, refused, 403, ...) means None
        return None


def _scheduling(text: str | None) -> dict[str, str]:
    """The scheduling answer's short string values; {} for anything else (never raises: a
    body of 60,000 ``[`` makes ``json.loads`` raise RecursionError, not ValueError)."""
    try:
        found = json.loads(text or "{}")
    except Exception:  # noqa: BLE001 - garbage from the server means "not said"
        return {}
    if not isinstance(found, dict):
        return {}
    return {key: str(value).strip().upper() for key, value in found.items()
            if isinstance(value, str | bool) and len(str(value)) <= _MAX_VALUE}


def preemption_facts(timeout_s: float = 0.5) -> PreemptionFacts | None:
    """Whether Compute Engine preempted this VM and what it does next; None off GCE.

    Returns within about ``timeout_s`` in all cases (both requests share that deadline);
    None when the server does not answer ``instance/preempted`` in time, or on any error at
    all (this runs on the SIGTERM path). If only the scheduling lookup fails, the facts carry
    "" for what it would have told.
    """
    try:
        return _lookup(timeout_s)
    except Exception:  # noqa: BLE001 - e.g. no thread can be started: the save goes on
        return None


def _lookup(timeout_s: float) -> PreemptionFacts | None:
    root = f"http://{metadata_host()}/computeMetadata/v1/"
    answers: dict[str, str | None] = {}

    def fetch(path: str) -> None:
        answers[path] = _get(root + path, timeout_s)

    deadline = time.monotonic() + timeout_s
    threads = [threading.Thread(target=fetch, args=(path,), name=f"gce-{path.split('/')[1]}",
                                daemon=True) for path in (PREEMPTED, SCHEDULING)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    got = dict(answers)  # a late answer must not change what we decide from here
    preempted = (got.get(PREEMPTED) or "").strip().upper()
    if preempted not in ("TRUE", "FALSE"):
        return None
    scheduling = _scheduling(got.get(SCHEDULING))
    model = scheduling.get("provisioningModel", "")
    if not model and scheduling.get("preemptible") == "TRUE":
        model = "PREEMPTIBLE"
    return PreemptionFacts(preempted=preempted == "TRUE",
                           termination_action=scheduling.get("instanceTerminationAction", ""),
                           provisioning_model=model)


def describe(facts: PreemptionFacts | None) -> str:
    """A clause for the SIGTERM line saying what the signal means for the disk; "" off GCE."""
    if facts is None:
        return ""
    if not facts.preempted:
        return "a stop request (not a preemption)"
    kind = {"SPOT": "Spot VM", "PREEMPTIBLE": "preemptible VM"}.get(facts.provisioning_model,
                                                                  "VM")
    clause = f"Compute Engine preempted this {kind}"
    if facts.termination_action == "DELETE":
        return (f"{clause}; it will be deleted, so its local disk (and any checkpoint not "
                "uploaded) is lost")
    if facts.termination_action == "STOP":
        return (f"{clause}; it will be stopped, so its persistent disk survives (Local SSD "
                "data does not)")
    return clause
