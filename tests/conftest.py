import pytest

from .fsworld import make_world


@pytest.fixture
async def world(nursery):
    """Operations of a mount over the fake API (see fsworld.make_world)."""
    result = await make_world(nursery)
    yield result
    await result.client.aclose()
