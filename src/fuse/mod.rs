//! The FUSE filesystem of `clip-serve`: a read-only view of an index. Metadata (lookup,
//! getattr, readdir, xattrs, readlink) is answered from the memory-mapped index on the
//! session threads; reads go to a bounded worker pool, each open handle keeping its own
//! `FileReader` so that a sequential cold read continues its inflate cursor. Entry `i` is
//! inode `i + 1`; a hardlink resolves to the inode of its canonical file.

pub mod attr;
pub mod pool;

use crate::format::{FormatError, IndexFile, Kind};
use crate::profile::{Needed, Recorder};
use crate::read::ahead::{CachedJob, Interval, Job};
use crate::read::{
    AfterReply, CursorPark, FileReader, Neighbours, ReadAhead, ReadError, SpanReader, Tier,
};
use crate::source::{Source, SourceError};
use attr::{attr_of, entry_of, file_type, ino_of};
use bytes::Bytes;
use fuser::{
    AccessFlags, BsdFileFlags, Config, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner,
    MountOption, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};
use pool::Pool;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache entries, attributes and negative lookups: the image is
/// immutable, so as long as the kernel likes.
pub const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Largest read request and readahead window asked of the kernel (it caps both at its
/// `max_pages` limit, 1 MiB by default).
pub const MAX_READ: u32 = 1 << 20;

/// Errors of the FUSE layer.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// The mountpoint is a FUSE mount whose daemon died.
    #[error("{0} is a stale FUSE mount (transport endpoint is not connected), left by a clip-serve that crashed or was killed; unmount it with `fusermount3 -u {0}` (or `umount -l {0}`) and retry")]
    StaleMount(String),
    /// The mountpoint is unusable.
    #[error("mountpoint {path}: {source}; create an empty directory to mount on")]
    Mountpoint {
        /// Path given.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Mounting failed.
    #[error("mounting {path} failed: {source}; clip-serve needs root (or fusermount3) and /dev/fuse (`modprobe fuse`; in a container: --device /dev/fuse --cap-add SYS_ADMIN)")]
    Mount {
        /// Mountpoint.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Unmounting failed.
    #[error("unmounting {path} failed: {source}; if it is busy, stop the processes using it or run `umount -l {path}`")]
    Unmount {
        /// Mountpoint.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The index is unusable.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The image source cannot be opened.
    #[error("{0}; if the image moved, point at its blobs with --source DIR (a layout) or --source HOST/REPO (a registry mirror)")]
    Source(#[from] SourceError),
    /// Starting threads failed.
    #[error("starting worker threads: {0}")]
    Threads(std::io::Error),
}

/// Open the source of image bytes for `index`: `override_spec` (from `--source`)
/// when given, else the source recorded in the index at build time. This is the one place
/// that chooses a source, so other kinds (a registry) plug in through `source::open`.
pub fn open_source(
    index: &IndexFile,
    override_spec: Option<&str>,
) -> Result<Arc<dyn Source>, FuseError> {
    let recorded = String::from_utf8_lossy(index.index().image.source.as_slice()).into_owned();
    let source: Arc<dyn Source> = if let Some(spec) = override_spec {
        Arc::from(crate::source::open(spec)?.0)
    } else if recorded.is_empty() {
        return Err(FuseError::Source(SourceError::NotFound(
            "the index records no source".into(),
        )));
    } else {
        // The recorded form (`registry+http://HOST/REPO`, `registry://…`, or a layout path)
        // is not a command-line reference: reopen it the way `clip-build cat` does.
        Arc::from(crate::source::open_recorded(&recorded)?)
    };
    let layers = (0..index.index().layers.len() as u32)
        .map(|i| index.layer_digest(i))
        .collect::<Result<Vec<_>, _>>()?;
    source.prepare(&layers)?;
    Ok(source)
}

/// Counters of the filesystem, updated lock-free.
#[derive(Debug, Default)]
pub struct ServeStats {
    opens: AtomicU64,
    open_handles: AtomicU64,
    reads: AtomicU64,
    read_bytes: AtomicU64,
    read_errors: AtomicU64,
    inflated: AtomicU64,
    fetched: AtomicU64,
    kept: AtomicU64,
    kept_bytes: AtomicU64,
    ahead_jobs: AtomicU64,
    ahead_hits: AtomicU64,
    requests: Arc<AtomicU64>,
}

/// A snapshot of [`ServeStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServeSnapshot {
    /// Files opened.
    pub opens: u64,
    /// Handles currently open.
    pub open_handles: u64,
    /// Read requests answered.
    pub reads: u64,
    /// Bytes returned by reads.
    pub read_bytes: u64,
    /// Read requests that failed.
    pub read_errors: u64,
    /// Uncompressed bytes inflated from the origin (including skipped ones).
    pub inflated: u64,
    /// Compressed bytes requested from the origin.
    pub fetched: u64,
    /// Pieces of other files that origin reads inflated on the way, verified and cached.
    pub kept: u64,
    /// Bytes of those pieces.
    pub kept_bytes: u64,
    /// Read-ahead jobs run (intervals inflated ahead of cold sequential readers).
    pub ahead_jobs: u64,
    /// Pieces served from what read-ahead jobs held for their reader.
    pub ahead_hits: u64,
    /// Blob requests made of the origin (each ranged read, prefetch run or read-ahead job).
    pub requests: u64,
}

impl ServeStats {
    /// Current values.
    pub fn snapshot(&self) -> ServeSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServeSnapshot {
            opens: l(&self.opens),
            open_handles: l(&self.open_handles),
            reads: l(&self.reads),
            read_bytes: l(&self.read_bytes),
            read_errors: l(&self.read_errors),
            inflated: l(&self.inflated),
            fetched: l(&self.fetched),
            kept: l(&self.kept),
            kept_bytes: l(&self.kept_bytes),
            ahead_jobs: l(&self.ahead_jobs),
            ahead_hits: l(&self.ahead_hits),
            requests: l(&self.requests),
        }
    }
}

impl std::fmt::Display for ServeSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "opens={} open_handles={} reads={} read_bytes={} read_errors={} origin_inflated={} origin_fetched={} kept={} kept_bytes={}",
            self.opens,
            self.open_handles,
            self.reads,
            self.read_bytes,
            self.read_errors,
            self.inflated,
            self.fetched,
            self.kept,
            self.kept_bytes
        )?;
        write!(
            f,
            " ahead_jobs={} ahead_hits={} origin_requests={}",
            self.ahead_jobs, self.ahead_hits, self.requests
        )
    }
}

