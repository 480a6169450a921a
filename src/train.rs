//! Training an index: mount it, run a workload in a chroot of the mount (over a writable
//! overlay, as container runtimes use it, with the image config's `Env` and `WorkingDir`),
//! and return the access profile of what the workload read, which `clip-build --train` embeds as the index's startup profile. The
//! idea of eStargz's `ctr-remote image optimize`, without rewriting the image.

use crate::format::IndexFile;
use crate::fuse::{self, ClipFs, FuseError, MountSettings};
use crate::profile::{image_of, Profile, Recorder};
use crate::source::Source;
use nix::sys::signal::{SigSet, Signal};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Errors of a training run. The index already written is left as it is.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Mounting or serving the index failed.
    #[error(transparent)]
    Fuse(#[from] FuseError),
    /// Reading the index, or writing it back with its startup profile, failed.
    #[error(transparent)]
    Format(#[from] crate::format::FormatError),
    /// The recorded profile does not fit the index (cannot happen for a profile recorded
    /// on it; reported rather than assumed).
    #[error(transparent)]
    Profile(#[from] crate::profile::ProfileError),
    /// A step of the run failed (scratch directory, overlay, starting the command).
    #[error("training: {what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A signal stopped the training (the workload was stopped and everything unmounted).
    #[error("training interrupted by {0}; the index keeps no startup profile")]
    Interrupted(nix::sys::signal::Signal),
    /// The workload failed, so what it read is no profile of a working start.
    #[error("training: `{command}` {status}, so the index keeps no startup profile; fix the command (it runs in a chroot of the image with the Env and WorkingDir of its config, plus --train-env) or leave out --train")]
    Failed {
        /// The command line.
        command: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// The program is not in the image.
    #[error("training: {program} is not an executable of the image (looked for in {searched}); name it by its path in the image")]
    NotFound {
        /// The program as given.
        program: String,
        /// Where it was looked for.
        searched: String,
    },
    /// The image config could not be read.
    #[error("training: reading the image config: {0}")]
    Config(String),
}

/// What to run and for how long.
pub struct Workload {
    /// The program (a path in the image, or a name looked up in the image's PATH) and its
    /// arguments.
    pub command: Vec<String>,
    /// Variables set on top of the image config's `Env` (same name: replaced).
    pub env: Vec<(String, String)>,
    /// How long the workload may run; a workload still running then (a server) is
    /// stopped, and what it read so far is its profile.
    pub timeout: Duration,
}

/// The result of a training run.
pub struct Trained {
    /// The intervals the workload read, first needed first.
    pub profile: Profile,
    /// How long the workload ran.
    pub elapsed: Duration,
    /// Whether it was stopped at the timeout instead of exiting.
    pub stopped: bool,
}

/// Train the index file at `path`: [`train`] it over its recorded source, then write it
/// back (atomically) carrying the recorded profile as its startup profile. Returns the
/// run and the index's new size.
pub fn train_index(
    path: &Path,
    workload: &Workload,
    signals: &Signals,
) -> Result<(Trained, u64), TrainError> {
    let index = Arc::new(IndexFile::open(path)?);
    let source = fuse::open_source(&index, None)?;
    let runtime = ImageRuntime::of(&index, source.as_ref())?;
    let trained = train(index.clone(), source, &runtime, workload, signals)?;
    let bytes = Profile::embed_into(&index, Some((&trained.profile, "recorded by training")))?;
    crate::format::write::write_bytes(&bytes, path)?;
    Ok((trained, bytes.len() as u64))
}

/// Mount `index` (bytes from `source`, no caches) in a scratch directory, run `workload`
/// in a chroot of an overlay over it, unmount, and return the profile of what it read.
/// `signals` must have been set up before the process started any thread: an interrupted
/// run still stops the workload and unmounts.
pub fn train(
    index: Arc<IndexFile>,
    source: Arc<dyn Source>,
    runtime: &ImageRuntime,
    workload: &Workload,
    signals: &Signals,
) -> Result<Trained, TrainError> {
    let scratch = Scratch::create()?;
    let _training = Training::start(&signals.training);
    let interrupt = &signals.seen;
    let (manifest, layout) = image_of(&index);
    let mut fs = ClipFs::new(index, source, Vec::new(), 8)?;
    let recorder = fs.record_profile(Recorder::default());
    let settings = MountSettings {
        session_threads: 2,
        fsname: "clip-train".into(),
        readahead_kb: 1024,
    };
    let session = fuse::mount(fs, &scratch.lower, &settings)?;
    let run = scratch.overlay().and_then(|()| {
        let r = run(&scratch.merged, runtime, workload, interrupt);
        if let Err(e) = fuse::unmount(&scratch.merged, true) {
            tracing::warn!(error = %e, "cannot unmount the training overlay");
        }
        r
    });
    if let Err(e) = session.umount_and_join() {
        tracing::warn!(error = %e, "clean unmount failed; detaching the training mount");
        fuse::unmount(&scratch.lower, true)?;
    }
    let (status, elapsed) = run?;
    let command = workload.command.join(" ");
    match status {
        Some(status) if !status.success() => Err(TrainError::Failed { command, status }),
        _ => Ok(Trained {
            profile: recorder.profile(&manifest, layout),
            elapsed,
            stopped: status.is_none(),
        }),
    }
}

/// How the image's containers start their processes: its config's `Env` and `WorkingDir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRuntime {
    /// Environment variables, in the config's order.
    pub env: Vec<(String, String)>,
    /// Working directory, absolute in the image.
    pub workdir: String,
}

/// `PATH` when the image config sets none (what Docker uses then).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ImageRuntime {
    /// Read the image config of `index` from `source`: through the manifest the index
    /// pins, each document checked against its digest.
    pub fn of(index: &IndexFile, source: &dyn Source) -> Result<ImageRuntime, TrainError> {
        let image = &index.index().image;
        let manifest = String::from_utf8_lossy(image.manifest_digest.as_slice());
        let bad = |e: crate::source::SourceError| TrainError::Config(format!("{manifest}: {e}"));
        let (_, bytes, _) = source.manifest(&manifest).map_err(bad)?;
        let m: crate::oci::Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| TrainError::Config(format!("manifest {manifest}: {e}")))?;
        if m.config.digest.as_bytes() != image.config_digest.as_slice() {
            return Err(TrainError::Config(format!(
                "manifest {manifest} names config {}, the index another",
                m.config.digest
            )));
        }
        let config = source
            .read_small_blob(&m.config.digest, m.config.size)
            .map_err(bad)?;
        let json: serde_json::Value = serde_json::from_slice(&config)
            .map_err(|e| TrainError::Config(format!("config {}: {e}", m.config.digest)))?;
        Ok(ImageRuntime::from_config(&json))
    }

    /// The runtime settings of a parsed image config (missing ones: no variables, `/`).
    pub fn from_config(config: &serde_json::Value) -> ImageRuntime {
        let c = &config["config"];
        let env = c["Env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // Cleaned lexically, as Docker does (`..` stops at the root).
        let mut parts: Vec<&str> = Vec::new();
        for part in c["WorkingDir"].as_str().unwrap_or("").split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                p => parts.push(p),
            }
        }
        let workdir = format!("/{}", parts.join("/"));
        ImageRuntime { env, workdir }
    }

    /// The environment of a process started with `extra` on top: the config's variables,
    /// those of `extra` replacing same-named ones, and [`DEFAULT_PATH`] without a `PATH`.
    pub fn environment(&self, extra: &[(String, String)]) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        for (k, v) in extra {
            match env.iter_mut().find(|(name, _)| name == k) {
                Some(slot) => slot.1 = v.clone(),
                None => env.push((k.clone(), v.clone())),
            }
        }
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        env
    }
}

