#!/usr/bin/env python3
"""clipread: an independent reader of clip index files, format version 2.

Written from format-spec/README.md with nothing but the Python 3.11 standard library
(struct, mmap, zlib, hashlib, json, argparse). It exists to prove that the spec is
complete: its output must equal `clip-build`'s byte for byte.

    clipread.py inspect [--json] INDEX
    clipread.py ls [-R] INDEX [PATH]
    clipread.py stat INDEX PATH...
    clipread.py cat INDEX PATH... [--layout DIR]
    clipread.py checkpoints INDEX [--layout DIR]   resume at every checkpoint and compare
    clipread.py xxh3 FILE...                        XXH3-64 (seed 0) of each file

Exit status 0 on success, 1 on any error (message on stderr, prefixed "clipread: error:").
"""

import argparse
import hashlib
import json
import mmap
import os
import struct
import sys
import zlib

# ---------------------------------------------------------------------------------------
# XXH3-64, seed 0, default secret (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md)
# ---------------------------------------------------------------------------------------

M64 = 0xFFFFFFFFFFFFFFFF
P32_1, P32_2, P32_3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
P64_1, P64_2, P64_3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
P64_4, P64_5 = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5
PRIME_MX1, PRIME_MX2 = 0x165667919E3779F9, 0x9FB21C651E98DF25

SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)
assert len(SECRET) == 192
SEC64 = [struct.unpack_from("<Q", SECRET, i)[0] for i in range(len(SECRET) - 7)]


def _u32(b, i):
    return struct.unpack_from("<I", b, i)[0]


def _u64(b, i):
    return struct.unpack_from("<Q", b, i)[0]


def _xxh64_avalanche(h):
    h ^= h >> 33
    h = (h * P64_2) & M64
    h ^= h >> 29
    h = (h * P64_3) & M64
    return h ^ (h >> 32)


def _avalanche(h):
    h ^= h >> 37
    h = (h * PRIME_MX1) & M64
    return h ^ (h >> 32)


def _rrmxmx(h, length):
    h ^= ((h << 49 | h >> 15) & M64) ^ ((h << 24 | h >> 40) & M64)
    h = (h * PRIME_MX2) & M64
    h ^= (h >> 35) + length
    h = (h * PRIME_MX2) & M64
    return h ^ (h >> 28)


def _mul128_fold64(a, b):
    p = a * b
    return (p & M64) ^ (p >> 64)


def _mix16(data, i, s):
    lo = _u64(data, i) ^ SEC64[s]
    hi = _u64(data, i + 8) ^ SEC64[s + 8]
    return _mul128_fold64(lo, hi)


