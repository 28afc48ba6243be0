"""The HTTP server of `/metrics`, `/healthz` and the status page: the standard library's
`http.server`, bounded.

Left as it is, `http.server` starts one thread per connection without limit, waits for a
silent client forever, keeps a listen backlog of 5, sends its own error pages (400, 414,
431, 501) without the page's security headers and prints a traceback to stderr whenever
a client goes away early. Here:

- at most `MAX_CONNECTIONS` connections are served at once; one more is answered `503`
  at once and closed, so no client can make the keeper start threads without bound;
- a client silent for `IDLE_SECONDS` is disconnected, and a request must have arrived
  whole (request line, headers and body) within `REQUEST_SECONDS`: a client that trickles
  a byte at a time (slowloris) holds its thread that long at most; a request of more
  than `MAX_REQUEST_BYTES` is cut off;
- the listen backlog is `BACKLOG`;
- every response, the server's own error pages included, carries `SECURITY_HEADERS`;
- a client that disconnects or times out is a debug line, not a traceback; any other
  error is logged through `logging`, never printed.

Why not a server library such as waitress: its defences are a cap on connections and an
inactivity timeout, which a client trickling bytes defeats; these are the same, plus a
deadline per request. It would also mean rewriting `/metrics` and the page as WSGI
applications and one more dependency in every install, for a server meant for loopback.
"""

from __future__ import annotations

import io
import logging
import math
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 32  # served at once, each by a thread
IDLE_SECONDS = 10.0  # the longest wait for the next bytes from a client, or for it to read
REQUEST_SECONDS = 15.0  # from the first wait for a request to having read it whole
BACKLOG = 128  # connections the kernel queues before we accept them
# Bytes one request may send, line, headers and body: http.server alone would buffer up to
# 100 header lines of 64 KiB each (6.4 MB) per connection. Bodies are at most 64 KiB.
MAX_REQUEST_BYTES = 256 * 1024

# No inline script or style, nothing from another origin, no framing, forms post here only.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)
_BUSY_BODY = b"busy: too many connections, try again\n"
BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\n"
    + b"".join(f"{name}: {value}\r\n".encode() for name, value in SECURITY_HEADERS)
    + b"Retry-After: 1\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    + f"Content-Length: {len(_BUSY_BODY)}\r\n\r\n".encode()
    + _BUSY_BODY
)


class _DeadlineReader(socket.SocketIO):
    """Reads from the socket, each wait bounded by the time the request has left."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, "rb")
        self.connection = sock
        self.deadline = math.inf
        self.taken = 0  # bytes read since the request began

    def start(self) -> None:
        """A new request begins: its own deadline and byte count."""
        self.deadline = time.monotonic() + REQUEST_SECONDS
        self.taken = 0

    def readinto(self, buffer: WriteableBuffer) -> int | None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no whole request within {REQUEST_SECONDS:g}s")
        if self.taken > MAX_REQUEST_BYTES:
            raise ConnectionAbortedError(f"a request of more than {MAX_REQUEST_BYTES} bytes")
        self.connection.settimeout(min(left, IDLE_SECONDS))
        got = super().readinto(buffer)
        self.taken += got or 0
        return got


class Handler(BaseHTTPRequestHandler):
    """The base of every handler here: deadlines, security headers, quiet logs."""

    timeout = IDLE_SECONDS  # the socket's, until `_DeadlineReader` narrows it
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        self.reader.start()
        super().handle_one_request()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.headers.get("Transfer-Encoding"):
            # Bodies are read by Content-Length only: refuse rather than misread the rest.
            self.send_error(501, "Transfer-Encoding is not supported: send Content-Length")
            return False
        return True

    def send_response(self, code: int, message: str | None = None) -> None:
        self.connection.settimeout(IDLE_SECONDS)  # the client must read the reply meanwhile
        super().send_response(code, message)
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news; the page logs what matters itself


class Server(ThreadingHTTPServer):
    """`ThreadingHTTPServer` with at most `MAX_CONNECTIONS` handler threads."""

    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[Handler]) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def refuse(self, request: socket.socket) -> None:
        """Answer 503 without a thread, and without waiting for the client."""
        try:
            request.setblocking(False)
            request.send(BUSY)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("http: %s went away: %s", client_address[0], exc)
        else:
            log.error("http: error serving %s", client_address[0], exc_info=True)
