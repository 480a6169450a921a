//! Write-behind in front of a slower tier: `put` hands the piece to a background writer and
//! returns at once, so a cold read that keeps hundreds of neighbouring files does not wait
//! for hundreds of file creations. Pieces still waiting are served from memory. When more
//! than the byte budget is waiting, `put` writes synchronously (back-pressure, nothing lost).

use crate::read::Tier;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

struct Pending {
    pieces: Mutex<HashMap<[u8; 32], Bytes>>,
    bytes: AtomicU64,
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
    /// Wrap `inner`, letting at most `budget` bytes wait in memory.
    pub fn new(inner: Arc<dyn Tier>, budget: u64) -> std::io::Result<WriteBehind> {
        let pending = Arc::new(Pending {
            pieces: Mutex::new(HashMap::new()),
            bytes: AtomicU64::new(0),
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

    /// Write everything still waiting and stop the writer.
    pub fn flush(&self) {
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
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(DiskCache::open(dir.path(), 1 << 30).unwrap());
        let wb = WriteBehind::new(disk.clone(), 1 << 20).unwrap();
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
}
