"""The async Letta client: the block API calls memfuse needs, over httpx under trio.

Facts about the API are from the Letta server source (release 0.16.8) and were checked against a
running server: list endpoints return JSON arrays and page with `limit` and `after` (a block id);
errors carry `{"detail": ...}`; 409 means two server transactions raced and is worth a retry.
"""
from __future__ import annotations

import hashlib
import json as jsonlib
import logging
import ssl
import threading
from typing import Any, Callable

import httpx
import trio

from .config import DEFAULT_BASE_URL
from .model import Block

log = logging.getLogger("memfuse.letta")

# Blocks per list request. 0.16.8 caps no page size, and each page of the attached listing
# re-reads the agent; a page's time grows with its size (0.13 s for 1,000 blocks of 5 KB,
# 0.23 s for 2,000 on loopback), so pages of this many keep a listing to few requests.
PAGE_SIZE = 2000
PAGES_KEPT = 16  # listing answers remembered (by request) to skip decoding an unchanged one
AGENTS_PAGE = 100  # agents per `GET /v1/agents/` request (the server's default is 50)


class LettaError(Exception):
    """A Letta API call failed. `status` is the HTTP status (None when no answer came back)."""

    def __init__(self, method: str, path: str, status: int | None, detail: str):
        self.method, self.path, self.status, self.detail = method, path, status, detail
        where = f"{method} {path}"
        super().__init__(f"{where}: {status} {detail}" if status else f"{where}: {detail}")


class NotFound(LettaError):
    """404: the agent or block does not exist."""


class BadRequest(LettaError):
    """400: the server refused the arguments."""


class Conflict(LettaError):
    """409: a conflict that outlasted the retry budget (e.g. a duplicate attached label)."""


class Invalid(LettaError):
    """422: request validation failed (e.g. an id of the wrong shape)."""


class Unauthorized(LettaError):
    """401/403: the API key is missing or wrong."""


class ServerError(LettaError):
    """5xx that outlasted the retry budget."""


class Unreachable(LettaError):
    """No HTTP answer (connect error, timeout) within the retry budget."""


