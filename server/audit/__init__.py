"""The audit trail: security mutations are recorded in their own transaction, the
high-volume events (streams, task transitions) through a bounded batch writer that spools
to disk while the database is away. ``muster.server.audit.verify`` checks the hash chains."""

from muster.server.audit.record import AuditRecord, record_in
from muster.server.audit.writer import AuditWriter

__all__ = ["AuditRecord", "AuditWriter", "record_in"]
