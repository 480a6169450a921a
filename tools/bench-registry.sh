#!/usr/bin/env bash
# Issue 4's benchmark: time to a first result from a registry, clip vs a full pull, on the
# shared corpus (debian-python, pushed by ../shared/bench/make-images.sh as
# $REG/debian-python:latest to the local CNCF registry, plain HTTP on loopback).
#
#   clip:      index built from the registry once (timed separately), then, with an empty
#              --cache-dir and the page cache dropped, from `clip-serve` start to the exit of
#              `chroot MERGED python3 -c 'import numpy'`, where MERGED is an overlayfs with the
#              read-only clip mount as lowerdir (as container runtimes use it);
#   clip with a profile: one more such run records an access profile (--record-profile),
#              then the same cold runs start with --prefetch-profile (the profile is the only
#              thing kept between runs: cache emptied, page cache dropped); the same cold
#              runs again without flags from an index trained with the command at build
#              time (clip-build REF -o INDEX -- CMD), as fresh nodes start it; then one restart
#              keeps the last run's disk cache (page cache dropped): its profile replay
#              should find the intervals there and fetch next to nothing; and one start
#              without flags after a cold run whose cached pieces were then deleted replays
#              the profile that run learnt in the cache directory;
#   fleet:     with a Redis (../shared/bench/start-redis.sh, port $REDIS_PORT or 6390), a cold
#              node A fills it and shares its learnt profile; node B (empty cache) then starts
#              with pieces and profile in Redis, node C with only the profile left there;
#   full pull: `skopeo copy docker://… oci:DIR` + `umoci raw unpack` + the same chroot command,
#              page cache dropped first;
#   bytes:     compressed bytes clip-serve requested from the registry (stats file `fetched`:
#              the sum of the Range requests' lengths, an upper bound of what crossed the
#              wire) vs the image's compressed size (layers + config).
#   registry:  bytes the registry process read from its disk per blob request in the cold
#              clip runs (/proc/PID/io): what one ranged GET costs this registry whatever
#              the range's length.
#   environment: every run of the command (clip, full pull, training) gets the image
#              config's Env and nothing else, as a container of the image would.
# Targets (issue 4): >= 20x faster to the first result; <= 15% of the image's bytes fetched.
#
# Needs root, /dev/fuse, fuse3, overlayfs, skopeo, umoci, jq, curl, python3, redis-server and the corpus
# registry data ($BENCH_DIR/registry, from make-images.sh). Starts the registry with
# ../shared/bench/start-registry.sh if it is not running, and stops it at the end then.
# Drops the machine's page cache before every cold run.
#
# Usage: tools/bench-registry.sh
# Env: BENCH_DIR (/tmp/bench), REGISTRY_PORT (5000), WORK ($BENCH_DIR/clip-bench-registry,
# removed at the end unless KEEP_SCRATCH=1), RUNS (3 clip runs; median), PULL_RUNS (1 full
# pull, ~30 s each), PREFETCH_THREADS (clip-serve's default), BUILD_ARGS (extra clip-build
# arguments, e.g. "--checkpoint-interval 1M"), NO_BUILD=1 (use target/release as it is).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
shared=$(cd "$repo/../shared/bench" 2>/dev/null && pwd) || { echo "bench-registry: ../shared/bench is missing" >&2; exit 1; }
B=${BENCH_DIR:-/tmp/bench}
export BENCH_DIR=$B
W=${WORK:-$B/clip-bench-registry}
RUNS=${RUNS:-3}
PULL_RUNS=${PULL_RUNS:-1}
REG=127.0.0.1:${REGISTRY_PORT:-5000}
IMG=debian-python
REF_NAME=$REG/$IMG:latest
CMD=(/usr/bin/python3 -c 'import numpy')

