//! Write-behind in front of a slower tier: `put` hands the piece to a background writer and
//! returns at once, so a cold read that keeps hundreds of neighbouring files does not wait
//! for hundreds of file creations. Pieces still waiting are served from memory. The writer
//! starts once no piece has come for a quiet period (a burst of cold reads is over) or half
//! the byte budget is waiting: file creations take CPU time that the burst's readers, the
//! registry and the reading process need (a cold `import numpy` created 3 400 files, a third
//! of the machine's CPU time, at nice 19). When more than the byte budget is waiting, `put`
//! writes synchronously (back-pressure, nothing lost).
//!
//! Given a [`Rebuild`] (the origin is local, so reading a piece again costs no network and
//! no bytes), large pieces are not held at all: `put_later` notes where they lie and the
//! writer rebuilds them from the origin when it runs. Holding a cold `cat`'s 35 MB until
//! then put every piece in fresh memory, about a tenth of that read's time in page faults.
//! A noted piece read again before the writer came is held from then on.

use crate::read::{PieceAt, Rebuild, Tier};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A piece waiting for the writer.
enum Waiting {
    /// Its bytes, served from memory meanwhile.
    Held(Bytes),
    /// Where it lies in the image, to be rebuilt by the writer.
    Later(PieceAt),
}

struct Pending {
    pieces: Mutex<HashMap<[u8; 32], Waiting>>,
    /// Bytes held (`Waiting::Held`).
    bytes: AtomicU64,
    /// Bytes noted to be rebuilt (`Waiting::Later`).
    later_bytes: AtomicU64,
    /// When the last piece came, in microseconds since `epoch`.
    last_put: AtomicU64,
    epoch: Instant,
    /// Set by `flush`: write without waiting for a quiet period.
    flushing: AtomicBool,
}

impl Pending {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 32], Waiting>> {
        self.pieces.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleep until no piece has come for `quiet`, or `urgent` bytes are waiting.
    fn wait_for_quiet(&self, quiet: Duration, urgent: u64) {
        let quiet = quiet.as_micros() as u64;
        loop {
            let since = self
                .now()
                .saturating_sub(self.last_put.load(Ordering::Relaxed));
            if since >= quiet
                || self.bytes.load(Ordering::Relaxed) >= urgent
                || self.flushing.load(Ordering::Relaxed)
            {
                return;
            }
            std::thread::sleep(Duration::from_micros((quiet - since).min(20_000)));
        }
    }

    /// Forget `key` once written (or given up), with its share of the counters.
    fn done(&self, key: &[u8; 32]) {
        match self.lock().remove(key) {
            Some(Waiting::Held(b)) => {
                self.bytes.fetch_sub(b.len() as u64, Ordering::Relaxed);
            }
            Some(Waiting::Later(at)) => {
                self.later_bytes.fetch_sub(at.len, Ordering::Relaxed);
            }
            None => {}
        }
    }
}

/// How [`WriteBehind`] may rebuild pieces instead of holding them.
pub struct RebuildLater {
    /// Reads pieces again from the origin.
    pub rebuild: Arc<dyn Rebuild>,
    /// Pieces at least this large are rebuilt; smaller ones are held.
    pub min_len: u64,
    /// At most this many bytes are noted to be rebuilt (each costs the writer time, and
    /// `flush` rebuilds them all); past that pieces are held.
    pub max_bytes: u64,
}

