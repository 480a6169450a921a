//! Cold start of a whole image, side by side: every regular file read through fresh
//! `FileReader`s (as a first mount would) from the origin, from Redis, and from the local
//! disk cache. Each pass verifies every piece against its sha256, as the daemon does.
//!
//! ```text
//! cargo bench --bench redis                      # $BENCH_DIR/oci:debian-python if built, else the demo image
//! cargo bench --bench redis -- --image /tmp/bench/oci:tiny --runs 5 --threads 2
//! cargo bench --bench redis -- --origin /tmp/bench/oci:debian-python --origin 127.0.0.1:5000/debian-python:latest
//! tools/bench-redis.sh                           # also starts a private registry over $BENCH_DIR/registry
//! cargo bench --bench redis -- --redis redis://127.0.0.1:6390/0   # an existing Redis (it is FLUSHDB'd!)
//! ```
//!
//! Each `--origin` (default: the image itself) gets its own row; all must hold the same
//! image. Without `--redis` a private `redis-server` is started on a free loopback port and killed
//! at the end. The page cache is warm for the origin layout and the disk cache (dropping it
//! would disturb the machine); Redis is on loopback.

#[path = "../tests/common/mod.rs"]
mod common;

use clip::cache::redis::{RedisConfig, RedisTier};
use clip::cache::DiskCache;
use clip::format::{IndexFile, Kind};
use clip::read::{FileReader, Tier};
use clip::source::Source;
use common::Counting;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Opts {
    image: String,
    origins: Vec<String>,
    redis: Option<String>,
    runs: usize,
    threads: usize,
}

fn usage() -> ! {
    eprintln!("usage: cargo bench --bench redis -- [--image SPEC] [--origin SPEC]... [--redis URL] [--runs N] [--threads N]");
    std::process::exit(2)
}

