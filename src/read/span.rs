//! Reading a span of a layer's uncompressed tar stream from a [`Source`].

use super::neighbours::Neighbours;
use super::ReadError;
use crate::format::{Compression, IndexFile};
use crate::source::Source;
use crate::zran::decode_window;
use crate::zran::resume::{ResumeCursor, ResumePoint};
use std::collections::VecDeque;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Reads uncompressed spans of one layer, resuming at checkpoints. Sequential reads reuse
/// the same inflate cursor; a read behind it or far ahead starts again at a checkpoint, or
/// continues a cursor another reader left in a [`CursorPark`].
pub struct SpanReader {
    layer: u32,
    cursor: Option<Cursor>,
    /// Uncompressed offset up to which the cursor's first request covers the layer.
    covers: u64,
    /// Uncompressed bytes inflated (including skipped ones), for statistics.
    pub inflated: u64,
    received: Arc<AtomicU64>,
    /// Added to `received` for [`SpanReader::fetched`]: what parked cursors received
    /// while this reader had them, less what an adopted cursor had received before.
    received_base: u64,
    park: Option<Arc<CursorPark>>,
}

enum Cursor {
    Gzip(ResumeCursor<Counted>),
    Plain { inner: Counted, pos: u64 },
}

impl Cursor {
    fn position(&self) -> u64 {
        match self {
            Cursor::Gzip(inner) => inner.position(),
            Cursor::Plain { pos, .. } => *pos,
        }
    }
}

/// A source stream that counts the bytes it delivers.
struct Counted {
    inner: Box<dyn Read + Send>,
    count: Arc<AtomicU64>,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// How far ahead of the cursor a read may be and still continue it rather than jump to a
/// checkpoint (inflating up to this much is cheaper than a new request).
const CONTINUE_WITHIN: u64 = 1 << 20;

/// Skipped spans up to this size are handed to the caller (to keep other files' pieces);
/// longer ones are discarded in small steps.
const MAX_KEPT_GAP: u64 = 8 << 20;

/// Cursors a [`CursorPark`] keeps at most (each holds an inflate state, its input buffer
/// and, from a registry, a connection).
const PARKED: usize = 16;

/// How long a parked cursor waits for a reader before it is dropped.
const PARKED_FOR: Duration = Duration::from_secs(10);

/// Inflate cursors that readers left inside the range their request covers (a loader
/// faulting in a library reads one 1 MiB piece, then another file, then the next piece),
/// so that a later read there continues one instead of resuming at the checkpoint with a
/// request of its own. Shared by the readers of one mounted index.
pub struct CursorPark {
    parked: Mutex<VecDeque<Parked>>,
    max_age: Duration,
}

struct Parked {
    layer: u32,
    cursor: Cursor,
    covers: u64,
    received: Arc<AtomicU64>,
    since: Instant,
}

impl CursorPark {
    /// An empty park whose cursors wait 10 s for a reader.
    pub fn new() -> Arc<CursorPark> {
        CursorPark::with_max_age(PARKED_FOR)
    }

    /// An empty park whose cursors wait `max_age` for a reader.
    pub fn with_max_age(max_age: Duration) -> Arc<CursorPark> {
        Arc::new(CursorPark {
            parked: Mutex::new(VecDeque::new()),
            max_age,
        })
    }

    /// Drop the cursors that waited too long, on a thread of its own that looks every
    /// `max_age` until the park is gone: an idle mount would otherwise keep them (and
    /// their registry connections) until its next cold read.
    pub fn expire_in_background(self: &Arc<Self>) -> std::io::Result<()> {
        let park = Arc::downgrade(self);
        let every = self.max_age;
        std::thread::Builder::new()
            .name("clip-park".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                let Some(park) = park.upgrade() else { return };
                let gone = Self::expired(&mut park.lock(), park.max_age);
                drop(gone);
            })
            .map(drop)
    }

