//! The uncompressed stream of one layer as a `Read` for the tar parser, fed by a producer
//! thread that reads and inflates the blob (a digest thread hashes both the blob and the tar
//! stream). As the tar side consumes bytes,
//! deflate block boundaries pass by and the checkpoint policy picks some of them.

use super::BuildError;
use crate::format::{Checkpoint, Compression};
use crate::zran::scan::GzipScanner;
use crate::zran::{encode_window, Boundary, WINDOW_SIZE};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

const CHUNK: usize = 1024 * 1024;
/// Chunks (of `CHUNK` bytes) queued for the tar reader and for the digest thread: deep
/// enough that the inflate thread rarely waits for either when they lose the CPU for a
/// moment (16 instead of 4: one layer 0.92 -> 0.89 s); at most 32 MiB per layer.
const CHANNEL_DEPTH: usize = 16;

/// When to take checkpoints.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointPolicy {
    /// Take one at the first block boundary this far past the previous checkpoint.
    pub interval: u64,
    /// Files at least this large get one at the last block boundary before their data,
    /// if the previous checkpoint is at least this far back.
    pub large_file: u64,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            interval: 2 << 20,
            large_file: 512 << 10,
        }
    }
}

struct Chunk {
    data: Arc<Vec<u8>>,
    boundaries: Vec<Boundary>,
}

/// Output buffers that come back once the tar reader and the digest thread are done with
/// them, so the producer does not allocate and zero a fresh megabyte for every chunk.
#[derive(Default)]
struct BufferPool {
    in_flight: VecDeque<Arc<Vec<u8>>>,
}

impl BufferPool {
    /// At most this many buffers are remembered (the channels hold fewer at once).
    const SIZE: usize = 2 * CHANNEL_DEPTH + 4;

    /// A `CHUNK`-long buffer that no one else holds.
    fn take(&mut self) -> Arc<Vec<u8>> {
        let free = self
            .in_flight
            .iter()
            .position(|b| Arc::strong_count(b) == 1);
        let mut buf = match free {
            Some(i) => self.in_flight.remove(i).expect("index from position"),
            None => Arc::new(Vec::with_capacity(CHUNK)),
        };
        Arc::get_mut(&mut buf).expect("unshared").resize(CHUNK, 0);
        buf
    }

    /// Remember `buf` for reuse and return a handle to send on.
    fn keep(&mut self, buf: Arc<Vec<u8>>) -> Arc<Vec<u8>> {
        if self.in_flight.len() == Self::SIZE {
            self.in_flight.pop_front();
        }
        self.in_flight.push_back(buf.clone());
        buf
    }
}

/// What the producer learned about the blob once it ended.
struct ProducerEnd {
    compressed_size: u64,
    digest: String,
    diff_id: String,
}

/// The consumer side: a `Read` over the layer's tar bytes.
pub struct LayerStream {
    rx: Option<Receiver<Result<Chunk, BuildError>>>,
    producer: Option<JoinHandle<Result<ProducerEnd, BuildError>>>,
    cur: Arc<Vec<u8>>,
    cur_start: u64,
    cur_pos: usize,
    prev: Arc<Vec<u8>>,
    prev_start: u64,
    pending: VecDeque<Boundary>,
    policy: CheckpointPolicy,
    checkpoints: Vec<Checkpoint>,
    windows: Vec<u8>,
    candidate: Option<Boundary>,
    error: Option<BuildError>,
    progress: indicatif::ProgressBar,
}

