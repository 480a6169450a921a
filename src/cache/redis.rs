//! Redis as a shared, content-addressed cache tier between the local disk cache and the
//! origin (registry or OCI layout).
//!
//! * **Keys** are exactly the 64-character lowercase hex sha256 of a piece (a whole file of at
//!   most 1 MiB, or one 1 MiB chunk of a larger file), optionally behind a user-chosen prefix
//!   (`--redis-key-prefix`, default empty). Identical content from any image, layer or
//!   worker therefore shares one key.
//! * **Values** are the raw piece bytes. Pieces are at most 1 MiB, a value size Redis handles
//!   well (one `GET`/`SET` round trip, no big-key latency spikes), so no further splitting is
//!   done. Values above [`RedisConfig::max_value`] are never written, and reads fetch at most
//!   `max_value + 1` bytes (`GETRANGE`), so a huge foreign value cannot blow up memory.
//! * **Nothing is trusted**: [`crate::read::FileReader`] verifies every value against its
//!   key and calls [`Tier::remove`] for a wrong one; this tier counts it as a verify failure
//!   and deletes the key.
//! * **Writes** after an origin fill go through a queue bounded by bytes (64 MiB) drained by one background
//!   thread that pipelines `SET`s (with an optional TTL). A full queue drops the write; a
//!   read never waits for a write.
//! * **Failures**: connects and commands have short timeouts. The first failure opens a
//!   circuit breaker: reads and writes skip Redis at once (reads go to the origin), a warning
//!   is logged once per outage, and one probe retries the connection after an exponential
//!   backoff. A FUSE read waits for Redis at most one timeout.
//! * **TLS**: `rediss://HOST:PORT/DB` speaks TLS through rustls (ring), verifying the server
//!   certificate and that it names the URL's host. By default the Mozilla roots built into
//!   the binary (webpki-roots) are trusted; [`RedisConfig::ca_file`] (`--redis-ca-file`)
//!   replaces them with the PEM certificates of a private CA. A client certificate and key
//!   ([`RedisConfig::client_cert`], [`RedisConfig::client_key`]) are sent when given, for
//!   servers with `tls-auth-clients yes`. Files are read and parsed once, in [`RedisTier::connect`]:
//!   a missing or unparsable file is a startup error, while an untrusted server certificate
//!   is a runtime failure like any other (one warning naming `--redis-ca-file`, reads go to
//!   the origin). Skipping verification (`rediss://…#insecure`) is refused. Connections are
//!   pooled, so the handshake is paid once per pooled connection; the connect timeout covers
//!   TCP connect, TLS handshake and connection setup.
//! * **Redis Cluster** (`--redis-cluster URL[,URL...]`): the URLs are seed nodes, the other
//!   nodes are discovered with `CLUSTER SLOTS`. Each key goes to the primary owning its slot
//!   (the crate's sync cluster client, following `MOVED`/`ASK` once). The background writer
//!   groups a batch by owning node and sends one pipeline per node. Node connections get the
//!   same timeouts as single-node connections, including their setup commands (the crate's
//!   default node connection sends its first `PING` without a timeout, so a node that
//!   accepts TCP but never answers would hang a read). One circuit breaker covers the whole
//!   cluster: a failing node sends every read to the origin until a retry succeeds, and
//!   failures less than two maximum retry delays apart count as one outage (one warning,
//!   growing backoff) so a cluster with one dead node does not flap. `rediss://` seeds use
//!   the same TLS options as a single node; all seeds must share scheme and password, and a
//!   cluster only has database 0.

use crate::read::Tier;
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Environment variable read when `--redis` is not given (keeps a password out of `ps`).
pub const REDIS_URL_ENV: &str = "CLIP_REDIS_URL";
/// Environment variable read when `--redis-cluster` is not given: comma-separated seed URLs.
pub const REDIS_CLUSTER_ENV: &str = "CLIP_REDIS_CLUSTER";
/// Environment variable read when `--redis-ca-file` is not given.
pub const REDIS_CA_FILE_ENV: &str = "CLIP_REDIS_CA_FILE";
/// Environment variable read when `--redis-client-cert` is not given.
pub const REDIS_CLIENT_CERT_ENV: &str = "CLIP_REDIS_CLIENT_CERT";
/// Environment variable read when `--redis-client-key` is not given.
pub const REDIS_CLIENT_KEY_ENV: &str = "CLIP_REDIS_CLIENT_KEY";

/// Errors setting up the Redis tier (runtime failures never surface: they fall through to
/// the origin).
#[derive(Debug, thiserror::Error)]
pub enum RedisTierError {
    /// The URL could not be parsed.
    #[error("invalid Redis URL {url}: {reason}; use redis://[:PASSWORD@]HOST:PORT/DB or rediss://[:PASSWORD@]HOST:PORT/DB")]
    BadUrl {
        /// The URL with its password masked.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// A scheme this build does not speak.
    #[error("Redis URL {url}: {what} is not supported by this build; {hint}")]
    Unsupported {
        /// The URL with its password masked.
        url: String,
        /// The unsupported feature.
        what: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
    /// A setting is out of range.
    #[error("{0}")]
    BadSetting(String),
    /// A TLS file (CA, client certificate or key) could not be read.
    #[error("cannot read the Redis TLS {what} {}: {source}; give the path of a readable PEM file", path.display())]
    TlsFile {
        /// Which file: "CA file", "client certificate" or "client key".
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The TLS files were read but are not usable PEM certificates or keys.
    #[error("unusable Redis TLS settings: {0}; --redis-ca-file and --redis-client-cert must hold PEM certificates and --redis-client-key a PEM private key")]
    BadTls(String),
    /// The writer thread could not be started.
    #[error("starting the Redis writer thread: {0}")]
    Thread(std::io::Error),
}

/// Command-line options of the Redis tier, to be flattened into a binary's arguments.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RedisArgs {
    /// Shared Redis cache between the disk cache and the origin:
    /// redis://[:PASSWORD@]HOST:PORT/DB, or rediss://… for TLS (or set CLIP_REDIS_URL). A Redis
    /// that is down only costs a warning. For a Redis Cluster use --redis-cluster instead.
    #[arg(long = "redis", value_name = "URL")]
    pub url: Option<String>,
    /// Shared Redis Cluster cache instead of a single Redis: comma-separated seed nodes
    /// redis://[:PASSWORD@]HOST:PORT or rediss://… (all the same scheme and password; the other
    /// nodes are discovered), or set CLIP_REDIS_CLUSTER. Not together with --redis.
    #[arg(
        long = "redis-cluster",
        value_name = "URL[,URL...]",
        value_delimiter = ','
    )]
    pub cluster: Vec<String>,
    /// PEM CA certificate(s) to trust for rediss:// instead of the built-in public roots
    /// (or set CLIP_REDIS_CA_FILE).
    #[arg(long = "redis-ca-file", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for rediss:// servers that require one (or set
    /// CLIP_REDIS_CLIENT_CERT); needs --redis-client-key.
    #[arg(long = "redis-client-cert", value_name = "PATH")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --redis-client-cert (or set CLIP_REDIS_CLIENT_KEY).
    #[arg(long = "redis-client-key", value_name = "PATH")]
    pub client_key: Option<PathBuf>,
    /// Prefix for Redis keys, for a Redis shared with other applications (default: none,
    /// keys are the bare hex sha256).
    #[arg(long = "redis-key-prefix", value_name = "PREFIX", default_value = "")]
    pub key_prefix: String,
    /// Expire pieces written to Redis after this many seconds (default: never).
    #[arg(long = "redis-ttl", value_name = "SECONDS")]
    pub ttl: Option<u64>,
    /// Largest value written to or read from Redis, in bytes.
    #[arg(long = "redis-max-value", value_name = "BYTES", default_value_t = DEFAULT_MAX_VALUE)]
    pub max_value: usize,
}

