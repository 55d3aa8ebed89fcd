"""The hub's choice of which streams to wake, and when an idle stream may look by itself."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import pytest

from muster.server.dispatch.hub import Hub


@dataclass
class FakeStream:
    session_id: str
    pool: str = "default"
    kinds: list[str] = field(default_factory=lambda: ["echo"])
    agent_id: str = "a"
    serial: str = "1"
    idle: bool = True
    woken: int = 0

    @property
    def wants_work(self) -> bool:
        return self.idle

    def wake(self) -> None:
        self.woken += 1
        self.idle = False

    def cancel_attempt(self, task_id: str, attempt: int, reason: str) -> None: ...
    def drain(self, reason: str) -> None: ...
    def close(self, code: grpc.StatusCode, message: str) -> None: ...


@pytest.fixture
def streams() -> list[FakeStream]:
    return [FakeStream(f"s{i}") for i in range(4)]


@pytest.fixture
def hub(streams: list[FakeStream]) -> Hub:
    hub = Hub()
    for stream in streams:
        hub.register(stream)
    return hub


def test_new_work_wakes_idle_streams_in_turn(hub: Hub, streams: list[FakeStream]) -> None:
    for _ in range(4):
        hub.wake_pool("default")
        for stream in streams:
            stream.idle = True  # each looked and went idle again
    assert [s.woken for s in streams] == [1, 1, 1, 1]


def test_a_stream_that_left_is_never_woken(hub: Hub, streams: list[FakeStream]) -> None:
    hub.unregister(streams[0])
    hub.unregister(streams[0])  # twice is harmless
    hub.wake_pool("default")
    assert streams[0].woken == 0 and streams[1].woken == 1
    assert hub.connected_by_pool() == {"default": 3}
    for stream in streams[1:]:
        hub.unregister(stream)
    assert hub.connected_by_pool() == {}
    hub.wake_pool("default")  # no streams left: nothing to do


def test_idle_streams_look_by_themselves_only_where_the_poll_saw_work(hub: Hub) -> None:
    assert not hub.may_find_work("default", ["echo"])  # no poll yet
    hub.found_claimable({"default": {"sleep"}})
    assert not hub.may_find_work("default", ["echo"])
    assert hub.may_find_work("default", ["echo", "sleep"])
    assert not hub.may_find_work("gpu", ["sleep"])
    hub.found_claimable({})
    assert not hub.may_find_work("default", ["sleep"])


def test_polling_wakes_as_many_streams_as_tasks_of_a_kind_they_run(
    hub: Hub, streams: list[FakeStream]
) -> None:
    streams[1].kinds = ["sleep"]
    hub.wake_for("default", "echo", 2)
    assert [s.woken for s in streams] == [1, 0, 1, 0]
