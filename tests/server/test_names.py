"""Names that cannot spoof, opaque strings without control characters (issue 9, item 2).

Every identifier a person reads is checked with a full match of one grammar: no
trailing newline, no NUL, no control character, no bidi override. Opaque strings
(task ids, idempotency keys, reasons, audit filters, ids to look up) refuse NUL and
control characters too. Each refusal is INVALID_ARGUMENT naming the field, and changes
nothing. Raw stubs are used so that no client-side check hides the server's.
"""

from __future__ import annotations

import re
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from muster import AsyncAdminClient
from muster.agent.config import AgentConfig
from muster.errors import ConfigError
from muster.server.app import ServerHandle
from muster.server.services.validation import check_text
from muster.spiffe import AGENT_ID, SpiffeId
from muster.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)
from tests.agentsim import Enroller, make_csr
from tests.conftest import client_config

SPOOFS = ["web-01\n", "web\x00-01", "web-01\r", "web\u202e10-bew", "web-01\u2066", "web\x1b[2J"]
"""Names that print like another, or carry what a terminal or a log line acts on."""


class Api:
    """Raw stubs on the api listener with one API token."""

    def __init__(self, server: ServerHandle, token: str | None = None) -> None:
        bundle = (server.config.ca_dir / "bundle.pem").read_bytes()
        self.channel = grpc.aio.secure_channel(
            server.api_address, grpc.ssl_channel_credentials(bundle)
        )
        token = token or client_config(server).token
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.tasks = task_pb2_grpc.TaskServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.enrollment = enrollment_pb2_grpc.EnrollmentServiceStub(self.channel)

    async def refused(self, call: Any, request: Any, field: str) -> None:
        """``call(request)`` ends INVALID_ARGUMENT with a message that names ``field``."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            result = call(request, metadata=self.metadata)
            if hasattr(result, "__aiter__"):
                async for _ in result:
                    pass
            else:
                await result
        error = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, error.details())
        details = error.details() or ""
        # The field, or a path inside it: "labels['zone']: ...", "hello.in_flight[0]...".
        assert re.match(rf"{re.escape(field)}[:\[.]", details), (field, details)
        assert "\n" not in details and "\x00" not in details and "\u202e" not in details

    async def close(self) -> None:
        await self.channel.close()


@pytest.fixture
async def api(server: ServerHandle) -> Any:
    api = Api(server)
    yield api
    await api.close()


def test_the_grammar_is_a_full_match() -> None:
    for name in SPOOFS:
        assert AGENT_ID.fullmatch(name) is None
        assert AGENT_ID.match(name) is None, "anchored with \\Z, so even .match is full"
        with pytest.raises(ValueError):
            SpiffeId.for_agent("muster.test", name)
        with pytest.raises(ValueError):
            SpiffeId.parse(f"spiffe://muster.test/agent/{name}")
    with pytest.raises(ValueError):
        SpiffeId.parse("spiffe://muster.test\n/agent/web-01")
    assert SpiffeId.for_agent("muster.test", "web-01").agent_id == "web-01"


def test_the_agent_refuses_such_a_name_before_it_asks() -> None:
    """``muster agent --name`` uses the same grammar (muster.spiffe.AGENT_ID)."""
    for name in SPOOFS:
        with pytest.raises(ConfigError, match="--name"):
            AgentConfig(name=name)
    assert AgentConfig(name="web-01").name == "web-01"


def test_opaque_text_refuses_control_characters() -> None:
    for bad in ["a\x00b", "a\nb", "a\rb", "\x7f", "\x85", "a\u202eb", "a\u2028b", "a\tb"]:
        with pytest.raises(Exception, match="control characters"):
            check_text(bad, "field", 100)
    assert check_text("line one\nline two\tx", "field", 100, multiline=True)
    with pytest.raises(Exception, match="control characters"):
        check_text("a\x00b", "field", 100, multiline=True)
    assert check_text("ünïcode ✓ 名前", "field", 100) == "ünïcode ✓ 名前"


async def test_api_token_admin_newline_is_refused(
    server: ServerHandle, admin: AsyncAdminClient, api: Api
) -> None:
    """The exploit: `muster api-token create $'admin\\n'` made a second principal that
    listed and audited as `admin`."""
    before = await admin.list_api_tokens()
    for name in ["admin\n", *SPOOFS]:
        await api.refused(
            api.admin.CreateApiToken,
            admin_pb2.CreateApiTokenRequest(name=name, role=admin_pb2.ROLE_ADMIN),
            "name",
        )
        await api.refused(
            api.admin.CreateApiToken,
            admin_pb2.CreateApiTokenRequest(name="ok", role=admin_pb2.ROLE_SUBMITTER, tenant=name),
            "tenant",
        )
    assert len(await admin.list_api_tokens()) == len(before)
    # The grammar still takes what it always took.
    response = await api.admin.CreateApiToken(
        admin_pb2.CreateApiTokenRequest(
            name="ci-bot.2", role=admin_pb2.ROLE_SUBMITTER, tenant="team_a"
        ),
        metadata=api.metadata,
    )
    assert response.token.name == "ci-bot.2"


async def test_enroll_name_with_a_newline_is_refused(
    server: ServerHandle, enroller: Enroller, api: Api
) -> None:
    """The exploit: Enroll(name="web-01\\n") got a certificate whose SPIFFE ID ends in a
    newline. Now INVALID_ARGUMENT, and the token is not spent."""
    token = await enroller.token()
    csr, _ = make_csr()
    for name in SPOOFS:
        await api.refused(
            api.enrollment.Enroll,
            enrollment_pb2.EnrollRequest(token=token, csr_pem=csr, name=name),
            "name",
        )
    for key, value in [("zone\n", "a"), ("zone", "a\n"), ("zo\x00ne", "a"), ("zone", "\u202ea")]:
        await api.refused(
            api.enrollment.Enroll,
            enrollment_pb2.EnrollRequest(
                token=token, csr_pem=csr, name="web-01", labels={key: value}
            ),
            "labels",
        )
    enrolled = await enroller.enroll("web-01", token=token)  # the token was not spent
    assert enrolled.agent_id == "web-01"


async def test_task_names_and_labels(api: Api) -> None:
    submit = api.tasks.Submit
    for bad in SPOOFS:
        await api.refused(submit, task_pb2.SubmitRequest(kind="echo" + bad), "kind")
        await api.refused(submit, task_pb2.SubmitRequest(kind="echo", pool=bad), "pool")
        await api.refused(
            submit, task_pb2.SubmitRequest(kind="echo", selector={bad: "x"}), "selector"
        )
        await api.refused(
            submit, task_pb2.SubmitRequest(kind="echo", selector={"zone": bad}), "selector"
        )
    ok = await submit(
        task_pb2.SubmitRequest(kind="echo", pool="default", selector={"a/b": "x:y"}),
        metadata=api.metadata,
    )
    assert ok.created


async def test_opaque_task_strings_refuse_nul_and_control_characters(
    server: ServerHandle, api: Api
) -> None:
    """A NUL gave INTERNAL on Postgres in task ids, cancel reasons and list filters, and
    passed in idempotency keys."""
    for bad in ["x\x00", "x\n", "x\u202e", "x\x1b"]:
        await api.refused(
            api.tasks.Submit,
            task_pb2.SubmitRequest(kind="echo", idempotency_key=bad),
            "idempotency_key",
        )
        await api.refused(api.tasks.Get, task_pb2.GetTaskRequest(task_id=bad), "task_id")
        await api.refused(api.tasks.Watch, task_pb2.WatchTaskRequest(task_id=bad), "task_id")
        await api.refused(api.tasks.Cancel, task_pb2.CancelTaskRequest(task_id=bad), "task_id")
        await api.refused(api.tasks.List, task_pb2.ListTasksRequest(pool=bad), "pool")
        await api.refused(api.tasks.List, task_pb2.ListTasksRequest(kind=bad), "kind")
    await api.refused(
        api.tasks.Submit,
        task_pb2.SubmitRequest(kind="echo", output_schema='{"type":\n "object"\x00}'),
        "output_schema",
    )
    task = (await api.tasks.Submit(task_pb2.SubmitRequest(kind="echo"), metadata=api.metadata)).task
    await api.refused(
        api.tasks.Cancel,
        task_pb2.CancelTaskRequest(task_id=task.task_id, reason="a\x00b"),
        "reason",
    )
    got = await api.tasks.Get(task_pb2.GetTaskRequest(task_id=task.task_id), metadata=api.metadata)
    assert not got.cancel_requested


async def test_admin_names_and_opaque_strings(
    server: ServerHandle, admin: AsyncAdminClient, api: Api
) -> None:
    stub = api.admin
    tokens_before = await admin.list_bootstrap_tokens()
    for bad in SPOOFS:
        await api.refused(
            stub.CreateBootstrapToken, admin_pb2.CreateBootstrapTokenRequest(pool=bad), "pool"
        )
        await api.refused(
            stub.CreateBootstrapToken,
            admin_pb2.CreateBootstrapTokenRequest(labels={bad: "x"}),
            "labels",
        )
        await api.refused(
            stub.CreateBootstrapToken,
            admin_pb2.CreateBootstrapTokenRequest(labels={"zone": bad}),
            "labels",
        )
        await api.refused(
            stub.CreateBootstrapToken,
            admin_pb2.CreateBootstrapTokenRequest(name_pattern="web-*" + bad),
            "name_pattern",
        )
        await api.refused(stub.SetPoolSettings, admin_pb2.SetPoolSettingsRequest(pool=bad), "pool")
        await api.refused(stub.GetPoolSettings, admin_pb2.GetPoolSettingsRequest(pool=bad), "pool")
        await api.refused(
            stub.SetPoolSettings,
            admin_pb2.SetPoolSettingsRequest(pool="gpu", allowed_models=["claude" + bad]),
            "allowed_models",
        )
        for scope in (f"tenant:{bad}", f"pool:{bad}", f"task:{bad}", f"global{bad}"):
            await api.refused(
                stub.SetBudget,
                admin_pb2.SetBudgetRequest(scope=scope, limit_micros=1, period="day"),
                "scope",
            )
            await api.refused(stub.GetBudget, admin_pb2.GetBudgetRequest(scope=scope), "scope")
            await api.refused(
                stub.DeleteBudget, admin_pb2.DeleteBudgetRequest(scope=scope), "scope"
            )
    assert len(await admin.list_bootstrap_tokens()) == len(tokens_before)
    assert await admin.list_budgets() == []

    for bad in ["x\x00", "x\n", "x\u202e"]:
        for call, request, field in [
            (stub.GetAgent, admin_pb2.GetAgentRequest(agent_id=bad), "agent_id"),
            (
                stub.SetAgentEnabled,
                admin_pb2.SetAgentEnabledRequest(agent_id=bad, enabled=False),
                "agent_id",
            ),
            (stub.RevokeAgent, admin_pb2.RevokeAgentRequest(agent_id=bad), "agent_id"),
            (
                stub.RevokeAgent,
                admin_pb2.RevokeAgentRequest(agent_id="web-01", reason=bad),
                "reason",
            ),
            (stub.RevokeCertificate, admin_pb2.RevokeCertificateRequest(serial=bad), "serial"),
            (
                stub.RevokeCertificate,
                admin_pb2.RevokeCertificateRequest(serial="ab", reason=bad),
                "reason",
            ),
            (stub.ListAgents, admin_pb2.ListAgentsRequest(pool=bad), "pool"),
            (stub.QueryAudit, admin_pb2.QueryAuditRequest(actor=bad), "actor"),
            (stub.QueryAudit, admin_pb2.QueryAuditRequest(action=bad), "action"),
            (
                stub.DeleteBootstrapToken,
                admin_pb2.DeleteBootstrapTokenRequest(token_id=bad),
                "token_id",
            ),
            (stub.DeleteApiToken, admin_pb2.DeleteApiTokenRequest(token_id=bad), "token_id"),
        ]:
            await api.refused(call, request, field)

    created = await stub.CreateBootstrapToken(
        admin_pb2.CreateBootstrapTokenRequest(
            pool="gpu", labels={"zone": "eu-1"}, name_pattern="web-[0-9]*", ttl=Duration(seconds=60)
        ),
        metadata=api.metadata,
    )
    assert created.token.name_pattern == "web-[0-9]*"