/// The path inside `root` of `program`: as given when it names a path, else the first
/// directory of `path` (a `PATH` value) under `root` holding it (an executable file, or a
/// symlink, which only the exec inside `root` can follow).
fn find_program(root: &Path, program: &str, path: &str) -> Result<PathBuf, TrainError> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let inside = |dir: &str| Path::new(dir).join(program);
    let found = path
        .split(':')
        .filter(|d| d.starts_with('/'))
        .map(inside)
        .find(|p| {
            let on_host = root.join(p.strip_prefix("/").unwrap_or(p));
            std::fs::symlink_metadata(on_host).is_ok_and(|m| {
                m.file_type().is_symlink() || (m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
        });
    found.ok_or_else(|| TrainError::NotFound {
        program: program.into(),
        searched: format!("PATH={path}"),
    })
}

/// Run the workload in a chroot of `root`, as `runtime` says: its exit status, or `None`
/// when it was stopped at the timeout; and how long it ran.
fn run(
    root: &Path,
    runtime: &ImageRuntime,
    workload: &Workload,
    interrupt: &Interrupt,
) -> Result<(Option<ExitStatus>, Duration), TrainError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| TrainError::Io { what, source }
    };
    // Descendants the workload leaves behind become this process's children, so that
    // stopping it can wait for them too.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::debug!(error = %e, "not a subreaper; a stopped workload's orphans may outlive it");
    }
    let t = Instant::now();
    // A group of its own, so that stopping it stops whatever it started too (a shell's
    // children would keep the mount busy).
    // Mount points for the workload's /proc and /dev, as a container runtime makes them
    // (in the overlay: the image is untouched).
    for d in ["proc", "dev"] {
        let _ = std::fs::create_dir(root.join(d));
    }

    let env = runtime.environment(&workload.env);
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or("", |(_, v)| v.as_str());
    let (program, args) = workload
        .command
        .split_first()
        .ok_or_else(|| TrainError::Config("no command to train with".into()))?;
    let mut command = Command::new(find_program(root, program, path)?);
    command
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .process_group(0);
    crate::raw::child::confine(&mut command, root, Path::new(&runtime.workdir))
        .map_err(io("preparing the command"))?;
    let mut child = command
        .spawn()
        .map_err(io(&format!("starting {program} in the image")))?;
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    loop {
        if let Some(status) = child.try_wait().map_err(io("waiting for the command"))? {
            end_leftovers(group);
            return Ok((Some(status), t.elapsed()));
        }
        if let Some(signal) = *interrupt.lock().unwrap_or_else(|p| p.into_inner()) {
            end_leftovers(group);
            let _ = child.wait();
            return Err(TrainError::Interrupted(signal));
        }
        if t.elapsed() >= workload.timeout {
            tracing::info!(
                timeout_s = workload.timeout.as_secs_f64(),
                "the command is still running; stopping it, its reads so far are the profile"
            );
            end_leftovers(group);
            let _ = child.wait();
            return Ok((None, t.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kill the workload's process group and every process it left behind, and reap them, so
/// that none still holds the mount when it is unmounted. Orphans (daemons that left the
/// group) are this process's children, as it is their subreaper.
fn end_leftovers(group: nix::unistd::Pid) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
    let me = std::process::id().to_string();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        for pid in children_of(&me) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(5)),
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// The processes whose parent is `parent` (a pid as text), from `/proc`.
fn children_of(parent: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
        let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
        (ppid == parent).then_some(pid)
    })
    .collect()
}

/// The signal that interrupted the run, once one came.
type Interrupt = Mutex<Option<Signal>>;

/// SIGINT, SIGTERM and SIGHUP for a process that trains an index: blocked in every thread
/// and waited for by one. Before a training run they end the process at once, as they
/// would have; during one they are noted, and the run stops its workload, unmounts and
/// returns [`TrainError::Interrupted`].
pub struct Signals {
    seen: Arc<Interrupt>,
    training: Arc<AtomicBool>,
}

impl Signals {
    /// Start watching. Call it before the process starts any thread: threads inherit the
    /// mask, and a thread without it would take the signal's default action.
    pub fn watch() -> Result<Signals, TrainError> {
        let io = |source: std::io::Error| TrainError::Io {
            what: "watching for signals".into(),
            source,
        };
        let mut set = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(s);
        }
        set.thread_block().map_err(|e| io(e.into()))?;
        let signals = Signals {
            seen: Arc::default(),
            training: Arc::default(),
        };
        let (seen, training) = (signals.seen.clone(), signals.training.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                while let Ok(signal) = set.wait() {
                    if !training.load(Ordering::SeqCst) {
                        std::process::exit(128 + signal as i32);
                    }
                    *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(signal);
                }
            })
            .map_err(io)?;
        Ok(signals)
    }
}

