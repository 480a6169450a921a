//! The committed test vector `format-spec/vectors/demo.clip` and its decoded text.
//!
//! - The committed index must decode (with clip-build and with tools/clipread.py) to the
//!   committed text files.
//! - Rebuilding the demo image today must reproduce the committed index byte for byte: if
//!   the writer's output changes, this fails until the vectors (and, if the layout changed,
//!   the spec, the format version and clipread.py) are updated.
//!
//! Regenerate after a deliberate change: `CLIP_UPDATE_VECTORS=1 cargo test --test format_vectors`
//! (then review the diff of `format-spec/vectors/`).

mod common;

use common::{bin, require_tool, run};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Paths whose `stat` output is committed in `demo.stat.txt`.
const STAT_PATHS: &[&str] = &[
    "/",
    "/etc/motd",
    "/opt",
    "/usr/bin/hello",
    "/usr/bin/hello-again",
    "/usr/bin/hi",
    "/usr/bin/ping",
    "/usr/share/data/big.txt",
];

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("format-spec/vectors")
}

fn updating() -> bool {
    std::env::var_os("CLIP_UPDATE_VECTORS").is_some_and(|v| v == "1")
}

/// (file name, content) of every text vector, as `reader` prints them for `index`.
fn decoded(index: &Path, reader: &dyn Fn(&[&str]) -> Vec<u8>) -> Vec<(&'static str, Vec<u8>)> {
    let ix = index.to_str().unwrap();
    let mut stat = Vec::new();
    for p in STAT_PATHS {
        stat.extend(reader(&["stat", ix, p]));
    }
    vec![
        ("demo.ls.txt", reader(&["ls", "-R", ix, "/"])),
        ("demo.inspect.txt", reader(&["inspect", ix])),
        ("demo.inspect.json", reader(&["inspect", "--json", ix])),
        ("demo.stat.txt", stat),
    ]
}

fn clip_build(args: &[&str]) -> Vec<u8> {
    run(Command::new(bin("clip-build")).args(args))
}

fn clipread(args: &[&str]) -> Vec<u8> {
    require_tool("python3");
    run(Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/clipread.py"))
        .args(args))
}

fn read_vector(name: &str) -> Vec<u8> {
    let p = vectors().join(name);
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; regenerate with CLIP_UPDATE_VECTORS=1",
            p.display()
        )
    })
}

/// Build the demo index exactly as the vector was made: from a layout directory named
/// `layout`, given as a relative path, so the recorded `source` is `layout`.
fn rebuild(tmp: &Path) -> Vec<u8> {
    run(Command::new(bin("clip-build"))
        .current_dir(tmp)
        .args(["demo", "layout"]));
    run(Command::new(bin("clip-build")).current_dir(tmp).args([
        "layout:demo",
        "-o",
        "demo.clip",
        "-q",
    ]));
    std::fs::read(tmp.join("demo.clip")).unwrap()
}

#[test]
fn rebuilding_the_demo_reproduces_the_committed_vector() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = rebuild(tmp.path());
    let host = clip::oci::Platform::host();
    if updating() {
        assert_eq!(
            host.architecture, "amd64",
            "vectors are made on linux/amd64 (the platform is recorded)"
        );
        std::fs::create_dir_all(vectors()).unwrap();
        std::fs::write(vectors().join("demo.clip"), &fresh).unwrap();
        for (name, text) in decoded(&tmp.path().join("demo.clip"), &clip_build) {
            std::fs::write(vectors().join(name), text).unwrap();
        }
        return;
    }
    let committed = read_vector("demo.clip");
    if host.architecture == "amd64" {
        if let Some(at) = fresh.iter().zip(&committed).position(|(a, b)| a != b) {
            panic!(
                "clip-build now writes a different demo index (first difference at byte {at}, sizes {} vs {}): \
                 the format or the writer changed. Update format-spec/ (and the format version if the layout \
                 changed), then regenerate with CLIP_UPDATE_VECTORS=1 cargo test --test format_vectors",
                fresh.len(),
                committed.len()
            );
        }
        assert_eq!(
            fresh.len(),
            committed.len(),
            "the rebuilt demo index has a different size"
        );
    } else {
        // The demo image is made for the host platform, so its manifest and config digests
        // (and the platform string) differ on other architectures. The tree must not.
        let p = tmp.path().join("demo.clip");
        let (fresh_text, committed_text) = (
            decoded(&p, &clip_build),
            decoded(&vectors().join("demo.clip"), &clip_build),
        );
        for ((name, a), (_, b)) in fresh_text.iter().zip(&committed_text) {
            if name.starts_with("demo.ls") || name.starts_with("demo.stat") {
                assert_eq!(a, b, "{name} of the rebuilt demo differs from the vector");
            }
        }
    }
}

