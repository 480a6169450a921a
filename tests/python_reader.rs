//! The independent Python reader (`tools/clipread.py`, written from `format-spec/`) must
//! agree with the Rust tools on every index clip-build makes of the test images: `ls -R`,
//! `stat` of every entry and `inspect` byte for byte, `inspect --json` as parsed JSON, and
//! `cat` of every regular file and hardlink. It must also resume inflation correctly at
//! every checkpoint, whatever its bit offset, and compute XXH3-64 like the Rust crate.

mod common;

use clip::format::{IndexFile, Kind};
use common::{bin, edge_index, require_tool, run, EDGE_TAG};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn clipread() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/clipread.py")
}

fn py(args: &[&str]) -> Command {
    require_tool("python3");
    let mut c = Command::new("python3");
    c.arg(clipread()).args(args);
    c
}

fn clip(args: &[&str]) -> Command {
    let mut c = Command::new(bin("clip-build"));
    c.args(args);
    c
}

fn text(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd)).expect("output is UTF-8")
}

/// Compare two outputs line by line so a failure names the first differing line.
fn assert_same_text(what: &str, rust: &str, python: &str) {
    for (n, (r, p)) in rust.lines().zip(python.lines()).enumerate() {
        assert_eq!(
            r,
            p,
            "{what}: line {} differs (left: clip-build, right: clipread.py)",
            n + 1
        );
    }
    assert_eq!(
        rust.lines().count(),
        python.lines().count(),
        "{what}: line counts differ"
    );
    assert_eq!(rust, python, "{what}: outputs differ (trailing newline?)");
}

/// Everything `clipread.py` prints for `index` must equal what `clip-build` prints.
fn compare_readers(index: &Path, layout: &Path) -> usize {
    let ix = index.to_str().unwrap();
    let lay = layout.to_str().unwrap();

    let r = text(&mut clip(&["ls", "-R", ix, "/"]));
    let p = text(&mut py(&["ls", "-R", ix, "/"]));
    assert_same_text("ls -R /", &r, &p);

    let r = text(&mut clip(&["inspect", ix]));
    let p = text(&mut py(&["inspect", ix]));
    assert_same_text("inspect", &r, &p);

    let r = text(&mut clip(&["inspect", "--json", ix]));
    let p = text(&mut py(&["inspect", "--json", ix]));
    let rj: serde_json::Value = serde_json::from_str(&r).unwrap();
    let pj: serde_json::Value = serde_json::from_str(&p).unwrap();
    assert_eq!(rj, pj, "inspect --json differs");
    assert_same_text("inspect --json (text)", &r, &p);

    // One clip-build process per entry; clipread.py takes all paths at once (same text,
    // concatenated) because Python's start-up dominates otherwise.
    let idx = IndexFile::open(index).unwrap();
    let mut paths = Vec::new();
    let mut files = Vec::new();
    let mut rust_stat = String::new();
    let mut rust_cat = Vec::new();
    for i in 0..idx.entry_count() {
        let path =
            String::from_utf8(idx.path_of(i).unwrap()).expect("test images have UTF-8 paths");
        let r = text(&mut clip(&["stat", ix, &path]));
        assert!(
            r.starts_with(&format!("path: {path}\nindex: {i}\n")),
            "stat {path}: {r}"
        );
        rust_stat += &r;
        let kind = Kind::from_u8(idx.entry(i).unwrap().kind).unwrap();
        if matches!(kind, Kind::File | Kind::Hardlink) {
            let r = run(&mut clip(&["cat", ix, &path, "--layout", lay]));
            let size = idx
                .entry(idx.inode_of(i).unwrap())
                .unwrap()
                .size
                .to_native();
            assert_eq!(r.len() as u64, size, "clip-build cat {path}: wrong length");
            files.push((path.clone(), r.len()));
            rust_cat.extend(r);
        }
        paths.push(path);
    }
    let mut args = vec!["stat", ix];
    args.extend(paths.iter().map(|s| s.as_str()));
    let p = text(&mut py(&args));
    assert_same_text("stat of every entry", &rust_stat, &p);

    let mut args = vec!["cat", ix];
    args.extend(files.iter().map(|(p, _)| p.as_str()));
    args.extend(["--layout", lay]);
    let p = run(&mut py(&args));
    let mut at = 0;
    for (path, len) in &files {
        let (r, q) = (&rust_cat[at..at + len], p.get(at..at + len).unwrap_or(&[]));
        assert!(r == q, "cat {path}: clipread.py's bytes differ from clip-build's ({len} bytes at {at} of the concatenation)");
        at += len;
    }
    assert_eq!(
        p.len(),
        rust_cat.len(),
        "cat: clipread.py printed a different total length"
    );
    files.len()
}

