"""The audit chains' verify status for the audit page: ``muster audit verify``'s check
(server/audit/verify.py), run at most once a minute whoever looks, one run at a time.

Walking every chain reads the whole audit table, so a page never starts more than one
walk and waits for it only briefly: a long walk goes on and the page says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime

from muster.server.audit.verify import VerifyReport, verify
from muster.server.clock import Clock
from muster.server.storage.database import Database

log = logging.getLogger(__name__)

FRESH_SECONDS = 60.0
"""A result younger than this is shown instead of walking the chains again."""
WAIT_SECONDS = 5.0
"""How long a page waits for a walk before it says one is under way."""


@dataclass(frozen=True, slots=True)
class ChainStatus:
    checked_at: datetime | None
    """When the result shown was obtained; None: no walk has finished yet."""
    report: VerifyReport | None
    error: str = ""
    """Why the last walk could not finish (the database said no), if it did not."""
    running: bool = False


class ChainVerifier:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock
        self._last: ChainStatus = ChainStatus(None, None)
        self._last_at = float("-inf")
        self._walk: asyncio.Task[None] | None = None

    async def status(self) -> ChainStatus:
        if self._clock.monotonic() - self._last_at >= FRESH_SECONDS and self._walk is None:
            self._walk = asyncio.create_task(self._run(), name="console-audit-verify")
        if self._walk is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._walk), WAIT_SECONDS)
        if self._walk is not None:
            return ChainStatus(self._last.checked_at, self._last.report, self._last.error, True)
        return self._last

    async def close(self) -> None:
        if self._walk is not None:
            self._walk.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._walk

    async def _run(self) -> None:
        try:
            report = await verify(self._db)
            self._last = ChainStatus(self._clock.now(), report)
        except Exception as err:  # a database error: shown on the page, kept in the log
            log.exception("verifying the audit chains for the console failed")
            self._last = ChainStatus(self._clock.now(), None, type(err).__name__)
        finally:
            self._last_at = self._clock.monotonic()
            self._walk = None
