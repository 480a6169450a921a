//! `clip-serve`: mount an index read-only with FUSE and serve the image's files, reading
//! only the bytes a process touches.

use clap::Parser;
use clip::cache::redis::RedisTier;
use clip::cache::{parse_size, DiskCache, RebuildLater, WriteBehind};
use clip::format::IndexFile;
use clip::fuse::{self, ClipFs, MountSettings, ServeStats};
use clip::profile::{Profile, Recorder};
use clip::read::{OriginRebuild, Tier};
use nix::sys::signal::{SigSet, Signal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "clip-serve",
    version,
    about = "Mount a clip index read-only with FUSE; runs in the foreground until SIGINT/SIGTERM, then unmounts"
)]
struct Cli {
    /// Index file written by clip-build.
    index: PathBuf,
    /// Empty directory to mount on.
    mountpoint: PathBuf,
    /// Where to read the layer blobs instead of the source recorded in the index: an OCI
    /// layout directory or a registry repository (a mirror: HOST[:PORT]/REPO). Blobs are
    /// fetched by the digests the index records, and every byte is checked against its
    /// sha256 as always.
    #[arg(long, alias = "layout", value_name = "LAYOUT_OR_REPO")]
    source: Option<String>,
    /// Local cache directory (default: $XDG_CACHE_HOME/clip, else /var/cache/clip as root,
    /// else ~/.cache/clip).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Size limit of the local cache (K, M, G, T suffixes); 0 disables it.
    #[arg(long, default_value = "10G", value_parser = parse_size_arg)]
    cache_size: u64,
    /// Worker threads serving reads (cold reads inflate or fetch; they never block lookups).
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Threads reading FUSE requests; metadata is answered on them.
    #[arg(long, default_value_t = 2)]
    session_threads: usize,
    /// Readahead window of the mount in KiB (0: kernel default, 128).
    #[arg(long, default_value_t = 1024)]
    readahead_kb: u32,
    /// How far ahead of a cold sequential read other threads inflate the next checkpoint
    /// intervals of the file (K, M, G suffixes); 0 turns this read-ahead off.
    #[arg(long, default_value = "8M", value_parser = parse_size_arg)]
    read_ahead: u64,
    /// Write the checkpoint intervals whose bytes this run serves to FILE when it stops
    /// (an access profile for --prefetch-profile).
    #[arg(long, value_name = "FILE")]
    record_profile: Option<PathBuf>,
    /// Fetch the intervals of an access profile (from --record-profile on this image) in
    /// the background as soon as the daemon starts. Given with --record-profile and the
    /// same FILE, a missing FILE is no error: that run records it.
    #[arg(long, value_name = "FILE")]
    prefetch_profile: Option<PathBuf>,
    /// Do not learn an access profile per image in the cache directory (`profiles/`),
    /// nor replay it at start. Without --record-profile and --prefetch-profile, every run
    /// with a disk cache adds what it read to that profile and the next start of the same
    /// image fetches it in parallel (skipping what the caches still hold). With --redis,
    /// the profile is also shared there with the other daemons of that Redis.
    #[arg(long)]
    no_learn_profile: bool,
    /// Do not prefetch the startup profile the index carries (`clip-build
    /// embed-profile`). It is replayed at start when no --prefetch-profile is given and no
    /// learnt profile of the image is at hand (in the cache directory or in Redis).
    #[arg(long)]
    no_startup_profile: bool,
    /// Threads fetching --prefetch-profile intervals.
    #[arg(long, default_value_t = 4)]
    prefetch_threads: usize,
    /// Skip checking the index's tree invariants at startup (its structure is always
    /// checked when it is opened, and checkpoint windows when they are used).
    #[arg(long)]
    no_verify: bool,
    /// Rewrite counters (JSON) to this file every --stats-interval seconds and at exit.
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// Seconds between rewrites of --stats-file.
    #[arg(long, default_value_t = 5)]
    stats_interval: u64,
    #[command(flatten)]
    redis: clip::cache::redis::RedisArgs,
}

fn parse_size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// How long the disk cache's writer waits for cold reads to pause before it writes.
const WRITE_QUIET: std::time::Duration = std::time::Duration::from_millis(250);

