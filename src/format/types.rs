//! The archived types of index format version 2. Field order is the on-disk order (rkyv
//! archives structs as `repr(C)`); fields are grouped by alignment so that no padding is
//! needed except where `format-spec/` says so. Strings are byte vectors (`Vec<u8>`) because
//! rkyv's archived `String` has an inline small-string form that is awkward for other readers.

use rkyv::{Archive, Serialize};

/// No index (no parent, no layer, no hardlink target).
pub const NONE: u32 = u32::MAX;

/// Size of the content chunks of large files. A regular file larger than this has one sha256
/// per chunk (the last chunk may be shorter); a file of at most this size is one cache object
/// keyed by its whole-file sha256.
pub const CHUNK_SIZE: u64 = 1024 * 1024;

/// Entry kinds (`Entry::kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Regular file.
    File = 0,
    /// Directory.
    Dir = 1,
    /// Symbolic link.
    Symlink = 2,
    /// Another name for the regular file at `Entry::hardlink_to`.
    Hardlink = 3,
    /// Character device.
    CharDevice = 4,
    /// Block device.
    BlockDevice = 5,
    /// Named pipe.
    Fifo = 6,
}

impl Kind {
    /// Decode a kind byte; `None` for values this version does not define.
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            0 => Kind::File,
            1 => Kind::Dir,
            2 => Kind::Symlink,
            3 => Kind::Hardlink,
            4 => Kind::CharDevice,
            5 => Kind::BlockDevice,
            6 => Kind::Fifo,
            _ => return None,
        })
    }

    /// Short lowercase name, as printed by `clip-build ls`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Hardlink => "hardlink",
            Kind::CharDevice => "char",
            Kind::BlockDevice => "block",
            Kind::Fifo => "fifo",
        }
    }
}

/// Layer compression (`Layer::compression`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Compression {
    /// Plain tar.
    None = 0,
    /// gzip (one or more members).
    Gzip = 1,
}

/// The root object of the archive.
#[derive(Archive, Serialize, Debug, Clone, Default)]
pub struct Index {
    /// Where the image came from.
    pub image: Image,
    /// Layers in application order (lowest first).
    pub layers: Vec<Layer>,
    /// All entries; entry 0 is the root directory. Children of a directory are contiguous
    /// and sorted by name (bytewise).
    pub entries: Vec<Entry>,
    /// Extended attributes, referenced by `Entry::first_xattr`/`xattr_count`.
    pub xattrs: Vec<Xattr>,
    /// sha256 of each chunk of each file larger than `CHUNK_SIZE`, referenced by
    /// `Entry::first_chunk`.
    pub chunk_hashes: Vec<[u8; 32]>,
    /// Chunk size used for `chunk_hashes` (always `CHUNK_SIZE` in version 2).
    pub chunk_size: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Image identity, as resolved at build time.
#[derive(Archive, Serialize, Debug, Clone, Default)]
pub struct Image {
    /// Image creation time from the config (seconds since the epoch, 0 if absent).
    pub created: i64,
    /// The reference the index was built from (`DIR:TAG` or `registry/repo:tag`).
    pub reference: Vec<u8>,
    /// Where blobs can be read: an OCI layout directory path, or `registry/repo`.
    pub source: Vec<u8>,
    /// Manifest digest (`sha256:…`).
    pub manifest_digest: Vec<u8>,
    /// Config digest.
    pub config_digest: Vec<u8>,
    /// `os/arch[/variant]`.
    pub platform: Vec<u8>,
}

/// One layer blob.
#[derive(Archive, Serialize, Debug, Clone, Default)]
pub struct Layer {
    /// Size of the blob as stored (compressed).
    pub compressed_size: u64,
    /// Size of the tar stream.
    pub uncompressed_size: u64,
    /// Blob digest (`sha256:…`).
    pub digest: Vec<u8>,
    /// Digest of the uncompressed tar (`diff_id`).
    pub diff_id: Vec<u8>,
    /// Media type from the manifest.
    pub media_type: Vec<u8>,
    /// Resume points, sorted by `out_offset` (empty for uncompressed layers).
    pub checkpoints: Vec<Checkpoint>,
    /// A `Compression` value.
    pub compression: u8,
    /// Reserved, zero.
    pub reserved: [u8; 7],
}

/// A point in a gzip layer where inflation can resume without anything before it. Its
/// window is stored outside the archive, in the file's window area (see `header`), so that
/// opening an index does not read or checksum the windows.
#[derive(Archive, Serialize, Debug, Clone, Default)]
pub struct Checkpoint {
    /// Offset in the compressed blob of the first byte not consumed at all; when `bits > 0`
    /// the byte before it is partly used, so resume by reading from `in_offset - 1`.
    pub in_offset: u64,
    /// Offset in the uncompressed tar stream.
    pub out_offset: u64,
    /// Offset of the stored window from the start of the window area.
    pub window_offset: u64,
    /// XXH3-64 (seed 0) of the `window_stored_len` stored window bytes.
    pub window_xxh3: u64,
    /// Length of the stored window (raw or raw-deflate compressed).
    pub window_stored_len: u32,
    /// Length of the window once decoded: the up to 32 KiB of output before `out_offset`.
    pub window_len: u32,
    /// Unused bits of the byte before `in_offset` that belong to the next block (0..=7).
    pub bits: u8,
    /// 0: the stored window is raw; 1: it is raw deflate (no zlib or gzip wrapper).
    pub window_encoding: u8,
    /// Reserved, zero.
    pub reserved: [u8; 6],
}

/// One name in the merged tree.
#[derive(Archive, Serialize, Debug, Clone, Default)]
pub struct Entry {
    /// Content size (regular files), target length (symlinks), 0 otherwise.
    pub size: u64,
    /// Offset of the content in the uncompressed tar stream of `layer` (0 when `layer` is
    /// `NONE`).
    pub data_offset: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// File name (one path component; empty for the root).
    pub name: Vec<u8>,
    /// Symlink target.
    pub link_target: Vec<u8>,
    /// sha256 of the content (regular files; zero otherwise).
    pub sha256: [u8; 32],
    /// Index of the parent directory (the root is its own parent).
    pub parent: u32,
    /// Directories: index of the first child. Others: `NONE`.
    pub first_child: u32,
    /// Directories: number of children.
    pub child_count: u32,
    /// Hardlinks: index of the regular file entry that holds the inode (and its content
    /// location, chunk hashes and xattrs). Others: `NONE`.
    pub hardlink_to: u32,
    /// Link count: 2 + subdirectories for directories; names of the inode for files.
    pub nlink: u32,
    /// Permission bits, including setuid/setgid/sticky (07777).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Nanoseconds part of `mtime`.
    pub mtime_nsec: u32,
    /// Device major number.
    pub rdev_major: u32,
    /// Device minor number.
    pub rdev_minor: u32,
    /// Index of the layer holding the content, or `NONE`.
    pub layer: u32,
    /// Index into `Index::chunk_hashes` of this file's first chunk (files larger than
    /// `CHUNK_SIZE`), or `NONE`.
    pub first_chunk: u32,
    /// Index into `Index::xattrs` of the first extended attribute (0 when there are none).
    pub first_xattr: u32,
    /// Number of extended attributes.
    pub xattr_count: u32,
    /// A `Kind` value.
    pub kind: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
}

/// An extended attribute.
#[derive(Archive, Serialize, Debug, Clone, Default)]
pub struct Xattr {
    /// Full name, e.g. `security.capability`.
    pub name: Vec<u8>,
    /// Raw value.
    pub value: Vec<u8>,
}
