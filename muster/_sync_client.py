"""The blocking task client, on a plain grpc channel (no event loop behind it)."""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Generator, Iterable, Mapping
from datetime import datetime
from typing import Any

import grpc

from muster import _requests, tracing
from muster._base import SyncClientBase
from muster._convert import Payload, Seconds, task_from_proto
from muster._errors_map import translate
from muster._types import SubmitOutcome, Task, TaskSpec, TaskState
from muster._wait import Waiter
from muster.signing import TaskSigner
from muster.v1 import task_pb2, task_pb2_grpc

logger = logging.getLogger(__name__)


class Client(SyncClientBase[task_pb2_grpc.TaskServiceStub]):
    """Blocking client for ``TaskService``; use ``with`` or call :meth:`close`.

    The same API as :class:`AsyncClient`. With no config, settings come from
    :meth:`ClientConfig.from_env`.
    """

    _new_stub = task_pb2_grpc.TaskServiceStub

    def submit(
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
        """Queue a task and return it; see :meth:`AsyncClient.submit`."""
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
            response = self._transport.unary(self._stub.Submit, request, extra)
        return task_from_proto(response.task, submit_warning=response.warning)

    def submit_many(self, items: Iterable[TaskSpec]) -> builtins.list[SubmitOutcome]:
        """Queue many tasks in few calls; one outcome per item, in order; see
        :meth:`AsyncClient.submit_many`."""
        batches = _requests.SubmitMany(items)
        for batch in batches.batches:
            size = {"muster.submit_many.items": len(batch.request.items)}
            with tracing.client_call("SubmitMany", self.config.address, size) as extra:
                response = self._transport.unary(self._stub.SubmitMany, batch.request, extra)
            batches.settle(batch, response)
        return batches.outcomes()

    def get(self, task_id: str) -> Task:
        """The task as it is now; NotFoundError if there is no such task."""
        request = task_pb2.GetTaskRequest(task_id=task_id)
        return task_from_proto(self._transport.unary(self._stub.Get, request))

    def list(
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
            response = self._transport.unary(self._stub.List, request)
            tasks.extend(task_from_proto(t) for t in response.tasks)
            page_token = response.next_page_token
            if not page_token or (limit is not None and len(tasks) >= limit):
                return tasks if limit is None else tasks[:limit]

    def cancel(self, task_id: str, reason: str = "") -> Task:
        """Ask to cancel; a queued task ends at once, a held one once its agent stops."""
        request = task_pb2.CancelTaskRequest(task_id=task_id, reason=reason)
        return task_from_proto(self._transport.unary(self._stub.Cancel, request))

    def watch(self, task_id: str) -> Generator[Task, None, None]:
        """Yield the task's current state, then each change; ends after a terminal state.

        ``close()`` the generator (or let it finish) to end the stream early.
        """
        call = self._stub.Watch(
            task_pb2.WatchTaskRequest(task_id=task_id), metadata=self._transport.metadata
        )
        try:
            for message in call:
                yield task_from_proto(message)
        except grpc.RpcError as err:
            raise translate(err) from err
        finally:
            call.cancel()

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """Return the task once terminal; WaitTimeoutError after ``timeout`` seconds.

        See :meth:`AsyncClient.wait`.
        """
        waiter = Waiter(task_id, timeout)
        while True:
            call = self._stub.Watch(
                task_pb2.WatchTaskRequest(task_id=task_id),
                metadata=self._transport.metadata,
                timeout=waiter.remaining(),
            )
            try:
                for message in call:
                    if (final := waiter.seen(message)) is not None:
                        return final
            except grpc.RpcError as err:
                waiter.failed(err)
            finally:
                call.cancel()
            time.sleep(waiter.pause())
