"""`memfuse serve`: git's smart HTTP over each agent's history, the endpoint letta-code clones.

Routes (git's smart HTTP, protocol v0/v1, as Letta's own `letta/server/rest_api/routers/v1/
git_http.py` declares them and letta-code's `src/agent/memory-git.ts` builds the URL
`${LETTA_MEMFS_BASE_URL}/v1/git/${agentId}/state.git`):

    GET  /v1/git/<agent-id>/state.git/info/refs?service=git-upload-pack   the refs (advertisement)
    POST /v1/git/<agent-id>/state.git/git-upload-pack                      the pack
    GET  /v1/git/<agent-id>/state.git/info/refs?service=git-receive-pack  the refs, for a push
    POST /v1/git/<agent-id>/state.git/git-receive-pack                     a push (gitpush.py)

Each request acts with its own key: the password of its `Authorization: Basic` header (any
user name; letta-code sends `letta`), sent to Letta as `Authorization: Bearer <key>`; no
password, no key. The serve process's own LETTA_API_KEY is never read here. Letta's answer to
`GET /v1/agents/{id}?include=agent.tags` with that key decides: 401/403 -> 401 with
`WWW-Authenticate: Basic` (git then asks its credential helper, and only after such a
challenge), 404/422 -> 404 (git says "not found"), no answer -> 503. Keys are in no log line,
commit, status record or command line.

An agent that is not mounted: the request holds the history's one-writer lock (writerlock.py)
from before it reads the history until its answer is sent; a ref advertisement, and a push
before its pack is taken, first take the agent's live blocks into the history (gitsync.py), so
a pull sees an API edit at once and a push on a base the server has moved past is not a
fast-forward. A mounted agent (its daemon's pid file names a live daemon, which holds that lock
for its life): the request is handed to the daemon over its socket (handoff.py, mountgit.py).
Before an advertisement the daemon lists the server and commits its snapshot; a push's objects
are held in memory (_Quarantine) and sent to the daemon with the ref update and the request's
key, and the daemon's Verdict is the answer. serve then only reads the history.

When Letta does not answer (ServerAway) at the lookup or the take, a fetch is served the last
known history only to a key Letta accepted for that agent within ACCEPTED_FOR seconds
(AcceptedKeys, digests only); any other request, and every push, is refused with 503 and the
reason (issue 20 point 7).

dulwich's server side (`dulwich.web.HTTPGitApplication`, `dulwich.server.UploadPackHandler`,
`ReceivePackHandler`) speaks git's protocol; memfuse writes none of it. A push's ref update is
decided by PushHandler, a ReceivePackHandler whose update hook hands it to gitpush.Receiver. The HTTP server is waitress: pure Python
(no compiler, like the rest of memfuse's dependencies), maintained by the Pylons project, a
thread pool for a blocking WSGI app, and it takes git's chunked request bodies (a large fetch's
`have` lines, `Transfer-Encoding: chunked`) whole and hands them on with a Content-Length,
which is what dulwich.web expects (wsgiref refuses chunked bodies; cheroot passes the header on
with an input already de-chunked, which dulwich would de-chunk again).
"""
from __future__ import annotations

import base64
import errno
import binascii
import dataclasses
import functools
import hashlib
import ipaddress
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import parse_qs

import httpx
import trio
import waitress
from dulwich.protocol import (CAPABILITY_ATOMIC, CAPABILITY_DELETE_REFS,
                              CAPABILITY_SIDE_BAND_64K, SIDE_BAND_CHANNEL_PROGRESS)
from dulwich.object_store import BaseObjectStore, MemoryObjectStore
from dulwich.objects import ShaFile
from dulwich.server import DictBackend, ReceivePackHandler, UploadPackHandler
from dulwich.web import GunzipFilter, HTTPGitApplication, LimitedInputFilter

from . import gitpush, gitsync, handoff, procs
from .config import (DEFAULT_SERVE_LISTEN, Config, ConfigError, JsonRecord, RunningMount,
                     check_agent_id, letta_home, private_dir)
