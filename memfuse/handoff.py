"""The hand-off socket: how `memfuse serve` asks a mount daemon to answer for its agent.

While an agent is mounted, its daemon is its history's one writer (writerlock.py), so `serve`
hands the two things a git request needs written to it (issue 20 point 5): a `sync` before a
ref advertisement (the daemon lists the server and commits its snapshot, so the advertised
head is the mount and the server now), and a `push` (the pushed objects, the ref update and
the request's key; the daemon checks, applies and shows it, mountgit.py). `serve` itself only
reads the history.

The socket is `Config.handoff_socket` (`~/.letta/agents/<id>/git.sock`, mode 0600 in the
0700 state directory: only the mounting user reaches it). One connection carries one request:
a JSON object on one line, then the answer, a JSON object on one line. Paths are reached
through `/proc/self/fd/<directory fd>/<name>`, so a deep HOME never meets the 107-byte limit
of a socket address.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import trio
from dulwich.objects import ShaFile

log = logging.getLogger("memfuse.handoff")

MAX_MESSAGE = 256 << 20  # bytes of one request or answer (a push's objects, base64)
CONNECT_WAIT = 2.0  # seconds a caller retries a socket not listening yet (a mount starting)
BACKLOG = 16

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def objects_message(objects: list[ShaFile]) -> list[list[Any]]:
    """`objects` as a push request carries them: `[type number, base64 of the raw body]`."""
    return [[obj.type_num, base64.b64encode(obj.as_raw_string()).decode()] for obj in objects]


def objects_of(message: Any) -> list[ShaFile]:
    """The objects of a push request. Raises ValueError for anything else."""
    if not isinstance(message, list):
        raise ValueError("objects: not a list")
    try:
        return [ShaFile.from_raw_string(int(num), base64.b64decode(raw, validate=True))
                for num, raw in message]
    except (TypeError, binascii.Error) as exc:
        raise ValueError(f"objects: {exc}") from None



class HandoffError(Exception):
    """The daemon did not answer on its socket (none listens, it went away, it timed out, or
    it answered no JSON object); the message says which."""


@contextlib.contextmanager
def _short(path: Path) -> Iterator[str]:
    """A short address for the socket `path`: `/proc/self/fd/<fd>/<name>`, `fd` its directory,
    open for the block. Raises OSError."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _message(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


def _parsed(raw: bytes) -> dict[str, Any]:
    try:
        found = json.loads(raw)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise HandoffError(f"a message that is no JSON object ({len(raw)} bytes)")
    return found


async def serve(path: Path, handle: Handler, *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer requests on the socket `path` with `handle(request) -> answer` until cancelled,
    one task per connection; then remove the socket. A socket file left by a dead daemon is
    replaced (the caller holds the history's one-writer lock, so no live daemon owns it). An
    exception of `handle` is logged and answered as `{"error": ...}`. Raises OSError when the
    socket cannot be made."""
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _short(path) as address:
            await sock.bind(address)
        os.chmod(path, 0o600)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    task_status.started()
    try:
        await trio.serve_listeners(lambda stream: _answer(stream, handle),
                                   [trio.SocketListener(sock)])
    finally:
        path.unlink(missing_ok=True)


async def _answer(stream: trio.SocketStream, handle: Handler) -> None:
    async with stream:
        try:
            request = await _read(stream)
        except (HandoffError, trio.BrokenResourceError) as exc:
            log.warning("hand-off: a request that could not be read: %s", exc)
            return
        try:
            answer = await handle(request)
        except Exception as exc:  # a bug answers that request alone
            log.exception("hand-off: the %r request failed", request.get("op"))
            answer = {"error": f"the mount's daemon failed: {exc!r}"}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(_message(answer))


async def _read(stream: trio.SocketStream) -> dict[str, Any]:
    data = bytearray()
    while b"\n" not in data:
        chunk = await stream.receive_some(1 << 16)
        if not chunk:
            raise HandoffError("the connection closed before a whole request came")
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise HandoffError(f"a request over {MAX_MESSAGE} bytes")
    return _parsed(bytes(data[:data.index(b"\n")]))


def call(path: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send `request` to the daemon listening on `path` and return its answer, waiting at
    most `timeout` seconds for it (and up to CONNECT_WAIT for a socket not listening yet).
    Blocking: serve's request threads call it. Raises HandoffError."""
    deadline = time.monotonic() + CONNECT_WAIT
    while True:
        try:
            return _call_once(path, request, timeout)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() >= deadline:
                raise HandoffError(f"nothing answers on {path} ({exc.strerror})") from None
            time.sleep(0.05)
        except OSError as exc:
            what = "no answer in time" if isinstance(exc, TimeoutError) else (
                exc.strerror or errno.errorcode.get(exc.errno or 0, repr(exc)))
            raise HandoffError(f"{path}: {what}") from None


def _call_once(path: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        with _short(path) as address:
            sock.connect(address)
        sock.sendall(_message(request))
        data = bytearray()
        while b"\n" not in data:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise HandoffError(f"{path}: the daemon closed the connection without an "
                                   f"answer")
            data += chunk
            if len(data) > MAX_MESSAGE:
                raise HandoffError(f"{path}: an answer over {MAX_MESSAGE} bytes")
    return _parsed(bytes(data[:data.index(b"\n")]))
