"""History on a git remote: the history's branch pushed after each snapshot, in the background.

`GitRemote` is one remote URL (a path to a bare repository, `file://`, `git://`, `http(s)://`)
with its credentials: from the URL's userinfo, else (HTTP) from git's credential helpers
(`git credential fill`, which honours the user's `credential.helper`) when the server asks.
Credentials live in this process's memory only: every text memfuse shows (log lines, status,
errors) goes through `GitRemote.scrub`, and the URL shown is `GitRemote.shown` (userinfo as
`***`). `GitRemote.push` is blocking (dulwich): one attempt, never forced.

`Pusher` is the trio side: it pushes when `poke`d (after each commit), retries failures with
exponential backoff (RETRY_FIRST doubling to RETRY_MAX seconds; pokes during a wait do not cut
it short, and the attempt after the wait pushes whatever the head is then, so it catches up),
and retries a diverged remote at the slow rate (RETRY_MAX), saying so once.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import trio
import urllib3
import urllib3.exceptions
from dulwich.client import (HTTPUnauthorized, LocalGitClient, TCPGitClient,
                            Urllib3HttpGitClient, default_urllib3_manager)
from dulwich.errors import HangupException, NotGitRepository
from dulwich.graph import can_fast_forward
from dulwich.repo import Repo

from .history import BRANCH

log = logging.getLogger("memfuse.gitremote")

RETRY_FIRST = 1.0    # seconds before the first retry of a failed push
RETRY_MAX = 60.0     # the backoff's ceiling, and the rate a diverged remote is retried at
PUSH_TIMEOUT = 60.0  # seconds a push's connection may stay silent (socket timeout)
HELPER_TIMEOUT = 10.0  # seconds `git credential fill` may take (a helper may wait for a person)
MAX_URL = 8192       # characters
SECRET_NAME_MIN = 8  # characters from which a user name given with no password is scrubbed
SCHEMES = ("http", "https", "git", "file")
FILL_ENV_DROPPED = ("GIT_ASKPASS", "SSH_ASKPASS", "GIT_DIR", "GIT_WORK_TREE", "GIT_COMMON_DIR")
USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]*@")


class RemoteError(ValueError):
    """A `--git-remote` value memfuse cannot push to; the message is for a person and holds no
    credentials."""


class PushError(Exception):
    """One push attempt failed (remote away, refused, not a repository, credentials refused);
    the message is for a person, already scrubbed of credentials."""


@dataclass
class PushOutcome:
    """What one attempt found. head: the local branch's commit (None: no commit yet);
    pushed: the remote's branch is now `head` (it was sent, or it already was); diverged: the
    remote's branch commit when it is not an ancestor of `head` (nothing was sent)."""

    head: bytes | None
    pushed: bool
    diverged: bytes | None = None


@dataclass(frozen=True)
class RemoteUrl:
    """A `--git-remote` value taken apart (parse_remote_url). kind: "path" (a bare repository
    on this machine, `path` absolute), "git" or "http" (`path` the URL's path); url: as given,
    credentials included; shown: for people (userinfo as `***`); bare_url: scheme, host, port
    and path only (None for a plain path); username, password: percent-decoded userinfo;
    userinfo: the same two as written in the URL (what `GitRemote.scrub` must also hide)."""

    kind: str
    path: str
    url: str
    shown: str
    bare_url: str | None = None
    username: str | None = None
    password: str | None = None
    userinfo: tuple[str | None, str | None] = field(default=(None, None), repr=False)


