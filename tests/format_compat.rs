//! Versioning and robustness rules of `format-spec/README.md` section 9, checked against
//! the Rust reader: unknown major versions and flags are refused with clear messages,
//! higher minors are accepted, a damaged or truncated file is an error, and no corrupted
//! byte anywhere makes the reader panic.

mod common;

use clip::format::{FormatError, IndexFile};
use common::{bin, run};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;

/// A small real index: the demo image.
fn demo_bytes(tmp: &Path) -> Vec<u8> {
    let layout = tmp.join("demo");
    let index = tmp.join("demo.clip");
    run(Command::new(bin("clip-build")).arg("demo").arg(&layout));
    run(Command::new(bin("clip-build"))
        .arg(format!("{}:demo", layout.display()))
        .arg("-o")
        .arg(&index)
        .arg("-q"));
    std::fs::read(index).unwrap()
}

fn patched(good: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = good.to_vec();
    f(&mut b);
    b
}

fn open_err(bytes: &[u8]) -> FormatError {
    match IndexFile::from_bytes(bytes) {
        Ok(_) => panic!("a damaged index opened without error"),
        Err(e) => e,
    }
}

/// Recompute the header checksum after patching the payload (what a buggy or hostile
/// writer would produce), so the damage reaches the structural checks.
fn reseal(b: &mut [u8]) {
    let len = u64::from_le_bytes(b[24..32].try_into().unwrap()) as usize;
    let sum = xxhash_rust::xxh3::xxh3_64(&b[64..64 + len]);
    b[32..40].copy_from_slice(&sum.to_le_bytes());
}

#[test]
fn unknown_major_version_is_refused_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let good = demo_bytes(tmp.path());
    for major in [0u16, 1, 3, 0xffff] {
        let b = patched(&good, |b| b[8..10].copy_from_slice(&major.to_le_bytes()));
        let e = open_err(&b);
        assert!(
            matches!(e, FormatError::UnsupportedVersion { found_major, found_minor: 0 } if found_major == major),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("version {major}.0 is not supported")),
            "{msg}"
        );
        assert!(msg.contains("reads version 2.x"), "{msg}");
    }
    // Through the command line too, as a user sees it: an index of format version 1
    // (windows inside the payload) is refused with what to do.
    let p = tmp.path().join("v1.clip");
    std::fs::write(&p, patched(&good, |b| b[8] = 1)).unwrap();
    let out = Command::new(bin("clip-build"))
        .arg("inspect")
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("index format version 1.0 is not supported")
            && err.contains("rebuild the index"),
        "{err}"
    );
}

#[test]
fn higher_minor_version_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let good = demo_bytes(tmp.path());
    for minor in [1u16, 9, 0xffff] {
        let b = patched(&good, |b| b[10..12].copy_from_slice(&minor.to_le_bytes()));
        let idx = IndexFile::from_bytes(&b).unwrap_or_else(|e| panic!("minor {minor}: {e}"));
        assert_eq!(idx.header().version_minor, minor);
        idx.verify().unwrap();
        assert_eq!(
            idx.resolve(b"/usr/bin/hello").unwrap(),
            idx.resolve(b"usr/bin/hello").unwrap()
        );
    }
}

#[test]
fn unknown_flags_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let good = demo_bytes(tmp.path());
    for bit in [0u32, 1, 7, 31] {
        let b = patched(&good, |b| {
            b[12..16].copy_from_slice(&(1u32 << bit).to_le_bytes())
        });
        let e = open_err(&b);
        assert!(
            matches!(e, FormatError::UnknownFlags(f) if f == 1 << bit),
            "{e:?}"
        );
        assert!(e.to_string().contains("unknown feature flags"), "{e}");
    }
}

