"""The API token cache: at most one load per token per ttl, and forget() is immediate."""

from __future__ import annotations

from muster.server.token_cache import ApiTokenCache, CachedToken

ROW = CachedToken("id1", "alice", "alice", "submitter", "h", None, False)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_loads_once_per_ttl_and_forget_reloads() -> None:
    clock = Clock()
    cache = ApiTokenCache(ttl=5.0, clock=clock)
    loads: list[str] = []

    async def load(token_id: str) -> CachedToken | None:
        loads.append(token_id)
        return ROW if token_id == "id1" else None

    assert await cache.get("id1", load) == ROW
    assert await cache.get("id1", load) == ROW
    assert await cache.get("nope", load) is None
    assert await cache.get("nope", load) is None
    assert loads == ["id1", "nope"]
    clock.now = 5.1
    await cache.get("id1", load)
    assert loads == ["id1", "nope", "id1"]
    cache.forget("id1")
    await cache.get("id1", load)
    assert loads == ["id1", "nope", "id1", "id1"]
