"""An example Muster executor plugin: ``files.sha256`` (see docs/executors.md)."""

from muster_example_checksum.executor import (
    KIND,
    PAYLOAD_SCHEMA,
    ROOT_ENV,
    ChecksumExecutor,
    Digest,
    Request,
    parse_payload,
)

__all__ = [
    "KIND",
    "PAYLOAD_SCHEMA",
    "ROOT_ENV",
    "ChecksumExecutor",
    "Digest",
    "Request",
    "parse_payload",
]
