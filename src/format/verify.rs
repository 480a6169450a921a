//! Semantic invariants of an archived index, checked by `IndexFile::verify` after rkyv's
//! structural check.

use super::error::FormatError;
use super::types::{ArchivedIndex, Kind, CHUNK_SIZE, NONE};

fn bad(msg: String) -> FormatError {
    FormatError::Invalid(msg)
}

/// Check the tree: root, parents, child ranges and their order, kinds, hardlinks, and every
/// reference into the layer, chunk and xattr tables.
pub(crate) fn check_tree(idx: &ArchivedIndex) -> Result<(), FormatError> {
    let entries = &idx.entries;
    let n = entries.len() as u64;
    if n == 0 {
        return Err(bad("entry table is empty".into()));
    }
    if idx.chunk_size.to_native() as u64 != CHUNK_SIZE {
        return Err(bad(format!(
            "chunk_size is {}, this version uses {CHUNK_SIZE}",
            idx.chunk_size
        )));
    }
    let root = &entries[0];
    if root.kind != Kind::Dir as u8 || root.parent.to_native() != 0 || !root.name.is_empty() {
        return Err(bad("entry 0 is not a root directory".into()));
    }
    for (li, layer) in idx.layers.iter().enumerate() {
        let mut prev = None;
        for cp in layer.checkpoints.iter() {
            let out = cp.out_offset.to_native();
            if prev.is_some_and(|p| p >= out) {
                return Err(bad(format!("checkpoints of layer {li} are not sorted")));
            }
            prev = Some(out);
            if cp.bits > 7 || cp.window_encoding > 1 || cp.window_len.to_native() > 32768 {
                return Err(bad(format!(
                    "checkpoint at {out} of layer {li} has invalid fields"
                )));
            }
            if cp.in_offset.to_native() > layer.compressed_size.to_native() {
                return Err(bad(format!(
                    "checkpoint at {out} of layer {li} is past the blob end"
                )));
            }
        }
    }
    for (i, e) in entries.iter().enumerate() {
        let kind = Kind::from_u8(e.kind)
            .ok_or_else(|| bad(format!("entry {i} has unknown kind {}", e.kind)))?;
        if i > 0 {
            let p = e.parent.to_native() as u64;
            if p >= n || entries[p as usize].kind != Kind::Dir as u8 {
                return Err(bad(format!("entry {i} has invalid parent {p}")));
            }
            let pe = &entries[p as usize];
            let (f, c) = (
                pe.first_child.to_native() as u64,
                pe.child_count.to_native() as u64,
            );
            if (i as u64) < f || (i as u64) >= f + c {
                return Err(bad(format!(
                    "entry {i} is not inside its parent's child range"
                )));
            }
            if e.name.is_empty()
                || e.name.contains(&b'/')
                || e.name.as_slice() == b"."
                || e.name.as_slice() == b".."
            {
                return Err(bad(format!("entry {i} has an invalid name")));
            }
        }
        if kind == Kind::Dir {
            let (f, c) = (
                e.first_child.to_native() as u64,
                e.child_count.to_native() as u64,
            );
            if c > 0 && (f <= i as u64 || f + c > n) {
                return Err(bad(format!("children of entry {i} are out of range")));
            }
            let kids = if c == 0 {
                &entries[..0]
            } else {
                &entries[f as usize..(f + c) as usize]
            };
            for w in kids.windows(2) {
                if w[0].name.as_slice() >= w[1].name.as_slice() {
                    return Err(bad(format!(
                        "children of entry {i} are not sorted and unique"
                    )));
                }
            }
            for k in kids {
                if k.parent.to_native() as usize != i {
                    return Err(bad(format!("a child of entry {i} names another parent")));
                }
            }
        }
        if kind == Kind::Hardlink {
            let t = e.hardlink_to.to_native() as u64;
            if t >= n || entries[t as usize].kind != Kind::File as u8 {
                return Err(bad(format!("hardlink {i} points at invalid entry {t}")));
            }
        }
        if kind == Kind::File {
            let size = e.size.to_native();
            let layer = e.layer.to_native();
            if size > 0 {
                let l = idx
                    .layers
                    .get(layer as usize)
                    .ok_or_else(|| bad(format!("entry {i} names missing layer {layer}")))?;
                let end = e.data_offset.to_native().checked_add(size);
                if end.is_none_or(|end| end > l.uncompressed_size.to_native()) {
                    return Err(bad(format!(
                        "content of entry {i} lies outside layer {layer}"
                    )));
                }
            }
            if size > CHUNK_SIZE {
                let first = e.first_chunk.to_native();
                let k = size.div_ceil(CHUNK_SIZE);
                if first == NONE || first as u64 + k > idx.chunk_hashes.len() as u64 {
                    return Err(bad(format!("chunk hashes of entry {i} are out of range")));
                }
            }
        }
        let (xf, xc) = (
            e.first_xattr.to_native() as u64,
            e.xattr_count.to_native() as u64,
        );
        if xc > 0 && xf + xc > idx.xattrs.len() as u64 {
            return Err(bad(format!("xattrs of entry {i} are out of range")));
        }
    }
    Ok(())
}