/// Marks a training run for [`Signals`] while it lives.
struct Training<'a>(&'a AtomicBool);

impl<'a> Training<'a> {
    fn start(flag: &'a AtomicBool) -> Training<'a> {
        flag.store(true, Ordering::SeqCst);
        Training(flag)
    }
}

impl Drop for Training<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// The scratch directory of a run: the FUSE mount (`lower`), the overlay's upper and work
/// directories and its mount point (`merged`). Removed at the end once nothing is mounted.
struct Scratch {
    dir: PathBuf,
    lower: PathBuf,
    merged: PathBuf,
}

impl Scratch {
    fn create() -> Result<Scratch, TrainError> {
        let dir = std::env::temp_dir().join(format!("clip-train-{}", std::process::id()));
        let s = Scratch {
            lower: dir.join("lower"),
            merged: dir.join("merged"),
            dir,
        };
        for d in [
            &s.lower,
            &s.merged,
            &s.dir.join("upper"),
            &s.dir.join("work"),
        ] {
            std::fs::create_dir_all(d).map_err(|source| TrainError::Io {
                what: format!("creating {}", d.display()),
                source,
            })?;
        }
        Ok(s)
    }

    /// Mount a writable overlay over the read-only mount at `merged`, so that a workload
    /// writing files (caches, pid files) runs as it would in a container.
    fn overlay(&self) -> Result<(), TrainError> {
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            self.lower.display(),
            self.dir.join("upper").display(),
            self.dir.join("work").display()
        );
        nix::mount::mount(
            Some("overlay"),
            &self.merged,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|e| TrainError::Io {
            what: "mounting an overlay over the index (modprobe overlay)".into(),
            source: e.into(),
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Only an unmounted tree is removed: a mount still there keeps it all.
        let mounted = |p: &Path| {
            std::fs::read_to_string("/proc/self/mountinfo")
                .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(4) == p.to_str()))
        };
        if !mounted(&self.lower) && !mounted(&self.merged) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_comes_from_the_image_config() {
        let config = serde_json::json!({"config": {
            "Env": ["PATH=/opt/bin:/usr/bin", "LANG=C.UTF-8", "EMPTY=", "junk"],
            "WorkingDir": "srv/./app/"
        }});
        let rt = ImageRuntime::from_config(&config);
        assert_eq!(rt.workdir, "/srv/app");
        let env = rt.environment(&[("LANG".into(), "C".into()), ("X".into(), "1".into())]);
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("PATH", "/opt/bin:/usr/bin"),
                ("LANG", "C"),
                ("EMPTY", ""),
                ("X", "1")
            ]
        );
        let escaping = serde_json::json!({"config": {"WorkingDir": "/../../etc/x/.."}});
        assert_eq!(ImageRuntime::from_config(&escaping).workdir, "/etc");
        let bare = ImageRuntime::from_config(&serde_json::json!({}));
        assert_eq!(bare.workdir, "/");
        assert_eq!(
            bare.environment(&[]),
            [("PATH".to_string(), DEFAULT_PATH.to_string())]
        );
    }

    #[test]
    fn programs_are_found_in_the_image_path_never_on_the_host() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::create_dir_all(r.join("bin")).unwrap();
        std::fs::write(r.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            r.join("usr/bin/tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(r.join("bin/data"), b"not executable").unwrap();
        std::os::unix::fs::symlink("/usr/bin/tool", r.join("bin/link")).unwrap();
        let find = |p: &str| find_program(r, p, "/bin:/usr/bin").map_err(|e| e.to_string());
        assert_eq!(find("tool").unwrap(), Path::new("/usr/bin/tool"));
        assert_eq!(find("link").unwrap(), Path::new("/bin/link"));
        assert_eq!(find("/x/y").unwrap(), Path::new("/x/y"));
        let e = find("data").unwrap_err();
        assert!(
            e.contains("not an executable of the image") && e.contains("PATH=/bin:/usr/bin"),
            "{e}"
        );
        // A program only the host has is not found in the image.
        assert!(find("sh").is_err());
    }
}
