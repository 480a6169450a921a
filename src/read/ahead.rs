//! Read-ahead for cold sequential reads: while a reader consumes one checkpoint interval,
//! the next intervals of the same file are inflated by other threads, each resuming at its
//! own checkpoint, so a large file is inflated on every core instead of one.
//!
//! A job inflates exactly one interval (from its checkpoint to the next one). The pieces
//! inside it that the job was started for (the reading file's, or all of them for a
//! profile prefetch) wait in memory for their reader, who verifies them as it verifies
//! everything it serves and caches them; other pieces are verified and stored in the tiers. A piece that crosses the boundary between two intervals
//! is put together from the halves the two jobs leave behind. Readers wait for a running job
//! that covers their piece instead of inflating the same bytes again. Which thread runs a
//! job is the caller's choice (`fuse` uses a small pool of its own).

use super::file::{store_served, verify, PieceAt, Tier};
use super::neighbours::Neighbours;
use super::span::SpanReader;
use super::ReadError;
use crate::format::IndexFile;
use crate::source::Source;
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// One checkpoint interval of a layer: from checkpoint `checkpoint` to the next one (or the
/// end of the layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Interval {
    /// Layer number.
    pub layer: u32,
    /// Number of the checkpoint the interval starts at.
    pub checkpoint: u32,
}

impl Interval {
    /// The interval of `layer` holding uncompressed offset `offset` (none for a layer
    /// without checkpoints).
    pub fn containing(index: &IndexFile, layer: u32, offset: u64) -> Option<Interval> {
        let k = index.checkpoint_index_before(layer, offset).ok()??;
        Some(Interval {
            layer,
            checkpoint: k as u32,
        })
    }
}

/// A read-ahead job: an interval to inflate on behalf of the file occupying `want` (a
/// range of the layer's uncompressed stream), whose pieces are held for its reader.
#[derive(Clone, Copy, Debug)]
pub struct Job {
    /// The interval to inflate.
    pub interval: Interval,
    /// Uncompressed range of the file that asked for it.
    pub want: (u64, u64),
    /// Whether the job verifies the pieces it holds for the reader (a sequential reader
    /// takes them all, and hashing them right after inflating, on the job's thread,
    /// takes that work off the reader's path) or leaves that to whoever takes them (a
    /// profile's intervals hold many pieces nobody reads).
    pub verify_held: bool,
}

/// What a job did, for statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobStats {
    /// Uncompressed bytes inflated.
    pub inflated: u64,
    /// Compressed bytes received from the source.
    pub fetched: u64,
    /// Pieces verified and stored in the tiers.
    pub kept: u64,
    /// Their bytes.
    pub kept_bytes: u64,
}

/// Intervals larger than this are not read ahead (a crafted index could claim any size).
const MAX_INTERVAL: u64 = 64 << 20;

/// Seams kept waiting for their other half before the oldest are dropped.
const MAX_SEAMS: usize = 256;

/// Remembered finished intervals before the memory is cleared.
const MAX_DONE: usize = 1 << 16;

/// Shared read-ahead state of one mounted index.
pub struct ReadAhead {
    state: Mutex<State>,
    changed: Condvar,
    window: u64,
    ready_budget: u64,
}

#[derive(Default)]
struct State {
    /// Intervals being inflated, with their uncompressed ranges.
    running: HashMap<Interval, (u64, u64)>,
    /// Intervals inflated before (not claimed again).
    done: HashSet<Interval>,
    /// Pieces waiting for their reader, oldest first in `order`.
    ready: HashMap<[u8; 32], Held>,
    /// Pieces a cached-piece job is reading.
    running_keys: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
    ready_bytes: u64,
    /// Halves of pieces crossing an interval boundary, by (layer, piece offset in the layer).
    seams: HashMap<(u32, u64), Seam>,
}

/// A piece held for its reader.
#[derive(Clone, Debug)]
pub struct Held {
    /// The bytes.
    pub bytes: Bytes,
    /// Whether the job already checked them against the piece's sha256.
    pub verified: bool,
}

/// A read-ahead job for pieces already in the cache tiers: `(sha256, length)` of each, to
/// be read and verified on another thread so that a sequential warm reader only copies.
#[derive(Clone, Debug)]
pub struct CachedJob {
    /// The pieces, in file order.
    pub pieces: Vec<([u8; 32], u64)>,
}

