//! Opening an index: header check and checksum (cheap), optional full validation, and the
//! accessors the rest of clip uses (lookup, children, path resolution, attributes).

use super::error::FormatError;
use super::header::{Header, HEADER_SIZE};
use super::types::{
    ArchivedCheckpoint, ArchivedEntry, ArchivedIndex, ArchivedLayer, ArchivedXattr, Kind,
    CHUNK_SIZE, NONE,
};
use crate::raw::mmap::{archived_index_unchecked, MappedFile};
use std::path::Path;

enum Backing {
    Mapped(MappedFile),
    Owned(rkyv::util::AlignedVec<16>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m.bytes(),
            Backing::Owned(v) => v.as_slice(),
        }
    }
}

/// An opened index file.
pub struct IndexFile {
    backing: Backing,
    header: Header,
}

impl IndexFile {
    /// Map and open an index: checks the header, the payload checksum and the payload's
    /// structure (rkyv's check of every relative pointer and length, so that no crafted
    /// file can make a later access read outside it). Both passes run at memory speed over
    /// the payload only (checkpoint windows, most of a large index, are checked one by one
    /// when used): about 1 ms for both on 25 873 entries. [`IndexFile::verify`] adds the tree's
    /// invariants and every window.
    pub fn open(path: &Path) -> Result<IndexFile, FormatError> {
        let io = |source| FormatError::Io {
            path: path.display().to_string(),
            source,
        };
        let map = MappedFile::open(path).map_err(io)?;
        IndexFile::from_backing(Backing::Mapped(map))
    }

    /// Open an index held in memory (copied once into aligned storage).
    pub fn from_bytes(bytes: &[u8]) -> Result<IndexFile, FormatError> {
        let mut v = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        v.extend_from_slice(bytes);
        IndexFile::from_backing(Backing::Owned(v))
    }

    fn from_backing(backing: Backing) -> Result<IndexFile, FormatError> {
        let header = Header::parse(backing.bytes())?;
        let f = IndexFile { backing, header };
        if let Backing::Mapped(m) = &f.backing {
            // The checksum reads header and payload whole; windows stay advised random
            // (read one at a time, wherever the wanted checkpoint is).
            m.read_prefix_now(HEADER_SIZE + header.payload_len as usize);
        }
        let found = xxhash_rust::xxh3::xxh3_64(f.payload());
        if found != header.payload_xxh3 {
            return Err(FormatError::Checksum {
                expected: header.payload_xxh3,
                found,
            });
        }
        // A checksum proves the bytes undamaged, not that clip-build wrote them: an index is
        // a file anyone can hand us, so its pointers are checked before any is followed.
        rkyv::access::<ArchivedIndex, rkyv::rancor::Error>(f.payload())
            .map_err(|e| FormatError::Invalid(format!("structure check failed: {e}")))?;
        let idx = f.try_index()?;
        if idx.entries.len() as u64 != header.entry_count as u64 {
            return Err(FormatError::Invalid(format!(
                "header says {} entries, table has {}",
                header.entry_count,
                idx.entries.len()
            )));
        }
        if idx.layers.len() as u64 != header.layer_count as u64 {
            return Err(FormatError::Invalid(format!(
                "header says {} layers, table has {}",
                header.layer_count,
                idx.layers.len()
            )));
        }
        if idx.entries.is_empty() {
            return Err(FormatError::Invalid(
                "entry table is empty (no root)".into(),
            ));
        }
        Ok(f)
    }

    fn payload(&self) -> &[u8] {
        let start = HEADER_SIZE;
        &self.backing.bytes()[start..start + self.header.payload_len as usize]
    }

