//! clip-build end to end on the edge-case image: the merged tree, attributes, content,
//! checkpoints, a reference extraction by umoci, multi-platform choice, and bad input.

mod common;

use clip::format::{IndexFile, Kind, NONE};
use clip::read::FileReader;
use clip::source::layout::LayoutSource;
use common::*;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

fn entry_of(idx: &IndexFile, path: &str) -> u32 {
    idx.resolve(path.as_bytes())
        .unwrap()
        .unwrap_or_else(|| panic!("{path} missing from the index"))
}

fn absent(idx: &IndexFile, path: &str) {
    assert!(
        idx.resolve(path.as_bytes()).unwrap().is_none(),
        "{path} should be gone"
    );
}

fn content(idx: &IndexFile, src: &LayoutSource, path: &str) -> Vec<u8> {
    let i = entry_of(idx, path);
    let mut r = FileReader::new(idx, i).unwrap();
    let mut out = vec![0u8; r.size() as usize];
    let n = r.read_at(idx, src, &[], 0, &mut out).unwrap();
    assert_eq!(n, out.len());
    out
}

fn kind(idx: &IndexFile, path: &str) -> Kind {
    Kind::from_u8(idx.entry(entry_of(idx, path)).unwrap().kind).unwrap()
}

#[test]
fn edge_image_merges_with_oci_semantics() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index) = edge_index(tmp.path());
    let idx = IndexFile::open(&index).unwrap();
    idx.verify().unwrap();
    let src = LayoutSource::open(&layout).unwrap();

    // Whiteouts (file and directory), opaque directories, replacements.
    absent(&idx, "/var/lib/delete-me");
    absent(&idx, "/var/lib/gone");
    absent(&idx, "/data/text.txt");
    let opaque: Vec<Vec<u8>> = idx
        .children(entry_of(&idx, "/var/opaque"))
        .unwrap()
        .map(|c| idx.entry(c).unwrap().name.as_slice().to_vec())
        .collect();
    assert_eq!(opaque, vec![b"upper".to_vec()]);
    assert_eq!(content(&idx, &src, "/var/new-opaque/item"), b"new\n");
    assert_eq!(kind(&idx, "/var/becomes-file"), Kind::File);
    assert_eq!(content(&idx, &src, "/var/becomes-file"), b"now a file\n");
    absent(&idx, "/var/becomes-file/child");
    assert_eq!(kind(&idx, "/var/becomes-dir"), Kind::Dir);
    assert_eq!(content(&idx, &src, "/var/becomes-dir/inside"), b"inside\n");
    assert_eq!(kind(&idx, "/var/link-becomes-file"), Kind::File);
    assert_eq!(
        idx.entry(entry_of(&idx, "/var/chmod-me"))
            .unwrap()
            .mode
            .to_native(),
        0o600
    );
    assert_eq!(
        content(&idx, &src, "/usr/share-file"),
        b"layer two rewrote this\n"
    );
    assert_eq!(
        content(&idx, &src, "/etc/from-plain-tar"),
        b"uncompressed layer\n"
    );

    // Hardlinks: the surviving name of a whited-out original still works; a hardlink to a
    // copied-up file shares the new inode.
    absent(&idx, "/usr/bin/orig");
    assert_eq!(kind(&idx, "/usr/bin/second-name"), Kind::File);
    assert_eq!(
        idx.entry(entry_of(&idx, "/usr/bin/second-name"))
            .unwrap()
            .nlink
            .to_native(),
        1
    );
    assert_eq!(
        content(&idx, &src, "/usr/bin/second-name"),
        b"hardlinked content\n"
    );
    let tool = idx.inode_of(entry_of(&idx, "/usr/bin/tool")).unwrap();
    let tool_link = idx.inode_of(entry_of(&idx, "/usr/bin/tool-link")).unwrap();
    assert_eq!(tool, tool_link);
    assert_eq!(idx.entry(tool).unwrap().nlink.to_native(), 2);
    assert_eq!(
        content(&idx, &src, "/usr/bin/tool-link"),
        b"tool v2 copied up\n"
    );

    // Attributes.
    let e = |p: &str| idx.entry(entry_of(&idx, p)).unwrap();
    assert_eq!(e("/tmp").mode.to_native(), 0o1777);
    assert_eq!(e("/srv").mode.to_native(), 0o2775);
    assert_eq!(e("/usr/bin/su").mode.to_native(), 0o4755);
    let precise = e("/etc/precise");
    assert_eq!(
        (precise.mtime.to_native(), precise.mtime_nsec.to_native()),
        (1_700_000_000, 123_456_789)
    );
    assert_eq!(
        (precise.uid.to_native(), precise.gid.to_native()),
        (3_000_000, 3_000_001)
    );
    assert_eq!(e("/home/user/file").uid.to_native(), 1000);
    assert_eq!(kind(&idx, "/dev/null"), Kind::CharDevice);
    assert_eq!(
        (
            e("/dev/null").rdev_major.to_native(),
            e("/dev/null").rdev_minor.to_native()
        ),
        (1, 3)
    );
    assert_eq!(kind(&idx, "/dev/sda"), Kind::BlockDevice);
    assert_eq!(e("/dev/sda").rdev_major.to_native(), 8);
    assert_eq!(kind(&idx, "/dev/fifo"), Kind::Fifo);
    assert_eq!(
        e("/usr/bin/abs-link").link_target.as_slice(),
        b"/etc/hostname"
    );
    assert_eq!(
        e("/usr/bin/rel-link").link_target.as_slice(),
        b"../../etc/hostname"
    );
    let xattrs: BTreeMap<Vec<u8>, Vec<u8>> = idx
        .xattrs(entry_of(&idx, "/usr/bin/ping"))
        .unwrap()
        .iter()
        .map(|x| (x.name.as_slice().to_vec(), x.value.as_slice().to_vec()))
        .collect();
    assert_eq!(xattrs[&b"security.capability".to_vec()][..4], [1, 0, 0, 2]);
    assert_eq!(xattrs[&b"user.note".to_vec()], b"hello");
    assert_eq!(content(&idx, &src, "/etc/empty"), b"");
    assert_eq!(
        content(
            &idx,
            &src,
            "/unicode/h\u{e9}llo-w\u{f6}rld-\u{65e5}\u{672c}"
        ),
        b"utf-8 name\n"
    );
    let long = format!("/long/{}/{}", "d".repeat(90), "f".repeat(120));
    assert_eq!(content(&idx, &src, &long), b"long name\n");
    assert_eq!(idx.children(entry_of(&idx, "/many")).unwrap().len(), 60);

    // Synthesized parents get complete attributes.
    let implicit = e("/implicit/parent");
    assert_eq!(implicit.mode.to_native(), 0o755);
    assert_eq!(implicit.mtime.to_native(), 1_747_699_200);
    assert_eq!(implicit.nlink.to_native(), 3);

    // Every directory: nlink = 2 + subdirectories; children sorted and unique.
    for i in 0..idx.entry_count() {
        let d = idx.entry(i).unwrap();
        if d.kind != Kind::Dir as u8 {
            continue;
        }
        let kids: Vec<u32> = idx.children(i).unwrap().collect();
        let subdirs = kids
            .iter()
            .filter(|&&c| idx.entry(c).unwrap().kind == Kind::Dir as u8)
            .count() as u32;
        assert_eq!(
            d.nlink.to_native(),
            2 + subdirs,
            "nlink of {}",
            String::from_utf8_lossy(&idx.path_of(i).unwrap())
        );
    }
}

