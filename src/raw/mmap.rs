//! Memory-mapping an index file and viewing its payload as archived data without copying.

use crate::format::types::ArchivedIndex;
use std::fs::File;
use std::path::Path;

/// Largest range to ask the kernel to read ahead in one call (`MADV_WILLNEED`,
/// `POSIX_FADV_WILLNEED`): it reads at most the larger of the device's read-ahead size and
/// its largest request per call (128 KiB and 1280 KiB by default on many disks) and
/// silently drops the rest.
const WILLNEED_CHUNK: u64 = 256 << 10;

/// Split `start..end` into the ranges (offset, length) to ask the kernel to read ahead,
/// one call each, so that none is cut short (see `WILLNEED_CHUNK`).
pub fn willneed_chunks(start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> {
    (start..end)
        .step_by(WILLNEED_CHUNK as usize)
        .map(move |at| (at, WILLNEED_CHUNK.min(end - at)))
}

/// A read-only memory map of a whole file.
pub struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Map `path` read-only, advised as read at random: a page fault then reads that page
    /// only, not the block device's read-around window (8 MiB on some virtual disks, ~5 ms
    /// for the header alone, ~11 ms for the first checkpoint window a cold read needs).
    /// [`MappedFile::read_prefix_now`] undoes this for the part read as a whole.
    pub fn open(path: &Path) -> std::io::Result<MappedFile> {
        let file = File::open(path)?;
        // SAFETY: the map is read-only and private to this process. Index files are written
        // atomically (temp file + rename) and never modified in place, so the mapped bytes do
        // not change under us; a file truncated by someone else would raise SIGBUS, which is
        // the documented limit of memory-mapped readers.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        if !map.is_empty() {
            let _ = map.advise(memmap2::Advice::Random);
        }
        Ok(MappedFile { map })
    }

    /// The mapped bytes (page aligned).
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Start reading the first `len` bytes (rounded up to a page) now, in one batch, and
    /// give them the default read-around again: a checksum pass over them then waits for
    /// reads already under way instead of faulting them in one by one, and a later cold
    /// walk of all entries reads ahead. Errors are ignored (advice only).
    pub fn read_prefix_now(&self, len: usize) {
        // SAFETY: sysconf only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = len.div_ceil(page).saturating_mul(page).min(self.map.len());
        if len > 0 {
            let _ = self.map.advise_range(memmap2::Advice::Normal, 0, len);
            for (at, n) in willneed_chunks(0, len as u64) {
                let _ = self
                    .map
                    .advise_range(memmap2::Advice::WillNeed, at as usize, n as usize);
            }
        }
    }

    /// Start reading the bytes `start..start + len` (widened to whole pages) now, in one
    /// batch, without waiting: a later access waits for that read instead of faulting the
    /// pages in one at a time (the map is advised random, so each fault is a read of its
    /// own). Errors are ignored (advice only).
    pub fn will_need(&self, start: usize, len: usize) {
        if start < self.map.len() && len > 0 {
            let len = len.min(self.map.len() - start);
            let _ = self.map.advise_range(memmap2::Advice::WillNeed, start, len);
        }
    }
}

/// View `payload` as an archived index without validating it again.
///
/// The caller must have validated `payload` with `rkyv::access::<ArchivedIndex, _>` (as
/// `IndexFile` does when it opens a file). `payload` must be 8-byte aligned and at least
/// as large as the root object; both are checked here.
pub(crate) fn archived_index_unchecked(payload: &[u8]) -> Option<&ArchivedIndex> {
    let root = std::mem::size_of::<ArchivedIndex>();
    if payload.len() < root
        || !(payload.as_ptr() as usize).is_multiple_of(8)
        || !payload.len().is_multiple_of(8)
    {
        return None;
    }
    // SAFETY: the root lies inside `payload` and is aligned (checked above), and the caller
    // validated these bytes as an `ArchivedIndex` (see the contract above): every relative
    // pointer and length in them was checked to stay inside `payload`.
    Some(unsafe { rkyv::access_unchecked::<ArchivedIndex>(payload) })
}