impl RedisArgs {
    /// The configuration these options ask for, or `None` when no Redis was given (none of
    /// `--redis`, `CLIP_REDIS_URL`, `--redis-cluster`, `CLIP_REDIS_CLUSTER`). Giving both a
    /// single Redis and a cluster is an error.
    pub fn config(&self) -> Result<Option<RedisConfig>, RedisTierError> {
        let single = self.url.clone().or_else(|| {
            std::env::var(REDIS_URL_ENV)
                .ok()
                .filter(|u| !u.trim().is_empty())
        });
        let seeds: Vec<String> = if self.cluster.is_empty() {
            std::env::var(REDIS_CLUSTER_ENV)
                .map(|v| split_seeds(&v))
                .unwrap_or_default()
        } else {
            self.cluster.iter().flat_map(|v| split_seeds(v)).collect()
        };
        let mut cfg = match (single, seeds.is_empty()) {
            (None, true) => return Ok(None),
            (Some(url), true) => RedisConfig::new(url),
            (None, false) => RedisConfig::cluster(seeds),
            (Some(_), false) => {
                return Err(RedisTierError::BadSetting(
                    "both a single Redis (--redis or CLIP_REDIS_URL) and a Redis Cluster (--redis-cluster or CLIP_REDIS_CLUSTER) were given; keep one: --redis for one server or a cluster proxy, --redis-cluster for the seed nodes of a Redis Cluster".into(),
                ))
            }
        };
        cfg.key_prefix = self.key_prefix.clone();
        cfg.ttl = match self.ttl {
            Some(0) => {
                return Err(RedisTierError::BadSetting(
                    "--redis-ttl must be at least 1 second (leave it out for no expiry)".into(),
                ))
            }
            Some(s) => Some(Duration::from_secs(s)),
            None => None,
        };
        cfg.max_value = self.max_value;
        cfg.ca_file = path_or_env(&self.ca_file, REDIS_CA_FILE_ENV);
        cfg.client_cert = path_or_env(&self.client_cert, REDIS_CLIENT_CERT_ENV);
        cfg.client_key = path_or_env(&self.client_key, REDIS_CLIENT_KEY_ENV);
        Ok(Some(cfg))
    }
}

/// The non-empty, trimmed URLs of a comma-separated list.
fn split_seeds(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(String::from)
        .collect()
}

/// The flag's path, else a non-empty environment variable.
fn path_or_env(flag: &Option<PathBuf>, env: &str) -> Option<PathBuf> {
    flag.clone().or_else(|| {
        std::env::var_os(env)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// Default [`RedisConfig::max_value`]: one piece (1 MiB).
pub const DEFAULT_MAX_VALUE: usize = 1 << 20;

/// Where a [`RedisTier`] keeps its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server or a cluster proxy: `redis://[:PASSWORD@]HOST:PORT/DB`, `rediss://…` (TLS)
    /// or `redis+unix:///path.sock`.
    Node(String),
    /// A Redis Cluster, reached through these seed nodes (`redis://[:PASSWORD@]HOST:PORT` or
    /// `rediss://…`, all with the same scheme and password); the other nodes are discovered.
    Cluster(Vec<String>),
}

/// Settings of a [`RedisTier`].
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// The single server or the cluster.
    pub target: RedisTarget,
    /// For `rediss://` (every node of a cluster): PEM CA certificate(s) trusted instead of the
    /// built-in public roots.
    pub ca_file: Option<PathBuf>,
    /// For `rediss://`: PEM client certificate (chain) sent to the server; needs `client_key`.
    pub client_cert: Option<PathBuf>,
    /// For `rediss://`: PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Prepended to every key (default empty).
    pub key_prefix: String,
    /// Expiry of written values (default none).
    pub ttl: Option<Duration>,
    /// Largest value written or read (default 1 MiB).
    pub max_value: usize,
    /// TCP connect (and handshake) timeout.
    pub connect_timeout: Duration,
    /// Read/write timeout of one command.
    pub io_timeout: Duration,
    /// Bytes of writes waiting for the background writer; more are dropped. Bounded by
    /// bytes, not count: one cold read can keep hundreds of small neighbouring files.
    pub queue_bytes: usize,
    /// Idle connections kept for reuse (for a cluster: sets of one connection per node).
    pub pool_size: usize,
    /// First retry delay after a failure (doubles per failure).
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl RedisConfig {
    /// Defaults for the single server at `url`: 100 ms connect, 200 ms command timeout,
    /// 64 MiB of queued writes, retries from 250 ms up to 10 s.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig::with_target(RedisTarget::Node(url.into()))
    }

    /// The same defaults for the Redis Cluster reached through the seed URLs `seeds`.
    pub fn cluster(seeds: impl IntoIterator<Item = impl Into<String>>) -> RedisConfig {
        RedisConfig::with_target(RedisTarget::Cluster(
            seeds.into_iter().map(Into::into).collect(),
        ))
    }

    fn with_target(target: RedisTarget) -> RedisConfig {
        RedisConfig {
            target,
            ca_file: None,
            client_cert: None,
            client_key: None,
            key_prefix: String::new(),
            ttl: None,
            max_value: DEFAULT_MAX_VALUE,
            connect_timeout: Duration::from_millis(100),
            io_timeout: Duration::from_millis(200),
            queue_bytes: 64 << 20,
            pool_size: 8,
            retry_min: Duration::from_millis(250),
            retry_max: Duration::from_secs(10),
        }
    }
}

/// Counters of a [`RedisTier`] since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RedisStats {
    /// Reads that returned a value (verified later by the caller).
    pub hits: u64,
    /// Reads of a key Redis does not hold.
    pub misses: u64,
    /// Reads skipped because Redis was marked down (circuit breaker open).
    pub bypassed: u64,
    /// Failed commands or connects (timeouts, refusals, server errors).
    pub errors: u64,
    /// Values that failed verification by the caller (each was deleted).
    pub verify_failures: u64,
    /// Writes accepted into the background queue.
    pub writes_queued: u64,
    /// Writes stored in Redis.
    pub writes_done: u64,
    /// Writes dropped: queue full, Redis down, or the write failed.
    pub writes_dropped: u64,
    /// Writes not attempted because the value exceeds the maximum size.
    pub writes_too_large: u64,
    /// Bytes returned by hits.
    pub bytes_read: u64,
    /// Bytes stored by writes.
    pub bytes_written: u64,
}

