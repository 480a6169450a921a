//! `clip-build`: index an OCI image, and inspect or read an index.

use clap::{Parser, Subcommand};
use clip::build::{build, BuildOptions, CheckpointPolicy};
use clip::format::{IndexFile, Kind};
use clip::oci::Platform;
use clip::profile::Profile;
use clip::read::FileReader;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "clip-build",
    version,
    about = "Index an unmodified OCI image once, so clip-serve can mount it without pulling",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// Image to index: an OCI layout directory (DIR, DIR:TAG or oci:DIR:TAG) or a registry
    /// reference (HOST/REPO:TAG, REPO@sha256:…, docker://REF).
    #[arg(required = true)]
    image: Option<String>,
    /// Where to write the index.
    #[arg(short, long, required = true)]
    output: Option<PathBuf>,
    /// Platform to pick from a multi-platform image (os/arch[/variant]); default: this host.
    #[arg(long)]
    platform: Option<String>,
    /// Uncompressed bytes between checkpoints (e.g. 2M, 512K).
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    checkpoint_interval: u64,
    /// Files at least this large get a checkpoint right before their data.
    #[arg(long, default_value = "512K", value_parser = parse_size)]
    large_file_threshold: u64,
    /// Embed this access profile (written by `clip-serve --record-profile` on an index of
    /// this image built with the same checkpoint options) as the index's startup profile:
    /// every clip-serve mounting the index prefetches its intervals at start.
    #[arg(long, value_name = "FILE", conflicts_with = "train")]
    profile: Option<PathBuf>,
    /// Train the index (after `--`): once it is written, mount it, run CMD in a chroot of an
    /// overlay over the mount, and embed what it read as the index's startup profile, so
    /// that every node's first start of this workload fetches it in one parallel round.
    /// Needs root, FUSE and overlayfs; CMD runs with the Env and WorkingDir of the image
    /// config, as a container of the image would, but as root in a chroot with only a
    /// mount namespace of its own: train only images you trust, or on a throwaway machine.
    #[arg(last = true, value_name = "CMD")]
    train: Vec<String>,
    /// Stop a training command still running after this many seconds (a server); what it
    /// read until then is the profile.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    train_timeout: f64,
    /// Set a variable for the training command on top of the image config's Env
    /// (repeatable).
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_env)]
    train_env: Vec<(String, String)>,
    /// Never show progress bars.
    #[arg(short, long)]
    quiet: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Summarize an index: image, layers, entries by type, checkpoints, size.
    Inspect {
        /// Index file.
        index: PathBuf,
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
    /// List entries under PATH (default /).
    Ls {
        /// Index file.
        index: PathBuf,
        /// Path inside the image.
        #[arg(default_value = "/")]
        path: String,
        /// List everything below PATH.
        #[arg(short = 'R', long)]
        recursive: bool,
    },
    /// Print every recorded field of one entry.
    Stat {
        /// Index file.
        index: PathBuf,
        /// Path inside the image.
        path: String,
    },
    /// Write a file's content to stdout, resuming inflation at the nearest checkpoint.
    Cat {
        /// Index file.
        index: PathBuf,
        /// Path inside the image.
        path: String,
        /// Where to read the layer blobs instead of the source recorded in the index: an
        /// OCI layout directory or a registry repository (a mirror: HOST[:PORT]/REPO).
        #[arg(long, alias = "layout", value_name = "LAYOUT_OR_REPO")]
        source: Option<String>,
    },
    /// Fully validate an index (structure and tree); with --content also read every file
    /// from the image source and check its sha256.
    Verify {
        /// Index file.
        index: PathBuf,
        /// Also read and hash every file's content.
        #[arg(long)]
        content: bool,
        /// Where to read the layer blobs instead of the source recorded in the index: an
        /// OCI layout directory or a registry repository (a mirror: HOST[:PORT]/REPO).
        #[arg(long, alias = "layout", value_name = "LAYOUT_OR_REPO")]
        source: Option<String>,
    },
    /// Embed an access profile in an index as its startup profile (replacing any), or
    /// remove it: every clip-serve mounting the index prefetches the profile's intervals at
    /// start, from its first run on a node.
    EmbedProfile {
        /// Index file (rewritten in place, atomically).
        index: PathBuf,
        /// Profile written by `clip-serve --record-profile` on this index (or on one built
        /// from the same image with the same checkpoint options).
        #[arg(required_unless_present = "remove", conflicts_with = "remove")]
        profile: Option<PathBuf>,
        /// Remove the startup profile instead.
        #[arg(long)]
        remove: bool,
    },
    /// Print the startup profile an index carries (the text of a profile file).
    Profile {
        /// Index file.
        index: PathBuf,
    },
    /// Write the embedded demo image as an OCI layout (tag "demo").
    Demo {
        /// Directory to create.
        dir: PathBuf,
    },
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 2M or 512K"))?;
    n.checked_mul(mul)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?} is out of range"))
}

