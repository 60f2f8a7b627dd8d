"""`memfuse serve`: git's smart HTTP over each agent's history, the endpoint letta-code clones.

Routes (git's smart HTTP, protocol v0/v1, as Letta's own `letta/server/rest_api/routers/v1/
git_http.py` declares them and letta-code's `src/agent/memory-git.ts` builds the URL
`${LETTA_MEMFS_BASE_URL}/v1/git/${agentId}/state.git`):

    GET  /v1/git/<agent-id>/state.git/info/refs?service=git-upload-pack   the refs (advertisement)
    POST /v1/git/<agent-id>/state.git/git-upload-pack                      the pack
    ...  info/refs?service=git-receive-pack, git-receive-pack             403: no push yet

Each request acts with its own key: the password of its `Authorization: Basic` header (any
user name; letta-code sends `letta`), sent to Letta as `Authorization: Bearer <key>`; no
password, no key. The serve process's own LETTA_API_KEY is never read here. Letta's answer to
`GET /v1/agents/{id}?include=agent.tags` with that key decides: 401/403 -> 401 with
`WWW-Authenticate: Basic` (git then asks its credential helper, and only after such a
challenge), 404/422 -> 404 (git says "not found"), no answer -> 503. Keys are in no log line,
commit, status record or command line.

An agent that is mounted (its daemon's pid file names a live daemon) is answered 503 for now:
its daemon is its history's one writer, and handing requests to it is a later step. Otherwise
the request holds the history's one-writer lock (writerlock.py) from before it reads the
history until its answer is sent; a ref advertisement first takes the agent's live blocks into
the history (gitsync.py), so a pull sees an API edit at once.

dulwich's server side (`dulwich.web.HTTPGitApplication`, `dulwich.server.UploadPackHandler`)
speaks git's protocol; memfuse writes none of it. The HTTP server is waitress: pure Python
(no compiler, like the rest of memfuse's dependencies), maintained by the Pylons project, a
thread pool for a blocking WSGI app, and it takes git's chunked request bodies (a large fetch's
`have` lines, `Transfer-Encoding: chunked`) whole and hands them on with a Content-Length,
which is what dulwich.web expects (wsgiref refuses chunked bodies; cheroot passes the header on
with an input already de-chunked, which dulwich would de-chunk again).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
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
from dulwich.server import DictBackend, UploadPackHandler
from dulwich.web import GunzipFilter, HTTPGitApplication, LimitedInputFilter

from . import gitsync, procs
from .config import (Config, ConfigError, JsonRecord, RunningMount, check_agent_id, letta_home,
                     private_dir)
from .history import HistoryRepo
from .layout import layout_for_tags
from .errors import AgentGone, KeyRefused, ServerCallError
from .remote import Remote, make_client
from .writerlock import WriterLock

log = logging.getLogger("memfuse.serve")

DEFAULT_LISTEN = "127.0.0.1:8285"
ROUTE = re.compile(r"/v1/git/(?P<agent>[^/]+)/state\.git(?P<rest>/[^/]+(?:/[^/]+)?)\Z")
UPLOAD_PACK = "git-upload-pack"
RECEIVE_PACK = "git-receive-pack"
LOCK_WAIT = 10.0  # seconds a request waits for another request's hold on the agent's history
RETRY_BUDGET = 5.0  # seconds of retries of one Letta call within a request
THREADS = 8  # requests answered at once
REALM = "Letta API key"

MOUNTED = ("agent {agent} is mounted; serving a mounted agent comes later (memfuse umount it "
           "first, or use its mount)")
BUSY = ("the history of agent {agent} is busy: another request or process writes it; try "
        "again")
NO_PUSH = ("memfuse serve does not take pushes yet: this version serves clone, fetch and pull; "
           "a later version applies pushes to the Letta server")
SMART_ONLY = "memfuse serve speaks git's smart HTTP only (git-upload-pack)"


class Refusal(Exception):
    """An HTTP answer other than git's: `status` (`"404 Not Found"`), the `text` git shows
    (as `remote:` lines, text/plain), extra `headers`."""

    def __init__(self, status: str, text: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(text)
        self.status, self.text, self.headers = status, text, headers or []

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
    `/v1/git/<agent-id>/state.git/...` or names no possible agent id, 403 for a push
    (`git-receive-pack`) or git's dumb protocol."""
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
    if service == RECEIVE_PACK:
        raise Refusal("403 Forbidden", NO_PUSH)
    if service != UPLOAD_PACK:
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


