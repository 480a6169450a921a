//! Indexing one layer: walk its tar stream with the `tar` crate, hash every regular file
//! (whole and per chunk), and record each entry's metadata and data offset.

use super::stream::{CheckpointPolicy, LayerStream};
use super::BuildError;
use crate::format::{Layer, CHUNK_SIZE};
use crate::oci::LayerDesc;
use crate::source::Source;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::io::Read;
use std::rc::Rc;

/// What a tar entry is, after whiteout interpretation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symlink to the target.
    Symlink(Vec<u8>),
    /// Hardlink to a normalized path.
    Hardlink(Vec<u8>),
    /// Character device.
    CharDevice,
    /// Block device.
    BlockDevice,
    /// FIFO.
    Fifo,
    /// `.wh.NAME`: deletes `path` from lower layers.
    Whiteout,
    /// `.wh..wh..opq`: hides everything below directory `path` in lower layers.
    Opaque,
}

/// One entry of a layer, with its path normalized (no leading `/`, no `.`/`..`; empty
/// for the root).
#[derive(Clone, Debug)]
pub struct RawEntry {
    /// Normalized path.
    pub path: Vec<u8>,
    /// Kind.
    pub kind: RawKind,
    /// Permission bits (07777).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (seconds).
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Content size for files.
    pub size: u64,
    /// Offset of the content in the uncompressed stream.
    pub data_offset: u64,
    /// sha256 of the content.
    pub sha256: [u8; 32],
    /// Per-chunk sha256 (files larger than `CHUNK_SIZE`).
    pub chunks: Vec<[u8; 32]>,
    /// Extended attributes (name, value), sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Device numbers.
    pub rdev: (u32, u32),
}

/// A layer's indexed content.
pub struct LayerResult {
    /// The layer record for the index.
    pub layer: Layer,
    /// The stored windows of the layer's checkpoints (`window_offset` is relative to it).
    pub windows: Vec<u8>,
    /// Entries in tar order.
    pub entries: Vec<RawEntry>,
}

/// Normalize a tar path: strip `/` and `./`, drop `.` components, reject `..`, NUL,
/// names over `NAME_MAX` and paths over `PATH_MAX` (see there).
pub fn normalize(path: &[u8]) -> Result<Vec<u8>, String> {
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err("a `..` component would escape the image root".into()),
            c if c.contains(&0) => return Err("the path contains a NUL byte".into()),
            c if c.len() > NAME_MAX => {
                return Err(format!(
                    "a name is longer than {NAME_MAX} bytes, which no Linux filesystem stores"
                ))
            }
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    if out.len() > PATH_MAX {
        return Err(format!(
            "the path is longer than {PATH_MAX} bytes, which Linux cannot open"
        ));
    }
    Ok(out)
}

/// A tar path for messages: lossy UTF-8, cut after 200 bytes (a crafted one may be
/// megabytes long).
fn shown_path(raw: &[u8]) -> String {
    const SHOWN: usize = 200;
    if raw.len() <= SHOWN {
        return String::from_utf8_lossy(raw).into_owned();
    }
    format!(
        "{}… ({} bytes)",
        String::from_utf8_lossy(&raw[..SHOWN]),
        raw.len()
    )
}

/// Longest extended attribute name and value Linux stores (`XATTR_NAME_MAX`,
/// `XATTR_SIZE_MAX`); the kernel could not pass a larger value to a reader either.
const XATTR_NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 64 << 10;

/// Longest name of a directory entry on Linux (`NAME_MAX`).
const NAME_MAX: usize = 255;
/// Longest path (and symlink target) Linux takes, without its NUL (`PATH_MAX` - 1): an
/// extraction fails on longer ones, and a tar of millions of `a/` components would
/// otherwise make as many directories in memory from a few kilobytes of gzip.
const PATH_MAX: usize = 4095;

/// `path` split into its directory and last component.
pub(super) fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = int.parse().ok()?;
    let mut nanos: u32 = 0;
    let digits: String = frac.chars().take(9).collect();
    if !digits.is_empty() {
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        nanos = format!("{digits:0<9}").parse().ok()?;
    }
    if secs < 0 && nanos > 0 {
        // -1.5 means 1.5 s before the epoch: -2 s + 0.5 s.
        return Some((secs - 1, 1_000_000_000 - nanos));
    }
    Some((secs, nanos))
}