def parse_remote_url(url: str) -> RemoteUrl:
    """Take a `--git-remote` value apart: a path (absolute, relative to the current directory,
    or `~`), `file://PATH`, `git://HOST[:PORT]/PATH` or `http(s)://[USER[:TOKEN]@]HOST[:PORT]/PATH`.
    Pure: no I/O beyond resolving a relative path. Raises RemoteError (its message holds no
    credentials) for anything else: ssh and scp-like `host:path` (a push must never wait for a
    password prompt), a query or fragment, a line break or NUL, a missing host."""
    if not url or len(url) > MAX_URL or any(c in url for c in "\n\r\0"):
        raise RemoteError(f"the git remote must be one line of at most {MAX_URL} characters")
    if "://" not in url:
        return _parse_path(url)
    scheme = url.partition("://")[0].lower()
    if scheme not in SCHEMES:
        raise RemoteError(f"{_userinfo_hidden(url)!r}: memfuse pushes to a path, file://, "
                          f"git:// or http(s):// URL (not {scheme}://)")
    try:  # urllib's errors quote the text they choke on: a password, maybe
        parts = urlsplit(url)
        hostname, port = parts.hostname, parts.port
    except ValueError:
        raise RemoteError(f"{_userinfo_hidden(url)!r}: not a valid URL (a user name or "
                          f"password with '/', '@' or ':' in it must be percent-encoded)"
                          ) from None
    netloc = hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if port is not None:
        netloc += f":{port}"
    bare_url = urlunsplit((scheme, netloc, parts.path, "", ""))
    shown = urlunsplit((scheme, ("***@" if "@" in parts.netloc else "") + netloc,
                        parts.path, "", ""))
    _refuse_unsafe_parts(url, shown, parts)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise RemoteError(f"{shown!r}: a file:// URL names a path on this machine")
        return RemoteUrl("path", unquote(parts.path), url, shown, bare_url)
    if not parts.hostname:
        raise RemoteError(f"{shown!r}: no host")
    return RemoteUrl("git" if scheme == "git" else "http", parts.path, url, shown, bare_url,
                     unquote(parts.username) if parts.username is not None else None,
                     unquote(parts.password) if parts.password is not None else None,
                     (parts.username, parts.password))


def _parse_path(url: str) -> RemoteUrl:
    """A remote given as a path: absolute, so that a later chdir cannot move it."""
    if re.match(r"^[^/]*:", url):  # scp-like user@host:path, or an unknown scheme
        raise RemoteError(f"{_userinfo_hidden(url)!r}: memfuse pushes to a path, "
                          f"file://, git:// or http(s):// URL (not ssh)")
    path = str(Path(url).expanduser().absolute())
    return RemoteUrl("path", path, path, path)


def _refuse_unsafe_parts(url: str, shown: str, parts) -> None:
    """RemoteError for a URL part that would leak or mislead: a line break or NUL anywhere
    once decoded, a query or a fragment."""
    if any(c in unquote(url) for c in "\n\r\0"):  # the user name goes into the lines of
        # `git credential fill`'s request: `evil%0Ahost=github.com@attacker` would ask
        # for github.com's credentials and send them to attacker
        raise RemoteError(f"{shown!r}: a line break or NUL (%0A, %0D, %00) in the "
                          f"URL: refused")
    if parts.query or parts.fragment:  # `?private_token=...` would be shown and sent
        raise RemoteError(f"{shown!r} (its ?query or #fragment not shown): a git "
                          f"remote URL has no query or fragment (credentials go in "
                          f"user:token@ or a credential helper)")