def xxh3_64(data):
    """XXH3-64 of `data` with seed 0 and the default secret."""
    data = bytes(data)
    n = len(data)
    if n == 0:
        return _xxh64_avalanche(SEC64[56] ^ SEC64[64])
    if n <= 3:
        combo = (data[0] << 16) | (data[n >> 1] << 24) | data[n - 1] | (n << 8)
        return _xxh64_avalanche(combo ^ (_u32(SECRET, 0) ^ _u32(SECRET, 4)))
    if n <= 8:
        in64 = _u32(data, n - 4) + (_u32(data, 0) << 32)
        return _rrmxmx(in64 ^ (SEC64[8] ^ SEC64[16]), n)
    if n <= 16:
        lo = _u64(data, 0) ^ (SEC64[24] ^ SEC64[32])
        hi = _u64(data, n - 8) ^ (SEC64[40] ^ SEC64[48])
        bswap = int.from_bytes(lo.to_bytes(8, "little"), "big")
        return _avalanche((n + bswap + hi + _mul128_fold64(lo, hi)) & M64)
    if n <= 128:
        acc = (n * P64_1) & M64
        if n > 32:
            if n > 64:
                if n > 96:
                    acc += _mix16(data, 48, 96) + _mix16(data, n - 64, 112)
                acc += _mix16(data, 32, 64) + _mix16(data, n - 48, 80)
            acc += _mix16(data, 16, 32) + _mix16(data, n - 32, 48)
        acc += _mix16(data, 0, 0) + _mix16(data, n - 16, 16)
        return _avalanche(acc & M64)
    if n <= 240:
        acc = (n * P64_1) & M64
        for i in range(8):
            acc += _mix16(data, 16 * i, 16 * i)
        acc = _avalanche(acc & M64)
        for i in range(8, n // 16):
            acc += _mix16(data, 16 * i, 16 * (i - 8) + 3)
        acc += _mix16(data, n - 16, 136 - 17)
        return _avalanche(acc & M64)
    return _xxh3_long(data)


def _xxh3_long(data):
    n = len(data)
    acc = [P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1]
    stripes_per_block = (192 - 64) // 8  # 16
    block_len = 64 * stripes_per_block  # 1024
    nb_blocks = (n - 1) // block_len
    unpack8 = struct.Struct("<8Q").unpack_from
    keys = [[SEC64[8 * s + 8 * j] for j in range(8)] for s in range(stripes_per_block)]

    def accumulate(off, key):
        lanes = unpack8(data, off)
        for j in range(8):
            v = lanes[j]
            k = v ^ key[j]
            acc[j ^ 1] = (acc[j ^ 1] + v) & M64
            acc[j] = (acc[j] + (k & 0xFFFFFFFF) * (k >> 32)) & M64

    scramble_key = [SEC64[192 - 64 + 8 * j] for j in range(8)]
    for b in range(nb_blocks):
        base = b * block_len
        for s in range(stripes_per_block):
            accumulate(base + 64 * s, keys[s])
        for j in range(8):
            a = acc[j]
            a ^= a >> 47
            a ^= scramble_key[j]
            acc[j] = (a * P32_1) & M64
    base = nb_blocks * block_len
    for s in range(((n - 1) - base) // 64):
        accumulate(base + 64 * s, keys[s])
    accumulate(n - 64, [SEC64[192 - 64 - 7 + 8 * j] for j in range(8)])
    result = (n * P64_1) & M64
    for i in range(4):
        result += _mul128_fold64(acc[2 * i] ^ SEC64[11 + 16 * i], acc[2 * i + 1] ^ SEC64[11 + 16 * i + 8])
    return _avalanche(result & M64)


# ---------------------------------------------------------------------------------------
# The index file (format-spec/README.md, sections 2-5)
# ---------------------------------------------------------------------------------------


class ClipError(Exception):
    pass


MAGIC = b"CLIPIDX\0"
STARTUP_MAGIC = b"CLIPPRF\0"
HEADER = struct.Struct("<8sHHIQQQIIQ8s")
NONE = 0xFFFFFFFF
CHUNK_SIZE = 1 << 20
KINDS = ["file", "dir", "symlink", "hardlink", "char", "block", "fifo"]
K_FILE, K_DIR, K_SYMLINK, K_HARDLINK, K_CHAR, K_BLOCK, K_FIFO = range(7)

ROOT_SIZE = 88
VEC = struct.Struct("<iI")
# size, data_offset, mtime, name(2), link_target(2), sha256, 15 x u32, kind, reserved
ENTRY = struct.Struct("<QQqiIiI32s15IB3s")
LAYER = struct.Struct("<QQiIiIiIiIB7s")
CHECKPOINT = struct.Struct("<QQQQIIBB6s")
XATTR = struct.Struct("<iIiI")
assert (ENTRY.size, LAYER.size, CHECKPOINT.size, XATTR.size) == (136, 56, 48, 16)


class Entry:
    __slots__ = (
        "index", "size", "data_offset", "mtime", "name", "link_target", "sha256", "parent",
        "first_child", "child_count", "hardlink_to", "nlink", "mode", "uid", "gid",
        "mtime_nsec", "rdev_major", "rdev_minor", "layer", "first_chunk", "first_xattr",
        "xattr_count", "kind",
    )


class Index:
    """An opened index: header checked, payload checksummed, root located."""

    def __init__(self, path, verify_checksum=True):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self.file_size = size
        if size < 64:
            raise ClipError(f"index is truncated: the header needs 64 bytes but the file has {size}")
        (magic, major, minor, flags, poff, plen, pxxh3, n_entries, n_layers, wlen, reserved) = HEADER.unpack_from(self.data, 0)
        if magic != MAGIC:
            raise ClipError(f"not a clip index (magic is {magic!r}, expected b'CLIPIDX\\x00')")
        if major != 2:
            raise ClipError(f"index format version {major}.{minor} is not supported: this reader reads version 2.x")
        if flags != 0:
            raise ClipError(f"index uses unknown feature flags {flags:#x}")
        if poff != 64:
            raise ClipError(f"index header field payload_offset has invalid value {poff}")
        if reserved != bytes(8):
            raise ClipError("index header field reserved is not zero")
        if poff + plen > size:
            raise ClipError(f"index is truncated: the payload needs {poff + plen} bytes but the file has {size}")
        if plen > 0x7FFFFFFF:
            raise ClipError(f"index header field payload_len has invalid value {plen}")
        if plen < ROOT_SIZE or plen % 8 != 0:
            raise ClipError("payload is too small or misaligned for the root object")
        if poff + plen + wlen > size:
            raise ClipError(f"index is truncated: the window area needs {poff + plen + wlen} bytes but the file has {size}")
        self.version = (major, minor)
        self.plen = plen
        self.p = memoryview(self.data)[64 : 64 + plen]
        self.windows = memoryview(self.data)[64 + plen : 64 + plen + wlen]
        self.tail = memoryview(self.data)[64 + plen + wlen :]
        if verify_checksum:
            found = xxh3_64(self.p)
            if found != pxxh3:
                raise ClipError(f"index is corrupt: payload checksum {found:016x} does not match the header's {pxxh3:016x}")
        root = plen - ROOT_SIZE
        self.created = struct.unpack_from("<q", self.p, root)[0]
        self.reference = self.bytes_at(root + 8)
        self.source = self.bytes_at(root + 16)
        self.manifest_digest = self.bytes_at(root + 24)
        self.config_digest = self.bytes_at(root + 32)
        self.platform = self.bytes_at(root + 40)
        self.layers_at, self.n_layers = self.vec_at(root + 48, LAYER.size, 8)
        self.entries_at, self.n_entries = self.vec_at(root + 56, ENTRY.size, 8)
        self.xattrs_at, self.n_xattrs = self.vec_at(root + 64, XATTR.size, 4)
        self.chunks_at, self.n_chunks = self.vec_at(root + 72, 32, 1)
        self.chunk_size = struct.unpack_from("<I", self.p, root + 80)[0]
        if self.n_entries != n_entries:
            raise ClipError(f"index is corrupt: header says {n_entries} entries, table has {self.n_entries}")
        if self.n_layers != n_layers:
            raise ClipError(f"index is corrupt: header says {n_layers} layers, table has {self.n_layers}")
        if self.n_entries == 0:
            raise ClipError("index is corrupt: entry table is empty (no root)")
        if self.chunk_size != CHUNK_SIZE:
            raise ClipError(f"index is corrupt: chunk_size is {self.chunk_size}, version 2 uses {CHUNK_SIZE}")
        self._entries = {}

    def startup_profile(self):
        """The startup profile text (format 2.1, spec section 3.1), or None without one."""
        t = self.tail
        if len(t) < 8 or bytes(t[:8]) != STARTUP_MAGIC:
            return None
        if len(t) < 24:
            raise ClipError("index is corrupt: its startup profile area is damaged: its header is cut short")
        length, expected = struct.unpack_from("<QQ", t, 8)
        if length > 64 << 20:
            raise ClipError(f"index is corrupt: its startup profile area is damaged: its length {length} is over the 64 MiB limit")
        if 24 + length > len(t):
            raise ClipError("index is corrupt: its startup profile area is damaged: its text is cut short")
        text = bytes(t[24 : 24 + length])
        if xxh3_64(text) != expected:
            raise ClipError("index is corrupt: its startup profile area is damaged: checksum mismatch")
        return text

    # -- rkyv primitives ----------------------------------------------------------------

    def vec_at(self, pos, elem_size, align):
        """The (start, length) of the ArchivedVec whose 8-byte header is at payload `pos`."""
        rel, n = VEC.unpack_from(self.p, pos)
        if n == 0:
            return 0, 0
        start = pos + rel
        if start < 0 or start + n * elem_size > self.plen or start % align:
            raise ClipError(f"index is corrupt: vector at payload offset {pos} points outside the payload")
        return start, n

    def bytes_at(self, pos):
        start, n = self.vec_at(pos, 1, 1)
        return bytes(self.p[start : start + n])

    # -- tables ---------------------------------------------------------------------------

    def entry(self, i):
        e = self._entries.get(i)
        if e is not None:
            return e
        if not 0 <= i < self.n_entries:
            raise ClipError(f"index is corrupt: entry {i} is out of range")
        pos = self.entries_at + i * ENTRY.size
        f = ENTRY.unpack_from(self.p, pos)
        e = Entry()
        e.index = i
        e.size, e.data_offset, e.mtime = f[0], f[1], f[2]
        e.name = self.bytes_at(pos + 24)
        e.link_target = self.bytes_at(pos + 32)
        e.sha256 = f[7]
        (e.parent, e.first_child, e.child_count, e.hardlink_to, e.nlink, e.mode, e.uid, e.gid,
         e.mtime_nsec, e.rdev_major, e.rdev_minor, e.layer, e.first_chunk, e.first_xattr,
         e.xattr_count) = f[8:23]
        e.kind = f[23]
        if e.kind >= len(KINDS):
            raise ClipError(f"index is corrupt: entry {i} has unknown kind {e.kind}")
        self._entries[i] = e
        return e

    def layer(self, i):
        if not 0 <= i < self.n_layers:
            raise ClipError(f"index is corrupt: layer {i} is out of range")
        pos = self.layers_at + i * LAYER.size
        f = LAYER.unpack_from(self.p, pos)
        cps_at, n_cps = self.vec_at(pos + 40, CHECKPOINT.size, 8)
        return {
            "index": i,
            "compressed_size": f[0],
            "uncompressed_size": f[1],
            "digest": self.bytes_at(pos + 16),
            "diff_id": self.bytes_at(pos + 24),
            "media_type": self.bytes_at(pos + 32),
            "checkpoints_at": cps_at,
            "n_checkpoints": n_cps,
            "compression": f[10],
        }

    def checkpoint(self, layer, k):
        pos = layer["checkpoints_at"] + k * CHECKPOINT.size
        f = CHECKPOINT.unpack_from(self.p, pos)
        return {
            "layer": layer["index"],
            "k": k,
            "in_offset": f[0],
            "out_offset": f[1],
            "window_offset": f[2],
            "window_xxh3": f[3],
            "window_stored_len": f[4],
            "window_len": f[5],
            "bits": f[6],
            "window_encoding": f[7],
        }

    def window(self, cp):
        """The decoded window of checkpoint `cp`, after its bounds and checksum checks."""
        start, n = cp["window_offset"], cp["window_stored_len"]
        where = f"the window of checkpoint {cp['k']} of layer {cp['layer']}"
        if start + n > len(self.windows):
            raise ClipError(f"index is corrupt: {where} lies outside the window area")
        stored = bytes(self.windows[start : start + n])
        if xxh3_64(stored) != cp["window_xxh3"]:
            raise ClipError(f"index is corrupt: {where} does not match its checksum")
        want = cp["window_len"]
        if want > 32768:
            raise ClipError("index is corrupt: checkpoint window is longer than 32 KiB")
        if cp["window_encoding"] == 0 and n == want:
            return stored
        if cp["window_encoding"] == 1:
            d = zlib.decompressobj(-15)
            try:
                w = d.decompress(stored, 32769)
            except zlib.error as e:
                raise ClipError(f"index is corrupt: checkpoint window does not inflate: {e}")
            if len(w) != want:
                raise ClipError(f"index is corrupt: checkpoint window is {len(w)} bytes, expected {want}")
            return w
        raise ClipError(f"index is corrupt: checkpoint window encoding {cp['window_encoding']} with {n} bytes is invalid")

    def xattrs(self, e):
        if e.xattr_count == 0:
            return []
        if e.first_xattr + e.xattr_count > self.n_xattrs:
            raise ClipError(f"index is corrupt: xattrs of entry {e.index} are out of range")
        out = []
        for k in range(e.first_xattr, e.first_xattr + e.xattr_count):
            pos = self.xattrs_at + k * XATTR.size
            out.append((self.bytes_at(pos), self.bytes_at(pos + 8)))
        return out

    def chunk_hash(self, k):
        if not 0 <= k < self.n_chunks:
            raise ClipError(f"index is corrupt: chunk hash {k} is out of range")
        pos = self.chunks_at + 32 * k
        return bytes(self.p[pos : pos + 32])

    # -- the tree (spec section 6) -------------------------------------------------------

    def children(self, i):
        e = self.entry(i)
        if e.kind != K_DIR or e.child_count == 0:
            return range(0)
        end = e.first_child + e.child_count
        if e.first_child <= i or end > self.n_entries:  # children follow their directory
            raise ClipError(f"index is corrupt: children of entry {i} are out of range")
        return range(e.first_child, end)

    def lookup(self, d, name):
        kids = self.children(d)
        lo, hi = kids.start, kids.stop
        while lo < hi:
            mid = (lo + hi) // 2
            n = self.entry(mid).name
            if n == name:
                return mid
            if n < name:
                lo = mid + 1
            else:
                hi = mid
        return None

    def resolve(self, path):
        cur = 0
        for comp in path.split(b"/"):
            if comp in (b"", b"."):
                continue
            cur = self.lookup(cur, comp)
            if cur is None:
                return None
        return cur

    def path_of(self, i):
        parts = []
        cur = i
        for _ in range(self.n_entries + 1):
            if cur == 0:
                return b"/" + b"/".join(reversed(parts))
            e = self.entry(cur)
            parts.append(e.name)
            cur = e.parent
        raise ClipError(f"index is corrupt: parent chain of entry {i} loops")

    def inode_of(self, i):
        e = self.entry(i)
        if e.kind == K_HARDLINK:
            t = self.entry(e.hardlink_to)
            if t.kind != K_FILE:
                raise ClipError(f"index is corrupt: hardlink {i} points at non-file {e.hardlink_to}")
            return t.index
        return i

    def pieces(self, e):
        """(offset in file, length, sha256) of each cache piece of regular file `e`."""
        if e.kind != K_FILE or e.size == 0:
            return []
        if e.size <= CHUNK_SIZE:
            return [(0, e.size, e.sha256)]
        if e.first_chunk == NONE:
            raise ClipError(f"index is corrupt: entry {e.index} has no chunk hashes")
        n = (e.size + CHUNK_SIZE - 1) // CHUNK_SIZE
        if e.first_chunk + n > self.n_chunks:
            raise ClipError(f"index is corrupt: chunk hashes of entry {e.index} are out of range")
        return [
            (k * CHUNK_SIZE, min(CHUNK_SIZE, e.size - k * CHUNK_SIZE), self.chunk_hash(e.first_chunk + k))
            for k in range(n)
        ]


# ---------------------------------------------------------------------------------------
# Reports: the same text as `clip-build inspect`, `ls`, `stat`
# ---------------------------------------------------------------------------------------


def s(b):
    return b.decode("utf-8", "replace")


def inspect_json(ix):
    kinds = {}
    file_bytes = 0
    for i in range(ix.n_entries):
        e = ix.entry(i)
        kinds[KINDS[e.kind]] = kinds.get(KINDS[e.kind], 0) + 1
        if e.kind == K_FILE:
            file_bytes += e.size
    layers = []
    for li in range(ix.n_layers):
        l = ix.layer(li)
        window_bytes = sum(ix.checkpoint(l, k)["window_stored_len"] for k in range(l["n_checkpoints"]))
        layers.append({
            "digest": s(l["digest"]),
            "diff_id": s(l["diff_id"]),
            "media_type": s(l["media_type"]),
            "compression": "gzip" if l["compression"] == 1 else "none",
            "compressed_size": l["compressed_size"],
            "uncompressed_size": l["uncompressed_size"],
            "checkpoints": l["n_checkpoints"],
            "window_bytes": window_bytes,
        })
    j = {
        "format_version": f"{ix.version[0]}.{ix.version[1]}",
        "index_size": ix.file_size,
        "reference": s(ix.reference),
        "source": s(ix.source),
        "manifest_digest": s(ix.manifest_digest),
        "config_digest": s(ix.config_digest),
        "platform": s(ix.platform),
        "created": ix.created,
        "layers": layers,
        "entries": ix.n_entries,
        "entries_by_kind": dict(sorted(kinds.items())),
        "file_bytes": file_bytes,
        "chunk_hashes": ix.n_chunks,
        "xattrs": ix.n_xattrs,
    }
    text = ix.startup_profile()
    if text is not None:
        intervals = sum(1 for line in text.split(b"\n") if line[:1].isdigit())
        j["startup_profile"] = {"bytes": len(text), "intervals": intervals}
    return j


def mb(n):
    return f"{n / 1e6:.1f} MB"


def inspect_text(ix):
    j = inspect_json(ix)
    out = [
        f"format:      {j['format_version']}",
        f"index size:  {j['index_size']} bytes",
        f"reference:   {j['reference']}",
        f"source:      {j['source']}",
        f"manifest:    {j['manifest_digest']}",
        f"platform:    {j['platform']}",
        f"layers:      {len(j['layers'])}",
    ]
    for i, l in enumerate(j["layers"]):
        out.append(
            f"  {i}: {l['digest']} {l['compression']} {mb(l['compressed_size'])} -> "
            f"{mb(l['uncompressed_size'])}, {l['checkpoints']} checkpoints"
        )
    kinds = ", ".join(f"{k} {v}" for k, v in j["entries_by_kind"].items())
    out.append(f"entries:     {j['entries']} ({kinds})")
    out.append(f"file bytes:  {mb(j['file_bytes'])}")
    out.append(f"chunk hashes: {j['chunk_hashes']}")
    if "startup_profile" in j:
        p = j["startup_profile"]
        out.append(f"startup profile: {p['intervals']} intervals ({p['bytes']} bytes)")
    return "".join(line + "\n" for line in out)


def ls_line(ix, i):
    e = ix.entry(i)
    line = (
        f"{KINDS[e.kind]:<8} {e.mode:04o} {e.uid}:{e.gid} {e.size:>10} "
        f"{e.mtime}.{e.mtime_nsec:09} {e.nlink:>3} {s(ix.path_of(i))}"
    )
    if e.kind == K_SYMLINK:
        line += f" -> {s(e.link_target)}"
    elif e.kind == K_HARDLINK:
        line += f" => {s(ix.path_of(e.hardlink_to))}"
    elif e.kind in (K_CHAR, K_BLOCK):
        line += f" [{e.rdev_major},{e.rdev_minor}]"
    return line


def ls(ix, start, recursive):
    out = [ls_line(ix, start)]
    stack = [iter(ix.children(start))]  # explicit: a deep tree must not hit the recursion limit
    while stack:
        c = next(stack[-1], None)
        if c is None:
            stack.pop()
            continue
        out.append(ls_line(ix, c))
        if recursive and ix.entry(c).kind == K_DIR:
            stack.append(iter(ix.children(c)))
    return out


def stat(ix, i):
    e = ix.entry(i)
    out = [
        f"path: {s(ix.path_of(i))}",
        f"index: {i}",
        f"kind: {KINDS[e.kind]}",
        f"mode: {e.mode:04o}",
        f"uid: {e.uid}",
        f"gid: {e.gid}",
        f"size: {e.size}",
        f"mtime: {e.mtime}.{e.mtime_nsec:09}",
        f"nlink: {e.nlink}",
    ]
    if e.kind == K_DIR:
        out.append(f"children: {e.child_count}")
    elif e.kind == K_SYMLINK:
        out.append(f"target: {s(e.link_target)}")
    elif e.kind == K_HARDLINK:
        out.append(f"hardlink_to: {s(ix.path_of(e.hardlink_to))}")
    elif e.kind in (K_CHAR, K_BLOCK):
        out.append(f"rdev: {e.rdev_major},{e.rdev_minor}")
    elif e.kind == K_FILE:
        out.append(f"sha256: {e.sha256.hex()}")
        if e.size > 0:
            out.append(f"layer: {e.layer}")
            out.append(f"data_offset: {e.data_offset}")
        pieces = ix.pieces(e)
        if len(pieces) > 1:
            out.append(f"chunks: {len(pieces)}")
    for name, value in ix.xattrs(e):
        out.append(f"xattr: {s(name)}={value.hex()}")
    return "".join(line + "\n" for line in out)


# ---------------------------------------------------------------------------------------
# Content: resuming inflation at a checkpoint (spec section 8)
# ---------------------------------------------------------------------------------------


class BitWriter:
    """Packs deflate bit fields LSB-first (RFC 1951 section 3.1.1)."""

    def __init__(self):
        self.value = 0
        self.nbits = 0

    def bits(self, value, n):
        self.value |= (value & ((1 << n) - 1)) << self.nbits
        self.nbits += n

    def code(self, code, n):
        # Huffman codes are packed starting with their most significant bit.
        self.bits(int(format(code, f"0{n}b")[::-1], 2), n)


def _empty_fixed_block(w):
    w.bits(0, 1)  # BFINAL = 0
    w.bits(1, 2)  # BTYPE = 01, fixed Huffman codes
    w.code(0, 7)  # end-of-block (symbol 256): 7-bit code 0000000


CL_ORDER = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15]


def _empty_dynamic_block(w):
    """A 91-bit non-final dynamic block that produces no output. Its codes are complete:
    literal/length code {0: '0', 256: '1'}, one distance code of length 1, code length
    code {1: '0', 18: '1'}."""
    w.bits(0, 1)  # BFINAL = 0
    w.bits(2, 2)  # BTYPE = 10, dynamic Huffman codes
    w.bits(0, 5)  # HLIT = 0: 257 literal/length codes
    w.bits(0, 5)  # HDIST = 0: 1 distance code
    w.bits(14, 4)  # HCLEN = 14: 18 code length code lengths (the last one is symbol 1's)
    for sym in CL_ORDER[:18]:
        w.bits(1 if sym in (1, 18) else 0, 3)
    w.code(0, 1)  # length 1 for literal 0
    w.code(1, 1)  # 18: repeat zero 11 + 127 = 138 times
    w.bits(127, 7)
    w.code(1, 1)  # 18: repeat zero 11 + 106 = 117 times (literals 139..255)
    w.bits(106, 7)
    w.code(0, 1)  # length 1 for symbol 256 (end of block)
    w.code(0, 1)  # length 1 for distance code 0
    w.code(1, 1)  # end of block


def alignment_prefix(nbits):
    """Deflate blocks that produce no output and are `nbits` long modulo 8 (nbits 1..7),
    as (integer, bit count). Prepending them makes a stream whose next block starts at bit
    `nbits` of a byte decodable by an inflater that can only start at a byte boundary."""
    w = BitWriter()
    if nbits % 2:
        _empty_dynamic_block(w)  # 91 bits = 3 (mod 8)
    while w.nbits % 8 != nbits:
        _empty_fixed_block(w)  # 10 bits = 2 (mod 8)
    return w.value, w.nbits


class BlobReader:
    """Sequential reads from a file starting at an absolute offset."""

    def __init__(self, f, offset):
        self.f = f
        self.f.seek(offset)
        self.offset = offset

    def read(self, n=1 << 16):
        b = self.f.read(n)
        self.offset += len(b)
        return b


def inflate_from(blob, cp, window):
    """Yield the uncompressed bytes of a gzip layer from checkpoint `cp` (or from the start of
    the blob when `cp` is None) to the end of the stream, across gzip members."""
    if cp is None:
        src = BlobReader(blob, 0)
        d = zlib.decompressobj(31)
        pending = b""
        raw = False
    else:
        bits = cp["bits"]
        if not 0 <= bits <= 7:
            raise ClipError("index is corrupt: checkpoint bits is not 0..7")
        d = zlib.decompressobj(-15, zdict=window) if window else zlib.decompressobj(-15)
        raw = True
        if bits == 0:
            src = BlobReader(blob, cp["in_offset"])
            pending = b""
        else:
            # The next block starts at bit 8 - bits of the byte at in_offset - 1.
            src = BlobReader(blob, cp["in_offset"] - 1)
            first = src.read(1)
            if not first:
                raise ClipError("layer blob ends at a checkpoint")
            used = 8 - bits
            value, n = alignment_prefix(used)
            whole = n // 8
            prefix = value.to_bytes(whole + 1, "little")
            last = (prefix[whole] & ((1 << used) - 1)) | (first[0] & (0xFF << used) & 0xFF)
            pending = prefix[:whole] + bytes([last])
    buf = pending
    while True:
        try:
            while not d.eof:
                if not buf:
                    buf = src.read()
                out = d.decompress(buf, 1 << 20)
                if out:
                    yield out
                elif not buf:
                    raise ClipError(f"layer blob ends inside a deflate stream (compressed offset {src.offset})")
                buf = d.unused_data if d.eof else d.unconsumed_tail
        except zlib.error as e:
            raise ClipError(f"invalid gzip data near compressed offset {src.offset}: {e}")
        # End of a gzip member. A raw stream stops before the 8-byte trailer (CRC-32, ISIZE).
        if raw:
            while len(buf) < 8:
                more = src.read()
                if not more:
                    raise ClipError("layer blob ends inside a gzip trailer")
                buf += more
            buf = buf[8:]
        # Then: the end of the blob, zero padding to the end, or another member (0x1f 0x8b ...).
        while True:
            buf = buf.lstrip(b"\0")
            if buf:
                break
            buf = src.read()
            if not buf:
                return
        if buf[0] != 0x1F:
            raise ClipError("data after a gzip member is neither another member nor zero padding")
        d = zlib.decompressobj(31)
        raw = False


def layer_blob_path(ix, layer, layout):
    digest = s(layer["digest"])
    alg, _, hexd = digest.partition(":")
    if not (alg.isalnum() and hexd and all(c in "0123456789abcdefABCDEF" for c in hexd)):
        raise ClipError(f"malformed digest {digest!r}")
    return os.path.join(layout, "blobs", alg, hexd)


def read_span(ix, li, start, length, layout):
    """Yield the bytes [start, start+length) of layer li's uncompressed tar stream."""
    layer = ix.layer(li)
    if start + length > layer["uncompressed_size"]:
        raise ClipError(f"index is corrupt: span {start}+{length} lies outside layer {li}")
    with open(layer_blob_path(ix, layer, layout), "rb") as blob:
        if layer["compression"] == 0:
            blob.seek(start)
            left = length
            while left:
                b = blob.read(min(left, 1 << 20))
                if not b:
                    raise ClipError(f"layer {li} blob is shorter than the index says")
                left -= len(b)
                yield b
            return
        if layer["compression"] != 1:
            raise ClipError(f"index is corrupt: layer {li} has unknown compression {layer['compression']}")
        # The last checkpoint with out_offset <= start (checkpoints are sorted by out_offset).
        lo, hi = 0, layer["n_checkpoints"]
        while lo < hi:
            mid = (lo + hi) // 2
            if ix.checkpoint(layer, mid)["out_offset"] <= start:
                lo = mid + 1
            else:
                hi = mid
        cp = ix.checkpoint(layer, lo - 1) if lo else None
        pos = cp["out_offset"] if cp else 0
        window = ix.window(cp) if cp else b""
        end = start + length
        for out in inflate_from(blob, cp, window):
            a, b = pos, pos + len(out)
            pos = b
            if b <= start:
                continue
            yield out[max(start - a, 0) : min(end - a, len(out))]
            if b >= end:
                return
        raise ClipError(f"layer {li} ends before offset {end}")


def cat(ix, i, layout, write):
    ino = ix.inode_of(i)
    e = ix.entry(ino)
    if e.kind != K_FILE:
        raise ClipError(f"entry {i} is not a regular file")
    pieces = ix.pieces(e)
    if not pieces:
        return
    stream = read_span(ix, e.layer, e.data_offset, e.size, layout)
    buf = b""
    for off, length, sha in pieces:
        while len(buf) < length:
            more = next(stream, None)
            if more is None:
                raise ClipError(f"content of {s(ix.path_of(ino))} ends early")
            buf += more
        piece, buf = buf[:length], buf[length:]
        if hashlib.sha256(piece).digest() != sha:
            raise ClipError(
                f"content of {s(ix.path_of(ino))} at offset {off} does not match its sha256 {sha.hex()}"
            )
        write(piece)


def check_checkpoints(ix, layout, probe=1 << 16):
    """Resume at every checkpoint of every gzip layer and compare `probe` bytes with a plain
    inflation of the whole layer from its first byte. Returns report lines."""
    lines = []
    for li in range(ix.n_layers):
        layer = ix.layer(li)
        if layer["compression"] != 1:
            continue
        with open(layer_blob_path(ix, layer, layout), "rb") as blob:
            full = b"".join(inflate_from(blob, None, b""))
            if len(full) != layer["uncompressed_size"]:
                raise ClipError(f"layer {li} inflates to {len(full)} bytes, index says {layer['uncompressed_size']}")
            if "sha256:" + hashlib.sha256(full).hexdigest() != s(layer["diff_id"]):
                raise ClipError(f"layer {li} does not match its diff_id")
            for k in range(layer["n_checkpoints"]):
                cp = ix.checkpoint(layer, k)
                got = b""
                for out in inflate_from(blob, cp, ix.window(cp)):
                    got += out
                    if len(got) >= probe:
                        break
                o = cp["out_offset"]
                want = full[o : o + probe]
                if got[: len(want)] != want:
                    raise ClipError(f"layer {li} checkpoint {k} (out {o}, bits {cp['bits']}) resumes to wrong bytes")
                lines.append(f"layer {li} checkpoint {k} out {o} in {cp['in_offset']} bits {cp['bits']}: ok")
            # The last checkpoint also continues through to the end of the stream.
            if layer["n_checkpoints"]:
                cp = ix.checkpoint(layer, layer["n_checkpoints"] - 1)
                tail = b"".join(inflate_from(blob, cp, ix.window(cp)))
                if tail != full[cp["out_offset"] :]:
                    raise ClipError(f"layer {li}: the last checkpoint does not inflate to the end of the layer")
    return lines


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(prog="clipread.py", description="Read a clip index (format 2) without clip.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="summary of an index")
    p.add_argument("index")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("ls", help="list entries")
    p.add_argument("index")
    p.add_argument("path", nargs="?", default="/")
    p.add_argument("-R", "--recursive", action="store_true")
    p = sub.add_parser("stat", help="every field of entries (one block per path)")
    p.add_argument("index")
    p.add_argument("paths", nargs="+", metavar="path")
    p = sub.add_parser("cat", help="files' verified content, concatenated")
    p.add_argument("index")
    p.add_argument("paths", nargs="+", metavar="path")
    p.add_argument("--layout", help="OCI layout with the blobs (default: the index's source)")
    p = sub.add_parser("checkpoints", help="resume at every checkpoint and compare")
    p.add_argument("index")
    p.add_argument("--layout")
    p = sub.add_parser("profile", help="the startup profile the index carries, as text")
    p.add_argument("index")
    p = sub.add_parser("xxh3", help="XXH3-64 of files")
    p.add_argument("files", nargs="+")
    a = ap.parse_args(argv)
    out = sys.stdout.buffer
    try:
        if a.cmd == "xxh3":
            for name in a.files:
                with open(name, "rb") as f:
                    out.write(f"{xxh3_64(f.read()):016x}  {name}\n".encode())
            return 0
        ix = Index(a.index)

        def resolve(path):
            i = ix.resolve(os.fsencode(path))
            if i is None:
                raise ClipError(f"{path}: no such file or directory in the image")
            return i

        if a.cmd == "inspect":
            if a.json:
                text = json.dumps(inspect_json(ix), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            else:
                text = inspect_text(ix)
            out.write(text.encode())
        elif a.cmd == "profile":
            text = ix.startup_profile()
            if text is None:
                raise ClipError(f"{a.index} carries no startup profile")
            out.write(text)
        elif a.cmd == "ls":
            out.write("".join(line + "\n" for line in ls(ix, resolve(a.path), a.recursive)).encode())
        elif a.cmd == "stat":
            for path in a.paths:
                out.write(stat(ix, resolve(path)).encode())
        elif a.cmd == "cat":
            for path in a.paths:
                cat(ix, resolve(path), a.layout if a.layout else os.fsdecode(ix.source), out.write)
        elif a.cmd == "checkpoints":
            lines = check_checkpoints(ix, a.layout if a.layout else os.fsdecode(ix.source))
            out.write("".join(line + "\n" for line in lines).encode())
        out.flush()
        return 0
    except (ClipError, OSError, struct.error, ValueError) as e:
        out.flush()
        print(f"clipread: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
