"""The console listener serves the server's certificate, and the renewed one from the
next connection on, also to a client that sends no server name (a browser dialling an
IP address does not)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from cryptography import x509

from muster.server.app import ServerHandle
from muster.server.ca.server_cert import ensure_server_certificate


async def served_serial(server: ServerHandle, server_name: str) -> int:
    assert server.console is not None
    context = ssl.create_default_context(cafile=server.config.ca_dir / "bundle.pem")
    _, writer = await asyncio.open_connection(
        "127.0.0.1", server.console.port, ssl=context, server_hostname=server_name
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
        der = ssl_object.getpeercert(binary_form=True)
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der).serial_number


async def test_the_console_follows_the_server_certificate(
    console_server: ServerHandle, tmp_path: Path
) -> None:
    certificates = console_server.server_certificates
    first = certificates.current.serial
    for name in ("localhost", "127.0.0.1"):  # with SNI, and without (an IP address)
        assert await served_serial(console_server, name) == first
    renewed = ensure_server_certificate(
        console_server.ca,
        tmp_path / "renewed",
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1"],
    )
    certificates.current = renewed  # what the renewal loop does
    for name in ("127.0.0.1", "localhost"):
        assert await served_serial(console_server, name) == renewed.serial != first
