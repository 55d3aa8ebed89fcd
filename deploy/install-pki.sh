#!/bin/sh
# Install the development PKI (certs/dev, mounted read-only at /pki) into the server's
# data directory, owned by the image's non-root user.
#
# Why copy instead of mounting certs/dev straight into DATA_DIR/ca: dev-pki.py writes
# keys mode 0600 owned by whoever ran it, which the container's `muster` user cannot
# read; the server also rewrites DATA_DIR/server/server.pem when it needs a new one,
# which a read-only bind mount would refuse. Copying also keeps root.key out of the
# server: only the intermediate signs online.
#
# Layout produced (what server.app loads):
#   DATA_DIR/ca/bundle.pem, intermediate.pem, intermediate.key   CertificateAuthority.load_or_create
#   DATA_DIR/server/server.pem, server.key                       ensure_server_certificate
set -eu

src=${1:-/pki}
data=${MUSTER_DATA_DIR:-/var/lib/muster}
owner=${MUSTER_USER:-muster}

for name in bundle.pem intermediate.pem intermediate.key server.pem server.key; do
  if [ ! -s "$src/$name" ]; then
    echo "install-pki: $src/$name is missing; create the development PKI first:" >&2
    echo "  .venv/bin/python certs/scripts/dev-pki.py --out certs/dev --dns server" >&2
    exit 1
  fi
done

install -d -o "$owner" -g "$owner" -m 0700 "$data" "$data/ca" "$data/server"
install -o "$owner" -g "$owner" -m 0644 "$src/bundle.pem" "$src/intermediate.pem" "$data/ca/"
install -o "$owner" -g "$owner" -m 0600 "$src/intermediate.key" "$data/ca/"
install -o "$owner" -g "$owner" -m 0644 "$src/server.pem" "$data/server/"
install -o "$owner" -g "$owner" -m 0600 "$src/server.key" "$data/server/"
echo "install-pki: installed the CA and the server certificate from $src into $data"