/// What the read workers share with the session threads.
struct Shared {
    index: Arc<IndexFile>,
    source: Arc<dyn Source>,
    tiers: Vec<Arc<dyn Tier>>,
    stats: Arc<ServeStats>,
    neighbours: Arc<Neighbours>,
    ahead: Arc<ReadAhead>,
    cursors: Arc<CursorPark>,
    recorder: Option<Arc<Recorder>>,
}

/// The read-only filesystem over one index.
pub struct ClipFs {
    shared: Arc<Shared>,
    handles: Mutex<HashMap<u64, Arc<Mutex<FileReader>>>>,
    next_fh: AtomicU64,
    pool: Pool,
    ahead_pool: Arc<Pool>,
    total_blocks: u64,
    no_xattrs: bool,
    xattr_names: OnceLock<HashSet<Box<[u8]>>>,
}

/// The xattr names of POSIX ACLs.
const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";

/// Failed reads logged at most 10 a minute (each is also counted in `read_errors`).
static READ_FAILED_LOG: crate::logging::RateLimit =
    crate::logging::RateLimit::new(10, std::time::Duration::from_secs(60));

/// How far ahead of a cold sequential reader intervals are inflated by default.
pub const READ_AHEAD: u64 = 8 << 20;

/// Memory for pieces that read-ahead and profile prefetch jobs hold for their readers.
const READ_AHEAD_HELD: u64 = 128 << 20;

impl ClipFs {
    /// A filesystem serving `index` with bytes from `tiers` (fastest first) and `source`,
    /// reads handled by `read_threads` workers.
    pub fn new(
        index: Arc<IndexFile>,
        source: Arc<dyn Source>,
        tiers: Vec<Arc<dyn Tier>>,
        read_threads: usize,
    ) -> Result<ClipFs, FuseError> {
        let pool = Pool::new("clip-read", read_threads, 1024).map_err(FuseError::Threads)?;
        let cores = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(1, 4);
        let ahead_pool = Arc::new(Pool::new("clip-ahead", cores, 256).map_err(FuseError::Threads)?);
        let index_has_no_xattrs = index.index().xattrs.is_empty();
        let total_blocks = index
            .index()
            .entries
            .iter()
            .filter(|e| e.kind == Kind::File as u8)
            .map(|e| e.size.to_native().div_ceil(attr::BLKSIZE as u64))
            .sum();
        let counting = crate::source::counting::Counting::new(source);
        let stats = Arc::new(ServeStats {
            requests: counting.counter(),
            ..ServeStats::default()
        });
        Ok(ClipFs {
            shared: Arc::new(Shared {
                neighbours: Neighbours::new(index.index().layers.len()),
                ahead: ReadAhead::new(READ_AHEAD, READ_AHEAD_HELD),
                cursors: {
                    let park = CursorPark::new();
                    if let Err(e) = park.expire_in_background() {
                        tracing::warn!(error = %e, "no thread to drop idle parked cursors; they go at the next cold read");
                    }
                    park
                },
                recorder: None,
                index,
                source: Arc::new(counting),
                tiers,
                stats,
            }),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            pool,
            ahead_pool,
            total_blocks,
            no_xattrs: index_has_no_xattrs,
            xattr_names: OnceLock::new(),
        })
    }

