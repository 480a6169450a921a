//! The Redis tier against a real `redis-server` started on a loopback port by each test:
//! filling from the origin, serving a second reader with no origin access, key sharing
//! between images, poisoned values, and Redis dying, hanging or missing.

mod common;

use bytes::Bytes;
use clip::cache::redis::{RedisConfig, RedisTier};
use clip::demo::{noise, TarBuilder};
use clip::format::IndexFile;
use clip::read::Tier;
use clip::source::{Source, SourceError};
use common::{
    counting_layout, edge_index, files, free_port, mount_and_read_all, piece_keys, plain, read_all,
    read_file, require_tool, run, test_pki, TestPki,
};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A `redis-server` on 127.0.0.1 without persistence, killed when dropped.
struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
}

impl RedisServer {
    fn start(dir: &Path) -> RedisServer {
        RedisServer::start_with(dir, &[])
    }

    fn start_with(dir: &Path, extra: &[&str]) -> RedisServer {
        let mut s = RedisServer {
            port: free_port(),
            dir: dir.to_path_buf(),
            child: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        s.restart();
        s
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Start (again) on the same port and wait until it answers PING.
    fn restart(&mut self) {
        require_tool("redis-server");
        std::fs::create_dir_all(&self.dir).unwrap();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start redis-server; run .ci/run (it apt-get installs redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = redis::Client::open(self.admin_url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URL with the password, if the server was started with `--requirepass`.
    fn admin_url(&self) -> String {
        match self.extra.iter().position(|a| a == "--requirepass") {
            Some(i) => format!("redis://:{}@127.0.0.1:{}/0", self.extra[i + 1], self.port),
            None => self.url(),
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("redis-server is not running")
            .id();
        run(Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string()));
    }

    fn conn(&self) -> redis::Connection {
        let c = redis::Client::open(self.admin_url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c
    }

    /// The number of pieces held (as [`RedisServer::keys`]).
    fn dbsize(&self) -> u64 {
        self.keys().len() as u64
    }

    /// The keys of pieces (the access profiles daemons share, `profile:…`, left out).
    fn keys(&self) -> BTreeSet<String> {
        redis::cmd("KEYS")
            .arg("*")
            .query::<Vec<String>>(&mut self.conn())
            .unwrap()
            .into_iter()
            .filter(|k| !k.contains("profile:"))
            .collect()
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        redis::cmd("GET").arg(key).query(&mut self.conn()).unwrap()
    }

    fn set(&self, key: &str, value: &[u8]) {
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query::<()>(&mut self.conn())
            .unwrap();
    }
}

/// A `redis-server` that also speaks TLS with the PKI's server certificate on the returned
/// port; its plain port stays open for inspecting the database.
fn start_tls(dir: &Path, pki: &TestPki, auth_clients: bool) -> (RedisServer, u16) {
    let port = free_port();
    let tls_port = std::iter::repeat_with(free_port)
        .find(|&p| p != port)
        .unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let auth = if auth_clients { "yes" } else { "no" };
    let extra = vec![
        "--tls-port".into(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        path(&pki.server_cert),
        "--tls-key-file".into(),
        path(&pki.server_key),
        "--tls-ca-cert-file".into(),
        path(&pki.ca),
        "--tls-auth-clients".into(),
        auth.into(),
    ];
    let mut server = RedisServer {
        port,
        dir: dir.to_path_buf(),
        child: None,
        extra,
    };
    server.restart();
    (server, tls_port)
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(pid) = self.child.as_ref().map(|c| c.id()) {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(pid.to_string())
                .status();
        }
        self.kill();
    }
}

/// An origin that fails on every access and counts the attempts.
#[derive(Default)]
struct Failing {
    calls: AtomicU64,
}

impl Source for Failing {
    fn describe(&self) -> String {
        "failing origin".into()
    }
    fn manifest(&self, reference: &str) -> Result<(String, Vec<u8>, String), SourceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(SourceError::NotFound(format!(
            "the test origin refuses manifest {reference}"
        )))
    }
    fn blob(
        &self,
        digest: &str,
        _start: u64,
        _end: Option<u64>,
    ) -> Result<Box<dyn Read + Send>, SourceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(SourceError::NotFound(format!(
            "the test origin refuses blob {digest}"
        )))
    }
}

/// Number of (file, piece) reads a full pass does.
fn piece_reads(index: &IndexFile) -> u64 {
    files(index)
        .iter()
        .map(|(i, _)| index.pieces(*i).unwrap().len() as u64)
        .sum()
}

/// A tier with short retry delays so recovery is quick in tests.
fn tier(url: &str) -> Arc<RedisTier> {
    tier_with(RedisConfig::new(url))
}

/// [`tier`] with more settings.
fn tier_with(mut cfg: RedisConfig) -> Arc<RedisTier> {
    cfg.retry_min = Duration::from_millis(50);
    cfg.retry_max = Duration::from_millis(200);
    cfg.queue_bytes = 1 << 30;
    Arc::new(RedisTier::connect(cfg).unwrap())
}

fn as_tiers(t: &Arc<RedisTier>) -> Vec<Arc<dyn Tier>> {
    vec![t.clone() as Arc<dyn Tier>]
}

fn flushed(t: &RedisTier) {
    assert!(
        t.flush(Duration::from_secs(10)),
        "Redis writes did not drain in 10 s: {}",
        t.stats()
    );
}

#[test]
fn second_reader_reads_everything_from_redis_and_nothing_from_the_origin() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let redis = RedisServer::start(&tmp.path().join("redis"));
    let keys = piece_keys(&index);
    assert!(
        keys.len() > 20,
        "the edge image should have many pieces, has {}",
        keys.len()
    );

    let origin = counting_layout(&layout);
    let first = tier(&redis.url());
    let want = read_all(&index, &origin, &as_tiers(&first));
    assert!(origin.requests() > 0);
    flushed(&first);
    let s = first.stats();
    assert_eq!(s.hits, 0, "{s}");
    assert_eq!(
        s.writes_queued,
        piece_reads(&index),
        "every origin fill is queued: {s}"
    );
    assert_eq!(s.writes_done, s.writes_queued, "{s}");
    assert_eq!(s.writes_dropped + s.errors + s.verify_failures, 0, "{s}");
    drop(first);

    let stored = redis.keys();
    assert_eq!(
        stored, keys,
        "Redis must hold exactly the pieces' hex sha256 keys, nothing else"
    );
    assert!(stored.iter().all(|k| k.len() == 64
        && k.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))));
    let random = index.resolve(b"data/random.bin").unwrap().unwrap();
    let chunk = index.pieces(random).unwrap()[2];
    assert_eq!(
        redis.get(&chunk.key()).unwrap(),
        want["data/random.bin"][2 << 20..3 << 20],
        "values are the raw piece bytes"
    );

    let dead = Failing::default();
    let second = tier(&redis.url());
    let got = read_all(&index, &dead, &as_tiers(&second));
    assert_eq!(
        dead.calls.load(Ordering::SeqCst),
        0,
        "the second reader must not touch the origin"
    );
    assert_eq!(got, want);
    let s = second.stats();
    assert_eq!(s.hits, piece_reads(&index), "{s}");
    assert_eq!(
        s.misses + s.errors + s.verify_failures + s.writes_queued,
        0,
        "{s}"
    );
}

/// A second image: one layer with some files byte-identical to the edge image's, under
/// other paths, and some of its own.
fn twin_index(tmp: &Path) -> (PathBuf, PathBuf) {
    let mut t = TarBuilder::new();
    t.dir("./", 0o755)
        .dir("opt/", 0o755)
        .file("opt/same-random.bin", 0o644, &noise(1, 5 << 20))
        .file("opt/hostname-copy", 0o600, b"edge\n")
        .file("opt/small-42", 0o644, b"small file 42\n")
        .file("opt/own.bin", 0o644, &noise(7, 3 << 20 | 12345))
        .file("opt/own.txt", 0o644, b"only in the twin image\n");
    let dir = tmp.join("twin-layout");
    let index = tmp.join("twin.clip");
    common::one_layer_image(t.finish(), "2025-05-21T00:00:00Z", &dir, "twin", &index);
    (dir, index)
}

#[test]
fn two_images_with_identical_files_share_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let (edge_layout, edge_path) = edge_index(tmp.path());
    let (twin_layout, twin_path) = twin_index(tmp.path());
    let edge = IndexFile::open(&edge_path).unwrap();
    let twin = IndexFile::open(&twin_path).unwrap();
    let (ka, kb) = (piece_keys(&edge), piece_keys(&twin));
    let shared: BTreeSet<_> = ka.intersection(&kb).cloned().collect();
    assert_eq!(
        shared.len(),
        5 + 2,
        "5 chunks of random.bin, hostname, small file 42"
    );
    let redis = RedisServer::start(&tmp.path().join("redis"));

