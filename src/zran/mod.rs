//! zran-style random access into gzip streams. `scan` inflates a whole blob once and reports
//! every deflate block boundary (where a checkpoint can be taken); `resume` restarts
//! inflation at a recorded checkpoint from its 32 KiB window and bit offset.

mod input;
pub mod resume;
pub mod scan;

pub use crate::raw::zlib::{ZlibError, WINDOW_SIZE};
pub use input::GzipError;

/// A deflate block boundary seen while scanning: inflation can resume here given the
/// 32 KiB of output before `out_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Boundary {
    /// Compressed bytes consumed up to this point.
    pub in_offset: u64,
    /// Unused bits in the byte at `in_offset - 1` (0..=7).
    pub bits: u8,
    /// Uncompressed bytes produced up to this point.
    pub out_offset: u64,
}

/// Compress a checkpoint window with raw deflate when that saves space: (bytes, encoding).
pub fn encode_window(window: &[u8]) -> (Vec<u8>, u8) {
    use std::io::Write;
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    if enc.write_all(window).is_ok() {
        if let Ok(c) = enc.finish() {
            if c.len() < window.len() {
                return (c, 1);
            }
        }
    }
    (window.to_vec(), 0)
}

/// Decode a stored checkpoint window (see [`encode_window`]).
pub fn decode_window(stored: &[u8], encoding: u8, len: usize) -> Result<Vec<u8>, ZlibError> {
    match encoding {
        0 if stored.len() == len => Ok(stored.to_vec()),
        1 => {
            use std::io::Read;
            let mut out = Vec::with_capacity(len);
            flate2::read::DeflateDecoder::new(stored)
                .take(WINDOW_SIZE as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| ZlibError(format!("checkpoint window does not inflate: {e}")))?;
            if out.len() != len {
                return Err(ZlibError(format!(
                    "checkpoint window is {} bytes, expected {len}",
                    out.len()
                )));
            }
            Ok(out)
        }
        _ => Err(ZlibError(format!(
            "checkpoint window encoding {encoding} with {} bytes is invalid",
            stored.len()
        ))),
    }
}
