"""The api listener fails closed: a service with no access rule is refused to everyone,
and reflection is served only while its setting allows it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from muster import AsyncAdminClient
from muster.server.app import ServerHandle, start_server
from tests.conftest import client_config, server_config

pytestmark = pytest.mark.slow

Calls = list[str]


def dummy_service(calls: Calls) -> grpc.GenericRpcHandler:
    """A service the interceptor has never heard of, as if added to app.py later without
    an access rule: a unary and a server-streaming method on raw bytes."""

    async def poke(request: bytes, context: Any) -> bytes:
        calls.append("Poke")
        return b"secret data"

    async def watch(request: bytes, context: Any) -> AsyncIterator[bytes]:
        calls.append("Watch")
        yield b"secret data"

    return grpc.method_handlers_generic_handler(
        "test.v1.Dummy",
        {
            "Poke": grpc.unary_unary_rpc_method_handler(poke),
            "Watch": grpc.unary_stream_rpc_method_handler(watch),
        },
    )


@pytest.fixture
def calls() -> Calls:
    return []


@pytest.fixture
async def start(
    tmp_path: Path, backend: dict[str, object], calls: Calls
) -> AsyncIterator[Callable[..., Any]]:
    """Start a server (with the dummy service) with settings; stopped after the test."""
    handles: list[ServerHandle] = []

    async def starter(**settings: object) -> ServerHandle:
        data_dir = tmp_path / f"data{len(handles)}"
        if handles:  # one database: later servers are replicas, sharing the first's CA
            data_dir.mkdir(mode=0o700)
            (data_dir / "ca").symlink_to(handles[0].config.ca_dir, target_is_directory=True)
        config = server_config(data_dir, **backend, **settings)
        handle = await start_server(config, extra_api_handlers=[dummy_service(calls)])
        handles.append(handle)
        return handle

    try:
        yield starter
    finally:
        for handle in handles:
            await handle.stop(grace=1.0)


def channel(server: ServerHandle) -> grpc.aio.Channel:
    bundle = (server.config.ca_dir / "bundle.pem").read_bytes()
    return grpc.aio.secure_channel(server.api_address, grpc.ssl_channel_credentials(bundle))


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"Bearer {token}"),)


async def dummy_codes(server: ServerHandle, token: str | None) -> list[grpc.StatusCode]:
    """The status of Poke and of Watch, called with ``token`` (None: no token)."""
    codes = []
    async with channel(server) as ch:
        try:
            await ch.unary_unary("/test.v1.Dummy/Poke")(b"hi", metadata=bearer(token))
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as err:
            codes.append(err.code())
        try:
            async for _ in ch.unary_stream("/test.v1.Dummy/Watch")(b"hi", metadata=bearer(token)):
                pass
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as err:
            codes.append(err.code())
    return codes


async def list_services(server: ServerHandle) -> list[str]:
    async with channel(server) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        call = stub.ServerReflectionInfo(iter([request]))
        names = []
        async for response in call:
            names += [s.name for s in response.list_services_response.service]
        return names


async def test_a_service_without_an_access_rule_is_refused_to_everyone(
    start: Callable[..., Any], calls: Calls, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="muster.server.interceptors.auth")
    server: ServerHandle = await start()
    unimplemented = [grpc.StatusCode.UNIMPLEMENTED] * 2
    assert await dummy_codes(server, None) == unimplemented
    assert await dummy_codes(server, "mat_0123456789abcdef." + "A" * 43) == unimplemented
    async with AsyncAdminClient(client_config(server)) as admin:
        _, submitter = await admin.create_api_token("alice", "submitter")
    assert await dummy_codes(server, submitter) == unimplemented
    admin_token = server.config.admin_token_file.read_text().strip()
    assert await dummy_codes(server, admin_token) == unimplemented
    assert calls == []  # the handler never ran
    # The same answer as a method that does not exist: a prober learns nothing.
    async with channel(server) as ch:
        answers = []
        for method in ("/test.v1.Dummy/Poke", "/test.v1.Dummy/Nothing"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(method)(b"hi")
            answers.append((info.value.code(), info.value.details()))
    assert answers[0] == answers[1] == (grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
    # Refused before any token is looked at: not a failed authentication.
    failures = server.registry.get_sample_value(
        "muster_auth_failures_total", {"listener": "api", "reason": "api_token"}
    )
    assert not failures
    # The operator is told, once per method, that this is a bug.
    logged = [r.getMessage() for r in caplog.records if "misconfigured" in r.getMessage()]
    assert len(logged) == 2 and all("no access rule" in line for line in logged)


async def test_health_and_enrollment_need_no_api_token(start: Callable[..., Any]) -> None:
    server: ServerHandle = await start(reflection=False)
    async with channel(server) as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        from muster.v1 import enrollment_pb2, enrollment_pb2_grpc

        # Enroll is reached (and checks its own bootstrap token) without an API token.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await enrollment_pb2_grpc.EnrollmentServiceStub(ch).Enroll(
                enrollment_pb2.EnrollRequest(token="mbt_0123456789abcdef." + "A" * 43)
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bootstrap token" in (info.value.details() or "")


async def test_reflection_is_served_without_a_token_only_while_the_setting_allows_it(
    start: Callable[..., Any],
) -> None:
    on: ServerHandle = await start()  # the default: on
    assert on.config.reflection
    names = await list_services(on)
    assert "muster.v1.TaskService" in names and "test.v1.Dummy" not in names
    off: ServerHandle = await start(reflection=False)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await list_services(off)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