    let t = tier(&redis.url());
    read_all(&edge, &counting_layout(&edge_layout), &as_tiers(&t));
    flushed(&t);
    assert_eq!(redis.dbsize(), ka.len() as u64);

    let origin = counting_layout(&twin_layout);
    let before = t.stats();
    let got = read_all(&twin, &origin, &as_tiers(&t));
    flushed(&t);
    assert_eq!(
        redis.dbsize(),
        ka.union(&kb).count() as u64,
        "shared content is stored once"
    );
    assert_eq!(redis.keys(), ka.union(&kb).cloned().collect());
    let s = t.stats();
    assert_eq!(
        s.hits - before.hits,
        shared.len() as u64,
        "the twin's shared pieces come from Redis: {s}"
    );
    assert_eq!(
        s.misses - before.misses,
        (kb.len() - shared.len()) as u64,
        "{s}"
    );
    assert_eq!(got["opt/same-random.bin"], noise(1, 5 << 20));
    assert_eq!(got["opt/hostname-copy"], b"edge\n");
}

#[test]
fn poisoned_values_are_detected_deleted_and_refetched() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let redis = RedisServer::start(&tmp.path().join("redis"));
    let t = tier(&redis.url());
    let want = read_all(&index, &counting_layout(&layout), &as_tiers(&t));
    flushed(&t);
    drop(t);

    let host = index
        .pieces(index.resolve(b"etc/hostname").unwrap().unwrap())
        .unwrap()[0];
    let random = index.resolve(b"data/random.bin").unwrap().unwrap();
    let chunks = index.pieces(random).unwrap();
    redis.set(&host.key(), b"evil\n");
    redis.set(
        &chunks[1].key(),
        &want["data/random.bin"][(1 << 20)..(1 << 20) + 1000],
    );
    redis.set(&chunks[3].key(), &vec![0x5a; 3 << 20]);

    let origin = counting_layout(&layout);
    let t = tier(&redis.url());
    let tiers = as_tiers(&t);
    assert_eq!(
        read_file(&index, &origin, &tiers, host_entry(&index)),
        b"edge\n"
    );
    assert_eq!(
        read_file(&index, &origin, &tiers, random),
        want["data/random.bin"]
    );
    flushed(&t);
    let s = t.stats();
    assert_eq!(
        s.verify_failures, 3,
        "wrong bytes, truncated, oversized: {s}"
    );
    assert!(
        origin.requests() > 0,
        "the right bytes come from the origin"
    );
    assert_eq!(
        redis.get(&host.key()).unwrap(),
        b"edge\n",
        "the refetched bytes replace the poisoned value"
    );
    assert_eq!(
        redis.get(&chunks[1].key()).unwrap(),
        want["data/random.bin"][1 << 20..2 << 20]
    );
    assert_eq!(
        redis.get(&chunks[3].key()).unwrap(),
        want["data/random.bin"][3 << 20..4 << 20]
    );
    assert_eq!(
        s.writes_done, 3,
        "only the three bad pieces are rewritten: {s}"
    );
}

