#!/usr/bin/env bash
# clip-serve benchmarks of issue 3 ("Benchmarks") on the shared corpus (../shared/bench),
# each printed side by side with its anchor measured in the same run:
#   1. cold read of a small file near the end of the largest layer: time and bytes inflated
#      (clip-serve's stats file) vs `gzip -dc BLOB | head -c END` (inflating the layer from
#      its start, the seed system's fallback);
#   2. cold sequential read of usr/lib/gcc/x86_64-linux-gnu/12/cc1plus (35 MB) through a fresh
#      mount, empty --cache-dir, page cache dropped, vs `clip-build cat` of it (the same zlib
#      inflate resumed at the same checkpoint plus the same sha256 checks, no FUSE and no
#      cache writes; also cold) and vs ratarmount's cold `cat`;
#   3. warm sequential read of cc1plus (median of 5 reads from the page cache) vs the same
#      file of a reference extraction (`umoci raw unpack`; median of 5 likewise),
#      `find MNT | wc -l` and `ls -lR MNT` vs the extraction and vs
#      ratarmount (union mount of the same layers), cold and warm;
#   4. index open time, start-to-mounted time and daemon RSS for tiny and debian-python.
# Then one table: measure | clip | anchor | ratio | target | met?
#
# Needs root, /dev/fuse, fuse3, umoci, gzip, python3, jq, the corpus built by
# ../shared/bench/make-images.sh (OCI layout $BENCH_DIR/oci with tags tiny and debian-python),
# and ratarmount in $BENCH_DIR/venv (installed here the way ../shared/bench/baseline.sh does
# it if missing; needs PyPI). Drops the machine's page cache many times.
#
# Usage: tools/bench-serve.sh
# Env: BENCH_DIR (/tmp/bench), WORK ($BENCH_DIR/clip-bench-serve: scratch, removed at the end
# unless KEEP_SCRATCH=1), RUNS (3: cold/warm measures are the median of RUNS runs),
# NO_BUILD=1 (use target/release as it is).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
shared=$(cd "$repo/../shared/bench" 2>/dev/null && pwd) || { echo "bench-serve: ../shared/bench is missing" >&2; exit 1; }
B=${BENCH_DIR:-/tmp/bench}
W=${WORK:-$B/clip-bench-serve}
RUNS=${RUNS:-3}
BIG=usr/lib/gcc/x86_64-linux-gnu/12/cc1plus

die() { echo "bench-serve: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (FUSE mounts, drop_caches)"
[ -e /dev/fuse ] || die "/dev/fuse is missing (modprobe fuse)"
for t in fusermount3 umoci gzip python3 jq mountpoint; do
    command -v "$t" >/dev/null || die "$t is missing: apt-get install fuse3 umoci gzip python3 jq util-linux"
done
[ -f "$B/oci/index.json" ] || die "no corpus at $B/oci: run ../shared/bench/make-images.sh first"
for tag in tiny debian-python; do
    jq -e --arg t "$tag" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t)' \
        "$B/oci/index.json" >/dev/null || die "tag $tag missing in $B/oci: run ../shared/bench/make-images.sh"
done
V=$B/venv/bin
export PATH=$V:$PATH   # rmount.sh runs ratarmount from PATH
if [ ! -x "$V/ratarmount" ]; then
    echo "bench-serve: installing ratarmount into $B/venv (as ../shared/bench/baseline.sh does)"
    python3 -m venv "$B/venv" || die "python3 -m venv failed: apt-get install python3-venv"
    "$V/pip" install -q rapidgzip ratarmount indexed_gzip || die "pip install ratarmount failed (needs PyPI)"
fi

if [ "${NO_BUILD:-0}" != 1 ]; then cargo build --release --bins -q; fi
serve=$repo/target/release/clip-serve
build=$repo/target/release/clip-build
[ -x "$serve" ] && [ -x "$build" ] || die "no release binaries: cargo build --release --bins"