class GitRemote:
    """One git remote to push the history's branch (refs/heads/main) to.

    url: a path to a bare repository (absolute, or relative to the current directory),
    `file://PATH`, `git://HOST[:PORT]/PATH` or `http(s)://[USER[:TOKEN]@]HOST[:PORT]/PATH`.
    Raises RemoteError for anything else (ssh and scp-like `host:path` included: a push must
    never wait for a password prompt). The URL with its credentials is kept in memory only.
    """

    def __init__(self, url: str, timeout: float = PUSH_TIMEOUT):
        parsed = parse_remote_url(url)
        self.timeout = timeout
        self._lock = threading.Lock()  # one push at a time (the last one at umount included)
        self._filled: tuple[str, str] | None = None  # from a credential helper, this run only
        self._secrets: set[str] = set()
        self.kind, self.path, self.url, self.shown = (parsed.kind, parsed.path, parsed.url,
                                                      parsed.shown)
        self.bare_url = parsed.bare_url
        self.username, self.password = parsed.username, parsed.password
        self._keep_credentials(*parsed.userinfo)
        self.secret_in_url = bool(self._secrets)  # a password, or a token as the user name

    def __repr__(self) -> str:
        return f"GitRemote({self.shown!r})"

    def _keep_credentials(self, username: str | None, password: str | None) -> None:
        """Have `scrub` hide the password; the user name only when it carries the secret (no
        password: `https://TOKEN@host/...`) and is as long as a token (SECRET_NAME_MIN): a
        user name such as `git` is no secret, and scrubbing it would turn "not a git
        repository" into "not a *** repository"."""
        if password:
            self._keep_secret(password)
        elif username and len(unquote(username)) >= SECRET_NAME_MIN:
            self._keep_secret(username)

    def _keep_secret(self, secret: str | None) -> None:
        if secret:  # a new set, not an update: `scrub` may iterate it in another thread
            self._secrets = self._secrets | {secret, unquote(secret),
                                             quote(unquote(secret), safe="")}

    def scrub(self, text: str) -> str:
        """`text` with every secret this remote knows (the password from the URL or a helper,
        raw or percent-encoded; a token-long user name given with no password) and any URL
        userinfo replaced by `***`."""
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return USERINFO.sub(r"\1***@", text)

    def push(self, repo_path: Path) -> PushOutcome:
        """Push the branch of the repository at `repo_path` to this remote: one attempt,
        blocking (call it from a worker thread). The remote's branch is created when missing
        and moved only forward (fast-forward); a remote branch that is not an ancestor of
        ours is left alone (PushOutcome.diverged). Raises PushError."""
        with self._lock:
            try:
                repo = Repo(str(repo_path))
            except Exception as exc:
                raise PushError(f"the history at {repo_path} cannot be opened: {exc}") from None
            try:
                head = repo.refs.as_dict().get(BRANCH)
                if head is None:
                    return PushOutcome(None, False)
                try:
                    return self._send(repo, head)
                except PushError:
                    raise
                except Exception as exc:
                    raise PushError(self.scrub(describe(exc))) from None
            finally:
                repo.close()

    def _send(self, repo: Repo, head: bytes) -> PushOutcome:
        found: dict[str, bytes | None] = {}

        def update_refs(refs: dict[bytes, bytes]) -> dict[bytes, bytes]:
            theirs = refs.get(BRANCH)
            if theirs is not None and theirs == b"0" * 40:
                theirs = None
            found["theirs"] = theirs
            if theirs == head:
                return {}
            if theirs is not None and not (theirs in repo.object_store
                                           and can_fast_forward(repo, theirs, head)):
                found["diverged"] = theirs
                return {}  # never forced
            return {BRANCH: head}

        if self.kind == "http":
            result = self._send_http(repo, update_refs)
        else:
            if self.kind == "path":
                _refuse_a_work_tree(self.path)
            client = LocalGitClient() if self.kind == "path" else _tcp_client(self, self.timeout)
            result = client.send_pack(self.path, update_refs, repo.generate_pack_data)
        if "theirs" not in found:
            raise PushError("the remote did not list its branches")
        if found.get("diverged") is not None:
            return PushOutcome(head, False, found["diverged"])
        refused = (result.ref_status or {}).get(BRANCH)
        if refused:
            raise PushError(f"the remote refused the update of main: {self.scrub(str(refused))}")
        return PushOutcome(head, True)

    def _send_http(self, repo: Repo, update_refs):
        def send(username: str | None, password: str | None):
            client = Urllib3HttpGitClient(self.bare_url, username=username, password=password,
                                          timeout=self.timeout,
                                          pool_manager=_http_pool(self.bare_url, self.timeout))
            return client.send_pack("", update_refs, repo.generate_pack_data)

        if self.password is not None:  # the URL's credentials, and only them
            try:
                return send(self.username, self.password)
            except HTTPUnauthorized:
                raise PushError("the server refused the credentials in the URL "
                                "(HTTP 401)") from None
        if self._filled is not None:
            try:
                return send(*self._filled)
            except HTTPUnauthorized:
                self._filled = None  # maybe changed in the helper since: ask again below
        try:
            return send(self.username, None) if self.username else send(None, None)
        except HTTPUnauthorized:
            pass
        filled = self._fill()
        if filled is None:
            raise PushError("the server asks for credentials (HTTP 401) and neither the URL nor "
                            "git's credential helpers (git credential fill) have any")
        try:
            result = send(*filled)
        except HTTPUnauthorized:
            raise PushError("the server refused the credentials git's credential helper gave "
                            "(HTTP 401)") from None
        self._filled = filled
        return result

    def _fill(self) -> tuple[str, str] | None:
        """(username, password) from `git credential fill` for this URL, or None. Never
        prompts: no terminal, GIT_TERMINAL_PROMPT=0, no askpass. It runs in / (the daemon's
        directory may be in a repository, whose config would name helpers or include files)
        with the user's environment less memfuse's own (LETTA_API_KEY, MEMFUSE_GIT_REMOTE:
        a helper is no business of theirs) and anything that would pick a repository."""
        request = f"url={self.bare_url}\n" + (f"username={self.username}\n"
                                              if self.username else "") + "\n"
        env = {k: v for k, v in os.environ.items()
               if k not in FILL_ENV_DROPPED and not k.startswith(("LETTA_", "MEMFUSE_"))}
        env["GIT_TERMINAL_PROMPT"] = "0"
        try:
            answer = subprocess.run(["git", "-c", "core.askPass=", "credential", "fill"],
                                    input=request, capture_output=True, text=True, env=env,
                                    cwd="/", timeout=HELPER_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("git credential fill for %s failed: %s", self.shown,
                        type(exc).__name__)
            return None
        if answer.returncode != 0:
            return None  # no helper has them (its stderr may echo the request: not logged)
        if "\r" in answer.stdout or "\0" in answer.stdout:
            raise PushError("git's credential helper answered with a carriage return or NUL "
                            "in a value: not used")
        fields = dict(line.split("=", 1) for line in answer.stdout.split("\n") if "=" in line)
        username, password = fields.get("username"), fields.get("password")
        if not username or password is None:
            return None
        self._keep_credentials(username, password)
        return username, password


def _userinfo_hidden(url: str) -> str:
    """`url` with everything between its scheme (if any) and its last `@` hidden, for error
    messages about URLs that are refused or could not be parsed: a password with an unencoded
    `/`, `@` or `:` in it ends nowhere a parser would say, so all of it goes."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return scheme + sep + rest


def _refuse_a_work_tree(path: str) -> None:
    """Raise PushError when the repository at `path` is not bare: dulwich's local client
    ignores receive.denyCurrentBranch, so a push would move the branch checked out there and
    its work tree would show our files as staged deletions. (No repository at all: dulwich's
    NotGitRepository, said by `describe`.)"""
    target = Repo(path)
    try:  # a work tree's .git directory opens as bare: its config says otherwise
        bare = target.bare and target.get_config().get_boolean((b"core",), b"bare", True)
    finally:
        target.close()
    if not bare:
        raise PushError("not a bare repository (create it with: git init --bare); a push "
                        "would move the branch checked out in its work tree")


def _http_pool(url: str, timeout: float):
    """dulwich's urllib3 pool manager for `url` (proxies from the environment, certificates
    checked) with urllib3's retries off: its default Retry(3) made a silent remote hold a push
    for 4 timeouts, not one. Redirects are still followed (by the pool manager itself)."""
    return default_urllib3_manager(
        None, base_url=url, timeout=timeout,
        pool_manager_cls=partial(urllib3.PoolManager, retries=False),
        proxy_manager_cls=partial(urllib3.ProxyManager, retries=False))


def _tcp_client(remote: GitRemote, timeout: float) -> TCPGitClient:
    parts = urlsplit(remote.bare_url)
    # dulwich's git:// client opens blocking sockets with no timeout of their own: without a
    # default one, a remote that stops answering mid-push would hold a worker thread forever.
    # trio's sockets (the Letta client) are non-blocking and unaffected.
    if socket.getdefaulttimeout() is None:
        socket.setdefaulttimeout(timeout)
    return TCPGitClient(parts.hostname, port=parts.port)


def describe(exc: BaseException) -> str:
    """A person's words for why a push attempt failed (not scrubbed: `GitRemote.scrub` it)."""
    if isinstance(exc, NotGitRepository):
        return "not a git repository (create it with: git init --bare)"
    if isinstance(exc, HangupException):
        return f"the remote hung up ({str(exc).strip() or 'no reason given'})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    cause = exc.__cause__  # urllib3's, in dulwich's GitProtocolError
    if isinstance(cause, urllib3.exceptions.NewConnectionError):  # a ConnectTimeoutError too
        reason = str(cause).rpartition("Failed to establish a new connection: ")[2]
        return ("connection refused" if "Connection refused" in reason
                else f"cannot connect: {reason}")
    if isinstance(exc, (socket.timeout, TimeoutError)) or isinstance(
            cause, urllib3.exceptions.TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    if "Connection refused" in text:  # urllib3's, wrapped in a long GitProtocolError
        return "connection refused"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Pusher:
    """Keeps the remote's branch at the history's head, in the background.

    remote: the GitRemote (for its shown URL and scrub). attempt: one push, awaitable
    (the daemon runs `remote.push(history_dir)` in a worker thread; tests give a fake) that
    returns a PushOutcome or raises PushError. Times: seconds; `last_push_at`,
    `last_error_at` are time.time().
    """

    def __init__(self, remote: GitRemote, attempt: Callable[[], Awaitable[PushOutcome]], *,
                 retry_first: float = RETRY_FIRST, retry_max: float = RETRY_MAX):
        self.remote = remote
        self._attempt = attempt
        self.retry_first, self.retry_max = retry_first, retry_max
        self._wanted = trio.Event()
        self._wanted.set()  # push at start: what an earlier mount left unpushed goes out too
        self.last_push: bytes | None = None  # the commit the remote's branch was last set to
        self.last_push_at: float | None = None
        self.last_error: str | None = None  # kept after a later success (status says so)
        self.last_error_at: float | None = None
        self.diverged: bool = False  # the last attempt found the remote diverged
        self.failures = 0  # failed attempts in a row
        self.retry_at: float | None = None  # trio time of the next retry while backing off
        self.pushing_since: float | None = None  # time.time() the attempt under way began
        self.attempted = False  # an attempt was made (the mount was up: `run` started)

    def poke(self) -> None:
        """A commit was made: push it (now, or when the current wait for a retry ends)."""
        self._wanted.set()

    async def run(self) -> None:
        """Push whenever poked, with backoff on failure, forever (cancel to stop)."""
        delay = 0.0
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            if await self.push_once():
                delay = 0.0
                continue
            delay = (self.retry_max if self.diverged
                     else min(self.retry_max, max(self.retry_first, delay * 2)))
            self.retry_at = trio.current_time() + delay
            await trio.sleep(delay)  # a poke meanwhile only sets _wanted: no hammering
            self.retry_at = None
            self._wanted.set()  # the retry pushes whatever the head is by then

    async def push_once(self, last: bool = False) -> bool:
        """One attempt; updates the status fields and logs (a failure, unless `last`: the
        caller says it). Returns whether the remote's branch is now the local head."""
        self.attempted = True
        self.pushing_since = time.time()
        try:
            outcome = await self._attempt()
        except PushError as exc:
            return self._failed(self.remote.scrub(str(exc)), last)
        except Exception as exc:  # a bug in the push: logged, then retried as a failure
            log.exception("push to %s failed unexpectedly", self.remote.shown)
            return self._failed(self.remote.scrub(describe(exc)), last)
        finally:
            self.pushing_since = None
        if outcome.diverged is not None:
            message = (f"diverged: the remote's main ({outcome.diverged.decode()[:7]}) has "
                       f"commits that are not in this history; not forced" +
                       ("" if last else f" (retrying every {self.retry_max:g} s)"))
            if not self.diverged and not last:
                log.warning("git remote %s: %s", self.remote.shown, message)
            self.diverged = True
            self.failures += 1
            self.last_error, self.last_error_at = message, time.time()
            return False
        if self.failures:
            log.info("git remote %s: pushed %s after %d failed attempt(s)", self.remote.shown,
                     outcome.head.decode()[:7] if outcome.head else "nothing", self.failures)
        self.diverged, self.failures = False, 0
        if outcome.pushed and outcome.head != self.last_push:
            self.last_push, self.last_push_at = outcome.head, time.time()
        return True

    def _failed(self, message: str, last: bool = False) -> bool:
        if not last and (message != self.last_error or self.failures == 0):
            log.warning("git remote %s: push failed (%s); retrying with backoff up to %g s",
                        self.remote.shown, message, self.retry_max)
        self.diverged = False
        self.failures += 1
        self.last_error, self.last_error_at = message, time.time()
        return False

    async def last_push_now(self, timeout: float) -> None:
        """At unmount: one more attempt, given up after `timeout` seconds (a dead remote
        never holds the unmount; what is not pushed goes out at the next mount). Nothing when
        no attempt was ever made: the mount never got up (it failed after the pusher was
        made), so there is nothing of this run to push."""
        if not self.attempted:
            return
        with trio.move_on_after(timeout) as scope:
            if not await self.push_once(last=True):
                log.warning("git remote %s: the last push failed (%s); the next mount pushes "
                            "what is left", self.remote.shown, self.last_error)
        if scope.cancelled_caught:
            log.warning("git remote %s: the last push did not finish within %g s; the next "
                        "mount pushes it", self.remote.shown, timeout)