die() { echo "bench-registry: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (FUSE, overlayfs, chroot, drop_caches)"
[ -e /dev/fuse ] || die "/dev/fuse is missing (modprobe fuse)"
for t in fusermount3 skopeo umoci jq curl python3 mountpoint chroot; do
    command -v "$t" >/dev/null || die "$t is missing: apt-get install fuse3 skopeo umoci jq curl python3 util-linux"
done
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
grep -qw overlay /proc/filesystems || die "overlayfs is not available (modprobe overlay)"
[ -d "$B/registry/data" ] || die "no registry data in $B/registry: run ../shared/bench/make-images.sh first"

if [ "${NO_BUILD:-0}" != 1 ]; then cargo build --release --bins -q; fi
serve=$repo/target/release/clip-serve
build=$repo/target/release/clip-build
[ -x "$serve" ] && [ -x "$build" ] || die "no release binaries: cargo build --release --bins"

mkdir -p "$W"
M=$W/mnt O=$W/ov
mkdir -p "$M"
pid= REG_STARTED=0
stop_serve() {
    if mountpoint -q "$O/merged" 2>/dev/null; then umount "$O/merged" || umount -l "$O/merged" || true; fi
    if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; fi
    if mountpoint -q "$M"; then fusermount3 -u -z "$M" || true; fi
}
cleanup() {
    stop_serve
    if [ "$REG_STARTED" = 1 ]; then "$shared/start-registry.sh" stop || true; fi
    if [ "${KEEP_SCRATCH:-0}" != 1 ]; then rm -rf "$W"; else echo "scratch kept in $W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

. "$repo/tools/bench-lib.sh"

if ! "$shared/start-registry.sh" status >/dev/null 2>&1; then
    "$shared/start-registry.sh" start; REG_STARTED=1
fi
curl -fsS "http://$REG/v2/$IMG/manifests/latest" -H 'Accept: application/vnd.oci.image.manifest.v1+json' >/dev/null ||
    die "$REF_NAME is not in the registry: run ../shared/bench/make-images.sh (it pushes it)"
manifest=$(skopeo inspect --raw --tls-verify=false "docker://$REF_NAME")
image_bytes=$(jq '[.layers[].size] + [.config.size] | add' <<<"$manifest")
echo "image $REF_NAME: $(jq '.layers | length' <<<"$manifest") layers, $image_bytes compressed bytes (layers + config)"
# Every run of the command, through clip or on the pulled rootfs, gets the environment a
# container of the image gets (its config's Env), as clip-build's training does.
mapfile -t image_env < <(skopeo inspect --config --tls-verify=false "docker://$REF_NAME" | jq -r '.config.Env // [] | .[]')
RUN_ENV=(env -i "${image_env[@]}")
echo "command environment (the image config's Env): ${image_env[*]:-none}"

echo "== index from the registry (clip-build, once; reads every layer once)"
t0=$(now); "$build" "$REF_NAME" -o "$W/image.clip" --quiet ${BUILD_ARGS:-}; build_ms=$(ms "$t0" "$(now)")
echo "clip-build $REF_NAME: $build_ms ms, index $(stat -c %s "$W/image.clip") bytes, source $("$build" inspect --json "$W/image.clip" | jq -r .source)"

# Bytes the registry process has read from its disk so far (its blob files; the page cache
# is dropped before every run, so a cold run's requests read from the disk).
registry_disk_reads() { awk '/^read_bytes/ { print $2 }' "/proc/$(cat "$B/registry/registry.pid")/io"; }

# One cold clip run (empty cache, page cache dropped) with extra clip-serve arguments; prints
# a line labelled $1 and sets R_TOTAL, R_MOUNT, R_IMPORT, R_FETCHED, R_INFLATED, R_REQUESTS,
# R_DISK (bytes the registry read from its disk meanwhile).
clip_run() {
    local label=$1; shift
    [ "${KEEP_CACHE:-0}" = 1 ] || rm -rf "$W/cache"
    rm -rf "$O" "$W/stats.json"; mkdir -p "$W/cache" "$O/upper" "$O/work" "$O/merged"
    drop
    local disk0; disk0=$(registry_disk_reads)
    t0=$(now)
    NO_COLOR=1 "$serve" "${INDEX:-$W/image.clip}" "$M" --cache-dir "$W/cache" --stats-file "$W/stats.json" "$@" 2>"$W/serve.log" &
    pid=$!
    until mountpoint -q "$M"; do
        kill -0 "$pid" 2>/dev/null || { cat "$W/serve.log" >&2; die "clip-serve exited"; }
        sleep 0.001
    done
    t1=$(now)
    mount -t overlay overlay -o "lowerdir=$M,upperdir=$O/upper,workdir=$O/work,redirect_dir=off,metacopy=off,index=off" "$O/merged"
    t2=$(now)
    "${RUN_ENV[@]}" chroot "$O/merged" "${CMD[@]}"
    t3=$(now)
    stop_serve
    R_TOTAL=$(ms "$t0" "$t3") R_MOUNT=$(ms "$t0" "$t1") R_IMPORT=$(ms "$t2" "$t3")
    R_FETCHED=$(jq .serve.fetched "$W/stats.json") R_INFLATED=$(jq .serve.inflated "$W/stats.json")
    R_REQUESTS=$(jq .serve.requests "$W/stats.json")
    R_DISK=$(($(registry_disk_reads) - disk0))
    echo "$label: registry read $((R_DISK >> 10)) KiB from its disk; total $R_TOTAL ms (mounted after $R_MOUNT ms, overlay $(ms "$t1" "$t2") ms, import $R_IMPORT ms); $(jq -c .serve "$W/stats.json")"
}

echo "== clip: clip-serve start -> chroot MERGED ${CMD[*]} exits (cold: empty cache, page cache dropped)"
tot=() mnt_ms=() imp=() fetched=() inflated=() requests=() disk=()
for i in $(seq "$RUNS"); do
    clip_run "run $i"
    tot+=("$R_TOTAL"); mnt_ms+=("$R_MOUNT"); imp+=("$R_IMPORT"); fetched+=("$R_FETCHED"); inflated+=("$R_INFLATED"); requests+=("$R_REQUESTS")
    disk+=("$(awk -v d="$R_DISK" -v r="$R_REQUESTS" 'BEGIN { printf "%.0f", d / r / 1024 }')")
done
clip_ms=$(median "${tot[@]}") clip_fetched=$(median "${fetched[@]}") clip_requests=$(median "${requests[@]}")
# The last cold run learnt its profile in the cache directory (profiles/): evict the cached
# pieces, keep that, and start again without any flag.
find "$W/cache" -mindepth 1 -maxdepth 1 -name '??' -exec rm -rf {} +
KEEP_CACHE=1 clip_run "start after eviction, with the profile learnt by the last run"
learnt_ms=$R_TOTAL learnt_requests=$R_REQUESTS

echo "== a fleet sharing a Redis: node A runs the image cold; nodes B and C (empty caches) start it after"
REDIS_PORT=${REDIS_PORT:-6390}
"$shared/start-redis.sh" start >/dev/null
redis_url=redis://127.0.0.1:$REDIS_PORT/0
redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
clip_run "node A: cold, fills Redis and shares the profile it learns" --redis "$redis_url"
clip_run "node B: Redis holds A's pieces and profile" --redis "$redis_url"
fleet_ms=$R_TOTAL fleet_requests=$R_REQUESTS
redis-cli -p "$REDIS_PORT" --scan | grep -v '^profile:' | xargs -r redis-cli -p "$REDIS_PORT" DEL >/dev/null
clip_run "node C: Redis holds only the profile (pieces evicted)" --redis "$redis_url"
fleet_profile_ms=$R_TOTAL fleet_profile_requests=$R_REQUESTS
"$shared/start-redis.sh" stop >/dev/null

echo "== clip with an access profile: one cold run records it (--record-profile), then cold runs prefetch it (--prefetch-profile)"
clip_run "recording run" --record-profile "$W/profile"
echo "profile: $(($(wc -l <"$W/profile") - 3)) intervals"
ptot=() pfetched=() prequests=()
for i in $(seq "$RUNS"); do
    clip_run "profile run $i" --prefetch-profile "$W/profile" ${PREFETCH_THREADS:+--prefetch-threads "$PREFETCH_THREADS"}
    ptot+=("$R_TOTAL"); pfetched+=("$R_FETCHED"); prequests+=("$R_REQUESTS")
done
prof_ms=$(median "${ptot[@]}") prof_fetched=$(median "${pfetched[@]}") prof_requests=$(median "${prequests[@]}")
KEEP_CACHE=1 clip_run "restart over the last run's disk cache" --prefetch-profile "$W/profile"
warm_ms=$R_TOTAL warm_requests=$R_REQUESTS

echo "== fresh nodes: an index trained once (clip-build $REF_NAME -o trained.clip -- ${CMD[*]}); empty cache, no flags"
t0=$(now); "$build" "$REF_NAME" -o "$W/startup.clip" --quiet ${BUILD_ARGS:-} -- "${CMD[@]}"; train_ms=$(ms "$t0" "$(now)")
stot=()
for i in $(seq "$RUNS"); do
    INDEX=$W/startup.clip clip_run "fresh node $i"
    stot+=("$R_TOTAL")
done
startup_ms=$(median "${stot[@]}") startup_requests=$R_REQUESTS

echo "== full pull: skopeo copy + umoci raw unpack + chroot ROOTFS ${CMD[*]} (page cache dropped first)"
pull=() cp_ms=() up_ms=() im_ms=() im_cold=()
for i in $(seq "$PULL_RUNS"); do
    rm -rf "$W/pull" "$W/rootfs"
    drop
    t0=$(now)
    skopeo copy -q --src-tls-verify=false "docker://$REF_NAME" "oci:$W/pull:latest"
    t1=$(now)
    umoci raw unpack --image "$W/pull:latest" "$W/rootfs" 2>/dev/null
    t2=$(now)
    "${RUN_ENV[@]}" chroot "$W/rootfs" "${CMD[@]}"
    t3=$(now)
    pull+=("$(ms "$t0" "$t3")"); cp_ms+=("$(ms "$t0" "$t1")"); up_ms+=("$(ms "$t1" "$t2")"); im_ms+=("$(ms "$t2" "$t3")")
    drop; t4=$(now); "${RUN_ENV[@]}" chroot "$W/rootfs" "${CMD[@]}"; im_cold+=("$(ms "$t4" "$(now)")")
    echo "run $i: total $(ms "$t0" "$t3") ms (skopeo copy $(ms "$t0" "$t1"), umoci raw unpack $(ms "$t1" "$t2"), import $(ms "$t2" "$t3")); import on the unpacked rootfs with caches dropped: ${im_cold[-1]} ms"
done
pull_ms=$(median "${pull[@]}")
rm -rf "$W/pull" "$W/rootfs"

speedup=$(awk -v a="$pull_ms" -v b="$clip_ms" 'BEGIN { printf "%.1f", a / b }')
share=$(awk -v f="$clip_fetched" -v s="$image_bytes" 'BEGIN { printf "%.3f", f / s }')
row "time to first result: start -> import numpy exits (ms)" "$clip_ms" "$pull_ms (full pull)" "${speedup}x faster" ">= 20x faster" "$(judge "$speedup" ">=" 20)"
row "  clip: start -> mounted / import through overlay (ms)" "$(median "${mnt_ms[@]}") / $(median "${imp[@]}")" "-" "-" "info" "-"
row "  full pull: skopeo copy / umoci raw unpack / import (ms)" "-" "$(median "${cp_ms[@]}") / $(median "${up_ms[@]}") / $(median "${im_ms[@]}")" "-" "info" "-"
row "  import numpy, caches dropped: clip (incl. start) vs unpacked rootfs (ms)" "$clip_ms" "$(median "${im_cold[@]}")" "$(awk -v a="$clip_ms" -v b="$(median "${im_cold[@]}")" 'BEGIN { printf "%.1fx time", a / b }')" "info" "-"
pspeedup=$(awk -v a="$pull_ms" -v b="$prof_ms" 'BEGIN { printf "%.1f", a / b }')
pshare=$(awk -v f="$prof_fetched" -v s="$image_bytes" 'BEGIN { printf "%.3f", f / s }')
row "  same, with a recorded access profile prefetched (ms)" "$prof_ms" "$pull_ms (full pull)" "${pspeedup}x faster" ">= 20x faster" "$(judge "$pspeedup" ">=" 20)"
sspeedup=$(awk -v a="$pull_ms" -v b="$startup_ms" 'BEGIN { printf "%.1f", a / b }')
row "  same, fresh nodes, the index trained once with that command (ms)" "$startup_ms" "$pull_ms (full pull)" "${sspeedup}x faster" ">= 20x faster" "$(judge "$sspeedup" ">=" 20)"
row "bytes fetched from the registry vs image compressed size" "$clip_fetched" "$image_bytes" "$(awk -v s="$share" 'BEGIN { printf "%.1f%%", s * 100 }')" "<= 15%" "$(judge "$share" "<=" 0.15)"
row "  same, with the access profile prefetched" "$prof_fetched" "$image_bytes" "$(awk -v s="$pshare" 'BEGIN { printf "%.1f%%", s * 100 }')" "<= 15%" "$(judge "$pshare" "<=" 0.15)"
row "  clip: registry blob requests, without / with profile" "$clip_requests / $prof_requests" "-" "-" "info" "-"
row "  start after the cache was evicted, replaying the learnt profile (ms / requests)" "$learnt_ms / $learnt_requests" "-" "-" "info" "-"
row "  restart over a profile run's disk cache, with the profile (ms / requests)" "$warm_ms / $warm_requests" "-" "-" "info" "-"
row "  new node sharing a Redis with one that ran the image: pieces and profile there (ms / requests)" "$fleet_ms / $fleet_requests" "-" "-" "info" "-"
row "  same, only the profile left in Redis (ms / requests)" "$fleet_profile_ms / $fleet_profile_requests" "-" "-" "info" "-"
row "  clip: bytes inflated" "$(median "${inflated[@]}")" "-" "-" "info" "-"
row "  registry: KiB read from its disk per blob request (cold clip runs)" "$(median "${disk[@]}")" "-" "-" "info" "-"
row "index build from the registry, once (ms)" "$build_ms" "-" "-" "info" "-"
row "  same, trained with the command (clip-build ... -- CMD) (ms)" "$train_ms" "-" "-" "info" "-"

echo
echo "== results (clip: median of $RUNS runs; full pull: median of $PULL_RUNS)"
{
    printf 'measure\tclip\tanchor\tratio\ttarget\tmet?\n'
    printf '%s\n' "${ROWS[@]}"
} | column -t -s $'\t'