mkdir -p "$W"
M=$W/mnt RM=$W/rmnt RPID=$W/ratarmount.pid
mkdir -p "$M" "$RM"
pid=
stop_serve() {
    if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; fi
    if mountpoint -q "$M"; then fusermount3 -u -z "$M" || true; fi
}
cleanup() {
    stop_serve
    "$shared/rmount.sh" umount "$RM" "$RPID" || true
    if [ "${KEEP_SCRATCH:-0}" != 1 ]; then rm -rf "$W"; else echo "scratch kept in $W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

. "$repo/tools/bench-lib.sh"
# start_serve INDEX [clip-serve args]: fresh empty cache dir, sets $pid, $mount_ms
start_serve() {
    local index=$1; shift
    rm -rf "$W/cache" "$W/stats.json"; mkdir -p "$W/cache"; sync
    local t0; t0=$(now)
    NO_COLOR=1 "$serve" "$index" "$M" --cache-dir "$W/cache" --stats-file "$W/stats.json" "$@" 2>"$W/serve.log" &
    pid=$!
    for _ in $(seq 5000); do
        if mountpoint -q "$M"; then mount_ms=$(ms "$t0" "$(now)"); return; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.001
    done
    cat "$W/serve.log" >&2; die "clip-serve did not mount $index"
}
stat_of() { jq -r ".serve.$1" "$W/stats.json"; }   # after stop_serve (written at exit)
# logged_ms MESSAGE: the ms= field of clip-serve's log line MESSAGE
logged_ms() { sed 's/\x1b\[[0-9;]*m//g' "$W/serve.log" | sed -n "s/.*$1.*ms=\"\{0,1\}\([0-9.]*\).*/\1/p" | head -1; }
rss_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
# time_ms CMD...: wall time of CMD in ms (output discarded)
time_ms() { local t0; t0=$(now); "$@" >/dev/null; ms "$t0" "$(now)"; }
rm_mount() { "$shared/rmount.sh" mount "$RM" "$RPID" -P 2 --index-folders "$W/rm-index" "${LAYERS[@]}"; }
rm_umount() { "$shared/rmount.sh" umount "$RM" "$RPID"; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3g", (b > 0) ? a / b : 0 }'; }
mbs() { awk -v b="$1" -v t="$2" 'BEGIN { printf "%.0f MB/s", b / (t / 1e3) / 1e6 }'; }

echo "== indexing (clip-build, warm page cache)"
t0=$(now); "$build" "$B/oci:debian-python" -o "$W/dp.clip" --quiet; dp_build=$(ms "$t0" "$(now)")
t0=$(now); "$build" "$B/oci:tiny" -o "$W/tiny.clip" --quiet; tiny_build=$(ms "$t0" "$(now)")
echo "debian-python: ${dp_build} ms ($(stat -c %s "$W/dp.clip") bytes); tiny: ${tiny_build} ms ($(stat -c %s "$W/tiny.clip") bytes)"

# Facts from the index (tools/clipread.py, the independent reader): the largest layer, the
# small file nearest the end of its tar, cc1plus's location and the checkpoints around it.
eval "$(python3 - "$W/dp.clip" "$B/oci" "$BIG" <<'EOF'
import sys
sys.path.insert(0, "tools")
import shlex
import clipread as c
ix = c.Index(sys.argv[1], verify_checksum=False)
layers = [ix.layer(i) for i in range(ix.n_layers)]
li = max(range(ix.n_layers), key=lambda i: layers[i]["uncompressed_size"])
L = layers[li]
cps = [ix.checkpoint(L, k) for k in range(L["n_checkpoints"])]
small = None
for i in range(ix.n_entries):
    e = ix.entry(i)
    if e.kind == c.K_FILE and e.layer == li and 4096 <= e.size <= 65536 and (small is None or e.data_offset > small.data_offset):
        small = e
big = ix.entry(ix.inode_of(ix.resolve(sys.argv[3].encode())))
def before(off): return max((cp for cp in cps if cp["out_offset"] <= off), key=lambda cp: cp["out_offset"])
blob = sys.argv[2] + "/blobs/sha256/" + c.s(L["digest"]).split(":", 1)[1]
print(f"LI={li + 1}; BLOB={blob}; LSIZE={L['uncompressed_size']}; LCSIZE={L['compressed_size']}")
print(f"SMALL={shlex.quote(c.s(ix.path_of(small.index)))}; SMALL_SIZE={small.size}; SMALL_OFF={small.data_offset}; SMALL_CP={before(small.data_offset)['out_offset']}")
print(f"BIG_SIZE={big.size}; BIG_OFF={big.data_offset}; BIG_LAYER={big.layer + 1}; BIG_CP={before(big.data_offset)['out_offset']}")
EOF
)"
SMALL=${SMALL#/}
mapfile -t LAYERS < <(jq -r '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == "debian-python") | .digest' "$B/oci/index.json" |
    sed 's/^sha256://' | xargs -I{} jq -r '.layers[].digest' "$B/oci/blobs/sha256/{}" | sed "s#^sha256:#$B/oci/blobs/sha256/#")
[ "$BIG_LAYER" = "$LI" ] || die "$BIG is not in the largest layer"
echo "largest layer: $LI ($LCSIZE -> $LSIZE bytes) $BLOB"
echo "small file: /$SMALL ($SMALL_SIZE bytes at $SMALL_OFF, $((SMALL_OFF - SMALL_CP)) bytes after its checkpoint)"
echo "large file: /$BIG ($BIG_SIZE bytes at $BIG_OFF)"

echo "== reference extraction (umoci raw unpack, once)"
REF=$W/ref
if [ ! -x "$REF/usr/bin/python3" ]; then
    rm -rf "$REF"
    t0=$(now); umoci raw unpack --image "$B/oci:debian-python" "$REF" 2>/dev/null; echo "unpacked in $(ms "$t0" "$(now)") ms"
fi
echo "== ratarmount index of the ${#LAYERS[@]} layers (union mount, -P 2)"
rm_umount; mkdir -p "$W/rm-index"
t0=$(now); rm_mount; echo "index + mount: $(ms "$t0" "$(now)") ms"; rm_umount

# ---------------------------------------------------------------- 1. small file deep in the layer
echo "== 1. cold read of /$SMALL"
a=() b=() inf=()
for _ in $(seq "$RUNS"); do
    start_serve "$W/dp.clip"; drop
    a+=("$(time_ms cat "$M/$SMALL")")
    stop_serve; inf+=("$(stat_of inflated)")
    drop
    b+=("$(time_ms bash -c "{ gzip -dc '$BLOB' || true; } | head -c $((SMALL_OFF + SMALL_SIZE))")")
done
echo "clip cat: ${a[*]} ms (inflated ${inf[*]} bytes); gzip -dc | head -c $((SMALL_OFF + SMALL_SIZE)): ${b[*]} ms"
t_clip=$(median "${a[@]}") t_gz=$(median "${b[@]}") inflated=$(median "${inf[@]}")
row "small file cold: time (ms)" "$t_clip" "$t_gz (gzip -dc|head)" "$(ratio "$t_clip" "$t_gz")" "info" "-"
row "small file cold: bytes inflated" "$inflated" "$((SMALL_OFF + SMALL_SIZE))" "$(ratio "$inflated" "$((SMALL_OFF + SMALL_SIZE))")" "<= 2097152 B" "$(judge "$inflated" "<=" 2097152)"

# ---------------------------------------------------------------- 2. cold sequential read
echo "== 2. cold sequential read of /$BIG"
a=() c=() r=() inf=() w=() wd=()
for _ in $(seq "$RUNS"); do
    start_serve "$W/dp.clip"; drop
    a+=("$(time_ms cat "$M/$BIG")")
    # page cache of the mount: the median of 5 reads, as for the local file below
    ws=(); for _ in $(seq 5); do ws+=("$(time_ms cat "$M/$BIG")"); done; w+=("$(median "${ws[@]}")")
    stop_serve; inf+=("$(stat_of inflated)")
    drop
    c+=("$(time_ms "$build" cat "$W/dp.clip" "/$BIG")")
    rm_mount; drop
    r+=("$(time_ms cat "$RM/$BIG")")
    rm_umount
done
echo "clip cold cat: ${a[*]} ms (inflated ${inf[*]}); clip-build cat (cold): ${c[*]} ms; ratarmount cold cat: ${r[*]} ms"
t_clip=$(median "${a[@]}") t_cat=$(median "${c[@]}") t_rm=$(median "${r[@]}")
# speeds: ratio = clip speed / anchor speed = anchor time / clip time
row "cc1plus cold cat vs clip-build cat (ms)" "$t_clip ($(mbs "$BIG_SIZE" "$t_clip"))" "$t_cat ($(mbs "$BIG_SIZE" "$t_cat"))" "$(ratio "$t_cat" "$t_clip")" ">= 0.70x speed" "$(judge "$(ratio "$t_cat" "$t_clip")" ">=" 0.7)"
row "cc1plus cold cat vs ratarmount (ms)" "$t_clip" "$t_rm ($(mbs "$BIG_SIZE" "$t_rm"))" "$(ratio "$t_rm" "$t_clip")" ">= 1.00x speed" "$(judge "$(ratio "$t_rm" "$t_clip")" ">=" 1.0)"
# informational: whole-layer inflate speed of gzip and igzip, scaled to cc1plus's size
gz=$(time_ms gzip -dc "$BLOB"); gz_scaled=$(awk -v t="$gz" -v s="$BIG_SIZE" -v l="$LSIZE" 'BEGIN { printf "%.1f", t * s / l }')
row "  info: gzip -dc layer, scaled to 35 MB" "$t_clip" "$gz_scaled ($(mbs "$LSIZE" "$gz"))" "$(ratio "$gz_scaled" "$t_clip")" "info" "-"
if command -v igzip >/dev/null; then
    ig=$(time_ms igzip -dc "$BLOB"); ig_scaled=$(awk -v t="$ig" -v s="$BIG_SIZE" -v l="$LSIZE" 'BEGIN { printf "%.1f", t * s / l }')
    row "  info: igzip -dc layer, scaled to 35 MB" "$t_clip" "$ig_scaled ($(mbs "$LSIZE" "$ig"))" "$(ratio "$ig_scaled" "$t_clip")" "info" "-"
fi

# ---------------------------------------------------------------- 3. warm reads, tree walks
echo "== 3. warm sequential read, find, ls -lR"
cat "$REF/$BIG" >/dev/null
l=() wt=()
for _ in $(seq 5); do l+=("$(time_ms cat "$REF/$BIG")"); done
t_local=$(median "${l[@]}") t_warm=$(median "${w[@]}")
row "cc1plus warm cat (page cache) vs local disk" "$t_warm ($(mbs "$BIG_SIZE" "$t_warm"))" "$t_local ($(mbs "$BIG_SIZE" "$t_local"))" "$(ratio "$t_local" "$t_warm")" ">= 0.50x speed" "$(judge "$(ratio "$t_local" "$t_warm")" ">=" 0.5)"
# disk-cache tier through a fresh mount (no page cache of the FUSE file; cache files in memory)
start_serve "$W/dp.clip"; cat "$M/$BIG" >/dev/null; kill -TERM "$pid"; wait "$pid" || true; pid=
NO_COLOR=1 "$serve" "$W/dp.clip" "$M" --cache-dir "$W/cache" 2>"$W/serve.log" & pid=$!
for _ in $(seq 5000); do mountpoint -q "$M" && break; sleep 0.001; done
wt+=("$(time_ms cat "$M/$BIG")")
stop_serve
# Not the issue's warm read (that is the page cache, above): every byte from the disk cache
# is checked against its sha256 before it is served, which alone takes what hashing the
# file takes on one core (OpenSSL uses the CPU's SHA instructions, as clip's sha2 does;
# coreutils' sha256sum does not), printed beside it.
if command -v openssl >/dev/null; then sha=(openssl dgst -sha256) sha_name=openssl; else sha=(sha256sum) sha_name=sha256sum; fi
t_sha=$(time_ms "${sha[@]}" "$REF/$BIG")
row "  info: cc1plus from clip's disk cache, fresh mount" "$(median "${wt[@]}") ($(mbs "$BIG_SIZE" "$(median "${wt[@]}")"))" "$t_local" "$(ratio "$t_local" "$(median "${wt[@]}")")" "info" "-"
row "  info: sha256 of cc1plus ($sha_name, page cache)" "$(median "${wt[@]}")" "$t_sha" "$(ratio "$t_sha" "$(median "${wt[@]}")")" "info" "-"

# find: names only; stat: lstat of every entry (find -printf), no xattrs; ls: ls -lR, which
# also asks every entry for security.selinux and the POSIX ACLs (getxattr)
walk() {
    case $1 in
        find) find "$2" | wc -l ;;
        stat) find "$2" -printf '%m %s %u %g %T@\n' | wc -l ;;
        ls) ls -lR "$2" >/dev/null ;;
    esac
}
for what in find stat ls; do
    fc=() fw=() rc=() rw=() mc=() mw=()
    for _ in $(seq "$RUNS"); do
        start_serve "$W/dp.clip"; drop
        fc+=("$(time_ms walk "$what" "$M")"); fw+=("$(time_ms walk "$what" "$M")")
        stop_serve
        drop
        rc+=("$(time_ms walk "$what" "$REF")"); rw+=("$(time_ms walk "$what" "$REF")")
        rm_mount; drop
        mc+=("$(time_ms walk "$what" "$RM")"); mw+=("$(time_ms walk "$what" "$RM")")
        rm_umount
    done
    case $what in find) label="find MNT | wc -l" ;; stat) label="find MNT -printf (lstat all)" ;; ls) label="ls -lR MNT" ;; esac
    for st in cold warm; do
        if [ $st = cold ]; then c1=$(median "${fc[@]}"); r1=$(median "${rc[@]}"); m1=$(median "${mc[@]}")
        else c1=$(median "${fw[@]}"); r1=$(median "${rw[@]}"); m1=$(median "${mw[@]}"); fi
        row "$label $st vs extraction (ms)" "$c1" "$r1" "$(ratio "$c1" "$r1")" "<= 2.00x time" "$(judge "$(ratio "$c1" "$r1")" "<=" 2)"
        row "$label $st vs ratarmount (ms)" "$c1" "$m1" "$(ratio "$c1" "$m1")" "info" "-"
    done