/// Index layer `desc` from `source`: one streaming pass, checkpoints per `policy`.
///
/// Three threads work on the layer: one inflates (the critical path), one computes the blob
/// digest and diff_id, and one (spawned here, the caller waits) parses the tar and hashes
/// file contents. The latter two run at nice [`TAR_NICE`], so that on a machine with fewer
/// free cores than threads the inflate thread keeps its core.
pub fn index_layer(
    source: &dyn Source,
    desc: &LayerDesc,
    policy: CheckpointPolicy,
    progress: indicatif::ProgressBar,
) -> Result<LayerResult, BuildError> {
    std::thread::scope(|s| {
        let walker = std::thread::Builder::new()
            .name("clip-tar".into())
            .spawn_scoped(s, || {
                let _ = crate::raw::sched::set_current_thread_nice(TAR_NICE);
                index_layer_here(source, desc, policy, progress)
            });
        match walker {
            Ok(w) => w.join().unwrap_or_else(|_| {
                Err(BuildError::Layer(format!(
                    "layer {}: the tar thread panicked",
                    desc.digest
                )))
            }),
            Err(e) => Err(BuildError::Layer(format!(
                "layer {}: cannot start a thread: {e}",
                desc.digest
            ))),
        }
    })
}

/// Nice value of the tar and digest threads of a layer (see [`index_layer`]).
pub const TAR_NICE: i32 = 5;

/// Why a sparse entry (GNU type `S`, or PAX `GNU.sparse.*` records, whose data is a map
/// of segments, not the file's bytes) fails the build: the index records each file's
/// bytes as one contiguous range of its layer.
const SPARSE: &str = "a sparse file (`tar --sparse`, GNU or PAX sparse format): clip indexes \
     each file as one contiguous range of its layer and cannot serve it; write the layer \
     without --sparse";

fn index_layer_here(
    source: &dyn Source,
    desc: &LayerDesc,
    policy: CheckpointPolicy,
    progress: indicatif::ProgressBar,
) -> Result<LayerResult, BuildError> {
    let layer_err = |msg: String| BuildError::Layer(format!("layer {}: {msg}", desc.digest));
    // One byte past the size the manifest gives is enough to refuse a longer blob: a
    // source that never stops sending cannot keep the build going.
    let blob = Box::new(
        source
            .blob(&desc.digest, 0, None)?
            .take(desc.size.saturating_add(1)),
    );
    let stream = Rc::new(RefCell::new(LayerStream::start(
        blob,
        desc.compression,
        policy,
        progress,
    )));
    let mut entries = Vec::new();
    let walk = walk_tar(&stream, &mut entries);
    let mut stream = Rc::try_unwrap(stream)
        .map_err(|_| layer_err("internal: layer stream still shared".into()))?
        .into_inner();
    if let Err(e) = walk {
        if let Some(pe) = stream.take_error() {
            return Err(layer_err(pe.to_string()));
        }
        // A tampered blob usually breaks the tar first: name the digest mismatch if that is
        // the cause (reading on to the end costs nothing on the success path).
        if let Ok(end) = stream.finish() {
            if end.digest != desc.digest {
                return Err(digest_mismatch(desc, end.digest));
            }
        }
        return Err(layer_err(e));
    }
    let end = stream.finish().map_err(|e| layer_err(e.to_string()))?;
    if end.digest != desc.digest {
        return Err(digest_mismatch(desc, end.digest));
    }
    if end.compressed_size != desc.size {
        return Err(layer_err(format!(
            "blob is {} bytes but the manifest says {}",
            end.compressed_size, desc.size
        )));
    }
    if end.diff_id != desc.diff_id {
        return Err(layer_err(format!(
            "uncompressed content hashes to {} but the config's diff_id is {}",
            end.diff_id, desc.diff_id
        )));
    }
    Ok(LayerResult {
        layer: Layer {
            compressed_size: end.compressed_size,
            uncompressed_size: end.uncompressed_size,
            digest: desc.digest.as_bytes().to_vec(),
            diff_id: desc.diff_id.as_bytes().to_vec(),
            media_type: desc.media_type.as_bytes().to_vec(),
            checkpoints: end.checkpoints,
            compression: desc.compression as u8,
            reserved: [0; 7],
        },
        windows: end.windows,
        entries,
    })
}