    /// Inflate up to `window` bytes ahead of cold sequential readers on other threads (0
    /// turns read-ahead off).
    pub fn with_read_ahead(mut self, window: u64) -> ClipFs {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.ahead = ReadAhead::new(window, READ_AHEAD_HELD);
        }
        self
    }

    /// Record with `recorder` the checkpoint intervals whose bytes reads serve (see
    /// [`crate::profile`]).
    pub fn record_profile(&mut self, recorder: Recorder) -> Arc<Recorder> {
        let recorder = Arc::new(recorder);
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.recorder = Some(recorder.clone());
        }
        recorder
    }

    /// Fetch and inflate `intervals` (a recorded profile, first needed first, each only as
    /// far as it was needed) on `threads` background threads, holding their pieces for
    /// readers. Intervals whose pieces the cache tiers hold already are left out (a warm
    /// restart fetches nothing). Neighbouring intervals are fetched together, one request
    /// per run of up to [`PREFETCH_RUN`] (see [`crate::profile::runs`]), and inflated each
    /// from its own checkpoint. Readers that need an interval being fetched wait for it;
    /// one not started yet they read themselves.
    pub fn prefetch(&self, intervals: Vec<Needed>, threads: usize) -> std::io::Result<()> {
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name("clip-prefetch".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let count = intervals.len();
                let todo: Vec<Needed> = intervals
                    .into_iter()
                    .filter(|n| !cached(&shared, n))
                    .collect();
                let runs = crate::profile::runs(&todo, PREFETCH_RUN, PREFETCH_GAP);
                let next = AtomicU64::new(0);
                std::thread::scope(|scope| {
                    for t in 0..threads.max(1) {
                        let (shared, runs, next) = (&shared, &runs, &next);
                        let worker = std::thread::Builder::new()
                            .name(format!("clip-prefetch-{t}"))
                            .spawn_scoped(scope, move || loop {
                                let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                                let Some(run) = runs.get(k) else { break };
                                prefetch_run(shared, run);
                            });
                        if let Err(e) = worker {
                            tracing::warn!(error = %e, "cannot start a profile prefetch thread");
                        }
                    }
                });
                tracing::info!(
                    intervals = count,
                    cached = count - todo.len(),
                    requests = runs.len(),
                    ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
                    "profile prefetched"
                );
            })?;
        Ok(())
    }

    /// The counters (shared; stays valid after the filesystem is moved into a session).
    pub fn stats(&self) -> Arc<ServeStats> {
        self.shared.stats.clone()
    }

    fn index(&self) -> &IndexFile {
        &self.shared.index
    }

    /// Entry index of `ino`, or ENOENT.
    fn entry_index(&self, ino: INodeNo) -> Result<u32, Errno> {
        entry_of(ino)
            .filter(|&i| i < self.index().entry_count())
            .ok_or(Errno::ENOENT)
    }

    fn attr(&self, i: u32) -> Result<FileAttr, Errno> {
        attr_of(self.index(), i).map_err(|e| self.corrupt(i, e))
    }

    /// Every xattr name some entry of the image carries (collected on first use).
    fn image_xattr_names(&self) -> &HashSet<Box<[u8]>> {
        self.xattr_names.get_or_init(|| {
            self.index()
                .index()
                .xattrs
                .iter()
                .map(|x| Box::from(x.name.as_slice()))
                .collect()
        })
    }

    /// Whether some entry has a POSIX ACL (access or default).
    fn image_has_acls(&self) -> bool {
        !self.no_xattrs && {
            let names = self.image_xattr_names();
            names.contains(ACL_ACCESS) || names.contains(ACL_DEFAULT)
        }
    }

    fn corrupt(&self, i: u32, e: FormatError) -> Errno {
        tracing::error!(entry = i, error = %e, "index inconsistency");
        Errno::EIO
    }

    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Result<Option<FileAttr>, Errno> {
        let p = self.entry_index(parent)?;
        let pe = self.index().entry(p).map_err(|e| self.corrupt(p, e))?;
        if pe.kind != Kind::Dir as u8 {
            return Err(Errno::ENOTDIR);
        }
        match self
            .index()
            .lookup(p, name.as_bytes())
            .map_err(|e| self.corrupt(p, e))?
        {
            Some(c) => self.attr(c).map(Some),
            None => Ok(None),
        }
    }

    /// Directory entry `k` of `dir` in readdir order: ".", "..", then the children.
    fn dir_entry(&self, dir: u32, k: u64) -> Result<Option<(u32, &[u8])>, Errno> {
        let idx = self.index();
        let children = idx.children(dir).map_err(|e| self.corrupt(dir, e))?;
        Ok(match k {
            0 => Some((dir, b".")),
            1 => {
                let parent = idx
                    .entry(dir)
                    .map_err(|e| self.corrupt(dir, e))?
                    .parent
                    .to_native();
                Some((if dir == 0 { 0 } else { parent }, b".."))
            }
            _ => {
                let c = u64::from(children.start) + k - 2;
                if c >= u64::from(children.end) {
                    None
                } else {
                    let c = c as u32;
                    Some((
                        c,
                        idx.entry(c)
                            .map_err(|e| self.corrupt(c, e))?
                            .name
                            .as_slice(),
                    ))
                }
            }
        })
    }

    /// Hand the entries of directory `ino` from readdir offset `offset` on to `add` (entry,
    /// offset of the next one, name) until it reports a full buffer or the listing ends.
    fn each_dir_entry(
        &self,
        ino: INodeNo,
        offset: u64,
        mut add: impl FnMut(u32, u64, &[u8]) -> Result<bool, Errno>,
    ) -> Result<(), Errno> {
        let d = self.directory(ino)?;
        let mut k = offset;
        while let Some((i, name)) = self.dir_entry(d, k)? {
            if add(i, k + 1, name)? {
                break;
            }
            k += 1;
        }
        Ok(())
    }

    fn directory(&self, ino: INodeNo) -> Result<u32, Errno> {
        let d = self.entry_index(ino)?;
        if self.index().entry(d).map_err(|e| self.corrupt(d, e))?.kind != Kind::Dir as u8 {
            return Err(Errno::ENOTDIR);
        }
        Ok(d)
    }

    fn xattr_reply(data: &[u8], size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(data.len() as u32);
        } else if data.len() > size as usize {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(data);
        }
    }
}

