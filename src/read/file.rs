//! Serving verified pieces of regular files through cache tiers.

use super::ahead::{CachedJob, Interval, Job, ReadAhead, ReaderClaim};
use super::neighbours::Neighbours;
use super::span::{CursorPark, SpanReader};
use crate::format::{FormatError, IndexFile, Kind, Piece};
use crate::source::{Source, SourceError};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Errors of the read path.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The index is inconsistent.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Reading or inflating origin data failed.
    #[error("reading image data: {0}")]
    Origin(String),
    /// The origin produced bytes that do not match the index.
    #[error("content of {path} at offset {offset} does not match its sha256 {expected}: the source is corrupt or does not hold the image this index was built from")]
    Mismatch {
        /// File path.
        path: String,
        /// Piece offset.
        offset: u64,
        /// Expected hex sha256.
        expected: String,
    },
    /// Not a regular file.
    #[error("entry {0} is not a regular file")]
    NotAFile(u32),
}

/// A content-addressed cache tier (disk, Redis, …). Keys are raw sha256 digests; a tier
/// may return wrong bytes (the caller verifies), never panics on bad data.
pub trait Tier: Send + Sync {
    /// Short name for statistics.
    fn name(&self) -> &str;
    /// The bytes stored under `key`, if any.
    fn get(&self, key: &[u8; 32]) -> Option<Bytes>;
    /// Store `bytes` under `key` (best effort). A tier that keeps them in memory keeps a
    /// reference (`Bytes` clones share the buffer), not a copy.
    fn put(&self, key: &[u8; 32], bytes: &Bytes);
    /// Forget `key` (its bytes failed verification).
    fn remove(&self, key: &[u8; 32]);
    /// Whether `key` is stored, without reading or checking its bytes (a hint for
    /// prefetching; a reader still verifies what it gets).
    fn contains(&self, key: &[u8; 32]) -> bool {
        self.get(key).is_some()
    }
    /// Whether the tier is on this machine, so that [`Tier::contains`] costs no network
    /// round trip (read-ahead planning asks only such tiers, on the read path).
    fn is_local(&self) -> bool {
        false
    }
    /// Take note that the piece `key`, which its reader is being served, lies at `at` in
    /// the image, to store it later from bytes rebuilt from the origin instead of holding
    /// these now (see [`crate::read::Rebuild`]). `false` if this tier does not do that for
    /// this piece: the caller then [`Tier::put`]s the bytes.
    fn put_later(&self, key: &[u8; 32], at: PieceAt) -> bool {
        let _ = (key, at);
        false
    }
}

/// Where a piece lies in the image: `len` bytes at `offset` of layer `layer`'s
/// uncompressed stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PieceAt {
    /// Layer index.
    pub layer: u32,
    /// Offset in the layer's uncompressed stream.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Store the verified piece `key`, found at `at`, that its reader is being served, in
/// every tier: as a note to rebuild it later where a tier takes one
/// ([`Tier::put_later`]; the reader has the bytes, and the kernel's page cache serves its
/// re-reads), else as `bytes`. Pieces kept for other readers are [`Tier::put`]: those
/// readers may come before the note is written.
pub fn store_served(tiers: &[Arc<dyn Tier>], key: &[u8; 32], at: PieceAt, bytes: &Bytes) {
    for t in tiers {
        if !t.put_later(key, at) {
            t.put(key, bytes);
        }
    }
}

/// Where a reader sends the read-ahead jobs it plans while reading (see
/// [`FileReader::with_job_sink`]); the caller decides which thread runs them.
pub type JobSink = Arc<dyn Fn(Job) + Send + Sync>;

/// What a reader made with [`FileReader::defer_interval_finish`] leaves for after its
/// reply: keeping the other files' pieces it inflated on the way, finishing its checkpoint
/// interval, then releasing its claims (readers of those pieces wait for them).
#[derive(Default)]
pub struct AfterReply {
    /// Bytes inflated before the wanted ones: (layer, offset in the layer, bytes).
    pub passed: Vec<(u32, u64, Vec<u8>)>,
    /// The span reader whose interval is still to be finished (the file's last piece was
    /// read; see [`SpanReader::finish_interval`]).
    pub unfinished: Option<SpanReader>,
    /// Claims on the intervals concerned (with read-ahead); drop them when done.
    pub claims: Vec<ReaderClaim>,
}

impl AfterReply {
    /// Whether nothing is left to do.
    pub fn is_empty(&self) -> bool {
        self.passed.is_empty() && self.unfinished.is_none() && self.claims.is_empty()
    }
}