fn digest_mismatch(desc: &LayerDesc, actual: String) -> BuildError {
    BuildError::Source(crate::source::SourceError::DigestMismatch {
        what: "layer blob".into(),
        digest: desc.digest.clone(),
        actual,
    })
}

/// Shares the layer stream between the tar parser (which reads it) and the walker (which
/// tells it where large files start).
struct SharedStream(Rc<RefCell<LayerStream>>);

impl Read for SharedStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

fn io_msg(what: &str, e: std::io::Error) -> String {
    format!("{what}: {e}")
}

fn walk_tar(stream: &Rc<RefCell<LayerStream>>, out: &mut Vec<RawEntry>) -> Result<(), String> {
    use tar::EntryType as T;
    let mut archive =
        tar::Archive::new(super::guard::HeaderGuard::new(SharedStream(stream.clone())));
    let entries = archive.entries().map_err(|e| io_msg("reading tar", e))?;
    let mut buf = vec![0u8; 256 * 1024];
    for entry in entries {
        let mut entry = entry.map_err(|e| io_msg("reading tar header", e))?;
        let raw_path = entry.path_bytes().into_owned();
        let shown = shown_path(&raw_path);
        let bad = |msg: String| format!("entry {shown:?}: {msg}");
        let etype = entry.header().entry_type();
        if matches!(etype, T::XGlobalHeader) {
            continue;
        }
        let path = normalize(&raw_path).map_err(bad)?;
        let h = entry.header();
        let mode = h.mode().map_err(|e| bad(e.to_string()))? & 0o7777;
        let id = |v: std::io::Result<u64>, what: &str| -> Result<u32, String> {
            let v = v.map_err(|e| bad(e.to_string()))?;
            u32::try_from(v).map_err(|_| bad(format!("{what} {v} is out of range")))
        };
        let mut uid = id(h.uid(), "uid")?;
        let mut gid = id(h.gid(), "gid")?;
        let mut mtime = h.mtime().map_err(|e| bad(e.to_string()))? as i64;
        let mut mtime_nsec = 0u32;
        let (major, minor) = if matches!(etype, T::Char | T::Block) {
            (
                h.device_major()
                    .map_err(|e| bad(e.to_string()))?
                    .unwrap_or(0),
                h.device_minor()
                    .map_err(|e| bad(e.to_string()))?
                    .unwrap_or(0),
            )
        } else {
            (0, 0)
        };
        if major > 0xfff || minor > 0xf_ffff {
            return Err(bad(format!(
                "device {major}:{minor} is beyond Linux's 12-bit major and 20-bit minor numbers"
            )));
        }
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if let Some(exts) = entry.pax_extensions().map_err(|e| bad(e.to_string()))? {
            for ext in exts {
                let ext = ext.map_err(|e| bad(format!("bad PAX record: {e}")))?;
                let (k, v) = (ext.key_bytes(), ext.value_bytes());
                let num = || {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<u32>().ok())
                };
                match k {
                    b"uid" => uid = num().ok_or_else(|| bad("bad PAX uid".into()))?,
                    b"gid" => gid = num().ok_or_else(|| bad("bad PAX gid".into()))?,
                    b"mtime" => {
                        (mtime, mtime_nsec) =
                            parse_pax_time(v).ok_or_else(|| bad("bad PAX mtime".into()))?
                    }
                    _ if k.starts_with(b"GNU.sparse.") => return Err(bad(SPARSE.into())),
                    _ => {
                        if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                            if name.len() > XATTR_NAME_MAX || v.len() > XATTR_SIZE_MAX {
                                return Err(bad(format!(
                                    "extended attribute {:?} ({} bytes) is larger than Linux \
                                     stores ({XATTR_NAME_MAX}-byte names, {XATTR_SIZE_MAX}-byte \
                                     values)",
                                    shown_path(name),
                                    v.len()
                                )));
                            }
                            xattrs.push((name.to_vec(), v.to_vec()));
                        }
                    }
                }
            }
        }
        xattrs.sort();
        xattrs.dedup_by(|a, b| a.0 == b.0);
        let size = entry.size();
        let data_offset = entry.raw_file_position();
        let mut e = RawEntry {
            path,
            kind: RawKind::File,
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            size: 0,
            data_offset: 0,
            sha256: [0; 32],
            chunks: Vec::new(),
            xattrs,
            rdev: (0, 0),
        };
        let (dir, name) = split_last(&e.path);
        if let Some(rest) = name.strip_prefix(b".wh.") {
            if rest == b".wh..opq" {
                e.path = dir.to_vec();
                e.kind = RawKind::Opaque;
                out.push(e);
            } else if rest.starts_with(b".wh.") {
                // Other AUFS metadata (.wh..wh.plnk and friends): not content.
            } else if rest.is_empty() || rest == b"." || rest == b".." {
                return Err(bad("whiteout names no file".into()));
            } else {
                e.path = join(dir, rest);
                e.kind = RawKind::Whiteout;
                out.push(e);
            }
            continue;
        }
        e.kind = match etype {
            T::Regular | T::Continuous => RawKind::File,
            T::Directory => RawKind::Dir,
            T::Symlink => {
                let target = link.ok_or_else(|| bad("symlink without target".into()))?;
                if target.len() > PATH_MAX {
                    return Err(bad(format!(
                        "symlink target longer than {PATH_MAX} bytes, which Linux cannot store"
                    )));
                }
                RawKind::Symlink(target)
            }
            T::Link => {
                let target = link.ok_or_else(|| bad("hardlink without target".into()))?;
                let target =
                    normalize(&target).map_err(|m| bad(format!("hardlink target: {m}")))?;
                if target.is_empty() {
                    return Err(bad("hardlink to the root".into()));
                }
                RawKind::Hardlink(target)
            }
            T::Char => RawKind::CharDevice,
            T::Block => RawKind::BlockDevice,
            T::Fifo => RawKind::Fifo,
            T::GNUSparse => return Err(bad(SPARSE.into())),
            other => {
                return Err(bad(format!(
                    "unsupported tar entry type {:?}",
                    other.as_byte() as char
                )))
            }
        };
        if e.path.is_empty() && e.kind != RawKind::Dir {
            return Err(bad("the root must be a directory".into()));
        }
        match &e.kind {
            RawKind::File => {
                e.size = size;
                e.data_offset = data_offset;
                let at = stream.borrow().position();
                if at == data_offset {
                    stream.borrow_mut().file_starts(size);
                }
                let mut whole = Sha256::new();
                let mut chunk = Sha256::new();
                let mut in_chunk = 0u64;
                let mut total = 0u64;
                loop {
                    let n = entry
                        .read(&mut buf)
                        .map_err(|e| bad(format!("reading content: {e}")))?;
                    if n == 0 {
                        break;
                    }
                    let data = &buf[..n];
                    whole.update(data);
                    total += n as u64;
                    if size > CHUNK_SIZE {
                        let mut d = data;
                        while !d.is_empty() {
                            let k = d.len().min((CHUNK_SIZE - in_chunk) as usize);
                            chunk.update(&d[..k]);
                            in_chunk += k as u64;
                            d = &d[k..];
                            if in_chunk == CHUNK_SIZE {
                                e.chunks.push(chunk.finalize_reset().into());
                                in_chunk = 0;
                            }
                        }
                    }
                }
                if total != size {
                    return Err(bad(format!(
                        "content is {total} bytes but the header says {size}"
                    )));
                }
                if size > CHUNK_SIZE && in_chunk > 0 {
                    e.chunks.push(chunk.finalize().into());
                }
                e.sha256 = whole.finalize().into();
            }
            RawKind::Symlink(t) => e.size = t.len() as u64,
            RawKind::CharDevice | RawKind::BlockDevice => e.rdev = (major, minor),
            _ => {}
        }
        out.push(e);
    }
    Ok(())
}
