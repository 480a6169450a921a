#!/usr/bin/env bash
# The main job on the embedded demo image, no network needed: write the demo OCI layout,
# index it with clip-build, look inside the index, then (as root, with /dev/fuse) mount it
# with clip-serve and read through the mount. Output goes under ${CLIP_DEMO_DIR:-/tmp/clip-demo}.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins -q
bin=target/release
dir=${CLIP_DEMO_DIR:-/tmp/clip-demo}
rm -rf "$dir"
mkdir -p "$dir"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step $bin/clip-build demo "$dir/layout"
step $bin/clip-build "$dir/layout:demo" -o "$dir/demo.clip"
step $bin/clip-build inspect "$dir/demo.clip"
step $bin/clip-build ls -R "$dir/demo.clip" /
step $bin/clip-build cat "$dir/demo.clip" /etc/motd
step $bin/clip-build verify --content "$dir/demo.clip"

if [ "$(id -u)" != 0 ] || [ ! -e /dev/fuse ] || ! command -v fusermount3 >/dev/null; then
    echo "demo: skipping the mount (needs root, /dev/fuse and fusermount3 from package fuse3)" >&2
    exit 0
fi
mnt="$dir/mnt"
mkdir -p "$mnt"
$bin/clip-serve "$dir/demo.clip" "$mnt" --cache-dir "$dir/cache" --stats-file "$dir/stats.json" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do mountpoint -q "$mnt" && break; sleep 0.05; done
mountpoint -q "$mnt" || { echo "demo: clip-serve did not mount" >&2; exit 1; }
step ls -la "$mnt" "$mnt/usr/bin"
step cat "$mnt/etc/motd" "$mnt/opt/fresh"
step sha256sum "$mnt/usr/share/data/big.txt"
step stat -c '%n %h links, inode %i' "$mnt/usr/bin/hello" "$mnt/usr/bin/hello-again"
kill -TERM $pid
wait $pid
trap - EXIT
step cat "$dir/stats.json"
# The run learnt which checkpoint intervals it read; embedded in the index as its startup
# profile, every node mounting the index fetches them at start (format 2.1).
step $bin/clip-build embed-profile "$dir/demo.clip" "$dir"/cache/profiles/sha256-*
step $bin/clip-build inspect "$dir/demo.clip"
