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
        let me = std::thread::current().id();
        for w in self.workers.drain(..) {
            // The last owner may be a job of this very pool: that worker ends by itself.
            if w.thread().id() != me {
                let _ = w.join();
            }
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

    #[test]
    fn a_job_may_drop_the_last_handle_of_its_own_pool() {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pool = Arc::new(Pool::new("t", 2, 4).unwrap());
        let (mine, flag) = (pool.clone(), done.clone());
        pool.submit(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            // The test's handle is gone by now: this drop ends the pool from inside it.
            drop(mine);
            flag.store(true, Ordering::SeqCst);
        });
        drop(pool);
        let t = std::time::Instant::now();
        while !done.load(Ordering::SeqCst) {
            assert!(
                t.elapsed().as_secs() < 5,
                "the job did not get past dropping its pool"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