impl std::fmt::Display for RedisStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "redis: {} hits ({} bytes), {} misses, {} bypassed while down, {} errors, {} verify failures; writes: {} queued, {} stored ({} bytes), {} dropped, {} too large",
            self.hits,
            self.bytes_read,
            self.misses,
            self.bypassed,
            self.errors,
            self.verify_failures,
            self.writes_queued,
            self.writes_done,
            self.bytes_written,
            self.writes_dropped,
            self.writes_too_large
        )
    }
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    bypassed: AtomicU64,
    errors: AtomicU64,
    verify_failures: AtomicU64,
    writes_queued: AtomicU64,
    writes_done: AtomicU64,
    writes_dropped: AtomicU64,
    writes_too_large: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// Writes queued but not yet stored or dropped by the writer.
    pending: AtomicU64,
    /// Their bytes.
    pending_bytes: AtomicU64,
}

/// A queued write: key and value.
type Write = ([u8; 32], Bytes);

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Circuit breaker state: `retry_at` set means Redis is considered down until then.
#[derive(Default)]
struct Breaker {
    /// Failures in the current outage (drives the backoff).
    failures: u32,
    retry_at: Option<Instant>,
    /// When the last failure happened: a failure soon after it continues the same outage.
    last_failure: Option<Instant>,
}

/// How connections are made.
enum Backend {
    /// One server.
    Node(redis::Client),
    /// A Redis Cluster.
    Cluster(redis::cluster::ClusterClient),
}

/// A pooled connection.
enum Conn {
    /// To the one server.
    Node(redis::Connection),
    /// To every reachable primary of the cluster.
    Cluster(Box<ClusterConn>),
}

/// A cluster connection and the slot owners its writes are grouped by.
struct ClusterConn {
    conn: redis::cluster::ClusterConnection<TimedNode>,
    /// `(first slot, last slot, "host:port" of the primary)`, fetched at the first write.
    owners: Option<Vec<(u16, u16, String)>>,
}

/// Number of Redis Cluster hash slots.
const SLOTS: u16 = 16384;

/// The cluster slot of `key`: CRC16/XMODEM of its hash tag (the part between the first `{`
/// and the next `}`, when not empty) or of the whole key, modulo 16384.
fn key_slot(key: &[u8]) -> u16 {
    let tag = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    let mut crc: u16 = 0;
    for &b in tag.unwrap_or(key) {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// The slot ranges of a `CLUSTER SLOTS` reply with the address of each range's primary.
fn slot_owners(reply: &redis::Value) -> Vec<(u16, u16, String)> {
    let redis::Value::Array(ranges) = reply else {
        return Vec::new();
    };
    let range = |r: &redis::Value| -> Option<(u16, u16, String)> {
        let redis::Value::Array(fields) = r else {
            return None;
        };
        let start = redis::from_redis_value_ref(fields.first()?).ok()?;
        let end = redis::from_redis_value_ref(fields.get(1)?).ok()?;
        let redis::Value::Array(primary) = fields.get(2)? else {
            return None;
        };
        let host: String = redis::from_redis_value_ref(primary.first()?).ok()?;
        let port: u16 = redis::from_redis_value_ref(primary.get(1)?).ok()?;
        Some((start, end, format!("{host}:{port}")))
    };
    ranges.iter().filter_map(range).collect()
}

impl ClusterConn {
    /// Store `sets` (key, `SET` command): one pipeline per owning primary. Each pipeline is
    /// routed by its first key, so all its keys must live on that node; a stale slot map
    /// shows up as a `MOVED` error.
    fn store(&mut self, sets: &[(String, redis::Cmd)]) -> redis::RedisResult<()> {
        if self.owners.is_none() {
            let reply: redis::Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut self.conn)?;
            self.owners = Some(slot_owners(&reply));
        }
        let owners = self.owners.as_deref().unwrap_or_default();
        let mut groups: std::collections::BTreeMap<&str, redis::Pipeline> =
            std::collections::BTreeMap::new();
        for (key, cmd) in sets {
            let slot = key_slot(key.as_bytes());
            let owner = owners
                .iter()
                .find(|(start, end, _)| (*start..=*end).contains(&slot))
                .map_or("", |(_, _, node)| node.as_str());
            groups.entry(owner).or_default().add_command(cmd.clone());
        }
        for pipe in groups.values() {
            redis::ConnectionLike::req_packed_commands(
                &mut self.conn,
                &pipe.get_packed_pipeline(),
                0,
                pipe.len(),
            )?;
        }
        Ok(())
    }
}

impl Conn {
    /// Run one command (routed by its key on a cluster).
    fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Node(c) => cmd.query(c),
            Conn::Cluster(c) => cmd.query(&mut c.conn),
        }
    }

    /// Run the `SET` commands of `sets` pipelined.
    fn store(&mut self, sets: &[(String, redis::Cmd)]) -> redis::RedisResult<()> {
        match self {
            Conn::Node(c) => {
                let mut pipe = redis::pipe();
                for (_, cmd) in sets {
                    pipe.add_command(cmd.clone()).ignore();
                }
                pipe.query(c)
            }
            Conn::Cluster(c) => c.store(sets),
        }
    }
}