#[test]
fn large_files_have_checkpoints_and_random_reads_are_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index) = edge_index(tmp.path());
    let idx = IndexFile::open(&index).unwrap();
    let src = LayoutSource::open(&layout).unwrap();
    let i = entry_of(&idx, "/data/random.bin");
    let e = idx.entry(i).unwrap();
    let start = e.data_offset.to_native();
    let layer = idx.layer(0).unwrap();
    assert!(
        layer.checkpoints.len() >= 3,
        "layer 0 has only {} checkpoints",
        layer.checkpoints.len()
    );
    assert_eq!(layer.checkpoints[0].out_offset.to_native(), 0);
    let cp = idx
        .checkpoint_before(0, start)
        .unwrap()
        .unwrap()
        .out_offset
        .to_native();
    assert!(
        start - cp < 512 << 10,
        "nearest checkpoint is {} bytes before the large file",
        start - cp
    );
    // Incompressible data: deflate blocks are small, so the interval holds closely.
    let cps: Vec<u64> = layer
        .checkpoints
        .iter()
        .map(|c| c.out_offset.to_native())
        .collect();
    let inside: Vec<&u64> = cps
        .iter()
        .filter(|&&o| o > start && o < start + (5 << 20))
        .collect();
    assert!(
        inside.len() >= 2,
        "expected interval checkpoints inside the 5 MiB file: {cps:?}"
    );
    assert_eq!(idx.pieces(i).unwrap().len(), 5);

    let expected = clip::demo::noise(1, 5 << 20);
    assert_eq!(content(&idx, &src, "/data/random.bin"), expected);
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut r = FileReader::new(&idx, i).unwrap();
    for _ in 0..50 {
        let off = rng.gen_range(0..expected.len() as u64);
        let len = rng.gen_range(1..300_000usize);
        let mut buf = vec![0u8; len];
        let n = r.read_at(&idx, &src, &[], off, &mut buf).unwrap();
        let end = (off as usize + len).min(expected.len());
        assert_eq!(n, end - off as usize);
        assert_eq!(&buf[..n], &expected[off as usize..end], "range {off}+{len}");
    }
    // A read at a checkpoint-free offset inflates at most one interval plus a block.
    let mut fresh = FileReader::new(&idx, i).unwrap();
    let mut buf = vec![0u8; 4096];
    fresh.read_at(&idx, &src, &[], 4 << 20, &mut buf).unwrap();
    let (inflated, _) = fresh.origin_stats();
    assert!(
        inflated <= (2 << 20) + (1 << 20) + (256 << 10),
        "inflated {inflated} bytes for a 4 KiB read"
    );
}