/// Where a piece came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The per-handle memory of the last piece.
    Memory,
    /// A read-ahead job.
    ReadAhead,
    /// Cache tier `i`.
    Tier(usize),
    /// The image source.
    Source,
}

/// Pieces failing verification logged at most 10 a minute (each is counted by its tier).
static BAD_PIECE_LOG: crate::logging::RateLimit =
    crate::logging::RateLimit::new(10, std::time::Duration::from_secs(60));

/// Whether `bytes` hash to `sha256`.
pub fn verify(bytes: &[u8], sha256: &[u8; 32]) -> bool {
    Sha256::digest(bytes).as_slice() == sha256
}

/// Reads one regular file piece by piece: tiers first, then the origin through a span
/// reader whose inflate cursor is kept between calls (sequential reads continue).
pub struct FileReader {
    entry: u32,
    layer: u32,
    data_offset: u64,
    size: u64,
    pieces: Vec<Piece>,
    span: Option<SpanReader>,
    last: Option<(usize, Bytes)>,
    neighbours: Option<Arc<Neighbours>>,
    kept: (u64, u64),
    origin: (u64, u64),
    defer_finish: bool,
    after: AfterReply,
    ahead: Option<Arc<ReadAhead>>,
    ahead_hits: u64,
    job_sink: Option<JobSink>,
    cold: bool,
    /// Furthest offset read so far and the bytes read near it in a row (see `plan_ahead`).
    frontier: u64,
    streak: u64,
    touched: Option<Vec<(Interval, (u64, u64))>>,
    park: Option<Arc<CursorPark>>,
}

/// Reads that land this close to the furthest offset read so far count as sequential
/// (the kernel's readahead requests may be answered slightly out of order).
const NEAR_FRONTIER: u64 = 1 << 20;

/// Bytes a reader must have read sequentially before read-ahead starts for it: a program
/// reading a few pages here and there (a loader faulting in a library) gets none.
const SEQUENTIAL: u64 = 1 << 20;

/// A first read at least this long from a file's start counts as sequential at once: the
/// kernel asks for that much only when a program reads 128 KiB or more (its first readahead
/// window is twice the read), while a loader reading an ELF header causes a 16 KiB request.
const FIRST_READ: u64 = 256 << 10;

impl FileReader {
    /// A reader for entry `entry` (hardlinks are followed).
    pub fn new(index: &IndexFile, entry: u32) -> Result<FileReader, ReadError> {
        let ino = index.inode_of(entry)?;
        let e = index.entry(ino)?;
        if e.kind != Kind::File as u8 {
            return Err(ReadError::NotAFile(entry));
        }
        Ok(FileReader {
            entry: ino,
            layer: e.layer.to_native(),
            data_offset: e.data_offset.to_native(),
            size: e.size.to_native(),
            pieces: index.pieces(ino)?,
            span: None,
            last: None,
            neighbours: None,
            kept: (0, 0),
            origin: (0, 0),
            defer_finish: false,
            after: AfterReply::default(),
            ahead: None,
            ahead_hits: 0,
            job_sink: None,
            cold: false,
            frontier: 0,
            streak: 0,
            touched: None,
            park: None,
        })
    }

    /// Keep the pieces of other files that cold reads inflate on the way (see
    /// [`Neighbours`]).
    pub fn with_neighbours(mut self, neighbours: Arc<Neighbours>) -> FileReader {
        self.neighbours = Some(neighbours);
        self
    }

    /// Leave inflate cursors this reader stops using in `park`, and continue cursors other
    /// readers left there (see [`CursorPark`]).
    pub fn with_cursor_park(mut self, park: Arc<CursorPark>) -> FileReader {
        self.park = Some(park);
        self
    }

    /// Use `ahead`: wait for its jobs instead of inflating the same bytes, take the pieces
    /// they hold, and plan jobs with [`FileReader::plan_ahead`].
    pub fn with_read_ahead(mut self, ahead: Arc<ReadAhead>) -> FileReader {
        self.ahead = Some(ahead);
        self
    }

    /// Hand read-ahead jobs to `sink` as soon as a read from the file's start turns out to
    /// need the origin, before this reader inflates anything itself, so that the jobs'
    /// fetches and inflation overlap the reader's first one.
    pub fn with_job_sink(mut self, sink: JobSink) -> FileReader {
        self.job_sink = Some(sink);
        self
    }

