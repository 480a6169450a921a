//! Write-behind in front of a slower tier: `put` hands the piece to a background writer and
//! returns at once, so a cold read that keeps hundreds of neighbouring files does not wait
//! for hundreds of file creations. Pieces still waiting are served from memory. The writer
//! starts once no piece has come for a quiet period (a burst of cold reads is over) or half
//! the byte budget is waiting: file creations take CPU time that the burst's readers, the
//! registry and the reading process need (a cold `import numpy` created 3 400 files, a third
//! of the machine's CPU time, at nice 19). When more than the byte budget is waiting, `put`
//! writes synchronously (back-pressure, nothing lost).

use crate::read::Tier;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

struct Pending {
    pieces: Mutex<HashMap<[u8; 32], Bytes>>,
    bytes: AtomicU64,
    /// When the last piece came, in microseconds since `epoch`.
    last_put: AtomicU64,
    epoch: Instant,
}

impl Pending {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Sleep until no piece has come for `quiet`, or `urgent` bytes are waiting.
    fn wait_for_quiet(&self, quiet: Duration, urgent: u64) {
        let quiet = quiet.as_micros() as u64;
        loop {
            let since = self
                .now()
                .saturating_sub(self.last_put.load(Ordering::Relaxed));
            if since >= quiet || self.bytes.load(Ordering::Relaxed) >= urgent {
                return;
            }
            std::thread::sleep(Duration::from_micros((quiet - since).min(20_000)));
        }
    }
}

/// A [`Tier`] that delays writes to `inner` onto a background thread.
pub struct WriteBehind {
    inner: Arc<dyn Tier>,
    pending: Arc<Pending>,
    budget: u64,
    tx: Mutex<Option<Sender<[u8; 32]>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl WriteBehind {
    /// Wrap `inner`, letting at most `budget` bytes wait in memory; the writer waits for
    /// `quiet` without new pieces (or for half the budget to be waiting) before it writes.
    pub fn new(inner: Arc<dyn Tier>, budget: u64, quiet: Duration) -> std::io::Result<WriteBehind> {
        let pending = Arc::new(Pending {
            pieces: Mutex::new(HashMap::new()),
            bytes: AtomicU64::new(0),
            last_put: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let (tx, rx) = channel::<[u8; 32]>();
        let (p, t) = (pending.clone(), inner.clone());
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
                    let piece = p
                        .pieces
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&key)
                        .cloned();
                    if let Some(piece) = piece {
                        t.put(&key, &piece);
                        p.pieces
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&key);
                        p.bytes.fetch_sub(piece.len() as u64, Ordering::Relaxed);
                    }
                }
            })?;
        Ok(WriteBehind {
            inner,
            pending,
            budget,
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Write everything still waiting and stop the writer (at once, without waiting for a
    /// quiet period).
    pub fn flush(&self) {
        self.pending.last_put.store(0, Ordering::Relaxed);
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }
}

impl Tier for WriteBehind {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn get(&self, key: &[u8; 32]) -> Option<Bytes> {
        let waiting = self
            .pending
            .pieces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned();
        waiting.or_else(|| self.inner.get(key))
    }

    fn contains(&self, key: &[u8; 32]) -> bool {
        self.pending
            .pieces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
            || self.inner.contains(key)
    }

    fn is_local(&self) -> bool {
        self.inner.is_local()
    }

    fn put(&self, key: &[u8; 32], bytes: &Bytes) {
        let len = bytes.len() as u64;
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let queued = match tx {
            Some(tx) if self.pending.bytes.load(Ordering::Relaxed) + len <= self.budget => {
                let mut pieces = self
                    .pending
                    .pieces
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if pieces.contains_key(key) {
                    return;
                }
                pieces.insert(*key, bytes.clone());
                self.pending.bytes.fetch_add(len, Ordering::Relaxed);
                self.pending
                    .last_put
                    .store(self.pending.now(), Ordering::Relaxed);
                drop(pieces);
                tx.send(*key).is_ok()
            }
            _ => false,
        };
        if !queued {
            self.inner.put(key, bytes);
        }
    }

    fn remove(&self, key: &[u8; 32]) {
        if let Some(p) = self
            .pending
            .pieces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
        {
            self.pending
                .bytes
                .fetch_sub(p.len() as u64, Ordering::Relaxed);
        }
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
        let wb = WriteBehind::new(disk.clone(), budget, quiet).unwrap();
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
}