fn opts() -> Opts {
    let bench = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/tmp/bench".into());
    let corpus = Path::new(&bench).join("oci");
    let image = if corpus.join("index.json").is_file() {
        format!("{}:debian-python", corpus.display())
    } else {
        String::new()
    };
    let mut o = Opts {
        image,
        origins: Vec::new(),
        redis: None,
        runs: 3,
        threads: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--bench" => {}
            "--image" => o.image = val(),
            "--origin" => o.origins.push(val()),
            "--redis" => o.redis = Some(val()),
            "--runs" => o.runs = val().parse().unwrap_or_else(|_| usage()),
            "--threads" => o.threads = val().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    o.runs = o.runs.max(1);
    o.threads = o.threads.max(1);
    o
}

/// One line of the result table: its label, the origin and the tiers in front of it.
type Row<'a> = (String, &'a Counting, &'a [Arc<dyn Tier>]);

/// A private redis-server, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis(dir: &Path) -> (Server, String) {
    let found = Command::new("sh")
        .arg("-c")
        .arg("command -v redis-server")
        .output()
        .map(|o| o.status.success());
    assert!(found.unwrap_or(false), "redis-server is not installed; run .ci/run (it apt-get installs redis-server) or pass --redis URL");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start redis-server");
    let server = Server(child);
    let url = format!("redis://127.0.0.1:{port}/0");
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_conn(&url).is_none() {
        assert!(
            Instant::now() < deadline,
            "redis-server on port {port} did not come up in 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, url)
}

fn redis_conn(url: &str) -> Option<redis::Connection> {
    let mut c = redis::Client::open(url)
        .ok()?
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    redis::cmd("PING").query::<String>(&mut c).ok()?;
    Some(c)
}

/// Regular files of the index.
fn files(index: &IndexFile) -> Vec<u32> {
    (0..index.entry_count())
        .filter(|&i| {
            index
                .entry(i)
                .map(|e| e.kind == Kind::File as u8)
                .unwrap_or(false)
        })
        .collect()
}

/// Read every file with fresh readers on `threads` threads; (bytes, seconds).
fn pass(
    index: &IndexFile,
    files: &[u32],
    source: &dyn Source,
    tiers: &[Arc<dyn Tier>],
    threads: usize,
) -> (u64, f64) {
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&f) = files.get(k) else { break };
                    let mut r = FileReader::new(index, f).expect("index entry");
                    let mut off = 0u64;
                    while off < r.size() {
                        let n = r
                            .read_at(index, source, tiers, off, &mut buf)
                            .unwrap_or_else(|e| panic!("reading entry {f}: {e}"));
                        off += n as u64;
                    }
                    bytes.fetch_add(off, Ordering::Relaxed);
                }
            });
        }
    });
    (bytes.load(Ordering::Relaxed), start.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let o = opts();
    let tmp = tempfile::tempdir().expect("temp dir");
    let image = if o.image.is_empty() {
        let dir = tmp.path().join("demo");
        clip::demo::write_demo(&dir).expect("writing the demo image");
        format!("{}:{}", dir.display(), clip::demo::DEMO_TAG)
    } else {
        o.image.clone()
    };
    let index_path: PathBuf = tmp.path().join("image.clip");
    let t = Instant::now();
    let st = Command::new(env!("CARGO_BIN_EXE_clip-build"))
        .arg(&image)
        .arg("-o")
        .arg(&index_path)
        .arg("--quiet")
        .status()
        .expect("running clip-build");
    assert!(st.success(), "clip-build {image} failed");
    eprintln!("indexed {image} in {:.2} s", t.elapsed().as_secs_f64());
    let index = IndexFile::open(&index_path).expect("opening the index");
    let files = files(&index);
    let specs = if o.origins.is_empty() {
        vec![image.clone()]
    } else {
        o.origins.clone()
    };
    let origins: Vec<Counting> = specs
        .iter()
        .map(|spec| {
            let (inner, _) =
                clip::source::open(spec).unwrap_or_else(|e| panic!("opening origin {spec}: {e}"));
            Counting::new(std::sync::Arc::from(inner))
        })
        .collect();
    let origin = &origins[0];

    let (_server, url) = match &o.redis {
        Some(u) => (None, u.clone()),
        None => {
            let (s, u) = start_redis(tmp.path());
            (Some(s), u)
        }
    };
    let mut admin = redis_conn(&url).unwrap_or_else(|| panic!("cannot reach Redis at {url}"));
    redis::cmd("FLUSHDB")
        .query::<()>(&mut admin)
        .expect("FLUSHDB");
    let mut cfg = RedisConfig::new(url.clone());
    cfg.queue_bytes = 4 << 30;
    cfg.io_timeout = Duration::from_secs(2);
    let redis_tier = Arc::new(RedisTier::connect(cfg).expect("Redis tier"));
    let disk =
        Arc::new(DiskCache::open(&tmp.path().join("disk"), u64::MAX / 2).expect("disk cache"));

    let t = Instant::now();
    let fill: Vec<Arc<dyn Tier>> = vec![disk.clone(), redis_tier.clone()];
    pass(&index, &files, origin, &fill, o.threads);
    assert!(
        redis_tier.flush(Duration::from_secs(120)),
        "Redis writes did not drain"
    );
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut admin).unwrap_or(0);
    let used: String = redis::cmd("INFO")
        .arg("memory")
        .query::<String>(&mut admin)
        .unwrap_or_default();
    let used = used
        .lines()
        .find_map(|l| l.strip_prefix("used_memory_human:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    eprintln!(
        "filled disk cache and Redis in {:.2} s: {}; {dbsize} keys, {used}",
        t.elapsed().as_secs_f64(),
        redis_tier.stats()
    );

    let only_redis: Vec<Arc<dyn Tier>> = vec![redis_tier.clone()];
    let only_disk: Vec<Arc<dyn Tier>> = vec![disk.clone()];
    let mut rows: Vec<Row> = Vec::new();
    for c in &origins {
        rows.push((format!("origin {}", c.describe()), c, &[]));
    }
    rows.push(("redis".into(), origin, &only_redis));
    rows.push(("disk cache".into(), origin, &only_disk));
    println!();
    println!(
        "image {image}: {} regular files; {} thread(s), median of {} runs",
        files.len(),
        o.threads,
        o.runs
    );
    println!(
        "{:<40} {:>8} {:>9} {:>8} {:>13}",
        "read from", "MB", "seconds", "MB/s", "origin calls"
    );
    for (name, src, tiers) in rows {
        let before = src.requests();
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..o.runs {
            let (b, s) = pass(&index, &files, src, tiers, o.threads);
            bytes = b;
            times.push(s);
        }
        let calls = (src.requests() - before) / o.runs as u64;
        let s = median(times);
        println!(
            "{name:<40} {:>8.1} {s:>9.3} {:>8.0} {calls:>13}",
            bytes as f64 / 1e6,
            bytes as f64 / 1e6 / s
        );
    }
    println!("{}", redis_tier.stats());
}
