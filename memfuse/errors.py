"""The errors a file operation and a server call end in, and the count of unexpected ones
(bugs) that the safe boundary caught.

FsError is the one error the filesystem layer turns into an errno. A call to the Letta server
fails with a ServerCallError (remote.py, the server seam, makes them from the client's
errors): ServerAway when the server gave no answer that settles the call (none at all:
NoAnswer; a 5xx; a 408 or 429: Throttled), ServerRefused when it judged the call (a block or
the agent that is not there: BlockGone, AgentGone; the API key: KeyRefused). Nothing here
knows the client, so every module above the seam catches these alone.
"""
from __future__ import annotations

import logging
import time


class FsError(Exception):
    """A file operation is refused: `errno` goes to the program, `reason` (words) to the log."""

    def __init__(self, errno_: int, reason: str):
        super().__init__(reason)
        self.errno = errno_
        self.reason = reason


class ServerCallError(FsError):
    """A call to the server failed. `status`: the HTTP status (None: no answer at all);
    `call`: the request, as `GET /v1/blocks/{id}`; `detail`: what the server said, or how the
    connection failed. `reason` (the log of a file operation) says which kind of failure it
    is; `failure` is the call and the answer alone, as start-up and the poller tell them."""

    def __init__(self, errno_: int, reason: str, status: int | None = None, *,
                 call: str = "", detail: str = ""):
        super().__init__(errno_, reason)
        self.status = status
        self.call = call
        self.detail = detail

    @property
    def failure(self) -> str:
        """`GET /v1/blocks/x: 404 Not Found`, or `GET /v1/blocks/x: ConnectError` with no
        answer; the reason when the call is not known."""
        if not self.call:
            return self.reason
        return (f"{self.call}: {self.status} {self.detail}" if self.status
                else f"{self.call}: {self.detail}")


class ServerAway(ServerCallError):
    """The server gave no answer (connect error, timeout) or only 5xx within the budget, or
    asked to be asked later (408, 429): the change may be journaled instead of refused (EIO
    when it is not)."""


class NoAnswer(ServerAway):
    """No HTTP answer at all (a connect error, a timeout) within the budget; `status` None."""


class Throttled(ServerAway):
    """408 or 429 within the budget: the server answered, but did not act ("not now")."""


class ServerRefused(ServerCallError):
    """The server answered with a refusal (4xx, or an answer that is not the API's). Final
    for the change only when the server judged it (400, 404, 409, 422); a 401/403 may pass (a
    key)."""

    FINAL = (400, 404, 409, 422)  # 409: a label taken (a create resolves its own first)


class BlockGone(ServerRefused):
    """404 for any call but the agent's own: the block is not on the server (deleted), or, for
    a detach, not attached to the agent. ESTALE."""


class AgentGone(ServerRefused):
    """404 for a call about the agent (its attached blocks, the agent itself; at the lookup at
    mount also a 422, an id of the wrong shape): the agent is not on the server. ESTALE for
    a 404."""


class KeyRefused(ServerRefused):
    """401 or 403: the server refused the API key (missing or wrong). EACCES."""


class Faults:
    """Unexpected exceptions (bugs, never a program's mistake) caught at the safe boundary: a
    FUSE operation then answers EIO and a background task is restarted, so the mount keeps
    serving. `count` of them so far, `last` in words and `last_at` (time.time()) for
    `memfuse status`."""

    def __init__(self):
        self.count = 0
        self.last: str | None = None
        self.last_at: float | None = None

    def caught(self, log: logging.Logger, what: str) -> None:
        """Count the exception being handled and log it with its traceback as `what`."""
        self.count += 1
        self.last, self.last_at = what, time.time()
        log.exception("%s", what)