#[test]
fn smaller_checkpoint_interval_gives_more_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = edge_layout(&tmp.path().join("layout"));
    let build = |interval: &str, out: &str| {
        let p = tmp.path().join(out);
        run(Command::new(bin("clip-build"))
            .arg(format!("{}:{EDGE_TAG}", layout.display()))
            .args([
                "-o",
                p.to_str().unwrap(),
                "--quiet",
                "--checkpoint-interval",
                interval,
            ]));
        IndexFile::open(&p).unwrap()
    };
    let count = |i: &IndexFile| i.layer(0).unwrap().checkpoints.len();
    let (fine, coarse) = (build("256K", "a.clip"), build("4M", "b.clip"));
    assert!(count(&fine) > 2 * count(&coarse));
    // Access profiles name intervals by checkpoint: the layout identity tells the two
    // indexes apart, and an index built again the same way from it.
    let again = build("4M", "c.clip");
    assert_ne!(fine.checkpoint_layout_id(), coarse.checkpoint_layout_id());
    assert_eq!(again.checkpoint_layout_id(), coarse.checkpoint_layout_id());
}

/// Walk an extracted rootfs: relative path → metadata.
fn walk(root: &Path) -> BTreeMap<String, std::fs::Metadata> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let rel = format!("/{}", e.path().strip_prefix(root).unwrap().display());
            if m.is_dir() {
                stack.push(e.path());
            }
            out.insert(rel, m);
        }
    }
    out
}