fn demo_index(tmp: &Path) -> (PathBuf, PathBuf) {
    let layout = tmp.join("demo");
    let index = tmp.join("demo.clip");
    run(&mut clip(&["demo", layout.to_str().unwrap()]));
    run(&mut clip(&[
        &format!("{}:demo", layout.display()),
        "-o",
        index.to_str().unwrap(),
        "--quiet",
    ]));
    (layout, index)
}

#[test]
fn python_reader_matches_on_the_edge_image() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index) = edge_index(tmp.path());
    let files = compare_readers(&index, &layout);
    assert!(
        files >= 80,
        "expected the edge image's files to be compared, got {files}"
    );
}

#[test]
fn python_reader_matches_on_the_demo_image() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index) = demo_index(tmp.path());
    let files = compare_readers(&index, &layout);
    assert_eq!(files, 7, "6 files and 1 hardlink");
}

/// Embed a startup profile of two intervals in `index` (format 2.1); returns its text.
fn embed_profile(tmp: &Path, index: &Path) -> String {
    let (manifest, layout) = clip::profile::image_of(&IndexFile::open(index).unwrap());
    let text =
        format!("clip-profile 3\nmanifest {manifest}\nlayout {layout:016x}\n0 0 100 0\n1 0 50\n");
    let profile = tmp.join("startup.profile");
    std::fs::write(&profile, &text).unwrap();
    run(&mut clip(&[
        "embed-profile",
        index.to_str().unwrap(),
        profile.to_str().unwrap(),
    ]));
    text
}

/// The startup profile area (format 2.1) reads the same in both readers.
#[test]
fn python_reader_reads_the_startup_profile() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index) = demo_index(tmp.path());
    let want = embed_profile(tmp.path(), &index);
    compare_readers(&index, &layout);
    let ix = index.to_str().unwrap();
    let inspect = text(&mut py(&["inspect", ix]));
    assert!(inspect.starts_with("format:      2.1\n"), "{inspect}");
    assert!(
        inspect.ends_with(&format!(
            "startup profile: 2 intervals ({} bytes)\n",
            want.len()
        )),
        "{inspect}"
    );
    assert_eq!(text(&mut py(&["profile", ix])), want);
    assert_eq!(text(&mut clip(&["profile", ix])), want);
}

/// Many checkpoints (every 16 KiB) cover every bit offset 0..7 and the boundaries between
/// gzip members; the Python reader has no `inflatePrime` and must still resume at each.
#[test]
fn python_reader_resumes_at_every_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = common::edge_layout(&tmp.path().join("layout"));
    let index = tmp.path().join("dense.clip");
    run(&mut clip(&[
        &format!("{}:{EDGE_TAG}", layout.display()),
        "-o",
        index.to_str().unwrap(),
        "--checkpoint-interval",
        "16K",
        "--large-file-threshold",
        "8K",
        "--quiet",
    ]));
    let out = text(&mut py(&[
        "checkpoints",
        index.to_str().unwrap(),
        "--layout",
        layout.to_str().unwrap(),
    ]));
    let mut seen = [0usize; 8];
    for line in out.lines() {
        assert!(line.ends_with(": ok"), "{line}");
        let bits: usize = line
            .split(" bits ")
            .nth(1)
            .unwrap()
            .trim_end_matches(": ok")
            .parse()
            .unwrap();
        seen[bits] += 1;
    }
    assert!(
        seen.iter().all(|&n| n > 0),
        "not every bit offset was exercised: {seen:?}"
    );
    // Layer 1 is two gzip members: `checkpoints` also inflates from the last checkpoint of
    // each layer to its end, which crosses into the second member here.
    assert!(
        out.lines().any(|l| l.starts_with("layer 1 checkpoint 0 ")),
        "{out}"
    );
    // And the readers still agree on file contents read from those checkpoints.
    compare_readers(&index, &layout);

    // A layer of two gzip members with a checkpoint every 4 KiB, so that inflation also
    // resumes inside the second member (where the Python reader uses a gzip decoder again).
    let mut t = clip::demo::TarBuilder::new();
    for k in 0..6 {
        t.file(&format!("f{k}"), 0o644, &clip::demo::noise(k + 1, 40_000));
    }
    let tar = t.finish();
    let blob = common::two_member_gzip(&tar);
    let layout2 = tmp.path().join("members");
    let mut w = clip::source::layout::LayoutWriter::create(&layout2).unwrap();
    let input = clip::source::layout::LayerInput {
        tar: tar.clone(),
        gzip: true,
        blob: Some(blob.clone()),
    };
    let m = w
        .image(
            &[input],
            &clip::oci::Platform::host(),
            "2025-05-20T00:00:00Z",
        )
        .unwrap();
    w.tag(m, "m");
    w.finish().unwrap();
    let index2 = tmp.path().join("members.clip");
    run(&mut clip(&[
        &format!("{}:m", layout2.display()),
        "-o",
        index2.to_str().unwrap(),
        "--checkpoint-interval",
        "4K",
        "--quiet",
    ]));
    let out = text(&mut py(&[
        "checkpoints",
        index2.to_str().unwrap(),
        "--layout",
        layout2.to_str().unwrap(),
    ]));
    let in_second = out
        .lines()
        .filter(|l| {
            let in_offset: usize = l
                .split(" in ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            in_offset > blob.len() / 2
        })
        .count();
    assert!(
        in_second > 0,
        "no checkpoint inside the second gzip member:\n{out}"
    );
    assert_eq!(compare_readers(&index2, &layout2), 6);
}