fn host_entry(index: &IndexFile) -> u32 {
    index.resolve(b"etc/hostname").unwrap().unwrap()
}

/// Read every file, asserting each file takes less than `per_file` and returning the time.
fn timed_read_all(
    index: &IndexFile,
    source: &dyn Source,
    tiers: &[Arc<dyn Tier>],
    want: &BTreeMap<String, Vec<u8>>,
    per_file: Duration,
) -> Duration {
    let start = Instant::now();
    for (i, p) in files(index) {
        let t = Instant::now();
        assert_eq!(read_file(index, source, tiers, i), want[&p], "{p}");
        assert!(
            t.elapsed() < per_file,
            "reading {p} took {:?} with Redis unavailable",
            t.elapsed()
        );
    }
    start.elapsed()
}

#[test]
fn killing_redis_mid_run_keeps_reads_working_and_it_is_used_again_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let want = read_all(&index, &counting_layout(&layout), &[]);
    let mut redis = RedisServer::start(&tmp.path().join("redis"));
    let t = tier(&redis.url());
    let tiers = as_tiers(&t);
    let origin = counting_layout(&layout);
    let all = files(&index);
    let half = all.len() / 2;
    for (i, p) in &all[..half] {
        assert_eq!(&read_file(&index, &origin, &tiers, *i), &want[p]);
    }
    flushed(&t);
    redis.kill();

    let took = timed_read_all(&index, &origin, &tiers, &want, Duration::from_secs(1));
    assert!(
        took < Duration::from_secs(10),
        "a full pass with Redis dead took {took:?}"
    );
    let s = t.stats();
    assert!(s.errors >= 1, "{s}");
    assert!(
        s.bypassed > 0,
        "reads after the failure skip Redis without waiting: {s}"
    );
    assert!(!t.is_up(), "no retry can have reached a dead Redis: {s}");

    redis.restart();
    std::thread::sleep(Duration::from_millis(300));
    let before = t.stats();
    read_all(&index, &origin, &tiers);
    flushed(&t);
    let s = t.stats();
    assert!(t.is_up(), "the tier reconnects after Redis comes back: {s}");
    assert!(
        s.writes_done > before.writes_done,
        "writes resume after the restart: {s}"
    );
    assert!(redis.dbsize() > 0);
}

