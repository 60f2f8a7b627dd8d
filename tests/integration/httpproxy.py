"""An HTTP-aware loopback proxy between memfuse and the Letta server, for injected error answers.

Each request is parsed whole (h11: Content-Length or chunked bodies), then with probability
`rate` answered with one of the injected faults instead of the server's answer:

- 500: not forwarded, `500 Internal Server Error`;
- 503: not forwarded, `503 Service Unavailable` with `Retry-After: 1`;
- 429: not forwarded, `429 Too Many Requests` with `Retry-After: 1`;
- 504: forwarded (the server acts), its answer dropped and `504 Gateway Timeout` sent instead.

Other requests go to the server and its answer comes back unchanged. `injected` counts the
faults by status.
"""
from __future__ import annotations

import random
import socket
import threading
from collections import Counter

import h11
import httpx

FAULTS = (500, 503, 429, 504)
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host"}


class HttpProxy:
    """Forwards HTTP/1.1 on 127.0.0.1:`port` to `target_url` until `close()`; `rate` (0..1) of
    requests get one of `faults` (statuses from FAULTS, chosen at random)."""

    def __init__(self, target_url: str, rate: float = 0.0, faults: tuple[int, ...] = FAULTS,
                 seed: int | None = None):
        self.rate = rate
        self.faults = faults
        self.injected: Counter[int] = Counter()
        self.forwarded = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._upstream = httpx.Client(base_url=target_url, timeout=60)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop listening; connections already open end with their next request."""
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _fault(self) -> int | None:
        with self._lock:
            if self._rng.random() >= self.rate:
                return None
            return self._rng.choice(self.faults)

    def _serve(self, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = self._read_request(conn, sock)
                if request is None:
                    return
                fault = self._fault()
                if fault in (500, 503, 429):
                    status, headers, content = self._injected(fault)
                else:
                    answer = self._upstream.request(
                        request.method.decode(), request.target.decode(), content=body,
                        headers=[(k, v) for k, v in request.headers if k.lower() not in _HOP])
                    with self._lock:
                        self.forwarded += 1
                    if fault == 504:  # the server acted; its answer is lost on the way
                        status, headers, content = self._injected(504)
                    else:
                        status, content = answer.status_code, answer.content
                        headers = [(k, v) for k, v in answer.headers.raw
                                   if k.lower() not in _HOP | {b"content-encoding"}]
                headers = [*headers, (b"content-length", str(len(content)).encode())]
                sock.sendall(conn.send(h11.Response(status_code=status, headers=headers)))
                sock.sendall(conn.send(h11.Data(data=content)))
                sock.sendall(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError, httpx.HTTPError):
            return
        finally:
            sock.close()

    def _injected(self, status: int) -> tuple[int, list, bytes]:
        with self._lock:
            self.injected[status] += 1
        headers = [(b"content-type", b"application/json")]
        if status in (503, 429):
            headers.append((b"retry-after", b"1"))
        return status, headers, b'{"detail": "injected by the chaos proxy"}'

    @staticmethod
    def _read_request(conn: h11.Connection, sock: socket.socket):
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            else:  # ConnectionClosed
                return None, b""
