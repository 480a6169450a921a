//! The local disk tier: one file per piece at `DIR/ab/abcdef…` (the 64-character hex
//! sha256, fanned out by its first two characters). Writes go to `DIR/tmp/` and are renamed
//! into place, so a reader never sees a partial object. An in-memory LRU (seeded from the
//! files' mtimes by a scan, mtimes refreshed on every hit) keeps the total under the limit.
//! The scan may run in the background: a daemon serves at once whatever the cache's size.
//! Several daemons may share a directory: a lookup that misses the LRU still tries the
//! file, and the background scan is repeated every minute, so that each one's LRU learns
//! the objects the others stored (as less recently used than its own) and forgets those
//! they removed, and the directory stays within the limit.

use super::{CacheError, CacheStats};
use crate::read::Tier;
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// A size-limited, content-addressed directory of pieces.
pub struct DiskCache {
    root: PathBuf,
    limit: u64,
    lru: Mutex<Lru>,
    tmp_seq: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    stores: AtomicU64,
    evictions: AtomicU64,
    verify_failures: AtomicU64,
    write_failures: AtomicU64,
    /// The last write failed (one warning per run of failures).
    failing: AtomicBool,
}

/// Objects by key with their size and last-use tick; `order` maps ticks back to keys.
struct Lru {
    map: HashMap<[u8; 32], (u64, u64)>,
    order: BTreeMap<u64, [u8; 32]>,
    bytes: u64,
    tick: u64,
    /// The tick for the next object a scan finds (below `LIVE_TICKS`).
    seed_tick: u64,
}

/// Ticks of uses in this process start here; objects found by the scan get the ticks below,
/// in mtime order, so they are all older than anything used since the start.
const LIVE_TICKS: u64 = 1 << 48;

/// How often the background scan looks at the directory again (see the module docs).
const RESCAN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The largest object the cache holds: a piece (a whole small file or a chunk).
const MAX_OBJECT: u64 = crate::format::CHUNK_SIZE;

impl Default for Lru {
    fn default() -> Self {
        Lru {
            map: HashMap::new(),
            order: BTreeMap::new(),
            bytes: 0,
            tick: LIVE_TICKS,
            seed_tick: 0,
        }
    }
}

impl Lru {
    /// Add an object found on disk as older than every object used by this process,
    /// unless it is known already.
    fn seed(&mut self, key: [u8; 32], size: u64) {
        if self.map.contains_key(&key) {
            return;
        }
        let tick = self.seed_tick.min(LIVE_TICKS - 1);
        self.seed_tick += 1;
        self.map.insert(key, (size, tick));
        self.order.insert(tick, key);
        self.bytes += size;
    }

    /// Record a use of `key` (inserting it with `size` if new).
    fn touch(&mut self, key: [u8; 32], size: u64) {
        self.tick += 1;
        let tick = self.tick;
        match self.map.insert(key, (size, tick)) {
            Some((old_size, old_tick)) => {
                self.order.remove(&old_tick);
                self.bytes = self.bytes - old_size + size;
            }
            None => self.bytes += size,
        }
        self.order.insert(tick, key);
    }

    fn forget(&mut self, key: &[u8; 32]) {
        if let Some((size, tick)) = self.map.remove(key) {
            self.order.remove(&tick);
            self.bytes -= size;
        }
    }

    /// Remove and return the least recently used key.
    fn pop_oldest(&mut self) -> Option<[u8; 32]> {
        let (_, key) = self.order.pop_first()?;
        if let Some((size, _)) = self.map.remove(&key) {
            self.bytes -= size;
        }
        Some(key)
    }
}

fn parse_key(name: &str) -> Option<[u8; 32]> {
    if name.len() != 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut key = [0u8; 32];
    hex::decode_to_slice(name, &mut key).ok()?;
    Some(key)
}

impl DiskCache {
    /// Open (creating if needed) the cache at `root` holding at most `limit` bytes. Scans
    /// the existing objects to seed the LRU, removes leftover temporary files, and evicts
    /// down to the limit.
    pub fn open(root: &Path, limit: u64) -> Result<DiskCache, CacheError> {
        let cache = DiskCache::create(root, limit)?;
        cache.scan();
        Ok(cache)
    }