/// A cluster node connection whose setup is bounded by the connect timeout: the crate's
/// default node connection clears its timeouts after connecting and then sends a `PING`,
/// which would wait forever on a node that accepts TCP but never answers. The cluster
/// connection sets the command timeouts after that `PING`.
struct TimedNode(redis::Connection);

impl redis::cluster::Connect for TimedNode {
    fn connect<T: redis::IntoConnectionInfo>(
        info: T,
        timeout: Option<Duration>,
    ) -> redis::RedisResult<TimedNode> {
        let client = redis::Client::open(info)?;
        let c = match timeout {
            Some(t) => client.get_connection_with_timeout(t)?,
            None => client.get_connection()?,
        };
        c.set_read_timeout(timeout)?;
        c.set_write_timeout(timeout)?;
        Ok(TimedNode(c))
    }

    fn send_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<()> {
        self.0.send_packed_command(cmd)
    }

    fn set_write_timeout(&self, dur: Option<Duration>) -> redis::RedisResult<()> {
        self.0.set_write_timeout(dur)
    }

    fn set_read_timeout(&self, dur: Option<Duration>) -> redis::RedisResult<()> {
        self.0.set_read_timeout(dur)
    }

    fn recv_response(&mut self) -> redis::RedisResult<redis::Value> {
        self.0.recv_response()
    }
}

impl redis::ConnectionLike for TimedNode {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        self.0.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }

    fn check_connection(&mut self) -> bool {
        self.0.check_connection()
    }

    fn is_open(&self) -> bool {
        self.0.is_open()
    }
}

struct Inner {
    backend: Backend,
    cfg: RedisConfig,
    shown_url: String,
    /// `rediss://`: failures get TLS advice.
    tls: bool,
    pool: Mutex<Vec<Conn>>,
    breaker: Mutex<Breaker>,
    counters: Counters,
    warned_key_error: AtomicBool,
}

/// What became of one Redis operation.
enum Outcome<T> {
    /// It ran.
    Done(T),
    /// Redis is marked down: not attempted.
    Skipped,
    /// It failed (counted and logged).
    Failed,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn key(&self, key: &[u8; 32]) -> String {
        self.named_key(&hex::encode(key))
    }

    /// `name` after the configured key prefix.
    fn named_key(&self, name: &str) -> String {
        let mut s = String::with_capacity(self.cfg.key_prefix.len() + name.len());
        s.push_str(&self.cfg.key_prefix);
        s.push_str(name);
        s
    }

    /// `SET key value`, expiring after the configured TTL if there is one.
    fn set_cmd(&self, key: &str, value: &[u8]) -> redis::Cmd {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        if let Some(ttl) = self.cfg.ttl {
            cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        cmd
    }

    fn backoff(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(16);
        self.cfg
            .retry_min
            .saturating_mul(1 << shift)
            .min(self.cfg.retry_max)
    }

    /// Whether Redis is currently marked down (no state change).
    fn is_down(&self) -> bool {
        lock(&self.breaker)
            .retry_at
            .is_some_and(|t| Instant::now() < t)
    }

    /// Whether to try Redis now. While down, the first caller after the retry time becomes
    /// the probe; everyone else keeps skipping until the probe reports.
    fn allow(&self) -> bool {
        let mut b = lock(&self.breaker);
        match b.retry_at {
            None => true,
            Some(t) => {
                let now = Instant::now();
                if now < t {
                    return false;
                }
                b.retry_at = Some(now + self.backoff(b.failures));
                true
            }
        }
    }

    /// Close the breaker. The failure count stays until a failure starts a new outage.
    fn succeeded(&self) {
        let mut b = lock(&self.breaker);
        if b.retry_at.take().is_some() {
            tracing::info!(redis = %self.shown_url, "Redis is reachable again; using it as a cache tier");
        }
    }

    fn failed(&self, what: &str, err: &redis::RedisError) {
        bump(&self.counters.errors, 1);
        // Errors about one key (wrong type), writes to a replica or a slot that moved since
        // the connection learnt the cluster's layout leave reads working.
        if matches!(
            err.code(),
            Some("WRONGTYPE") | Some("READONLY") | Some("MOVED") | Some("ASK")
        ) {
            if !self.warned_key_error.swap(true, Ordering::Relaxed) {
                tracing::warn!(redis = %self.shown_url, error = %err, "Redis {what} failed; check that clip has this Redis (or --redis-key-prefix) to itself and that it is a writable primary");
            } else {
                tracing::debug!(redis = %self.shown_url, error = %err, "Redis {what} failed");
            }
            return;
        }
        lock(&self.pool).clear();
        let mut b = lock(&self.breaker);
        let now = Instant::now();
        let same_outage = b
            .last_failure
            .is_some_and(|t| now.duration_since(t) < self.cfg.retry_max.saturating_mul(2));
        b.failures = if same_outage {
            b.failures.saturating_add(1)
        } else {
            1
        };
        b.last_failure = Some(now);
        let delay = self.backoff(b.failures);
        if b.failures == 1 {
            tracing::warn!(
                redis = %self.shown_url,
                error = %err,
                "Redis {what} failed; reading from the origin instead and retrying Redis in the background ({})",
                self.advice(err)
            );
        } else {
            tracing::debug!(redis = %self.shown_url, error = %err, retry_in = ?delay, "Redis still unavailable");
        }
        b.retry_at = Some(now + delay);
    }

    /// What to check after a connection-level failure.
    fn advice(&self, err: &redis::RedisError) -> &'static str {
        let cluster = matches!(self.backend, Backend::Cluster(_));
        if self.tls && err.to_string().contains("certificate") {
            "the server's TLS certificate is not trusted: give the CA that signed it with --redis-ca-file (CLIP_REDIS_CA_FILE) and check that the certificate names the URL's host"
        } else if cluster && self.tls {
            "check that every cluster node is running and reachable at the address it announces (CLUSTER SLOTS), that `redis-cli cluster info` shows cluster_state:ok, that the ports speak TLS, that the password is right, and whether the nodes require a client certificate (--redis-client-cert, --redis-client-key)"
        } else if cluster {
            "check that every cluster node is running and reachable at the address it announces (CLUSTER SLOTS), that `redis-cli cluster info` shows cluster_state:ok, and that the password is right"
        } else if self.tls {
            "check that redis-server is running and reachable, that this port speaks TLS, that the password and DB are right, and whether it requires a client certificate (--redis-client-cert, --redis-client-key)"
        } else {
            "check that redis-server is running and reachable and the URL, password and DB are right"
        }
    }