/// One answered read: the bytes, what the reader left for after the reply (see
/// [`after_reply`]) and read-ahead jobs to start.
struct Served {
    bytes: Bytes,
    after: AfterReply,
    ahead: Vec<Job>,
    cached: Option<CachedJob>,
}

/// Answer one read.
fn serve_read(
    shared: &Shared,
    reader: &Mutex<FileReader>,
    offset: u64,
    size: u32,
) -> Result<Served, ReadError> {
    let mut r = reader.lock().unwrap_or_else(|p| p.into_inner());
    let len = r.size().saturating_sub(offset).min(size as u64) as usize;
    if len == 0 {
        return Ok(Served {
            bytes: Bytes::new(),
            after: AfterReply::default(),
            ahead: Vec::new(),
            cached: None,
        });
    }
    let (inf0, fetch0) = r.origin_stats();
    let (kept0, kept_bytes0) = r.kept_stats();
    let hits0 = r.ahead_hits();
    let buf = match r.read_bytes(
        &shared.index,
        shared.source.as_ref(),
        &shared.tiers,
        offset,
        len,
    ) {
        Ok(b) => b,
        Err(e) => {
            // An interval left unfinished by an earlier piece of this read is released now,
            // not when the handle is next used: its claim makes other readers wait.
            drop(r.take_after_reply());
            return Err(e);
        }
    };
    let (inf1, fetch1) = r.origin_stats();
    let (kept1, kept_bytes1) = r.kept_stats();
    let s = &shared.stats;
    s.inflated
        .fetch_add(inf1.saturating_sub(inf0), Ordering::Relaxed);
    s.fetched
        .fetch_add(fetch1.saturating_sub(fetch0), Ordering::Relaxed);
    s.kept.fetch_add(kept1 - kept0, Ordering::Relaxed);
    s.kept_bytes
        .fetch_add(kept_bytes1 - kept_bytes0, Ordering::Relaxed);
    s.ahead_hits
        .fetch_add(r.ahead_hits() - hits0, Ordering::Relaxed);
    let n = buf.len();
    if let Some(rec) = &shared.recorder {
        r.take_touched()
            .into_iter()
            .for_each(|(iv, piece)| rec.record(iv, piece));
    }
    let ahead = r.plan_ahead(&shared.index, &shared.tiers, offset + n as u64);
    let cached = r.plan_cached_ahead(offset + n as u64);
    Ok(Served {
        bytes: buf,
        after: r.take_after_reply(),
        ahead,
        cached,
    })
}

