//! Keeping what inflation passes by. A cold read resumes at a checkpoint up to one interval
//! before the wanted bytes; the pieces of other files lying entirely in that skipped span
//! are verified and stored in the cache tiers, so that reading them next costs nothing.

use super::file::{verify, Tier};
use crate::format::{IndexFile, Kind};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// A piece's place in its layer's uncompressed stream.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Located {
    /// Offset in the layer's uncompressed stream.
    pub(crate) offset: u64,
    /// Length in bytes.
    pub(crate) len: u64,
    /// sha256 of the piece.
    pub(crate) sha256: [u8; 32],
}

/// Per-layer maps from uncompressed offset to content pieces, built on first use and
/// shared by every reader of one index.
pub struct Neighbours {
    layers: Vec<OnceLock<Vec<Located>>>,
    /// Layers whose map a background thread was started for.
    started: Vec<AtomicBool>,
}

impl Neighbours {
    /// Maps for an index with `layer_count` layers.
    pub fn new(layer_count: usize) -> Arc<Neighbours> {
        Arc::new(Neighbours {
            layers: (0..layer_count).map(|_| OnceLock::new()).collect(),
            started: (0..layer_count).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    /// Start building `layer`'s map on a thread of its own, once, unless it exists: it
    /// walks every entry of the index (2.3 ms for 25 873 entries), which read-ahead jobs
    /// would otherwise do when their first interval is inflated.
    pub fn build_in_background(self: &Arc<Self>, index: &Arc<IndexFile>, layer: u32) {
        let (Some(slot), Some(started)) = (
            self.layers.get(layer as usize),
            self.started.get(layer as usize),
        ) else {
            return;
        };
        if slot.get().is_some() || started.swap(true, Ordering::Relaxed) {
            return;
        }
        let (me, index) = (self.clone(), index.clone());
        let spawned = std::thread::Builder::new()
            .name("clip-neighbours".into())
            .spawn(move || me.build(&index, layer));
        if spawned.is_err() {
            // The first job builds it, as without this.
            started.store(false, Ordering::Relaxed);
        }
    }

    /// Every piece of `layer`, sorted by offset (empty for a layer the index lacks).
    pub(crate) fn located(&self, index: &IndexFile, layer: u32) -> &[Located] {
        self.layer_map(index, layer).unwrap_or(&[])
    }

    /// Build `layer`'s map now (the first [`Neighbours::keep`] in it does otherwise).
    pub fn build(&self, index: &IndexFile, layer: u32) {
        self.layer_map(index, layer);
    }

    /// The end of the piece of `layer` that crosses uncompressed offset `boundary` (starts
    /// before it and ends after it), if one does. `None` as well while the layer's map is
    /// not built: building it walks every entry of the index, which a cold read waiting
    /// for its bytes should not do (keeping the pieces it passed builds it, after the
    /// reply).
    pub fn crossing_end(&self, layer: u32, boundary: u64) -> Option<u64> {
        let map = self.layers.get(layer as usize)?.get()?;
        let i = map
            .partition_point(|l| l.offset < boundary)
            .checked_sub(1)?;
        let end = map[i].offset + map[i].len;
        (end > boundary).then_some(end)
    }

    fn layer_map(&self, index: &IndexFile, layer: u32) -> Option<&[Located]> {
        let slot = self.layers.get(layer as usize)?;
        Some(slot.get_or_init(|| {
            let mut v = Vec::new();
            for i in 0..index.entry_count() {
                let Ok(e) = index.entry(i) else { continue };
                if e.kind != Kind::File as u8 || e.layer.to_native() != layer {
                    continue;
                }
                let base = e.data_offset.to_native();
                for p in index.pieces(i).unwrap_or_default() {
                    v.push(Located {
                        offset: base + p.offset,
                        len: p.len,
                        sha256: p.sha256,
                    });
                }
            }
            v.sort_by_key(|l| l.offset);
            v
        }))
    }

    /// `bytes` are layer `layer`'s uncompressed stream from `offset` on: store every piece
    /// that lies entirely inside them (and hashes right) in `tiers`. Returns the number of
    /// pieces kept and their bytes.
    pub fn keep(
        &self,
        index: &IndexFile,
        layer: u32,
        offset: u64,
        bytes: &[u8],
        tiers: &[Arc<dyn Tier>],
    ) -> (u64, u64) {
        let mut kept = (0, 0);
        if tiers.is_empty() {
            return kept;
        }
        let Some(map) = self.layer_map(index, layer) else {
            return kept;
        };
        let end = offset + bytes.len() as u64;
        let first = map.partition_point(|l| l.offset < offset);
        for l in &map[first..] {
            if l.offset + l.len > end {
                break;
            }
            let data = &bytes[(l.offset - offset) as usize..(l.offset - offset + l.len) as usize];
            if verify(data, &l.sha256) {
                let data = Bytes::copy_from_slice(data);
                for t in tiers {
                    t.put(&l.sha256, &data);
                }
                kept.0 += 1;
                kept.1 += l.len;
            }
        }
        kept
    }
}
