"""Signed tasks on the server: Submit checks the envelope (INVALID_ARGUMENT naming the
field, nothing stored), gives the task the id its envelope binds (the same envelope
again is the same task), stores and returns the envelope, forwards it in every
Assignment, and records an agent's refusal as a non-retryable failure that is audited
and counted."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select

from muster import (
    AsyncAdminClient,
    AsyncClient,
    ConflictError,
    InvalidArgumentError,
    TaskSigner,
    TaskState,
)
from muster import _requests as requests
from muster.server.app import ServerHandle
from muster.server.storage import models
from muster.signing import task_id_for
from muster.v1 import agent_pb2, common_pb2, task_pb2
from tests.agentsim import Enroller, SimAgent
from tests.conftest import client_config

pytestmark = pytest.mark.slow

SIGNER = TaskSigner(Ed25519PrivateKey.generate())


def submit_request(signer: TaskSigner | None = SIGNER, **fields: object) -> task_pb2.SubmitRequest:
    """A SubmitRequest as the SDK builds it (signed last, over what is sent)."""
    args: dict[str, object] = {
        "pool": "default",
        "selector": None,
        "priority": 0,
        "max_attempts": None,
        "idempotency_key": None,
        "schedule_to_start_timeout": None,
        "start_to_close_timeout": None,
        "deadline": None,
        "signer": signer,
    }
    return requests.submit("echo", b'{"msg":"signed"}', **(args | fields))  # type: ignore[arg-type]


async def raw_submit(
    client: AsyncClient, request: task_pb2.SubmitRequest
) -> task_pb2.SubmitResponse:
    response: task_pb2.SubmitResponse = await client._transport.unary(client._stub.Submit, request)
    return response


async def task_rows(server: ServerHandle) -> int:
    async with server.db.transaction() as session:
        return int(
            (await session.execute(select(func.count()).select_from(models.Task))).scalar_one()
        )


async def audit_details(
    admin: AsyncAdminClient, server: ServerHandle, action: str
) -> list[dict[str, object]]:
    await server.flush_audit()
    return [e.details_json() for e in await admin.query_audit(action=action, limit=100)]


async def test_a_signed_task_gets_the_id_its_envelope_binds_and_a_repeat_is_the_same_task(
    server: ServerHandle, client: AsyncClient, admin: AsyncAdminClient
) -> None:
    request = submit_request()
    first = await raw_submit(client, request)
    assert first.created
    assert first.task.task_id == task_id_for(request.signature.statement)
    assert first.task.signature == request.signature

    again = await raw_submit(client, request)
    assert (again.created, again.task.task_id) == (False, first.task.task_id)
    assert await task_rows(server) == 1

    task = await client.get(first.task.task_id)
    assert (task.signed, task.signed_by) == (True, SIGNER.key_id)
    submits = await audit_details(admin, server, "task.submit")
    assert submits == [{"kind": "echo", "pool": "default", "bytes": 16, "key_id": SIGNER.key_id}]

    # Through the SDK: each signing is a fresh nonce, so another task.
    other = await client.submit("echo", b'{"msg":"signed"}', signer=SIGNER)
    assert other.signed_by == SIGNER.key_id and other.task_id != task.task_id
    unsigned = await client.submit("echo", b"plain")
    assert (unsigned.signed, unsigned.signed_by) == (False, "")


def altered(request: task_pb2.SubmitRequest, **fields: object) -> task_pb2.SubmitRequest:
    copy = task_pb2.SubmitRequest()
    copy.CopyFrom(request)
    for name, value in fields.items():
        if name == "selector":
            copy.selector.clear()
            copy.selector.update(value)  # type: ignore[call-overload]
        else:
            setattr(copy, name, value)
    return copy


def envelope_with(request: task_pb2.SubmitRequest, **fields: object) -> task_pb2.SubmitRequest:
    copy = altered(request)
    for name, value in fields.items():
        setattr(copy.signature, name, value)
    return copy


REQUEST = submit_request(max_cost_usd=None, output_schema='{"type":"object"}')
EXPIRED = submit_request(signer=None)
# Signed an hour and a second before it is sent, valid for an hour: expired on arrival.
EXPIRED.signature.CopyFrom(
    TaskSigner(Ed25519PrivateKey.generate(), valid_for=timedelta(hours=1)).sign(
        EXPIRED, now=datetime.now(UTC) - timedelta(hours=1, seconds=1)
    )
)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (altered(REQUEST, payload=b'{"msg":"changed"}'), "signature.statement.payload_sha256"),
        (altered(REQUEST, kind="sleep"), "signature.statement.kind"),
        (altered(REQUEST, pool="other"), "signature.statement.pool"),
        (altered(REQUEST, selector={"gpu": "yes"}), "signature.statement.selector"),
        (altered(REQUEST, max_cost_usd=1.0), "signature.statement.max_cost_micros"),
        (altered(REQUEST, output_schema=""), "signature.statement.output_schema_sha256"),
        (envelope_with(REQUEST, statement=b"\xff\xff"), "signature.statement"),
        (envelope_with(REQUEST, signature=bytes(64)), "signature.signature"),
        (envelope_with(REQUEST, public_key=b"short"), "signature.public_key"),
        (envelope_with(REQUEST, key_id="not-the-thumbprint"), "signature.key_id"),
        (EXPIRED, "signature.statement.not_after"),
    ],
)
async def test_a_bad_envelope_is_invalid_argument_naming_the_field_and_stores_nothing(
    server: ServerHandle,
    client: AsyncClient,
    admin: AsyncAdminClient,
    request_: task_pb2.SubmitRequest,
    field: str,
) -> None:
    with pytest.raises(InvalidArgumentError, match=rf"^{re.escape(field)}: "):
        await raw_submit(client, request_)
    assert await task_rows(server) == 0
    assert await audit_details(admin, server, "task.submit") == []


async def test_another_tenant_cannot_submit_or_read_a_copied_envelope(
    server: ServerHandle, client: AsyncClient, admin: AsyncAdminClient
) -> None:
    request = submit_request()
    first = await raw_submit(client, request)
    _, secret = await admin.create_api_token("mallory", "submitter", tenant="elsewhere")
    async with AsyncClient(client_config(server, secret)) as mallory:
        with pytest.raises(ConflictError, match="another tenant submitted this signed task"):
            await raw_submit(mallory, request)
    assert await task_rows(server) == 1
    assert (await client.get(first.task.task_id)).owner != "elsewhere"


async def test_assignments_carry_the_envelope_and_a_refusal_fails_the_task_for_good(
    server: ServerHandle, enroller: Enroller, client: AsyncClient, admin: AsyncAdminClient
) -> None:
    agent = SimAgent.of(await enroller.enroll("strict"))
    await agent.hello(max_concurrency=2)
    request = submit_request(max_attempts=3)
    signed = (await raw_submit(client, request)).task
    unsigned = await client.submit("echo", b"plain", max_attempts=3)
    assignments = {a.task_id: a for a in [await agent.expect("assignment") for _ in range(2)]}
    assert assignments[signed.task_id].signature == request.signature
    assert not assignments[unsigned.task_id].HasField("signature")

    sample = server.registry.get_sample_value
    mismatch = {"reason": "signature_mismatch"}
    assert sample("muster_task_refusals_total", mismatch) == 0
    for task_id, reason in (
        (signed.task_id, common_pb2.REFUSAL_REASON_SIGNATURE_MISMATCH),
        (unsigned.task_id, common_pb2.REFUSAL_REASON_SIGNATURE_MISSING),
    ):
        # Sent retryable on purpose: a refusal is never retried, whatever the flag says.
        ack = await agent.finish(
            assignments[task_id],
            outcome=agent_pb2.OUTCOME_FAILED,
            error="refused by the agent: because",
            retryable=True,
            refusal=reason,
        )
        assert ack.status == agent_pb2.ACK_STATUS_RECORDED
    # A resent refusal is a duplicate, and counted once.
    again = await agent.finish(
        assignments[signed.task_id],
        outcome=agent_pb2.OUTCOME_FAILED,
        refusal=common_pb2.REFUSAL_REASON_SIGNATURE_MISMATCH,
    )
    assert again.status == agent_pb2.ACK_STATUS_DUPLICATE

    for task_id in (signed.task_id, unsigned.task_id):
        task = await client.get(task_id)
        assert (task.state, task.attempt, task.error) == (
            TaskState.FAILED,
            1,
            "refused by the agent: because",
        )
    assert sample("muster_task_refusals_total", mismatch) == 1
    assert sample("muster_task_refusals_total", {"reason": "signature_missing"}) == 1
    assert sample("muster_tasks_finished_total", {"outcome": "failed"}) == 2
    refused = await audit_details(admin, server, "task.refused")
    assert sorted(refused, key=lambda d: str(d["reason"])) == [
        {
            "task": signed.task_id,
            "attempt": 1,
            "agent": "strict",
            "reason": "SIGNATURE_MISMATCH",
            "key_id": SIGNER.key_id,
        },
        {
            "task": unsigned.task_id,
            "attempt": 1,
            "agent": "strict",
            "reason": "SIGNATURE_MISSING",
            "key_id": "",
        },
    ]
    finishes = await audit_details(admin, server, "task.finish")
    assert sorted(d["state"] for d in finishes) == ["FAILED", "FAILED"]
    await agent.close()


async def test_the_envelope_is_forwarded_on_every_attempt(
    enroller: Enroller, client: AsyncClient
) -> None:
    """A retried signed task carries its envelope again (retries are its attempts)."""
    agent = SimAgent.of(await enroller.enroll("retrier"))
    await agent.hello()
    request = submit_request(max_attempts=2)
    task = (await raw_submit(client, request)).task
    first = await agent.expect("assignment")
    await agent.finish(first, outcome=agent_pb2.OUTCOME_FAILED, retryable=True, error="flaky")
    agent.send(credit=agent_pb2.Credit(credits=1))
    second = await agent.expect("assignment")
    assert (second.task_id, second.attempt) == (task.task_id, 2)
    assert second.signature == request.signature
    await agent.close()