from .history import HistoryRepo
from .layout import CLASSIC, Layout, layout_for_tags
from .errors import AgentGone, KeyRefused, ServerAway, ServerCallError
from .remote import Client, Remote, make_client
from .writerlock import WriterLock

log = logging.getLogger("memfuse.serve")

DEFAULT_LISTEN = DEFAULT_SERVE_LISTEN
ROUTE = re.compile(r"/v1/git/(?P<agent>[^/]+)/state\.git(?P<rest>/[^/]+(?:/[^/]+)?)\Z")
UPLOAD_PACK = "git-upload-pack"
RECEIVE_PACK = "git-receive-pack"
LOCK_WAIT = 10.0  # seconds a request waits for another request's hold on the agent's history
ACCEPTED_FOR = 600.0  # seconds: while Letta does not answer, a fetch is served the last known
# history only with a key Letta accepted for that agent this recently (issue 20 point 7)
RETRY_BUDGET = 5.0  # seconds of retries of one Letta call within a request
HANDOFF_TIMEOUT = 120.0  # seconds serve waits for a mount daemon's answer (a sync, a push)
THREADS = 8  # requests answered at once
REALM = "Letta API key"

HANDOFF_FAILED = ("agent {agent} is mounted, and its daemon did not answer memfuse serve "
                  "({failure}); try again")
BUSY = ("the history of agent {agent} is busy: another request or process writes it; try "
        "again")
SMART_ONLY = "memfuse serve speaks git's smart HTTP only (git-upload-pack, git-receive-pack)"
# "away": no answer, a 5xx, or a 408/429 ("not now") within the retry budget (ServerAway)
AWAY_PUSH = ("the Letta server does not answer now ({failure}): a push cannot be checked "
             "against it or applied; nothing was applied. Push again once it answers")
AWAY_UNKNOWN_KEY = ("the Letta server does not answer now ({failure}), and it has not accepted "
                    "this request's key for agent {agent} in the last {minutes} minutes: the "
                    "last known history is served only to a key it accepted that recently")
AWAY_NO_HISTORY = ("the Letta server does not answer now ({failure}), and there is no history "
                   "of agent {agent} here to serve")


class Refusal(Exception):
    """An HTTP answer other than git's: `status` (`"404 Not Found"`), the `text` git shows
    (as `remote:` lines, text/plain), extra `headers`. `refused_by_letta`: Letta refused the
    request's key or does not know the agent (an earlier acceptance of the key no longer
    counts)."""

    def __init__(self, status: str, text: str, headers: list[tuple[str, str]] | None = None,
                 refused_by_letta: bool = False):
        super().__init__(text)
        self.status, self.text, self.headers = status, text, headers or []
        self.refused_by_letta = refused_by_letta

    def answer(self, start_response: Callable) -> list[bytes]:
        """Start the response and return its body."""
        body = (self.text + "\n").encode()
        start_response(self.status, [("Content-Type", "text/plain; charset=utf-8"),
                                     ("Content-Length", str(len(body))),
                                     ("Cache-Control", "no-cache"), *self.headers])
        return [body]


@dataclass(frozen=True)
class GitRequest:
    """One routed request: the agent, the git service and whether it is the ref
    advertisement (`info/refs`, then the history is brought up to date first)."""

    agent_id: str
    service: str
    advertisement: bool


def route(environ: dict[str, Any]) -> GitRequest:
    """The git request `environ` (WSGI) asks for. Raises Refusal: 404 for a path that is not
    `/v1/git/<agent-id>/state.git/...` or names no possible agent id, 403 for git's dumb
    protocol."""
    match = ROUTE.fullmatch(environ.get("PATH_INFO", ""))
    if match is None:
        raise Refusal("404 Not Found", "not found: memfuse serve answers "
                                       "/v1/git/<agent-id>/state.git")
    try:
        agent_id = check_agent_id(match["agent"])
    except ConfigError:
        raise Refusal("404 Not Found", f"not found: {match['agent']!r} is no agent id") from None
    method, rest = environ.get("REQUEST_METHOD", ""), match["rest"]
    if method == "GET" and rest == "/info/refs":
        service = parse_qs(environ.get("QUERY_STRING", "")).get("service", [""])[0]
        advertisement = True
    elif method == "POST" and rest in (f"/{UPLOAD_PACK}", f"/{RECEIVE_PACK}"):
        service, advertisement = rest[1:], False
    else:
        raise Refusal("403 Forbidden", SMART_ONLY)
    if service not in (UPLOAD_PACK, RECEIVE_PACK):
        raise Refusal("403 Forbidden", SMART_ONLY)
    return GitRequest(agent_id, service, advertisement)