#[test]
fn a_hung_redis_costs_at_most_one_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let want = read_all(&index, &counting_layout(&layout), &[]);
    let redis = RedisServer::start(&tmp.path().join("redis"));
    let t = tier(&redis.url());
    let tiers = as_tiers(&t);
    let origin = counting_layout(&layout);
    read_all(&index, &origin, &tiers);
    flushed(&t);
    redis.signal("STOP");

    let took = timed_read_all(&index, &origin, &tiers, &want, Duration::from_secs(1));
    assert!(
        took < Duration::from_secs(10),
        "a full pass with Redis stopped took {took:?}"
    );
    let s = t.stats();
    assert!(s.errors >= 1 && s.bypassed > 0, "{s}");
    redis.signal("CONT");
}

#[test]
fn a_missing_redis_at_start_is_a_warning_and_it_is_picked_up_later() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let want = read_all(&index, &counting_layout(&layout), &[]);
    let mut redis = RedisServer {
        port: free_port(),
        dir: tmp.path().join("redis"),
        child: None,
        extra: Vec::new(),
    };

    let started = Instant::now();
    let t = tier(&redis.url());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "setting up against a missing Redis took {:?}",
        started.elapsed()
    );
    assert!(!t.is_up());
    let tiers = as_tiers(&t);
    let origin = counting_layout(&layout);
    timed_read_all(&index, &origin, &tiers, &want, Duration::from_secs(1));
    let s = t.stats();
    assert_eq!(s.hits + s.writes_done, 0, "{s}");

    redis.restart();
    std::thread::sleep(Duration::from_millis(300));
    read_all(&index, &origin, &tiers);
    flushed(&t);
    assert!(t.is_up());
    assert_eq!(
        redis.keys(),
        piece_keys(&index),
        "once Redis is up, fills reach it"
    );
}

