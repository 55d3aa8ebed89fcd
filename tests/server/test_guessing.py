"""Guessing is bounded however many calls are in flight, and a guessing script cannot lock
out a different, valid credential presented from its address: API tokens and bootstrap
tokens, on a real server, with 200 calls at once from one address (127.0.0.1)."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Awaitable

import grpc
import grpc.aio

from muster import AsyncAdminClient
from muster.server.app import ServerHandle
from muster.server.quotas.policy import auth_failure_subject, lockout_address
from muster.v1 import enrollment_pb2, enrollment_pb2_grpc, task_pb2, task_pb2_grpc
from tests.agentsim import Enroller, make_csr

AT_ONCE = 200
THRESHOLD = 10
"""The default lockout: 10 failures per key per 5 minutes (one back every 30 s)."""
OK, UNAUTHENTICATED = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED
LOCKED = grpc.StatusCode.RESOURCE_EXHAUSTED


def random_token(kind: str, token_id: str | None = None) -> str:
    """A well-formed token: a random id (or ``token_id``) and a random secret."""
    return f"{kind}_{token_id or secrets.token_hex(8)}.{secrets.token_urlsafe(32)}"


def channel(server: ServerHandle) -> grpc.aio.Channel:
    bundle = (server.config.ca_dir / "bundle.pem").read_bytes()
    return grpc.aio.secure_channel(server.api_address, grpc.ssl_channel_credentials(bundle))


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return OK


async def list_codes(server: ServerHandle, tokens: list[str]) -> Counter[grpc.StatusCode]:
    """TaskService.List with each token, all at once on one connection."""
    async with channel(server) as ch:
        stub = task_pb2_grpc.TaskServiceStub(ch)
        calls = [
            code_of(
                stub.List(task_pb2.ListTasksRequest(), metadata=(("authorization", f"Bearer {t}"),))
            )
            for t in tokens
        ]
        return Counter(await asyncio.gather(*calls))


async def enroll_codes(server: ServerHandle, tokens: list[str]) -> Counter[grpc.StatusCode]:
    """Enroll with each bootstrap token (one CSR for all), all at once."""
    csr, _ = make_csr()
    async with channel(server) as ch:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(ch)
        calls = [
            code_of(stub.Enroll(enrollment_pb2.EnrollRequest(token=t, csr_pem=csr))) for t in tokens
        ]
        return Counter(await asyncio.gather(*calls))


def failures_counted(server: ServerHandle, credential: str) -> float:
    """``muster_auth_failures_total``: failures evaluated and answered UNAUTHENTICATED."""
    value = server.registry.get_sample_value(
        "muster_auth_failures_total", {"listener": "api", "reason": credential}
    )
    return value or 0.0


async def audited(admin: AsyncAdminClient, server: ServerHandle, action: str) -> list[str]:
    await server.flush_audit()
    return [e.details for e in await admin.query_audit(action=action, limit=1000)]


async def test_concurrent_random_api_tokens_get_at_most_the_threshold_of_answers(
    server: ServerHandle, admin: AsyncAdminClient
) -> None:
    codes = await list_codes(server, [random_token("mat") for _ in range(AT_ONCE)])
    assert codes == {UNAUTHENTICATED: THRESHOLD, LOCKED: AT_ONCE - THRESHOLD}
    assert failures_counted(server, "api_token") == THRESHOLD
    # The admin's valid token works from the same, now locked-out, address (the admin
    # client's calls below come from 127.0.0.1 too).
    failures = await audited(admin, server, "auth.failure")
    assert len(failures) == THRESHOLD
    assert all('"unknown token"' in d for d in failures)
    lockouts = await audited(admin, server, "auth.lockout")
    assert len(lockouts) == 1 and '"token"' not in lockouts[0]
    # Malformed and missing tokens spend the same per-address allowance.
    assert await list_codes(server, ["mat_short", "", random_token("mat")]) == {LOCKED: 3}


async def test_guessing_one_tokens_secret_locks_out_only_that_token_at_that_address(
    server: ServerHandle, admin: AsyncAdminClient
) -> None:
    alice, alice_secret = await admin.create_api_token("alice", "submitter")
    _, bob_secret = await admin.create_api_token("bob", "submitter")
    guesses = [random_token("mat", alice.token_id) for _ in range(AT_ONCE)]
    codes = await list_codes(server, guesses)
    assert codes == {UNAUTHENTICATED: THRESHOLD, LOCKED: AT_ONCE - THRESHOLD}
    assert failures_counted(server, "api_token") == THRESHOLD
    # Alice's real secret is no better than a guess now, from this address: a right
    # guess beyond the allowance would get the same answer.
    assert await list_codes(server, [alice_secret]) == {LOCKED: 1}
    # Everyone else behind the address is unaffected, and so is random guessing's own
    # allowance: the lockout belongs to alice's token at this address alone.
    assert await list_codes(server, [bob_secret] * 3) == {OK: 3}
    assert await list_codes(server, [random_token("mat")]) == {UNAUTHENTICATED: 1}
    lockouts = await audited(admin, server, "auth.lockout")
    assert len(lockouts) == 1 and f'"mat_{alice.token_id}"' in lockouts[0]
    assert alice_secret.rpartition(".")[2] not in lockouts[0]


async def test_concurrent_calls_with_a_valid_token_are_never_refused(
    server: ServerHandle, admin: AsyncAdminClient
) -> None:
    _, secret = await admin.create_api_token("busy", "submitter")
    assert await list_codes(server, [secret] * AT_ONCE) == {OK: AT_ONCE}


async def test_concurrent_random_bootstrap_tokens_get_at_most_the_threshold_of_answers(
    server: ServerHandle, admin: AsyncAdminClient, enroller: Enroller
) -> None:
    codes = await enroll_codes(server, [random_token("mbt") for _ in range(AT_ONCE)])
    assert codes == {UNAUTHENTICATED: THRESHOLD, LOCKED: AT_ONCE - THRESHOLD}
    assert failures_counted(server, "bootstrap_token") == THRESHOLD
    denied = await audited(admin, server, "agent.enroll")
    assert len(denied) == THRESHOLD
    # Random guessing spent the address's allowance, not its enrollments: a valid
    # bootstrap token from the same address enrolls.
    enrolled = await enroller.enroll("after-guessing")
    assert enrolled.agent_id == "after-guessing"


async def test_guessing_one_bootstrap_tokens_secret_locks_out_only_that_token(
    server: ServerHandle, admin: AsyncAdminClient, enroller: Enroller
) -> None:
    target, target_secret = await admin.create_bootstrap_token("default")
    guesses = [random_token("mbt", target.token_id) for _ in range(AT_ONCE)]
    codes = await enroll_codes(server, guesses)
    assert codes == {UNAUTHENTICATED: THRESHOLD, LOCKED: AT_ONCE - THRESHOLD}
    assert failures_counted(server, "bootstrap_token") == THRESHOLD
    assert await enroll_codes(server, [target_secret]) == {LOCKED: 1}
    assert (await enroller.enroll("other-token")).agent_id == "other-token"
    lockouts = await audited(admin, server, "auth.lockout")
    assert len(lockouts) == 1 and f'"mbt_{target.token_id}"' in lockouts[0]


async def test_random_tokens_of_either_kind_spend_one_allowance_per_address(
    server: ServerHandle, admin: AsyncAdminClient, enroller: Enroller
) -> None:
    """Random API and bootstrap tokens are the same guessing: they spend one allowance
    per address, which valid tokens of known ids never need."""
    half = THRESHOLD // 2
    api = await list_codes(server, [random_token("mat") for _ in range(half)])
    boot = await enroll_codes(server, [random_token("mbt") for _ in range(THRESHOLD - half + 1)])
    assert api == {UNAUTHENTICATED: half}
    assert boot == {UNAUTHENTICATED: THRESHOLD - half, LOCKED: 1}
    assert (await enroller.enroll("still-fine")).agent_id == "still-fine"
    assert [a.agent_id for a in await admin.list_agents()] == ["still-fine"]


def test_an_ipv6_address_counts_as_its_slash_64() -> None:
    """Else a host given a /64 (the usual) would get 2**64 fresh allowances."""
    one, other = "2001:db8:1:2::10", "2001:db8:1:2:ffff:ffff:ffff:ffff"
    assert auth_failure_subject(one) == auth_failure_subject(other) == "peer:2001:db8:1:2::/64"
    assert auth_failure_subject(one, "mat_0123456789abcdef") == (
        "peer:2001:db8:1:2::/64/token:mat_0123456789abcdef"
    )
    assert lockout_address("2001:db8:1:3::10") == "2001:db8:1:3::/64"
    assert lockout_address("::ffff:10.0.0.7") == "10.0.0.7"  # IPv4-mapped: the IPv4 address
    assert lockout_address("10.0.0.7") == "10.0.0.7"
    assert lockout_address("unix:/run/muster.sock") == "unix:/run/muster.sock"
