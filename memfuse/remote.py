"""The server seam: every call memfuse makes to the Letta server, and the one error contract
they keep.

This is the only module that imports the client (letta.py). Every call here raises the
errors.py family and nothing else from the server: ServerAway (NoAnswer, Throttled, a 5xx)
when no answer settled it, ServerRefused (BlockGone, AgentGone, KeyRefused, ...) when the
server judged it (`from_letta` says which answer is which). `Remote` holds one agent's block
calls (listing, reading, updating with the conflict check, creating, relabelling, attaching
and detaching, retiring); `make_client`, `check_server`, `agent_name` and `list_agents` are
the calls made before a mount exists. Nothing here touches the tree or history: callers hand
the blocks returned to state.MountState.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import httpx
import trio

from . import blockfile, letta
from .errors import (AgentGone, BlockGone, FsError, KeyRefused, NoAnswer, ServerAway,
                     ServerCallError, ServerRefused, Throttled)
from .letta import LettaClient
from .model import CREATE_MARKER, Block, Location

log = logging.getLogger("memfuse.remote")

CONFLICT_POLICIES = ("overwrite", "reject")
FETCH_TIMEOUT = 2.0  # seconds an open waits for a block's refresh before serving the cache
THROTTLE_WAIT = 5.0  # seconds a replay waits after a 408/429 that named no Retry-After
LATENCY_SAMPLE = 20  # answered calls whose median time `memfuse status` shows

# the client's errors that are an answer from the API: a refusal (Throttled is one too, but
# says "not now"); any other means no answer, a 5xx, or something that is not the API
_REFUSALS = (letta.BadRequest, letta.Unauthorized, letta.NotFound, letta.Conflict,
             letta.Invalid)
_AWAY = {letta.Unreachable: (NoAnswer, "server unreachable"),
         letta.ServerError: (ServerAway, "server failing"),
         letta.Throttled: (Throttled, "server busy (asked to wait)")}


def from_letta(exc: letta.LettaError, gone: type[ServerRefused] = BlockGone) -> ServerCallError:
    """The error a failed client call raises at the seam, with the errno a program sees.

    No answer -> NoAnswer, 5xx -> ServerAway, 408/429 -> Throttled (all EIO: with a journal,
    the change is journaled). 404 -> `gone` (ESTALE: BlockGone, or AgentGone for a call about
    the agent), 401/403 -> KeyRefused (EACCES), 409 -> EEXIST (a conflict that outlived the
    retries is in practice a label an attached block already has), 400/422 -> EINVAL, any
    other answer -> EIO; those are ServerRefused.
    """
    where = dict(call=f"{exc.method} {exc.path}", detail=exc.detail)
    if type(exc) in _AWAY:
        kind, what = _AWAY[type(exc)]
        return kind(errno.EIO, f"{what}: {exc}", exc.status, **where)
    kind, code = ServerRefused, errno.EIO
    if isinstance(exc, letta.NotFound):
        kind, code = gone, errno.ESTALE
    elif isinstance(exc, letta.Conflict):
        code = errno.EEXIST
    elif isinstance(exc, letta.Unauthorized):
        kind, code = KeyRefused, errno.EACCES
    elif exc.status in (400, 422):
        code = errno.EINVAL
    return kind(code, f"server refused: {exc}", exc.status, **where)


Client = LettaClient  # what make_client returns, named here so that callers need not import it


def make_client(base_url: str, api_key: str | None = None, *, retry_budget: float = 10.0,
                transport: httpx.AsyncBaseTransport | None = None) -> Client:
    """The client every call here takes, for the server at `base_url` (use it as `async
    with`): api_key sent as a Bearer token, never logged; retry_budget: seconds within which
    transient failures are retried (letta.LettaClient); transport: a stand-in server (tests).
    Its `requests` and `received_bytes` count what the mount costs the server."""
    return Client(base_url, api_key, retry_budget=retry_budget, transport=transport)


async def _checked(coro):
    """Await a client call made outside a Remote (no reachability to note). Raises
    ServerCallError (from_letta)."""
    try:
        return await coro
    except letta.LettaError as exc:
        raise from_letta(exc) from None


async def check_server(client: Client, budget: float | None = None) -> str:
    """That the client's server is a Letta server: `GET /v1/health/` answers with a version,
    which is returned. budget: seconds of retries (None: the client's). Raises
    ServerCallError: NoAnswer, KeyRefused, or ServerRefused (status 200) for an answer without
    a version."""
    answer = await _checked(client.health(budget=budget))
    if not isinstance(answer, dict) or "version" not in answer:
        words = f"an answer without a version: {str(answer)[:80]}"
        raise from_letta(letta.LettaError("GET", "/v1/health/", 200, words))
    return str(answer["version"])


@dataclass(frozen=True)
class AgentFacts:
    """What a mount learns of the agent at start-up (`GET /v1/agents/{id}`): its name ("" when
    it has none, or it started from history) and its tags (None: not known, the server was
    away), which choose the layout (layout.layout_for_tags)."""

    name: str = ""
    tags: tuple[str, ...] | None = None

    @classmethod
    def of(cls, agent: object) -> AgentFacts:
        """The facts of the agent object `agent` (anything that is not a dict: none)."""
        if not isinstance(agent, dict):
            return cls("", ())
        return cls(str(agent.get("name") or ""), tuple(str(t) for t in agent.get("tags") or ()))


async def agent_facts(client: Client, agent_id: str, budget: float | None = None
                      ) -> AgentFacts:
    """The name and tags of the agent `agent_id`: `GET /v1/agents/{id}`. budget: seconds of
    retries (None: the client's). Raises ServerCallError: AgentGone (404, or 422 for an id of
    the wrong shape), NoAnswer, KeyRefused, ..."""
    try:
        agent = await client.get_agent(agent_id, budget=budget)
    except letta.Invalid as exc:  # an id of the wrong shape names no agent
        error = from_letta(exc)
        raise AgentGone(error.errno, error.reason, error.status, call=error.call,
                        detail=error.detail) from None
    except letta.LettaError as exc:
        raise from_letta(exc, AgentGone) from None
    return AgentFacts.of(agent)


async def list_agents(base_url: str, api_key: str | None, tags: list[str] | None = None, *,
                      retry_budget: float = 10.0) -> list[dict[str, Any]]:
    """Every agent on the server at `base_url` (with `tags`: those having all of them), oldest
    first, each the agent object with its tags: `GET /v1/agents/`, paginated, over a client
    of its own. Raises ServerCallError (NoAnswer when no answer came within `retry_budget`
    seconds)."""
    async with make_client(base_url, api_key, retry_budget=retry_budget) as client:
        return await _checked(client.list_agents(tags))


class Stale(FsError):
    """A write was refused because the server changed the block after the file was opened
    (`--on-conflict reject`); `theirs` is the server's block."""

    def __init__(self, reason: str, theirs: Block):
        super().__init__(errno.ESTALE, reason)
        self.theirs = theirs


class LabelTaken(FsError):
    """A new block's label is taken under the agent by the block `theirs`: the 409 of its
    attach, or a block the agent owns with that label already (an earlier attempt whose
    answer was lost, or a block made elsewhere). The block this create made, if any, is
    deleted first: it was never complete, so nobody else has seen it as a file."""

    def __init__(self, theirs: Block):
        super().__init__(errno.EEXIST, f"the agent already has a block labelled "
                                       f"{theirs.label} ({theirs.id})")
        self.theirs = theirs


@dataclass(frozen=True)
class Written:
    """An accepted update: `block` as the server has it now; `fields` the names of the fields
    sent (empty: nothing changed, no PATCH); `theirs` the newer server version the write
    replaced (a conflict under `overwrite`), None when there was no conflict."""

    block: Block
    fields: tuple[str, ...] = ()
    theirs: Block | None = None


def _marked_by_another(block: Block, marker: str | None) -> bool:
    """Whether `block` carries the create marker of a create other than the one `marker` names
    (a block that create has made and not completed yet)."""
    return any(t.startswith(CREATE_MARKER) and t != marker for t in block.tags)


class Remote:
    """The block API calls of one mount: `client` for agent `agent_id`.

    on_conflict: `overwrite` or `reject` (CONFLICT_POLICIES). `in_flight` counts state-changing
    calls under way and `generation` those ever made: a poller drops a listing that raced one of
    them, so it never undoes a local change it has not seen. Calls for one block are serialised
    by a per-block lock.

    `reachable` says whether the server answered the last call (a 4xx is an answer; no answer
    or a 5xx is not), since `reachable_since` (time.time() of the last change either way). While
    it is False, reads that only refresh a cache (`fetch`) are not sent.
    """

    def __init__(self, client: LettaClient, agent_id: str, *, on_conflict: str = "overwrite"):
        self.client, self.agent_id = client, agent_id
        self.owner_tag = f"owner:{agent_id}"
        self.on_conflict = on_conflict
        self.in_flight = 0
        self.generation = 0
        self._held: trio.Event | None = None  # while `changes_held`: set when it ends
        self._drained: trio.Event | None = None  # set when in_flight drops to 0
        self.reachable = True
        self.reachable_since = time.time()
        self._locks: dict[str, trio.Lock] = {}
        self._answer_times: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLE)
        self.throttled_until = float("-inf")  # trio time before which a replay waits (429)
        self.agent_gone_since: float | None = None  # time.time() a listing found no agent

    def latency(self) -> float | None:
        """The median time (seconds) the server took to answer the last LATENCY_SAMPLE calls
        that got an answer (a refusal counts), or None before the first."""
        if not self._answer_times:
            return None
        return statistics.median(self._answer_times)

    def agent_seen(self, present: bool) -> None:
        """A listing found the agent (present) or answered 404 for it (deleted): kept in
        `agent_gone_since` (time.time(), None while it exists), an ERROR when it goes."""
        if present and self.agent_gone_since is not None:
            log.info("the agent %s is on the server again", self.agent_id)
            self.agent_gone_since = None
        elif not present and self.agent_gone_since is None:
            self.agent_gone_since = time.time()
            log.error("the agent %s is gone from the server (deleted?): the mount serves the "
                      "last known state, new files are refused (ESTALE) and what is written "
                      "is kept in history", self.agent_id)

    def mark_unreachable(self, why: str) -> None:
        """Note that the server gave no answer elsewhere (the checks at mount): `reachable` is
        False from now on, until a call gets an answer."""
        self._seen(False, why)

    def _seen(self, answered: bool, why: str = "") -> None:
        if answered != self.reachable:
            self.reachable, self.reachable_since = answered, time.time()
            if answered:
                log.info("the server answers again")
            else:
                log.warning("the server cannot be reached (%s); serving the last known state",
                            why)

    async def _observed(self, coro, gone: type[ServerRefused] = BlockGone):
        """Await a client call, noting whether the server answered, and how long it took.
        gone: what a 404 means (from_letta). Raises ServerCallError."""
        started = trio.current_time()
        try:
            result = await coro
        except _REFUSALS as exc:
            self._answer_times.append(trio.current_time() - started)
            self._seen(True)  # the API answered, with a refusal
            raise from_letta(exc, gone) from None
        except letta.Throttled as exc:  # an answer: "not now"; nothing is asked before it says
            self._answer_times.append(trio.current_time() - started)
            self._seen(True)
            self.throttled_until = trio.current_time() + (exc.retry_after or THROTTLE_WAIT)
            raise from_letta(exc, gone) from None
        except letta.LettaError as exc:  # no answer, a 5xx, or something that is not the API
            self._seen(False, str(exc))
            raise from_letta(exc, gone) from None
        self._answer_times.append(trio.current_time() - started)
        self._seen(True)
        return result

    def lock(self, block_id: str) -> trio.Lock:
        """The lock that serialises calls about `block_id` (reads that revalidate take it too)."""
        return self._locks.setdefault(block_id, trio.Lock())

    async def listing(self, budget: float | None = None,
                      on_page: Callable[[int], None] | None = None
                      ) -> tuple[list[Block], list[Block]]:
        """(attached, owned) blocks: `GET /v1/agents/{id}/core-memory/blocks` and
        `GET /v1/blocks/?tags=owner:<id>`, both paginated (one request each up to
        letta.PAGE_SIZE blocks). budget: seconds of retries (None:
        the client's; 0: one attempt, as a poller that asks again soon wants); on_page(n)
        after each page of owned blocks, n the owned blocks listed so far. Raises
        ServerCallError: AgentGone when the agent is not on the server, NoAnswer, ..."""
        attached = await self._attached(budget)
        owned = await self._observed(self.client.list_owned_blocks(self.agent_id,
                                                                   budget=budget,
                                                                   on_page=on_page))
        return attached, owned

    async def agent_tags(self, budget: float | None = 0) -> tuple[str, ...]:
        """The agent's tags, which choose its layout (layout.layout_for_tags):
        `GET /v1/agents/{id}?include=agent.tags` (the agent object without its blocks and
        tools). budget: seconds of retries (0: one attempt, as the poller wants; None: the
        client's). Raises ServerCallError (AgentGone, KeyRefused, NoAnswer, ...)."""
        return tuple(await self._observed(self.client.agent_tags(self.agent_id, budget=budget),
                                          gone=AgentGone))

    async def set_tags(self, tags: list[str], budget: float | None = None) -> tuple[str, ...]:
        """Set the agent's whole tag set (`PATCH /v1/agents/{id}`, `{"tags": [...]}`); returns
        the tags the server kept. Raises ServerCallError (AgentGone, ...)."""
        return tuple(await self._call(self.client.set_agent_tags(self.agent_id, tags,
                                                                 budget=budget), gone=AgentGone))

    async def recompile(self, dry_run: bool = False, budget: float | None = None) -> str:
        """Rebuild the agent's system message from its blocks (`POST
        /v1/agents/{id}/recompile`; `dry_run`: not saved) and return it. Raises
        ServerCallError (AgentGone, ...)."""
        return await self._call(self.client.recompile(self.agent_id, dry_run=dry_run,
                                                      budget=budget),
                                changes=not dry_run, gone=AgentGone)

    async def sharers(self, block_id: str, budget: float | None = None) -> list[str]:
        """The other agents `block_id` is attached to (`GET /v1/blocks/{id}/agents`), this
        agent left out. Raises ServerCallError (BlockGone, ...)."""
        agents = await self._call(self.client.block_agents(block_id, budget=budget),
                                  changes=False)
        return [agent for agent in agents if agent != self.agent_id]

    async def relabel(self, block: Block, label: str, budget: float | None = None) -> Block:
        """Give `block` the label `label` (`PATCH /v1/blocks/{id}`), nothing else. Returns the
        block as stored. Raises ServerCallError (a 409 when an attached block has the label)."""
        async with self.lock(block.id):
            return await self._call(self.client.update_block(block.id, budget=budget,
                                                             label=label))

    async def attach(self, block: Block, budget: float | None = None) -> None:
        """Attach `block` to the agent (again is harmless). Raises ServerCallError."""
        await self._call(self.client.attach_block(self.agent_id, block.id, budget=budget))

    async def detach(self, block: Block, budget: float | None = None) -> None:
        """Detach `block` from the agent; one not attached (any more) is taken as done.
        Raises ServerCallError."""
        await self._detach(block.id, budget)

    async def owned_count(self) -> int | None:
        """How many blocks the agent owns (`GET /v1/blocks/count`), one attempt; None when
        the server does not say (it only sizes a progress line)."""
        try:
            return await self._observed(self.client.count_owned_blocks(self.agent_id, budget=0))
        except (ServerCallError, ValueError, TypeError):
            return None

    async def attached(self, budget: float | None = None) -> list[Block]:
        """The attached blocks alone: `GET /v1/agents/{id}/core-memory/blocks` (one request up
        to letta.PAGE_SIZE blocks). budget: as for `listing`. Raises ServerCallError:
        AgentGone when the agent is not on the server, NoAnswer, ..."""
        return await self._attached(budget)

    async def _attached(self, budget: float | None) -> list[Block]:
        return await self._observed(self.client.list_attached_blocks(self.agent_id,
                                                                     budget=budget),
                                    gone=AgentGone)

    async def fetch(self, block_id: str) -> Block | None:
        """`GET /v1/blocks/{id}`, one attempt (it only refreshes a cache), or None without any
        call while the server is known to be unreachable. Raises ServerCallError: BlockGone
        when the block is gone; NoAnswer or a ServerAway of a 5xx when the server does not
        answer (Remote logs that once), Throttled, another ServerRefused."""
        if not self.reachable:
            return None
        return await self._observed(self.client.get_block(block_id, budget=0,
                                                          timeout=FETCH_TIMEOUT))

    async def fetch_now(self, block_id: str, budget: float | None) -> Block:
        """`GET /v1/blocks/{id}` with `budget` seconds of retries (None: the client's), whatever
        `reachable` says (a replay, an append). Raises ServerCallError: ServerAway, BlockGone
        (ESTALE) when the block is gone."""
        return await self._call(self.client.get_block(block_id, budget=budget), changes=False)

    async def update(self, block: Block, parsed: blockfile.ParsedFile,
                     base: Block | None = None, budget: float | None = None) -> Written:
        """One `PATCH /v1/blocks/{id}` with the fields `parsed` changes (none: no call).

        base: the block as the writer read it. Then the server's block is read first
        (`GET /v1/blocks/{id}`); if it changed since (value, description or limit), that is a
        conflict: the file wins (`overwrite`; fields are planned against the server's version
        and `Written.theirs` is that version) or the write is refused (`reject`: Stale).

        Raises FsError: EACCES (read-only block), EINVAL (read_only changed), EFBIG (value over
        the limit, in characters), ESTALE (Stale), ServerAway (no answer within `budget`
        seconds of retries; default: the client's), or the errno of a server refusal. Content
        that is refused never reaches the server.
        """
        if block.read_only:
            raise FsError(errno.EACCES, "block is read-only")
        theirs = None
        async with self.lock(block.id):
            if base is not None:
                # the block written, not base's: a file renamed over another since it was
                # read writes that file's block (its base is what it read, by fields)
                current = await self._call(self.client.get_block(block.id, budget=budget),
                                           changes=False)
                if blockfile.conflict_fields(current) != blockfile.conflict_fields(base):
                    blockfile.plan_update(current, parsed)  # refused is refused, conflict or not
                    if self.on_conflict == "reject":
                        raise Stale("changed on the server after it was opened "
                                    "(--on-conflict reject); both versions are in history",
                                    current)
                    theirs = current
                block = current
            changes = blockfile.plan_update(block, parsed)
            if changes:
                block = await self._call(self.client.update_block(block.id, budget=budget,
                                                                  **changes))
        return Written(block, tuple(sorted(changes)), theirs)

    @staticmethod
    def new_block(block_id: str, location: Location, parsed: blockfile.ParsedFile) -> Block:
        """The block a new file at `location` makes (id `block_id`): the file's value,
        description (default `Memory block: <label>`) and limit (default 20000, characters).
        Raises FsError: EINVAL (read_only set), EFBIG (value over the limit)."""
        if parsed.fields.get("read_only"):
            raise FsError(errno.EINVAL, "read_only cannot be set from a file")
        limit = parsed.fields.get("limit", blockfile.DEFAULT_LIMIT)
        if len(parsed.value) > limit:
            raise FsError(errno.EFBIG, f"value is {len(parsed.value)} characters, over the "
                                       f"limit of {limit}")
        description = parsed.fields.get("description") or f"Memory block: {location.label}"
        return Block(block_id, location.label, parsed.value, limit, description)

    async def create(self, location: Location, parsed: blockfile.ParsedFile,
                     budget: float | None = None, marker: str | None = None,
                     retiring: Callable[[], set[str]] = set) -> Block:
        """A new block for a new file: `POST /v1/blocks/` tagged `owner:<agent>` (fields as
        `new_block` makes them), then attach it when `location.attached`. retiring: the ids
        of blocks whose files were removed (being retired: detached, then untagged), asked
        after the listings, which may predate a retirement: never this label's block. marker:
        a tag the
        block carries until it is complete (attached), so that a create repeated after a
        failure finds the block the first attempt made (`find_marked`) instead of making a
        second; dropped at the end. budget: seconds of retries (default: the client's).

        A label has one block: a detached one is looked for first among the agent's own
        blocks (`GET /v1/blocks/?tags=owner:<agent>&label=...`), an attached one is found by
        the 409 of the attach; either way LabelTaken is raised with that block (never
        retried). A refusal after the POST deletes the block it made, so a create that fails
        leaves no live block; no answer (ServerAway) leaves it, marked, for the next attempt.
        Raises FsError: EINVAL (read_only set), EFBIG, LabelTaken, ServerAway, or the errno
        of a server refusal."""
        made = self.new_block("", location, parsed)
        if not location.attached:
            taken = await self._call(self.client.list_labelled_blocks(
                self.owner_tag, location.label, budget=budget), changes=False)
            if taken:  # one attached (system/<label>.md) is another file: not this label's;
                # nor is one another create marked: a create of system/<label>.md under way
                attached = {b.id for b in await self._attached(budget)}
                unlinked = retiring()
                taken = [b for b in taken if b.id not in attached and b.id not in unlinked
                         and not _marked_by_another(b, marker)]
            own = next((b for b in taken if marker is not None and marker in b.tags), None)
            if own is not None:  # an earlier attempt's POST that landed late: this create's
                return await self.complete(own, location, budget)
            if taken:
                raise LabelTaken(taken[0])
        block = await self._call(self.client.create_block(
            label=made.label, value=made.value, description=made.description, limit=made.limit,
            tags=[self.owner_tag, *([marker] if marker else [])], budget=budget))
        try:
            return await self.complete(block, location, budget)
        except ServerRefused:
            await self.discard(block, budget)
            raise

    async def discard(self, block: Block, budget: float | None = None) -> None:
        """Delete a block a create of this mount made and never completed (never a file):
        `DELETE /v1/blocks/{id}`. Gone already is done; a refusal is logged (ERROR). Raises
        ServerAway when the server does not answer: the caller's create is tried again, so
        the block is not left behind as a file of its own."""
        try:
            await self._call(self.client.delete_block(block.id, budget=budget))
        except ServerAway:
            raise
        except FsError as exc:
            if exc.errno != errno.ESTALE:
                log.error("block %s: left by a create that did not complete, and the server "
                          "refused to delete it (%s); it is tagged %s", block.id, exc.reason,
                          self.owner_tag)

    async def complete(self, block: Block, location: Location, budget: float | None = None
                       ) -> Block:
        """Finish a created `block`: attach it when `location.attached` (again is harmless),
        then drop its marker tags. Returns the block as stored. An attach answered 409 means
        another attached block has the label (made elsewhere, or by an earlier attempt whose
        marker is gone): `block` is deleted, never having been a file, and LabelTaken names
        that block. Raises FsError (LabelTaken, ServerAway, ServerRefused)."""
        if location.attached:
            try:
                await self._call(self.client.attach_block(self.agent_id, block.id,
                                                          budget=budget))
            except ServerRefused as exc:
                theirs = None
                if exc.status == 409:
                    theirs = next((b for b in await self._attached(budget)
                                   if b.label == location.label and b.id != block.id), None)
                if theirs is None:
                    raise
                await self.discard(block, budget)
                raise LabelTaken(theirs) from None
        markers = [t for t in block.tags if t.startswith(CREATE_MARKER)]
        if markers:
            block = await self._call(self.client.update_block(
                block.id, budget=budget, tags=[t for t in block.tags if t not in markers]))
        return block

    async def find_marked(self, marker: str, budget: float | None = None
                          ) -> tuple[Block, bool] | None:
        """The block an earlier create tagged `marker` made (`GET /v1/blocks/?tags=<marker>`)
        and whether it is attached to the agent (`GET .../core-memory/blocks`), or None.
        Several carry it when an attempt's POST took effect after the next attempt looked (a
        cut link the server went on with): the one attached is kept (a label has one attached
        block), else the last listed, and the others are deleted (`discard`). Raises FsError
        (ServerAway, also when a delete got no answer)."""
        found = await self._call(self.client.list_tagged_blocks(marker, budget=budget),
                                 changes=False)
        if not found:
            return None
        attached = {b.id for b in await self._attached(budget)}
        kept = next((b for b in found if b.id in attached), found[-1])
        for block in found:
            if block is not kept:
                log.warning("block %s: a second block made by one create (%s); deleted, "
                            "block %s is kept", block.id, marker, kept.id)
                await self.discard(block, budget)
        return kept, kept.id in attached

    async def find_made(self, location: Location, values: set[str],
                        budget: float | None = None) -> Block | None:
        """The block an earlier create at `location` made and completed though its marker is
        gone (the answer to the marker's drop was lost): the agent's block labelled
        `location.label` (attached or not, as `location`), tagged with the owner tag and
        holding one of `values`; or None. Raises FsError (ServerAway)."""
        if location.attached:
            found = [b for b in await self._attached(budget) if b.label == location.label]
        else:
            found = await self._call(self.client.list_labelled_blocks(
                self.owner_tag, location.label, budget=budget), changes=False)
        return next((b for b in found if self.owner_tag in b.tags and b.value in values), None)

    async def relocate(self, block: Block, was_attached: bool, location: Location,
                       budget: float | None = None) -> Block:
        """Give `block` a new label and attachment (a rename): PATCH `label`, attach or detach.
        A block moved to the root keeps (or gets) the owner tag, so it stays visible. Safe to
        repeat (a replay after a crash): attaching twice is fine, a detach of a block no longer
        attached is taken as done. Returns the block as the server has it now. budget: seconds
        of retries (default: the client's). Raises FsError."""
        async with self.lock(block.id):
            fields: dict[str, Any] = {}
            if location.label != block.label:
                fields["label"] = location.label
            if not location.attached and self.owner_tag not in block.tags:
                fields["tags"] = [*block.tags, self.owner_tag]
            if fields:
                block = await self._call(self.client.update_block(block.id, budget=budget,
                                                                  **fields))
            if location.attached and not was_attached:
                await self._call(self.client.attach_block(self.agent_id, block.id,
                                                          budget=budget))
            elif was_attached and not location.attached:
                await self._detach(block.id, budget)
        return block

    async def _detach(self, block_id: str, budget: float | None) -> None:
        try:
            await self._call(self.client.detach_block(self.agent_id, block_id, budget=budget))
        except BlockGone:  # not attached (any more)
            pass

    async def retire(self, block: Block, attached: bool, budget: float | None = None,
                     base: Block | None = None) -> bool:
        """What unlinking a block file means on the server: detach it (when attached) and drop
        the owner tag. The block itself is never deleted. Safe to repeat. Returns False when it
        was already gone from the server. budget: seconds of retries (default: the client's).
        base: the block as the remover saw it; under `reject`, a block changed since
        (conflict_fields) is left as it is and Stale raised (a push never takes away an edit
        it did not see). Raises FsError (ServerAway when the server does not answer, Stale)."""
        async with self.lock(block.id):
            try:
                current = await self._observed(self.client.get_block(block.id, budget=budget))
            except BlockGone:
                return False
            if (base is not None and self.on_conflict == "reject"
                    and blockfile.conflict_fields(current) != blockfile.conflict_fields(base)):
                raise Stale("changed on the server after it was read; left as it is", current)
            if attached:
                await self._detach(block.id, budget)
            if self.owner_tag in current.tags:
                tags = [t for t in current.tags if t != self.owner_tag]
                await self._call(self.client.update_block(block.id, budget=budget, tags=tags))
        return True

    async def set_value(self, block: Block, value: str) -> Block:
        """One PATCH of a value memfuse itself keeps (memory_filesystem), no checks. Returns the
        block as stored. Raises FsError."""
        async with self.lock(block.id):
            return await self._call(self.client.update_block(block.id, value=value))

    @contextlib.asynccontextmanager
    async def changes_held(self) -> AsyncIterator[None]:
        """No state-changing call starts while the block runs; the ones under way finish
        first. A listing made inside cannot race a local change (Poller._raced_since), so it is
        applied even while the mount is written without a pause; a change that would start
        meanwhile waits (its caller sees a delay of one listing, no error). Not nested."""
        assert self._held is None
        held = self._held = trio.Event()
        try:
            while self.in_flight:
                drained = self._drained = trio.Event()
                await drained.wait()
            yield
        finally:
            self._held = self._drained = None
            held.set()

    async def _call(self, coro, changes: bool = True, gone: type[ServerRefused] = BlockGone):
        """Await a client call (`_observed`). changes: it changes server state (counted in
        `in_flight`/`generation`; it waits while `changes_held`); gone: what a 404 means.
        Raises ServerCallError."""
        if changes:
            while self._held is not None:
                await self._held.wait()
            self.in_flight += 1
        try:
            return await self._observed(coro, gone)
        finally:
            if changes:
                self.in_flight -= 1
                self.generation += 1
                if not self.in_flight and self._drained is not None:
                    self._drained.set()
