"""Announcements every replica must hear: new work, cancellations, revocations, task changes,
new agent streams (which replace older ones of the same agent), certificate rotations.

Each announcement is applied to this replica's hub at once and, with Redis configured,
published on one channel that every other replica applies to its own hub. Publishing
never blocks the caller: announcements queue, and what queued meanwhile goes out as one
message (a busy replica announces several changes per task: one Redis message each cost
more than the rest of the task's quota work). Pub/sub is the fast path only; the
reaper's database polling is the backstop when a message is lost.

Every message on the channel is sealed with the replicas' shared key
(:mod:`muster.server.dispatch.fanout_auth`); one that does not verify is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from muster.server.dispatch.fanout_auth import Rejected, Sealer
from muster.server.dispatch.hub import Hub, NewStream

log = logging.getLogger(__name__)

MAX_QUEUE = 100_000
MAX_BATCH = 500
"""Announcements per published message."""
RECONNECT_DELAY = 1.0
REJECTION_LOG_INTERVAL = 60.0
"""Seconds between warnings about dropped (unverifiable) messages: a flood logs little."""


class Fanout:
    def __init__(
        self,
        hub: Hub,
        *,
        origin: str,
        redis_url: str = "",
        prefix: str = "muster",
        secret: bytes = b"",
        rejected: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """``secret``: the key shared by the replicas, required with ``redis_url``;
        ``rejected(reason)`` is called for each message dropped as unverifiable."""
        self.hub = hub
        self._origin = origin
        self._channel = f"{prefix}:fanout"
        self._redis = (
            aioredis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
            if redis_url
            else None
        )
        if self._redis is not None and not secret:
            raise ValueError("fan-out over Redis needs the replicas' shared secret")
        self._sealer = Sealer(secret, channel=self._channel, origin=origin) if secret else None
        self._rejected = rejected
        self._rejections_unlogged = 0
        self._next_rejection_log = 0.0
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_QUEUE)
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()

    @property
    def shared(self) -> bool:
        """True when announcements reach other replicas."""
        return self._redis is not None

    @property
    def tasks(self) -> dict[str, asyncio.Task[None]]:
        """The publishing and subscribing loops by name, with Redis (else none): they run
        until :meth:`close` (the server's supervisor watches them)."""
        return {task.get_name(): task for task in self._tasks}

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
        # One that crashed before was the supervisor's to report: no error here.
        await asyncio.gather(*self._tasks, return_exceptions=True)
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

    def task_changed(self, task_id: str, ended: Mapping[str, Any] | None = None) -> None:
        """``ended``: the row the change that ended the task left, for this replica's
        watchers (``Hub.task_changed``); the others are told the id and read it."""
        self.hub.task_changed(task_id, ended)
        self._tell_others({"t": "task", "task": task_id})

    def rotate_agents(self, agent_id: str | None, reason: str, issued_before: float) -> None:
        """Every replica sends Renew to the streams of ``agent_id`` (None: of every agent)
        whose certificates were issued before ``issued_before`` (POSIX seconds)."""
        self._announce(
            {"t": "rotate", "agent": agent_id, "reason": reason, "before": issued_before}
        )

    def stream_started(self, new: NewStream) -> None:
        """An agent's stream was welcomed: older streams of that agent, on any replica,
        are replaced (or handed over, for a renewed certificate: see Hub.stream_started)."""
        self._announce(
            {
                "t": "stream",
                "agent": new.agent_id,
                "session": new.session_id,
                "serial": new.serial,
                "not_before": new.not_before,
                "peer": new.peer,
                "started_at": new.started_at,
            }
        )

    def _announce(self, message: dict[str, Any]) -> None:
        _apply(self.hub, message)
        self._tell_others(message)

    def _tell_others(self, message: dict[str, Any]) -> None:
        """Queue ``message`` for the other replicas (with Redis; else nobody to tell)."""
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
            assert self._sealer is not None
            payload = self._sealer.seal(batch)
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
        assert self._sealer is not None
        try:
            opened = self._sealer.open(item.get("data") or b"")
        except Rejected as rejected:
            self._reject(rejected.reason)
            return
        if opened.origin == self._origin:
            return
        try:
            for announcement in opened.messages:
                _apply(self.hub, announcement)
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("ignoring a malformed fan-out message")

    def _reject(self, reason: str) -> None:
        """Count a dropped message; warn now and then (never with its content)."""
        self._rejected(reason)
        self._rejections_unlogged += 1
        now = time.monotonic()
        if now >= self._next_rejection_log:
            log.warning(
                "dropped %d fan-out message(s) that did not verify (last: %s); is every "
                "replica configured with the same fanout_secret, and are clocks in sync?",
                self._rejections_unlogged,
                reason,
            )
            self._rejections_unlogged = 0
            self._next_rejection_log = now + REJECTION_LOG_INTERVAL


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
    elif kind == "stream":
        hub.stream_started(
            NewStream(
                agent_id=str(message["agent"]),
                session_id=str(message["session"]),
                serial=str(message["serial"]),
                not_before=float(message["not_before"]),
                peer=str(message["peer"]),
                started_at=float(message["started_at"]),
            )
        )
    elif kind == "rotate":
        agent = message.get("agent")
        hub.rotate_agents(
            str(agent) if agent is not None else None,
            str(message["reason"]),
            float(message["before"]),
        )
    elif kind == "close":
        serials = message.get("serials")
        hub.close_agent(
            message["agent"],
            grpc.StatusCode[message["code"]],
            message["message"],
            frozenset(serials) if serials is not None else None,
        )