/// Pieces at least this large are rebuilt from a local layout by the disk cache's writer
/// instead of held for it (the large-file pieces: 1 MiB chunks, and whole files of
/// 512 KiB or more, which start at a checkpoint of their own).
const REBUILD_MIN: u64 = 512 << 10;

/// At most this many bytes wait to be rebuilt (`flush` at exit rebuilds them all: under a
/// second of inflation on one core); past that, pieces are held.
const REBUILD_MAX: u64 = 256 << 20;

fn main() -> ExitCode {
    clip::logging::init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clip-serve: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Most intervals a learnt profile keeps (runs of one image with different workloads add
/// theirs until then).
const LEARNT_MAX: usize = 4096;

/// How long after the start a run adds what it reads to the learnt profile: the profile is
/// for starting, not for everything a long-running workload reads later.
const LEARNT_WINDOW: Duration = Duration::from_secs(30);

/// Largest learnt profile read from Redis (4096 intervals with their pieces fit easily).
const LEARNT_MAX_BYTES: usize = 4 << 20;

/// The startup profile the index carries, unless --no-startup-profile; a damaged one is
/// only a warning (prefetching changes timing, never bytes).
fn startup_profile(index: &IndexFile, cli: &Cli) -> Option<Profile> {
    if cli.no_startup_profile {
        return None;
    }
    Profile::embedded(index)
        .map_err(|e| tracing::warn!(error = %e, "ignoring the index's startup profile"))
        .ok()
        .flatten()
        .inspect(|p| {
            tracing::info!(
                intervals = p.intervals.len(),
                "the index carries a startup profile"
            )
        })
}

/// The name of the access profile that the runs of the image with manifest digest
/// `manifest`, indexed with the checkpoint layout `layout`
/// ([`IndexFile::checkpoint_layout_id`]), learn: `<algorithm>-<hex>-<layout in hex>` (none
/// for a digest that is not `algorithm:hex`). It lives in `CACHE/profiles/NAME` and, with
/// Redis, under the key `profile:NAME`, where every daemon sharing that Redis finds it.
fn learnt_profile_name(manifest: &str, layout: u64) -> Option<String> {
    let (algorithm, hex) = manifest.split_once(':')?;
    let plain = |s: &str, ok: fn(char) -> bool| !s.is_empty() && s.chars().all(ok);
    (plain(algorithm, |c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && plain(hex, |c| c.is_ascii_hexdigit()))
    .then(|| format!("{algorithm}-{hex}-{layout:016x}"))
}

fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("clip");
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/cache/clip");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("clip")
}

/// Every tier's counters, for the stats file, SIGUSR1 and the exit log.
struct Counters<'a> {
    serve: &'a ServeStats,
    disk: Option<&'a DiskCache>,
    redis: Option<&'a RedisTier>,
}

impl Counters<'_> {
    /// All counters as one JSON object.
    fn json(&self) -> String {
        serde_json::json!({
            "serve": self.serve.snapshot(),
            "disk_cache": self.disk.map(|d| d.stats()),
            "redis": self.redis.map(|r| r.stats()),
        })
        .to_string()
    }

    fn log(&self) {
        let cache = self
            .disk
            .map(|d| d.stats().to_string())
            .unwrap_or_else(|| "disabled".into());
        tracing::info!("stats: {}; disk cache: {cache}", self.serve.snapshot());
        if let Some(r) = self.redis {
            tracing::info!("{}", r.stats());
        }
    }

    fn write(&self, path: &Path) {
        let tmp = path.with_extension("tmp");
        let r = std::fs::write(&tmp, self.json() + "\n").and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = r {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the stats file");
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    // Block the shutdown signals before any thread starts so that every thread inherits the
    // mask and only the waiting thread below receives them.
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGUSR1,
    ] {
        signals.add(s);
    }
    signals.thread_block()?;

    fuse::check_mountpoint(&cli.mountpoint)?;
    let t = Instant::now();
    let index = Arc::new(IndexFile::open(&cli.index)?);
    tracing::info!(
        index = %cli.index.display(),
        entries = index.entry_count(),
        ms = format!("{:.2}", t.elapsed().as_secs_f64() * 1e3),
        "opened index"
    );
    if !cli.no_verify {
        let t = Instant::now();
        index.verify_payload()?;
        tracing::info!(
            ms = format!("{:.2}", t.elapsed().as_secs_f64() * 1e3),
            "index verified"
        );
    }
    let source = fuse::open_source(&index, cli.source.as_deref())?;
    tracing::info!(source = %source.describe(), "image source");

    let mut tiers: Vec<Arc<dyn Tier>> = Vec::new();
    let disk = if cli.cache_size > 0 {
        let dir = cli.cache_dir.clone().unwrap_or_else(default_cache_dir);
        let d = DiskCache::open_scanning_in_background(&dir, cli.cache_size)?;
        tracing::info!(dir = %dir.display(), limit = cli.cache_size, "disk cache (existing objects are scanned in the background)");
        // Writes happen behind the reads, once they pause; up to 256 MiB may wait in memory,
        // and no more than half the cache holds: a small cache evicts as reads go on.
        let budget = (256u64 << 20).min(cli.cache_size / 2).max(1 << 20);
        // From a local layout, large pieces are inflated again by the writer instead of
        // waiting in memory (see `cache::behind`).
        let later = source.is_local().then(|| RebuildLater {
            rebuild: Arc::new(OriginRebuild::new(index.clone(), source.clone())),
            min_len: REBUILD_MIN,
            max_bytes: REBUILD_MAX,
        });
        let behind = Arc::new(WriteBehind::new(d.clone(), budget, WRITE_QUIET, later)?);
        tiers.push(behind.clone());
        Some((d, behind))
    } else {
        tracing::info!("disk cache disabled");
        None
    };

    let redis = match cli.redis.config()? {
        Some(cfg) => {
            let r = Arc::new(RedisTier::connect(cfg)?);
            tiers.push(r.clone());
            Some(r)
        }
        None => None,
    };

    let (manifest, layout) = clip::profile::image_of(&index);
    // The profile this image's runs learn in the cache directory, unless profiles are named
    // on the command line.
    let learnt_name = match (&disk, &cli.record_profile, &cli.prefetch_profile) {
        (Some(_), None, None) if !cli.no_learn_profile => learnt_profile_name(&manifest, layout),
        _ => None,
    };
    let learnt = learnt_name.as_ref().and_then(|name| {
        let (d, _) = disk.as_ref()?;
        Some(d.root().join("profiles").join(name))
    });
    // With Redis, the daemons sharing it learn one profile per image: a node that never
    // ran the image starts it with what the others learnt.
    let shared_key = learnt_name
        .as_ref()
        .filter(|_| redis.is_some())
        .map(|name| format!("profile:{name}"));
    let shared_profile = || {
        let (r, key) = (redis.as_ref()?, shared_key.as_ref()?);
        let text = r.get_named(key, LEARNT_MAX_BYTES)?;
        Profile::parse(
            &String::from_utf8_lossy(&text),
            &format!("redis key {key}"),
            &manifest,
            layout,
        )
        .map_err(|e| tracing::warn!(error = %e, "ignoring the access profile in Redis"))
        .ok()
    };
    let learnt_before = match learnt.as_ref().filter(|p| p.exists()) {
        Some(p) => Profile::load(p, &manifest, layout)
            .map_err(|e| tracing::warn!(error = %e, "ignoring the learnt access profile"))
            .ok(),
        None => shared_profile().inspect(|p| {
            tracing::info!(
                intervals = p.intervals.len(),
                "access profile learnt by other daemons, from Redis"
            )
        }),
    };
    let prefetch = match &cli.prefetch_profile {
        // Both flags on one file: replay and refresh it; the first run has nothing to replay.
        Some(p) if cli.record_profile.as_ref() == Some(p) && !p.exists() => {
            tracing::info!(path = %p.display(), "no access profile yet: this run records it");
            None
        }
        Some(p) => Some(Profile::load(p, &manifest, layout)?),
        None => learnt_before
            .clone()
            .or_else(|| startup_profile(&index, &cli)),
    };
    let mut fs = ClipFs::new(index, source, tiers, cli.threads)?.with_read_ahead(cli.read_ahead);
    let recorder = if cli.record_profile.is_some() {
        Some(fs.record_profile(Recorder::default()))
    } else if learnt.is_some() {
        Some(fs.record_profile(Recorder::for_window(LEARNT_WINDOW)))
    } else {
        None
    };
    if let Some(profile) = prefetch {
        tracing::info!(
            intervals = profile.intervals.len(),
            threads = cli.prefetch_threads,
            learning = learnt.is_some(),
            "prefetching the access profile"
        );
        fs.prefetch(profile.intervals, cli.prefetch_threads)?;
    }
    let serve_stats = fs.stats();
    let settings = MountSettings {
        session_threads: cli.session_threads,
        fsname: format!("clip:{}", cli.index.display()),
        readahead_kb: cli.readahead_kb,
    };
    let session = fuse::mount(fs, &cli.mountpoint, &settings)?;
    tracing::info!(mountpoint = %cli.mountpoint.display(), "mounted; stop with SIGINT or SIGTERM, SIGUSR1 logs counters");

    let (tx, rx) = channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(sig) = signals.wait() {
                if tx.send(sig).is_err() {
                    return;
                }
            }
        })?;

    let interval = Duration::from_secs(cli.stats_interval.max(1));
    let mut next_write = Instant::now();
    let counters = Counters {
        serve: &serve_stats,
        disk: disk.as_ref().map(|(d, _)| &**d),
        redis: redis.as_deref(),
    };
    let shutdown = loop {
        if let Some(p) = &cli.stats_file {
            if Instant::now() >= next_write {
                counters.write(p);
                next_write = Instant::now() + interval;
            }
        }
        if session.guard.is_finished() {
            break None;
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Signal::SIGUSR1) => counters.log(),
            Ok(sig) => break Some(sig),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break None,
        }
    };

    let result = match shutdown {
        Some(sig) => {
            tracing::info!(signal = %sig, "unmounting");
            match session.umount_and_join() {
                Ok(()) => Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "clean unmount failed");
                    fuse::unmount(&cli.mountpoint, true).map_err(Into::into)
                }
            }
        }
        None => {
            tracing::info!("the filesystem was unmounted from outside");
            session.join().map_err(Into::into)
        }
    };
    if let Some((_, behind)) = &disk {
        let (held, later) = behind.waiting();
        if held + later > 0 {
            tracing::info!(
                held_mib = held >> 20,
                rebuilt_mib = later >> 20,
                "writing the pieces still waiting to the disk cache"
            );
        }
        behind.flush();
    }
    if let Some(r) = &redis {
        r.flush(Duration::from_secs(2));
    }
    if let Some(p) = &cli.stats_file {
        counters.write(p);
    }
    counters.log();
    if let (Some(path), Some(rec)) = (&cli.record_profile, &recorder) {
        let profile = rec.profile(&manifest, layout);
        profile.save(path)?;
        tracing::info!(path = %path.display(), intervals = profile.intervals.len(), "access profile written");
    }
    if let (Some(path), Some(rec)) = (&learnt, &recorder) {
        let read = rec.profile(&manifest, layout);
        if !read.intervals.is_empty() {
            let mut profile = learnt_before.unwrap_or_else(|| Profile::new(&manifest, layout));
            profile.merge(&read, LEARNT_MAX);
            let saved = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .map_err(|e| e.to_string())
                .and_then(|()| profile.save(path).map_err(|e| e.to_string()));
            match saved {
                Ok(()) => {
                    tracing::info!(path = %path.display(), intervals = profile.intervals.len(), "access profile learnt")
                }
                Err(e) => tracing::warn!(error = %e, "cannot save the learnt access profile"),
            }
            if let (Some(r), Some(key)) = (&redis, &shared_key) {
                // What other daemons added since this one started, and what it learnt.
                let mut shared =
                    shared_profile().unwrap_or_else(|| Profile::new(&manifest, layout));
                shared.merge(&profile, LEARNT_MAX);
                if r.set_named(key, shared.to_text().as_bytes()) {
                    tracing::info!(key = %key, intervals = shared.intervals.len(), "access profile shared in Redis");
                }
            }
        }
    }
    result
}