def request_key(environ: dict[str, Any]) -> str | None:
    """The Letta API key a request acts with: the password of its `Authorization: Basic`
    header (`base64(user:password)`, any user), or None without one (no header, another
    scheme, an empty password, or a header that does not decode)."""
    scheme, _, encoded = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


def agent_config(agent_id: str, base_url: str) -> Config:
    """The paths of `agent_id`'s state as a mount has them (Config.build's defaults:
    `~/.letta/agents/<id>/memory.git` and beside it), with no key and no git remote: serve
    lends nothing of its own environment to a request."""
    return dataclasses.replace(Config.build(agent_id, base_url=base_url), api_key=None,
                               git_remote=None)


def mounted(config: Config) -> bool:
    """Whether a live daemon mounts the agent (its pid file, RunningMount.alive)."""
    record = RunningMount.load(config.pid_file)
    return record is not None and record.alive()


async def _answered(call, away: bool = False):
    """Await a Letta call made with the request's key; its refusals become the request's
    answer. Raises Refusal: 401 + `WWW-Authenticate: Basic` when Letta refuses the key (or
    wants one), 404 for an agent it does not know, 503 when it does not answer as it should.
    away: no answer (ServerAway) is raised as it is, for the caller to decide."""
    try:
        return await call
    except KeyRefused:
        raise Refusal("401 Unauthorized", "the Letta server refused the request's API key "
                                          "(the password of its Basic authorization)",
                      [("WWW-Authenticate", f'Basic realm="{REALM}"')],
                      refused_by_letta=True) from None
    except AgentGone as exc:
        raise Refusal("404 Not Found", f"not found: no such agent on the Letta server "
                                       f"({exc.status} {exc.detail})",
                      refused_by_letta=True) from None
    except ServerCallError as exc:
        if away and isinstance(exc, ServerAway):
            raise
        raise Refusal("503 Service Unavailable",
                      f"the Letta server did not answer as it should: {exc.failure}") from None


