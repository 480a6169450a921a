#!/bin/bash
# Cold start of a whole image from the origin (OCI layout and, when the shared corpus has
# been pushed, a registry), from Redis and from the local disk cache, side by side.
#
#   tools/bench-redis.sh [IMAGE] [extra args for benches/redis.rs, e.g. --runs 5 --threads 2]
#
# IMAGE defaults to $BENCH_DIR/oci:debian-python (built by shared/bench/make-images.sh),
# else the demo image. If $BENCH_DIR/registry/data holds the corpus, a private
# docker-registry serves it on a free loopback port for the registry row and is stopped
# at the end (only the PID this script started). redis-server is started by the bench.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_DIR=${BENCH_DIR:-/tmp/bench}
command -v redis-server >/dev/null || { echo "redis-server is not installed; run .ci/run (it apt-get installs redis-server)" >&2; exit 1; }

IMAGE=${1:-}
[ $# -gt 0 ] && shift
if [ -z "$IMAGE" ] && [ -f "$BENCH_DIR/oci/index.json" ]; then IMAGE=$BENCH_DIR/oci:debian-python; fi
ARGS=()
[ -n "$IMAGE" ] && ARGS+=(--image "$IMAGE" --origin "$IMAGE")

REG_PID=
TMP=$(mktemp -d)
cleanup() {
  [ -n "$REG_PID" ] && kill "$REG_PID" 2>/dev/null && wait "$REG_PID" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

TAG=${IMAGE##*:}
if [ -n "$IMAGE" ] && [ -d "$BENCH_DIR/registry/data/docker/registry/v2/repositories/$TAG" ] && command -v docker-registry >/dev/null; then
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat >"$TMP/registry.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $BENCH_DIR/registry/data
  maintenance:
    readonly:
      enabled: true
  redirect:
    disable: true
http:
  addr: 127.0.0.1:$PORT
YML
  docker-registry serve "$TMP/registry.yml" >"$TMP/registry.log" 2>&1 &
  REG_PID=$!
  for _ in $(seq 100); do curl -fsS -o /dev/null "http://127.0.0.1:$PORT/v2/" 2>/dev/null && break; sleep 0.1; done
  curl -fsS -o /dev/null "http://127.0.0.1:$PORT/v2/" || { cat "$TMP/registry.log" >&2; echo "the private registry did not start" >&2; exit 1; }
  ARGS+=(--origin "127.0.0.1:$PORT/$TAG:latest")
fi

cargo bench --bench redis -- "${ARGS[@]}" "$@"
