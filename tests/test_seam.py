"""The server seam's one error contract: every client error becomes one of errors.py's, with
the errno a program sees and the client's own words (`failure`), and the reads raise them too."""
import errno

import pytest

from memfuse import letta
from memfuse.errors import (AgentGone, BlockGone, FsError, KeyRefused, NoAnswer, ServerAway,
                            ServerCallError, ServerRefused, Throttled)
from memfuse.remote import AgentFacts, agent_facts, check_server, from_letta, make_client

from .fakeletta import FakeLetta

PATH = "/v1/blocks/block-1"


@pytest.mark.parametrize("exc, kind, code, reason", [
    (letta.Unreachable("GET", PATH, None, "ConnectError"), NoAnswer, errno.EIO,
     "server unreachable"),
    (letta.ServerError("GET", PATH, 503, "down"), ServerAway, errno.EIO, "server failing"),
    (letta.Throttled("GET", PATH, 429, "slow down", 3.0), Throttled, errno.EIO,
     "server busy (asked to wait)"),
    (letta.NotFound("GET", PATH, 404, "gone"), BlockGone, errno.ESTALE, "server refused"),
    (letta.Unauthorized("GET", PATH, 401, "no key"), KeyRefused, errno.EACCES,
     "server refused"),
    (letta.Unauthorized("GET", PATH, 403, "not yours"), KeyRefused, errno.EACCES,
     "server refused"),
    (letta.Conflict("PATCH", PATH, 409, "taken"), ServerRefused, errno.EEXIST,
     "server refused"),
    (letta.BadRequest("PATCH", PATH, 400, "bad"), ServerRefused, errno.EINVAL,
     "server refused"),
    (letta.Invalid("PATCH", PATH, 422, "shape"), ServerRefused, errno.EINVAL,
     "server refused"),
    (letta.LettaError("GET", PATH, 405, "no such method"), ServerRefused, errno.EIO,
     "server refused"),
    (letta.LettaError("GET", PATH, 200, "the answer is not JSON"), ServerRefused, errno.EIO,
     "server refused"),
])
def test_every_client_error_becomes_one_seam_error(exc, kind, code, reason):
    error = from_letta(exc)
    assert type(error) is kind and isinstance(error, (ServerCallError, FsError))
    assert error.errno == code
    assert error.reason == f"{reason}: {exc}"
    assert error.failure == str(exc)  # the words start-up and the poller show
    assert (error.status, error.call, error.detail) == (exc.status, f"{exc.method} {PATH}",
                                                        exc.detail)


def test_a_404_about_the_agent_is_agent_gone():
    exc = letta.NotFound("GET", "/v1/agents/agent-1/core-memory/blocks", 404, "gone")
    error = from_letta(exc, AgentGone)
    assert type(error) is AgentGone and error.errno == errno.ESTALE


async def test_the_reads_raise_the_seam_errors(world):
    block_id = world.ids["notes"]
    del world.fake.blocks[block_id]
    with pytest.raises(BlockGone):
        await world.remote.fetch(block_id)
    del world.fake.agents[world.agent]
    with pytest.raises(AgentGone):
        await world.remote.listing()
    with pytest.raises(AgentGone):
        await world.remote.attached()
    world.fake.down = True
    with pytest.raises(NoAnswer) as caught:
        await world.remote.listing(budget=0)
    assert caught.value.failure.startswith(
        f"GET /v1/agents/{world.agent}/core-memory/blocks: ConnectError")
    assert not world.remote.reachable


async def test_the_start_up_calls_raise_the_seam_errors():
    fake = FakeLetta()
    agent = fake.add_agent()
    async with make_client("http://letta.test", transport=fake.transport(),
                           retry_budget=0.2) as client:
        assert await check_server(client) == "fake"
        assert await agent_facts(client, agent) == AgentFacts("", ())
        with pytest.raises(AgentGone):
            await agent_facts(client, "agent-missing")
        fake.down = True
        with pytest.raises(NoAnswer):
            await check_server(client, budget=0)