    /// Read-ahead jobs for the intervals after file offset `next` (where a sequential
    /// reader goes on), once this reader has needed the origin and read sequentially for a
    /// while: the caller runs them on other threads with [`ReadAhead::run`]. Intervals
    /// already done or running are left out, and so are those whose pieces of this file a
    /// local tier of `tiers` holds (another read kept them on its way).
    pub fn plan_ahead(&self, index: &IndexFile, tiers: &[Arc<dyn Tier>], next: u64) -> Vec<Job> {
        let Some(ahead) = &self.ahead else {
            return Vec::new();
        };
        if !self.cold || self.streak < SEQUENTIAL || next >= self.size {
            return Vec::new();
        }
        let from = self.data_offset + next;
        let to = self.data_offset + self.size.min(next.saturating_add(ahead.window()));
        let cursor = self.span.as_ref().and_then(SpanReader::position);
        let base = self.data_offset;
        // The reader's own cursor goes on to the end of the interval it is in, and through
        // the end of the piece it is in there.
        let own_end = cursor
            .and_then(|c| Interval::containing(index, self.layer, c))
            .and_then(|iv| {
                index
                    .interval_range(iv.layer, iv.checkpoint as usize)
                    .ok()
                    .flatten()
            })
            .map_or(from, |(_, end)| end.max(from));
        // A job is worth it when a piece of this file that the reader will not produce
        // itself (one starting after `own_end`) has bytes in its interval: a whole piece,
        // or a part of one crossing the interval's boundary, which the jobs on either side
        // put together.
        let needed = |a: u64, b: u64| {
            let first = self.pieces.partition_point(|p| base + p.offset < own_end);
            self.pieces[first..]
                .iter()
                .take_while(|p| base + p.offset < b)
                .filter(|p| base + p.offset + p.len > a)
                .any(|p| !tiers.iter().any(|t| t.is_local() && t.contains(&p.sha256)))
        };
        ahead.plan(
            index,
            self.layer,
            (from, to),
            cursor,
            (base, base + self.size),
            needed,
        )
    }

    /// A job reading and verifying, on another thread, the pieces in the `window` bytes
    /// after file offset `next` from the cache tiers, once this reader has read
    /// sequentially for a while and found everything cached so far (see
    /// [`ReadAhead::run_cached`]).
    pub fn plan_cached_ahead(&self, next: u64) -> Option<CachedJob> {
        let ahead = self.ahead.as_ref()?;
        if self.cold || self.streak < SEQUENTIAL || next >= self.size {
            return None;
        }
        let end = next.saturating_add(ahead.window());
        let first = self.pieces.partition_point(|p| p.offset < next);
        let pieces = self.pieces[first..]
            .iter()
            .take_while(|p| p.offset < end)
            .map(|p| (p.sha256, p.len));
        ahead.claim_cached(pieces)
    }

    /// Note the checkpoint intervals of every piece this reader serves, for an access
    /// profile (see [`FileReader::take_touched`]).
    pub fn record_touches(mut self) -> FileReader {
        self.touched = Some(Vec::new());
        self
    }