/// The `redis: N hits` count from the daemon's exit log.
fn logged_redis_hits(log: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("redis: ") && l.contains(" hits"))
        .unwrap_or_else(|| panic!("no Redis counters in the log:\n{log}"));
    let after = &line[line.find("redis: ").unwrap() + 7..];
    after.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn second_mount_on_an_empty_disk_cache_fetches_nothing_from_the_origin() {
    let tmp = tempfile::tempdir().unwrap();
    let (_layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let redis = RedisServer::start(&tmp.path().join("redis"));

    let (first, s1, log1) =
        mount_and_read_all(tmp.path(), "first", &index_path, &["--redis", &redis.url()]);
    assert!(
        s1["serve"]["fetched"].as_u64().unwrap() > 0,
        "the first mount reads the origin: {s1}"
    );
    // A cold read looks in the disk cache, then in Redis: a piece that another read kept
    // in both in between is a (rare) Redis hit, never most of the reads.
    assert!(
        logged_redis_hits(&log1) * 10 <= piece_keys(&index).len() as u64,
        "{log1}"
    );
    assert_eq!(
        redis.keys(),
        piece_keys(&index),
        "the first mount filled Redis with every piece: {}\n{log1}",
        s1["redis"]
    );

    let (second, s2, log2) = mount_and_read_all(
        tmp.path(),
        "second",
        &index_path,
        &["--redis", &redis.url()],
    );
    assert_eq!(second, first);
    assert!(first.len() > 50 && first.contains_key("data/random.bin"));
    assert_eq!(
        s2["serve"]["fetched"].as_u64(),
        Some(0),
        "the second mount must fetch nothing from the origin: {s2}"
    );
    assert_eq!(s2["serve"]["inflated"].as_u64(), Some(0), "{s2}");
    assert_eq!(s2["serve"]["read_errors"].as_u64(), Some(0), "{s2}");
    assert!(
        logged_redis_hits(&log2) >= piece_keys(&index).len() as u64,
        "{log2}"
    );
    assert_eq!(
        s2["redis"]["hits"].as_u64(),
        Some(logged_redis_hits(&log2)),
        "the stats file carries the Redis counters: {s2}"
    );
    common::assert_filled_from_empty(&s1);
}

#[test]
fn password_in_the_url_is_used_and_a_wrong_one_only_costs_a_fallback() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let redis = RedisServer::start_with(&tmp.path().join("redis"), &["--requirepass", "s3cret"]);
    let origin = counting_layout(&layout);

    let wrong = tier(&format!("redis://:nope@127.0.0.1:{}/0", redis.port));
    assert!(!wrong.is_up(), "a wrong password marks Redis unavailable");
    let want = read_all(&index, &origin, &as_tiers(&wrong));
    let s = wrong.stats();
    assert!(s.errors >= 1 && s.hits + s.writes_done == 0, "{s}");
    assert!(
        !wrong.url().contains("nope"),
        "the password is masked: {}",
        wrong.url()
    );
    assert_eq!(redis.dbsize(), 0);

    let right = tier(&redis.admin_url());
    assert!(right.is_up());
    assert_eq!(read_all(&index, &origin, &as_tiers(&right)), want);
    flushed(&right);
    assert_eq!(redis.dbsize(), piece_keys(&index).len() as u64);
}

