"""SubmitMany: many Submits in one call, each item answered on its own, in order.

Every item goes through the one Submit path (``TaskService._submit_one``): the same
validation, signature, AI and budget checks, rate limit (counted per item) and audit.
The items run concurrently, so those without an idempotency key reach the group commit
together and share its transactions; an item whose key (or signed envelope) repeats an
earlier item of the request waits for that item's answer first, so it finds its task.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Hashable, Sequence

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from muster.server.services.errors import ServiceError, invalid
from muster.v1 import task_pb2

log = logging.getLogger(__name__)

MAX_ITEMS = 1000
"""Items per SubmitMany call (task.proto documents it)."""
CONCURRENCY = 256
"""Items in flight at once: enough to fill a group-commit batch (storage/batch.py
MAX_BATCH), few enough that keyed items, each in its own transaction, do not drain
the connection pool."""
STATUS_DETAILS_KEY = "grpc-status-details-bin"

SubmitOne = Callable[[task_pb2.SubmitRequest], Awaitable[task_pb2.SubmitResponse]]


class Refusal(ServiceError):
    """A refusal with a rich status (QuotaFailure, RetryInfo): Submit ends its call with
    the status as it is; SubmitMany answers the item with its code, message and delay."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.code, status.details)
        self.status = status


async def submit_many(
    items: Sequence[task_pb2.SubmitRequest], submit_one: SubmitOne
) -> task_pb2.SubmitManyResponse:
    """One result per item, in order; raises ServiceError only for the whole request."""
    if not items:
        raise invalid("items: at least one item is required")
    if len(items) > MAX_ITEMS:
        raise invalid(f"items: {len(items)} items; at most {MAX_ITEMS} per call (split the batch)")
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(
        item: task_pb2.SubmitRequest, after: asyncio.Task[task_pb2.SubmitManyResult] | None
    ) -> task_pb2.SubmitManyResult:
        if after is not None:
            await asyncio.wait([after])  # the earlier item of the same key is answered first
        async with gate:
            try:
                return task_pb2.SubmitManyResult(response=await submit_one(item))
            except ServiceError as err:
                return task_pb2.SubmitManyResult(error=item_error(err))
            except Exception:
                # One item's failure is its own; the others' results still stand.
                incident = secrets.token_hex(6)
                log.exception("unexpected error in a SubmitMany item (incident %s)", incident)
                return task_pb2.SubmitManyResult(
                    error=task_pb2.ItemError(
                        code=grpc.StatusCode.INTERNAL.value[0],
                        message=f"internal error (incident {incident})",
                    )
                )

    last: dict[Hashable, asyncio.Task[task_pb2.SubmitManyResult]] = {}
    running: list[asyncio.Task[task_pb2.SubmitManyResult]] = []
    async with asyncio.TaskGroup() as group:
        for item in items:
            key = _repeat_key(item)
            task = group.create_task(one(item, last.get(key) if key else None))
            if key:
                last[key] = task
            running.append(task)
    return task_pb2.SubmitManyResponse(results=[task.result() for task in running])


def _repeat_key(item: task_pb2.SubmitRequest) -> Hashable:
    """What makes a later item find an earlier one's task: its idempotency key, else its
    signed envelope (which binds the task id); None when nothing does."""
    if item.idempotency_key:
        return ("key", item.idempotency_key)
    if item.HasField("signature"):
        return ("signature", item.signature.SerializeToString(deterministic=True))
    return None


def item_error(err: ServiceError) -> task_pb2.ItemError:
    """The per-item form of the status Submit would have ended its call with."""
    error = task_pb2.ItemError(code=err.code.value[0], message=err.message)
    if isinstance(err, Refusal):
        for key, value in err.status.trailing_metadata or ():
            if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
                _copy_retry_delay(value, error)
    return error


def _copy_retry_delay(details: bytes, error: task_pb2.ItemError) -> None:
    try:
        status = status_pb2.Status.FromString(details)
    except DecodeError:
        return
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            error.retry_after.CopyFrom(info.retry_delay)