    /// Cursors parked now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no cursor is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Parked>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, parked: Parked) {
        let mut q = self.lock();
        q.push_back(parked);
        let mut gone = Vec::new();
        while q.len() > PARKED {
            gone.extend(q.pop_front());
        }
        gone.extend(Self::expired(&mut q, self.max_age));
        drop(q);
        // Dropping a registry cursor may drain its connection: not under the lock.
        drop(gone);
    }

    /// The parked cursor of `layer` nearest before `start` whose request covers `start`,
    /// at most [`CONTINUE_WITHIN`] before it.
    fn take(&self, layer: u32, start: u64) -> Option<Parked> {
        let mut q = self.lock();
        let gone = Self::expired(&mut q, self.max_age);
        let best = q
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                let pos = p.cursor.position();
                p.layer == layer
                    && pos <= start
                    && start < p.covers
                    && start - pos <= CONTINUE_WITHIN
            })
            .max_by_key(|(_, p)| p.cursor.position())
            .map(|(i, _)| i);
        let taken = best.and_then(|i| q.remove(i));
        drop(q);
        drop(gone);
        taken
    }

    fn expired(q: &mut VecDeque<Parked>, max_age: Duration) -> Vec<Parked> {
        let mut gone = Vec::new();
        while q.front().is_some_and(|p| p.since.elapsed() > max_age) {
            gone.extend(q.pop_front());
        }
        gone
    }
}

impl SpanReader {
    /// A reader for `layer`.
    pub fn new(layer: u32) -> SpanReader {
        SpanReader {
            layer,
            cursor: None,
            covers: 0,
            inflated: 0,
            received: Arc::default(),
            received_base: 0,
            park: None,
        }
    }

    /// A reader for `layer` that leaves a cursor it stops using inside its request's range
    /// in `park`, and continues one parked there when a read starts where it can.
    pub fn with_park(layer: u32, park: Arc<CursorPark>) -> SpanReader {
        let mut reader = SpanReader::new(layer);
        reader.park = Some(park);
        reader
    }

    /// Park the cursor if another reader may continue it; otherwise drop it.
    fn park_cursor(&mut self) {
        let Some(cursor) = self.cursor.take() else {
            return;
        };
        let Some(park) = &self.park else { return };
        if cursor.position() >= self.covers {
            return;
        }
        self.received_base = self.fetched();
        let received = std::mem::take(&mut self.received);
        park.put(Parked {
            layer: self.layer,
            cursor,
            covers: self.covers,
            received,
            since: Instant::now(),
        });
    }

    /// Continue a parked cursor for a read at `start`, if one can.
    fn adopt(&mut self, start: u64) -> bool {
        let Some(p) = self
            .park
            .as_ref()
            .and_then(|park| park.take(self.layer, start))
        else {
            return false;
        };
        let before = p.received.load(Ordering::Relaxed);
        self.received_base = self.fetched().wrapping_sub(before);
        self.received = p.received;
        self.covers = p.covers;
        self.cursor = Some(p.cursor);
        tracing::trace!(layer = self.layer, start, "continuing a parked cursor");
        true
    }

    /// The layer this reader reads.
    pub fn layer(&self) -> u32 {
        self.layer
    }

    /// Uncompressed offset of the inflate cursor, if one is open.
    pub fn position(&self) -> Option<u64> {
        self.cursor.as_ref().map(Cursor::position)
    }

    /// Compressed (or, for plain layers, tar) bytes received from the source so far.
    pub fn fetched(&self) -> u64 {
        self.received_base
            .wrapping_add(self.received.load(Ordering::Relaxed))
    }

    /// Read exactly `out.len()` bytes at uncompressed offset `start`. Bytes inflated on the
    /// way to `start` are handed to `skipped` with their offset. With `neighbours`, a read
    /// that needs a new request also asks for the compressed bytes of the piece crossing
    /// the end of the checkpoint interval the read ends in, so that finishing the interval
    /// ([`SpanReader::finish_interval`]) or reading that piece next needs no other request.
    /// After an error the cursor is dropped.
    pub fn read_at(
        &mut self,
        index: &IndexFile,
        source: &dyn Source,
        start: u64,
        out: &mut [u8],
        neighbours: Option<&Neighbours>,
        skipped: &mut dyn FnMut(u64, Vec<u8>),
    ) -> Result<(), ReadError> {
        let end = start + out.len() as u64;
        let r = self
            .place_cursor(index, source, (start, end), neighbours)
            .and_then(|()| self.fill(start, out, skipped));
        self.discard_on_error(r)
    }