class Throttled(LettaError):
    """408 or 429 that outlasted the retry budget: the server did not act, and asks to be
    asked again later (`retry_after`: seconds from its `Retry-After` header, or None)."""

    def __init__(self, method: str, path: str, status: int | None, detail: str,
                 retry_after: float | None = None):
        super().__init__(method, path, status, detail)
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a `Retry-After` header in seconds (an HTTP date is not used: None)."""
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


_BY_STATUS = {400: BadRequest, 401: Unauthorized, 403: Unauthorized, 404: NotFound,
              409: Conflict, 422: Invalid}


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail if detail is not None else response.text[:500] or response.reason_phrase)


_contexts = threading.local()


def _tls() -> ssl.SSLContext:
    """The TLS context the clients of this thread share: httpx makes one per client otherwise,
    loading the CA bundle each time (20 ms; memfuse serve makes a client per request, profiled
    at 6 % of a push's busy time). One per thread, not one per process: httpcore sets the
    context's ALPN protocols at each TLS connect, which must not race another thread's
    handshake (serve answers requests in a pool of threads)."""
    context = getattr(_contexts, "tls", None)
    if context is None:
        context = _contexts.tls = httpx.create_ssl_context()
    return context


class LettaClient:
    """Async client for the Letta block API (use as `async with LettaClient(...) as client`).

    base_url: server root such as `http://localhost:8283`. api_key: sent as a Bearer token, never
    logged. timeout: seconds per HTTP request; connect_timeout: seconds to open a connection (a
    dead server is found out in this long). retry_budget: seconds within which transient
    failures (connect errors and timeouts, 5xx, 409; 408 and 429 for every method, no sooner
    than their `Retry-After`) are retried with exponential backoff (0.1 s doubling to 2 s);
    after it the typed error is raised (Throttled for 408/429). A read may ask for `budget=0` instead:
    one attempt, no waiting (a request on a pooled connection the server closed is repeated
    once at once). Non-idempotent calls (create) are retried only when the request provably
    never reached the server (connect errors).

    `requests` counts the HTTP requests sent (each attempt, answered or not) and
    `received_bytes` the bytes of the answers' bodies, since the client was made: what the
    mount costs the server (`memfuse status`, scripts/bench).
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None, *,
                 timeout: float = 10.0, connect_timeout: float = 1.0,
                 retry_budget: float = 10.0, transport: httpx.AsyncBaseTransport | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.retry_budget = retry_budget
        self.connect_timeout = connect_timeout
        self.requests = 0
        self.received_bytes = 0
        self._pages: dict[tuple, tuple[bytes, list[Block]]] = {}  # request -> (digest, blocks)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                       timeout=httpx.Timeout(timeout, connect=connect_timeout),
                                       transport=transport, verify=_tls())

    async def __aenter__(self) -> "LettaClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _request(self, method: str, path: str, *, params: dict | None = None,
                       json: dict | None = None, idempotent: bool = True,
                       budget: float | None = None, timeout: float | None = None,
                       raw: bool = False) -> Any:
        """One call with retries (see the class). Returns the decoded JSON answer, or its body
        as bytes when `raw`; None for an empty body. Raises LettaError subclasses."""
        budget = self.retry_budget if budget is None else budget
        options: dict[str, Any] = {}
        if timeout is not None:
            options["timeout"] = httpx.Timeout(timeout, connect=self.connect_timeout)
        deadline = trio.current_time() + budget
        delay = 0.1
        stale_connection_retried = False
        while True:
            self.requests += 1
            try:
                response = await self._http.request(method, path, params=params, json=json,
                                                    **options)
            except httpx.TransportError as exc:
                stale = isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError,
                                         httpx.WriteError))
                if stale and idempotent and not stale_connection_retried:
                    # The server closed a pooled connection (it restarted, say): once more.
                    stale_connection_retried = True
                    continue
                retryable = idempotent or isinstance(exc, httpx.ConnectError)
                error: LettaError = Unreachable(method, path, None,
                                                f"{type(exc).__name__}: {exc}".rstrip(": "))
            else:
                self.received_bytes += len(response.content)
                if response.status_code < 400:
                    return _decoded(response, method, path, raw)
                error, retryable = _refusal(response, method, path, idempotent)
                if isinstance(error, Throttled) and error.retry_after is not None:
                    delay = max(delay, error.retry_after)  # the server said when: not sooner
            if not retryable or trio.current_time() + delay > deadline:
                raise error
            log.debug("retrying after %s (in %.1f s)", error, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _paginate(self, path: str, params: dict[str, Any], budget: float | None = None,
                        on_page: Callable[[int], None] | None = None) -> list[Block]:
        blocks: list[Block] = []
        after: str | None = None
        while True:
            page_params = dict(params, limit=PAGE_SIZE, **({"after": after} if after else {}))
            page = await self._page(path, page_params, budget)
            blocks.extend(page)
            if on_page is not None:
                on_page(len(blocks))
            if len(page) < PAGE_SIZE:
                return blocks
            after = page[-1].id

    async def _page(self, path: str, params: dict[str, Any], budget: float | None
                    ) -> list[Block]:
        """One page of a listing. A page whose bytes equal the last answer to the same request
        is not decoded again: the same Block objects come back (a poller lists unchanged
        blocks over and over; decoding is most of its cost)."""
        body = await self._request("GET", path, params=params, budget=budget, raw=True)
        if body is None:
            return []
        key = (path, tuple(sorted(params.items())))
        # sha256, not blake2b: OpenSSL's is about twice as fast as CPython's own blake2b here
        # (4 against 7.5-11 ms for the 5.5 MB of 1,000 blocks of 5 KB, every full listing)
        digest = hashlib.sha256(body).digest()
        cached = self._pages.get(key)
        if cached is not None and cached[0] == digest:
            return cached[1]
        try:
            page = [Block.from_json(item) for item in jsonlib.loads(body)]
        except (ValueError, TypeError, KeyError, AttributeError):
            raise LettaError("GET", path, 200, "the answer is not a list of blocks") from None
        self._pages[key] = (digest, page)
        while len(self._pages) > PAGES_KEPT:
            self._pages.pop(next(iter(self._pages)))
        return page

    async def health(self, *, budget: float | None = None) -> dict[str, Any]:
        """`GET /v1/health/` -> e.g. `{"version": "0.16.8", "status": "ok"}`. budget: seconds
        of retries (default: the client's retry_budget)."""
        return await self._request("GET", "/v1/health/", budget=budget)

    async def get_agent(self, agent_id: str, *, budget: float | None = None) -> dict[str, Any]:
        """`GET /v1/agents/{agent_id}` -> the agent object. NotFound/Invalid for a bad id.
        budget: seconds of retries (default: the client's retry_budget)."""
        return await self._request("GET", f"/v1/agents/{agent_id}", budget=budget)

    async def agent_tags(self, agent_id: str, *, budget: float | None = None) -> list[str]:
        """The agent's tags: `GET /v1/agents/{agent_id}?include=agent.tags` (0.16.8 then loads
        no other relationship: no blocks, no tools). NotFound/Invalid for a bad id,
        Unauthorized for a key the server refuses. budget: seconds of retries (default: the
        client's retry_budget)."""
        agent = await self._request("GET", f"/v1/agents/{agent_id}",
                                    params={"include": "agent.tags"}, budget=budget)
        if not isinstance(agent, dict):
            raise LettaError("GET", f"/v1/agents/{agent_id}", 200, "the answer is not an agent")
        return [str(tag) for tag in agent.get("tags") or ()]

    async def set_agent_tags(self, agent_id: str, tags: list[str], *,
                             budget: float | None = None) -> list[str]:
        """`PATCH /v1/agents/{agent_id}` with `{"tags": tags}`: the agent's whole tag set
        (0.16.8 replaces it; setting it is idempotent, so retried). Returns the tags the
        server kept. NotFound for an agent that is gone."""
        agent = await self._request("PATCH", f"/v1/agents/{agent_id}", json={"tags": tags},
                                    budget=budget)
        if not isinstance(agent, dict):
            raise LettaError("PATCH", f"/v1/agents/{agent_id}", 200, "the answer is not an agent")
        return [str(tag) for tag in agent.get("tags") or ()]

    async def recompile(self, agent_id: str, *, dry_run: bool = False,
                        budget: float | None = None) -> str:
        """`POST /v1/agents/{agent_id}/recompile`: rebuild the agent's system message from its
        blocks now (0.16.8; `dry_run`: compile without saving it). Returns the compiled
        system message. Idempotent (a recompile of the same blocks gives the same text)."""
        text = await self._request("POST", f"/v1/agents/{agent_id}/recompile",
                                   params={"dry_run": "true" if dry_run else "false"},
                                   budget=budget)
        return text if isinstance(text, str) else ""

    async def block_agents(self, block_id: str, *, budget: float | None = None) -> list[str]:
        """The ids of the agents `block_id` is attached to: `GET /v1/blocks/{block_id}/agents`
        with `include=agent.tags` (0.16.8 then loads no relationship but the tags), up to
        AGENTS_PAGE of them. NotFound when the block is gone."""
        agents = await self._request("GET", f"/v1/blocks/{block_id}/agents",
                                     params={"include": "agent.tags", "limit": AGENTS_PAGE},
                                     budget=budget)
        if not isinstance(agents, list):
            raise LettaError("GET", f"/v1/blocks/{block_id}/agents", 200,
                             "the answer is not a list")
        return [str(agent["id"]) for agent in agents if isinstance(agent, dict)]

    async def list_agents(self, tags: list[str] | None = None, *,
                          budget: float | None = None) -> list[dict[str, Any]]:
        """Every agent the server lists (`GET /v1/agents/`), or those with ALL of `tags`
        (`tags=...&match_all_tags=true`), oldest first, paginated by agent id (`after`).
        Each item is the agent object with its `tags` only (`include=agent.tags`: 0.16.8
        otherwise loads every relationship, blocks and tools included, for each agent).
        budget: seconds of retries per page (default: the client's retry_budget)."""
        agents: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": AGENTS_PAGE, "order": "asc",
                                      "include": "agent.tags"}
            if tags:
                params.update(tags=list(tags), match_all_tags="true")
            if after:
                params["after"] = after
            page = await self._request("GET", "/v1/agents/", params=params, budget=budget)
            if not isinstance(page, list):
                raise LettaError("GET", "/v1/agents/", 200, "the answer is not a list")
            agents.extend(page)
            if len(page) < AGENTS_PAGE:
                return agents
            after = page[-1]["id"]

    async def list_attached_blocks(self, agent_id: str, *, budget: float | None = None
                                   ) -> list[Block]:
        """All blocks attached to the agent: `GET /v1/agents/{id}/core-memory/blocks`, paginated.
        budget: seconds of retries (default: the client's retry_budget)."""
        return await self._paginate(f"/v1/agents/{agent_id}/core-memory/blocks", {}, budget)

    async def list_owned_blocks(self, agent_id: str, *, budget: float | None = None,
                                on_page: Callable[[int], None] | None = None) -> list[Block]:
        """All blocks tagged `owner:<agent_id>`: `GET /v1/blocks/?tags=owner:<id>`, paginated.
        budget: seconds of retries (default: the client's retry_budget); on_page(n) after each
        page, n the blocks listed so far."""
        return await self.list_tagged_blocks(f"owner:{agent_id}", budget=budget,
                                             on_page=on_page)

    async def list_tagged_blocks(self, tag: str, *, budget: float | None = None,
                                 on_page: Callable[[int], None] | None = None) -> list[Block]:
        """All blocks tagged `tag` (`GET /v1/blocks/?tags=<tag>`, paginated). budget: seconds
        of retries (default: the client's retry_budget); on_page as for list_owned_blocks."""
        return await self._paginate("/v1/blocks/", {"tags": tag}, budget, on_page)

    async def list_labelled_blocks(self, tag: str, label: str, *,
                                   budget: float | None = None) -> list[Block]:
        """The blocks tagged `tag` whose label is `label` (`GET /v1/blocks/?tags=<tag>&label=
        <label>`, paginated), oldest first. budget: as for list_tagged_blocks."""
        return await self._paginate("/v1/blocks/", {"tags": tag, "label": label}, budget)

    async def delete_block(self, block_id: str, *, budget: float | None = None) -> None:
        """`DELETE /v1/blocks/{block_id}` (idempotent: repeated until answered within `budget`
        seconds; default: the client's retry_budget). NotFound when it is gone already."""
        await self._request("DELETE", f"/v1/blocks/{block_id}", budget=budget)

    async def count_owned_blocks(self, agent_id: str, *, budget: float | None = None) -> int:
        """How many blocks are tagged `owner:<agent_id>`: `GET /v1/blocks/count?tags=...`
        (an integer). budget: seconds of retries (default: the client's retry_budget)."""
        return int(await self._request("GET", "/v1/blocks/count",
                                       params={"tags": f"owner:{agent_id}"}, budget=budget))

    async def get_block(self, block_id: str, *, budget: float | None = None,
                        timeout: float | None = None) -> Block:
        """`GET /v1/blocks/{block_id}`. NotFound when it is gone. budget: seconds of retries
        (default: the client's retry_budget; 0: one attempt); timeout: seconds for the answer
        (default: the client's)."""
        return Block.from_json(await self._request("GET", f"/v1/blocks/{block_id}",
                                                   budget=budget, timeout=timeout))

    async def update_block(self, block_id: str, *, budget: float | None = None,
                           **fields: Any) -> Block:
        """`PATCH /v1/blocks/{block_id}` with any of value, description, limit, label, tags.

        Returns the block as the server stored it. Setting fields is idempotent, so it is retried
        (for `budget` seconds; default: the client's retry_budget).
        """
        return Block.from_json(await self._request("PATCH", f"/v1/blocks/{block_id}",
                                                   json=fields, budget=budget))

    async def create_block(self, *, label: str, value: str, description: str | None = None,
                           limit: int | None = None, tags: list[str] | None = None,
                           budget: float | None = None) -> Block:
        """`POST /v1/blocks/` -> the new block. Not retried once the request may have been sent
        (a failure to connect is retried for `budget` seconds; default: the client's)."""
        body: dict[str, Any] = {"label": label, "value": value}
        if description is not None:
            body["description"] = description
        if limit is not None:
            body["limit"] = limit
        if tags is not None:
            body["tags"] = tags
        return Block.from_json(await self._request("POST", "/v1/blocks/", json=body,
                                                   idempotent=False, budget=budget))

    async def attach_block(self, agent_id: str, block_id: str, *,
                           budget: float | None = None) -> None:
        """`PATCH /v1/agents/{agent_id}/core-memory/blocks/attach/{block_id}` (0.16.8: 200 again
        when it is attached already)."""
        await self._request("PATCH", f"/v1/agents/{agent_id}/core-memory/blocks/attach/{block_id}",
                            budget=budget)

    async def detach_block(self, agent_id: str, block_id: str, *,
                           budget: float | None = None) -> None:
        """`PATCH /v1/agents/{agent_id}/core-memory/blocks/detach/{block_id}` (0.16.8: NotFound
        when it is not attached)."""
        await self._request("PATCH", f"/v1/agents/{agent_id}/core-memory/blocks/detach/{block_id}",
                            budget=budget)


def _decoded(response: httpx.Response, method: str, path: str, raw: bool) -> Any:
    """A success's body: None when empty, the bytes when `raw`, else the decoded JSON. Raises
    LettaError when the body is not JSON (a proxy's page, another server)."""
    if not response.content:
        return None
    if raw:
        return response.content
    try:
        return response.json()
    except ValueError:
        raise LettaError(method, path, response.status_code, "the answer is not JSON") from None


def _refusal(response: httpx.Response, method: str, path: str,
             idempotent: bool) -> tuple[LettaError, bool]:
    """(the error for an answer of 400 or more, whether the call may be repeated). 408 and 429
    were not acted on, so they may be repeated whatever the method (Throttled, with the
    Retry-After seconds); a 5xx only when the call is idempotent; a 409 always."""
    status = response.status_code
    if status in (408, 429):
        return Throttled(method, path, status, _detail(response), _retry_after(response)), True
    kind = ServerError if status >= 500 else _BY_STATUS.get(status, LettaError)
    retryable = (status >= 500 and idempotent) or status == 409
    return kind(method, path, status, _detail(response)), retryable