    /// [`DiskCache::open`] with the scan on a background thread: lookups, stores and
    /// eviction of new objects work at once; objects already on disk join the LRU (as the
    /// least recently used) when the scan has seen them.
    pub fn open_scanning_in_background(
        root: &Path,
        limit: u64,
    ) -> Result<Arc<DiskCache>, CacheError> {
        let cache = Arc::new(DiskCache::create(root, limit)?);
        let scanning = cache.clone();
        let spawned = std::thread::Builder::new()
            .name("clip-cache-scan".into())
            .spawn(move || {
                let _ = crate::raw::sched::set_current_thread_nice(10);
                let t = std::time::Instant::now();
                scanning.scan();
                tracing::info!(
                    dir = %scanning.root.display(),
                    ms = format!("{:.1}", t.elapsed().as_secs_f64() * 1e3),
                    "disk cache scanned: {}",
                    scanning.stats()
                );
                // Again now and then, for what other daemons sharing the directory did;
                // until the cache is dropped.
                let weak = Arc::downgrade(&scanning);
                drop(scanning);
                loop {
                    std::thread::sleep(RESCAN_EVERY);
                    let Some(cache) = weak.upgrade() else { break };
                    cache.scan();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread to scan the disk cache; scanning now");
            cache.scan();
        }
        Ok(cache)
    }

    /// Create the directories and remove leftover temporary files; the LRU starts empty.
    fn create(root: &Path, limit: u64) -> Result<DiskCache, CacheError> {
        let err = |path: &Path| {
            let path = path.display().to_string();
            move |source| CacheError::Dir { path, source }
        };
        let tmp = root.join("tmp");
        fs::create_dir_all(&tmp).map_err(err(&tmp))?;
        for e in fs::read_dir(&tmp).map_err(err(&tmp))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        Ok(DiskCache {
            root: root.to_path_buf(),
            limit,
            lru: Mutex::new(Lru::default()),
            tmp_seq: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            stores: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            verify_failures: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        })
    }

    /// Bring the LRU in line with the objects on disk and evict down to the limit: objects
    /// it does not know (found at start, or stored since by another daemon sharing the
    /// directory) join as less recently used than any this process used, oldest mtime
    /// first; known objects that are gone (removed by another daemon) and were not used
    /// since the walk began are forgotten.
    fn scan(&self) {
        let walk_began = self.lru.lock().expect("cache lock poisoned").tick;
        let mut found = Vec::new();
        let Ok(fans) = fs::read_dir(&self.root) else {
            return;
        };
        for fan in fans.flatten() {
            let fan_name = fan.file_name();
            let Some(fan_name) = fan_name.to_str().filter(|n| n.len() == 2) else {
                continue;
            };
            let Ok(objects) = fs::read_dir(fan.path()) else {
                continue;
            };
            for obj in objects.flatten() {
                let name = obj.file_name();
                let Some(key) = name
                    .to_str()
                    .filter(|n| n.starts_with(fan_name))
                    .and_then(parse_key)
                else {
                    continue;
                };
                let Ok(meta) = obj.metadata() else { continue };
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((mtime, key, meta.len()));
            }
        }
        found.sort();
        {
            let mut lru = self.lru.lock().expect("cache lock poisoned");
            let on_disk: HashSet<[u8; 32]> = found.iter().map(|&(_, key, _)| key).collect();
            let gone: Vec<[u8; 32]> = lru
                .map
                .iter()
                .filter(|(key, &(_, tick))| tick <= walk_began && !on_disk.contains(*key))
                .map(|(key, _)| *key)
                .collect();
            for key in &gone {
                lru.forget(key);
            }
            for (_, key, size) in found {
                lru.seed(key, size);
            }
        }
        self.evict();
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of the object for `key`.
    pub fn path_of(&self, key: &[u8; 32]) -> PathBuf {
        let hex = hex::encode(key);
        self.root.join(&hex[..2]).join(hex)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let lru = self.lru.lock().expect("cache lock poisoned");
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            stores: self.stores.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            verify_failures: self.verify_failures.load(Ordering::Relaxed),
            write_failures: self.write_failures.load(Ordering::Relaxed),
            objects: lru.map.len() as u64,
            bytes: lru.bytes,
            limit: self.limit,
        }
    }

    /// Remove least recently used objects until the total is within the limit.
    fn evict(&self) {
        loop {
            let key = {
                let mut lru = self.lru.lock().expect("cache lock poisoned");
                if lru.bytes <= self.limit {
                    return;
                }
                match lru.pop_oldest() {
                    Some(k) => k,
                    None => return,
                }
            };
            match fs::remove_file(self.path_of(&key)) {
                Ok(()) => {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(key = %hex::encode(key), error = %e, "cannot evict cache object")
                }
            }
        }
    }

    /// The bytes of the object stored under `key`. The directory is not trusted: anything
    /// but a regular file (a FIFO would block the open, a device never end) or a file
    /// larger than any piece is an error, without reading it.
    fn read_object(&self, key: &[u8; 32]) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(self.path_of(key))
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a symlink, not a cache object",
                ),
                _ => e,
            })?;
        let meta = f.metadata()?;
        if !meta.is_file() || meta.len() > MAX_OBJECT {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "not a cache object ({} bytes, {:?})",
                    meta.len(),
                    meta.file_type()
                ),
            ));
        }
        let mut buf = Vec::with_capacity(meta.len() as usize);
        (&f).take(MAX_OBJECT + 1).read_to_end(&mut buf)?;
        // Persist recency for the next start's LRU; failure only costs eviction accuracy.
        let _ = f.set_modified(SystemTime::now());
        Ok(buf)
    }

    fn write_object(&self, key: &[u8; 32], bytes: &[u8]) -> std::io::Result<()> {
        let hex = hex::encode(key);
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{hex}.{}.{seq}", std::process::id()));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            drop(f);
            let dir = self.root.join(&hex[..2]);
            fs::create_dir_all(&dir)?;
            fs::rename(&tmp, dir.join(&hex))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

impl Tier for DiskCache {
    fn name(&self) -> &str {
        "disk"
    }

    fn get(&self, key: &[u8; 32]) -> Option<Bytes> {
        match self.read_object(key) {
            Ok(bytes) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                self.lru
                    .lock()
                    .expect("cache lock poisoned")
                    .touch(*key, bytes.len() as u64);
                Some(bytes.into())
            }
            Err(e) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    tracing::warn!(key = %hex::encode(key), error = %e, "removing junk from the cache");
                    let _ = fs::remove_file(self.path_of(key));
                } else if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(key = %hex::encode(key), error = %e, "cannot read cache object");
                }
                self.misses.fetch_add(1, Ordering::Relaxed);
                self.lru.lock().expect("cache lock poisoned").forget(key);
                None
            }
        }
    }

    fn contains(&self, key: &[u8; 32]) -> bool {
        self.path_of(key).is_file()
    }

    fn is_local(&self) -> bool {
        true
    }

    fn put(&self, key: &[u8; 32], bytes: &Bytes) {
        if self.limit == 0 || bytes.len() as u64 > self.limit {
            return;
        }
        // Already stored (perhaps before this process started, and not scanned yet).
        if self.path_of(key).is_file() {
            self.lru
                .lock()
                .expect("cache lock poisoned")
                .touch(*key, bytes.len() as u64);
            return;
        }
        match self.write_object(key, bytes) {
            Ok(()) => {
                self.failing.store(false, Ordering::Relaxed);
                self.stores.fetch_add(1, Ordering::Relaxed);
                self.lru
                    .lock()
                    .expect("cache lock poisoned")
                    .touch(*key, bytes.len() as u64);
                self.evict();
            }
            Err(e) => {
                // One warning per run of failures (a full disk fails every write): the
                // count is in the statistics, and a success ends the run.
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(dir = %self.root.display(), error = %e, "cannot write cache objects; reads go on without caching them (counted as write_failures)")
                }
                self.write_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn remove(&self, key: &[u8; 32]) {
        self.verify_failures.fetch_add(1, Ordering::Relaxed);
        self.lru.lock().expect("cache lock poisoned").forget(key);
        if let Err(e) = fs::remove_file(self.path_of(key)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(key = %hex::encode(key), error = %e, "cannot remove bad cache object");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn key(data: &[u8]) -> [u8; 32] {
        Sha256::digest(data).into()
    }

    #[test]
    fn store_get_and_file_layout() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let k = key(b"hello");
        assert_eq!(c.get(&k), None);
        c.put(&k, &Bytes::copy_from_slice(b"hello"));
        assert_eq!(c.get(&k).as_deref(), Some(&b"hello"[..]));
        let hex = hex::encode(k);
        assert!(dir.path().join(&hex[..2]).join(&hex).is_file());
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0,
            "no temp files left"
        );
        let s = c.stats();
        assert_eq!(
            (s.hits, s.misses, s.stores, s.objects, s.bytes),
            (1, 1, 1, 1, 5)
        );
    }

    #[test]
    fn evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 250).unwrap();
        let blobs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 100]).collect();
        let keys: Vec<_> = blobs.iter().map(|b| key(b)).collect();
        c.put(&keys[0], &Bytes::copy_from_slice(&blobs[0]));
        c.put(&keys[1], &Bytes::copy_from_slice(&blobs[1]));
        assert!(c.get(&keys[0]).is_some(), "touch 0 so that 1 is the oldest");
        c.put(&keys[2], &Bytes::copy_from_slice(&blobs[2]));
        assert!(c.get(&keys[1]).is_none(), "1 was evicted");
        assert!(c.get(&keys[0]).is_some());
        assert!(c.get(&keys[2]).is_some());
        let s = c.stats();
        assert_eq!((s.evictions, s.objects, s.bytes), (1, 2, 200));
    }

    #[test]
    fn reopen_seeds_lru_and_enforces_a_smaller_limit() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
            for i in 0..4u8 {
                let b = vec![i; 1000];
                c.put(&key(&b), &Bytes::copy_from_slice(&b));
            }
        }
        fs::write(dir.path().join("tmp").join("leftover"), b"x").unwrap();
        let c = DiskCache::open(dir.path(), 2500).unwrap();
        let s = c.stats();
        assert_eq!((s.objects, s.bytes), (2, 2000));
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0,
            "temp files cleaned"
        );
    }

    #[test]
    fn a_background_scan_adds_old_objects_as_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let blobs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 1000]).collect();
        {
            let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
            for b in &blobs[..3] {
                c.put(&key(b), &Bytes::copy_from_slice(b));
            }
        }
        let c = DiskCache::create(dir.path(), 2500).unwrap();
        // Before the scan: old objects are served, a new one is stored.
        assert_eq!(c.get(&key(&blobs[0])).as_deref(), Some(&blobs[0][..]));
        c.put(&key(&blobs[3]), &Bytes::copy_from_slice(&blobs[3]));
        assert_eq!(c.stats().objects, 2);
        c.scan();
        // 4000 bytes > 2500: the two objects unused since the start go, oldest first.
        let s = c.stats();
        assert_eq!((s.objects, s.bytes, s.evictions), (2, 2000, 2));
        assert!(c.get(&key(&blobs[0])).is_some(), "used since the start");
        assert!(c.get(&key(&blobs[3])).is_some(), "stored since the start");
        assert!(c.get(&key(&blobs[1])).is_none());
        assert!(c.get(&key(&blobs[2])).is_none());
    }

    /// Two daemons sharing a directory: each stays within the limit on its own, and a
    /// scan makes one see the other's objects (as older than its own, so they go first)
    /// and forget the ones the other removed, so the directory is within the limit again.
    #[test]
    fn a_rescan_keeps_a_shared_directory_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let blobs: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 1000]).collect();
        let a = DiskCache::open(dir.path(), 3000).unwrap();
        let b = DiskCache::open(dir.path(), 3000).unwrap();
        let on_disk = || blobs.iter().filter(|x| a.path_of(&key(x)).exists()).count();
        for x in &blobs[..3] {
            a.put(&key(x), &Bytes::copy_from_slice(x));
        }
        for x in &blobs[3..] {
            b.put(&key(x), &Bytes::copy_from_slice(x));
        }
        assert_eq!(
            on_disk(),
            6,
            "each within its own limit, 6000 bytes together"
        );
        a.scan();
        let s = a.stats();
        assert_eq!((s.objects, s.bytes, s.evictions), (3, 3000, 3));
        assert_eq!(on_disk(), 3);
        for x in &blobs[..3] {
            assert!(a.get(&key(x)).is_some(), "a's own objects stay");
        }
        // b still counts the objects a removed, until its own scan forgets them.
        assert_eq!(b.stats().bytes, 3000);
        b.scan();
        let s = b.stats();
        assert_eq!((s.objects, s.bytes, s.evictions), (3, 3000, 0));
    }

    /// Junk where an object should be (a FIFO, a symlink, a huge file) is a miss at once:
    /// no hang on the open, no unbounded read.
    #[test]
    fn junk_in_place_of_an_object_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 30).unwrap();
        let (fifo, link, huge) = (key(b"fifo"), key(b"link"), key(b"huge"));
        for k in [&fifo, &link, &huge] {
            fs::create_dir_all(c.path_of(k).parent().unwrap()).unwrap();
        }
        nix::unistd::mkfifo(&c.path_of(&fifo), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::os::unix::fs::symlink("/dev/zero", c.path_of(&link)).unwrap();
        let f = File::create(c.path_of(&huge)).unwrap();
        f.set_len(MAX_OBJECT + 1).unwrap();
        let t = std::time::Instant::now();
        for k in [&fifo, &link, &huge] {
            assert_eq!(c.get(k), None);
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(c.stats().misses, 3);
        assert!(!c.path_of(&fifo).exists() && !c.path_of(&huge).exists());
        assert!(c.path_of(&link).symlink_metadata().is_err() && Path::new("/dev/zero").exists());
        // The next fetch stores the piece in its place.
        c.put(&huge, &Bytes::copy_from_slice(b"huge"));
        assert_eq!(c.get(&huge).as_deref(), Some(&b"huge"[..]));
    }

    /// A disk that refuses writes (here: `tmp/` replaced by a file) costs misses, counted,
    /// not errors; writes work again once it recovers.
    #[test]
    fn failed_writes_are_counted_and_reads_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        fs::remove_dir(dir.path().join("tmp")).unwrap();
        fs::write(dir.path().join("tmp"), b"not a directory").unwrap();
        for k in [b"one".as_slice(), b"two", b"three"] {
            c.put(&key(k), &Bytes::copy_from_slice(k));
            assert_eq!(c.get(&key(k)), None);
        }
        assert_eq!((c.stats().write_failures, c.stats().stores), (3, 0));
        assert!(c.failing.load(Ordering::Relaxed));
        fs::remove_file(dir.path().join("tmp")).unwrap();
        fs::create_dir(dir.path().join("tmp")).unwrap();
        c.put(&key(b"one"), &Bytes::copy_from_slice(b"one"));
        assert_eq!(c.get(&key(b"one")).as_deref(), Some(&b"one"[..]));
        assert!(
            !c.failing.load(Ordering::Relaxed),
            "a success ends the run of failures"
        );
    }

    #[test]
    fn remove_counts_verify_failures() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let k = key(b"good");
        c.put(&k, &Bytes::copy_from_slice(b"good"));
        fs::write(c.path_of(&k), b"evil").unwrap();
        c.remove(&k);
        assert!(!c.path_of(&k).exists());
        assert_eq!(c.stats().verify_failures, 1);
        assert_eq!(c.stats().objects, 0);
    }
}