    /// Drop the cursor without parking it (it failed, or produced wrong bytes).
    pub fn discard(&mut self) {
        self.cursor = None;
    }

    fn discard_on_error<T>(&mut self, r: Result<T, ReadError>) -> Result<T, ReadError> {
        if r.is_err() {
            self.discard();
        }
        r
    }

    /// Have a cursor at or shortly before `start`: this reader's own, one parked by
    /// another, or a new one.
    fn place_cursor(
        &mut self,
        index: &IndexFile,
        source: &dyn Source,
        (start, end): (u64, u64),
        neighbours: Option<&Neighbours>,
    ) -> Result<(), ReadError> {
        let reuse = self
            .cursor
            .as_ref()
            .is_some_and(|c| c.position() <= start && start - c.position() <= CONTINUE_WITHIN);
        if !reuse {
            self.park_cursor();
            if !self.adopt(start) {
                self.cursor = Some(self.open(index, source, start, end, neighbours)?);
            }
        }
        Ok(())
    }

    /// Fill `out` with the bytes at `start`, from a cursor at or before it.
    fn fill(
        &mut self,
        start: u64,
        out: &mut [u8],
        skipped: &mut dyn FnMut(u64, Vec<u8>),
    ) -> Result<(), ReadError> {
        let end = start + out.len() as u64;
        let Some(cursor) = self.cursor.as_mut() else {
            return Err(ReadError::Origin(format!(
                "layer {}: no cursor to read from",
                self.layer
            )));
        };
        let layer_no = self.layer;
        let bad = |e: std::io::Error| ReadError::Origin(format!("layer {layer_no}: {e}"));
        match cursor {
            Cursor::Gzip(inner) => {
                let before = inner.position();
                let gap = start - before;
                if gap > 0 && gap <= MAX_KEPT_GAP {
                    let passed = inflate_exact(inner, gap as usize, self.layer)?;
                    skipped(before, passed);
                }
                inner
                    .skip_to(start)
                    .map_err(|e| ReadError::Origin(e.to_string()))?;
                let mut got = 0;
                while got < out.len() {
                    let n = inner
                        .fill(&mut out[got..])
                        .map_err(|e| ReadError::Origin(e.to_string()))?;
                    if n == 0 {
                        return Err(ReadError::Origin(format!(
                            "layer {} ends before offset {end}",
                            self.layer
                        )));
                    }
                    got += n;
                }
                self.inflated += inner.position() - before;
            }
            Cursor::Plain { inner, pos, .. } => {
                if *pos < start {
                    std::io::copy(&mut inner.by_ref().take(start - *pos), &mut std::io::sink())
                        .map_err(bad)?;
                    *pos = start;
                }
                inner.read_exact(out).map_err(bad)?;
                *pos = end;
            }
        }
        Ok(())
    }

