#!/usr/bin/env python3
"""Create the development PKI (root, intermediate, server certificate) with Muster's own CA code.

Run it with the project's interpreter, e.g.:

    .venv/bin/python certs/scripts/dev-pki.py --out certs/dev --dns server

(``server`` is the server's name in docker-compose.yml; add --dns/--ip for every other
name clients dial.)

Re-running keeps the CA and reuses the server certificate while it still fits.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import timedelta
from pathlib import Path

try:
    from muster.server.ca import CAError, CertificateAuthority, ensure_server_certificate
    from muster.server.ca.signer import KEY_TYPES
except ModuleNotFoundError as err:  # not the project's interpreter
    raise SystemExit(
        f"dev-pki: cannot import Muster ({err}); run it with the project's virtualenv, "
        "e.g. .venv/bin/python certs/scripts/dev-pki.py"
    ) from None

ALWAYS_DNS = ("localhost",)
ALWAYS_IP = ("127.0.0.1", "::1")
"""The server's default ``MUSTER_SERVER_IPS``: a certificate without them would be reissued."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Create Muster's development PKI. Never commit the output directory: "
        "it holds private keys."
    )
    parser.add_argument("--out", type=Path, default=Path("certs/dev"), help="output directory")
    parser.add_argument("--trust-domain", default="muster.local", help="SPIFFE trust domain")
    parser.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name for the server certificate (repeatable; localhost is always included)",
    )
    parser.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="IP address for the server certificate (repeatable; 127.0.0.1 and ::1 are always "
        "included)",
    )
    parser.add_argument("--key-type", choices=KEY_TYPES, default="ec-p256", help="CA key type")
    parser.add_argument(
        "--server-days", type=int, default=90, help="server certificate lifetime in days"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA (every certificate it issued stops being trusted)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dns_names = list(dict.fromkeys([*ALWAYS_DNS, *args.dns]))
    ips = list(dict.fromkeys([*ALWAYS_IP, *args.ip]))
    out: Path = args.out
    try:
        if args.force:
            ca = CertificateAuthority.init(
                out, args.trust_domain, key_type=args.key_type, force=True
            )
            for stale in (out / "server.pem", out / "server.key"):
                stale.unlink(missing_ok=True)
        else:
            ca = CertificateAuthority.load_or_create(out, args.trust_domain, key_type=args.key_type)
        server = ensure_server_certificate(
            ca,
            out,
            dns_names=dns_names,
            ip_addresses=ips,
            lifetime=timedelta(days=args.server_days),
        )
    except CAError as err:
        print(f"dev-pki: {err}", file=sys.stderr)
        return 1
    print(f"trust domain   {ca.trust_domain}")
    print(f"trust bundle   {out / 'bundle.pem'}")
    print(
        f"intermediate   {out / 'intermediate.pem'} (expires {ca.intermediate_not_after:%Y-%m-%d})"
    )
    state = "issued" if server.issued else "reused"
    print(f"server cert    {server.cert_path} ({state}; expires {server.not_after:%Y-%m-%d})")
    print(f"server names   {', '.join([*dns_names, *ips])}")
    print(f"private keys   {out}/*.key (mode 0600; do not commit {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
