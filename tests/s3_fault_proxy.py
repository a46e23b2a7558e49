"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint (the moto server).

Point the clients' ``AWS_ENDPOINT_URL`` at ``proxy.url``; each request is forwarded to the
real endpoint unless the proxy's seeded random stream picks a fault for it:

- ``slowdown``: answer 503 ``SlowDown`` (what S3 says when throttling), without forwarding;
- ``reset``: forward, then send the status line, the headers and half of the body and reset
  the connection (an RST, as a dropped connection looks to the client).

The n-th request gets the n-th draw of ``random.Random(seed)``: the same seed gives the same
sequence of faults (which request is n-th depends on thread timing). ``down = True`` answers
every request 503, a store that stays down. ``counts`` says what was injected.

    with FaultProxy(upstream, slowdown=0.1, reset=0.05, seed=0) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message>"
                 b"<RequestId>fault-proxy</RequestId></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade"}


class FaultProxy:
    """The proxy (see the module docstring); a context manager that serves in a thread.

    Args:
        upstream: the real endpoint, ``http://127.0.0.1:PORT``.
        slowdown: fraction of requests answered 503 SlowDown.
        reset: fraction of requests whose response is cut off mid-body.
        seed: seed of the fault stream.
    """

    def __init__(self, upstream: str, slowdown: float = 0.0, reset: float = 0.0,
                 seed: int = 0) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.slowdown = slowdown
        self.reset = reset
        self.down = False
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def draw(self) -> str:
        """The fate of the next request: ``forward``, ``slowdown`` or ``reset``."""
        with self._lock:
            value = self._rng.random()
            self.counts["requests"] += 1
            if self.down or value < self.slowdown:
                fate = "slowdown"
            elif value < self.slowdown + self.reset:
                fate = "reset"
            else:
                fate = "forward"
            self.counts[fate] += 1
            return fate

    def __enter__(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="s3-fault-proxy")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _relay(self) -> None:
            body = self._read_body()
            fate = proxy.draw()
            if fate == "slowdown":
                self._answer(503, [("Content-Type", "application/xml")], SLOWDOWN_BODY)
                return
            status, headers, payload = self._forward(body)
            if fate == "reset":
                self._answer(status, headers, payload, cut=True)
                return
            self._answer(status, headers, payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                conn.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
                for key, value in self.headers.items():
                    if key.lower() not in HOP_BY_HOP | {"content-length"}:
                        conn.putheader(key, value)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                response = conn.getresponse()
                payload = response.read()
                headers = [(k, v) for k, v in response.getheaders()
                           if k.lower() not in HOP_BY_HOP]
                return response.status, headers, payload
            finally:
                conn.close()

        def _answer(self, status: int, headers: list[tuple[str, str]], payload: bytes,
                    cut: bool = False) -> None:
            if cut and not payload:  # nothing to cut in half: drop the connection unanswered
                self._reset()
                return
            self.send_response_only(status)
            for key, value in headers:  # a HEAD answer keeps the object's Content-Length
                if self.command == "HEAD" or key.lower() != "content-length":
                    self.send_header(key, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if cut:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self._reset()
                return
            self.wfile.write(payload)

        def _reset(self) -> None:
            # linger 0: close() sends an RST, as a dropped connection does
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

    return Handler