class AcceptedKeys:
    """Which request keys Letta accepted for which agent, and when (its answer to the agent
    lookup, `GET /v1/agents/{id}`): `(agent id, SHA-256 of the key) -> (layout, clock time)`.
    Only digests are kept. Thread-safe (waitress answers requests in threads). clock:
    seconds, monotonic."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[Layout, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _digest(key: str | None) -> str:
        return hashlib.sha256((key or "").encode()).hexdigest()

    def accepted(self, agent_id: str, key: str | None, layout: Layout) -> None:
        """Letta accepted `key` for `agent_id` just now; the agent's layout then. Entries
        older than ACCEPTED_FOR are dropped (nothing asks for them any more)."""
        now = self.clock()
        with self._lock:
            self._seen = {k: seen for k, seen in self._seen.items()
                          if now - seen[1] <= ACCEPTED_FOR}
            self._seen[(agent_id, self._digest(key))] = (layout, now)

    def refused(self, agent_id: str, key: str | None) -> None:
        """Letta refused `key` for `agent_id`, or knows no such agent, just now: an earlier
        acceptance no longer counts (a revoked key, a deleted agent)."""
        with self._lock:
            self._seen.pop((agent_id, self._digest(key)), None)

    def recent(self, agent_id: str, key: str | None, within: float) -> Layout | None:
        """The agent's layout when Letta accepted `key` for it at most `within` seconds ago,
        else None."""
        with self._lock:
            seen = self._seen.get((agent_id, self._digest(key)))
        if seen is None or self.clock() - seen[1] > within:
            return None
        return seen[0]


class _Held:
    """The history a request reads, opened, and the one-writer lock it holds on it (None: the
    agent is mounted, and `handoff` is its daemon's socket, which writes for it); `close`
    lets both go (once). `layout` is the agent's, `found` the live blocks taken into the
    history before the answer (None when they were not)."""

    def __init__(self, lock: WriterLock | None, repo: HistoryRepo, handoff: Path | None = None):
        self.lock, self.repo, self.handoff = lock, repo, handoff
        self.layout: Layout = CLASSIC
        self.found: gitsync.Live | None = None

    def close(self) -> None:
        try:
            self.repo.close()
        finally:
            if self.lock is not None:
                self.lock.release()


class _Body:
    """A WSGI body that closes `held` when the server closes it (after the last byte, or
    when the client went away)."""

    def __init__(self, body: Iterable[bytes], held: _Held):
        self.body, self.held = body, held

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self.held.close()


class GitEndpoint:
    """The WSGI application of `memfuse serve` for the agents of the Letta server `base_url`.

    transport: an httpx transport for the Letta client (tests). lock_wait: seconds a request
    waits for the agent's history. on_answer(request line, status line, error or None): after
    each request (the status record). keys: the keys Letta accepted (AcceptedKeys; a fetch
    while it does not answer is served to those of the last ACCEPTED_FOR seconds).
    """

    def __init__(self, base_url: str, *, transport: httpx.AsyncBaseTransport | None = None,
                 lock_wait: float = LOCK_WAIT,
                 on_answer: Callable[[str, str, str | None], None] | None = None,
                 keys: AcceptedKeys | None = None):
        self.base_url, self.transport, self.lock_wait = base_url, transport, lock_wait
        self.on_answer = on_answer
        self.keys = keys or AcceptedKeys()

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        what = f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')}"
        try:
            request = route(environ)
            held = trio.run(self._prepare, request, request_key(environ))
        except Refusal as refusal:
            log.info("%s: %s (%s)", what, refusal.status, refusal.text)
            self._answered(what, refusal.status, refusal.text)
            return refusal.answer(start_response)
        except Exception as exc:  # the history cannot be written: the request fails alone
            log.exception("%s: failed", what)
            self._answered(what, "500 Internal Server Error", repr(exc))
            return Refusal("500 Internal Server Error", f"memfuse serve failed: {exc}"
                           ).answer(start_response)
        self._answered(what, "200 OK", None)
        return self._git(environ, start_response, request, held, request_key(environ))

    def _answered(self, what: str, status: str, error: str | None) -> None:
        if self.on_answer is not None:
            self.on_answer(what, status, error)

    def _client(self, key: str | None) -> Client:
        """A Letta client acting with `key` (a request's own)."""
        return make_client(self.base_url, key, retry_budget=RETRY_BUDGET,
                           transport=self.transport)

    async def _prepare(self, request: GitRequest, key: str | None) -> _Held:
        """Check the request's key and the agent with Letta, hold the agent's history and, for
        an advertisement or a push, take the live blocks into it (a push is then judged
        against the server as it is). While Letta does not answer, a fetch is served the last
        known history (`_away`). Raises Refusal, OSError."""
        config = agent_config(request.agent_id, self.base_url)
        async with self._client(key) as client:
            remote = Remote(client, request.agent_id)
            try:
                layout = layout_for_tags(await _answered(remote.agent_tags(None), away=True))
            except ServerAway as exc:
                return await self._away(request, key, config, exc)
            except Refusal as refusal:
                if refusal.refused_by_letta:  # the key, or the agent, gone
                    self.keys.refused(request.agent_id, key)
                raise
            self.keys.accepted(request.agent_id, key, layout)
            held = await self._hold(config)
            held.layout = layout
            try:
                if held.handoff is not None:
                    if request.advertisement:
                        await self._synced(held, config)
                elif request.advertisement or request.service == RECEIVE_PACK:
                    held.found = await self._take(remote, held, config)
            except ServerAway as exc:
                held.close()
                return await self._away(request, key, config, exc)
            except BaseException:
                held.close()
                raise
        return held

    async def _away(self, request: GitRequest, key: str | None, config: Config,
                    exc: ServerAway) -> _Held:
        """Letta did not answer (`exc`): a fetch gets the agent's last known history, held,
        when Letta accepted this request's key for the agent within ACCEPTED_FOR seconds;
        anything else is refused. Raises Refusal 503 (a push; an unknown or old key; no
        history here)."""
        failure = exc.failure
        if request.service == RECEIVE_PACK:
            raise Refusal("503 Service Unavailable", AWAY_PUSH.format(failure=failure))
        layout = self.keys.recent(request.agent_id, key, ACCEPTED_FOR)
        if layout is None:
            raise Refusal("503 Service Unavailable", AWAY_UNKNOWN_KEY.format(
                failure=failure, agent=request.agent_id, minutes=round(ACCEPTED_FOR / 60)))
        held = await self._hold(config)
        held.layout = layout
        if held.repo.head() is None:
            held.close()
            raise Refusal("503 Service Unavailable", AWAY_NO_HISTORY.format(
                failure=failure, agent=request.agent_id))
        log.warning("agent %s: the Letta server does not answer (%s); the last known history "
                    "is served", request.agent_id, failure)
        return held

    @staticmethod
    async def _take(remote: Remote, held: _Held, config: Config) -> gitsync.Live:
        """Commit the agent's live blocks on the held history (gitsync). Raises Refusal,
        ServerAway."""
        found = await _answered(gitsync.live(remote, held.layout), away=True)
        sha = await trio.to_thread.run_sync(gitsync.take, held.repo, found, held.layout,
                                            config.block_map_file)
        if sha is not None:
            log.info("agent %s: the server's changes committed (%s)", remote.agent_id,
                     held.repo.last_message)
        for line in found.left_out:
            log.warning("agent %s: block %s; left out", remote.agent_id, line)
        return found

    @staticmethod
    async def _synced(held: _Held, config: Config) -> None:
        """Have the mount daemon list the server and commit its snapshot (handoff `sync`).
        Raises ServerAway when the server did not answer its listing, Refusal 503 when the
        daemon did not answer."""
        assert held.handoff is not None
        try:
            answer = await trio.to_thread.run_sync(handoff.call, held.handoff, {"op": "sync"},
                                                   HANDOFF_TIMEOUT)
        except handoff.HandoffError as exc:
            raise Refusal("503 Service Unavailable", HANDOFF_FAILED.format(
                agent=config.agent_id, failure=exc)) from None
        if "away" in answer:
            raise ServerAway(errno.EIO, str(answer["away"]))
        if "error" in answer:
            raise Refusal("503 Service Unavailable", HANDOFF_FAILED.format(
                agent=config.agent_id, failure=answer["error"]))

    async def _hold(self, config: Config) -> _Held:
        """The agent's history, opened: with its one-writer lock held (made when new, 0700),
        or, for a mounted agent, to read while its daemon writes (`handoff` set). Raises
        Refusal 503 when the lock stays taken by another request."""
        lock: WriterLock | None = WriterLock(config.writer_lock_file)
        private_dir(config.state_dir)
        if mounted(config) or not await trio.to_thread.run_sync(
                lock.acquire, self.lock_wait, lambda: mounted(config)):
            if not mounted(config):
                raise Refusal("503 Service Unavailable", BUSY.format(agent=config.agent_id))
            lock = None
            if not (config.history_dir / "HEAD").exists():  # the daemon makes it at mount
                raise Refusal("503 Service Unavailable", HANDOFF_FAILED.format(
                    agent=config.agent_id, failure=f"no history at {config.history_dir} yet"))
        try:
            repo = HistoryRepo(config.history_dir)
            await trio.to_thread.run_sync(repo.open)
            if lock is not None:
                private_dir(config.history_dir)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return _Held(lock, repo, None if lock is not None else config.handoff_socket)

    def _git(self, environ: dict[str, Any], start_response: Callable, request: GitRequest,
             held: _Held, key: str | None) -> Iterable[bytes]:
        """dulwich.web's answer from the held history (dulwich's own gzip and request-size
        filters, as `make_wsgi_chain` wraps them): upload-pack, or receive-pack whose ref
        updates memfuse decides (PushHandler)."""
        prefix = f"/v1/git/{request.agent_id}/state.git"
        if held.handoff is not None:  # mounted: its daemon takes the push, serve writes nothing
            quarantine = _Quarantine(held.repo.repo.object_store)
            app = HTTPGitApplication(DictBackend({prefix: _HandedRepo(held.repo.repo,
                                                                      quarantine)}))
            pushes = functools.partial(PushHandler, receiver=HandedReceiver(
                held.handoff, key, quarantine), after=lambda: None)
        else:
            app = HTTPGitApplication(DictBackend({prefix: held.repo.repo}))
            found = held.found.shown if held.found is not None else []
            receiver = gitpush.Receiver(
                held.repo, held.layout, {path: (block, attached) for path, block, attached
                                         in found}, lambda: self._client(key), request.agent_id)
            pushes = functools.partial(PushHandler, receiver=receiver, after=lambda: self._remember(
                request.agent_id, held, receiver))
        app.handlers = {UPLOAD_PACK.encode(): UploadPackHandler, RECEIVE_PACK.encode(): pushes}
        try:
            body = LimitedInputFilter(GunzipFilter(app))(environ, start_response)
        except BaseException:
            held.close()
            raise
        return _Body(body, held)


    def _remember(self, agent_id: str, held: _Held, receiver: gitpush.Receiver) -> None:
        """After a push moved the branch: the block map saved anew from what the branch shows
        now (the judged blocks with the push's steps applied: the new blocks' ids), so a mount
        started later knows them. A failure is a WARNING: the next request's advertisement
        saves it again."""
        try:
            gitsync.remember(((path, block, attached) for path, (block, attached)
                              in receiver.shown.items()),
                             agent_config(agent_id, self.base_url).block_map_file, held.layout)
        except OSError as exc:
            log.warning("agent %s: the block map was not saved after the push (%s); the next "
                        "request saves it", agent_id, exc)


class _Quarantine(MemoryObjectStore):
    """The objects a push to a mounted agent brings, held in memory, over the history's store
    `base`, which is read through and never written: the daemon adds them (mountgit.py)."""

    def __init__(self, base: BaseObjectStore):
        super().__init__(object_format=base.object_format)
        self.base = base

    def __getitem__(self, name):
        try:
            return super().__getitem__(name)
        except KeyError:
            return self.base[name]

    def contains_loose(self, sha) -> bool:
        return super().contains_loose(sha) or self.base.contains_loose(sha)

    def contains_packed(self, sha) -> bool:
        return self.base.contains_packed(sha)

    def incoming(self) -> list[ShaFile]:
        """The objects the push brought."""
        return list(self._data.values())


class _ReadOnlyRefs:
    """A history's refs that dulwich's receive-pack reads but never writes: the mount daemon
    moved the branch already (or refused to)."""

    def __init__(self, refs):
        self._refs = refs

    def __getattr__(self, name: str):
        return getattr(self._refs, name)

    def __getitem__(self, name):
        return self._refs[name]

    def __contains__(self, name) -> bool:
        return name in self._refs

    def set_if_equals(self, *_args, **_kwargs) -> bool:
        return False

    def remove_if_equals(self, *_args, **_kwargs) -> bool:
        return False

    def add_if_new(self, *_args, **_kwargs) -> bool:
        return False


class _HandedRepo:
    """A mounted agent's history as dulwich's handlers see it: read as it is, a push's objects
    going to `quarantine`, its refs never written by serve."""

    def __init__(self, repo, quarantine: _Quarantine):
        self._repo, self.object_store = repo, quarantine
        self.refs = _ReadOnlyRefs(repo.refs)

    def __getattr__(self, name: str):
        return getattr(self._repo, name)


class HandedReceiver:
    """Takes a push for a mounted agent: its objects (`quarantine`) and ref update go to the
    daemon on `socket` with the request's `key` (handoff `push`); the daemon's Verdict is the
    answer. Blocking."""

    moved = False  # serve moves nothing: the daemon did, and keeps its own block map

    def __init__(self, socket: Path, key: str | None, quarantine: _Quarantine):
        self.socket, self.key, self.quarantine = socket, key, quarantine

    def receive(self, ref: bytes, old: bytes, new: bytes) -> gitpush.Verdict:
        """The daemon's Verdict on the update of `ref` from `old` to `new`."""
        request = {"op": "push", "ref": ref.decode(), "old": old.decode(), "new": new.decode(),
                   "key": self.key,
                   "objects": handoff.objects_message(self.quarantine.incoming())}
        try:
            answer = handoff.call(self.socket, request, HANDOFF_TIMEOUT)
        except handoff.HandoffError as exc:
            return gitpush.Verdict(False, f"the mount's daemon did not answer ({exc}); the "
                                          f"push may be applied in part: fetch to see")
        if "error" in answer:
            return gitpush.Verdict(False, f"the mount's daemon failed: {answer['error']}")
        return gitpush.Verdict(bool(answer.get("ok")), str(answer.get("reason", "")),
                               tuple(str(line) for line in answer.get("lines", ())))


class PushHandler(ReceivePackHandler):
    """dulwich's receive-pack (it reads the pack into the history's object store and speaks
    the protocol), with memfuse deciding each ref update: `_on_update`, dulwich's hook before
    it writes a ref, hands the update to `receiver` (gitpush.Receiver), which checks the push,
    applies it to the server and moves the branch itself (to the pushed commit, or to the part
    applied), and answers `ok`, or the `ng` reason, which dulwich reports (report-status);
    the `remote:` lines go on side-band's progress channel. For an `ok`, dulwich's own write
    that follows (`set_if_equals(ref, old, new)`) finds the branch already moved and changes
    nothing; for an `ng` it writes nothing. Not offered: `atomic` (the server's changes cannot
    be taken back if another ref failed) and `delete-refs`. The history's hook files
    (pre-receive, update, post-receive) never run: they belong to whoever uses the history as
    a work tree. `after` runs once a push moved the branch."""

    def __init__(self, backend, args, proto, stateless_rpc: bool = False,
                 advertise_refs: bool = False, *,
                 receiver: gitpush.Receiver | HandedReceiver,
                 after: Callable[[], None]):
        super().__init__(backend, args, proto, stateless_rpc=stateless_rpc,
                         advertise_refs=advertise_refs)
        self.receiver, self.after = receiver, after

    def capabilities(self) -> Iterable[bytes]:
        return [c for c in super().capabilities()
                if c not in (CAPABILITY_ATOMIC, CAPABILITY_DELETE_REFS)]

    def _on_pre_receive(self, client_refs) -> None:
        return None

    def _on_post_receive(self, client_refs) -> None:
        return None

    def _on_update(self, ref_name: bytes, old_sha: bytes, new_sha: bytes) -> bytes | None:
        try:
            verdict = self.receiver.receive(ref_name, old_sha, new_sha)
        except Exception as exc:  # a bug: this push fails alone, with what is known
            log.exception("push of %s failed", ref_name.decode(errors="replace"))
            verdict = gitpush.Verdict(False, f"memfuse serve failed: {exc!r}")
        if self.receiver.moved:
            self.after()
        self._say(verdict.lines)
        return verdict.status

    def _say(self, lines: Iterable[str]) -> None:
        """`lines` as `remote:` lines (side-band progress), when the client takes them."""
        if not self.has_capability(CAPABILITY_SIDE_BAND_64K):
            return
        for line in lines:
            self.proto.write_sideband(SIDE_BAND_CHANNEL_PROGRESS, f"{line}\n".encode())


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); `[::1]:8285` for IPv6. Raises ConfigError."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host, int(port)


def loopback(host: str) -> bool:
    """Whether `host` is a loopback address or `localhost`: only then does a Basic password
    (an API key) cross no network in clear text."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class RunningServe(JsonRecord):
    """What a running `memfuse serve` writes so `memfuse status` shows it
    (`~/.letta/serve/<host>-<port>.json`, 0600): no key is ever in it."""

    url: str
    pid: int
    base_url: str
    started_at: float  # time.time()
    requests: int = 0
    last_request: str = ""  # "GET /v1/git/<agent>/state.git/info/refs: 200 OK"
    last_request_at: float | None = None
    last_error: str | None = None  # the last refusal or failure, in words
    last_error_at: float | None = None

    def alive(self) -> bool:
        """Whether its process still runs and is a `memfuse serve`."""
        return procs.is_memfuse_serve(self.pid) is not False and procs.uid_of(self.pid) is not None

    def render(self, now: float | None = None) -> str:
        """Lines for `memfuse status`."""
        now = time.time() if now is None else now
        lines = [f"memfuse serve at {self.url} (pid {self.pid}), server {self.base_url}",
                 f"  git URL        {self.url}/v1/git/<agent-id>/state.git",
                 f"  requests       {self.requests}"
                 + (f", last {_ago(self.last_request_at, now)}: {self.last_request}"
                    if self.last_request_at else "")]
        if self.last_error:
            lines.append(f"  last refusal   {_ago(self.last_error_at, now)}: {self.last_error}")
        return "\n".join(lines)


def _ago(at: float | None, now: float) -> str:
    return "never" if at is None else f"{max(0.0, now - at):.0f} s ago"


def serve_records(home: Path | None = None) -> list[tuple[Path, RunningServe]]:
    """Every `memfuse serve` record under `~/.letta/serve/` whose process still runs."""
    found = []
    for path in sorted((letta_home(home) / "serve").glob("*.json")):
        record = RunningServe.load(path)
        if record is not None and record.alive():
            found.append((path, record))
    return found


class ServeStatus:
    """The status record of one `memfuse serve` (`record_file`), rewritten after each
    request (GitEndpoint.on_answer) and removed at exit."""

    def __init__(self, record_file: Path, record: RunningServe):
        self.path, self.record = record_file, record
        self._lock = threading.Lock()
        private_dir(record_file.parent)
        record.save(record_file)

    def answered(self, what: str, status: str, error: str | None) -> None:
        with self._lock:
            record = self.record
            record.requests += 1
            record.last_request, record.last_request_at = f"{what}: {status}", time.time()
            if error is not None:
                record.last_error, record.last_error_at = f"{what}: {error}", time.time()
            try:
                record.save(self.path)
            except OSError as exc:
                log.warning("could not write %s: %s", self.path, exc)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class Server:
    """waitress serving `app` on (host, port), bound when made (port 0: a free one).
    `run` serves until SIGINT/SIGTERM (KeyboardInterrupt/SystemExit in the main thread) or
    `stop`; requests under way get a few seconds to finish."""

    def __init__(self, app: Callable, host: str, port: int, threads: int = THREADS):
        self._map: dict = {}  # waitress's dispatchers (the listening socket, connections)
        self._server = waitress.create_server(app, map=self._map, host=host, port=port,
                                              threads=threads, ident="memfuse",
                                              clear_untrusted_proxy_headers=True)
        bound_host, bound_port = self._server.effective_host, self._server.effective_port
        shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
        self.url = f"http://{shown}:{bound_port}"
        self.host, self.port = str(bound_host), int(bound_port)

    def run(self) -> None:
        """Serve until stopped; then close every connection and the listening socket."""
        try:
            self._server.run()
        finally:
            self._server.task_dispatcher.shutdown()
            self._close_all()

    def stop(self) -> None:
        """Ask `run` (in another thread) to return."""
        try:
            self._server.trigger.pull_trigger(self._close_all)
        except OSError:  # EBADF: another pull (a worker's answer) woke the loop, which ran
            pass  # `_close_all` already, the trigger itself included, before this pull wrote

    def _close_all(self) -> None:
        for dispatcher in list(self._map.values()):
            try:
                dispatcher.close()
            except OSError:
                pass


def record_file(host: str, port: int) -> Path:
    """Where the serve on (host, port) keeps its record: `~/.letta/serve/<host>-<port>.json`."""
    return letta_home() / "serve" / f"{host.replace(':', '_')}-{port}.json"

