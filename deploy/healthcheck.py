#!/usr/bin/env python3
"""Container healthcheck: ask the server's api listener for gRPC health over verified TLS.

A TCP probe would pass while the server is still creating its CA or migrating; the
standard health service reports SERVING only once both listeners are up.

    healthcheck.py [--addr localhost:7443] [--ca-file $MUSTER_DATA_DIR/ca/bundle.pem]

Exit status 0 when SERVING, 1 otherwise (with one line on stderr saying why).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _parser() -> argparse.ArgumentParser:
    data_dir = Path(os.environ.get("MUSTER_DATA_DIR") or ".muster")
    parser = argparse.ArgumentParser(description="Exit 0 when the Muster api listener is SERVING.")
    parser.add_argument("--addr", default="localhost:7443", help="api listener HOST:PORT")
    parser.add_argument(
        "--ca-file",
        type=Path,
        default=data_dir / "ca" / "bundle.pem",
        help="trust bundle that verifies the server (default $MUSTER_DATA_DIR/ca/bundle.pem)",
    )
    parser.add_argument("--service", default="", help="service to ask about ('' = the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        bundle = args.ca_file.read_bytes()
    except OSError as err:
        print(f"healthcheck: cannot read {args.ca_file}: {err.strerror}", file=sys.stderr)
        return 1
    credentials = grpc.ssl_channel_credentials(root_certificates=bundle)
    with grpc.secure_channel(args.addr, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            print(f"healthcheck: {args.addr}: {err.code().name}", file=sys.stderr)
            return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"healthcheck: {args.addr}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
