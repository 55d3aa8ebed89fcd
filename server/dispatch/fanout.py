"""Announcements every replica must hear: new work, cancellations, revocations, task changes.

Each announcement is applied to this replica's hub at once and, with Redis configured,
published on one channel that every other replica applies to its own hub. Publishing
never blocks the caller: announcements queue, and what queued meanwhile goes out as one
message (a busy replica announces several changes per task: one Redis message each cost
more than the rest of the task's quota work). Pub/sub is the fast path only; the
reaper's database polling is the backstop when a message is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.dispatch.hub import Hub

log = logging.getLogger(__name__)

MAX_QUEUE = 100_000
MAX_BATCH = 500
"""Announcements per published message."""
RECONNECT_DELAY = 1.0


class Fanout:
    def __init__(
        self, hub: Hub, *, origin: str, redis_url: str = "", prefix: str = "muster"
    ) -> None:
        self.hub = hub
        self._origin = origin
        self._channel = f"{prefix}:fanout"
        self._redis = (
            aioredis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
            if redis_url
            else None
        )
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_QUEUE)
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()

    @property
    def shared(self) -> bool:
        """True when announcements reach other replicas."""
        return self._redis is not None

    async def start(self) -> None:
        if self._redis is None:
            return
        self._tasks = [
            asyncio.create_task(self._publish(), name="fanout-publish"),
            asyncio.create_task(self._subscribe(), name="fanout-subscribe"),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 5)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._redis is not None:
            await self._redis.aclose()

    # Announcements

    def wake_pool(self, pool: str) -> None:
        self._announce({"t": "wake", "pool": pool})

    def cancel_attempt(
        self, session_id: str | None, task_id: str, attempt: int, reason: str
    ) -> None:
        if session_id:
            self._announce(
                {
                    "t": "cancel",
                    "session": session_id,
                    "task": task_id,
                    "attempt": attempt,
                    "reason": reason,
                }
            )

    def close_agent(
        self,
        agent_id: str,
        code: grpc.StatusCode,
        message: str,
        serials: frozenset[str] | None = None,
    ) -> None:
        self._announce(
            {
                "t": "close",
                "agent": agent_id,
                "code": code.name,
                "message": message,
                "serials": sorted(serials) if serials is not None else None,
            }
        )

    def task_changed(self, task_id: str) -> None:
        self._announce({"t": "task", "task": task_id})

    def _announce(self, message: dict[str, Any]) -> None:
        _apply(self.hub, message)
        if self._redis is None:
            return
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("fan-out queue full; dropping an announcement (polling will catch up)")

    # Redis

    async def _publish(self) -> None:
        assert self._redis is not None
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < MAX_BATCH:
                batch.append(self._queue.get_nowait())
            payload = json.dumps({"o": self._origin, "m": batch}, separators=(",", ":"))
            try:
                await self._redis.publish(self._channel, payload)
            except (RedisError, OSError) as err:
                log.warning(
                    "fan-out publish failed (%s); other replicas will poll", type(err).__name__
                )
                await asyncio.sleep(RECONNECT_DELAY)

    async def _subscribe(self) -> None:
        assert self._redis is not None
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel)
                    self._subscribed.set()
                    async for item in pubsub.listen():
                        self._receive(item)
            except (RedisError, OSError) as err:
                log.warning("fan-out subscription lost (%s); retrying", type(err).__name__)
                await asyncio.sleep(RECONNECT_DELAY)

    def _receive(self, item: dict[str, Any]) -> None:
        if item.get("type") != "message":
            return
        try:
            message = json.loads(item["data"])
            if message["o"] == self._origin:
                return
            for announcement in message["m"]:
                _apply(self.hub, announcement)
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring a malformed fan-out message")


def _apply(hub: Hub, message: dict[str, Any]) -> None:
    kind = message.get("t")
    if kind == "wake":
        hub.wake_pool(message["pool"])
    elif kind == "task":
        hub.task_changed(message["task"])
    elif kind == "cancel":
        hub.cancel_attempt(
            message["session"], message["task"], message["attempt"], message["reason"]
        )
    elif kind == "close":
        serials = message.get("serials")
        hub.close_agent(
            message["agent"],
            grpc.StatusCode[message["code"]],
            message["message"],
            frozenset(serials) if serials is not None else None,
        )