#[test]
fn index_matches_umoci_reference_extraction() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index) = edge_index(tmp.path());
    let rootfs = umoci_unpack(&layout, EDGE_TAG, &tmp.path().join("umoci"));
    let idx = IndexFile::open(&index).unwrap();
    let src = LayoutSource::open(&layout).unwrap();
    let reference = walk(&rootfs);
    let mut seen = 0;
    let mut inode_groups: HashMap<u64, Vec<u32>> = HashMap::new();
    for (path, m) in &reference {
        let i = idx
            .resolve(path.as_bytes())
            .unwrap()
            .unwrap_or_else(|| panic!("{path} is in umoci's extraction but not in the index"));
        seen += 1;
        let ino = idx.inode_of(i).unwrap();
        let e = idx.entry(ino).unwrap();
        let k = Kind::from_u8(e.kind).unwrap();
        let ft = m.file_type();
        let want = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_char_device() {
            Kind::CharDevice
        } else if ft.is_block_device() {
            Kind::BlockDevice
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            Kind::File
        };
        assert_eq!(k, want, "{path}: kind");
        if k != Kind::Symlink {
            assert_eq!(m.mode() & 0o7777, e.mode.to_native(), "{path}: mode");
        }
        assert_eq!(
            (m.uid(), m.gid()),
            (e.uid.to_native(), e.gid.to_native()),
            "{path}: owner"
        );
        if k != Kind::Dir {
            assert_eq!(
                (m.mtime(), m.mtime_nsec() as u32),
                (e.mtime.to_native(), e.mtime_nsec.to_native()),
                "{path}: mtime"
            );
        }
        match k {
            Kind::File => {
                assert_eq!(m.len(), e.size.to_native(), "{path}: size");
                assert_eq!(m.nlink() as u32, e.nlink.to_native(), "{path}: nlink");
                inode_groups.entry(m.ino()).or_default().push(ino);
                let data = std::fs::read(rootfs.join(&path[1..])).unwrap();
                assert!(data == content(&idx, &src, path), "{path}: content differs");
            }
            Kind::Symlink => {
                let t = std::fs::read_link(rootfs.join(&path[1..])).unwrap();
                assert_eq!(
                    t.as_os_str().as_encoded_bytes(),
                    e.link_target.as_slice(),
                    "{path}: target"
                );
            }
            Kind::CharDevice | Kind::BlockDevice => {
                let rdev = m.rdev();
                let (maj, min) = (
                    ((rdev >> 8) & 0xfff) as u32,
                    ((rdev & 0xff) | ((rdev >> 12) & 0xfff00)) as u32,
                );
                assert_eq!(
                    (maj, min),
                    (e.rdev_major.to_native(), e.rdev_minor.to_native()),
                    "{path}: rdev"
                );
            }
            Kind::Dir => {
                assert_eq!(m.nlink() as u32, e.nlink.to_native(), "{path}: dir nlink");
            }
            _ => {}
        }
        if k != Kind::Symlink {
            let mut got: Vec<(Vec<u8>, Vec<u8>)> = idx
                .xattrs(ino)
                .unwrap()
                .iter()
                .map(|x| (x.name.as_slice().to_vec(), x.value.as_slice().to_vec()))
                .collect();
            got.sort();
            let p = rootfs.join(&path[1..]);
            let mut want: Vec<(Vec<u8>, Vec<u8>)> = xattr::list(&p)
                .unwrap()
                .filter(|n| {
                    !n.to_string_lossy().starts_with("trusted.")
                        && !n.to_string_lossy().starts_with("security.selinux")
                })
                .map(|n| {
                    let v = xattr::get(&p, &n).unwrap().unwrap_or_default();
                    (n.as_encoded_bytes().to_vec(), v)
                })
                .collect();
            want.sort();
            assert_eq!(got, want, "{path}: xattrs");
        }
    }
    // Same inode in the extraction ⇔ same inode in the index.
    for (ino, group) in &inode_groups {
        assert!(
            group.windows(2).all(|w| w[0] == w[1]),
            "extraction inode {ino}: index inodes {group:?}"
        );
    }
    let index_inodes: std::collections::HashSet<u32> =
        inode_groups.values().map(|g| g[0]).collect();
    assert_eq!(
        index_inodes.len(),
        inode_groups.len(),
        "two extraction inodes map to one index inode"
    );
    assert_eq!(
        seen + 1,
        idx.entry_count() as usize,
        "the index has entries umoci did not extract"
    );
}

