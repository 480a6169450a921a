//! The index format: on-disk types, header, writer, reader and validation. No network,
//! cache or FUSE knowledge lives here.
//!
//! An index file is a 64-byte [`header::Header`] followed by an rkyv archive of
//! [`types::Index`] (little-endian, 8-byte aligned, 32-bit relative pointers). Opening maps
//! the file, checks the header and the payload's XXH3 checksum, and then reads archived
//! values in place. Entry 0 is the root; the children of every directory are contiguous
//! and sorted, so `lookup` is a binary search and `readdir` a slice. A file's bytes are at
//! `(layer, data_offset, size)` in the layer's uncompressed tar stream; gzip layers carry
//! checkpoints from which inflation resumes. `format-spec/` documents every byte.

pub mod error;
pub mod header;
#[cfg(test)]
mod layout_test;
pub mod read;
pub mod startup;
pub mod types;
mod verify;
pub mod write;

pub use error::FormatError;
pub use read::{IndexFile, Piece};
pub use types::{
    Checkpoint, Compression, Entry, Image, Index, Kind, Layer, Xattr, CHUNK_SIZE, NONE,
};