#[test]
fn key_prefix_and_ttl_are_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let redis = RedisServer::start(&tmp.path().join("redis"));
    let mut cfg = RedisConfig::new(redis.url());
    cfg.key_prefix = "clip:".into();
    cfg.ttl = Some(Duration::from_secs(600));
    cfg.queue_bytes = 1 << 30;
    let t = Arc::new(RedisTier::connect(cfg).unwrap());
    read_all(&index, &counting_layout(&layout), &as_tiers(&t));
    flushed(&t);
    let want: BTreeSet<String> = piece_keys(&index)
        .into_iter()
        .map(|k| format!("clip:{k}"))
        .collect();
    assert_eq!(redis.keys(), want);
    let k = want.iter().next().unwrap();
    let ttl: i64 = redis::cmd("TTL").arg(k).query(&mut redis.conn()).unwrap();
    assert!((590..=600).contains(&ttl), "TTL of {k} is {ttl}");
    let s = t.stats();
    let dead = Failing::default();
    read_all(&index, &dead, &as_tiers(&t));
    assert_eq!(
        dead.calls.load(Ordering::SeqCst),
        0,
        "prefixed keys are read back: {}",
        t.stats()
    );
    assert_eq!(t.stats().hits - s.hits, piece_reads(&index));
}

#[test]
fn a_full_write_queue_drops_writes_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(&tmp.path().join("redis"));
    let mut cfg = RedisConfig::new(redis.url());
    cfg.queue_bytes = 2 << 20;
    cfg.max_value = 1 << 20;
    let t = RedisTier::connect(cfg).unwrap();
    let value = Bytes::from(noise(3, 1 << 20));
    let start = Instant::now();
    for i in 0..200u32 {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&i.to_le_bytes());
        t.put(&key, &value);
    }
    let took = start.elapsed();
    t.put(&[0xff; 32], &Bytes::from(vec![1u8; (1 << 20) + 1]));
    flushed(&t);
    let s = t.stats();
    assert!(
        took < Duration::from_secs(2),
        "200 puts of 1 MiB took {took:?}: put must not wait for Redis"
    );
    assert!(
        s.writes_dropped > 0,
        "a queue of 2 cannot take 200 MiB at once: {s}"
    );
    assert_eq!(s.writes_queued + s.writes_dropped, 200, "{s}");
    assert_eq!(s.writes_done, s.writes_queued, "{s}");
    assert_eq!(s.writes_too_large, 1, "{s}");
    assert_eq!(redis.dbsize(), s.writes_done);
}

/// Warnings logged on this thread while `f` runs.
fn warnings_during<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let out = Captured::default();
    let w = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || w.clone())
        .finish();
    let v = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    (v, text)
}

fn tls_config(port: u16, ca: Option<&Path>) -> RedisConfig {
    let mut cfg = RedisConfig::new(format!("rediss://127.0.0.1:{port}/0"));
    cfg.ca_file = ca.map(Path::to_path_buf);
    cfg
}

#[test]
fn rediss_with_the_ca_fills_redis_and_serves_a_second_reader_without_the_origin() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let pki = test_pki(&tmp.path().join("pki"));
    let (redis, tls_port) = start_tls(&tmp.path().join("redis"), &pki, false);

    let origin = counting_layout(&layout);
    let first = tier_with(tls_config(tls_port, Some(&pki.ca)));
    assert!(
        first.is_up(),
        "the TLS handshake with the test CA must succeed: {}",
        first.stats()
    );
    assert!(first.url().starts_with("rediss://"));
    let want = read_all(&index, &origin, &as_tiers(&first));
    flushed(&first);
    let s = first.stats();
    assert_eq!(
        s.writes_done,
        piece_reads(&index),
        "every origin fill is stored over TLS: {s}"
    );
    assert_eq!(s.errors + s.writes_dropped, 0, "{s}");
    drop(first);
    assert_eq!(redis.keys(), piece_keys(&index));

    let dead = Failing::default();
    let second = tier_with(tls_config(tls_port, Some(&pki.ca)));
    let got = read_all(&index, &dead, &as_tiers(&second));
    assert_eq!(
        dead.calls.load(Ordering::SeqCst),
        0,
        "the second reader must not touch the origin"
    );
    assert_eq!(got, want);
    let s = second.stats();
    assert_eq!(s.hits, piece_reads(&index), "{s}");
    assert_eq!(s.misses + s.errors + s.verify_failures, 0, "{s}");

    let plain = tier_with(tls_config(redis.port, Some(&pki.ca)));
    assert!(
        !plain.is_up(),
        "rediss:// to a port without TLS must fail, proving the tier really speaks TLS"
    );
    assert_eq!(
        read_file(&index, &origin, &as_tiers(&plain), host_entry(&index)),
        b"edge\n"
    );
}

