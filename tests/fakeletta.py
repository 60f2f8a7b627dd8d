"""A small in-memory stand-in for the Letta block API, served through httpx.MockTransport.

Only for fast unit and filesystem-level tests; the integration tests use the real server.
It records every request so tests can count PATCHes.
"""
from __future__ import annotations

import itertools
import json
import random
import re
import uuid
from typing import Callable

import httpx
import trio


class FakeLetta:
    """Agents and blocks in dicts; `requests` lists (method, path, json body) of every call."""

    def __init__(self):
        self.blocks: dict[str, dict] = {}
        self.agents: dict[str, list[str]] = {}  # agent id -> attached block ids
        self.agent_tags: dict[str, list[str]] = {}  # agent id -> its tags (the agent object's)
        self.requests: list[tuple[str, str, dict | None]] = []
        self.fail_next: list[int] = []  # statuses to answer with before serving normally
        self.fail_paths: dict[str, int] = {}  # path -> status for every request to it
        self.retry_after: str | None = None  # the Retry-After header of those answers
        self.down = False  # True: every request fails to connect, as with a stopped server
        # (method, path, body) -> bool: the server acts on the first matching request, then its
        # answer is lost (a read timeout) and the fake goes down, as when a link dies mid-call
        self.lose_answer: Callable[[str, str, dict | None], bool] | None = None
        self.latency: float | None = None  # seconds each answer takes (trio sleep), or random
        self.random_latency: tuple[random.Random, float] | None = None  # (rng, max seconds)
        self.required_key: str | None = None  # set: a request without `Bearer <it>` gets 401
        self.keys_seen: list[str | None] = []  # the Authorization header of every request
        self.agent_tags: dict[str, list[str]] = {}  # agent id -> its tags (none when absent)
        self._ids = itertools.count(1)

    def add_agent(self, tags: list[str] | None = None) -> str:
        agent_id = f"agent-{uuid.uuid4()}"
        self.agents[agent_id] = []
        self.agent_tags[agent_id] = list(tags or [])
        return agent_id

    def add_block(self, label: str, value: str = "", *, agent: str | None = None,
                  attached: bool = True, description: str | None = "desc", limit: int = 20000,
                  read_only: bool = False, tags: list[str] | None = None) -> str:
        block_id = f"block-{next(self._ids):08d}-0000-4000-8000-000000000000"
        self.blocks[block_id] = {"id": block_id, "label": label, "value": value,
                                 "description": description, "limit": limit,
                                 "read_only": read_only, "tags": list(tags or [])}
        if agent and attached:
            self.agents[agent].append(block_id)
        return block_id

    def patches(self) -> list[dict]:
        """Bodies of block PATCHes (attach/detach calls are listed by `calls`)."""
        return [body for method, path, body in self.requests
                if method == "PATCH" and path.startswith("/v1/blocks/")]

    def calls(self, kind: str) -> list[str]:
        """Paths of `create`, `attach` or `detach` calls, in order."""
        if kind == "create":
            return [p for m, p, _ in self.requests if m == "POST" and p == "/v1/blocks/"]
        return [p for m, p, _ in self.requests if m == "PATCH" and f"/{kind}/" in p]

    def prompt(self, agent: str) -> str:
        """The agent's compiled memory, as far as a test needs it: `<label>value</label>` per
        block the prompt shows (tagged `git-memory-enabled`: only labels under `system/`, as
        0.16.8's `_render_memory_blocks_git`; else every attached block)."""
        git = "git-memory-enabled" in self.agent_tags.get(agent, [])
        shown = [self.blocks[i] for i in self.agents[agent]
                 if not git or self.blocks[i]["label"].startswith("system/")]
        return "".join(f"<{b['label']}>{b['value']}</{b['label']}>" for b in shown)

    def by_label(self, label: str) -> list[dict]:
        return [b for b in self.blocks.values() if b["label"] == label]

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._answer)

    async def _answer(self, request: httpx.Request) -> httpx.Response:
        """The server acts when the request arrives; its answer takes `latency` seconds (or a
        random time up to the max of `random_latency`) to come back."""
        response = self._handle(request)
        body = json.loads(request.content) if request.content else None
        if (self.lose_answer is not None and response.status_code < 400
                and self.lose_answer(request.method, request.url.path, body)):
            self.lose_answer, self.down = None, True
            raise httpx.ReadTimeout("the answer was lost (fake)", request=request)
        delay = self.latency
        if self.random_latency is not None:
            rng, most = self.random_latency
            delay = rng.uniform(0, most)
        if delay:
            await trio.sleep(delay)
        return response

    def _page(self, items: list[dict], params) -> httpx.Response:
        items = sorted(items, key=lambda b: b["id"])
        if "after" in params:
            items = [b for b in items if b["id"] > params["after"]]
        return httpx.Response(200, json=items[: int(params.get("limit", 50))])

    def _handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        path, params = request.url.path, request.url.params
        self.requests.append((request.method, path, body))
        if self.down:
            raise httpx.ConnectError("connection refused (the fake server is down)",
                                     request=request)
        self.keys_seen.append(request.headers.get("authorization"))
        if (self.required_key is not None
                and request.headers.get("authorization") != f"Bearer {self.required_key}"):
            return httpx.Response(401, json={"detail": "Unauthorized"})  # as a secured 0.16.8
        if self.fail_next:
            return httpx.Response(self.fail_next.pop(0), json={"detail": "injected failure"})
        if path in self.fail_paths:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return httpx.Response(self.fail_paths[path], json={"detail": "injected failure"},
                                  headers=headers)
        if path == "/v1/health/":
            return httpx.Response(200, json={"version": "fake", "status": "ok"})
        if m := re.fullmatch(r"/v1/agents/([^/]+)", path):
            if m[1] not in self.agents:
                return httpx.Response(404, json={"detail": f"Agent {m[1]} not found"})
            if request.method == "PATCH" and "tags" in body:
                self.agent_tags[m[1]] = list(body["tags"])
            return httpx.Response(200, json={"id": m[1], "tags": self.agent_tags.get(m[1], [])})
        if m := re.fullmatch(r"/v1/agents/([^/]+)/recompile", path):
            if m[1] not in self.agents:
                return httpx.Response(404, json={"detail": f"Agent {m[1]} not found"})
            return httpx.Response(200, json=self.prompt(m[1]))
        if m := re.fullmatch(r"/v1/blocks/([^/]+)/agents", path):
            if m[1] not in self.blocks:
                return httpx.Response(404, json={"detail": "Block not found"})
            return httpx.Response(200, json=[{"id": a, "tags": self.agent_tags.get(a, [])}
                                             for a, ids in self.agents.items() if m[1] in ids])
        if m := re.fullmatch(r"/v1/agents/([^/]+)/core-memory/blocks", path):
            if m[1] not in self.agents:  # as 0.16.8 answers for a deleted agent
                return httpx.Response(404, json={"detail": f"Agent {m[1]} not found"})
            return self._page([self.blocks[i] for i in self.agents[m[1]]], params)
        if path == "/v1/blocks/count" and request.method == "GET":
            return httpx.Response(200, json=sum(1 for b in self.blocks.values()
                                                if params.get("tags") in b["tags"]))
        if path == "/v1/blocks/" and request.method == "GET":
            tag, label = params.get("tags"), params.get("label")
            return self._page([b for b in self.blocks.values() if tag in b["tags"]
                               and label in (None, b["label"])], params)
        if path == "/v1/blocks/" and request.method == "POST":
            block_id = self.add_block(body["label"], body.get("value", ""),
                                      description=body.get("description"),
                                      limit=body.get("limit", 100000), tags=body.get("tags"))
            return httpx.Response(200, json=self.blocks[block_id])
        if m := re.fullmatch(r"/v1/agents/([^/]+)/core-memory/blocks/(attach|detach)/([^/]+)",
                             path):
            agent, verb, block_id = m[1], m[2], m[3]
            attached = self.agents[agent]
            if verb == "attach":
                label = self.blocks[block_id]["label"]
                if any(self.blocks[i]["label"] == label for i in attached if i != block_id):
                    return httpx.Response(409, json={"detail": "duplicate label"})
                if block_id not in attached:
                    attached.append(block_id)
            elif block_id in attached:
                attached.remove(block_id)
            else:  # as 0.16.8 answers
                return httpx.Response(404, json={"detail": "block not attached"})
            return httpx.Response(200, json={"id": agent})
        if m := re.fullmatch(r"/v1/blocks/([^/]+)", path):
            block = self.blocks.get(m[1])
            if block is None:
                return httpx.Response(404, json={"detail": "Block not found"})
            if request.method == "PATCH":
                block.update(body)
            if request.method == "DELETE":
                del self.blocks[m[1]]
                for attached in self.agents.values():
                    if m[1] in attached:
                        attached.remove(m[1])
            return httpx.Response(200, json=block)
        return httpx.Response(404, json={"detail": f"no route {request.method} {path}"})
