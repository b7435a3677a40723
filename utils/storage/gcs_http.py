"""The HTTP adapter of GcsStore's session: request bodies go out a block at a time.

google-cloud-storage hands each request body to requests as one bytes object, which urllib3
sends with one ``socket.sendall`` under the *connect* timeout; since Python 3.5 a socket
timeout bounds the whole sendall. So the connect timeout (10 s) capped how long a body could
take to send: at 1 MB/s no request over ~10 MB ever completed, however often it was retried
(a resumable upload sends up to 100 MiB per request by default). Given a file-like body
instead, urllib3 sends it in ``blocksize`` pieces, each its own sendall, and the same timeout
means "no progress for that long": a slow link finishes, a stalled one is still cut off and
retried.

Imported only by ``gcs._open_gcs`` (requests is installed with google-cloud-storage).
"""

from __future__ import annotations

import io
from typing import Any

from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter

# One sendall: small enough that any usable link moves it well within the connect timeout
# (256 KiB in 10 s is 26 KB/s), large enough to cost few system calls at GCS speeds.
BLOCK_BYTES = 256 * 1024


class StreamingAdapter(HTTPAdapter):
    """An HTTPAdapter that sends large request bodies in BLOCK_BYTES pieces."""

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, blocksize=BLOCK_BYTES,
                                 **pool_kwargs)

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        body = request.body
        if isinstance(body, bytes) and len(body) > BLOCK_BYTES:
            # A copy, so the caller's request keeps its bytes (Content-Length is already set,
            # so urllib3 frames the stream exactly as it would the bytes).
            request = request.copy()
            request.body = io.BytesIO(body)  # type: ignore[assignment]
        return super().send(request, *args, **kwargs)