#[test]
fn bad_magic_reserved_and_payload_offset_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let good = demo_bytes(tmp.path());
    let e = open_err(&patched(&good, |b| b[0..8].copy_from_slice(b"GIF89a\0\0")));
    assert!(matches!(e, FormatError::BadMagic(_)), "{e:?}");
    assert!(e.to_string().contains("not a clip index"), "{e}");
    for at in 56..64 {
        let e = open_err(&patched(&good, |b| b[at] = 1));
        assert!(
            matches!(
                e,
                FormatError::BadField {
                    field: "reserved",
                    ..
                }
            ),
            "byte {at}: {e:?}"
        );
    }
    let e = open_err(&patched(&good, |b| b[16] = 72));
    assert!(
        matches!(
            e,
            FormatError::BadField {
                field: "payload_offset",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn checksum_mismatch_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let good = demo_bytes(tmp.path());
    // The header's checksum itself.
    let e = open_err(&patched(&good, |b| b[32] ^= 0x40));
    assert!(matches!(e, FormatError::Checksum { .. }), "{e:?}");
    assert!(e.to_string().contains("payload checksum"), "{e}");
    // One bit anywhere in the payload: first byte, middle, the root object at its end.
    let payload_end = 64 + u64::from_le_bytes(good[24..32].try_into().unwrap()) as usize;
    for at in [64, payload_end / 2, payload_end - 1] {
        let e = open_err(&patched(&good, |b| b[at] ^= 1));
        assert!(
            matches!(e, FormatError::Checksum { .. }),
            "byte {at}: {e:?}"
        );
    }
}

#[test]
fn header_counts_must_match_the_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let good = demo_bytes(tmp.path());
    let e = open_err(&patched(&good, |b| b[40] += 1));
    assert!(e.to_string().contains("entries"), "{e}");
    let e = open_err(&patched(&good, |b| b[44] += 1));
    assert!(e.to_string().contains("layers"), "{e}");
}

#[test]
fn truncated_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let good = demo_bytes(tmp.path());
    for len in [0, 1, 8, 63] {
        let e = open_err(&good[..len]);
        assert!(
            matches!(e, FormatError::Truncated { what: "header", .. }),
            "{len}: {e:?}"
        );
        assert!(e.to_string().contains("truncated"), "{e}");
    }
    let payload_end = 64 + u64::from_le_bytes(good[24..32].try_into().unwrap()) as usize;
    assert!(payload_end < good.len(), "the demo index has a window area");
    for len in [
        64,
        65,
        100,
        payload_end / 2,
        payload_end - 8,
        payload_end - 1,
    ] {
        let e = open_err(&good[..len]);
        assert!(
            matches!(
                e,
                FormatError::Truncated {
                    what: "payload",
                    ..
                }
            ),
            "{len}: {e:?}"
        );
    }
    for len in [payload_end, payload_end + 1, good.len() - 1] {
        let e = open_err(&good[..len]);
        assert!(
            matches!(
                e,
                FormatError::Truncated {
                    what: "window area",
                    ..
                }
            ),
            "{len}: {e:?}"
        );
    }
    // A payload_len or windows_len that overflows when added to the offset.
    let e = open_err(&patched(&good, |b| {
        b[24..32].copy_from_slice(&u64::MAX.to_le_bytes())
    }));
    assert!(matches!(e, FormatError::Truncated { .. }), "{e:?}");
    let e = open_err(&patched(&good, |b| {
        b[48..56].copy_from_slice(&u64::MAX.to_le_bytes())
    }));
    assert!(
        matches!(
            e,
            FormatError::Truncated {
                what: "window area",
                ..
            }
        ),
        "{e:?}"
    );
    // Through the command line, on a file on disk (mmap path).
    let p = tmp.path().join("cut.clip");
    std::fs::write(&p, &good[..good.len() - 100]).unwrap();
    let e = IndexFile::open(&p).err().expect("truncated file opened");
    assert!(e.to_string().contains("index is truncated"), "{e}");
    // Trailing bytes after the window area are ignored (the header says where it ends).
    let mut longer = good.clone();
    longer.extend_from_slice(&[0xAA; 24]);
    IndexFile::from_bytes(&longer).unwrap().verify().unwrap();
}

/// `good` with a startup profile of two intervals of its image (format 2.1).
fn with_startup_profile(good: Vec<u8>) -> Vec<u8> {
    let idx = IndexFile::from_bytes(&good).unwrap();
    let (manifest, layout) = clip::profile::image_of(&idx);
    let text =
        format!("clip-profile 3\nmanifest {manifest}\nlayout {layout:016x}\n0 0 100 0\n1 0 50 0\n");
    clip::format::write::with_startup_profile(good, Some(text.as_bytes()))
}

/// Use every accessor and report on an index that passed `verify`: none may panic.
fn exercise(idx: &IndexFile) {
    let _ = clip::report::inspect_text(idx);
    let _ = clip::profile::Profile::embedded(idx);
    let _ = clip::report::ls(idx, 0, true);
    for i in 0..idx.entry_count() {
        let _ = clip::report::stat(idx, i);
        let _ = idx.pieces(i);
        let _ = idx.inode_of(i);
        let _ = idx.xattrs(i);
        if let Ok(p) = idx.path_of(i) {
            let _ = idx.resolve(&p);
        }
    }
    for l in 0..idx.index().layers.len() as u32 {
        let _ = idx.checkpoint_before(l, 0);
        let _ = idx.checkpoint_before(l, u64::MAX);
        for k in 0..idx.index().layers[l as usize].checkpoints.len() + 1 {
            let _ = idx.stored_window(l, k);
        }
    }
}