async def _answered(call):
    """Await a Letta call made with the request's key; its refusals become the request's
    answer. Raises Refusal: 401 + `WWW-Authenticate: Basic` when Letta refuses the key (or
    wants one), 404 for an agent it does not know, 503 when it does not answer."""
    try:
        return await call
    except KeyRefused:
        raise Refusal("401 Unauthorized", "the Letta server refused the request's API key "
                                          "(the password of its Basic authorization)",
                      [("WWW-Authenticate", f'Basic realm="{REALM}"')]) from None
    except AgentGone as exc:
        raise Refusal("404 Not Found", f"not found: no such agent on the Letta server "
                                       f"({exc.status} {exc.detail})") from None
    except ServerCallError as exc:
        raise Refusal("503 Service Unavailable",
                      f"the Letta server did not answer as it should: {exc.failure}") from None


class _Held:
    """The history a request reads, opened, and the one-writer lock it holds on it; `close`
    lets both go (once)."""

    def __init__(self, lock: WriterLock, repo: HistoryRepo):
        self.lock, self.repo = lock, repo

    def close(self) -> None:
        try:
            self.repo.close()
        finally:
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
    each request (the status record).
    """

    def __init__(self, base_url: str, *, transport: httpx.AsyncBaseTransport | None = None,
                 lock_wait: float = LOCK_WAIT,
                 on_answer: Callable[[str, str, str | None], None] | None = None):
        self.base_url, self.transport, self.lock_wait = base_url, transport, lock_wait
        self.on_answer = on_answer

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
        return self._git(environ, start_response, request, held)

    def _answered(self, what: str, status: str, error: str | None) -> None:
        if self.on_answer is not None:
            self.on_answer(what, status, error)

    async def _prepare(self, request: GitRequest, key: str | None) -> _Held:
        """Check the request's key and the agent with Letta, hold the agent's history and, for
        an advertisement, take the live blocks into it. Raises Refusal, OSError."""
        config = agent_config(request.agent_id, self.base_url)
        async with make_client(self.base_url, key, retry_budget=RETRY_BUDGET,
                               transport=self.transport) as client:
            remote = Remote(client, request.agent_id)
            layout = layout_for_tags(await _answered(remote.agent_tags(None)))
            held = await self._hold(config)
            try:
                if request.advertisement:
                    found = await _answered(gitsync.live(remote, layout))
                    sha = await trio.to_thread.run_sync(gitsync.take, held.repo, found, layout,
                                                        config.block_map_file)
                    if sha is not None:
                        log.info("agent %s: the server's changes committed (%s)",
                                 request.agent_id, held.repo.last_message)
                    for line in found.left_out:
                        log.warning("agent %s: block %s; left out", request.agent_id, line)
            except BaseException:
                held.close()
                raise
        return held

    async def _hold(self, config: Config) -> _Held:
        """The agent's history, opened (made when new, 0700) with its one-writer lock held.
        Raises Refusal 503 when the agent is mounted or the lock stays taken."""
        if mounted(config):
            raise Refusal("503 Service Unavailable", MOUNTED.format(agent=config.agent_id))
        lock = WriterLock(config.writer_lock_file)
        private_dir(config.state_dir)
        if not await trio.to_thread.run_sync(lock.acquire, self.lock_wait,
                                             lambda: mounted(config)):
            text = MOUNTED if mounted(config) else BUSY
            raise Refusal("503 Service Unavailable", text.format(agent=config.agent_id))
        try:
            repo = HistoryRepo(config.history_dir)
            await trio.to_thread.run_sync(repo.open)
            private_dir(config.history_dir)
        except BaseException:
            lock.release()
            raise
        return _Held(lock, repo)

    @staticmethod
    def _git(environ: dict[str, Any], start_response: Callable, request: GitRequest,
             held: _Held) -> Iterable[bytes]:
        """dulwich.web's answer from the held history: upload-pack only (dulwich's own
        gzip and request-size filters, as `make_wsgi_chain` wraps them)."""
        prefix = f"/v1/git/{request.agent_id}/state.git"
        app = HTTPGitApplication(DictBackend({prefix: held.repo.repo}))
        app.handlers = {UPLOAD_PACK.encode(): UploadPackHandler}  # never receive-pack
        try:
            body = LimitedInputFilter(GunzipFilter(app))(environ, start_response)
        except BaseException:
            held.close()
            raise
        return _Body(body, held)


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
        self._server.trigger.pull_trigger(self._close_all)

    def _close_all(self) -> None:
        for dispatcher in list(self._map.values()):
            try:
                dispatcher.close()
            except OSError:
                pass


def record_file(host: str, port: int) -> Path:
    """Where the serve on (host, port) keeps its record: `~/.letta/serve/<host>-<port>.json`."""
    return letta_home() / "serve" / f"{host.replace(':', '_')}-{port}.json"

