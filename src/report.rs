//! Human and machine-readable views of an index (`inspect`, `ls`, `stat`). The text forms
//! are also what `tools/clipread.py` prints, so the two readers can be compared line by line.

use crate::format::{Compression, FormatError, IndexFile, Kind};
use serde_json::json;

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn kind_of(idx: &IndexFile, i: u32) -> Result<Kind, FormatError> {
    let e = idx.entry(i)?;
    Kind::from_u8(e.kind)
        .ok_or_else(|| FormatError::Invalid(format!("entry {i} has unknown kind {}", e.kind)))
}

/// Counts and sizes for `inspect`.
pub fn inspect_json(idx: &IndexFile) -> Result<serde_json::Value, FormatError> {
    let ix = idx.index();
    let mut kinds = std::collections::BTreeMap::<&str, u64>::new();
    let mut file_bytes = 0u64;
    for i in 0..idx.entry_count() {
        let k = kind_of(idx, i)?;
        *kinds.entry(k.name()).or_default() += 1;
        if k == Kind::File {
            file_bytes += idx.entry(i)?.size.to_native();
        }
    }
    let layers: Vec<_> = ix
        .layers
        .iter()
        .map(|l| {
            json!({
                "digest": s(l.digest.as_slice()),
                "diff_id": s(l.diff_id.as_slice()),
                "media_type": s(l.media_type.as_slice()),
                "compression": if l.compression == Compression::Gzip as u8 { "gzip" } else { "none" },
                "compressed_size": l.compressed_size.to_native(),
                "uncompressed_size": l.uncompressed_size.to_native(),
                "checkpoints": l.checkpoints.len(),
                "window_bytes": l.checkpoints.iter().map(|c| c.window_stored_len.to_native() as u64).sum::<u64>(),
            })
        })
        .collect();
    let h = idx.header();
    let mut j = json!({
        "format_version": format!("{}.{}", h.version_major, h.version_minor),
        "index_size": idx.file_size(),
        "reference": s(ix.image.reference.as_slice()),
        "source": s(ix.image.source.as_slice()),
        "manifest_digest": s(ix.image.manifest_digest.as_slice()),
        "config_digest": s(ix.image.config_digest.as_slice()),
        "platform": s(ix.image.platform.as_slice()),
        "created": ix.image.created.to_native(),
        "layers": layers,
        "entries": idx.entry_count(),
        "entries_by_kind": kinds,
        "file_bytes": file_bytes,
        "chunk_hashes": ix.chunk_hashes.len(),
        "xattrs": ix.xattrs.len(),
    });
    if let Some(text) = idx.startup_profile()? {
        j["startup_profile"] = json!({
            "bytes": text.len(),
            "intervals": profile_intervals(text),
        });
    }
    Ok(j)
}

/// The intervals a startup profile's text lists: its lines that start with a digit (the
/// others are its version, `manifest` and `layout` lines).
fn profile_intervals(text: &[u8]) -> usize {
    text.split(|&b| b == b'\n')
        .filter(|l| l.first().is_some_and(u8::is_ascii_digit))
        .count()
}

fn mb(n: u64) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}

/// The text form of `inspect`.
pub fn inspect_text(idx: &IndexFile) -> Result<String, FormatError> {
    let j = inspect_json(idx)?;
    let mut out = String::new();
    let g = |k: &str| j[k].as_str().unwrap_or("").to_string();
    out += &format!("format:      {}\n", g("format_version"));
    out += &format!("index size:  {} bytes\n", j["index_size"]);
    out += &format!("reference:   {}\n", g("reference"));
    out += &format!("source:      {}\n", g("source"));
    out += &format!("manifest:    {}\n", g("manifest_digest"));
    out += &format!("platform:    {}\n", g("platform"));
    let layers = j["layers"].as_array().cloned().unwrap_or_default();
    out += &format!("layers:      {}\n", layers.len());
    for (i, l) in layers.iter().enumerate() {
        out += &format!(
            "  {i}: {} {} {} -> {}, {} checkpoints\n",
            l["digest"].as_str().unwrap_or(""),
            l["compression"].as_str().unwrap_or(""),
            mb(l["compressed_size"].as_u64().unwrap_or(0)),
            mb(l["uncompressed_size"].as_u64().unwrap_or(0)),
            l["checkpoints"]
        );
    }
    let kinds: Vec<String> = j["entries_by_kind"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} {v}")).collect())
        .unwrap_or_default();
    out += &format!("entries:     {} ({})\n", j["entries"], kinds.join(", "));
    out += &format!(
        "file bytes:  {}\n",
        mb(j["file_bytes"].as_u64().unwrap_or(0))
    );
    out += &format!("chunk hashes: {}\n", j["chunk_hashes"]);
    if let Some(p) = j.get("startup_profile") {
        out += &format!(
            "startup profile: {} intervals ({} bytes)\n",
            p["intervals"], p["bytes"]
        );
    }
    Ok(out)
}