#[test]
fn committed_vector_decodes_to_committed_text() {
    if updating() {
        return;
    }
    let index = vectors().join("demo.clip");
    for (who, reader) in [
        ("clip-build", &clip_build as &dyn Fn(&[&str]) -> Vec<u8>),
        ("clipread.py", &clipread),
    ] {
        for (name, got) in decoded(&index, reader) {
            let want = read_vector(name);
            if name.ends_with(".json") {
                let g: serde_json::Value = serde_json::from_slice(&got).unwrap();
                let w: serde_json::Value = serde_json::from_slice(&want).unwrap();
                assert_eq!(g, w, "{who}: {name} no longer matches the committed vector");
            }
            assert!(
                got == want,
                "{who}: the committed demo.clip no longer decodes to {name}:\n--- got\n{}\n--- committed\n{}",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want)
            );
        }
    }
}

/// The numbers quoted in the spec's worked example (format-spec/README.md, section 11).
#[test]
fn worked_example_numbers() {
    if updating() {
        return;
    }
    let b = read_vector("demo.clip");
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    assert_eq!(&b[..8], b"CLIPIDX\0");
    let plen = u64_at(24) as usize;
    let wlen = u64_at(48) as usize;
    assert_eq!(b.len(), 64 + plen + wlen);
    assert_eq!(u64_at(32), xxhash_rust::xxh3::xxh3_64(&b[64..64 + plen]));
    // Layer 0's second checkpoint holds the only non-empty window: the whole window area.
    let layers_field = 64 + plen - 88 + 48;
    let layers = (layers_field as i64 + u32_at(layers_field) as i32 as i64) as usize;
    let cps_field = layers + 40;
    let cps = (cps_field as i64 + u32_at(cps_field) as i32 as i64) as usize;
    let cp1 = cps + 48;
    assert_eq!((u64_at(cp1 + 16), u32_at(cp1 + 32) as usize), (0, wlen));
    assert_eq!(
        u64_at(cp1 + 24),
        xxhash_rust::xxh3::xxh3_64(&b[64 + plen..])
    );
    assert_eq!((u32_at(40), u32_at(44)), (17, 2));
    let root = 64 + plen - 88;
    let entries_field = root + 56;
    let rel = u32_at(entries_field) as i32 as i64;
    let entries = (entries_field as i64 + rel) as usize;
    assert_eq!(u32_at(entries_field + 4), 17);
    // Entry 0 is the root directory: kind 1, parent 0, its children start at entry 1.
    assert_eq!(b[entries + 132], 1);
    assert_eq!(u32_at(entries + 72), 0);
    assert_eq!(u32_at(entries + 76), 1);
    let text = String::from_utf8(read_vector("demo.inspect.json")).unwrap();
    assert!(text.contains(&format!("\"index_size\": {}", b.len())));
}

/// The startup profile example of the spec (section 3.1): `demo-startup.profile`, a
/// profile recorded on the demo image, embedded in `demo.clip` by `clip-build
/// embed-profile`, appends exactly the area the spec shows, marks the file 2.1, and reads
/// back the same in both readers.
#[test]
fn startup_profile_vector() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = read_vector("demo.clip");
    let text = read_vector("demo-startup.profile");
    let index = tmp.path().join("demo.clip");
    std::fs::write(&index, &plain).unwrap();
    let ix = index.to_str().unwrap();
    let profile = vectors().join("demo-startup.profile");
    clip_build(&["embed-profile", ix, profile.to_str().unwrap()]);
    let b = std::fs::read(&index).unwrap();
    // The header's version_minor (bytes 10..12) is 1; nothing else before the area changes.
    assert_eq!(&b[10..12], &[1, 0]);
    assert_eq!(&b[..10], &plain[..10]);
    assert_eq!(&b[12..plain.len()], &plain[12..]);
    // The area: magic, length 158, XXH3-64 c273ad5ca31b2aa5, then the text (spec 3.1).
    let area = &b[plain.len()..];
    let mut head = b"CLIPPRF\0".to_vec();
    head.extend_from_slice(&158u64.to_le_bytes());
    head.extend_from_slice(&0xc273ad5ca31b2aa5u64.to_le_bytes());
    assert_eq!(&area[..24], &head[..]);
    assert_eq!(&area[24..], &text[..]);
    for reader in [&clip_build as &dyn Fn(&[&str]) -> Vec<u8>, &clipread] {
        assert_eq!(reader(&["profile", ix]), text);
        let inspect = String::from_utf8(reader(&["inspect", ix])).unwrap();
        assert!(
            inspect.ends_with("startup profile: 2 intervals (158 bytes)\n"),
            "{inspect}"
        );
    }
}