impl CachedJob {
    /// One job per piece, in file order, so that several threads verify them at once.
    pub fn split(self) -> impl Iterator<Item = CachedJob> {
        self.pieces
            .into_iter()
            .map(|p| CachedJob { pieces: vec![p] })
    }
}

/// Un-marks a cached-piece job's keys when dropped (also on panic), waking readers.
struct KeysClaim<'a> {
    ahead: &'a ReadAhead,
    keys: Vec<[u8; 32]>,
}

impl Drop for KeysClaim<'_> {
    fn drop(&mut self) {
        let mut s = self.ahead.lock();
        for k in &self.keys {
            s.running_keys.remove(k);
        }
        drop(s);
        self.ahead.changed.notify_all();
    }
}

/// The two halves of a piece that crosses the boundary at `boundary`.
struct Seam {
    boundary: u64,
    before: Option<Vec<u8>>,
    after: Option<Vec<u8>>,
}

/// Marks an interval as running; un-marks it (and wakes waiting readers) when dropped, also
/// when the job fails or panics, so that no reader waits forever.
struct Claim<'a> {
    ahead: &'a ReadAhead,
    interval: Interval,
    finished: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut s = self.ahead.lock();
        s.running.remove(&self.interval);
        if self.finished {
            if s.done.len() >= MAX_DONE {
                s.done.clear();
            }
            s.done.insert(self.interval);
        }
        drop(s);
        self.ahead.changed.notify_all();
    }
}

/// An interval a reader is inflating from the origin (see [`ReadAhead::claim_for_reader`]):
/// other readers of pieces in it wait for it instead of fetching the same bytes again.
/// Dropping the claim releases the interval and wakes them.
pub struct ReaderClaim {
    ahead: Arc<ReadAhead>,
    interval: Interval,
}

impl ReaderClaim {
    /// The claimed interval.
    pub fn interval(&self) -> Interval {
        self.interval
    }
}

impl Drop for ReaderClaim {
    fn drop(&mut self) {
        self.ahead.lock().running.remove(&self.interval);
        self.ahead.changed.notify_all();
    }
}

impl ReadAhead {
    /// Read-ahead that keeps up to `window` bytes ahead of each cold sequential reader in
    /// flight and holds at most `ready_budget` bytes of pieces for readers.
    pub fn new(window: u64, ready_budget: u64) -> Arc<ReadAhead> {
        Arc::new(ReadAhead {
            state: Mutex::default(),
            changed: Condvar::new(),
            window,
            ready_budget,
        })
    }

