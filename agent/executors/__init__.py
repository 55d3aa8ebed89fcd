"""Pluggable executors: one per task kind, found through the ``muster.executors`` entry points."""

from agent.executors.base import (
    ExecutionResult,
    Executor,
    ExecutorError,
    ProgressFn,
    TaskContext,
    Usage,
)
from agent.executors.registry import ENTRY_POINT_GROUP, ExecutorRegistry

__all__ = [
    "ENTRY_POINT_GROUP",
    "ExecutionResult",
    "Executor",
    "ExecutorError",
    "ExecutorRegistry",
    "ProgressFn",
    "TaskContext",
    "Usage",
]
