#!/usr/bin/env bash
# Build a local stand-in for the public base image (python:3.11-slim-bookworm) where no registry can be
# reached: Debian bookworm (Python 3.11) from debootstrap, trusting the host's extra CA certificates so
# pip works behind a TLS-intercepting proxy, imported with `docker import`. Needs root, debootstrap, docker.
set -euo pipefail
IMAGE=${1:-python:3.11-slim-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "standin: $IMAGE already present"
  exit 0
fi
root=$(mktemp -d /tmp/sv-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$MIRROR" >/dev/null
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
fi
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
ln -sf python3 "$root/usr/bin/python"
tar -C "$root" -c . | docker import \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
echo "standin: built $IMAGE from debootstrap"