#[test]
fn platform_is_chosen_from_an_image_index() {
    use clip::demo::TarBuilder;
    use clip::oci::Platform;
    use clip::source::layout::{LayerInput, LayoutWriter};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("multi");
    let mut w = LayoutWriter::create(&dir).unwrap();
    let mut manifests = Vec::new();
    for (p, marker) in [("linux/amd64", "amd64"), ("linux/arm64/v8", "arm64")] {
        let mut t = TarBuilder::new();
        t.file("arch", 0o644, marker.as_bytes());
        manifests.push(
            w.image(
                &[LayerInput::gzip(t.finish())],
                &Platform::parse(p).unwrap(),
                "2025-05-20T00:00:00Z",
            )
            .unwrap(),
        );
    }
    let idx_desc = w.image_index(manifests).unwrap();
    w.tag(idx_desc, "multi");
    w.finish().unwrap();
    for (platform, marker) in [("linux/arm64", "arm64"), ("linux/amd64", "amd64")] {
        let out = tmp.path().join(format!("{marker}.clip"));
        run(Command::new(bin("clip-build"))
            .arg(format!("{}:multi", dir.display()))
            .args([
                "-o",
                out.to_str().unwrap(),
                "--quiet",
                "--platform",
                platform,
            ]));
        let cat = run(Command::new(bin("clip-build"))
            .arg("cat")
            .arg(&out)
            .arg("/arch"));
        assert_eq!(cat, marker.as_bytes());
    }
    let out = Command::new(bin("clip-build"))
        .arg(format!("{}:multi", dir.display()))
        .args([
            "-o",
            tmp.path().join("x.clip").to_str().unwrap(),
            "--platform",
            "linux/s390x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("linux/s390x") && err.contains("linux/arm64/v8") && err.contains("--platform"),
        "{err}"
    );
}

/// Build a one-layer layout from raw tar bytes (or a raw blob) and run clip-build on it;
/// returns the error text (the build must fail).
fn build_fails(tmp: &Path, name: &str, tar: Vec<u8>, blob: Option<Vec<u8>>) -> String {
    use clip::oci::Platform;
    use clip::source::layout::{LayerInput, LayoutWriter};
    let dir = tmp.join(name);
    let mut w = LayoutWriter::create(&dir).unwrap();
    let m = w
        .image(
            &[LayerInput {
                tar,
                gzip: true,
                blob,
            }],
            &Platform::host(),
            "2025-05-20T00:00:00Z",
        )
        .unwrap();
    w.tag(m, "bad");
    w.finish().unwrap();
    let out = Command::new(bin("clip-build"))
        .arg(format!("{}:bad", dir.display()))
        .args([
            "-o",
            tmp.join(format!("{name}.clip")).to_str().unwrap(),
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{name}: clip-build accepted bad input"
    );
    assert!(
        !tmp.join(format!("{name}.clip")).exists(),
        "{name}: an index was written"
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{name}: {err}");
    err
}

fn raw_tar(path: &[u8], size_field: u64, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..path.len()].copy_from_slice(path);
    h.set_mode(0o644);
    h.set_size(size_field);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

#[test]
fn malicious_and_corrupt_input_is_rejected_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let err = build_fails(
        tmp.path(),
        "escape",
        raw_tar(b"../../etc/passwd", 4, b"evil"),
        None,
    );
    assert!(
        err.contains("escape") && err.contains("../../etc/passwd"),
        "{err}"
    );
    let err = build_fails(
        tmp.path(),
        "absurd",
        raw_tar(b"big", 1 << 40, b"tiny"),
        None,
    );
    assert!(err.contains("layer sha256:"), "{err}");
    // The tar crate reads PAX extension data whole: a header claiming a gigabyte (a few
    // megabytes of gzipped zeros would do) is refused before any of it is read.
    let mut pax = tar::Header::new_ustar();
    pax.set_path("PaxHeaders/big").unwrap();
    pax.set_entry_type(tar::EntryType::XHeader);
    pax.set_size(1 << 30);
    pax.set_cksum();
    let mut bomb = pax.as_bytes().to_vec();
    bomb.resize(64 << 10, 0);
    let err = build_fails(tmp.path(), "pax-bomb", bomb, None);
    assert!(
        err.contains("PAX extended header of 1073741824 bytes"),
        "{err}"
    );

    // Paths and names longer than Linux takes (an extraction fails on them; a million `a/`
    // components would be a million directories in memory from 2 MB of tar).
    let mut t = clip::demo::TarBuilder::new();
    t.file(&"a/".repeat(3000), 0o644, b"deep\n");
    let err = build_fails(tmp.path(), "deep-path", t.finish(), None);
    assert!(err.contains("longer than 4095 bytes"), "{err}");
    assert!(
        err.contains("… (6000 bytes)") && err.len() < 1000,
        "the path is cut in the message: {err}"
    );
    let mut t = clip::demo::TarBuilder::new();
    t.file(&format!("d/{}", "n".repeat(256)), 0o644, b"long name\n");
    let err = build_fails(tmp.path(), "long-name", t.finish(), None);
    assert!(err.contains("longer than 255 bytes"), "{err}");
    let mut t = clip::demo::TarBuilder::new();
    t.link(tar::EntryType::Symlink, "far", &"x/".repeat(2100));
    let err = build_fails(tmp.path(), "long-target", t.finish(), None);
    assert!(
        err.contains("symlink target longer than 4095 bytes"),
        "{err}"
    );

    let mut t = clip::demo::TarBuilder::new();
    t.pax_file(
        "big-xattr",
        0o644,
        b"x\n",
        &[("SCHILY.xattr.user.big", &vec![b'v'; (64 << 10) + 1])],
    );
    let err = build_fails(tmp.path(), "big-xattr", t.finish(), None);
    assert!(
        err.contains("user.big") && err.contains("65537 bytes"),
        "{err}"
    );

    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Char);
    h.set_mode(0o600);
    h.set_size(0);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_device_major(5000).unwrap();
    h.set_device_minor(1).unwrap();
    let mut t = clip::demo::TarBuilder::new();
    t.raw(&mut h, "dev/odd", b"");
    let err = build_fails(tmp.path(), "big-major", t.finish(), None);
    assert!(err.contains("device 5000:1"), "{err}");

    // A file used as a directory (directly, or through a symlink) fails the build, as it
    // fails an extraction by containerd or umoci.
    let mut t = clip::demo::TarBuilder::new();
    t.file("f", 0o644, b"a file\n")
        .link(tar::EntryType::Symlink, "to-f", "f")
        .file("to-f/child", 0o644, b"x\n");
    let err = build_fails(tmp.path(), "file-as-dir", t.finish(), None);
    assert!(
        err.contains("entry /to-f/child: /to-f is not a directory"),
        "{err}"
    );

    let mut t = clip::demo::TarBuilder::new();
    t.file("data", 0o644, &clip::demo::noise(3, 1 << 20));
    let tar = t.finish();
    let mut gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    };
    let mid = gz.len() / 2;
    for b in &mut gz[mid..mid + 64] {
        *b ^= 0x5a;
    }
    let err = build_fails(tmp.path(), "corrupt-gzip", tar.clone(), Some(gz));
    assert!(err.contains("layer sha256:"), "{err}");
    // Right gzip, wrong diff_id: gzip the tar with an extra trailing block.
    let mut other = tar.clone();
    other.extend_from_slice(&[0u8; 512]);
    let gz2 = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(&other).unwrap();
        e.finish().unwrap()
    };
    let err = build_fails(tmp.path(), "diff-id", tar, Some(gz2));
    assert!(err.contains("diff_id"), "{err}");
}

