"""Pluggable executors: one per task kind, found through the ``muster.executors`` entry points."""

from muster.agent.executors.base import (
    ExecutionResult,
    Executor,
    ExecutorError,
    ExecutorSettings,
    ExecutorUnavailable,
    ProgressFn,
    ProgressThrottle,
    TaskContext,
    Usage,
    UsageMeter,
)
from muster.agent.executors.registry import ENTRY_POINT_GROUP, ExecutorRegistry

__all__ = [
    "ENTRY_POINT_GROUP",
    "ExecutionResult",
    "Executor",
    "ExecutorError",
    "ExecutorRegistry",
    "ExecutorSettings",
    "ExecutorUnavailable",
    "ProgressFn",
    "ProgressThrottle",
    "TaskContext",
    "Usage",
    "UsageMeter",
]