#[test]
fn rediss_without_the_ca_falls_back_to_the_origin_with_one_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let want = read_all(&index, &counting_layout(&layout), &[]);
    let pki = test_pki(&tmp.path().join("pki"));
    let (redis, tls_port) = start_tls(&tmp.path().join("redis"), &pki, false);
    let origin = counting_layout(&layout);

    let started = Instant::now();
    let (t, log) = warnings_during(|| {
        let t = tier_with(tls_config(tls_port, None));
        timed_read_all(
            &index,
            &origin,
            &as_tiers(&t),
            &want,
            Duration::from_secs(1),
        );
        // Read again after the retry delay until a retry has happened (bounded).
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(300));
            timed_read_all(
                &index,
                &origin,
                &as_tiers(&t),
                &want,
                Duration::from_secs(1),
            );
            if t.stats().errors >= 2 {
                break;
            }
        }
        t
    });
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "falling back took {:?}",
        started.elapsed()
    );
    assert!(!t.is_up(), "the built-in roots do not trust the test CA");
    let s = t.stats();
    assert!(
        s.errors >= 2 && s.bypassed > 0 && s.hits + s.writes_done == 0,
        "retries happened and all failed: {s}"
    );
    assert_eq!(
        log.matches("Redis connect failed").count(),
        1,
        "one warning per outage, not per retry:\n{log}"
    );
    assert!(
        log.contains("not trusted") && log.contains("--redis-ca-file"),
        "the warning says what to do:\n{log}"
    );
    assert_eq!(redis.dbsize(), 0);
}

#[test]
fn a_client_certificate_is_sent_when_the_server_requires_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let pki = test_pki(&tmp.path().join("pki"));
    let (redis, tls_port) = start_tls(&tmp.path().join("redis"), &pki, true);
    let origin = counting_layout(&layout);

    let anonymous = tier_with(tls_config(tls_port, Some(&pki.ca)));
    let want = read_all(&index, &origin, &as_tiers(&anonymous));
    assert!(
        !anonymous.is_up() && anonymous.stats().writes_done == 0,
        "the server demands a client certificate: {}",
        anonymous.stats()
    );

    let mut cfg = tls_config(tls_port, Some(&pki.ca));
    cfg.client_cert = Some(pki.client_cert.clone());
    cfg.client_key = Some(pki.client_key.clone());
    let t = tier_with(cfg);
    assert!(t.is_up());
    assert_eq!(read_all(&index, &origin, &as_tiers(&t)), want);
    flushed(&t);
    assert_eq!(redis.keys(), piece_keys(&index));
}

#[test]
fn clip_serve_uses_rediss_with_a_ca_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let pki = test_pki(&tmp.path().join("pki"));
    let (redis, tls_port) = start_tls(&tmp.path().join("redis"), &pki, false);
    let fill = tier_with(tls_config(tls_port, Some(&pki.ca)));
    let want = read_all(&index, &counting_layout(&layout), &as_tiers(&fill));
    flushed(&fill);
    drop(fill);
    assert_eq!(redis.keys(), piece_keys(&index));
    let url = format!("rediss://127.0.0.1:{tls_port}/0");

    let args = [
        "--redis",
        url.as_str(),
        "--redis-ca-file",
        pki.ca.to_str().unwrap(),
    ];
    let (got, s, log) = mount_and_read_all(tmp.path(), "with-ca", &index_path, &args);
    assert_eq!(got["data/random.bin"], want["data/random.bin"]);
    assert_eq!(
        s["serve"]["fetched"].as_u64(),
        Some(0),
        "the mount reads everything from Redis over TLS: {s}"
    );
    assert!(
        logged_redis_hits(&log) >= piece_keys(&index).len() as u64,
        "{log}"
    );

    let (without, s, log) =
        mount_and_read_all(tmp.path(), "no-ca", &index_path, &["--redis", &url]);
    assert_eq!(
        without, got,
        "without the CA the mount still works, from the origin"
    );
    assert!(s["serve"]["fetched"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["redis"]["hits"].as_u64(), Some(0), "{s}");
    assert_eq!(
        log.matches("--redis-ca-file").count(),
        1,
        "one warning that names the fix:\n{log}"
    );
}