#[test]
fn python_xxh3_matches_the_rust_crate_for_all_lengths() {
    let tmp = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..70_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut lens: Vec<usize> = (0..=300).collect();
    lens.extend([
        511, 512, 513, 1023, 1024, 1025, 1087, 1088, 1089, 2047, 2048, 2049, 4096, 65_536, 70_000,
    ]);
    let mut names = Vec::new();
    let mut expected = String::new();
    for n in &lens {
        let p = tmp.path().join(format!("in{n}"));
        std::fs::write(&p, &data[..*n]).unwrap();
        expected += &format!(
            "{:016x}  {}\n",
            xxhash_rust::xxh3::xxh3_64(&data[..*n]),
            p.display()
        );
        names.push(p.to_str().unwrap().to_string());
    }
    let mut args = vec!["xxh3"];
    args.extend(names.iter().map(|s| s.as_str()));
    let got = text(&mut py(&args));
    assert_same_text("xxh3", &expected, &got);
}

fn py_fails(args: &[&str]) -> String {
    let out: Output = py(args).output().unwrap();
    assert!(!out.status.success(), "clipread.py {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The Python reader applies the spec's rejection rules with clear messages.
#[test]
fn python_reader_rejects_what_the_spec_says_to_reject() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index) = demo_index(tmp.path());
    let good = std::fs::read(&index).unwrap();
    let payload_end = 64 + u64::from_le_bytes(good[24..32].try_into().unwrap()) as usize;
    let write = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        let p = tmp.path().join(name);
        std::fs::write(&p, b).unwrap();
        p.to_str().unwrap().to_string()
    };
    let v1 = write("v1.clip", &|b| {
        b[8..10].copy_from_slice(&1u16.to_le_bytes())
    });
    assert!(py_fails(&["inspect", &v1]).contains("version 1.0 is not supported"));
    let minor = write("minor.clip", &|b| {
        b[10..12].copy_from_slice(&7u16.to_le_bytes())
    });
    assert!(text(&mut py(&["inspect", &minor])).starts_with("format:      2.7\n"));
    let flags = write("flags.clip", &|b| b[12] = 4);
    assert!(py_fails(&["inspect", &flags]).contains("unknown feature flags 0x4"));
    let magic = write("magic.clip", &|b| b[0] = b'X');
    assert!(py_fails(&["inspect", &magic]).contains("not a clip index"));
    let flip = write("flip.clip", &|b| b[payload_end - 100] ^= 1);
    assert!(py_fails(&["inspect", &flip]).contains("checksum"));
    // A damaged window opens (it is outside the payload checksum) but fails its own
    // checksum when inflation resumes from it.
    let window = write("window.clip", &|b| b[payload_end + 100] ^= 1);
    text(&mut py(&["inspect", &window]));
    let err = py_fails(&["checkpoints", &window, "--layout", layout.to_str().unwrap()]);
    assert!(
        err.contains("window of checkpoint") && err.contains("does not match its checksum"),
        "{err}"
    );
    let cut = write("cut-windows.clip", &|b| b.truncate(payload_end + 1));
    assert!(py_fails(&["inspect", &cut]).contains("window area"));
    let cut = write("cut.clip", &|b| b.truncate(b.len() - 1));
    assert!(py_fails(&["inspect", &cut]).contains("truncated"));
    let short = write("short.clip", &|b| b.truncate(10));
    assert!(py_fails(&["inspect", &short]).contains("truncated"));
    // No startup profile: saying so is an error of the `profile` command only.
    assert!(py_fails(&["profile", index.to_str().unwrap()]).contains("carries no startup profile"));
    // A startup profile area cut short or damaged is refused, never read as another text.
    embed_profile(tmp.path(), &index);
    let good = std::fs::read(&index).unwrap();
    for (name, damage) in [("cut-area.clip", 0usize), ("flip-area.clip", 1)] {
        let mut b = good.clone();
        if damage == 0 {
            b.truncate(b.len() - 3);
        } else {
            *b.last_mut().unwrap() ^= 1;
        }
        let p = tmp.path().join(name);
        std::fs::write(&p, b).unwrap();
        let err = py_fails(&["inspect", p.to_str().unwrap()]);
        assert!(
            err.contains("startup profile area is damaged"),
            "{name}: {err}"
        );
    }
}