    /// The checkpoint intervals holding the pieces served since the last call, each with
    /// the range (uncompressed offsets in the layer) of the piece that needed it.
    pub fn take_touched(&mut self) -> Vec<(Interval, (u64, u64))> {
        self.touched
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Pieces this reader took from read-ahead jobs.
    pub fn ahead_hits(&self) -> u64 {
        self.ahead_hits
    }

    /// File size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file's pieces.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// Bytes inflated and compressed bytes fetched by this reader's origin reads (not
    /// counting an interval left to the caller with `defer_interval_finish`).
    pub fn origin_stats(&self) -> (u64, u64) {
        self.origin
    }

    /// Leave the work that only serves other files for after the reply (see
    /// [`FileReader::take_after_reply`]): keeping the pieces inflated on the way to the
    /// wanted bytes and finishing the checkpoint interval after a file's last piece. The
    /// caller answers first, e.g. replies to the kernel, and does that work afterwards. It
    /// must take that work after every read: until it drops the claims in it, other readers
    /// of those intervals wait.
    pub fn defer_interval_finish(mut self) -> FileReader {
        self.defer_finish = true;
        self
    }

    /// The work left for after the reply (see [`FileReader::defer_interval_finish`]).
    pub fn take_after_reply(&mut self) -> AfterReply {
        std::mem::take(&mut self.after)
    }

    /// Other files' pieces kept in the tiers by this reader's origin reads, and their bytes.
    pub fn kept_stats(&self) -> (u64, u64) {
        self.kept
    }

    /// Piece number `k`, verified, and where it came from.
    pub fn piece(
        &mut self,
        index: &IndexFile,
        source: &dyn Source,
        tiers: &[Arc<dyn Tier>],
        k: usize,
    ) -> Result<(Bytes, Origin), ReadError> {
        if let Some((lk, bytes)) = &self.last {
            if *lk == k {
                return Ok((bytes.clone(), Origin::Memory));
            }
        }
        let p = self.pieces[k];
        let start = self.data_offset + p.offset;
        if let Some(ahead) = &self.ahead {
            // A cached-piece job reading this piece hands it over verified.
            ahead.wait_key(&p.sha256);
        }
        if let Some(hit) = self.stored(tiers, k) {
            return Ok(hit);
        }
        // Claim the piece's interval for this origin read, so that other readers of pieces
        // in it wait for the bytes it keeps instead of fetching the same range again; when
        // someone else has it, wait for them and look again.
        let mut claim = None;
        if let Some(ahead) = self.ahead.clone() {
            let iv = Interval::containing(index, self.layer, start);
            // An interval this reader claimed for an earlier piece is still its own.
            let own = |iv: &Interval| self.after.claims.iter().any(|c| c.interval() == *iv);
            if let Some(iv) = iv.filter(|iv| !own(iv)) {
                loop {
                    if let Some(c) = ahead.claim_for_reader(index, iv, (start, start + p.len)) {
                        claim = Some(c);
                        break;
                    }
                    ahead.wait(self.layer, start, start + p.len, &p.sha256);
                    if let Some(hit) = self.stored(tiers, k) {
                        return Ok(hit);
                    }
                }
            }
        }
        if !std::mem::replace(&mut self.cold, true) {
            if let Some(sink) = &self.job_sink {
                self.plan_ahead(index, tiers, p.offset)
                    .into_iter()
                    .for_each(sink.as_ref());
            }
        }
        let mut buf = vec![0u8; p.len as usize];
        let park = &self.park;
        let span = self.span.get_or_insert_with(|| match park {
            Some(park) => SpanReader::with_park(self.layer, park.clone()),
            None => SpanReader::new(self.layer),
        });
        let mut mark = (span.inflated, span.fetched());
        let layer = self.layer;
        let neighbours = self.neighbours.as_deref();
        let kept = &mut self.kept;
        let origin = &mut self.origin;
        let defer = self.defer_finish;
        let passed = &mut self.after.passed;
        let mut count = |span: &SpanReader| {
            origin.0 += span.inflated - mark.0;
            origin.1 += span.fetched() - mark.1;
            mark = (span.inflated, span.fetched());
        };
        let mut keep = |offset: u64, bytes: &[u8]| {
            if let Some(n) = neighbours {
                let (pieces, b) = n.keep(index, layer, offset, bytes, tiers);
                kept.0 += pieces;
                kept.1 += b;
            }
        };
        let read = span.read_at(
            index,
            source,
            self.data_offset + p.offset,
            &mut buf,
            neighbours,
            &mut |offset, bytes| match (neighbours, defer) {
                (None, _) => {}
                (Some(_), true) => passed.push((layer, offset, bytes)),
                (Some(_), false) => keep(offset, &bytes),
            },
        );
        count(span);
        read?;
        if !verify(&buf, &p.sha256) {
            span.discard();
            self.span = None;
            return Err(ReadError::Mismatch {
                path: String::from_utf8_lossy(&index.path_of(self.entry)?).into_owned(),
                offset: p.offset,
                expected: p.key(),
            });
        }
        let buf = Bytes::from(buf);
        let at = PieceAt {
            layer,
            offset: start,
            len: p.len,
        };
        store_served(tiers, &p.sha256, at, &buf);
        if let Some(n) = neighbours.filter(|_| k + 1 == self.pieces.len()) {
            // The file is done; the rest of the interval was fetched anyway and most likely
            // holds the files read next (a package's modules sit together in the tar). A
            // failure here only costs those files a fetch of their own.
            if self.defer_finish {
                self.after.unfinished = self.span.take();
            } else {
                let finished = span.finish_interval(index, n, &mut keep);
                count(span);
                if let Err(e) = finished {
                    tracing::debug!(error = %e, "could not keep the rest of the interval");
                    self.span = None;
                }
            }
        }
        if self.defer_finish {
            // Released after the reply, once the pieces it passed are kept.
            self.after.claims.extend(claim);
        }
        self.last = Some((k, buf.clone()));
        Ok((buf, Origin::Source))
    }

    /// Piece `k` from a read-ahead job's hand-over or from the tiers, verified.
    fn stored(&mut self, tiers: &[Arc<dyn Tier>], k: usize) -> Option<(Bytes, Origin)> {
        let p = self.pieces[k];
        if let Some(held) = self.ahead.as_ref().and_then(|a| a.take(&p.sha256)) {
            let b = held.bytes;
            // A cached-piece job read it from the tiers and checked it already.
            let ok = b.len() as u64 == p.len && (held.verified || verify(&b, &p.sha256));
            if ok {
                if !held.verified {
                    // A profile's job held it, in memory already: nothing to save.
                    for t in tiers {
                        t.put(&p.sha256, &b);
                    }
                }
                self.ahead_hits += 1;
                self.last = Some((k, b.clone()));
                return Some((b, Origin::ReadAhead));
            }
            if let Some(held_back) = BAD_PIECE_LOG.check() {
                tracing::warn!(key = %p.key(), earlier_not_logged = held_back, "read-ahead piece failed verification; reading it again");
            }
        }
        for (i, t) in tiers.iter().enumerate() {
            if let Some(b) = t.get(&p.sha256) {
                if b.len() as u64 == p.len && verify(&b, &p.sha256) {
                    for lower in &tiers[..i] {
                        lower.put(&p.sha256, &b);
                    }
                    self.last = Some((k, b.clone()));
                    return Some((b, Origin::Tier(i)));
                }
                if let Some(held_back) = BAD_PIECE_LOG.check() {
                    tracing::warn!(tier = t.name(), key = %p.key(), earlier_not_logged = held_back, "cached piece failed verification; dropping it");
                }
                t.remove(&p.sha256);
            }
        }
        None
    }

    /// Read up to `out.len()` bytes at `offset` (short only at end of file).
    pub fn read_at(
        &mut self,
        index: &IndexFile,
        source: &dyn Source,
        tiers: &[Arc<dyn Tier>],
        offset: u64,
        out: &mut [u8],
    ) -> Result<usize, ReadError> {
        self.note_read(offset, out.len() as u64);
        let mut done = 0usize;
        while done < out.len() {
            let pos = offset + done as u64;
            let Some((bytes, from)) = self.piece_at(index, source, tiers, pos)? else {
                break;
            };
            let n = (bytes.len() - from).min(out.len() - done);
            out[done..done + n].copy_from_slice(&bytes[from..from + n]);
            done += n;
        }
        Ok(done)
    }

    /// The `len` bytes at `offset` (fewer only at end of file): a slice of the piece that
    /// holds them, without a copy, when one piece does.
    pub fn read_bytes(
        &mut self,
        index: &IndexFile,
        source: &dyn Source,
        tiers: &[Arc<dyn Tier>],
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ReadError> {
        let len = self.size.saturating_sub(offset).min(len as u64) as usize;
        self.note_read(offset, len as u64);
        let Some((first, from)) = self.piece_at(index, source, tiers, offset)? else {
            return Ok(Bytes::new());
        };
        if first.len() - from >= len {
            return Ok(first.slice(from..from + len));
        }
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&first[from..]);
        while out.len() < len {
            let pos = offset + out.len() as u64;
            let Some((bytes, from)) = self.piece_at(index, source, tiers, pos)? else {
                break;
            };
            let n = (bytes.len() - from).min(len - out.len());
            out.extend_from_slice(&bytes[from..from + n]);
        }
        Ok(out.into())
    }

    /// Track whether reads are sequential (read-ahead starts after a streak).
    fn note_read(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        if offset == 0 && len >= FIRST_READ {
            self.streak = self.streak.max(SEQUENTIAL);
        } else if offset <= self.frontier + NEAR_FRONTIER && end + NEAR_FRONTIER >= self.frontier {
            self.streak += len;
        } else {
            self.streak = len;
        }
        self.frontier = self.frontier.max(end);
    }

    /// The piece holding file offset `pos` and `pos`'s offset in it; `None` at end of file.
    fn piece_at(
        &mut self,
        index: &IndexFile,
        source: &dyn Source,
        tiers: &[Arc<dyn Tier>],
        pos: u64,
    ) -> Result<Option<(Bytes, usize)>, ReadError> {
        if pos >= self.size {
            return Ok(None);
        }
        let k = self.pieces.partition_point(|p| p.offset + p.len <= pos);
        let p = self.pieces[k];
        let (bytes, _) = self.piece(index, source, tiers, k)?;
        if let Some(touched) = &mut self.touched {
            let (at, end) = (
                self.data_offset + p.offset,
                self.data_offset + p.offset + p.len,
            );
            for iv in [at, end.saturating_sub(1)]
                .into_iter()
                .filter_map(|o| Interval::containing(index, self.layer, o))
            {
                if touched.last() != Some(&(iv, (at, end))) {
                    touched.push((iv, (at, end)));
                }
            }
        }
        Ok(Some((bytes, (pos - p.offset) as usize)))
    }
}
