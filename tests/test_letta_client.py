"""The Letta client over httpx.MockTransport: pagination, auth, retries, typed errors."""
import httpx
import pytest

from memfuse import letta
from memfuse.letta import LettaClient

from .fakeletta import FakeLetta


BLOCK = {"id": "block-1", "label": "x", "value": "v", "limit": 5}


def client_for(handler, **kw) -> LettaClient:
    kw.setdefault("retry_budget", 2.0)
    return LettaClient("http://letta.test", kw.pop("api_key", None),
                       transport=httpx.MockTransport(handler), **kw)


async def test_pagination_follows_after_until_a_short_page(monkeypatch):
    monkeypatch.setattr(letta, "PAGE_SIZE", 2)
    fake = FakeLetta()
    agent = fake.add_agent()
    ids = [fake.add_block(f"b{i}", agent=agent) for i in range(5)]
    async with LettaClient("http://letta.test", transport=fake.transport()) as client:
        blocks = await client.list_attached_blocks(agent)
    assert [b.id for b in blocks] == sorted(ids)
    gets = [p for m, p, _ in fake.requests if m == "GET"]
    assert len(gets) == 3  # pages of 2, 2, 1


async def test_requests_and_received_bytes_are_counted_per_attempt():
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(503, json={"detail": "busy"})
        return httpx.Response(200, json=BLOCK)

    async with client_for(handler) as client:
        await client.get_block("block-1")
    assert client.requests == 2
    assert client.received_bytes == len(b'{"detail":"busy"}') + len(httpx.Response(
        200, json=BLOCK).content)


async def test_owned_blocks_are_listed_by_owner_tag():
    fake = FakeLetta()
    agent = fake.add_agent()
    mine = fake.add_block("notes", agent=agent, attached=False, tags=[f"owner:{agent}"])
    fake.add_block("other", attached=False, tags=["owner:agent-else"])
    async with LettaClient("http://letta.test", transport=fake.transport()) as client:
        assert [b.id for b in await client.list_owned_blocks(agent)] == [mine]


async def test_bearer_key_is_sent():
    seen = []

    def handler(request):
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"status": "ok"})

    async with client_for(handler, api_key="sekrit") as client:
        await client.health()
    assert seen == ["Bearer sekrit"]


@pytest.mark.parametrize("status", [409, 500, 503])
async def test_transient_statuses_are_retried(status):
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) < 3:
            return httpx.Response(status, json={"detail": "busy"})
        return httpx.Response(200, json={"id": "block-1", "label": "x", "value": "v",
                                         "limit": 5})

    async with client_for(handler) as client:
        block = await client.update_block("block-1", value="v")
    assert block.value == "v" and len(calls) == 3


async def test_connect_errors_are_retried_then_raise_unreachable():
    calls = []

    def handler(request):
        calls.append(1)
        raise httpx.ConnectError("refused", request=request)

    async with client_for(handler, retry_budget=0.5) as client:
        with pytest.raises(letta.Unreachable):
            await client.get_block("block-1")
    assert len(calls) >= 3


@pytest.mark.parametrize("status, kind", [(400, letta.BadRequest), (401, letta.Unauthorized),
                                          (404, letta.NotFound), (422, letta.Invalid)])
async def test_client_errors_raise_typed_without_retry(status, kind):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(status, json={"detail": "nope"})

    async with client_for(handler) as client:
        with pytest.raises(kind) as caught:
            await client.get_block("block-1")
    assert len(calls) == 1
    assert caught.value.status == status and caught.value.detail == "nope"


async def test_create_is_not_retried_after_a_5xx():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(502, text="bad gateway")

    async with client_for(handler) as client:
        with pytest.raises(letta.ServerError):
            await client.create_block(label="x", value="")
    assert len(calls) == 1


async def test_budget_bounds_the_retries():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(503, json={"detail": "down"})

    async with client_for(handler, retry_budget=0.3) as client:
        with pytest.raises(letta.ServerError):
            await client.get_block("block-1")
    assert 2 <= len(calls) <= 4  # 0.1 + 0.2 s of backoff fit in 0.3 s


async def test_a_zero_budget_read_is_one_attempt():
    calls = []

    def handler(request):
        calls.append(1)
        raise httpx.ConnectError("refused", request=request)

    async with client_for(handler) as client:
        with pytest.raises(letta.Unreachable):
            await client.get_block("block-1", budget=0)
    assert len(calls) == 1


async def test_a_connection_the_server_closed_is_tried_once_more_at_once():
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) == 1:  # a pooled keep-alive connection the restarted server dropped
            raise httpx.RemoteProtocolError("Server disconnected", request=request)
        return httpx.Response(200, json=BLOCK)

    async with client_for(handler) as client:
        assert (await client.get_block("block-1", budget=0)).id == "block-1"
    assert len(calls) == 2


async def test_an_answer_that_is_not_json_is_a_letta_error():
    async with client_for(lambda request: httpx.Response(200, text="<html></html>")) as client:
        with pytest.raises(letta.LettaError) as caught:
            await client.health()
    assert "not JSON" in str(caught.value)


async def test_a_listing_answer_with_the_same_bytes_is_not_decoded_again():
    fake = FakeLetta()
    agent = fake.add_agent()
    block_id = fake.add_block("x", "v", agent=agent)
    async with LettaClient("http://letta.test", transport=fake.transport()) as client:
        first = await client.list_attached_blocks(agent)
        again = await client.list_attached_blocks(agent)
        fake.blocks[block_id]["value"] = "changed"
        changed = await client.list_attached_blocks(agent)
    assert again[0] is first[0]
    assert changed[0] is not first[0] and changed[0].value == "changed"


async def test_agent_tags_ask_for_the_tags_alone():
    seen = []

    def handler(request):
        seen.append(request.url)
        return httpx.Response(200, json={"id": "agent-1", "tags": ["git-memory-enabled"]})

    async with client_for(handler) as client:
        assert await client.agent_tags("agent-1") == ["git-memory-enabled"]
    assert seen[0].path == "/v1/agents/agent-1"
    assert seen[0].params["include"] == "agent.tags"  # 0.16.8 then loads no blocks or tools