    fn try_index(&self) -> Result<&ArchivedIndex, FormatError> {
        archived_index_unchecked(self.payload()).ok_or_else(|| {
            FormatError::Invalid("payload is too small or misaligned for the root object".into())
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Total file size in bytes.
    pub fn file_size(&self) -> u64 {
        self.backing.bytes().len() as u64
    }

    /// The archived root object.
    pub fn index(&self) -> &ArchivedIndex {
        self.try_index().expect("checked in from_backing")
    }

    /// Full validation: [`IndexFile::verify_payload`], then every checkpoint window's
    /// bounds and checksum, then the startup profile area's, if there is one.
    pub fn verify(&self) -> Result<(), FormatError> {
        self.verify_payload()?;
        for (l, layer) in self.index().layers.iter().enumerate() {
            for k in 0..layer.checkpoints.len() {
                self.stored_window(l as u32, k)?;
            }
        }
        self.startup_profile().map(|_| ())
    }

    /// The text of the startup profile the index carries (format 2.1,
    /// [`super::startup`]), checked against its checksum; `None` when it carries none.
    pub fn startup_profile(&self) -> Result<Option<&[u8]>, FormatError> {
        super::startup::decode(&self.backing.bytes()[self.core_len()..])
    }

    /// The file's header, payload and window area: the index without a startup profile.
    pub fn core_bytes(&self) -> &[u8] {
        &self.backing.bytes()[..self.core_len()]
    }

    fn core_len(&self) -> usize {
        HEADER_SIZE + self.header.payload_len as usize + self.header.windows_len as usize
    }

    /// Validation of the payload beyond what opening checks: the tree's invariants
    /// (parents, child ranges, sort order, references into every table). The window area
    /// is not read: each window is checked when it is used.
    pub fn verify_payload(&self) -> Result<(), FormatError> {
        super::verify::check_tree(self.index())
    }

    /// Entry `i` (0 is the root).
    pub fn entry(&self, i: u32) -> Result<&ArchivedEntry, FormatError> {
        self.index()
            .entries
            .get(i as usize)
            .ok_or_else(|| FormatError::Invalid(format!("entry {i} is out of range")))
    }

    /// Number of entries.
    pub fn entry_count(&self) -> u32 {
        self.index().entries.len() as u32
    }

    /// Layer `i`.
    pub fn layer(&self, i: u32) -> Result<&ArchivedLayer, FormatError> {
        self.index()
            .layers
            .get(i as usize)
            .ok_or_else(|| FormatError::Invalid(format!("layer {i} is out of range")))
    }

    /// An identity of the checkpoint layout: XXH3 of every layer's digest and its
    /// checkpoints' offsets. Access profiles name intervals by checkpoint number, so a
    /// profile means the same only to indexes of the same layout (an image indexed with
    /// another `--checkpoint-interval` has other intervals).
    pub fn checkpoint_layout_id(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for l in self.index().layers.iter() {
            h.update(l.digest.as_slice());
            for c in l.checkpoints.iter() {
                h.update(&c.in_offset.to_native().to_le_bytes());
                h.update(&c.out_offset.to_native().to_le_bytes());
            }
        }
        h.digest()
    }

    /// The blob digest of layer `i` (`sha256:…`), as text.
    pub fn layer_digest(&self, i: u32) -> Result<&str, FormatError> {
        std::str::from_utf8(self.layer(i)?.digest.as_slice())
            .map_err(|_| FormatError::Invalid(format!("the digest of layer {i} is not UTF-8")))
    }

    /// The child index range of directory `dir` (empty for non-directories). Children
    /// follow their directory (entries are breadth-first), so walking down always moves
    /// forward: a crafted index cannot make a walk loop.
    pub fn children(&self, dir: u32) -> Result<std::ops::Range<u32>, FormatError> {
        let e = self.entry(dir)?;
        if e.kind != Kind::Dir as u8 || e.child_count == 0 {
            return Ok(0..0);
        }
        let first = e.first_child.to_native();
        let end = first
            .checked_add(e.child_count.to_native())
            .filter(|&end| first > dir && end <= self.entry_count())
            .ok_or_else(|| {
                FormatError::Invalid(format!("children of entry {dir} are out of range"))
            })?;
        Ok(first..end)
    }

    /// Find `name` in directory `dir` by binary search over its sorted children.
    pub fn lookup(&self, dir: u32, name: &[u8]) -> Result<Option<u32>, FormatError> {
        let range = self.children(dir)?;
        let entries = &self.index().entries;
        let (mut lo, mut hi) = (range.start, range.end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match entries[mid as usize].name.as_slice().cmp(name) {
                std::cmp::Ordering::Equal => return Ok(Some(mid)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok(None)
    }

    /// Resolve a path (`/`-separated, relative to the root; symlinks are not followed).
    pub fn resolve(&self, path: &[u8]) -> Result<Option<u32>, FormatError> {
        let mut cur = 0u32;
        for comp in path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            match self.lookup(cur, comp)? {
                Some(i) => cur = i,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// Full path of entry `i`, starting with `/`.
    pub fn path_of(&self, i: u32) -> Result<Vec<u8>, FormatError> {
        let mut parts = Vec::new();
        let mut cur = i;
        let mut guard = 0u32;
        while cur != 0 {
            let e = self.entry(cur)?;
            parts.push(e.name.as_slice());
            cur = e.parent.to_native();
            guard += 1;
            if guard > self.entry_count() {
                return Err(FormatError::Invalid(format!(
                    "parent chain of entry {i} loops"
                )));
            }
        }
        let mut out = Vec::new();
        for p in parts.iter().rev() {
            out.push(b'/');
            out.extend_from_slice(p);
        }
        if out.is_empty() {
            out.push(b'/');
        }
        Ok(out)
    }

    /// The entry holding the inode of `i`: the hardlink target for hardlinks, else `i`.
    pub fn inode_of(&self, i: u32) -> Result<u32, FormatError> {
        let e = self.entry(i)?;
        if e.kind == Kind::Hardlink as u8 {
            let t = e.hardlink_to.to_native();
            let te = self.entry(t)?;
            if te.kind != Kind::File as u8 {
                return Err(FormatError::Invalid(format!(
                    "hardlink {i} points at non-file {t}"
                )));
            }
            return Ok(t);
        }
        Ok(i)
    }

    /// Extended attributes of entry `i`.
    pub fn xattrs(&self, i: u32) -> Result<&[ArchivedXattr], FormatError> {
        let e = self.entry(i)?;
        let first = e.first_xattr.to_native() as usize;
        let n = e.xattr_count.to_native() as usize;
        if n == 0 {
            return Ok(&[]);
        }
        self.index()
            .xattrs
            .get(first..first.saturating_add(n))
            .ok_or_else(|| FormatError::Invalid(format!("xattrs of entry {i} are out of range")))
    }

    /// The content pieces of regular file `i`: (uncompressed offset within the file,
    /// length, sha256). Files of at most `CHUNK_SIZE` are one piece hashed as a whole.
    pub fn pieces(&self, i: u32) -> Result<Vec<Piece>, FormatError> {
        let e = self.entry(i)?;
        let size = e.size.to_native();
        if e.kind != Kind::File as u8 || size == 0 {
            return Ok(Vec::new());
        }
        if size <= CHUNK_SIZE {
            return Ok(vec![Piece {
                offset: 0,
                len: size,
                sha256: e.sha256,
            }]);
        }
        let n = size.div_ceil(CHUNK_SIZE) as usize;
        let first = e.first_chunk.to_native();
        if first == NONE {
            return Err(FormatError::Invalid(format!(
                "entry {i} has no chunk hashes"
            )));
        }
        let hashes = self
            .index()
            .chunk_hashes
            .get(first as usize..first as usize + n)
            .ok_or_else(|| {
                FormatError::Invalid(format!("chunk hashes of entry {i} are out of range"))
            })?;
        Ok(hashes
            .iter()
            .enumerate()
            .map(|(k, h)| {
                let off = k as u64 * CHUNK_SIZE;
                Piece {
                    offset: off,
                    len: (size - off).min(CHUNK_SIZE),
                    sha256: *h,
                }
            })
            .collect())
    }

    /// The last checkpoint of `layer` at or before uncompressed offset `out`.
    pub fn checkpoint_before(
        &self,
        layer: u32,
        out: u64,
    ) -> Result<Option<&ArchivedCheckpoint>, FormatError> {
        let cps = &self.layer(layer)?.checkpoints;
        Ok(self.checkpoint_index_before(layer, out)?.map(|k| &cps[k]))
    }

    /// Number of the last checkpoint of `layer` at or before uncompressed offset `out`:
    /// the checkpoint interval holding `out`.
    pub fn checkpoint_index_before(
        &self,
        layer: u32,
        out: u64,
    ) -> Result<Option<usize>, FormatError> {
        let cps = &self.layer(layer)?.checkpoints;
        Ok(cps
            .partition_point(|c| c.out_offset.to_native() <= out)
            .checked_sub(1))
    }

    /// The compressed bytes of gzip layer `layer` that inflating the uncompressed range
    /// `[start, end)` reads: from checkpoint `k` (the one at or before `start`; one byte
    /// early when it starts inside a byte) to just past the first checkpoint at or after
    /// `end`, or to the end of the blob. `None` when no checkpoint precedes `start`.
    pub fn compressed_span(
        &self,
        layer: u32,
        start: u64,
        end: u64,
    ) -> Result<Option<(usize, u64, u64)>, FormatError> {
        let l = self.layer(layer)?;
        let Some(k) = self.checkpoint_index_before(layer, start)? else {
            return Ok(None);
        };
        let cp = &l.checkpoints[k];
        let from = cp.in_offset.to_native() - (cp.bits > 0) as u64;
        let size = l.compressed_size.to_native();
        let next = l
            .checkpoints
            .partition_point(|c| c.out_offset.to_native() < end);
        let to = l
            .checkpoints
            .get(next)
            .map_or(size, |c| (c.in_offset.to_native() + 64).min(size));
        Ok(Some((k, from.min(size), to.max(from.min(size)))))
    }

    /// The compressed offset in gzip layer `layer` of uncompressed offset `out`, estimated
    /// by linear interpolation between the checkpoints around it (exact at a checkpoint);
    /// `None` when no checkpoint precedes `out`.
    pub fn compressed_offset_estimate(
        &self,
        layer: u32,
        out: u64,
    ) -> Result<Option<u64>, FormatError> {
        let l = self.layer(layer)?;
        let Some(k) = self.checkpoint_index_before(layer, out)? else {
            return Ok(None);
        };
        let a = &l.checkpoints[k];
        let (a_in, a_out) = (a.in_offset.to_native(), a.out_offset.to_native());
        let (b_in, b_out) = l.checkpoints.get(k + 1).map_or(
            (
                l.compressed_size.to_native(),
                l.uncompressed_size.to_native(),
            ),
            |c| (c.in_offset.to_native(), c.out_offset.to_native()),
        );
        let b_in = b_in.max(a_in);
        if b_out <= a_out {
            return Ok(Some(b_in));
        }
        let part = (out - a_out).min(b_out - a_out) as u128 * (b_in - a_in) as u128
            / (b_out - a_out) as u128;
        Ok(Some(a_in + part as u64))
    }

    /// The stored window of checkpoint `k` of `layer` (still encoded as its
    /// `window_encoding` says), after checking that it lies inside the window area and
    /// matches its XXH3 checksum.
    pub fn stored_window(&self, layer: u32, k: usize) -> Result<&[u8], FormatError> {
        let cp = self.layer(layer)?.checkpoints.get(k).ok_or_else(|| {
            FormatError::Invalid(format!("checkpoint {k} of layer {layer} is out of range"))
        })?;
        let bad = |problem| FormatError::Window {
            layer,
            checkpoint: k,
            problem,
        };
        let area = self.window_area();
        let start = cp.window_offset.to_native();
        let stored = start
            .checked_add(cp.window_stored_len.to_native() as u64)
            .filter(|&end| end <= area.len() as u64)
            .map(|end| &area[start as usize..end as usize])
            .ok_or_else(|| bad("lies outside the window area"))?;
        if xxhash_rust::xxh3::xxh3_64(stored) != cp.window_xxh3.to_native() {
            return Err(bad("does not match its checksum"));
        }
        Ok(stored)
    }

    /// Advise that the stored window of checkpoint `k` of `layer` will be read soon: a
    /// mapped index starts reading its pages in one batch, so that [`IndexFile::stored_window`]
    /// waits for one read instead of faulting in page after page. Advice only: anything
    /// out of range is ignored, and an index held in memory needs none.
    pub fn will_need_window(&self, layer: u32, k: usize) {
        let Backing::Mapped(m) = &self.backing else {
            return;
        };
        let Some(cp) = self.layer(layer).ok().and_then(|l| l.checkpoints.get(k)) else {
            return;
        };
        let start = (HEADER_SIZE as u64 + self.header.payload_len)
            .saturating_add(cp.window_offset.to_native());
        let (Ok(start), Ok(len)) = (
            usize::try_from(start),
            usize::try_from(cp.window_stored_len.to_native()),
        ) else {
            return;
        };
        m.will_need(start, len);
    }

    /// The window area: the bytes after the payload that hold the checkpoint windows.
    fn window_area(&self) -> &[u8] {
        let start = HEADER_SIZE + self.header.payload_len as usize;
        &self.backing.bytes()[start..start + self.header.windows_len as usize]
    }

    /// Uncompressed range of the interval starting at checkpoint `k` of `layer`: up to the
    /// next checkpoint, or the end of the layer (none past the last checkpoint).
    pub fn interval_range(&self, layer: u32, k: usize) -> Result<Option<(u64, u64)>, FormatError> {
        let l = self.layer(layer)?;
        let Some(start) = l.checkpoints.get(k) else {
            return Ok(None);
        };
        let end = l
            .checkpoints
            .get(k + 1)
            .map_or(l.uncompressed_size.to_native(), |c| {
                c.out_offset.to_native()
            });
        Ok(Some((start.out_offset.to_native(), end)))
    }
}

/// A content-addressed piece of a regular file: the unit of caching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Offset within the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// sha256 of the piece's bytes; its lowercase hex is the cache key.
    pub sha256: [u8; 32],
}

impl Piece {
    /// The cache key: 64 lowercase hex characters.
    pub fn key(&self) -> String {
        hex::encode(self.sha256)
    }
}
