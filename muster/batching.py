"""Batched stream messages (agent.proto: AgentBatch, ServerBatch), for both ends.

Whoever writes a stream takes what waits in its queue at once and sends it as one
message; these helpers split such a run into batches that stay under a byte size, so a
batch never nears the peer's message limit (a larger message travels alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

MAX_ITEMS = 256
"""Messages a writer puts into one batch (the receiving server accepts up to 1000)."""
MAX_BYTES = 1 << 20
"""A batch grows no larger than this (both ends accept 4 MiB by default)."""


def split(messages: Sequence[M], max_bytes: int = MAX_BYTES) -> list[list[M]]:
    """``messages`` in order, in groups of at most ``max_bytes`` serialized (a message
    larger than that makes a group of its own). Nothing is serialized for one message."""
    if len(messages) <= 1:
        return [list(messages)]
    groups: list[list[M]] = [[]]
    size = 0
    for message in messages:
        weight = message.ByteSize()
        if groups[-1] and size + weight > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(message)
        size += weight
    return groups
