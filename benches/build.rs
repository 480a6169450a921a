//! Indexing throughput against gzip and igzip, measured in the same run.
//!
//! `cargo bench --bench build` (needs the shared corpus: `../shared/bench/make-images.sh`;
//! `CLIP_BENCH_LAYOUT` (default /tmp/bench/oci) and `CLIP_BENCH_TAG` (default debian-python)
//! choose the image). Prints: the largest layer indexed by clip vs `gzip -dc` and `igzip -dc`
//! of the same blob, and the whole image on all cores vs that one layer.

use clip::build::{build, layer::index_layer, BuildOptions, CheckpointPolicy};
use clip::oci::{resolve, Platform};
use clip::source::layout::LayoutSource;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

fn best_of<F: FnMut()>(runs: usize, mut f: F) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn tool(name: &str, blob: &PathBuf, runs: usize) -> Option<f64> {
    let ok = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        eprintln!(
            "{name} not installed (apt-get install {}): no comparison",
            if name == "igzip" { "isal" } else { name }
        );
        return None;
    }
    Some(best_of(runs, || {
        let st = Command::new(name)
            .arg("-dc")
            .arg(blob)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    }))
}

fn main() {
    let layout = PathBuf::from(
        std::env::var("CLIP_BENCH_LAYOUT").unwrap_or_else(|_| "/tmp/bench/oci".into()),
    );
    let tag = std::env::var("CLIP_BENCH_TAG").unwrap_or_else(|_| "debian-python".into());
    let runs: usize = std::env::var("CLIP_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let src = LayoutSource::open(&layout).unwrap_or_else(|e| {
        panic!("{e}\nbuild the corpus first: sudo ../shared/bench/make-images.sh (or set CLIP_BENCH_LAYOUT)")
    });
    let image = resolve(&src, &tag, &Platform::host()).expect("resolving the benchmark image");
    let largest = image
        .layers
        .iter()
        .max_by_key(|l| l.size)
        .expect("image has layers")
        .clone();
    let blob = src.blob_path(&largest.digest).unwrap();
    let mut uncompressed = 0;
    if std::env::var_os(ONE_CORE_CHILD).is_some() {
        // Child run under `taskset -c 0` (see `one_core`): time the layer and report.
        let t = best_of(runs, || {
            index_layer(
                &src,
                &largest,
                CheckpointPolicy::default(),
                indicatif::ProgressBar::hidden(),
            )
            .unwrap();
        });
        println!("{t}");
        return;
    }
    println!(
        "image {tag}: {} layers; largest layer {} ({:.1} MB gzip)",
        image.layers.len(),
        largest.digest,
        largest.size as f64 / 1e6
    );

    let gzip = tool("gzip", &blob, runs);
    let igzip = tool("igzip", &blob, runs);
    let clip_one = best_of(runs, || {
        let r = index_layer(
            &src,
            &largest,
            CheckpointPolicy::default(),
            indicatif::ProgressBar::hidden(),
        )
        .unwrap();
        uncompressed = r.layer.uncompressed_size;
    });
    let mb = uncompressed as f64 / 1e6;
    println!(
        "{:<28} {:>8} {:>10} {:>8}",
        "one layer", "seconds", "MB/s", "ratio"
    );
    println!(
        "{:<28} {:>8.3} {:>10.0} {:>8}",
        "clip-build index_layer",
        clip_one,
        mb / clip_one,
        "1.00"
    );
    for (name, t) in [("gzip -dc", gzip), ("igzip -dc", igzip)] {
        if let Some(t) = t {
            println!(
                "{:<28} {:>8.3} {:>10.0} {:>7.2}x  (clip speed / {name} speed)",
                name,
                t,
                mb / t,
                t / clip_one
            );
        }
    }
    let total: u64 = image.layers.iter().map(|l| l.size).sum();
    let mut total_out = 0;
    let cpu_before = cpu_seconds();
    let clip_all = best_of(runs, || {
        let idx = build(&src, &tag, &BuildOptions::default()).unwrap();
        total_out = idx.index.layers.iter().map(|l| l.uncompressed_size).sum();
    });
    let cpu_per_build = (cpu_seconds() - cpu_before) / runs as f64;
    let all_mb = total_out as f64 / 1e6;
    println!(
        "whole image ({} layers, {:.1} MB gzip, {:.1} MB tar) on {} threads: {:.3} s, {:.0} MB/s = {:.2}x one layer's speed",
        image.layers.len(),
        total as f64 / 1e6,
        all_mb,
        rayon::current_num_threads(),
        clip_all,
        all_mb / clip_all,
        (all_mb / clip_all) / (mb / clip_one)
    );
    match one_core() {
        Some(t) => println!(
            "  one layer on one core (taskset -c 0): {t:.3} s, {:.0} MB/s; the whole image on {} threads runs at {:.2}x that",
            mb / t,
            rayon::current_num_threads(),
            (all_mb / clip_all) / (mb / t)
        ),
        None => println!("  one layer on one core: not measured (needs taskset, package util-linux)"),
    }
    println!(
        "  CPU per whole-image build {cpu_per_build:.2} s = {:.2} cores busy on average (one layer alone already \
         runs inflate, digest and tar threads side by side)",
        cpu_per_build / clip_all
    );
}

/// User + system CPU time of this process so far, all threads (from /proc/self/stat, in
/// clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("reading /proc/self/stat");
    // The fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Set in the environment of this bench's own child run on one core.
const ONE_CORE_CHILD: &str = "CLIP_BENCH_ONE_CORE_CHILD";

/// Seconds to index the largest layer with every thread of the process on CPU 0: this
/// bench run again under `taskset -c 0`, so the whole image's speed on all cores can be
/// compared with one layer's speed on one.
fn one_core() -> Option<f64> {
    let exe = std::env::current_exe().ok()?;
    let out = Command::new("taskset")
        .args(["-c", "0"])
        .arg(exe)
        .env(ONE_CORE_CHILD, "1")
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()?
        .parse()
        .ok()
}