done
start_serve "$W/dp.clip"; n_clip=$(find "$M" | wc -l); stop_serve
rm_mount; n_rm=$(find "$RM" | wc -l); rm_umount
echo "paths: clip $n_clip, extraction $(find "$REF" | wc -l), ratarmount union $n_rm"

# ---------------------------------------------------------------- 4. open time and RSS
echo "== 4. index open, mount time, daemon RSS"
for img in tiny dp; do
    idx=$W/$img.clip
    entries=$("$build" inspect --json "$idx" | jq .entries)
    # cold: the index is not in the page cache, the daemon's binary is (a node that runs
    # clip-serve for one image after another). all-cold: the binary is read from disk too,
    # and its page-in (exec reads ~8 MiB around each first code fault) shares the disk.
    for st in warm cold all-cold; do
        o=() v=() mt=()
        for _ in $(seq "$RUNS"); do
            cat "$idx" >/dev/null
            case $st in cold) drop; cat "$serve" >/dev/null ;; all-cold) drop ;; esac
            start_serve "$idx"
            o+=("$(logged_ms 'opened index')")
            v+=("$(logged_ms 'index verified')")
            mt+=("$mount_ms")
            stop_serve
        done
        if [ $st = all-cold ]; then
            row "$img ($entries entries) open index, all-cold (ms)" "$(median "${o[@]}")" "-" "-" "info" "-"
        else
            row "$img ($entries entries) open index, $st (ms)" "$(median "${o[@]}")" "-" "-" "< 10 ms" "$(judge "$(median "${o[@]}")" "<=" 10)"
        fi
        row "  $img verify + start to mounted, $st (ms)" "$(median "${v[@]}") / $(median "${mt[@]}")" "-" "-" "info" "-"
    done
    start_serve "$idx"; sleep 0.3
    r0=$(rss_kb "$pid" VmRSS) a0=$(rss_kb "$pid" RssAnon)
    find "$M" >/dev/null; ls -lR "$M" >/dev/null
    r1=$(rss_kb "$pid" VmRSS) a1=$(rss_kb "$pid" RssAnon)
    stop_serve
    eval "RSS_$img='$r0 $a0 $r1 $a1'"
    row "  $img VmRSS / RssAnon after mount (KiB)" "$r0 / $a0" "-" "-" "info" "-"
    row "  $img VmRSS / RssAnon after find+ls -lR (KiB)" "$r1 / $a1" "-" "-" "info" "-"
done
read -r _ _ _ tiny_anon <<<"$RSS_tiny"; read -r _ _ _ dp_anon <<<"$RSS_dp"
read -r _ _ dp_rss _ <<<"$RSS_dp"; read -r _ _ tiny_rss _ <<<"$RSS_tiny"
row "RssAnon after walk: large / small image" "$dp_anon KiB" "$tiny_anon KiB" "$(ratio "$dp_anon" "$tiny_anon")" "<= 2.00x (42x files)" "$(judge "$(ratio "$dp_anon" "$tiny_anon")" "<=" 2)"
row "  VmRSS after walk: large / small (incl. mapped index)" "$dp_rss KiB" "$tiny_rss KiB" "$(ratio "$dp_rss" "$tiny_rss")" "info" "-"

echo
echo "== results (median of $RUNS runs; ratio: speed ratio clip/anchor for reads, time ratio for walks)"
{
    printf 'measure\tclip\tanchor\tratio\ttarget\tmet?\n'
    printf '%s\n' "${ROWS[@]}"
} | column -t -s $'\t'
