//! Serializing an [`Index`] into index file bytes, and writing them atomically.

use super::error::FormatError;
use super::header::{Header, HEADER_SIZE, MAGIC, VERSION_MAJOR, VERSION_MINOR};
use super::startup;
use super::types::Index;
use std::io::Write;
use std::path::Path;

/// The complete file bytes for `index`: header, rkyv payload, `windows` (the window area
/// that the checkpoints' `window_offset`s point into), then the startup profile area when
/// `startup_profile` holds a profile's text.
pub fn to_bytes(
    index: &Index,
    windows: &[u8],
    startup_profile: Option<&[u8]>,
) -> Result<Vec<u8>, FormatError> {
    let payload = rkyv::to_bytes::<rkyv::rancor::Error>(index)
        .map_err(|e| FormatError::Invalid(format!("serialization failed: {e}")))?;
    if payload.len() as u64 > i32::MAX as u64 {
        return Err(FormatError::TooLarge(payload.len() as u64));
    }
    let header = Header {
        magic: MAGIC,
        version_major: VERSION_MAJOR,
        version_minor: 0,
        flags: 0,
        payload_offset: HEADER_SIZE as u64,
        payload_len: payload.len() as u64,
        payload_xxh3: xxhash_rust::xxh3::xxh3_64(&payload),
        entry_count: index.entries.len() as u32,
        layer_count: index.layers.len() as u32,
        windows_len: windows.len() as u64,
        reserved: [0; 8],
    };
    let mut out = Vec::with_capacity(HEADER_SIZE + payload.len() + windows.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(windows);
    Ok(with_startup_profile(out, startup_profile))
}

/// `core` (an index file's header, payload and window area, as
/// `IndexFile::core_bytes` gives them) with the startup profile area holding
/// `startup_profile` appended, or with none; the header's minor version says which
/// (payload and windows, and so their checksums, are unchanged).
pub fn with_startup_profile(mut core: Vec<u8>, startup_profile: Option<&[u8]>) -> Vec<u8> {
    let minor = if startup_profile.is_some() {
        VERSION_MINOR
    } else {
        0
    };
    // The header's version_minor is the u16 at bytes 10..12 (little-endian).
    if let Some(field) = core.get_mut(10..12) {
        field.copy_from_slice(&minor.to_le_bytes());
    }
    if let Some(text) = startup_profile {
        core.extend_from_slice(&startup::encode(text));
    }
    core
}

/// Write `bytes` to `path` atomically (temporary file in the same directory, synced, then
/// renamed over `path`): a reader sees the old file or the new one, never a mix.
pub fn write_bytes(bytes: &[u8], path: &Path) -> Result<(), FormatError> {
    let io = |source| FormatError::Io {
        path: path.display().to_string(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}