/// The window area is outside the payload checksum, so a damaged window still opens; the
/// damage is found when that window is used (and by `verify`), never served as bytes.
#[test]
fn a_damaged_window_is_refused_when_used() {
    let tmp = tempfile::tempdir().unwrap();
    let good = demo_bytes(tmp.path());
    let payload_end = 64 + u64::from_le_bytes(good[24..32].try_into().unwrap()) as usize;
    let b = patched(&good, |b| b[payload_end + 100] ^= 0x10);
    let idx = IndexFile::from_bytes(&b).expect("the payload is intact");
    let (layer, k) = (0..idx.index().layers.len() as u32)
        .flat_map(|l| (0..idx.index().layers[l as usize].checkpoints.len()).map(move |k| (l, k)))
        .find(|&(l, k)| idx.stored_window(l, k).is_err())
        .expect("some window covers the damaged byte");
    let e = idx.stored_window(layer, k).unwrap_err();
    assert!(matches!(e, FormatError::Window { .. }), "{e:?}");
    assert!(
        e.to_string().contains("does not match its checksum") && e.to_string().contains("rebuild"),
        "{e}"
    );
    let e = idx.verify().unwrap_err();
    assert!(matches!(e, FormatError::Window { .. }), "{e:?}");
    // A window area cut short (header and file agree): the last window lies outside it.
    let b = patched(&good, |b| {
        let wlen = u64::from_le_bytes(b[48..56].try_into().unwrap()) - 1;
        b[48..56].copy_from_slice(&wlen.to_le_bytes());
        b.pop();
    });
    let idx = IndexFile::from_bytes(&b).expect("header and file size agree");
    let e = idx.verify().unwrap_err();
    assert!(
        e.to_string().contains("lies outside the window area"),
        "{e}"
    );
}

/// Every byte of a small index, damaged two ways, both with the checksum left alone and
/// with the checksum recomputed: `open` gives Ok or Err, and when it gives Ok, every
/// accessor runs (as `clip-build inspect`, `ls`, `stat` and `cat` use them, without the
/// tree checks of `verify`), then `verify` returns Ok or Err. Nothing panics or crashes:
/// before opening checked the payload's structure, a resealed file made those commands
/// follow pointers out of the file (SIGSEGV).
#[test]
fn no_corrupted_byte_causes_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let good = with_startup_profile(demo_bytes(tmp.path()));
    let profile = clip::profile::Profile::embedded(&IndexFile::from_bytes(&good).unwrap());
    assert_eq!(profile.unwrap().unwrap().intervals.len(), 2);
    assert!(
        good.len() < 64 * 1024,
        "the demo index is small: {}",
        good.len()
    );
    let (mut opened, mut verified) = (0, 0);
    for at in 0..good.len() {
        for (mask, reseal_it) in [(0x01u8, false), (0xffu8, true), (0x80u8, true)] {
            let mut b = good.clone();
            b[at] ^= mask;
            if reseal_it && at >= 64 {
                reseal(&mut b);
            }
            let r = catch_unwind(AssertUnwindSafe(|| {
                if let Ok(idx) = IndexFile::from_bytes(&b) {
                    opened += 1;
                    exercise(&idx);
                    if idx.verify().is_ok() {
                        verified += 1;
                    }
                }
            }));
            assert!(r.is_ok(), "byte {at} xor {mask:#04x} (checksum recomputed: {reseal_it}) made the reader panic");
        }
    }
    // Some damage is harmless (a mode bit, a timestamp) and must still open.
    assert!(
        opened > 0 && verified > 0,
        "opened {opened}, verified {verified}"
    );
}

/// Payload offset of field `at` of entry `i` (entries are 136 bytes; the root object,
/// 88 bytes at the end of the payload, holds the entry vector at offset 56).
fn entry_field(b: &[u8], i: usize, at: usize) -> usize {
    let plen = u64::from_le_bytes(b[24..32].try_into().unwrap()) as usize;
    let vec = plen - 88 + 56;
    let rel = i32::from_le_bytes(b[64 + vec..64 + vec + 4].try_into().unwrap());
    64 + (vec as i64 + rel as i64) as usize + 136 * i + at
}

/// A resealed index whose root lists itself among its children (`first_child` 0): a
/// recursive listing used to follow it forever. Both readers refuse the directory instead.
#[test]
fn a_directory_listing_itself_as_child_is_an_error_not_a_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let good = demo_bytes(tmp.path());
    let bad = patched(&good, |b| {
        let at = entry_field(b, 0, 76);
        assert_ne!(
            b[at..at + 4],
            [0, 0, 0, 0],
            "the root's first child is not 0"
        );
        b[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
        reseal(b);
    });
    let idx = IndexFile::from_bytes(&bad).expect("the structure is intact");
    let e = clip::report::ls(&idx, 0, true).unwrap_err();
    assert!(e.to_string().contains("children of entry 0"), "{e}");
    assert!(idx.verify().is_err());

    let path = tmp.path().join("loop.clip");
    std::fs::write(&path, &bad).unwrap();
    let out = Command::new(bin("clip-build"))
        .args(["ls", "-R"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("children of entry 0"), "{err}");
    common::require_tool("python3");
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/clipread.py"))
        .args(["ls", "-R"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("Traceback"), "{err}");
    assert!(err.contains("children of entry 0"), "{err}");
}
