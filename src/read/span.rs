//! Reading a span of a layer's uncompressed tar stream from a [`Source`].

use super::ReadError;
use crate::format::{Compression, IndexFile};
use crate::source::Source;
use crate::zran::decode_window;
use crate::zran::resume::{ResumeCursor, ResumePoint};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Reads uncompressed spans of one layer, resuming at checkpoints. Sequential reads reuse
/// the same inflate cursor; a read behind it or far ahead starts again at a checkpoint.
pub struct SpanReader {
    layer: u32,
    cursor: Option<Cursor>,
    /// Uncompressed bytes inflated (including skipped ones), for statistics.
    pub inflated: u64,
    received: Arc<AtomicU64>,
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

impl SpanReader {
    /// A reader for `layer`.
    pub fn new(layer: u32) -> SpanReader {
        SpanReader {
            layer,
            cursor: None,
            inflated: 0,
            received: Arc::default(),
        }
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
        self.received.load(Ordering::Relaxed)
    }

    /// Read exactly `out.len()` bytes at uncompressed offset `start`. Bytes inflated on the
    /// way to `start` are handed to `skipped` with their offset.
    pub fn read_at(
        &mut self,
        index: &IndexFile,
        source: &dyn Source,
        start: u64,
        out: &mut [u8],
        skipped: &mut dyn FnMut(u64, Vec<u8>),
    ) -> Result<(), ReadError> {
        let end = start + out.len() as u64;
        let reuse = self
            .cursor
            .as_ref()
            .is_some_and(|c| c.position() <= start && start - c.position() <= CONTINUE_WITHIN);
        if !reuse {
            self.cursor = Some(self.open(index, source, start, end)?);
        }
        let cursor = self.cursor.as_mut().expect("set above");
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

    fn open(
        &mut self,
        index: &IndexFile,
        source: &dyn Source,
        start: u64,
        end: u64,
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
            return Ok(Cursor::Plain { inner, pos: start });
        }
        let (k, _, c_end) = index
            .compressed_span(self.layer, start, end)?
            .ok_or_else(|| {
                ReadError::Origin(format!(
                    "layer {} has no checkpoint before offset {start}",
                    self.layer
                ))
            })?;
        let cp = &layer.checkpoints[k];
        let window = decode_window(
            index.stored_window(self.layer, k)?,
            cp.window_encoding,
            cp.window_len.to_native() as usize,
        )
        .map_err(|e| ReadError::Origin(e.to_string()))?;
        let point = ResumePoint {
            in_offset: cp.in_offset.to_native(),
            bits: cp.bits,
            out_offset: cp.out_offset.to_native(),
            window,
        };
        let src = Counted {
            inner: source.blob_from(digest, point.read_from(), c_end, size)?,
            count,
        };
        let inner = ResumeCursor::new(src, &point).map_err(|e| ReadError::Origin(e.to_string()))?;
        Ok(Cursor::Gzip(inner))
    }

    /// Inflate on to the end of the current checkpoint interval, whose compressed bytes the
    /// first request already covers, handing the bytes to `passed` (so that the other
    /// files in it can be kept). The cursor stays usable.
    pub fn finish_interval(
        &mut self,
        index: &IndexFile,
        passed: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<(), ReadError> {
        if let Some(Cursor::Gzip(inner)) = &mut self.cursor {
            let pos = inner.position();
            let here = index.checkpoint_index_before(self.layer, pos)?;
            let limit = match here {
                Some(k) => index
                    .interval_range(self.layer, k)?
                    .map_or(pos, |(_, end)| end),
                None => pos,
            };
            let gap = limit.saturating_sub(pos);
            if gap > 0 && gap <= MAX_KEPT_GAP {
                let bytes = inflate_exact(inner, gap as usize, self.layer)?;
                self.inflated += gap;
                passed(pos, &bytes);
            }
        }
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
