"""``python -m bench.rawref``: the raw gRPC ceiling, a plain grpc.aio server with no Muster code
in its request path.

Two listeners with the same certificates as a Muster server: an mTLS port (client
certificates from Muster's CA required, as on the agent listener) serving a bidi echo,
and a TLS port (server-authenticated, as on the api listener) serving a unary call whose
response size the request names. Messages are raw bytes: no protobuf, no interceptors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from muster.server.ca import CertificateAuthority, ensure_server_certificate

OPTIONS = [("grpc.so_reuseport", 0)]


async def _echo(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message


async def _call(request: bytes, context: Any) -> bytes:
    return b"r" * int.from_bytes(request[:4], "big")


def _handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "bench.Raw",
        {
            "Echo": grpc.stream_stream_rpc_method_handler(_echo),
            "Call": grpc.unary_unary_rpc_method_handler(_call),
        },
    )


async def serve(ca_dir: Path, cert_dir: Path, out: Path, trust_domain: str) -> None:
    ca = CertificateAuthority.load_or_create(ca_dir, trust_domain)
    cert = ensure_server_certificate(
        ca, cert_dir, dns_names=["localhost"], ip_addresses=["127.0.0.1", "::1"]
    )
    identity = [(cert.private_key_pem, cert.chain_pem)]
    mtls = grpc.aio.server(options=OPTIONS)
    mtls.add_generic_rpc_handlers([_handlers()])
    mtls_port = mtls.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            identity, root_certificates=ca.bundle_pem, require_client_auth=True
        ),
    )
    tls = grpc.aio.server(options=OPTIONS)
    tls.add_generic_rpc_handlers([_handlers()])
    tls_port = tls.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(identity))
    await mtls.start()
    await tls.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {"mtls": f"127.0.0.1:{mtls_port}", "tls": f"127.0.0.1:{tls_port}", "pid": os.getpid()}
        )
    )
    os.replace(tmp, out)
    try:
        await stop.wait()
    finally:
        await asyncio.gather(mtls.stop(0.5), tls.stop(0.5))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rawref")
    parser.add_argument("--ca-dir", type=Path, required=True)
    parser.add_argument("--cert-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trust-domain", default="muster.local")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(args.ca_dir, args.cert_dir, args.out, args.trust_domain))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
