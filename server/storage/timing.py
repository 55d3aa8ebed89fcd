"""Time arithmetic inside SQL, written once and compiled for each backend.

"Started at + its timeout < now" must be decided by the database, over every row, not
by reading a window of rows into Python. Postgres adds an interval to a timestamp;
SQLite has no time type (SQLAlchemy stores text), so there both sides become whole
milliseconds (SQLite's own resolution: its Julian day times 86,400,000, rounded, so a
time plus its timeout compares exactly with the same time later). Compare a
:func:`plus_seconds` only with an :func:`instant`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from muster.server.storage.types import UTCDateTime


class _PlusSeconds(FunctionElement[Any]):
    inherit_cache = True
    name = "plus_seconds"


class _Instant(FunctionElement[Any]):
    inherit_cache = True
    name = "instant"


def plus_seconds(timestamp: ColumnElement[Any], seconds: ColumnElement[Any]) -> _PlusSeconds:
    """``timestamp + seconds`` (a float column), ordered like a time."""
    return _PlusSeconds(timestamp, seconds)


def instant(value: datetime | ColumnElement[Any]) -> _Instant:
    """A time (a column, or an aware datetime bound as a parameter) comparable with
    :func:`plus_seconds`."""
    if isinstance(value, datetime):
        value = literal(value, UTCDateTime)
    return _Instant(value)


def _arguments(element: FunctionElement[Any], compiler: SQLCompiler, **kw: Any) -> list[str]:
    return [compiler.process(clause, **kw) for clause in element.clauses]


@compiles(_PlusSeconds)
def _plus_seconds(element: _PlusSeconds, compiler: SQLCompiler, **kw: Any) -> str:
    timestamp, seconds = _arguments(element, compiler, **kw)
    return f"({timestamp} + make_interval(secs => {seconds}))"


@compiles(_PlusSeconds, "sqlite")
def _plus_seconds_sqlite(element: _PlusSeconds, compiler: SQLCompiler, **kw: Any) -> str:
    timestamp, seconds = _arguments(element, compiler, **kw)
    return f"(round(julianday({timestamp}) * 86400000.0) + ({seconds}) * 1000.0)"


@compiles(_Instant)
def _instant(element: _Instant, compiler: SQLCompiler, **kw: Any) -> str:
    (value,) = _arguments(element, compiler, **kw)
    return value


@compiles(_Instant, "sqlite")
def _instant_sqlite(element: _Instant, compiler: SQLCompiler, **kw: Any) -> str:
    (value,) = _arguments(element, compiler, **kw)
    return f"round(julianday({value}) * 86400000.0)"
