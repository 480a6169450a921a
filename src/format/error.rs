//! Errors of the format layer: everything that can be wrong with index bytes.

/// What is wrong with an index file. Messages name the field and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file is shorter than what it describes.
    #[error("index is truncated: the {what} needs {need} bytes but the file has {have}; rebuild it with clip-build")]
    Truncated {
        /// Which part is cut.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// Not an index file at all.
    #[error("not a clip index (magic is {0:02x?}, expected \"CLIPIDX\\0\")")]
    BadMagic([u8; 8]),
    /// Written by an incompatible format version.
    #[error("index format version {found_major}.{found_minor} is not supported: this clip reads version 2.x; rebuild the index with this clip-build or use a matching clip")]
    UnsupportedVersion {
        /// Major version found.
        found_major: u16,
        /// Minor version found.
        found_minor: u16,
    },
    /// Uses features this reader does not know.
    #[error("index uses unknown feature flags {0:#x}; use a newer clip")]
    UnknownFlags(u32),
    /// A header field has an invalid value.
    #[error("index header field {field} has invalid value {value}")]
    BadField {
        /// Field name.
        field: &'static str,
        /// Value found.
        value: u64,
    },
    /// The payload checksum does not match.
    #[error("index is corrupt: payload checksum {found:016x} does not match the header's {expected:016x}; rebuild it with clip-build")]
    Checksum {
        /// From the header.
        expected: u64,
        /// Computed.
        found: u64,
    },
    /// Full structural validation failed.
    #[error("index is corrupt: {0}")]
    Invalid(String),
    /// I/O error while opening or writing.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A checkpoint's window is outside the window area or does not match its checksum.
    #[error("index is corrupt: the window of checkpoint {checkpoint} of layer {layer} {problem}; rebuild it with clip-build")]
    Window {
        /// Layer index.
        layer: u32,
        /// Checkpoint index within the layer.
        checkpoint: usize,
        /// What is wrong.
        problem: &'static str,
    },
    /// The startup profile area after the window area is cut short, too large or damaged.
    #[error("index is corrupt: its startup profile area is damaged: {0}; embed the profile again with `clip-build embed-profile` or remove it with `clip-build embed-profile --remove`")]
    Startup(String),
    /// The index would exceed the 2 GiB limit of 32-bit relative pointers.
    #[error("index would be {0} bytes, over the 2 GiB payload limit of the index format")]
    TooLarge(u64),
}