impl LayerStream {
    /// Start the producer thread over `blob` (the whole compressed layer).
    pub fn start(
        blob: Box<dyn Read + Send>,
        compression: Compression,
        policy: CheckpointPolicy,
        progress: indicatif::ProgressBar,
    ) -> LayerStream {
        let (tx, rx) = sync_channel::<Result<Chunk, BuildError>>(CHANNEL_DEPTH);
        let pb = progress.clone();
        let producer = std::thread::Builder::new()
            .name("clip-inflate".into())
            .spawn(move || -> Result<ProducerEnd, BuildError> {
                // Both digests (blob and tar stream) are computed on a separate thread so that
                // this one only reads and inflates.
                let (htx, hrx) = sync_channel::<Hashed>(CHANNEL_DEPTH);
                let hasher = std::thread::Builder::new()
                    .name("clip-digest".into())
                    .spawn(move || {
                        // The inflate thread is the pipeline's critical path: this one, whose
                        // work is shorter, takes the CPU when that one does not need it.
                        let _ = crate::raw::sched::set_current_thread_nice(super::layer::TAR_NICE);
                        let (mut blob, mut tar) = (Sha256::new(), Sha256::new());
                        for msg in hrx {
                            match msg {
                                Hashed::Blob(b) => blob.update(&b),
                                Hashed::Tar(t) => tar.update(t.as_slice()),
                            }
                        }
                        let hex = |h: Sha256| format!("sha256:{}", hex::encode(h.finalize()));
                        (hex(blob), hex(tar))
                    })
                    .expect("spawning a thread");
                let mut hashing = HashingReader {
                    inner: blob,
                    digest: htx.clone(),
                    count: 0,
                    progress: pb,
                };
                let mut pool = BufferPool::default();
                let send = |data: Arc<Vec<u8>>, boundaries: Vec<Boundary>| -> bool {
                    htx.send(Hashed::Tar(data.clone())).is_ok()
                        && tx.send(Ok(Chunk { data, boundaries })).is_ok()
                };
                let result: Result<(), BuildError> = (|| {
                    match compression {
                        Compression::Gzip => {
                            let mut scanner = GzipScanner::new(&mut hashing)?;
                            loop {
                                let mut data = pool.take();
                                let buf = Arc::get_mut(&mut data)
                                    .expect("the pool hands out unshared buffers");
                                let mut boundaries = Vec::new();
                                let n = scanner.fill(buf, &mut boundaries)?;
                                buf.truncate(n);
                                if n == 0 && boundaries.is_empty() {
                                    break;
                                }
                                if !send(pool.keep(data), boundaries) {
                                    return Ok(()); // consumer gave up
                                }
                            }
                        }
                        Compression::None => loop {
                            let mut data = pool.take();
                            let buf = Arc::get_mut(&mut data)
                                .expect("the pool hands out unshared buffers");
                            let n = read_full(&mut hashing, buf)?;
                            buf.truncate(n);
                            if n == 0 {
                                break;
                            }
                            if !send(pool.keep(data), Vec::new()) {
                                return Ok(());
                            }
                        },
                    }
                    // Whatever follows the end of the compressed stream still counts for the digest.
                    io::copy(&mut hashing, &mut io::sink())?;
                    Ok(())
                })();
                let compressed_size = hashing.count;
                drop(hashing);
                drop(htx);
                let (digest, diff_id) = hasher
                    .join()
                    .map_err(|_| BuildError::Layer("the hashing thread panicked".into()))?;
                if let Err(e) = result {
                    let msg = e.to_string();
                    let _ = tx.send(Err(e));
                    return Err(BuildError::Layer(msg));
                }
                Ok(ProducerEnd {
                    compressed_size,
                    digest,
                    diff_id,
                })
            })
            .expect("spawning a thread");
        LayerStream {
            rx: Some(rx),
            producer: Some(producer),
            cur: Arc::default(),
            cur_start: 0,
            cur_pos: 0,
            prev: Arc::default(),
            prev_start: 0,
            pending: VecDeque::new(),
            policy,
            checkpoints: Vec::new(),
            windows: Vec::new(),
            candidate: None,
            error: None,
            progress,
        }
    }

