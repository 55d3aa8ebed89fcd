"""The asyncio task client: submit, read, list, cancel, watch and wait for tasks."""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping
from datetime import datetime
from typing import Any

import grpc
import grpc.aio

from muster import _requests, tracing
from muster._base import AsyncClientBase
from muster._convert import Payload, Seconds, task_from_proto
from muster._errors_map import translate
from muster._types import SubmitOutcome, Task, TaskSpec, TaskState
from muster._wait import Waiter
from muster.signing import TaskSigner
from muster.v1 import task_pb2, task_pb2_grpc

logger = logging.getLogger(__name__)


class AsyncClient(AsyncClientBase["task_pb2_grpc.TaskServiceAsyncStub"]):
    """Asyncio client for ``TaskService``; use ``async with`` or call :meth:`close`.

    With no config, settings come from :meth:`ClientConfig.from_env`. The channel is
    opened on first use, so the client may be built outside the event loop.
    """

    _new_stub = task_pb2_grpc.TaskServiceStub

    async def submit(
        self,
        kind: str,
        payload: Payload = None,
        *,
        pool: str = "default",
        selector: Mapping[str, str] | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        schedule_to_start_timeout: Seconds | None = None,
        start_to_close_timeout: Seconds | None = None,
        deadline: datetime | None = None,
        max_cost_usd: float | None = None,
        output_schema: str | Mapping[str, Any] | None = None,
        signer: TaskSigner | None = None,
    ) -> Task:
        """Queue a task and return it (the first task again on a repeated idempotency key).

        ``payload``: bytes as is, str as UTF-8, dict/list as compact JSON. Timeouts are
        timedeltas or seconds; None means the server default. ``deadline`` must be aware.
        ``max_cost_usd`` caps what the task may spend over all its attempts (AI kinds);
        ``output_schema`` is a JSON Schema (text or a dict) the output must satisfy.
        ``submit_warning`` on the task returned says when no enrolled agent could run it
        as things stand (it is queued anyway); ``waiting_reason`` why it waits.

        ``signer`` (a :class:`muster.signing.TaskSigner`) signs the request: the task
        then gets the id its envelope binds (submitting the same envelope again returns
        it), and agents that require signatures for its kind run it only if they trust
        the key. The signature holds for the signer's ``valid_for`` (24 h by default).
        """
        request = _requests.submit(
            kind,
            payload,
            pool=pool,
            selector=selector,
            priority=priority,
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
            schedule_to_start_timeout=schedule_to_start_timeout,
            start_to_close_timeout=start_to_close_timeout,
            deadline=deadline,
            max_cost_usd=max_cost_usd,
            output_schema=output_schema,
            signer=signer,
        )
        with tracing.client_call("Submit", self.config.address, {tracing.TASK_KIND: kind}) as extra:
            response = await self._transport.unary(self._stub.Submit, request, extra)
        return task_from_proto(response.task, submit_warning=response.warning)

    async def submit_many(self, items: Iterable[TaskSpec]) -> builtins.list[SubmitOutcome]:
        """Queue many tasks in few calls; one :class:`SubmitOutcome` per item, in order.

        Each item (a :class:`TaskSpec`, the arguments of :meth:`submit`) is checked and
        submitted as :meth:`submit` would be, and fails alone: its outcome has ``.task``
        (with ``submit_warning``) or ``.error``, the MusterError :meth:`submit` would
        have raised (InvalidArgumentError, QuotaExceededError with ``retry_after``...).
        Items go in calls of at most 1,000 items and 3 MiB. An idempotency key works
        per item; an item repeating the key of an earlier item gets that item's task.

        Raises only for the whole call (AuthenticationError, UnavailableError...): the
        calls before the failing one were submitted, so with idempotency keys the whole
        list can be submitted again safely.
        """
        batches = _requests.SubmitMany(items)
        for batch in batches.batches:
            size = {"muster.submit_many.items": len(batch.request.items)}
            with tracing.client_call("SubmitMany", self.config.address, size) as extra:
                response = await self._transport.unary(self._stub.SubmitMany, batch.request, extra)
            batches.settle(batch, response)
        return batches.outcomes()

    async def get(self, task_id: str) -> Task:
        """The task as it is now; NotFoundError if there is no such task."""
        request = task_pb2.GetTaskRequest(task_id=task_id)
        return task_from_proto(await self._transport.unary(self._stub.Get, request))

    async def list(
        self,
        *,
        states: Iterable[TaskState | str] | None = None,
        pool: str | None = None,
        kind: str | None = None,
        limit: int | None = _requests.DEFAULT_LIST_LIMIT,
    ) -> builtins.list[Task]:
        """Tasks newest first, following page tokens until ``limit`` (None: all of them)."""
        _requests.check_limit(limit)
        tasks: builtins.list[Task] = []
        page_token = ""
        while True:
            remaining = None if limit is None else limit - len(tasks)
            request = _requests.list_tasks(
                states=states, pool=pool, kind=kind, remaining=remaining, page_token=page_token
            )
            response = await self._transport.unary(self._stub.List, request)
            tasks.extend(task_from_proto(t) for t in response.tasks)
            page_token = response.next_page_token
            if not page_token or (limit is not None and len(tasks) >= limit):
                return tasks if limit is None else tasks[:limit]

    async def cancel(self, task_id: str, reason: str = "") -> Task:
        """Ask to cancel; a queued task ends at once, a held one once its agent stops."""
        request = task_pb2.CancelTaskRequest(task_id=task_id, reason=reason)
        return task_from_proto(await self._transport.unary(self._stub.Cancel, request))

    async def watch(self, task_id: str) -> AsyncGenerator[Task, None]:
        """Yield the task's current state, then each change; ends after a terminal state.

        ``aclose()`` the generator (or let it finish) to end the stream early.
        """
        call = self._stub.Watch(
            task_pb2.WatchTaskRequest(task_id=task_id), metadata=self._transport.metadata
        )
        try:
            async for message in call:
                yield task_from_proto(message)
        except grpc.aio.AioRpcError as err:
            raise translate(err) from err
        finally:
            call.cancel()

    # The timeout mirrors Client.wait and becomes the Watch call's grpc deadline.
    async def wait(self, task_id: str, timeout: float | None = None) -> Task:  # noqa: ASYNC109
        """Return the task once terminal, whatever the outcome (check ``task.state``).

        Raises WaitTimeoutError (both a MusterError and a builtin TimeoutError) if
        ``timeout`` seconds pass first; the task itself keeps running.
        """
        waiter = Waiter(task_id, timeout)
        while True:
            call = self._stub.Watch(
                task_pb2.WatchTaskRequest(task_id=task_id),
                metadata=self._transport.metadata,
                timeout=waiter.remaining(),
            )
            try:
                async for message in call:
                    if (final := waiter.seen(message)) is not None:
                        return final
            except grpc.aio.AioRpcError as err:
                waiter.failed(err)
            finally:
                call.cancel()
            await asyncio.sleep(waiter.pause())