fn parse_env(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.into(), v.into())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A training run must unmount whatever stops it: signals are watched from before any
    // thread starts (see `clip::train::Signals`).
    let signals = match (!cli.train.is_empty() && cli.command.is_none())
        .then(clip::train::Signals::watch)
        .transpose()
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("clip-build: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // fuser's mount and unmount notes are noise around a training run.
    clip::logging::init_with_default("info,fuser=warn");
    match run(cli, signals.as_ref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clip-build: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn open(path: &Path) -> Result<IndexFile> {
    Ok(IndexFile::open(path)?)
}

fn resolve(idx: &IndexFile, path: &str) -> Result<u32> {
    idx.resolve(path.as_bytes())?
        .ok_or_else(|| format!("{path}: no such file or directory in the image").into())
}

fn blob_source(idx: &IndexFile, spec: Option<String>) -> Result<Box<dyn clip::source::Source>> {
    Ok(match spec {
        Some(spec) => clip::source::open(&spec)?.0,
        None => clip::source::open_recorded(&String::from_utf8_lossy(
            idx.index().image.source.as_slice(),
        ))?,
    })
}

/// The bytes of `idx` carrying the profile at `path` as its startup profile (checked to
/// belong to the index), or none; and the profile's interval count.
fn with_profile(idx: &IndexFile, path: Option<&Path>) -> Result<(Vec<u8>, Option<usize>)> {
    let Some(path) = path else {
        return Ok((Profile::embed_into(idx, None)?, None));
    };
    let (manifest, layout) = clip::profile::image_of(idx);
    let profile = Profile::load(path, &manifest, layout)?;
    let shown = path.display().to_string();
    let bytes = Profile::embed_into(idx, Some((&profile, &shown)))?;
    Ok((bytes, Some(profile.intervals.len())))
}

/// Train the index at `path` with `command` (see `clip::train`); returns its new size.
fn train(
    path: &Path,
    command: &[String],
    env: &[(String, String)],
    timeout: f64,
    signals: &clip::train::Signals,
) -> Result<u64> {
    let timeout = std::time::Duration::try_from_secs_f64(timeout)
        .map_err(|_| format!("--train-timeout {timeout} is not a number of seconds"))?;
    eprintln!(
        "training: running `{}` in a chroot of the index",
        command.join(" ")
    );
    let workload = clip::train::Workload {
        command: command.to_vec(),
        env: env.to_vec(),
        timeout,
    };
    let (trained, size) = clip::train::train_index(path, &workload, signals)?;
    let ended = if trained.stopped {
        "was stopped"
    } else {
        "exited"
    };
    eprintln!(
        "training: the command {ended} after {:.2} s; it read {} checkpoint intervals",
        trained.elapsed.as_secs_f64(),
        trained.profile.intervals.len()
    );
    Ok(size)
}

fn run(cli: Cli, signals: Option<&clip::train::Signals>) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match cli.command {
        None => {
            let image = cli.image.expect("required by clap");
            let output = cli.output.expect("required by clap");
            let platform = match &cli.platform {
                Some(p) => Some(
                    Platform::parse(p)
                        .ok_or_else(|| format!("--platform {p:?} is not os/arch[/variant]"))?,
                ),
                None => None,
            };
            if let Some(p) = &cli.profile {
                std::fs::metadata(p).map_err(|e| format!("--profile {}: {e}", p.display()))?;
            }
            let (source, reference) = clip::source::open(&image)?;
            let opts = BuildOptions {
                platform,
                policy: CheckpointPolicy {
                    interval: cli.checkpoint_interval,
                    large_file: cli.large_file_threshold,
                },
                progress: !cli.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let t = std::time::Instant::now();
            let clip::build::Built { index, windows } = build(source.as_ref(), &reference, &opts)?;
            let mut bytes = clip::format::write::to_bytes(&index, &windows, None)?;
            if let Some(path) = &cli.profile {
                bytes = with_profile(&IndexFile::from_bytes(&bytes)?, Some(path))?.0;
            }
            clip::format::write::write_bytes(&bytes, &output)?;
            let mut size = bytes.len() as u64;
            let bytes: u64 = index.layers.iter().map(|l| l.uncompressed_size).sum();
            let secs = t.elapsed().as_secs_f64();
            eprintln!(
                "indexed {} ({} layers, {} entries, {:.1} MB uncompressed) in {:.2} s ({:.0} MB/s) -> {} ({} bytes)",
                image,
                index.layers.len(),
                index.entries.len(),
                bytes as f64 / 1e6,
                secs,
                bytes as f64 / 1e6 / secs,
                output.display(),
                size
            );
            if let Some(signals) = signals {
                size = train(
                    &output,
                    &cli.train,
                    &cli.train_env,
                    cli.train_timeout,
                    signals,
                )?;
                eprintln!(
                    "{}: {size} bytes with its startup profile",
                    output.display()
                );
            }
        }
        Some(Cmd::Inspect { index, json }) => {
            let idx = open(&index)?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&clip::report::inspect_json(&idx)?)?
                )?;
            } else {
                write!(out, "{}", clip::report::inspect_text(&idx)?)?;
            }
        }
        Some(Cmd::Ls {
            index,
            path,
            recursive,
        }) => {
            let idx = open(&index)?;
            let i = resolve(&idx, &path)?;
            for line in clip::report::ls(&idx, i, recursive)? {
                writeln!(out, "{line}")?;
            }
        }
        Some(Cmd::Stat { index, path }) => {
            let idx = open(&index)?;
            write!(out, "{}", clip::report::stat(&idx, resolve(&idx, &path)?)?)?;
        }
        Some(Cmd::Cat {
            index,
            path,
            source,
        }) => {
            let idx = open(&index)?;
            let i = resolve(&idx, &path)?;
            let src = blob_source(&idx, source)?;
            let mut r = FileReader::new(&idx, i)?;
            for k in 0..r.pieces().len() {
                let (bytes, _) = r.piece(&idx, src.as_ref(), &[], k)?;
                out.write_all(&bytes)?;
            }
        }
        Some(Cmd::Verify {
            index,
            content,
            source,
        }) => {
            let idx = open(&index)?;
            let t = std::time::Instant::now();
            idx.verify()?;
            eprintln!(
                "structure OK ({} entries, {:.1} ms)",
                idx.entry_count(),
                t.elapsed().as_secs_f64() * 1e3
            );
            if content {
                let src = blob_source(&idx, source)?;
                let mut files = 0u64;
                let mut bytes = 0u64;
                for i in 0..idx.entry_count() {
                    if idx.entry(i)?.kind != Kind::File as u8 {
                        continue;
                    }
                    let mut r = FileReader::new(&idx, i)?;
                    for k in 0..r.pieces().len() {
                        bytes += r.piece(&idx, src.as_ref(), &[], k)?.0.len() as u64;
                    }
                    files += 1;
                }
                eprintln!("content OK ({files} files, {bytes} bytes)");
            }
        }
        Some(Cmd::EmbedProfile {
            index,
            profile,
            remove: _,
        }) => {
            let (bytes, intervals) = with_profile(&open(&index)?, profile.as_deref())?;
            clip::format::write::write_bytes(&bytes, &index)?;
            match intervals {
                Some(n) => eprintln!(
                    "{}: startup profile of {n} intervals embedded",
                    index.display()
                ),
                None => eprintln!("{}: no startup profile", index.display()),
            }
        }
        Some(Cmd::Profile { index }) => {
            let idx = open(&index)?;
            let text = idx
                .startup_profile()?
                .ok_or_else(|| format!("{} carries no startup profile", index.display()))?;
            out.write_all(text)?;
        }
        Some(Cmd::Demo { dir }) => {
            clip::demo::write_demo(&dir)?;
            eprintln!(
                "wrote the demo image to {} (tag {})",
                dir.display(),
                clip::demo::DEMO_TAG
            );
        }
    }
    out.flush()?;
    Ok(())
}