/// A sparse file as GNU tar writes it (`tar --sparse`) is refused with what to do, in
/// every sparse format: in the PAX ones the entry looks like a regular file under a made-up
/// name whose data is a segment map, so indexing it would serve wrong bytes at a wrong path.
#[test]
fn sparse_files_are_refused_not_served_wrong() {
    use std::io::{Seek, SeekFrom, Write};
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    let mut f = std::fs::File::create(src.join("d/holes")).unwrap();
    f.seek(SeekFrom::Start(5 << 20)).unwrap();
    f.write_all(b"data between holes").unwrap();
    f.seek(SeekFrom::Start(9 << 20)).unwrap();
    f.write_all(b"tail").unwrap();
    drop(f);
    for (format, version) in [
        ("gnu", None),
        ("pax", Some("0.0")),
        ("pax", Some("0.1")),
        ("pax", Some("1.0")),
    ] {
        let mut tar = Command::new("tar");
        tar.args(["--sparse", &format!("--format={format}"), "-C"])
            .arg(&src)
            .args(["-cf", "-", "d"]);
        if let Some(v) = version {
            tar.arg(format!("--sparse-version={v}"));
        }
        let out = tar.output().expect("GNU tar runs");
        assert!(
            out.status.success(),
            "tar --format={format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let name = format!("sparse-{format}-{}", version.unwrap_or("old"));
        let err = build_fails(tmp.path(), &name, out.stdout, None);
        assert!(
            err.contains("a sparse file")
                && err.contains("without --sparse")
                && err.contains("holes"),
            "{name}: {err}"
        );
        assert!(
            !tmp.path().join(format!("{name}.clip")).exists(),
            "{name}: an index was written"
        );
    }
}

/// A hardlink to a symlink (or a device or FIFO) is indexed as a copy of it: same kind,
/// target and attributes, but an inode of its own (format-spec 7.3: only regular files
/// share inodes). Linux would show one inode with two links.
#[test]
fn a_hardlink_to_a_symlink_is_a_copy_of_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = clip::demo::TarBuilder::new();
    t.file("target", 0o644, b"t\n")
        .link(tar::EntryType::Symlink, "sym", "target")
        .link(tar::EntryType::Link, "second-name", "sym")
        .link(tar::EntryType::Link, "file-link", "target");
    let index = tmp.path().join("i.clip");
    one_layer_image(
        t.finish(),
        "2025-05-20T00:00:00Z",
        &tmp.path().join("l"),
        "t",
        &index,
    );
    let idx = IndexFile::open(&index).unwrap();
    idx.verify().unwrap();
    for path in ["/sym", "/second-name"] {
        let i = entry_of(&idx, path);
        let e = idx.entry(i).unwrap();
        assert_eq!(kind(&idx, path), Kind::Symlink, "{path}");
        assert_eq!(e.link_target.as_slice(), b"target", "{path}");
        assert_eq!(
            (e.nlink.to_native(), idx.inode_of(i).unwrap()),
            (1, i),
            "{path}"
        );
    }
    // Regular files still share one inode.
    let (a, b) = (entry_of(&idx, "/target"), entry_of(&idx, "/file-link"));
    assert_eq!(idx.inode_of(b).unwrap(), idx.inode_of(a).unwrap());
    assert_eq!(
        idx.entry(idx.inode_of(a).unwrap())
            .unwrap()
            .nlink
            .to_native(),
        2
    );
}