    /// Uncompressed bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.cur_start + self.cur_pos as u64
    }

    /// The producer's error, if reading or inflating failed (takes precedence over the
    /// tar parser's view of the same failure).
    pub fn take_error(&mut self) -> Option<BuildError> {
        self.error.take()
    }

    fn last_checkpoint_out(&self) -> Option<u64> {
        self.checkpoints.last().map(|c| c.out_offset)
    }

    /// The window before `out`, if the retained output still holds it.
    fn window_before(&self, out: u64) -> Option<Vec<u8>> {
        let from = out.saturating_sub(WINDOW_SIZE as u64);
        let cur_end = self.cur_start + self.cur.len() as u64;
        if from < self.prev_start || out > cur_end {
            return None;
        }
        let mut w = Vec::with_capacity((out - from) as usize);
        for (start, buf) in [(self.prev_start, &*self.prev), (self.cur_start, &*self.cur)] {
            let end = start + buf.len() as u64;
            let (a, b) = (from.max(start), out.min(end));
            if a < b {
                w.extend_from_slice(&buf[(a - start) as usize..(b - start) as usize]);
            }
        }
        (w.len() as u64 == out - from).then_some(w)
    }

    fn commit(&mut self, b: Boundary, window: Vec<u8>) {
        let window_len = window.len() as u32;
        let (stored, window_encoding) = encode_window(&window);
        self.checkpoints.push(Checkpoint {
            in_offset: b.in_offset,
            out_offset: b.out_offset,
            window_offset: self.windows.len() as u64,
            window_xxh3: xxhash_rust::xxh3::xxh3_64(&stored),
            window_stored_len: stored.len() as u32,
            window_len,
            bits: b.bits,
            window_encoding,
            reserved: [0; 6],
        });
        self.windows.extend_from_slice(&stored);
        self.candidate = None;
    }

    /// Apply the interval policy to boundaries the consumer has now passed.
    fn pass_boundaries(&mut self) {
        let pos = self.position();
        while let Some(&b) = self.pending.front() {
            if b.out_offset > pos {
                break;
            }
            self.pending.pop_front();
            let since = self
                .last_checkpoint_out()
                .map(|l| b.out_offset.saturating_sub(l));
            let due = match since {
                None => true,
                Some(0) => false,
                Some(s) => s >= self.policy.interval,
            };
            if due {
                if let Some(w) = self.window_before(b.out_offset) {
                    self.commit(b, w);
                }
            } else if since.is_some_and(|s| s >= self.policy.large_file) {
                // Its window is copied only if a large file makes it a checkpoint.
                self.candidate = Some(b);
            }
        }
    }

    /// The tar side found a file of `size` bytes whose data starts at the current position:
    /// take a checkpoint right before it if it is large and the last one is far back.
    pub fn file_starts(&mut self, size: u64) {
        if size < self.policy.large_file {
            return;
        }
        let pos = self.position();
        let far = self
            .last_checkpoint_out()
            .is_none_or(|l| pos - l >= self.policy.large_file);
        if far {
            if let Some(b) = self.candidate.take() {
                if let Some(w) = self.window_before(b.out_offset) {
                    self.commit(b, w);
                }
            }
        }
    }

    fn next_chunk(&mut self) -> io::Result<bool> {
        let Some(rx) = &self.rx else { return Ok(false) };
        match rx.recv() {
            Ok(Ok(chunk)) => {
                let old = std::mem::replace(&mut self.cur, chunk.data);
                self.prev_start = self.cur_start;
                self.cur_start += old.len() as u64;
                self.prev = old;
                self.cur_pos = 0;
                self.pending.extend(chunk.boundaries);
                // A boundary at the very start of the chunk is already "passed".
                self.pass_boundaries();
                Ok(true)
            }
            Ok(Err(e)) => {
                let msg = e.to_string();
                self.error = Some(e);
                self.rx = None;
                Err(io::Error::other(msg))
            }
            Err(_) => {
                self.rx = None;
                Ok(false)
            }
        }
    }

    /// Read to the end of the stream (past the tar end-of-archive marker), wait for the
    /// producer and return the layer's sizes, digests and checkpoints.
    pub fn finish(mut self) -> Result<StreamEnd, BuildError> {
        let mut sink = vec![0u8; 64 * 1024];
        loop {
            match self.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(self
                        .error
                        .take()
                        .unwrap_or(BuildError::Layer(e.to_string())))
                }
            }
        }
        let producer = self.producer.take().expect("finish is called once");
        let end = producer
            .join()
            .map_err(|_| BuildError::Layer("the inflate thread panicked".into()))??;
        self.progress.finish();
        Ok(StreamEnd {
            compressed_size: end.compressed_size,
            digest: end.digest,
            uncompressed_size: self.position(),
            diff_id: end.diff_id,
            checkpoints: std::mem::take(&mut self.checkpoints),
            windows: std::mem::take(&mut self.windows),
        })
    }
}

/// A finished layer stream.
pub struct StreamEnd {
    /// Bytes of the blob.
    pub compressed_size: u64,
    /// `sha256:` of the blob.
    pub digest: String,
    /// Bytes of the tar stream.
    pub uncompressed_size: u64,
    /// `sha256:` of the tar stream.
    pub diff_id: String,
    /// Checkpoints taken; their `window_offset`s point into `windows`.
    pub checkpoints: Vec<Checkpoint>,
    /// The checkpoints' stored windows, back to back.
    pub windows: Vec<u8>,
}

impl Read for LayerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur_pos == self.cur.len() {
            if !self.next_chunk()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.cur.len() - self.cur_pos);
        buf[..n].copy_from_slice(&self.cur[self.cur_pos..self.cur_pos + n]);
        self.cur_pos += n;
        self.pass_boundaries();
        Ok(n)
    }
}

impl Drop for LayerStream {
    fn drop(&mut self) {
        // Unblock the producer if the consumer stops early; it exits on the closed channel.
        self.rx = None;
        if let Some(p) = self.producer.take() {
            let _ = p.join();
        }
    }
}

/// Input of the digest thread: blob bytes and tar chunks, each stream in order.
enum Hashed {
    Blob(Vec<u8>),
    Tar(Arc<Vec<u8>>),
}

/// Reads the blob, handing a copy of every byte to the digest thread.
struct HashingReader {
    inner: Box<dyn Read + Send>,
    digest: std::sync::mpsc::SyncSender<Hashed>,
    count: u64,
    progress: indicatif::ProgressBar,
}

impl Read for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.digest
                .send(Hashed::Blob(buf[..n].to_vec()))
                .map_err(|_| io::Error::other("the digest thread stopped"))?;
        }
        self.count += n as u64;
        self.progress.inc(n as u64);
        Ok(n)
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
