"""grpc status codes become MusterError subclasses at the SDK boundary, keeping the cause."""

from __future__ import annotations

import grpc
import pytest

from muster import (
    AdminClient,
    AsyncAdminClient,
    AsyncClient,
    AuthenticationError,
    Client,
    ClientConfig,
    ConflictError,
    InvalidArgumentError,
    MusterError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    UnavailableError,
)

from .fakes import Failure, State

CODES: list[tuple[grpc.StatusCode, type[MusterError]]] = [
    (grpc.StatusCode.UNAUTHENTICATED, AuthenticationError),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
    (grpc.StatusCode.OUT_OF_RANGE, InvalidArgumentError),
    (grpc.StatusCode.NOT_FOUND, NotFoundError),
    (grpc.StatusCode.ALREADY_EXISTS, ConflictError),
    (grpc.StatusCode.FAILED_PRECONDITION, ConflictError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, QuotaExceededError),
    (grpc.StatusCode.UNAVAILABLE, UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, UnavailableError),
    (grpc.StatusCode.INTERNAL, MusterError),
    (grpc.StatusCode.UNKNOWN, MusterError),
    (grpc.StatusCode.ABORTED, MusterError),
    (grpc.StatusCode.UNIMPLEMENTED, MusterError),
]


def _check(err: MusterError, expected: type[MusterError], code: grpc.StatusCode) -> None:
    assert type(err) is expected
    assert str(err) == f"scripted {code.name}"
    cause = err.__cause__
    assert isinstance(cause, grpc.RpcError)
    assert cause.code() is code


@pytest.mark.parametrize(("code", "expected"), CODES, ids=[c.name for c, _ in CODES])
def test_sync_client_maps_status_codes(
    config: ClientConfig, fake: State, code: grpc.StatusCode, expected: type[MusterError]
) -> None:
    fake.failure = Failure(code, f"scripted {code.name}")
    with Client(config) as client, pytest.raises(MusterError) as info:
        client.get("t-1")
    _check(info.value, expected, code)


@pytest.mark.parametrize(("code", "expected"), CODES, ids=[c.name for c, _ in CODES])
async def test_async_client_maps_status_codes(
    config: ClientConfig, fake: State, code: grpc.StatusCode, expected: type[MusterError]
) -> None:
    fake.failure = Failure(code, f"scripted {code.name}")
    async with AsyncClient(config) as client:
        with pytest.raises(MusterError) as info:
            await client.submit("echo")
    _check(info.value, expected, code)


def test_errors_on_a_watch_stream_are_mapped(config: ClientConfig, fake: State) -> None:
    fake.failure = Failure(grpc.StatusCode.PERMISSION_DENIED, "scripted PERMISSION_DENIED")
    with Client(config) as client, pytest.raises(PermissionDeniedError) as info:
        next(client.watch("t-1"))
    _check(info.value, PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED)


async def test_async_watch_errors_are_mapped(config: ClientConfig, fake: State) -> None:
    fake.failure = Failure(grpc.StatusCode.UNAUTHENTICATED, "scripted UNAUTHENTICATED")
    async with AsyncClient(config) as client:
        with pytest.raises(AuthenticationError):
            await anext(client.watch("t-1"))
        with pytest.raises(AuthenticationError):
            await client.wait("t-1", timeout=2)


def test_admin_clients_map_errors_too(config: ClientConfig, fake: State) -> None:
    fake.failure = Failure(grpc.StatusCode.PERMISSION_DENIED, "scripted PERMISSION_DENIED")
    with AdminClient(config) as admin, pytest.raises(PermissionDeniedError) as info:
        admin.list_agents()
    _check(info.value, PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED)


async def test_async_admin_maps_errors(config: ClientConfig, fake: State) -> None:
    fake.failure = Failure(grpc.StatusCode.NOT_FOUND, "scripted NOT_FOUND")
    async with AsyncAdminClient(config) as admin:
        with pytest.raises(NotFoundError):
            await admin.get_agent("ghost")


def test_quota_error_carries_retry_after(config: ClientConfig, fake: State) -> None:
    fake.failure = Failure(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "submission rate exceeded", retry_after=1.5
    )
    with Client(config) as client, pytest.raises(QuotaExceededError) as info:
        client.submit("echo")
    assert info.value.retry_after == 1.5
    assert str(info.value) == "submission rate exceeded"
    assert info.value.__cause__ is not None


async def test_async_quota_error_carries_retry_after(config: ClientConfig, fake: State) -> None:
    fake.failure = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", retry_after=0.25)
    async with AsyncClient(config) as client:
        with pytest.raises(QuotaExceededError) as info:
            await client.submit("echo")
    assert info.value.retry_after == 0.25


def test_quota_error_without_retry_info_is_terminal(config: ClientConfig, fake: State) -> None:
    fake.failure = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "budget exhausted")
    with Client(config) as client, pytest.raises(QuotaExceededError) as info:
        client.submit("echo")
    assert info.value.retry_after is None


def test_a_wrong_token_is_an_authentication_error(config: ClientConfig, fake: State) -> None:
    wrong = ClientConfig(
        address=config.address, token="mst_wrong", ca_file=config.ca_file, timeout=5
    )
    with Client(wrong) as client, pytest.raises(AuthenticationError) as info:
        client.get("t-1")
    assert "mst_wrong" not in str(info.value)
    assert info.value.__cause__.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[union-attr]