#[test]
fn tampered_blob_fails_its_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = edge_layout(&tmp.path().join("layout"));
    // Find the plain-tar layer (the only uncompressed blob) and flip one byte inside it.
    let idx: clip::oci::Manifest = {
        let (_, bytes, _) = {
            use clip::source::Source;
            LayoutSource::open(&layout)
                .unwrap()
                .manifest(EDGE_TAG)
                .unwrap()
        };
        serde_json::from_slice(&bytes).unwrap()
    };
    let plain = idx
        .layers
        .iter()
        .find(|l| l.media_type.ends_with(".tar"))
        .unwrap();
    let p = layout
        .join("blobs/sha256")
        .join(plain.digest.trim_start_matches("sha256:"));
    let mut b = std::fs::read(&p).unwrap();
    b[600] ^= 1;
    std::fs::write(&p, b).unwrap();
    let out = Command::new(bin("clip-build"))
        .arg(format!("{}:{EDGE_TAG}", layout.display()))
        .args(["-o", tmp.path().join("t.clip").to_str().unwrap(), "--quiet"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&plain.digest) && err.contains("does not match"),
        "{err}"
    );
}

#[test]
fn corrupt_index_files_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, index) = edge_index(tmp.path());
    let good = std::fs::read(&index).unwrap();
    let check = |bytes: &[u8], needle: &str| {
        let p = tmp.path().join("bad.clip");
        std::fs::write(&p, bytes).unwrap();
        let out = Command::new(bin("clip-build"))
            .arg("inspect")
            .arg(&p)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "expected {needle:?} in {err}"
        );
    };
    check(&good[..good.len() / 2], "truncated");
    check(&good[..10], "truncated");
    check(
        b"not an index at all, just some text that is long enough for a header....",
        "not a clip index",
    );
    let mut v = good.clone();
    v[8] = 1;
    check(&v, "version 1.0 is not supported");
    let mut c = good.clone();
    let payload_end = 64 + u64::from_le_bytes(good[24..32].try_into().unwrap()) as usize;
    c[payload_end - 100] ^= 0xff;
    check(&c, "checksum");
    assert!(IndexFile::open(&index).unwrap().entry(NONE).is_err());
}