    fn connection(&self) -> redis::RedisResult<Conn> {
        if let Some(c) = lock(&self.pool).pop() {
            return Ok(c);
        }
        match &self.backend {
            Backend::Node(client) => {
                let c = client.get_connection_with_timeout(self.cfg.connect_timeout)?;
                c.set_read_timeout(Some(self.cfg.io_timeout))?;
                c.set_write_timeout(Some(self.cfg.io_timeout))?;
                Ok(Conn::Node(c))
            }
            Backend::Cluster(client) => {
                let conn = client.get_generic_connection::<TimedNode>()?;
                conn.set_write_timeout(Some(self.cfg.io_timeout))?;
                Ok(Conn::Cluster(Box::new(ClusterConn { conn, owners: None })))
            }
        }
    }

    fn give_back(&self, c: Conn) {
        let mut pool = lock(&self.pool);
        if pool.len() < self.cfg.pool_size {
            pool.push(c);
        }
    }

    /// Run `f` on a pooled connection unless Redis is marked down.
    fn with_connection<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Conn) -> redis::RedisResult<T>,
    ) -> Outcome<T> {
        if !self.allow() {
            return Outcome::Skipped;
        }
        let mut c = match self.connection() {
            Ok(c) => c,
            Err(e) => {
                self.failed("connect", &e);
                return Outcome::Failed;
            }
        };
        match f(&mut c) {
            Ok(v) => {
                self.give_back(c);
                self.succeeded();
                Outcome::Done(v)
            }
            Err(e) => {
                self.failed(what, &e);
                Outcome::Failed
            }
        }
    }

    fn write_batch(&self, batch: &[Write]) {
        let n = batch.len() as u64;
        let sets: Vec<(String, redis::Cmd)> = batch
            .iter()
            .map(|(k, v)| {
                let key = self.key(k);
                let cmd = self.set_cmd(&key, v);
                (key, cmd)
            })
            .collect();
        let stored = matches!(
            self.with_connection("write", |c| c.store(&sets)),
            Outcome::Done(())
        );
        if stored {
            bump(&self.counters.writes_done, n);
            bump(
                &self.counters.bytes_written,
                batch.iter().map(|(_, v)| v.len() as u64).sum(),
            );
        } else {
            bump(&self.counters.writes_dropped, n);
        }
        self.counters.pending.fetch_sub(n, Ordering::Relaxed);
        self.counters.pending_bytes.fetch_sub(
            batch.iter().map(|(_, v)| v.len() as u64).sum(),
            Ordering::Relaxed,
        );
    }
}

/// Drain the write queue, pipelining what is already waiting (up to 16 values, 8 MiB).
fn writer(inner: Arc<Inner>, rx: Receiver<Write>) {
    while let Ok(first) = rx.recv() {
        let mut bytes = first.1.len();
        let mut batch = vec![first];
        while batch.len() < 16 && bytes < 8 << 20 {
            match rx.try_recv() {
                Ok(item) => {
                    bytes += item.1.len();
                    batch.push(item);
                }
                Err(_) => break,
            }
        }
        inner.write_batch(&batch);
    }
}

/// Whether `url` asks for TLS; errors for schemes clip does not use (`cluster`: a seed of
/// `--redis-cluster`).
fn url_tls(url: &str, shown_url: &str, cluster: bool) -> Result<bool, RedisTierError> {
    let scheme = url
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default();
    let bad = |reason: &str| {
        Err(RedisTierError::BadUrl {
            url: shown_url.to_string(),
            reason: reason.into(),
        })
    };
    match scheme.as_str() {
        "redis" => Ok(false),
        "rediss" => Ok(true),
        "redis+unix" | "unix" if cluster => bad("cluster nodes are reached over TCP, give their redis://HOST:PORT or rediss://HOST:PORT URLs"),
        "redis+unix" | "unix" => Ok(false),
        s if s.contains("cluster") => bad("clip has no cluster URL scheme; give the seed nodes' redis:// or rediss:// URLs with --redis-cluster URL[,URL...] (or CLIP_REDIS_CLUSTER)"),
        _ => bad("the scheme must be redis:// or rediss://"),
    }
}

/// Refuse `#insecure` (skipping TLS certificate verification).
fn refuse_insecure(info: &redis::ConnectionInfo, shown_url: &str) -> Result<(), RedisTierError> {
    if let redis::ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
        return Err(RedisTierError::Unsupported {
            url: shown_url.to_string(),
            what: "skipping TLS certificate verification (#insecure)",
            hint: "remove #insecure and give the CA that signed the server's certificate with --redis-ca-file",
        });
    }
    Ok(())
}

/// The client of a single server, its URL for logs and whether it speaks TLS.
fn node_backend(url: &str, cfg: &RedisConfig) -> Result<(Backend, String, bool), RedisTierError> {
    let shown_url = redact_url(url);
    let tls = url_tls(url, &shown_url, false)?;
    let client = redis::Client::open(url).map_err(|e| RedisTierError::BadUrl {
        url: shown_url.clone(),
        reason: e.to_string(),
    })?;
    refuse_insecure(client.get_connection_info(), &shown_url)?;
    let client = match tls_certificates(cfg, tls)? {
        Some(certs) => redis::Client::build_with_tls(client.get_connection_info().clone(), certs)
            .map_err(|e| RedisTierError::BadTls(e.to_string()))?,
        None => client,
    };
    Ok((Backend::Node(client), shown_url, tls))
}

