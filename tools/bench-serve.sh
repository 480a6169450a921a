#!/usr/bin/env bash
# Benchmarks of clip-serve, printed side by side: cold sequential read of a large file
# through the mount vs inflating its layer, warm read vs the same file on local disk,
# `find | wc -l` vs a reference extraction, and the cost of the mount options (readahead).
# Needs root, /dev/fuse, python3. Usage: tools/bench-serve.sh [BIG_FILE] [TREE_DIR]
# (defaults: the largest libLLVM in /usr/lib and /usr/lib/python3). Scratch: $BENCH_DIR
# (default /tmp/clip-bench-serve). Drops the machine's page cache once (for the lookup test).
set -euo pipefail
cd "$(dirname "$0")/.."
mkoci=$PWD/../shared/bench/mkoci.py
big=${1:-$(ls -S /usr/lib/x86_64-linux-gnu/libLLVM*.so* 2>/dev/null | head -1)}
tree=${2:-/usr/lib/python3}
work=${BENCH_DIR:-/tmp/clip-bench-serve}
[ -f "$big" ] || { echo "bench-serve: no large file to read; pass one as the first argument" >&2; exit 1; }

cargo build --release --bins -q
serve=$PWD/target/release/clip-serve
build=$PWD/target/release/clip-build
mkdir -p "$work"
cd "$work"
if [ ! -f image.clip ]; then
    rm -rf root layout
    mkdir -p root/big root/tree
    cp "$big" root/big/file
    cp -a "$tree/." root/tree/
    tar -C root -cf layer.tar .
    python3 "$mkoci" layout bench layer.tar >/dev/null
    "$build" layout:bench -o image.clip --quiet
fi
layer=$(ls -S layout/blobs/sha256/* | head -1)
size=$(stat -c %s root/big/file)
mb() { awk -v b="$size" -v s="$1" 'BEGIN { printf "%.0f MB/s", b / s / 1e6 }'; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

mnt=$work/mnt
mkdir -p "$mnt"
pid=
stop() {
    if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; fi
    mountpoint -q "$mnt" && fusermount3 -u -z "$mnt" || true
}
trap stop EXIT
start() {
    rm -rf cache
    "$serve" image.clip "$mnt" --cache-dir "$work/cache" "$@" 2>serve.log &
    pid=$!
    for _ in $(seq 200); do mountpoint -q "$mnt" && return; sleep 0.05; done
    cat serve.log >&2; exit 1
}

echo "large file: $big ($size bytes); tree: $tree"
t0=$(now); gzip -dc "$layer" >/dev/null; t1=$(now)
whole=$(secs "$t0" "$t1")
lsize=$(stat -c %s layer.tar)
echo "inflate the whole layer (gzip -dc, $lsize bytes): ${whole} s ($(awk -v b="$lsize" -v s="$whole" 'BEGIN { printf "%.0f MB/s", b / s / 1e6 }'))"

for ra in 128 1024; do
    start --readahead-kb "$ra"
    t0=$(now); cat "$mnt/big/file" >/dev/null; t1=$(now)
    cold=$(secs "$t0" "$t1")
    t0=$(now); cat "$mnt/big/file" >/dev/null; t1=$(now)
    warm=$(secs "$t0" "$t1")
    echo "readahead ${ra} KiB: cold cat ${cold} s ($(mb "$cold")), warm cat ${warm} s ($(mb "$warm"))"
    stop
done
cat root/big/file >/dev/null
t0=$(now); cat root/big/file >/dev/null; t1=$(now)
local_s=$(secs "$t0" "$t1")
echo "local disk (page cache) cat: ${local_s} s ($(mb "$local_s"))"

start
t0=$(now); n1=$(find "$mnt/tree" | wc -l); t1=$(now)
fc=$(secs "$t0" "$t1")
t0=$(now); find "$mnt/tree" | wc -l >/dev/null; t1=$(now)
fw=$(secs "$t0" "$t1")
t0=$(now); n2=$(find root/tree | wc -l); t1=$(now)
fr=$(secs "$t0" "$t1")
echo "find | wc -l ($n1 vs $n2 paths): mount cold ${fc} s, mount warm ${fw} s, reference extraction ${fr} s"

# A lookup while cold reads are in flight: metadata must not wait for them.
sync; echo 3 >/proc/sys/vm/drop_caches
start
cat "$mnt/big/file" >/dev/null & c1=$!
sleep 0.05
t0=$(now); stat "$mnt/tree" >/dev/null; ls "$mnt/tree" >/dev/null; t1=$(now)
wait "$c1"
echo "stat + ls during a cold read of the large file: $(secs "$t0" "$t1") s"
kill -USR1 "$pid"; sleep 0.2
stop
grep -o 'stats: .*' serve.log | tail -1