/// A [`Tier`] that delays writes to `inner` onto a background thread.
pub struct WriteBehind {
    inner: Arc<dyn Tier>,
    pending: Arc<Pending>,
    budget: u64,
    later: Option<(u64, u64)>,
    tx: Mutex<Option<Sender<[u8; 32]>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl WriteBehind {
    /// Wrap `inner`, letting at most `budget` bytes wait in memory; the writer waits for
    /// `quiet` without new pieces (or for half the budget to be waiting) before it writes.
    /// With `later`, large pieces are rebuilt by the writer rather than held.
    pub fn new(
        inner: Arc<dyn Tier>,
        budget: u64,
        quiet: Duration,
        later: Option<RebuildLater>,
    ) -> std::io::Result<WriteBehind> {
        let pending = Arc::new(Pending {
            pieces: Mutex::new(HashMap::new()),
            bytes: AtomicU64::new(0),
            later_bytes: AtomicU64::new(0),
            last_put: AtomicU64::new(0),
            epoch: Instant::now(),
            flushing: AtomicBool::new(false),
        });
        let (tx, rx) = channel::<[u8; 32]>();
        let (p, t) = (pending.clone(), inner.clone());
        let limits = later.as_ref().map(|l| (l.min_len, l.max_bytes));
        let rebuild = later.map(|l| l.rebuild);
        let worker = std::thread::Builder::new()
            .name("clip-cache-writer".into())
            .spawn(move || {
                // Writing is never what a reading process waits for (pending pieces are served
                // from memory), so it gets the CPU after the threads serving reads.
                if let Err(e) = crate::raw::sched::set_current_thread_nice(19) {
                    tracing::debug!(error = %e, "cannot lower the cache writer's priority");
                }
                for key in rx {
                    p.wait_for_quiet(quiet, budget / 2);
                    let held = match p.lock().get(&key) {
                        Some(Waiting::Held(b)) => Some(b.clone()),
                        Some(Waiting::Later(_)) => None,
                        None => continue,
                    };
                    match (held, &rebuild) {
                        (Some(piece), _) => {
                            t.put(&key, &piece);
                            p.done(&key);
                        }
                        (None, Some(rebuild)) => {
                            // Batches go in image order: until one holds this piece, pausing
                            // for reads between them.
                            write_rebuilt(&p, t.as_ref(), rebuild.as_ref());
                            while matches!(p.lock().get(&key), Some(Waiting::Later(_))) {
                                p.wait_for_quiet(quiet, budget / 2);
                                write_rebuilt(&p, t.as_ref(), rebuild.as_ref());
                            }
                        }
                        (None, None) => p.done(&key),
                    }
                }
            })?;
        Ok(WriteBehind {
            inner,
            pending,
            budget,
            later: limits,
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Bytes waiting for the writer: held in memory, and noted to be rebuilt.
    pub fn waiting(&self) -> (u64, u64) {
        (
            self.pending.bytes.load(Ordering::Relaxed),
            self.pending.later_bytes.load(Ordering::Relaxed),
        )
    }

    /// Write everything still waiting and stop the writer (at once, without waiting for a
    /// quiet period).
    pub fn flush(&self) {
        self.pending.flushing.store(true, Ordering::Relaxed);
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }

    /// Queue `key` for the writer as `waiting`, unless it waits already. `false` if the
    /// writer is gone.
    fn queue(&self, key: &[u8; 32], waiting: Waiting) -> bool {
        let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return false;
        };
        let mut pieces = self.pending.lock();
        match (pieces.get(key), &waiting) {
            // Noted to be rebuilt and read again meanwhile: hold it now, as it is wanted.
            (Some(Waiting::Later(at)), Waiting::Held(b)) => {
                self.pending
                    .later_bytes
                    .fetch_sub(at.len, Ordering::Relaxed);
                self.pending
                    .bytes
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                pieces.insert(*key, waiting);
                return true;
            }
            (Some(_), _) => return true,
            (None, _) => {}
        }
        match &waiting {
            Waiting::Held(b) => self
                .pending
                .bytes
                .fetch_add(b.len() as u64, Ordering::Relaxed),
            Waiting::Later(at) => self
                .pending
                .later_bytes
                .fetch_add(at.len, Ordering::Relaxed),
        };
        pieces.insert(*key, waiting);
        self.pending
            .last_put
            .store(self.pending.now(), Ordering::Relaxed);
        drop(pieces);
        if tx.send(*key).is_err() {
            self.pending.done(key);
            return false;
        }
        true
    }
}

/// Rebuilt in one go at most (the writer looks for a pause in reads again between batches).
const REBUILD_BATCH: u64 = 32 << 20;

/// Rebuild the first [`REBUILD_BATCH`] bytes of the pieces noted for later, in image order
/// (one inflate cursor runs through a file's pieces), and write them to `inner`.
fn write_rebuilt(pending: &Pending, inner: &dyn Tier, rebuild: &dyn Rebuild) {
    let mut batch: Vec<([u8; 32], PieceAt)> = pending
        .lock()
        .iter()
        .filter_map(|(k, w)| match w {
            Waiting::Later(at) => Some((*k, *at)),
            Waiting::Held(_) => None,
        })
        .collect();
    batch.sort_by_key(|(_, at)| *at);
    let mut bytes = 0;
    let take = batch
        .iter()
        .take_while(|(_, at)| {
            bytes += at.len;
            bytes - at.len < REBUILD_BATCH
        })
        .count();
    batch.truncate(take);
    rebuild.rebuild(&batch, &mut |key, bytes| inner.put(key, &bytes));
    for (key, _) in &batch {
        pending.done(key);
    }
}

impl Tier for WriteBehind {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn get(&self, key: &[u8; 32]) -> Option<Bytes> {
        let waiting = match self.pending.lock().get(key) {
            Some(Waiting::Held(b)) => Some(b.clone()),
            _ => None,
        };
        waiting.or_else(|| self.inner.get(key))
    }

    fn contains(&self, key: &[u8; 32]) -> bool {
        matches!(self.pending.lock().get(key), Some(Waiting::Held(_))) || self.inner.contains(key)
    }

    fn is_local(&self) -> bool {
        self.inner.is_local()
    }

    fn put(&self, key: &[u8; 32], bytes: &Bytes) {
        let len = bytes.len() as u64;
        let room = self.pending.bytes.load(Ordering::Relaxed) + len <= self.budget;
        if !(room && self.queue(key, Waiting::Held(bytes.clone()))) {
            self.inner.put(key, bytes);
        }
    }

    fn put_later(&self, key: &[u8; 32], at: PieceAt) -> bool {
        let Some((min_len, max_bytes)) = self.later else {
            return false;
        };
        if at.len < min_len {
            return false;
        }
        match self.pending.lock().get(key) {
            // Read again before the writer came: the caller holds it instead (see `queue`),
            // so that further reads find it in memory rather than inflate it once more.
            Some(Waiting::Later(_)) => return false,
            Some(Waiting::Held(_)) => return true,
            None => {}
        }
        self.pending.later_bytes.load(Ordering::Relaxed) + at.len <= max_bytes
            && self.queue(key, Waiting::Later(at))
    }

    fn remove(&self, key: &[u8; 32]) {
        self.pending.done(key);
        self.inner.remove(key);
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::DiskCache;
    use sha2::{Digest, Sha256};

    #[test]
    fn pieces_are_readable_at_once_and_reach_the_inner_tier() {
        let (_dir, disk, wb) = behind_disk(1 << 20, Duration::from_millis(5));
        let mut keys = Vec::new();
        for i in 0..200u32 {
            let data = format!("piece {i}").repeat(100).into_bytes();
            let key: [u8; 32] = Sha256::digest(&data).into();
            wb.put(&key, &Bytes::copy_from_slice(&data));
            assert_eq!(
                wb.get(&key).as_deref(),
                Some(&data[..]),
                "readable right after put"
            );
            keys.push((key, data));
        }
        // Far more than the 1 MiB budget: some were written synchronously.
        let big = vec![7u8; 900 << 10];
        let big_key: [u8; 32] = Sha256::digest(&big).into();
        wb.put(&big_key, &Bytes::copy_from_slice(&big));
        wb.put(&big_key, &Bytes::copy_from_slice(&big));
        wb.flush();
        for (k, v) in &keys {
            assert_eq!(
                disk.get(k).as_deref(),
                Some(&v[..]),
                "written behind to disk"
            );
        }
        assert_eq!(disk.get(&big_key).as_deref(), Some(&big[..]));
        assert_eq!(wb.pending.bytes.load(Ordering::Relaxed), 0);
    }

    /// A write-behind over a fresh disk cache (kept alive by the returned directory).
    fn behind_disk(
        budget: u64,
        quiet: Duration,
    ) -> (tempfile::TempDir, Arc<DiskCache>, WriteBehind) {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(DiskCache::open(dir.path(), 1 << 30).unwrap());
        let wb = WriteBehind::new(disk.clone(), budget, quiet, None).unwrap();
        (dir, disk, wb)
    }

    /// Poll `cond` every 10 ms for up to 10 s.
    fn eventually(cond: impl Fn() -> bool) -> bool {
        (0..1000).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            cond()
        })
    }

    #[test]
    fn the_writer_waits_until_pieces_stop_coming() {
        let (_dir, disk, wb) = behind_disk(64 << 20, Duration::from_secs(2));
        let mut keys = Vec::new();
        for i in 0..20u32 {
            let data = Bytes::from(format!("burst piece {i}").repeat(50));
            let key: [u8; 32] = Sha256::digest(&data).into();
            wb.put(&key, &data);
            keys.push(key);
            std::thread::sleep(Duration::from_millis(20));
            assert!(
                keys.iter().all(|k| disk.get(k).is_none()),
                "nothing is written while pieces keep coming"
            );
            assert!(wb.get(&key).is_some(), "served from memory meanwhile");
            assert!(
                wb.contains(&key) && !disk.contains(&key),
                "known while it waits"
            );
        }
        assert!(
            eventually(|| keys.iter().all(|k| disk.get(k).is_some())),
            "everything is written once the burst is over"
        );
        assert!(keys.iter().all(|k| wb.contains(k) && disk.contains(k)));
        assert!(!wb.contains(&[0; 32]));
    }

    #[test]
    fn half_the_budget_waiting_starts_the_writer_without_a_pause() {
        let (_dir, disk, wb) = behind_disk(1 << 20, Duration::from_secs(3600));
        let data = Bytes::from(vec![3u8; 600 << 10]);
        let key: [u8; 32] = Sha256::digest(&data).into();
        wb.put(&key, &data);
        assert!(eventually(
            || disk.get(&key).is_some() && wb.pending.bytes.load(Ordering::Relaxed) == 0
        ));
    }

    /// Rebuilds pieces from a map of offset → bytes, counting what it was asked for.
    struct FromMap {
        bytes: HashMap<u64, Bytes>,
        asked: Mutex<Vec<PieceAt>>,
    }

    impl Rebuild for FromMap {
        fn rebuild(&self, pieces: &[([u8; 32], PieceAt)], out: &mut dyn FnMut(&[u8; 32], Bytes)) {
            for (key, at) in pieces {
                self.asked.lock().unwrap().push(*at);
                if let Some(b) = self.bytes.get(&at.offset) {
                    out(key, b.clone());
                }
            }
        }
    }

    #[test]
    fn large_pieces_are_rebuilt_by_the_writer_instead_of_held() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(DiskCache::open(dir.path(), 1 << 30).unwrap());
        let piece = |i: u64, len: usize| {
            let data = Bytes::from(vec![i as u8; len]);
            let key: [u8; 32] = Sha256::digest(&data).into();
            (key, data)
        };
        let (big_a, big_b, small, over) = (
            piece(1, 600 << 10),
            piece(2, 700 << 10),
            piece(3, 1000),
            piece(4, 900 << 10),
        );
        let map = FromMap {
            bytes: [(2 << 20, big_a.1.clone()), (1 << 20, big_b.1.clone())].into(),
            asked: Mutex::new(Vec::new()),
        };
        let map = Arc::new(map);
        let later = RebuildLater {
            rebuild: map.clone(),
            min_len: 512 << 10,
            max_bytes: 1400 << 10,
        };
        let wb = WriteBehind::new(
            disk.clone(),
            64 << 20,
            Duration::from_secs(3600),
            Some(later),
        )
        .unwrap();
        let at = |offset: u64, len: usize| PieceAt {
            layer: 0,
            offset,
            len: len as u64,
        };
        assert!(wb.put_later(&big_a.0, at(2 << 20, big_a.1.len())));
        assert!(wb.put_later(&big_b.0, at(1 << 20, big_b.1.len())));
        assert!(
            !wb.put_later(&small.0, at(0, small.1.len())),
            "small pieces are held"
        );
        assert!(
            !wb.put_later(&over.0, at(8 << 20, over.1.len())),
            "past max_bytes pieces are held"
        );
        assert!(
            wb.get(&big_a.0).is_none() && !wb.contains(&big_a.0),
            "a noted piece is not in memory"
        );
        assert_eq!(wb.waiting(), (0, 1300 << 10));
        // Read again before the writer came: its reader is told to hold it, and it is.
        assert!(!wb.put_later(&big_a.0, at(2 << 20, big_a.1.len())));
        wb.put(&big_a.0, &big_a.1);
        assert_eq!(wb.get(&big_a.0).as_deref(), Some(&big_a.1[..]));
        assert_eq!(wb.waiting(), (600 << 10, 700 << 10));
        assert!(
            wb.put_later(&big_a.0, at(2 << 20, big_a.1.len())),
            "held already"
        );
        wb.flush();
        assert_eq!(disk.get(&big_a.0).as_deref(), Some(&big_a.1[..]));
        assert_eq!(disk.get(&big_b.0).as_deref(), Some(&big_b.1[..]));
        assert_eq!(
            *map.asked.lock().unwrap(),
            vec![at(1 << 20, big_b.1.len())],
            "only the piece not held is rebuilt"
        );
        assert_eq!(wb.pending.later_bytes.load(Ordering::Relaxed), 0);
        assert!(
            !wb.put_later(&over.0, at(8 << 20, over.1.len())),
            "the writer is gone"
        );
    }

    #[test]
    fn every_noted_piece_is_written_whatever_order_they_came_in() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(DiskCache::open(dir.path(), 1 << 30).unwrap());
        // 80 pieces of 1 MiB, more than two rebuild batches, noted in a scrambled order.
        let pieces: Vec<([u8; 32], u64, Bytes)> = (0..80u64)
            .map(|i| {
                let data = Bytes::from(vec![i as u8; 1 << 20]);
                (Sha256::digest(&data).into(), i << 20, data)
            })
            .collect();
        let map = Arc::new(FromMap {
            bytes: pieces.iter().map(|(_, at, b)| (*at, b.clone())).collect(),
            asked: Mutex::new(Vec::new()),
        });
        let later = RebuildLater {
            rebuild: map.clone(),
            min_len: 1,
            max_bytes: 1 << 30,
        };
        let wb =
            WriteBehind::new(disk.clone(), 1 << 20, Duration::from_millis(1), Some(later)).unwrap();
        for i in (0..80).map(|i| (i * 37 + 11) % 80) {
            let (key, at, data) = &pieces[i];
            let at = PieceAt {
                layer: 0,
                offset: *at,
                len: data.len() as u64,
            };
            assert!(wb.put_later(key, at));
        }
        assert!(eventually(|| pieces
            .iter()
            .all(|(k, _, _)| disk.contains(k))));
        wb.flush();
        assert_eq!(map.asked.lock().unwrap().len(), 80, "each rebuilt once");
        assert_eq!(wb.pending.later_bytes.load(Ordering::Relaxed), 0);
    }
}