/// The client of a Redis Cluster, its seed URLs for logs and whether it speaks TLS. Node
/// connections use the configured timeouts; a command follows one `MOVED`/`ASK` redirect
/// or retries once after a short wait, so a FUSE read waits at most about two command
/// timeouts.
fn cluster_backend(
    seeds: &[String],
    cfg: &RedisConfig,
) -> Result<(Backend, String, bool), RedisTierError> {
    let shown_url = seeds
        .iter()
        .map(|u| redact_url(u))
        .collect::<Vec<_>>()
        .join(",");
    if seeds.is_empty() {
        return Err(RedisTierError::BadSetting("--redis-cluster needs at least one seed URL, e.g. redis://10.0.0.1:6379,redis://10.0.0.2:6379".into()));
    }
    let mut tls = None;
    for seed in seeds {
        let shown = redact_url(seed);
        let seed_tls = url_tls(seed, &shown, true)?;
        if tls.is_some_and(|t| t != seed_tls) {
            return Err(RedisTierError::BadUrl { url: shown_url, reason: "the seed nodes mix redis:// and rediss://; give every seed with the scheme the cluster speaks".into() });
        }
        tls = Some(seed_tls);
        let info = redis::IntoConnectionInfo::into_connection_info(seed.as_str()).map_err(|e| {
            RedisTierError::BadUrl {
                url: shown.clone(),
                reason: e.to_string(),
            }
        })?;
        refuse_insecure(&info, &shown)?;
        if info.redis_settings().db() != 0 {
            return Err(RedisTierError::BadUrl {
                url: shown,
                reason: "a Redis Cluster only has database 0; drop the /DB from the seed URLs"
                    .into(),
            });
        }
    }
    let tls = tls.unwrap_or(false);
    let builder = || {
        redis::cluster::ClusterClient::builder(seeds.iter().map(String::as_str))
            .connection_timeout(cfg.connect_timeout)
            .response_timeout(cfg.io_timeout)
            .retries(1)
            .min_retry_wait(10)
            .max_retry_wait(50)
    };
    let client = builder().build().map_err(|e| RedisTierError::BadUrl {
        url: shown_url.clone(),
        reason: e.to_string(),
    })?;
    let client = match tls_certificates(cfg, tls)? {
        Some(certs) => builder()
            .certs(certs)
            .build()
            .map_err(|e| RedisTierError::BadTls(e.to_string()))?,
        None => client,
    };
    Ok((Backend::Cluster(client), shown_url, tls))
}

/// Read the TLS files of `cfg`, if any. They are only allowed with a `rediss://` URL, and a
/// client certificate needs its key (and the other way round).
fn tls_certificates(
    cfg: &RedisConfig,
    tls: bool,
) -> Result<Option<redis::TlsCertificates>, RedisTierError> {
    if !tls {
        if cfg.ca_file.is_some() || cfg.client_cert.is_some() || cfg.client_key.is_some() {
            return Err(RedisTierError::BadSetting(
                "--redis-ca-file, --redis-client-cert and --redis-client-key only apply to rediss:// (TLS) URLs; use rediss://HOST:PORT/DB or leave them out".into(),
            ));
        }
        return Ok(None);
    }
    let read = |what: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| RedisTierError::TlsFile {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let root_cert = match &cfg.ca_file {
        Some(p) => {
            let pem = read("CA file", p)?;
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(RedisTierError::BadTls(format!(
                    "the CA file {} holds no PEM certificate",
                    p.display()
                )));
            }
            Some(pem)
        }
        None => None,
    };
    let client_tls = match (&cfg.client_cert, &cfg.client_key) {
        (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
            client_cert: read("client certificate", c)?,
            client_key: read("client key", k)?,
        }),
        (None, None) => None,
        _ => {
            return Err(RedisTierError::BadSetting(
                "--redis-client-cert and --redis-client-key go together; give both or neither"
                    .into(),
            ))
        }
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// Mask the password of a Redis URL for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map(|(u, _)| u).unwrap_or("");
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_string(),
    }
}

/// The Redis cache tier. Cheap to share behind an `Arc`; dropping it flushes queued writes
/// (bounded by the command timeout) and stops the writer thread.
pub struct RedisTier {
    inner: Arc<Inner>,
    tx: Mutex<Option<Sender<Write>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl RedisTier {
    /// Set up the tier and try one connection. A Redis that cannot be reached is a warning,
    /// not an error: the tier starts marked down and retries later. Errors are only for a
    /// bad URL or settings.
    pub fn connect(cfg: RedisConfig) -> Result<RedisTier, RedisTierError> {
        if cfg.max_value == 0 || cfg.queue_bytes == 0 {
            return Err(RedisTierError::BadSetting(
                "the Redis max value size and queue capacity must be at least 1".into(),
            ));
        }
        let (backend, shown_url, tls) = match &cfg.target {
            RedisTarget::Node(url) => node_backend(url, &cfg)?,
            RedisTarget::Cluster(seeds) => cluster_backend(seeds, &cfg)?,
        };
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            backend,
            cfg,
            shown_url,
            tls,
            pool: Mutex::new(Vec::new()),
            breaker: Mutex::new(Breaker::default()),
            counters: Counters::default(),
            warned_key_error: AtomicBool::new(false),
        });
        let w = inner.clone();
        let worker = std::thread::Builder::new()
            .name("clip-redis-writer".into())
            .spawn(move || writer(w, rx))
            .map_err(RedisTierError::Thread)?;
        let tier = RedisTier {
            inner,
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        };
        match tier
            .inner
            .with_connection("PING", |c| c.query::<redis::Value>(&redis::cmd("PING")))
        {
            Outcome::Done(_) => {
                tracing::info!(redis = %tier.inner.shown_url, "using Redis as a shared cache tier")
            }
            Outcome::Skipped | Outcome::Failed => {
                tracing::info!(redis = %tier.inner.shown_url, "starting without Redis; it is used as soon as a retry reaches it")
            }
        }
        Ok(tier)
    }

    /// The URL in use (for a cluster: the comma-separated seed URLs), password masked.
    pub fn url(&self) -> &str {
        &self.inner.shown_url
    }

    /// Whether the last attempt to reach Redis succeeded (the circuit breaker is closed).
    /// After a failure this stays false until a retry gets through.
    pub fn is_up(&self) -> bool {
        lock(&self.inner.breaker).retry_at.is_none()
    }

    /// Counters since creation.
    pub fn stats(&self) -> RedisStats {
        let c = &self.inner.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RedisStats {
            hits: g(&c.hits),
            misses: g(&c.misses),
            bypassed: g(&c.bypassed),
            errors: g(&c.errors),
            verify_failures: g(&c.verify_failures),
            writes_queued: g(&c.writes_queued),
            writes_done: g(&c.writes_done),
            writes_dropped: g(&c.writes_dropped),
            writes_too_large: g(&c.writes_too_large),
            bytes_read: g(&c.bytes_read),
            bytes_written: g(&c.bytes_written),
        }
    }

    /// Wait until every queued write is stored or dropped, at most `timeout`; returns
    /// whether the queue drained.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.inner.counters.pending.load(Ordering::Relaxed) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

impl RedisTier {
    /// The small value stored under `name` (after the key prefix) beside the pieces, such as
    /// an image's learnt access profile; `None` when it is absent, larger than `max` bytes,
    /// or Redis is unavailable. Piece keys are 64 hex digits, so a `name` with other
    /// characters never meets one.
    pub fn get_named(&self, name: &str, max: usize) -> Option<Vec<u8>> {
        let k = self.inner.named_key(name);
        let got = self.inner.with_connection("read", |con| {
            con.query::<Vec<u8>>(redis::cmd("GETRANGE").arg(&k).arg(0).arg(max as u64))
        });
        match got {
            Outcome::Done(v) if !v.is_empty() && v.len() <= max => Some(v),
            _ => None,
        }
    }

