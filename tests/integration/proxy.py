"""A loopback TCP proxy between memfuse and the Letta server, for real network faults.

`cut()` drops every open connection and stops listening, so new connections are refused, as
when the server's host goes away; `restore()` listens again on the same port. `delay` holds
each answer back that many seconds (or a callable's answer) (a slow server; the server itself acts at once).
"""
from __future__ import annotations

import select
import socket
import threading
import time


class Proxy:
    """Forwards 127.0.0.1:`port` to `target` (host, port) until `close()`."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.connections = 0  # accepted so far
        # seconds added before each answer starts coming back (a slow server), or a callable
        # that returns them for each answer
        self.delay = 0.0
        # lose_answer(request bytes) -> bool: for the first request it matches, the server acts
        # but its answer is dropped, every connection reset and new ones refused for
        # `outage` seconds (a link that dies just after the server acted)
        self.lose_answer = None
        self.outage = 5.0
        self.lost = 0  # answers lost so far
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        """Listen (again) on the proxy's port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            try:  # wakes the accept() blocked on it: close() alone leaves it listening
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for sock in sockets:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                sock.close()  # RST: the peer sees the connection reset
            except OSError:
                pass

    close = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._sockets |= {client, upstream}
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        asked = False  # the client sent bytes the server has not begun to answer
        request = b""  # the bytes of the request being answered
        try:
            while True:
                readable, _, _ = select.select(list(peers), [], [], 1.0)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is b and asked:  # the first bytes of an answer
                        rule = self.lose_answer
                        if rule is not None and rule(request):
                            self.lose_answer = None
                            self.lost += 1
                            self.cut()
                            threading.Timer(self.outage, self.restore).start()
                            return
                        if self.delay:
                            time.sleep(self.delay() if callable(self.delay) else self.delay)
                    if sock is a:
                        request = data if not asked else request + data
                    asked = sock is a
                    peers[sock].sendall(data)
                with self._lock:
                    if a not in self._sockets:
                        return
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._sockets -= {a, b}
            for sock in (a, b):
                try:
                    sock.close()
                except OSError:
                    pass
