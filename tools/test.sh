#!/usr/bin/env bash
# Run every test on a fresh Debian machine: installs the real components the tests start
# (FUSE, umoci, the CNCF registry, skopeo, Redis, busybox, runc) and runs the whole suite.
# Needs root (FUSE mounts, chroot, apt-get). Usage: tools/test.sh [cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(fuse3 umoci skopeo docker-registry redis-server busybox-static runc python3 attr libcap2-bin apache2-utils openssl curl isal util-linux)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "tools/test.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's docker-registry and redis-server packages may start system services; the tests
# start their own instances on free loopback ports and do not need them.
if [ ! -e /dev/fuse ]; then
    modprobe fuse 2>/dev/null || true
fi
[ -e /dev/fuse ] || { echo "tools/test.sh: /dev/fuse is missing: FUSE tests cannot run" >&2; exit 1; }

cargo test --locked "$@"