    /// Store `value` under `name` now (one command, with the tier's timeouts and TTL);
    /// false when Redis is unavailable.
    pub fn set_named(&self, name: &str, value: &[u8]) -> bool {
        let cmd = self.inner.set_cmd(&self.inner.named_key(name), value);
        matches!(
            self.inner
                .with_connection("write", |con| con.query::<()>(&cmd)),
            Outcome::Done(())
        )
    }
}

impl Tier for RedisTier {
    fn name(&self) -> &str {
        "redis"
    }

    fn get(&self, key: &[u8; 32]) -> Option<Bytes> {
        let c = &self.inner.counters;
        let k = self.inner.key(key);
        let end = self.inner.cfg.max_value as u64;
        // GETRANGE bounds the reply to max_value + 1 bytes; an oversized value comes back
        // truncated, fails verification and is deleted by the caller's `remove`.
        let got = self.inner.with_connection("read", |con| {
            con.query::<Vec<u8>>(redis::cmd("GETRANGE").arg(&k).arg(0).arg(end))
        });
        match got {
            Outcome::Skipped => {
                bump(&c.bypassed, 1);
                None
            }
            Outcome::Failed => None,
            Outcome::Done(v) if v.is_empty() => {
                bump(&c.misses, 1);
                None
            }
            Outcome::Done(v) => {
                bump(&c.hits, 1);
                bump(&c.bytes_read, v.len() as u64);
                Some(v.into())
            }
        }
    }

    fn contains(&self, key: &[u8; 32]) -> bool {
        let k = self.inner.key(key);
        matches!(
            self.inner.with_connection("look up", |con| {
                con.query::<bool>(redis::cmd("EXISTS").arg(&k))
            }),
            Outcome::Done(true)
        )
    }

    fn put(&self, key: &[u8; 32], bytes: &Bytes) {
        let c = &self.inner.counters;
        if bytes.is_empty() {
            return;
        }
        if bytes.len() > self.inner.cfg.max_value {
            bump(&c.writes_too_large, 1);
            return;
        }
        if self.inner.is_down() {
            bump(&c.writes_dropped, 1);
            return;
        }
        let tx = lock(&self.tx);
        let Some(tx) = tx.as_ref() else {
            bump(&c.writes_dropped, 1);
            return;
        };
        let len = bytes.len() as u64;
        let before = c.pending_bytes.fetch_add(len, Ordering::Relaxed);
        if before + len > self.inner.cfg.queue_bytes as u64 {
            c.pending_bytes.fetch_sub(len, Ordering::Relaxed);
            bump(&c.writes_dropped, 1);
            return;
        }
        c.pending.fetch_add(1, Ordering::Relaxed);
        match tx.send((*key, bytes.clone())) {
            Ok(()) => bump(&c.writes_queued, 1),
            Err(_) => {
                c.pending.fetch_sub(1, Ordering::Relaxed);
                c.pending_bytes.fetch_sub(len, Ordering::Relaxed);
                bump(&c.writes_dropped, 1);
            }
        }
    }

    fn remove(&self, key: &[u8; 32]) {
        bump(&self.inner.counters.verify_failures, 1);
        let k = self.inner.key(key);
        tracing::warn!(redis = %self.inner.shown_url, key = %k, "Redis held wrong bytes for this key; deleting it");
        self.inner
            .with_connection("delete", |c| c.query::<i64>(redis::cmd("DEL").arg(&k)));
    }
}

impl Drop for RedisTier {
    fn drop(&mut self) {
        lock(&self.tx).take();
        if let Some(w) = lock(&self.worker).take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held by tests that set the process-wide `CLIP_REDIS_*` environment variables.
    static ENV: Mutex<()> = Mutex::new(());

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://:secret@host:6379/2"),
            "redis://:***@host:6379/2"
        );
        assert_eq!(
            redact_url("redis://user:secret@host/0"),
            "redis://user:***@host/0"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    }