    /// How far ahead of a reader jobs are planned.
    pub fn window(&self) -> u64 {
        self.window
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claim the intervals of `layer` that intersect `span` (from, to), except the one holding
    /// `skip` (where the reader's own inflate cursor is), for a reader of the file at
    /// `want`; a job stops at the end of `want` if its interval goes on past it. The
    /// returned jobs are the caller's to run with [`ReadAhead::run`]. `useful(start, end)`
    /// says whether an interval's uncompressed range is worth a job (e.g. whether it holds
    /// bytes of the reader's file that the reader will not inflate itself).
    pub fn plan(
        &self,
        index: &IndexFile,
        layer: u32,
        (from, to): (u64, u64),
        skip: Option<u64>,
        want: (u64, u64),
        useful: impl Fn(u64, u64) -> bool,
    ) -> Vec<Job> {
        let Ok(l) = index.layer(layer) else {
            return Vec::new();
        };
        let cps = &l.checkpoints;
        if cps.is_empty() || from >= to {
            return Vec::new();
        }
        let containing = |off: u64| index.checkpoint_index_before(layer, off).ok().flatten();
        let first = containing(from).unwrap_or(0);
        let last = cps.partition_point(|c| c.out_offset.to_native() < to);
        let skip = skip.and_then(containing);
        // Index pages may have to come from disk: look at them before taking the lock.
        let useful: Vec<usize> = (first..last)
            .filter(|&j| Some(j) != skip)
            .filter(|&j| {
                index
                    .interval_range(layer, j)
                    .ok()
                    .flatten()
                    .is_some_and(|(a, b)| useful(a, b))
            })
            .collect();
        let jobs: Vec<Job> = {
            let mut s = self.lock();
            useful
                .into_iter()
                .filter_map(|j| {
                    Self::try_claim(
                        &mut s,
                        index,
                        Interval {
                            layer,
                            checkpoint: j as u32,
                        },
                        want,
                        want.1,
                        true,
                    )
                })
                .collect()
        };
        // Their windows are read in one batch each while the jobs wait for a thread.
        for job in &jobs {
            index.will_need_window(layer, job.interval.checkpoint as usize);
        }
        jobs
    }

    /// Claim `interval` alone (see [`ReadAhead::plan`]), unless it is running or done; the
    /// job stops at uncompressed offset `until` if that comes before the interval's end.
    pub fn claim(
        &self,
        index: &IndexFile,
        interval: Interval,
        want: (u64, u64),
        until: u64,
    ) -> Option<Job> {
        Self::try_claim(&mut self.lock(), index, interval, want, until, false)
    }

    fn try_claim(
        s: &mut State,
        index: &IndexFile,
        interval: Interval,
        want: (u64, u64),
        until: u64,
        verify_held: bool,
    ) -> Option<Job> {
        let (start, end) = index
            .interval_range(interval.layer, interval.checkpoint as usize)
            .ok()??;
        let end = end.min(until);
        if end <= start
            || end - start > MAX_INTERVAL
            || s.running.contains_key(&interval)
            || s.done.contains(&interval)
        {
            return None;
        }
        s.running.insert(interval, (start, end));
        Some(Job {
            interval,
            want,
            verify_held,
        })
    }

    /// Claim `interval` for a reader about to inflate the bytes `piece` (an uncompressed
    /// range starting in it) from the origin, unless a job or another reader is inflating
    /// the interval or the piece's first byte, or a job did the interval and another is
    /// still inflating the piece's tail (the two halves make the piece): then `None`, and
    /// the caller waits with [`ReadAhead::wait`] and looks in the tiers again. A job
    /// covering only the tail of a piece that starts where no job ran is no reason to
    /// wait: the reader would have to inflate the whole piece after waiting anyway. Unlike
    /// [`ReadAhead::claim`], an interval inflated before can be claimed again (its pieces
    /// may have left the caches since).
    pub fn claim_for_reader(
        self: &Arc<Self>,
        index: &IndexFile,
        interval: Interval,
        piece: (u64, u64),
    ) -> Option<ReaderClaim> {
        let (start, end) = index
            .interval_range(interval.layer, interval.checkpoint as usize)
            .ok()??;
        let mut s = self.lock();
        // Waiting is worth it when jobs produce the piece's start (running, or done and
        // waiting in a seam for the half a running job is still inflating).
        let start_by_job = Self::covered(&s, interval.layer, piece.0, piece.0 + 1)
            || (s.done.contains(&interval) && Self::covered(&s, interval.layer, piece.0, piece.1));
        if s.running.contains_key(&interval) || start_by_job {
            return None;
        }
        s.running.insert(interval, (start, end));
        Some(ReaderClaim {
            ahead: self.clone(),
            interval,
        })
    }

    /// Note that `interval` was inflated to its end by someone else (a reader finishing
    /// its interval), so that no job does it again.
    pub fn mark_done(&self, interval: Interval) {
        let mut s = self.lock();
        if s.done.len() >= MAX_DONE {
            s.done.clear();
        }
        s.done.insert(interval);
    }

    /// Wait until no running job or claiming reader covers any byte of `[start, end)` of
    /// `layer`, or a job holds the piece `sha256` (jobs hand pieces over as they finish
    /// them, before their interval is done).
    pub fn wait(&self, layer: u32, start: u64, end: u64, sha256: &[u8; 32]) {
        let mut s = self.lock();
        while Self::covered(&s, layer, start, end) && !s.ready.contains_key(sha256) {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn covered(s: &State, layer: u32, start: u64, end: u64) -> bool {
        s.running
            .iter()
            .any(|(iv, &(a, b))| iv.layer == layer && a < end && start < b)
    }

    /// Wait until no cached-piece job is reading the piece `sha256`.
    pub fn wait_key(&self, sha256: &[u8; 32]) {
        let mut s = self.lock();
        while s.running_keys.contains(sha256) {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The piece `sha256` if a job left it for its reader (taken out of memory). Unless
    /// `verified` says so, the caller checks it against `sha256` before using it.
    pub fn take(&self, sha256: &[u8; 32]) -> Option<Held> {
        let mut s = self.lock();
        let held = s.ready.remove(sha256)?;
        s.ready_bytes -= held.bytes.len() as u64;
        Some(held)
    }

    /// Claim `pieces` (sha256, length) that no job is reading or holding yet, for a
    /// [`CachedJob`]; `None` when nothing is left to claim.
    pub fn claim_cached(
        &self,
        pieces: impl IntoIterator<Item = ([u8; 32], u64)>,
    ) -> Option<CachedJob> {
        let mut s = self.lock();
        let mut claimed = Vec::new();
        for (key, len) in pieces {
            if !s.ready.contains_key(&key) && s.running_keys.insert(key) {
                claimed.push((key, len));
            }
        }
        (!claimed.is_empty()).then_some(CachedJob { pieces: claimed })
    }

    /// Run `job`: read each piece from the first tier that has it right (verified), copy
    /// it into the tiers before that one, and hold it, verified, for its reader, who stops
    /// waiting for it then (not at the end of the job). Returns the number of pieces held.
    pub fn run_cached(&self, tiers: &[Arc<dyn Tier>], job: CachedJob) -> u64 {
        let mut claim = KeysClaim {
            ahead: self,
            keys: job.pieces.iter().map(|(k, _)| *k).collect(),
        };
        let mut held = 0;
        for (key, len) in job.pieces {
            let found = tiers.iter().enumerate().find_map(|(i, t)| {
                let b = t.get(&key)?;
                // A wrong piece is left for the reader, who drops and counts it.
                (b.len() as u64 == len && verify(&b, &key)).then_some((i, b))
            });
            if let Some((i, b)) = &found {
                for lower in &tiers[..*i] {
                    lower.put(&key, b);
                }
            }
            let mut s = self.lock();
            if let Some((_, bytes)) = found {
                self.hold(
                    &mut s,
                    key,
                    Held {
                        bytes,
                        verified: true,
                    },
                );
                held += 1;
            }
            s.running_keys.remove(&key);
            drop(s);
            claim.keys.retain(|k| *k != key);
            self.changed.notify_all();
        }
        held
    }

    /// Run `job`: inflate its interval piece by piece, handing each piece over as soon as
    /// it is whole: the wanted ones held in memory for their reader (verified first when
    /// `job.verify_held`; otherwise [`ReadAhead::take`] callers verify), the others
    /// verified into `tiers`; pieces crossing its boundaries are put together with the
    /// neighbouring job's half. Bytes after the last piece are not inflated. Failures only
    /// cost the reader a fetch of its own.
    pub fn run(
        &self,
        index: &IndexFile,
        source: &dyn Source,
        tiers: &[Arc<dyn Tier>],
        neighbours: &Neighbours,
        job: Job,
    ) -> Result<JobStats, ReadError> {
        let iv = job.interval;
        let (start, end) = match self.lock().running.get(&iv) {
            Some(&range) => range,
            None => return Ok(JobStats::default()),
        };
        let mut claim = Claim {
            ahead: self,
            interval: iv,
            finished: false,
        };
        let mut span = SpanReader::new(iv.layer);
        let mut stats = JobStats::default();
        let pieces = neighbours.located(index, iv.layer);
        let first = pieces.partition_point(|p| p.offset + p.len <= start);
        // Inflated bytes not handed out yet: `rest[..filled]`, starting at offset `base`.
        let mut rest = BytesMut::zeroed((end - start) as usize);
        let (mut base, mut filled) = (start, 0usize);
        for p in pieces[first..].iter().take_while(|p| p.offset < end) {
            let (a, b) = (p.offset, p.offset + p.len);
            let upto = (b.min(end) - base) as usize;
            if upto > filled {
                let read = span.read_at(
                    index,
                    source,
                    base + filled as u64,
                    &mut rest[filled..upto],
                    None,
                    &mut |_, _| {},
                );
                stats.inflated = span.inflated;
                stats.fetched = span.fetched();
                read?;
                filled = upto;
            }
            let done = rest.split_to(upto).freeze();
            let from = base;
            base += upto as u64;
            filled -= upto;
            let bytes = if start <= a && b <= end {
                done.slice((a - from) as usize..)
            } else {
                let half = &done[(a.max(start) - from) as usize..];
                match self.seam(iv.layer, a, p.len, start, end, half) {
                    Some(whole) => Bytes::from(whole),
                    None => continue,
                }
            };
            self.deliver(&job, a, bytes, &p.sha256, tiers, &mut stats);
        }
        claim.finished = true;
        Ok(stats)
    }

    /// Hand over the whole piece at `offset`: held for the job's reader when it lies in
    /// the reader's file, else verified into `tiers`.
    fn deliver(
        &self,
        job: &Job,
        offset: u64,
        bytes: Bytes,
        sha256: &[u8; 32],
        tiers: &[Arc<dyn Tier>],
        stats: &mut JobStats,
    ) {
        let wanted = job.want.0 <= offset && offset < job.want.1;
        let verified = !wanted || job.verify_held;
        if verified {
            if !verify(&bytes, sha256) {
                tracing::debug!(
                    layer = job.interval.layer,
                    offset,
                    "read-ahead piece does not verify; leaving it to the reader"
                );
                return;
            }
            if wanted {
                let at = PieceAt {
                    layer: job.interval.layer,
                    offset,
                    len: bytes.len() as u64,
                };
                store_served(tiers, sha256, at, &bytes);
            } else {
                for t in tiers {
                    t.put(sha256, &bytes);
                }
            }
        }
        if wanted {
            let mut s = self.lock();
            self.hold(&mut s, *sha256, Held { bytes, verified });
            drop(s);
            self.changed.notify_all();
        } else {
            stats.kept += 1;
            stats.kept_bytes += bytes.len() as u64;
        }
    }

    /// Deposit `half`, this job's part of the piece at `offset` (length `len`) that
    /// crosses one of the job's boundaries (`start` or `end`); the whole piece once the
    /// other half is there.
    fn seam(
        &self,
        layer: u32,
        offset: u64,
        len: u64,
        start: u64,
        end: u64,
        half: &[u8],
    ) -> Option<Vec<u8>> {
        let (boundary, is_before) = if offset < start {
            (start, false)
        } else {
            (end, true)
        };
        if offset < start && offset + len > end {
            return None; // spans the whole interval: a piece larger than an interval
        }
        let mut s = self.lock();
        if s.seams.len() >= MAX_SEAMS {
            s.seams.clear();
        }
        let seam = s.seams.entry((layer, offset)).or_insert(Seam {
            boundary,
            before: None,
            after: None,
        });
        if seam.boundary != boundary {
            return None;
        }
        if is_before {
            seam.before = Some(half.to_vec());
        } else {
            seam.after = Some(half.to_vec());
        }
        if seam.before.is_some() && seam.after.is_some() {
            let seam = s.seams.remove(&(layer, offset))?;
            let mut whole = seam.before?;
            whole.extend_from_slice(&seam.after?);
            return (whole.len() as u64 == len).then_some(whole);
        }
        None
    }

    /// Hold a piece for its reader, dropping the oldest past the budget.
    fn hold(&self, s: &mut State, key: [u8; 32], piece: Held) {
        let len = piece.bytes.len() as u64;
        if len > self.ready_budget {
            return;
        }
        if let Some(old) = s.ready.insert(key, piece) {
            s.ready_bytes -= old.bytes.len() as u64;
        } else {
            s.order.push_back(key);
        }
        s.ready_bytes += len;
        while s.ready_bytes > self.ready_budget {
            let Some(k) = s.order.pop_front() else { break };
            if let Some(old) = s.ready.remove(&k) {
                s.ready_bytes -= old.bytes.len() as u64;
            }
        }
        if s.order.len() > 4 * s.ready.len() + 64 {
            let ready = &s.ready;
            let order: VecDeque<[u8; 32]> = s
                .order
                .iter()
                .filter(|k| ready.contains_key(*k))
                .copied()
                .collect();
            s.order = order;
        }
    }
}