/// Whether the cache tiers hold the pieces a profile needs of `n`'s interval, so that
/// readers find them there and the interval need not be fetched: the pieces the profile
/// lists, or, for a profile without them (version 1), those lying wholly in the part of
/// the interval it needs; pieces crossing its ends count only when there is no other (a
/// cold run that needed one read it whole and cached it, but one that it did not need is
/// never cached).
fn cached(shared: &Shared, n: &Needed) -> bool {
    let iv = n.interval;
    let Ok(Some((a, b))) = shared
        .index
        .interval_range(iv.layer, iv.checkpoint as usize)
    else {
        return false;
    };
    let b = b.min(n.until);
    let pieces = shared.neighbours.located(&shared.index, iv.layer);
    let stored =
        |p: &crate::read::neighbours::Located| shared.tiers.iter().any(|t| t.contains(&p.sha256));
    if !n.pieces.is_empty() {
        // The profile says which pieces were read: exactly those must be there.
        return n.pieces.iter().all(|&at| {
            let k = pieces.partition_point(|p| p.offset < at);
            pieces.get(k).is_some_and(|p| p.offset == at && stored(p))
        });
    }
    let first = pieces.partition_point(|p| p.offset + p.len <= a);
    let overlapping = &pieces[first..first + pieces[first..].partition_point(|p| p.offset < b)];
    let inside: Vec<_> = overlapping
        .iter()
        .filter(|p| a <= p.offset && p.offset + p.len <= b)
        .collect();
    if inside.is_empty() {
        overlapping.iter().all(stored)
    } else {
        inside.into_iter().all(stored)
    }
}

/// Most neighbouring profile intervals fetched with one request (2 MiB intervals: up to
/// 16 MiB of layer, a few MB compressed).
pub const PREFETCH_RUN: usize = 8;

/// Intervals a profile does not need that one request may still fetch between two it
/// needs, rather than making two requests. Replaying a cold `import numpy` from the
/// registry: 23 requests without gaps, 17 with one (+12 % bytes, ~3 % sooner), 15 with two
/// (+23 % bytes, no sooner).
pub const PREFETCH_GAP: u32 = 1;

/// Claim the intervals of one profile run, fetch their compressed bytes with one request
/// and inflate each from its checkpoint. If that request fails, each job fetches its own.
fn prefetch_run(shared: &Shared, run: &[Needed]) {
    let index = &shared.index;
    let jobs: Vec<(Job, u64, u64)> = run
        .iter()
        .filter_map(|n| {
            let (a, b) = index
                .interval_range(n.interval.layer, n.interval.checkpoint as usize)
                .ok()??;
            let job = shared
                .ahead
                .claim(index, n.interval, (0, u64::MAX), n.until)?;
            Some((job, a, b.min(n.until)))
        })
        .collect();
    let (Some(first), Some(last)) = (jobs.first(), jobs.last()) else {
        return;
    };
    let layer = first.0.interval.layer;
    let buffered = index.compressed_span(layer, first.1, last.2).ok().flatten().and_then(|(_, from, to)| {
        let size = index.layer(layer).ok()?.compressed_size.to_native();
        let digest = index.layer_digest(layer).ok()?;
        crate::source::buffered::Buffered::fetch(shared.source.clone(), digest, from, to, size)
            .map_err(|e| tracing::debug!(error = %e, "profile run fetch failed; its intervals fetch their own bytes"))
            .ok()
    });
    if let Some(b) = &buffered {
        shared.stats.fetched.fetch_add(b.len(), Ordering::Relaxed);
    }
    for (job, _, _) in jobs {
        match &buffered {
            Some(b) => run_ahead_from(shared, b, job, false),
            None => run_ahead(shared, job),
        }
    }
}

/// Run a read-ahead job on the read-ahead pool (its layer's piece map is built meanwhile).
fn spawn_ahead(pool: &Pool, shared: &Arc<Shared>, job: Job) {
    shared
        .neighbours
        .build_in_background(&shared.index, job.interval.layer);
    let shared = shared.clone();
    pool.submit(move || run_ahead(&shared, job));
}

/// Run a read-ahead job (on the read-ahead pool) and count what it did.
fn run_ahead(shared: &Shared, job: Job) {
    run_ahead_from(shared, shared.source.as_ref(), job, true)
}

