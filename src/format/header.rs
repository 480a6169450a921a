//! The fixed 64-byte file header that precedes the rkyv payload and the window area.

use super::error::FormatError;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// File magic: the first 8 bytes of every index.
pub const MAGIC: [u8; 8] = *b"CLIPIDX\0";
/// The format major version this code reads and writes. A reader refuses other majors.
pub const VERSION_MAJOR: u16 = 2;
/// The newest format minor version this code writes: 1 marks a file with a startup profile
/// area (`super::startup`); a file without one is written as 2.0, byte for byte what a
/// 2.0 writer made. Readers accept any minor of their major.
pub const VERSION_MINOR: u16 = 1;
/// Size of the header in bytes; the payload starts right after it.
pub const HEADER_SIZE: usize = 64;
/// Flag bits this version defines (none). A reader refuses files with other bits set.
pub const KNOWN_FLAGS: u32 = 0;

/// File header, 64 bytes, all integers little-endian.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `CLIPIDX\0` |
/// | 8 | 2 | version_major |
/// | 10 | 2 | version_minor |
/// | 12 | 4 | flags |
/// | 16 | 8 | payload_offset (64) |
/// | 24 | 8 | payload_len |
/// | 32 | 8 | payload_xxh3 (XXH3-64, seed 0, of the payload) |
/// | 40 | 4 | entry_count |
/// | 44 | 4 | layer_count |
/// | 48 | 8 | windows_len (the window area follows the payload) |
/// | 56 | 8 | reserved, zero |
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Header {
    /// `MAGIC`.
    pub magic: [u8; 8],
    /// Format major version.
    pub version_major: u16,
    /// Format minor version.
    pub version_minor: u16,
    /// Feature flags; must be a subset of `KNOWN_FLAGS`.
    pub flags: u32,
    /// Offset of the payload from the start of the file.
    pub payload_offset: u64,
    /// Length of the payload in bytes.
    pub payload_len: u64,
    /// XXH3-64 (seed 0) of the payload bytes.
    pub payload_xxh3: u64,
    /// Number of entries (must equal the archived entry table's length).
    pub entry_count: u32,
    /// Number of layers (must equal the archived layer table's length).
    pub layer_count: u32,
    /// Length of the window area, which starts right after the payload. It holds the
    /// checkpoint windows and is not covered by `payload_xxh3` (each window has its own).
    pub windows_len: u64,
    /// Reserved, zero.
    pub reserved: [u8; 8],
}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_SIZE);

impl Header {
    /// Parse and validate the header at the start of `file`, checking that the payload and
    /// the window area it describes lie inside `file`. Does not checksum the payload.
    pub fn parse(file: &[u8]) -> Result<Header, FormatError> {
        if file.len() < HEADER_SIZE {
            return Err(FormatError::Truncated {
                what: "header",
                need: HEADER_SIZE as u64,
                have: file.len() as u64,
            });
        }
        let h = Header::read_from_bytes(&file[..HEADER_SIZE]).expect("header slice has exact size");
        if h.magic != MAGIC {
            return Err(FormatError::BadMagic(h.magic));
        }
        if u16::from_le(h.version_major) != VERSION_MAJOR {
            return Err(FormatError::UnsupportedVersion {
                found_major: u16::from_le(h.version_major),
                found_minor: u16::from_le(h.version_minor),
            });
        }
        let h = h.to_native();
        if h.flags & !KNOWN_FLAGS != 0 {
            return Err(FormatError::UnknownFlags(h.flags));
        }
        if h.payload_offset != HEADER_SIZE as u64 {
            return Err(FormatError::BadField {
                field: "payload_offset",
                value: h.payload_offset,
            });
        }
        if h.reserved != [0; 8] {
            return Err(FormatError::BadField {
                field: "reserved",
                value: 0,
            });
        }
        let end = h.payload_offset.checked_add(h.payload_len);
        match end {
            Some(end) if end <= file.len() as u64 => {}
            _ => {
                return Err(FormatError::Truncated {
                    what: "payload",
                    need: h.payload_offset.saturating_add(h.payload_len),
                    have: file.len() as u64,
                })
            }
        }
        if h.payload_len > i32::MAX as u64 {
            return Err(FormatError::BadField {
                field: "payload_len",
                value: h.payload_len,
            });
        }
        let windows_end = (h.payload_offset + h.payload_len).checked_add(h.windows_len);
        if windows_end.is_none_or(|end| end > file.len() as u64) {
            return Err(FormatError::Truncated {
                what: "window area",
                need: (h.payload_offset + h.payload_len).saturating_add(h.windows_len),
                have: file.len() as u64,
            });
        }
        Ok(h)
    }

    /// This header with every integer converted between little-endian and native order.
    fn to_native(self) -> Header {
        Header {
            magic: self.magic,
            version_major: u16::from_le(self.version_major),
            version_minor: u16::from_le(self.version_minor),
            flags: u32::from_le(self.flags),
            payload_offset: u64::from_le(self.payload_offset),
            payload_len: u64::from_le(self.payload_len),
            payload_xxh3: u64::from_le(self.payload_xxh3),
            entry_count: u32::from_le(self.entry_count),
            layer_count: u32::from_le(self.layer_count),
            windows_len: u64::from_le(self.windows_len),
            reserved: self.reserved,
        }
    }

    /// The header's 64 bytes as written to disk (little-endian).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let le = self.to_native(); // the conversion is its own inverse
        let mut out = [0u8; HEADER_SIZE];
        out.copy_from_slice(le.as_bytes());
        out
    }
}
