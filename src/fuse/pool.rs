//! A fixed set of worker threads fed through a bounded queue. FUSE reads are handed here so
//! that a slow cold read (inflating from a checkpoint, fetching from a registry) never
//! holds a session thread that lookups and warm reads need.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A bounded pool of worker threads.
pub struct Pool {
    tx: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Start `threads` workers (at least one) sharing a queue of `queue` jobs; submitting
    /// to a full queue blocks the submitter (back-pressure).
    pub fn new(name: &str, threads: usize, queue: usize) -> std::io::Result<Pool> {
        let (tx, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    })?,
            );
        }
        Ok(Pool {
            tx: Some(tx),
            workers,
        })
    }

    /// Run `job` on a worker.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        if let Some(tx) = &self.tx {
            if let Err(e) = tx.send(Box::new(job)) {
                // Only after shutdown began: run it here rather than drop a FUSE reply.
                (e.0)();
            }
        }
    }
}

impl Drop for Pool {
    /// Let queued jobs finish, then join the workers.
    fn drop(&mut self) {
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Pool;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn runs_every_job_in_parallel() {
        let n = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(std::sync::Barrier::new(3));
        {
            let pool = Pool::new("t", 3, 4).unwrap();
            for _ in 0..3 {
                let (n, b) = (n.clone(), barrier.clone());
                // All three must run at once or the barrier never opens.
                pool.submit(move || {
                    b.wait();
                    n.fetch_add(1, Ordering::SeqCst);
                });
            }
        }
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }
}