/// Run a read-ahead job reading from `source`; `count_fetched`: whether the compressed
/// bytes it reads crossed the network now (not when they come from a buffer counted before).
fn run_ahead_from(shared: &Shared, source: &dyn Source, job: Job, count_fetched: bool) {
    let r = shared.ahead.run(
        &shared.index,
        source,
        &shared.tiers,
        &shared.neighbours,
        job,
    );
    match r {
        Ok(j) => {
            let s = &shared.stats;
            s.ahead_jobs.fetch_add(1, Ordering::Relaxed);
            s.inflated.fetch_add(j.inflated, Ordering::Relaxed);
            if count_fetched {
                s.fetched.fetch_add(j.fetched, Ordering::Relaxed);
            }
            s.kept.fetch_add(j.kept, Ordering::Relaxed);
            s.kept_bytes.fetch_add(j.kept_bytes, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::debug!(error = %e, interval = ?job.interval, "read-ahead failed; readers fetch for themselves")
        }
    }
}

/// What a cold read left for after its reply (on the read worker, so the reading process
/// does not wait for it): keep the other files' pieces it inflated on the way, finish its
/// checkpoint interval, then release its claims, which readers of those pieces wait for.
fn after_reply(shared: &Shared, after: AfterReply) {
    let AfterReply {
        passed,
        unfinished,
        claims,
    } = after;
    let (mut kept, mut kept_bytes) = (0, 0);
    for (layer, offset, bytes) in passed {
        let (n, b) = shared
            .neighbours
            .keep(&shared.index, layer, offset, &bytes, &shared.tiers);
        kept += n;
        kept_bytes += b;
    }
    shared.stats.kept.fetch_add(kept, Ordering::Relaxed);
    shared
        .stats
        .kept_bytes
        .fetch_add(kept_bytes, Ordering::Relaxed);
    if let Some(span) = unfinished {
        finish_interval(shared, span);
    }
    drop(claims);
}

/// Inflate the rest of a cold read's checkpoint interval and keep the files in it.
fn finish_interval(shared: &Shared, mut span: SpanReader) {
    let (inflated0, fetched0) = (span.inflated, span.fetched());
    let layer = span.layer();
    let interval = span
        .position()
        .and_then(|at| Interval::containing(&shared.index, layer, at));
    let (mut kept, mut kept_bytes) = (0, 0);
    let r = span.finish_interval(&shared.index, &shared.neighbours, &mut |offset, bytes| {
        let (n, b) = shared
            .neighbours
            .keep(&shared.index, layer, offset, bytes, &shared.tiers);
        kept += n;
        kept_bytes += b;
    });
    match (r, interval) {
        (Ok(()), Some(iv)) => shared.ahead.mark_done(iv),
        (Ok(()), None) => {}
        (Err(e), _) => tracing::debug!(error = %e, "could not keep the rest of the interval"),
    }
    let s = &shared.stats;
    s.inflated
        .fetch_add(span.inflated - inflated0, Ordering::Relaxed);
    s.fetched
        .fetch_add(span.fetched() - fetched0, Ordering::Relaxed);
    s.kept.fetch_add(kept, Ordering::Relaxed);
    s.kept_bytes.fetch_add(kept_bytes, Ordering::Relaxed);
}

impl Filesystem for ClipFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_MAX_PAGES;
        // An image with POSIX ACLs gets them enforced by the kernel (mounts use
        // default_permissions), which then also caches them per inode. Without any, the
        // ACL names are unsupported like every name the image does not carry (see getxattr).
        let wanted = if self.image_has_acls() {
            wanted | InitFlags::FUSE_POSIX_ACL
        } else {
            wanted
        };
        let _ = config.add_capabilities(wanted & config.capabilities());
        let _ = config
            .set_max_readahead(MAX_READ)
            .or_else(|max| config.set_max_readahead(max));
        let _ = config.set_max_write(MAX_READ);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        tracing::debug!(capabilities = ?config.capabilities(), "FUSE session initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent, name) {
            Ok(Some(attr)) => reply.entry(&TTL, &attr, Generation(0)),
            // Inode 0 with a TTL: the kernel caches the negative lookup.
            Ok(None) => reply.entry(&TTL, &negative_attr(), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.entry_index(ino).and_then(|i| self.attr(i)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.entry_index(ino).and_then(|i| {
            let e = self.index().entry(i).map_err(|e| self.corrupt(i, e))?;
            if e.kind != Kind::Symlink as u8 {
                return Err(Errno::EINVAL);
            }
            Ok(e.link_target.as_slice())
        });
        match r {
            Ok(t) => reply.data(t),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        let i = match self.entry_index(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let reader = match FileReader::new(self.index(), i) {
            Ok(r) => {
                let (shared, pool) = (self.shared.clone(), self.ahead_pool.clone());
                let r = r
                    .with_neighbours(self.shared.neighbours.clone())
                    .with_cursor_park(self.shared.cursors.clone())
                    .with_read_ahead(self.shared.ahead.clone())
                    .with_job_sink(Arc::new(move |job| spawn_ahead(&pool, &shared, job)))
                    .defer_interval_finish();
                if self.shared.recorder.is_some() {
                    r.record_touches()
                } else {
                    r
                }
            }
            Err(ReadError::NotAFile(_)) => return reply.error(Errno::EINVAL),
            Err(e) => {
                tracing::error!(entry = i, error = %e, "cannot open file");
                return reply.error(Errno::EIO);
            }
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Arc::new(Mutex::new(reader)));
        self.shared.stats.opens.fetch_add(1, Ordering::Relaxed);
        self.shared
            .stats
            .open_handles
            .fetch_add(1, Ordering::Relaxed);
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let reader = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .cloned();
        let Some(reader) = reader else {
            return reply.error(Errno::EBADF);
        };
        let shared = self.shared.clone();
        let ahead_pool = self.ahead_pool.clone();
        self.pool
            .submit(move || match serve_read(&shared, &reader, offset, size) {
                Ok(served) => {
                    shared.stats.reads.fetch_add(1, Ordering::Relaxed);
                    shared
                        .stats
                        .read_bytes
                        .fetch_add(served.bytes.len() as u64, Ordering::Relaxed);
                    reply.data(&served.bytes);
                    for job in served.ahead {
                        spawn_ahead(&ahead_pool, &shared, job);
                    }
                    for job in served.cached.into_iter().flat_map(CachedJob::split) {
                        let shared = shared.clone();
                        ahead_pool.submit(move || {
                            shared.ahead.run_cached(&shared.tiers, job);
                            shared.stats.ahead_jobs.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                    after_reply(&shared, served.after);
                }
                Err(e) => {
                    shared.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    let path = entry_of(ino)
                        .and_then(|i| shared.index.path_of(i).ok())
                        .map(|p| String::from_utf8_lossy(&p).into_owned())
                        .unwrap_or_default();
                    if let Some(held_back) = READ_FAILED_LOG.check() {
                        tracing::error!(path, offset, size, error = %e, earlier_not_logged = held_back, "read failed");
                    }
                    reply.error(Errno::EIO);
                }
            });
    }

    /// Called on every close(2); nothing is buffered, so there is nothing to flush.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0)
            .is_some()
        {
            self.shared
                .stats
                .open_handles
                .fetch_sub(1, Ordering::Relaxed);
        }
        reply.ok();
    }

    /// ENOSYS: the kernel then stops sending OPENDIR/RELEASEDIR (zero-message opendir,
    /// kernel ≥ 5.1) and opens directories with FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR itself,
    /// so a warm `find` costs no round trip. readdir does not use the handle.
    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.directory(ino) {
            Ok(_) => reply.error(Errno::ENOSYS),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.each_dir_entry(ino, offset, |i, next, name| {
            let kind = self.index().entry(i).map_err(|e| self.corrupt(i, e))?.kind;
            let kind = file_type(kind).map_err(|e| self.corrupt(i, e))?;
            let ino = ino_of(self.index().inode_of(i).map_err(|e| self.corrupt(i, e))?);
            Ok(reply.add(ino, next, kind, OsStr::from_bytes(name)))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let r = self.each_dir_entry(ino, offset, |i, next, name| {
            let attr = self.attr(i)?;
            Ok(reply.add(
                attr.ino,
                next,
                OsStr::from_bytes(name),
                &TTL,
                &attr,
                Generation(0),
            ))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.index().entry_count() as u64;
        reply.statfs(
            self.total_blocks,
            0,
            0,
            files,
            0,
            attr::BLKSIZE,
            255,
            attr::BLKSIZE,
        );
    }

    /// An image without any extended attribute answers ENOSYS: the kernel then stops
    /// asking (`ls -l` looks up security.selinux and ACLs on every entry) and reports
    /// EOPNOTSUPP itself, which is what a filesystem without xattrs says. Otherwise a name
    /// that no entry of the image carries is unsupported (EOPNOTSUPP), like a namespace a
    /// filesystem does not implement: `ls -l` remembers that per filesystem instead of asking
    /// every entry for security.selinux and the POSIX ACLs again.
    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if self.no_xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let name = name.as_bytes();
        let acl = name == ACL_ACCESS || name == ACL_DEFAULT;
        let carried = if acl {
            self.image_has_acls()
        } else {
            self.image_xattr_names().contains(name)
        };
        if !carried {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let r = self.entry_index(ino).and_then(|i| {
            self.index()
                .xattrs(i)
                .map_err(|e| self.corrupt(i, e))
                .map(|xs| {
                    xs.iter()
                        .find(|x| x.name.as_slice() == name)
                        .map(|x| x.value.as_slice())
                })
        });
        match r {
            Ok(Some(v)) => Self::xattr_reply(v, size, reply),
            Ok(None) => reply.error(Errno::NO_XATTR),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if self.no_xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let r = self.entry_index(ino).and_then(|i| {
            self.index()
                .xattrs(i)
                .map_err(|e| self.corrupt(i, e))
                .map(|xs| {
                    let mut names = Vec::new();
                    for x in xs {
                        names.extend_from_slice(x.name.as_slice());
                        names.push(0);
                    }
                    names
                })
        });
        match r {
            Ok(names) => Self::xattr_reply(&names, size, reply),
            Err(e) => reply.error(e),
        }
    }

    /// Permission checks are the kernel's (`default_permissions`); only writes are refused.
    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.entry_index(ino) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _r: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _t: &Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _req: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _i: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _o: u64,
        _l: u64,
        _m: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    /// No ioctl applies to an image's files: ENOTTY, as for any regular file. Python asks
    /// (`isatty`) at every `open()`; fuser's default would log a warning each time.
    fn ioctl(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _f: IoctlFlags,
        _cmd: u32,
        _in: &[u8],
        _out: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    /// `SEEK_DATA` and `SEEK_HOLE` (the kernel answers the other whences itself, and asks
    /// these of `cp` and `tar`): an image's files have no holes.
    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let size = match self.entry_index(ino).and_then(|i| self.attr(i)) {
            Ok(attr) => attr.size,
            Err(e) => return reply.error(e),
        };
        let inside = u64::try_from(offset).is_ok_and(|o| o < size);
        match whence {
            libc::SEEK_DATA if inside => reply.offset(offset),
            libc::SEEK_HOLE if inside => reply.offset(size as i64),
            libc::SEEK_DATA | libc::SEEK_HOLE => reply.error(Errno::ENXIO),
            _ => reply.error(Errno::EINVAL),
        }
    }

    /// Nothing to write back.
    fn fsync(&self, _req: &Request, _i: INodeNo, _fh: FileHandle, _d: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    /// Nothing to write back.
    fn fsyncdir(&self, _req: &Request, _i: INodeNo, _fh: FileHandle, _d: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    /// A copy inside the mount writes to it.
    fn copy_file_range(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _o: u64,
        _io: INodeNo,
        _fho: FileHandle,
        _oo: u64,
        _l: u64,
        _f: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }
}

/// Attributes with inode 0: a cacheable "does not exist".
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

/// Fail with [`FuseError::StaleMount`] if `mountpoint` is a dead FUSE mount, or another
/// error if it is not a directory. `statfs` is asked too because the kernel may answer
/// `stat` of a dead mount from its attribute cache, while `statfs` always reaches the
/// daemon and fails with ENOTCONN.
pub fn check_mountpoint(mountpoint: &Path) -> Result<(), FuseError> {
    let path = mountpoint.display().to_string();
    match std::fs::metadata(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(FuseError::StaleMount(path))
        }
        Err(source) => return Err(FuseError::Mountpoint { path, source }),
        Ok(m) if !m.is_dir() => {
            return Err(FuseError::Mountpoint {
                path,
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            })
        }
        Ok(_) => {}
    }
    match nix::sys::statfs::statfs(mountpoint) {
        Err(nix::Error::ENOTCONN) => Err(FuseError::StaleMount(path)),
        Err(e) => Err(FuseError::Mountpoint {
            path,
            source: e.into(),
        }),
        Ok(_) => Ok(()),
    }
}

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountSettings {
    /// Session threads reading requests from the kernel (metadata is answered there).
    pub session_threads: usize,
    /// Name shown as the mount source (`findmnt`, `/proc/mounts`).
    pub fsname: String,
    /// Readahead window to set on the mount's backing device, in KiB (0 keeps the kernel's).
    pub readahead_kb: u32,
}

/// Mount `fs` at `mountpoint` read-only (suid and device nodes honoured, permissions checked
/// by the kernel, other users allowed) and start serving in the background.
pub fn mount(
    fs: ClipFs,
    mountpoint: &Path,
    settings: &MountSettings,
) -> Result<fuser::BackgroundSession, FuseError> {
    check_mountpoint(mountpoint)?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(settings.fsname.clone()),
        MountOption::Subtype("clip".into()),
        MountOption::RO,
        MountOption::Suid,
        MountOption::Dev,
        MountOption::Exec,
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(settings.session_threads.max(1));
    config.clone_fd = settings.session_threads > 1;
    let err = |source| FuseError::Mount {
        path: mountpoint.display().to_string(),
        source,
    };
    let session = fuser::Session::new(fs, mountpoint, &config).map_err(err)?;
    let bg = session.spawn().map_err(err)?;
    if settings.readahead_kb > 0 {
        if let Err(e) = set_readahead(mountpoint, settings.readahead_kb) {
            tracing::warn!(error = %e, "cannot raise the mount's readahead; sequential reads will use the kernel default");
        }
    }
    Ok(bg)
}

/// Set the readahead window of the FUSE mount at `mountpoint` (its backing device info in
/// sysfs; the FUSE INIT reply cannot raise it above the kernel's 128 KiB offer).
pub fn set_readahead(mountpoint: &Path, kb: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint)?.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    std::fs::write(
        format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
        kb.to_string(),
    )
}

/// Unmount `mountpoint`; when it is busy and `lazy_if_busy`, detach it instead (it goes
/// away once its last user leaves).
pub fn unmount(mountpoint: &Path, lazy_if_busy: bool) -> Result<(), FuseError> {
    use nix::mount::{umount2, MntFlags};
    let err = |e: nix::Error| FuseError::Unmount {
        path: mountpoint.display().to_string(),
        source: e.into(),
    };
    match umount2(mountpoint, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::Error::EBUSY) if lazy_if_busy => {
            tracing::warn!(mountpoint = %mountpoint.display(), "mount is busy; detaching it lazily");
            umount2(mountpoint, MntFlags::MNT_DETACH).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}