#[test]
fn contains_tells_which_pieces_redis_holds_without_reading_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let redis = RedisServer::start(&tmp.path().join("redis"));
    let t = tier(&redis.url());
    let host = index.pieces(host_entry(&index)).unwrap()[0];
    assert!(!t.contains(&host.sha256), "nothing stored yet");
    read_all(&index, &counting_layout(&layout), &as_tiers(&t));
    flushed(&t);
    let before = t.stats();
    assert!(t.contains(&host.sha256), "stored by the first read");
    assert_eq!(
        t.stats().bytes_read,
        before.bytes_read,
        "no bytes were read"
    );
    t.remove(&host.sha256);
    assert!(!t.contains(&host.sha256), "deleted");
}

#[test]
fn daemons_sharing_redis_share_the_access_profile_they_learn() {
    let tmp = tempfile::tempdir().unwrap();
    let (_layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let manifest = String::from_utf8(index.index().image.manifest_digest.to_vec()).unwrap();
    let key = format!(
        "profile:{}-{:016x}",
        manifest.replace(':', "-"),
        index.checkpoint_layout_id()
    );
    let redis = RedisServer::start(&tmp.path().join("redis"));
    let args = ["--redis", &redis.url()];

    let (first, _, log1) = mount_and_read_all(tmp.path(), "first", &index_path, &args);
    let log1 = plain(&log1);
    assert!(log1.contains("access profile shared in Redis"), "{log1}");
    let text = String::from_utf8(redis.get(&key).expect("the learnt profile is in Redis")).unwrap();
    assert!(
        text.starts_with(&format!(
            "clip-profile 3\nmanifest {manifest}\nlayout {:016x}\n",
            index.checkpoint_layout_id()
        )) && text.lines().count() > 3,
        "{text}"
    );

    // A node that never ran the image: its own cache is empty, and so is Redis but for
    // the profile, so that what it prefetches comes from the origin.
    for k in redis.keys() {
        redis::cmd("DEL")
            .arg(&k)
            .query::<()>(&mut redis.conn())
            .unwrap();
    }
    let (second, s2, log2) = mount_and_read_all(tmp.path(), "second", &index_path, &args);
    let log2 = plain(&log2);
    assert_eq!(second, first);
    assert!(
        log2.contains("access profile learnt by other daemons, from Redis"),
        "{log2}"
    );
    let line = log2
        .lines()
        .find(|l| l.contains("profile prefetched"))
        .unwrap_or_else(|| panic!("the second daemon prefetches the shared profile:\n{log2}"));
    let field = |name: &str| -> u64 {
        let at = line.find(&format!(" {name}=")).unwrap() + name.len() + 2;
        line[at..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(field("cached"), 0, "{line}");
    assert!(field("requests") >= 1, "{line}");
    assert!(s2["serve"]["fetched"].as_u64().unwrap() > 0, "{s2}");

    // A profile in Redis that names another image is ignored, with a warning.
    redis.set(
        &key,
        text.replace(&manifest, &format!("sha256:{}", "0".repeat(64)))
            .as_bytes(),
    );
    let (third, _, log3) = mount_and_read_all(tmp.path(), "third", &index_path, &args);
    let log3 = plain(&log3);
    assert_eq!(third, first);
    assert!(
        log3.contains("ignoring the access profile in Redis"),
        "{log3}"
    );
    assert!(!log3.contains("profile prefetched"), "{log3}");
}
