"""TLS for the console listener with the server's own certificate, following its renewal.

grpc's listeners ask a fetcher at every handshake (server/app.py); here the SNI callback,
which OpenSSL calls for every ClientHello (with or without a server name), swaps in a
context built from the current certificate once it changes. Open connections keep the
certificate they began with, as on the grpc listeners.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from muster.server.ca import ServerCertificate, ServerCertificates

log = logging.getLogger(__name__)


class ConsoleTLS:
    """The listening context; :attr:`context` goes to the HTTPS site."""

    def __init__(self, certificates: ServerCertificates) -> None:
        self._certificates = certificates
        self._served = certificates.current
        self.context = _context(self._served)
        self._current = self.context
        self.context.sni_callback = self._handshake

    def _handshake(
        self, connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        current = self._certificates.current
        if current is not self._served:
            try:
                self._current = _context(current)
                self._served = current
            except (ssl.SSLError, OSError, ValueError):
                # Keep serving the one we have; the next handshake tries again.
                log.exception("loading the renewed server certificate for the console failed")
        if self._current is not self.context:
            connection.context = self._current
        return None


def _context(certificate: ServerCertificate) -> ssl.SSLContext:
    """A server context for ``certificate``: TLS 1.2 or newer, no client certificates."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with _pem_files(certificate) as (chain, key):
        context.load_cert_chain(chain, key)
    return context


@contextmanager
def _pem_files(certificate: ServerCertificate) -> Iterator[tuple[str, str]]:
    """The certificate's chain and key as files ``load_cert_chain`` can read: the bytes
    the grpc listeners serve, not whatever the data directory holds now (a replica
    sharing it may be rewriting it). In memory where Linux allows (``memfd``), else in
    a private temporary directory removed at once."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("muster-console-chain"), os.memfd_create("muster-console-key")]
        try:
            for fd, data in zip(
                fds, (certificate.chain_pem, certificate.private_key_pem), strict=True
            ):
                os.write(fd, data)
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="muster-console-") as directory:
        chain, key = Path(directory) / "chain.pem", Path(directory) / "key.pem"
        chain.write_bytes(certificate.chain_pem)
        key.touch(mode=0o600)
        key.write_bytes(certificate.private_key_pem)
        yield str(chain), str(key)
