//! Rebuilding pieces from the origin for a tier that took note of where they lie instead
//! of holding their bytes ([`super::Tier::put_later`]). A disk cache writing behind the
//! reads of a local layout does that for large pieces: holding a cold `cat`'s 35 MB until
//! the writer runs made every piece land in fresh memory (one page fault per 4 KiB, about
//! a tenth of that read's time), while inflating them again once the reads pause costs
//! nothing the reads wait for.

use super::file::{verify, PieceAt};
use super::span::SpanReader;
use crate::format::IndexFile;
use crate::source::Source;
use bytes::Bytes;
use std::sync::Arc;

/// Rebuilds pieces from where they lie in the image.
pub trait Rebuild: Send + Sync {
    /// Read `pieces` (sorted by [`PieceAt`]) from the origin and hand each one whose bytes
    /// match its sha256 to `out`; the others are skipped (a tier only loses a copy).
    fn rebuild(&self, pieces: &[([u8; 32], PieceAt)], out: &mut dyn FnMut(&[u8; 32], Bytes));
}

/// [`Rebuild`] from an index's image source, one inflate cursor per layer, so that the
/// pieces of a file read in order continue one cursor.
pub struct OriginRebuild {
    index: Arc<IndexFile>,
    source: Arc<dyn Source>,
}

impl OriginRebuild {
    /// Rebuild from `source`, which holds the image `index` was built from.
    pub fn new(index: Arc<IndexFile>, source: Arc<dyn Source>) -> OriginRebuild {
        OriginRebuild { index, source }
    }
}

/// Pieces larger than this are not rebuilt (a crafted index could claim any size).
const MAX_PIECE: u64 = 64 << 20;

impl Rebuild for OriginRebuild {
    fn rebuild(&self, pieces: &[([u8; 32], PieceAt)], out: &mut dyn FnMut(&[u8; 32], Bytes)) {
        let mut span: Option<SpanReader> = None;
        for (key, at) in pieces {
            if at.len > MAX_PIECE {
                continue;
            }
            let reader = match &mut span {
                Some(s) if s.layer() == at.layer => s,
                _ => span.insert(SpanReader::new(at.layer)),
            };
            let mut buf = vec![0u8; at.len as usize];
            let read = reader.read_at(
                &self.index,
                self.source.as_ref(),
                at.offset,
                &mut buf,
                None,
                &mut |_, _| {},
            );
            match read {
                Ok(()) if verify(&buf, key) => out(key, Bytes::from(buf)),
                Ok(()) => {
                    tracing::debug!(
                        layer = at.layer,
                        offset = at.offset,
                        "rebuilt piece does not verify; not caching it"
                    );
                    reader.discard();
                }
                Err(e) => {
                    tracing::debug!(error = %e, layer = at.layer, offset = at.offset, "cannot rebuild a piece; not caching it")
                }
            }
        }
    }
}