/// One `ls` line: kind, mode, owner, size, mtime, nlink, path, and the link target.
pub fn ls_line(idx: &IndexFile, i: u32) -> Result<String, FormatError> {
    let e = idx.entry(i)?;
    let kind = kind_of(idx, i)?;
    let path = s(&idx.path_of(i)?);
    let mut line = format!(
        "{:<8} {:04o} {}:{} {:>10} {}.{:09} {:>3} {}",
        kind.name(),
        e.mode.to_native(),
        e.uid.to_native(),
        e.gid.to_native(),
        e.size.to_native(),
        e.mtime.to_native(),
        e.mtime_nsec.to_native(),
        e.nlink.to_native(),
        path
    );
    match kind {
        Kind::Symlink => line += &format!(" -> {}", s(e.link_target.as_slice())),
        Kind::Hardlink => line += &format!(" => {}", s(&idx.path_of(e.hardlink_to.to_native())?)),
        Kind::CharDevice | Kind::BlockDevice => {
            line += &format!(
                " [{},{}]",
                e.rdev_major.to_native(),
                e.rdev_minor.to_native()
            )
        }
        _ => {}
    }
    Ok(line)
}

/// `ls` lines for `start` and, for a directory, its children (all descendants with
/// `recursive`), depth-first in name order.
pub fn ls(idx: &IndexFile, start: u32, recursive: bool) -> Result<Vec<String>, FormatError> {
    let mut out = vec![ls_line(idx, start)?];
    // An explicit stack of child ranges still to list: a deep tree (or a crafted one)
    // cannot overflow the call stack.
    let mut stack = vec![idx.children(start)?];
    while let Some(range) = stack.last_mut() {
        let Some(c) = range.next() else {
            stack.pop();
            continue;
        };
        out.push(ls_line(idx, c)?);
        if recursive && idx.entry(c)?.kind == Kind::Dir as u8 {
            stack.push(idx.children(c)?);
        }
    }
    Ok(out)
}

/// Every field of entry `i`, one `key: value` per line.
pub fn stat(idx: &IndexFile, i: u32) -> Result<String, FormatError> {
    let e = idx.entry(i)?;
    let kind = kind_of(idx, i)?;
    let mut out = String::new();
    out += &format!("path: {}\n", s(&idx.path_of(i)?));
    out += &format!("index: {i}\n");
    out += &format!("kind: {}\n", kind.name());
    out += &format!("mode: {:04o}\n", e.mode.to_native());
    out += &format!("uid: {}\ngid: {}\n", e.uid.to_native(), e.gid.to_native());
    out += &format!("size: {}\n", e.size.to_native());
    out += &format!(
        "mtime: {}.{:09}\n",
        e.mtime.to_native(),
        e.mtime_nsec.to_native()
    );
    out += &format!("nlink: {}\n", e.nlink.to_native());
    match kind {
        Kind::Dir => out += &format!("children: {}\n", e.child_count.to_native()),
        Kind::Symlink => out += &format!("target: {}\n", s(e.link_target.as_slice())),
        Kind::Hardlink => {
            out += &format!(
                "hardlink_to: {}\n",
                s(&idx.path_of(e.hardlink_to.to_native())?)
            )
        }
        Kind::CharDevice | Kind::BlockDevice => {
            out += &format!(
                "rdev: {},{}\n",
                e.rdev_major.to_native(),
                e.rdev_minor.to_native()
            )
        }
        Kind::File => {
            out += &format!("sha256: {}\n", hex::encode(e.sha256));
            if e.size.to_native() > 0 {
                out += &format!(
                    "layer: {}\ndata_offset: {}\n",
                    e.layer.to_native(),
                    e.data_offset.to_native()
                );
            }
            let pieces = idx.pieces(i)?;
            if pieces.len() > 1 {
                out += &format!("chunks: {}\n", pieces.len());
            }
        }
        Kind::Fifo => {}
    }
    for x in idx.xattrs(i)? {
        out += &format!(
            "xattr: {}={}\n",
            s(x.name.as_slice()),
            hex::encode(x.value.as_slice())
        );
    }
    Ok(out)
}
