"""Fan-out messages on Redis are sealed with the replicas' shared key: whoever else can
publish on the channel cannot close a stream, and a captured genuine message cannot be
replayed. The sealing itself and the settings are checked on both backends; the attack
on two real replicas sharing Postgres and Redis in the Postgres pass."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from muster import AsyncAdminClient, AsyncClient
from muster.errors import ConfigError
from muster.server.app import ServerHandle, start_server
from muster.server.ca import CertificateAuthority
from muster.server.config import ServerConfig
from muster.server.dispatch.fanout_auth import REPLAY_WINDOW, Rejected, Sealer
from tests.agentsim import Enroller, SimAgent
from tests.conftest import BACKEND, FANOUT_SECRET, REDIS_URL, client_config, server_config
from tests.pg import fresh_database

KEY = secrets.token_hex(32).encode()
CLOSE = {"t": "close", "agent": "a-1", "code": "UNAVAILABLE", "message": "x", "serials": None}


def _rejected(sealer: Sealer, data: bytes) -> str:
    with pytest.raises(Rejected) as caught:
        sealer.open(data)
    return caught.value.reason


def test_a_sealed_message_opens_once_under_the_same_key_and_channel() -> None:
    sender = Sealer(KEY, channel="p:fanout", origin="a")
    receiver = Sealer(KEY, channel="p:fanout", origin="b")
    data = sender.seal([CLOSE])
    opened = receiver.open(data)
    assert (opened.origin, opened.messages) == ("a", [CLOSE])
    assert _rejected(receiver, data) == "replayed"
    assert receiver.open(sender.seal([CLOSE])).messages == [CLOSE]  # the next one is new


def test_forged_tampered_and_foreign_messages_are_rejected() -> None:
    receiver = Sealer(KEY, channel="p:fanout", origin="b")
    legacy = json.dumps({"o": "x", "m": [CLOSE]}).encode()  # the unsigned format of before
    assert _rejected(receiver, legacy) == "unsigned"
    assert _rejected(receiver, b"") == "unsigned"
    other_key = Sealer(secrets.token_hex(32).encode(), channel="p:fanout", origin="x")
    assert _rejected(receiver, other_key.seal([CLOSE])) == "bad_tag"
    genuine = Sealer(KEY, channel="p:fanout", origin="a").seal([CLOSE])
    assert _rejected(receiver, genuine.replace(b'"a-1"', b'"a-2"')) == "bad_tag"
    assert _rejected(receiver, genuine[:-1] + b" ") == "bad_tag"
    other_channel = Sealer(KEY, channel="q:fanout", origin="a")  # another deployment's prefix
    assert _rejected(receiver, other_channel.seal([CLOSE])) == "bad_tag"


def test_messages_sealed_outside_the_window_are_stale() -> None:
    now = time.time()
    receiver = Sealer(KEY, channel="c", origin="b", clock=lambda: now)
    for skew in (-REPLAY_WINDOW - 1, REPLAY_WINDOW + 1, -3600.0):
        old = Sealer(KEY, channel="c", origin=f"a{skew}", clock=lambda s=skew: now + s)
        assert _rejected(receiver, old.seal([CLOSE])) == "stale"
    fresh = Sealer(KEY, channel="c", origin="a", clock=lambda: now - REPLAY_WINDOW + 1)
    assert receiver.open(fresh.seal([CLOSE])).messages == [CLOSE]


def test_redis_needs_a_secret_and_the_secret_stays_hidden(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fanout_secret: required with redis_url"):
        ServerConfig(redis_url="redis://127.0.0.1:6379/0")
    short = "tooshort-" + secrets.token_hex(4)
    with pytest.raises(ConfigError, match="at least 32 characters") as caught:
        ServerConfig(redis_url="redis://127.0.0.1:6379/0", fanout_secret=short)
    assert short not in str(caught.value)
    secret = secrets.token_hex(32)
    config = ServerConfig(redis_url="redis://127.0.0.1:6379/0", fanout_secret=secret)
    assert secret not in repr(config)
    assert config.resolved_fanout_secret() == secret.encode()
    # From a file, so it need not be in the environment.
    path = tmp_path / "fanout.secret"
    path.write_text(f"  {secret}\n")
    env = {"MUSTER_REDIS_URL": "redis://127.0.0.1:6379/0", "MUSTER_FANOUT_SECRET_FILE": str(path)}
    assert ServerConfig.from_env(env).resolved_fanout_secret() == secret.encode()
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 32 characters") as caught:
        ServerConfig.from_env(env).resolved_fanout_secret()
    assert "short" not in str(caught.value).replace("at least", "")
    with pytest.raises(ConfigError, match="set one, not both"):
        ServerConfig(fanout_secret=secret, fanout_secret_file=str(path))


# Two real replicas ------------------------------------------------------------------

needs_redis = pytest.mark.skipif(
    BACKEND != "postgres", reason="runs in the Postgres pass (make test)"
)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[ServerHandle, ServerHandle]]:
    """Replicas a and b on one database, CA and Redis prefix. They poll the database only
    every 30 s, so whatever reaches a stream within the test came by fan-out."""
    prefix = f"muster-test-{secrets.token_hex(6)}"
    CertificateAuthority.init(tmp_path / "a" / "ca", "muster.local")
    shutil.copytree(tmp_path / "a" / "ca", tmp_path / "b" / "ca")
    async with fresh_database() as url:
        handles = [
            await start_server(
                server_config(
                    tmp_path / name,
                    database_url=url,
                    redis_url=REDIS_URL,
                    redis_prefix=prefix,
                    replica_id=name,
                    poll_interval=timedelta(seconds=30),
                )
            )
            for name in ("a", "b")
        ]
        try:
            yield handles[0], handles[1]
        finally:
            await asyncio.gather(*(h.stop(grace=1.0) for h in handles))


def _rejections(handle: ServerHandle, reason: str) -> float:
    value = handle.registry.get_sample_value("muster_fanout_rejected_total", {"reason": reason})
    return value or 0.0


async def _until(condition: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _serves_work(agent: SimAgent, client: AsyncClient) -> None:
    """The stream is alive: a task submitted now reaches it and completes."""
    task = await client.submit("echo", {"n": 1})
    assignment = await agent.expect("assignment", timeout=5)
    assert assignment.task_id == task.task_id
    await agent.finish(assignment, output=b"{}")
    assert (await client.wait(task.task_id, timeout=5)).state.name == "SUCCEEDED"


@needs_redis
async def test_forged_and_replayed_closes_are_dropped_and_a_genuine_one_works(
    pair: tuple[ServerHandle, ServerHandle],
) -> None:
    a, b = pair
    channel = f"{a.config.redis_prefix}:fanout"
    redis = aioredis.from_url(REDIS_URL)
    listener = redis.pubsub(ignore_subscribe_messages=True)
    await listener.subscribe(channel)
    try:
        async with (
            AsyncAdminClient(client_config(a)) as admin_a,
            AsyncAdminClient(client_config(b)) as admin_b,
            AsyncClient(client_config(a)) as client,
        ):
            enrolled = await Enroller(a, admin_a).enroll("target")
            agent = SimAgent(a.agent_endpoint, enrolled.credentials())
            await agent.hello()
            close = {
                "t": "close",
                "agent": enrolled.agent_id,
                "code": "PERMISSION_DENIED",
                "message": "forged",
                "serials": None,
            }
            # Whoever can publish on the channel, without the key: the old unsigned
            # format, a tag under another key, and (had they stolen an old one) a message
            # sealed under the real key an hour ago.
            forged = [
                json.dumps({"o": "attacker", "m": [close]}),
                Sealer(secrets.token_hex(32).encode(), channel=channel, origin="x").seal([close]),
                Sealer(
                    FANOUT_SECRET.encode(),
                    channel=channel,
                    origin="old",
                    clock=lambda: time.time() - 3600,
                ).seal([close]),
            ]
            for data in forged:
                await redis.publish(channel, data)
            await _until(
                lambda: (
                    (
                        _rejections(a, "unsigned"),
                        _rejections(a, "bad_tag"),
                        _rejections(a, "stale"),
                    )
                    == (1.0, 1.0, 1.0)
                )
            )
            assert not agent.call.done()
            await _serves_work(agent, client)

            # A genuine close from the other replica still works, at once.
            async def genuine_close() -> bytes:
                """The close b publishes (the forged ones above are still queued here)."""
                async for item in listener.listen():
                    data = bytes(item["data"])
                    if b'"message":"agent disabled"' in data and b'"o":"b:' in data:
                        return data
                raise AssertionError("no close message")

            capture = asyncio.create_task(genuine_close())
            await admin_b.set_agent_enabled(enrolled.agent_id, False)
            code = await asyncio.wait_for(agent.status(), 3)
            assert code == grpc.StatusCode.PERMISSION_DENIED
            captured = await asyncio.wait_for(capture, 3)
            await agent.close()

            # The agent is enabled again and reconnects; the captured close, replayed
            # within the window, is dropped.
            await admin_b.set_agent_enabled(enrolled.agent_id, True)
            agent = SimAgent(a.agent_endpoint, enrolled.credentials())
            await agent.hello()
            await redis.publish(channel, captured)
            await _until(lambda: _rejections(a, "replayed") == 1.0)
            assert not agent.call.done()
            await _serves_work(agent, client)
            assert _rejections(b, "replayed") == 1.0  # b saw it too (its own, again)
            await agent.close()
    finally:
        await listener.aclose()
        await redis.aclose()