    /// A cursor at `start` whose first request covers the checkpoint interval in which
    /// `end` falls and, with `neighbours`, the piece crossing that interval's end.
    fn open(
        &mut self,
        index: &IndexFile,
        source: &dyn Source,
        start: u64,
        end: u64,
        neighbours: Option<&Neighbours>,
    ) -> Result<Cursor, ReadError> {
        let layer = index.layer(self.layer)?;
        let digest = index.layer_digest(self.layer)?;
        let size = layer.compressed_size.to_native();
        let count = self.received.clone();
        if layer.compression == Compression::None as u8 {
            let inner = Counted {
                inner: source.blob_from(digest, start, end, size)?,
                count,
            };
            self.covers = end;
            return Ok(Cursor::Plain { inner, pos: start });
        }
        let no_checkpoint = || {
            ReadError::Origin(format!(
                "layer {} has no checkpoint before offset {start}",
                self.layer
            ))
        };
        let (k, _, mut c_end) = index
            .compressed_span(self.layer, start, end)?
            .ok_or_else(no_checkpoint)?;
        let interval_end = index
            .checkpoint_index_before(self.layer, end.saturating_sub(1))?
            .and_then(|j| index.interval_range(self.layer, j).ok().flatten())
            .map_or(end, |(_, e)| e);
        let through = neighbours
            .and_then(|n| n.crossing_end(self.layer, interval_end))
            .unwrap_or(interval_end);
        self.covers = interval_end.max(through);
        if through > interval_end {
            // Only the next interval's first bytes are wanted: ask for an estimate of their
            // compressed end, with a margin (deflate's ratio varies along a stream).
            let next_start = index
                .compressed_offset_estimate(self.layer, interval_end)?
                .unwrap_or(c_end);
            if let Some(estimate) = index.compressed_offset_estimate(self.layer, through)? {
                let margin = estimate.saturating_sub(next_start) / 4 + (16 << 10);
                c_end = c_end.max(estimate.saturating_add(margin).min(size));
            }
        }
        let cp = &layer.checkpoints[k];
        tracing::trace!(layer = self.layer, start, through, checkpoint = k, "resume");
        // A cold index and a cold blob: start reading the window's pages and (a local
        // layout advises when its reader is made) the compressed bytes before waiting for
        // either.
        index.will_need_window(self.layer, k);
        let mut point = ResumePoint {
            in_offset: cp.in_offset.to_native(),
            bits: cp.bits,
            out_offset: cp.out_offset.to_native(),
            window: Vec::new(),
        };
        let src = Counted {
            inner: source.blob_from(digest, point.read_from(), c_end, size)?,
            count,
        };
        point.window = decode_window(
            index.stored_window(self.layer, k)?,
            cp.window_encoding,
            cp.window_len.to_native() as usize,
        )
        .map_err(|e| ReadError::Origin(e.to_string()))?;
        let inner = ResumeCursor::new(src, &point).map_err(|e| ReadError::Origin(e.to_string()))?;
        Ok(Cursor::Gzip(inner))
    }

    /// Inflate on to the end of the current checkpoint interval, whose compressed bytes the
    /// first request already covers, and through the piece crossing that end (see
    /// [`SpanReader::read_at`]), handing the bytes to `passed` (so that the other files in
    /// it can be kept). The cursor stays usable; after an error it is dropped.
    pub fn finish_interval(
        &mut self,
        index: &IndexFile,
        neighbours: &Neighbours,
        passed: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<(), ReadError> {
        let Some(Cursor::Gzip(inner)) = &mut self.cursor else {
            return Ok(());
        };
        let pos = inner.position();
        let limit = match index.checkpoint_index_before(self.layer, pos)? {
            Some(k) => index
                .interval_range(self.layer, k)?
                .map_or(pos, |(_, end)| end),
            None => pos,
        };
        let limit = neighbours.crossing_end(self.layer, limit).unwrap_or(limit);
        let gap = limit.saturating_sub(pos);
        if gap == 0 || gap > MAX_KEPT_GAP {
            return Ok(());
        }
        let bytes = inflate_exact(inner, gap as usize, self.layer);
        let bytes = self.discard_on_error(bytes)?;
        self.inflated += gap;
        passed(pos, &bytes);
        Ok(())
    }
}

/// Exactly `n` more bytes from `inner`.
fn inflate_exact(
    inner: &mut ResumeCursor<Counted>,
    n: usize,
    layer: u32,
) -> Result<Vec<u8>, ReadError> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        let k = inner
            .fill(&mut buf[got..])
            .map_err(|e| ReadError::Origin(e.to_string()))?;
        if k == 0 {
            return Err(ReadError::Origin(format!(
                "layer {layer} ends before offset {}",
                inner.position() + (n - got) as u64
            )));
        }
        got += k;
    }
    Ok(buf)
}

impl Drop for SpanReader {
    fn drop(&mut self) {
        self.park_cursor();
    }
}