    #[test]
    fn rejects_cluster_insecure_tls_and_other_schemes_with_advice() {
        let e = RedisTier::connect(RedisConfig::new("redis+cluster://h:1"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--redis-cluster"), "{e}");
        let e = RedisTier::connect(RedisConfig::new("rediss://:pw@h:1/0#insecure"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("#insecure") && e.contains("--redis-ca-file") && !e.contains("pw@"),
            "{e}"
        );
        let e = RedisTier::connect(RedisConfig::new("http://h:1"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("redis://") && e.contains("rediss://"), "{e}");
    }

    #[test]
    fn tls_files_are_checked_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let tls = |ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>, url: &str| {
            let mut cfg = RedisConfig::new(url);
            cfg.connect_timeout = Duration::from_millis(20);
            cfg.ca_file = ca.map(Path::to_path_buf);
            cfg.client_cert = cert.map(Path::to_path_buf);
            cfg.client_key = key.map(Path::to_path_buf);
            RedisTier::connect(cfg).err().map(|e| e.to_string())
        };
        let e = tls(Some(&not_pem), None, None, "redis://127.0.0.1:1/0").unwrap();
        assert!(e.contains("only apply to rediss://"), "{e}");
        let missing = dir.path().join("missing-ca.pem");
        let e = tls(Some(&missing), None, None, "rediss://127.0.0.1:1/0").unwrap();
        assert!(e.contains("CA file") && e.contains("missing-ca.pem"), "{e}");
        let e = tls(Some(&not_pem), None, None, "rediss://127.0.0.1:1/0").unwrap();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = tls(None, Some(&not_pem), None, "rediss://127.0.0.1:1/0").unwrap();
        assert!(e.contains("give both or neither"), "{e}");
        let e = tls(
            None,
            Some(&not_pem),
            Some(&not_pem),
            "rediss://127.0.0.1:1/0",
        )
        .unwrap();
        assert!(e.contains("PEM private key"), "{e}");
        assert_eq!(
            tls(None, None, None, "rediss://127.0.0.1:1/0"),
            None,
            "rediss:// without files uses the built-in roots"
        );
    }

    #[test]
    fn args_take_the_url_from_the_flag_or_the_environment() {
        let _env = lock(&ENV);
        let mut a = RedisArgs {
            url: Some("redis://h:1/2".into()),
            key_prefix: "p:".into(),
            ttl: Some(60),
            max_value: 4096,
            ..RedisArgs::default()
        };
        let c = a.config().unwrap().unwrap();
        assert_eq!(
            (&c.target, c.key_prefix.as_str(), c.ttl, c.max_value),
            (
                &RedisTarget::Node("redis://h:1/2".into()),
                "p:",
                Some(Duration::from_secs(60)),
                4096
            )
        );
        a.ttl = Some(0);
        assert!(a.config().unwrap_err().to_string().contains("--redis-ttl"));
        a.url = None;
        a.ttl = None;
        std::env::set_var(REDIS_URL_ENV, "redis://:pw@env-host:7/0");
        let c = a.config().unwrap().unwrap();
        std::env::remove_var(REDIS_URL_ENV);
        assert_eq!(
            c.target,
            RedisTarget::Node("redis://:pw@env-host:7/0".into())
        );
        assert!(
            a.config().unwrap().is_none(),
            "no flag and no environment: no Redis tier"
        );
        a.url = Some("rediss://h:1/0".into());
        a.client_key = Some("/flag/key.pem".into());
        std::env::set_var(REDIS_CA_FILE_ENV, "/env/ca.pem");
        std::env::set_var(REDIS_CLIENT_KEY_ENV, "/env/key.pem");
        let c = a.config().unwrap().unwrap();
        std::env::remove_var(REDIS_CA_FILE_ENV);
        std::env::remove_var(REDIS_CLIENT_KEY_ENV);
        assert_eq!(c.ca_file.as_deref(), Some(Path::new("/env/ca.pem")));
        assert_eq!(
            c.client_key.as_deref(),
            Some(Path::new("/flag/key.pem")),
            "the flag wins over the environment"
        );
        assert_eq!(c.client_cert, None);
    }

    #[test]
    fn cluster_seeds_come_from_the_flag_or_the_environment_and_do_not_mix_with_redis() {
        let _env = lock(&ENV);
        let mut a = RedisArgs {
            cluster: vec!["redis://a:1".into(), " redis://b:2 ,".into()],
            ..RedisArgs::default()
        };
        let c = a.config().unwrap().unwrap();
        assert_eq!(
            c.target,
            RedisTarget::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
        a.url = Some("redis://h:1/0".into());
        let e = a.config().unwrap_err().to_string();
        assert!(
            e.contains("--redis ") && e.contains("--redis-cluster") && e.contains("keep one"),
            "{e}"
        );
        a.cluster.clear();
        std::env::set_var(REDIS_CLUSTER_ENV, "redis://e:1,redis://f:2");
        let mixed = a.config().map(|_| ()).unwrap_err().to_string();
        a.url = None;
        let c = a.config().unwrap().unwrap();
        std::env::remove_var(REDIS_CLUSTER_ENV);
        assert!(mixed.contains("CLIP_REDIS_CLUSTER"), "{mixed}");
        assert_eq!(
            c.target,
            RedisTarget::Cluster(vec!["redis://e:1".into(), "redis://f:2".into()])
        );
    }

    #[test]
    fn cluster_seed_urls_are_checked_with_advice() {
        let err = |seeds: &[&str]| {
            RedisTier::connect(RedisConfig::cluster(seeds.iter().copied()))
                .err()
                .map(|e| e.to_string())
        };
        let e = err(&["redis+unix:///tmp/r.sock"]).unwrap();
        assert!(e.contains("over TCP"), "{e}");
        let e = err(&["redis://127.0.0.1:1", "rediss://127.0.0.1:2"]).unwrap();
        assert!(e.contains("mix redis:// and rediss://"), "{e}");
        let e = err(&["redis://127.0.0.1:1/3"]).unwrap();
        assert!(e.contains("database 0"), "{e}");
        let e = err(&["rediss://:pw@127.0.0.1:1#insecure"]).unwrap();
        assert!(e.contains("#insecure") && !e.contains("pw@"), "{e}");
        let e = err(&[]).unwrap();
        assert!(e.contains("at least one seed"), "{e}");
        let mut cfg = RedisConfig::cluster(["redis://127.0.0.1:1"]);
        cfg.ca_file = Some("/nonexistent/ca.pem".into());
        let e = RedisTier::connect(cfg).err().unwrap().to_string();
        assert!(e.contains("only apply to rediss://"), "{e}");
        let mut cfg =
            RedisConfig::cluster(["redis://:secret@127.0.0.1:1", "redis://:secret@127.0.0.1:2"]);
        cfg.connect_timeout = Duration::from_millis(20);
        let t = RedisTier::connect(cfg).unwrap();
        assert!(!t.is_up(), "no cluster listens on port 1");
        assert_eq!(t.url(), "redis://:***@127.0.0.1:1,redis://:***@127.0.0.1:2");
    }

    #[test]
    fn key_slots_match_redis_cluster() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        for key in [
            &b"clip:"[..],
            b"{}x",
            b"foo{}{bar}",
            b"foo{{bar}}zap",
            b"a{b}c",
            b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(
                format!("{:?}", redis::cluster_routing::Slot::for_key(key)),
                format!("Slot({})", key_slot(key)),
                "{key:?}"
            );
        }
    }

    #[test]
    fn cluster_slots_replies_are_parsed() {
        use redis::Value::{Array, BulkString, Int};
        let node = |host: &str, port: i64| {
            Array(vec![
                BulkString(host.into()),
                Int(port),
                BulkString(b"id".to_vec()),
            ])
        };
        let reply = Array(vec![
            Array(vec![
                Int(0),
                Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Array(vec![Int(5461), Int(16383), node("10.0.0.2", 7001)]),
            Int(3),
        ]);
        assert_eq!(
            slot_owners(&reply),
            vec![
                (0, 5460, "10.0.0.1:7000".to_string()),
                (5461, 16383, "10.0.0.2:7001".to_string())
            ]
        );
        assert!(slot_owners(&Int(1)).is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut cfg = RedisConfig::new("redis://127.0.0.1:1/0");
        cfg.connect_timeout = Duration::from_millis(20);
        let t = RedisTier::connect(cfg).unwrap();
        assert_eq!(t.inner.backoff(1), Duration::from_millis(250));
        assert_eq!(t.inner.backoff(3), Duration::from_secs(1));
        assert_eq!(t.inner.backoff(40), Duration::from_secs(10));
        assert!(
            !t.is_up(),
            "port 1 refuses connections, the tier must start down"
        );
    }
}