/// A source whose layer blobs never end (the real bytes, then zeros forever).
struct Endless {
    inner: LayoutSource,
    layers: Vec<String>,
}

impl clip::source::Source for Endless {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn manifest(
        &self,
        reference: &str,
    ) -> Result<(String, Vec<u8>, String), clip::source::SourceError> {
        self.inner.manifest(reference)
    }
    fn blob(
        &self,
        digest: &str,
        start: u64,
        end: Option<u64>,
    ) -> Result<Box<dyn std::io::Read + Send>, clip::source::SourceError> {
        use std::io::Read;
        let b = self.inner.blob(digest, start, end)?;
        Ok(match self.layers.iter().any(|l| l == digest) {
            true => Box::new(b.chain(std::io::repeat(0))),
            false => b,
        })
    }
}

/// A source that keeps sending past a layer's size cannot keep the build going: the blob
/// is read one byte past the size its manifest gives, then refused.
#[test]
fn a_layer_blob_longer_than_its_manifest_says_is_refused() {
    use clip::source::Source;
    let tmp = tempfile::tempdir().unwrap();
    let layout = edge_layout(&tmp.path().join("layout"));
    let inner = LayoutSource::open(&layout).unwrap();
    let (_, bytes, _) = inner.manifest(EDGE_TAG).unwrap();
    let m: clip::oci::Manifest = serde_json::from_slice(&bytes).unwrap();
    let src = Endless {
        inner,
        layers: m.layers.iter().map(|l| l.digest.clone()).collect(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = clip::build::build(&src, EDGE_TAG, &Default::default()).map(|_| ());
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    let err = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the build of an endless blob must stop")
        .expect_err("an endless blob must not index");
    assert!(err.contains("does not match its digest"), "{err}");
}
