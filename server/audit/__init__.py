"""The audit trail: security mutations and task and stream transitions are recorded in the
transaction that makes the change (transitions through the group commit of
``muster.server.storage.batch``); other events (authentication failures, notices) go
through a bounded batch writer that spools to disk while the database is away.
``muster.server.audit.verify`` checks the hash chains."""

from muster.server.audit.record import AuditRecord, record_in
from muster.server.audit.writer import AuditWriter

__all__ = ["AuditRecord", "AuditWriter", "record_in"]
