//! clip-serve through real FUSE mounts (needs root, /dev/fuse and fusermount3): the mounted
//! tree against a reference extraction, a static busybox run in a chroot, overlayfs on top,
//! concurrent reads, handle/memory stability, the disk cache, stale mounts and shutdown.

mod common;

use clip::demo::{noise, TarBuilder};
use clip::format::IndexFile;
use common::{
    bin, busybox_index, edge_index, is_mounted, plain, require_fuse, require_tool, run, sha256_hex,
    umoci_unpack, Served, EDGE_TAG,
};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Every path below `root` (relative, without the root itself), sorted.
fn walk(root: &Path) -> BTreeSet<PathBuf> {
    fn rec(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())) {
            let e = e.unwrap();
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap().to_path_buf());
            if e.file_type().unwrap().is_dir() {
                rec(root, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    rec(root, root, &mut out);
    out
}

/// The `user.*` and `security.capability` extended attributes of `p` (via getfattr), as
/// name -> hex value.
fn xattrs(p: &Path) -> BTreeMap<String, String> {
    require_tool("getfattr");
    let out = run(Command::new("getfattr")
        .args(["--absolute-names", "-d", "-m", "-", "-e", "hex"])
        .arg(p));
    String::from_utf8(out)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(n, _)| n.starts_with("user.") || *n == "security.capability")
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// Directories that appear as entries in some layer of the edge image (the others are
/// parents the extractor had to synthesize, whose mtimes are not in the image).
fn explicit_dirs() -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for layer in common::edge_layers() {
        let mut ar = tar::Archive::new(&layer[..]);
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            if e.header().entry_type() == tar::EntryType::Directory {
                let p = e.path().unwrap().into_owned();
                out.insert(p.components().filter(|c| c.as_os_str() != ".").collect());
            }
        }
    }
    out
}

#[test]
fn mounted_edge_image_matches_umoci_extraction() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index) = edge_index(tmp.path());
    fs::create_dir(tmp.path().join("ref")).unwrap();
    let reference = umoci_unpack(&layout, EDGE_TAG, &tmp.path().join("ref"));
    let served = Served::start(tmp.path(), "mnt", &index, &tmp.path().join("cache"), &[]);
    let mnt = &served.mnt;
    let explicit = explicit_dirs();

    let want = walk(&reference);
    let got = walk(mnt);
    assert_eq!(
        got, want,
        "the mounted tree has different paths than the reference"
    );
    assert!(
        want.len() > 100,
        "the edge image should have many entries, got {}",
        want.len()
    );

    let mut ref_inodes: HashMap<u64, PathBuf> = HashMap::new();
    let mut mnt_inodes: HashMap<u64, PathBuf> = HashMap::new();
    let mut bad = Vec::new();
    let mut check = |what: &str, rel: &Path, got: String, want: String| {
        if got != want {
            bad.push(format!(
                "{}: {what}: mount has {got}, reference has {want}",
                rel.display()
            ));
        }
    };
    for rel in std::iter::once(PathBuf::new()).chain(want.iter().cloned()) {
        let (r, m) = (reference.join(&rel), mnt.join(&rel));
        let (rm, mm) = (
            fs::symlink_metadata(&r).unwrap(),
            fs::symlink_metadata(&m).unwrap(),
        );
        check(
            "mode",
            &rel,
            format!("{:o}", mm.mode()),
            format!("{:o}", rm.mode()),
        );
        check(
            "owner",
            &rel,
            format!("{}:{}", mm.uid(), mm.gid()),
            format!("{}:{}", rm.uid(), rm.gid()),
        );
        // umoci leaves the rootfs directory itself and the parents it had to create (not in
        // any layer) with the extraction time; every other mtime comes from the image.
        let synthesized = rm.is_dir() && (rel.as_os_str().is_empty() || !explicit.contains(&rel));
        if !synthesized {
            check(
                "mtime",
                &rel,
                format!("{}.{:09}", mm.mtime(), mm.mtime_nsec()),
                format!("{}.{:09}", rm.mtime(), rm.mtime_nsec()),
            );
        }
        check(
            "nlink",
            &rel,
            mm.nlink().to_string(),
            rm.nlink().to_string(),
        );
        let ft = rm.file_type();
        if ft.is_dir() {
            check("directory size", &rel, mm.size().to_string(), "4096".into());
        } else {
            check("size", &rel, mm.size().to_string(), rm.size().to_string());
            check(
                "blocks",
                &rel,
                mm.blocks().to_string(),
                mm.size().div_ceil(512).to_string(),
            );
        }
        // Regular files report the 1 MiB cache piece as their I/O size (see
        // `fuse::attr::FILE_BLKSIZE`), the rest 4096.
        let blksize = if ft.is_file() { 1 << 20 } else { 4096 };
        check(
            "blksize",
            &rel,
            mm.blksize().to_string(),
            blksize.to_string(),
        );
        if ft.is_symlink() {
            check(
                "symlink target",
                &rel,
                format!("{:?}", fs::read_link(&m).unwrap()),
                format!("{:?}", fs::read_link(&r).unwrap()),
            );
        }
        if ft.is_char_device() || ft.is_block_device() {
            check(
                "rdev",
                &rel,
                format!("{:#x}", mm.rdev()),
                format!("{:#x}", rm.rdev()),
            );
        }
        if ft.is_file() {
            let same = fs::read(&m).unwrap() == fs::read(&r).unwrap();
            check(
                "content",
                &rel,
                if same {
                    "same bytes"
                } else {
                    "different bytes"
                }
                .into(),
                "same bytes".into(),
            );
            // Hardlink identity: two names share an inode in the mount iff they do in the
            // reference.
            let prev_ref = ref_inodes.insert(rm.ino(), rel.clone());
            let prev_mnt = mnt_inodes.insert(mm.ino(), rel.clone());
            check(
                "same inode as",
                &rel,
                format!("{prev_mnt:?}"),
                format!("{prev_ref:?}"),
            );
        }
        if !ft.is_symlink() {
            check(
                "xattrs",
                &rel,
                format!("{:?}", xattrs(&m)),
                format!("{:?}", xattrs(&r)),
            );
        }
    }
    assert!(
        bad.is_empty(),
        "{} differences:\n{}",
        bad.len(),
        bad.join("\n")
    );
    let files = want
        .iter()
        .filter(|p| mnt.join(p).symlink_metadata().unwrap().is_file())
        .count();
    assert!(
        mnt_inodes.len() < files,
        "the edge image has hardlinks; none were seen"
    );

    let ping = xattrs(&mnt.join("usr/bin/ping"));
    assert_eq!(
        ping.keys().collect::<Vec<_>>(),
        ["security.capability", "user.note"],
        "xattrs of ping"
    );
    let caps = run(Command::new("getcap").arg(mnt.join("usr/bin/ping")));
    assert!(
        String::from_utf8_lossy(&caps).contains("cap_net_raw"),
        "getcap output: {}",
        String::from_utf8_lossy(&caps)
    );

    // A name some entry carries is missing (ENODATA) elsewhere; a name no entry carries
    // (here: SELinux labels and POSIX ACLs) is unsupported, which `ls -l` remembers per
    // filesystem instead of asking every entry.
    let getfattr_err = |name: &str, path: &str| {
        let out = Command::new("getfattr")
            .args(["-n", name])
            .arg(mnt.join(path))
            .output()
            .unwrap();
        assert!(!out.status.success(), "getfattr -n {name} {path} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = getfattr_err("user.note", "etc/hostname");
    assert!(err.contains("No such attribute"), "getfattr: {err}");
    let err = getfattr_err("security.selinux", "usr/bin/ping");
    assert!(err.contains("Operation not supported"), "getfattr: {err}");
    let err = getfattr_err("system.posix_acl_access", "etc/hostname");
    assert!(err.contains("Operation not supported"), "getfattr: {err}");

    // Writes are refused: the mount is read-only.
    let err = fs::write(mnt.join("etc/new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let err = fs::remove_file(mnt.join("etc/hostname")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let err = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("etc/hostname"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(
        fs::metadata(mnt.join("no/such")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );

    let st = nix::sys::statvfs::statvfs(mnt.as_path()).unwrap();
    assert!(
        st.files() as usize > want.len(),
        "statfs counts the entries"
    );
}

fn chroot(root: &Path, script: &str) -> String {
    require_tool("chroot");
    String::from_utf8(run(Command::new("chroot")
        .arg(root)
        .arg("/bin/busybox")
        .arg("sh")
        .arg("-c")
        .arg(script)))
    .unwrap()
}

#[test]
fn static_busybox_runs_in_a_chroot_of_the_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let (index, data) = busybox_index(tmp.path());
    let served = Served::start(tmp.path(), "mnt", &index, &tmp.path().join("cache"), &[]);
    let out = chroot(
        &served.mnt,
        "ls /bin; cat /etc/motd; find / | wc -l; sha256sum /data/big",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.contains(&"busybox") && lines.contains(&"sha256sum"),
        "ls /bin: {out}"
    );
    assert!(lines.contains(&"hello from clip"), "cat: {out}");
    // /, bin, busybox, 9 applet links, etc, motd, data, big, tmp.
    assert!(lines.contains(&"17"), "find | wc -l: {out}");
    assert!(
        out.contains(&format!("{}  /data/big", sha256_hex(&data))),
        "sha256sum: {out}"
    );
    // The shell found through a symlink works too.
    let out = String::from_utf8(run(Command::new("chroot")
        .arg(&served.mnt)
        .arg("/bin/sh")
        .arg("-c")
        .arg("echo via-symlink")))
    .unwrap();
    assert_eq!(out.trim(), "via-symlink");
}

/// What programs ask of a file besides its bytes gets a filesystem's answer, not a warning
/// in the daemon's log: `isatty` (an ioctl at every Python `open()`), `SEEK_DATA` and
/// `SEEK_HOLE` (`cp`, `tar`), `fsync`.
#[test]
fn ioctl_seek_data_and_fsync_are_answered_without_warnings() {
    require_tool("python3");
    let tmp = tempfile::tempdir().unwrap();
    let (index, _) = busybox_index(tmp.path());
    let mut served = Served::start(tmp.path(), "mnt", &index, &tmp.path().join("cache"), &[]);
    let path = served.mnt.join("bin/busybox");
    let size = fs::metadata(&path).unwrap().len();
    let script = r#"
import os, sys
p, size = sys.argv[1], int(sys.argv[2])
for _ in range(50):
    with open(p, "rb") as f:
        assert not f.isatty()
        f.read(16)
fd = os.open(p, os.O_RDONLY)
assert os.lseek(fd, 0, os.SEEK_DATA) == 0
assert os.lseek(fd, 100, os.SEEK_DATA) == 100
assert os.lseek(fd, 0, os.SEEK_HOLE) == size
for whence in (os.SEEK_DATA, os.SEEK_HOLE):
    try:
        os.lseek(fd, size, whence)
        raise SystemExit("no ENXIO past the end")
    except OSError as e:
        assert e.errno == 6, e
os.fsync(fd)
print("ok")
"#;
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .arg(size.to_string()));
    assert_eq!(String::from_utf8_lossy(&out).trim(), "ok");
    let status = served.terminate();
    assert!(status.success(), "clip-serve exited with {status}");
    let log = plain(&served.log());
    assert!(!log.contains("Not Implemented"), "{log}");
}

#[test]
fn an_image_without_xattrs_reports_them_unsupported() {
    require_tool("getfattr");
    require_tool("getcap");
    let tmp = tempfile::tempdir().unwrap();
    let (index, _) = busybox_index(tmp.path());
    let served = Served::start(tmp.path(), "mnt", &index, &tmp.path().join("cache"), &[]);
    let motd = served.mnt.join("etc/motd");
    // Twice: the first answer (ENOSYS) makes the kernel stop asking the daemon; both must
    // read as "not supported", the answer of a filesystem without xattrs.
    for _ in 0..2 {
        let out = Command::new("getfattr")
            .arg("-n")
            .arg("user.anything")
            .arg(&motd)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Operation not supported"), "getfattr: {err}");
    }
    let caps = run(Command::new("getcap").arg(served.mnt.join("bin/busybox")));
    assert!(
        caps.is_empty(),
        "getcap: {}",
        String::from_utf8_lossy(&caps)
    );
    let ls = run(Command::new("ls").arg("-l").arg(served.mnt.join("etc")));
    assert!(String::from_utf8_lossy(&ls).contains("motd"));
}

/// A POSIX access ACL in the kernel's xattr encoding: version 2, then (tag, perm, id)
/// entries.
fn acl_xattr(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

#[test]
fn posix_acls_in_the_image_are_served_and_enforced() {
    require_tool("getfattr");
    require_tool("setpriv");
    let tmp = tempfile::tempdir().unwrap();
    // Both files belong to uid 1000 with mode 0640; one has an ACL that lets uid 0 read it
    // (user_obj rw, user:0 r, group_obj none, mask r, other none).
    const UNDEFINED: u32 = u32::MAX;
    let acl = acl_xattr(&[
        (0x01, 6, UNDEFINED),
        (0x02, 4, 0),
        (0x04, 0, UNDEFINED),
        (0x10, 4, UNDEFINED),
        (0x20, 0, UNDEFINED),
    ]);
    let (index, _) = common::busybox_index_with(tmp.path(), |t| {
        let owner: [(&str, &[u8]); 2] = [("uid", b"1000"), ("gid", b"1000")];
        t.pax_file(
            "data/with-acl",
            0o640,
            b"readable through the ACL\n",
            &[
                owner[0],
                owner[1],
                ("SCHILY.xattr.system.posix_acl_access", &acl),
            ],
        )
        .pax_file("data/without-acl", 0o640, b"owner only\n", &owner);
    });
    let served = Served::start(tmp.path(), "mnt", &index, &tmp.path().join("cache"), &[]);
    // `argv` followed by the path of `path` in the mount, run to completion.
    let on = |argv: &[&str], path: &str| {
        Command::new(argv[0])
            .args(&argv[1..])
            .arg(served.mnt.join(path))
            .output()
            .unwrap()
    };
    let getfattr = |path: &str| {
        on(
            &["getfattr", "-e", "hex", "-n", "system.posix_acl_access"],
            path,
        )
    };
    let succeeded = |out: &std::process::Output, what: &str| {
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let out = getfattr("data/with-acl");
    succeeded(&out, "getfattr");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&hex::encode(&acl)),
        "getfattr: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The image carries ACLs, so a file without one has none (not "unsupported").
    let out = getfattr("data/without-acl");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No such attribute"), "getfattr: {err}");

    // The kernel checks permissions with the ACL: uid 0 without capabilities is neither
    // the owner nor in the group, so only the ACL's user:0 entry lets it read.
    let cat_without_caps = |path: &str| {
        on(
            &["setpriv", "--inh-caps=-all", "--bounding-set=-all", "cat"],
            path,
        )
    };
    let out = cat_without_caps("data/with-acl");
    succeeded(&out, "cat");
    assert_eq!(out.stdout, b"readable through the ACL\n");
    let out = cat_without_caps("data/without-acl");
    assert!(
        !out.status.success(),
        "uid 0 without capabilities read a 0640 file of uid 1000"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "cat: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // exec asks for security.capability, which this image does not carry (EOPNOTSUPP):
    // the kernel takes that as "no capabilities" and runs the program.
    assert_eq!(chroot(&served.mnt, "echo runs"), "runs\n");
}

#[test]
fn overlayfs_with_the_mount_as_lowerdir() {
    let tmp = tempfile::tempdir().unwrap();
    let (index, data) = busybox_index(tmp.path());
    let served = Served::start(tmp.path(), "lower", &index, &tmp.path().join("cache"), &[]);
    let (merged, _overlay) = common::overlay(tmp.path(), &served.mnt);
    let upper = tmp.path().join("upper");

    fs::write(merged.join("etc/new"), b"written in the merged view\n").unwrap();
    let mut motd = fs::read(merged.join("etc/motd")).unwrap();
    motd.extend_from_slice(b"appended\n");
    fs::write(merged.join("etc/motd"), &motd).unwrap();
    fs::remove_file(merged.join("bin/rm")).unwrap();
    fs::rename(merged.join("data/big"), merged.join("data/moved")).unwrap();
    assert_eq!(
        fs::read(merged.join("data/moved")).unwrap(),
        data,
        "renamed file keeps its bytes (copied up)"
    );
    assert!(!merged.join("data/big").exists());

    let out = chroot(
        &merged,
        "cat /etc/new /etc/motd; ls /bin; sha256sum /data/moved; echo chroot >> /tmp/x; cat /tmp/x",
    );
    assert!(
        out.contains("written in the merged view\nhello from clip\nappended\n"),
        "{out}"
    );
    assert!(
        !out.lines().any(|l| l == "rm"),
        "rm was deleted in the merged view: {out}"
    );
    assert!(out.contains(&sha256_hex(&data)), "{out}");
    assert!(out.trim_end().ends_with("chroot"), "{out}");

    // The lower layer (the clip mount) is untouched.
    assert_eq!(
        fs::read(served.mnt.join("etc/motd")).unwrap(),
        b"hello from clip\n"
    );
    assert!(served.mnt.join("bin/rm").symlink_metadata().is_ok());
    assert_eq!(fs::read(served.mnt.join("data/big")).unwrap(), data);
    assert!(!served.mnt.join("etc/new").exists());
    assert!(
        upper.join("etc/new").is_file(),
        "new files land in the upper dir"
    );
}

/// A gzip image of `n` large files (several chunks each) and many small ones; returns the
/// index and the expected content by path.
fn many_files_index(tmp: &Path, n: usize) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let mut t = TarBuilder::new();
    let mut files = Vec::new();
    t.dir("./", 0o755).dir("big/", 0o755).dir("small/", 0o755);
    for i in 0..n {
        let data = noise(100 + i as u64, (2 << 20) + i * 77_777);
        files.push((format!("big/f{i}"), data));
    }
    for i in 0..200 {
        files.push((
            format!("small/s{i:03}"),
            noise(1000 + i as u64, 100 + i * 97),
        ));
    }
    for (p, d) in &files {
        t.file(p, 0o644, d);
    }
    let index = tmp.join("many.clip");
    common::one_layer_image(
        t.finish(),
        "2025-05-20T00:00:00Z",
        &tmp.join("many-layout"),
        "many",
        &index,
    );
    (index, files)
}

/// Drop the kernel's cached pages of `f` so the next read goes to the daemon.
fn drop_page_cache(f: &File) {
    nix::fcntl::posix_fadvise(f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .unwrap();
}

#[test]
fn concurrent_random_reads_return_correct_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (index, files) = many_files_index(tmp.path(), 6);
    // A cache smaller than the image: pieces are evicted and refetched while reading.
    let served = Served::start(
        tmp.path(),
        "mnt",
        &index,
        &tmp.path().join("cache"),
        &["--cache-size", "3M"],
    );
    let files = std::sync::Arc::new(files);
    let threads: Vec<_> = (0..8u64)
        .map(|seed| {
            let (files, mnt) = (files.clone(), served.mnt.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                for _ in 0..150 {
                    let (path, data) = &files[rng.gen_range(0..files.len())];
                    let f = File::open(mnt.join(path)).unwrap();
                    for _ in 0..4 {
                        let off = rng.gen_range(0..data.len());
                        let len = rng.gen_range(1..=(data.len() - off).min(300_000));
                        let mut buf = vec![0u8; len];
                        f.read_exact_at(&mut buf, off as u64).unwrap();
                        assert!(
                            buf == data[off..off + len],
                            "{path} at {off}+{len}: wrong bytes"
                        );
                        drop_page_cache(&f);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a reader thread failed");
    }
    let stats = served.stats();
    assert_eq!(stats["serve"]["read_errors"], 0, "{stats}");
    assert!(
        stats["disk_cache"]["evictions"].as_u64().unwrap() > 0,
        "the small cache evicted: {stats}"
    );
    assert!(
        stats["disk_cache"]["bytes"].as_u64().unwrap() <= 3 << 20,
        "{stats}"
    );
}

fn daemon_fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    (fds, rss)
}

/// [`daemon_fds_and_rss`] once the daemon's background work has settled: the last three
/// samples, 100 ms apart, show the lowest fd count seen (the disk-cache writer holds a
/// file open while it writes, and it starts only after reads pause).
fn settled_fds_and_rss(pid: u32) -> (usize, u64) {
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen.push(daemon_fds_and_rss(pid));
        let low = seen.iter().map(|s| s.0).min().unwrap();
        if seen.len() >= 3 && seen[seen.len() - 3..].iter().all(|s| s.0 == low) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    *seen.last().unwrap()
}

#[test]
fn open_read_close_loop_leaks_no_handles_or_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let (index, files) = many_files_index(tmp.path(), 3);
    let served = Served::start(tmp.path(), "mnt", &index, &tmp.path().join("cache"), &[]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut round = |n: usize| {
        for _ in 0..n {
            let (path, data) = &files[rng.gen_range(0..files.len())];
            let f = File::open(served.mnt.join(path)).unwrap();
            let off = rng.gen_range(0..data.len());
            let mut buf = vec![0u8; (data.len() - off).min(8192)];
            f.read_exact_at(&mut buf, off as u64).unwrap();
            assert!(buf == data[off..off + buf.len()]);
            drop_page_cache(&f);
        }
    };
    round(300);
    let (fds0, rss0) = settled_fds_and_rss(served.pid());
    round(3000);
    let (fds1, rss1) = settled_fds_and_rss(served.pid());
    assert_eq!(
        fds1, fds0,
        "daemon fd count changed over 3000 open/read/close"
    );
    assert!(
        rss1 < rss0 + 16 * 1024,
        "daemon RSS grew from {rss0} kB to {rss1} kB"
    );
    let stats = served.stats();
    assert_eq!(stats["serve"]["open_handles"], 0, "{stats}");
    assert_eq!(stats["serve"]["opens"], 3300, "{stats}");
}

#[test]
fn warm_reads_come_from_the_disk_cache_and_bad_objects_are_refetched() {
    let tmp = tempfile::tempdir().unwrap();
    let (index, files) = many_files_index(tmp.path(), 2);
    let cache = tmp.path().join("cache");
    let read_all = |mnt: &Path| {
        for (p, d) in &files {
            assert!(fs::read(mnt.join(p)).unwrap() == *d, "{p}: wrong bytes");
        }
    };
    let mut cold = Served::start(tmp.path(), "cold", &index, &cache, &[]);
    read_all(&cold.mnt);
    assert!(cold.terminate().success());
    let cold_stats: serde_json::Value =
        serde_json::from_slice(&fs::read(&cold.stats).unwrap()).unwrap();
    assert!(
        cold_stats["serve"]["inflated"].as_u64().unwrap() > 0,
        "{cold_stats}"
    );
    let stored = cold_stats["disk_cache"]["stores"].as_u64().unwrap();
    assert!(stored >= files.len() as u64, "{cold_stats}");

    // Corrupt one cached object: it must be detected, dropped and refetched.
    let (_, small) = &files[files.len() - 1];
    let key = sha256_hex(small);
    let obj = cache.join(&key[..2]).join(&key);
    fs::write(&obj, b"not the content").unwrap();

    let warm = Served::start(tmp.path(), "warm", &index, &cache, &[]);
    read_all(&warm.mnt);
    let s = warm.stats();
    assert_eq!(s["disk_cache"]["verify_failures"], 1, "{s}");
    assert!(s["disk_cache"]["hits"].as_u64().unwrap() >= stored, "{s}");
    assert_eq!(s["disk_cache"]["misses"], 0, "{s}");
    assert!(
        s["serve"]["inflated"].as_u64().unwrap() < 64 << 10,
        "only the bad object is inflated again: {s}"
    );
    assert_eq!(
        fs::read(&obj).unwrap(),
        *small,
        "the bad object was replaced"
    );
}

/// Pieces of large files read from a local layout reach the disk cache later, inflated
/// again from the layout by the cache's writer; a layout changed meanwhile leaves them
/// uncached, never cached wrong.
#[test]
fn large_pieces_are_cached_from_the_layout_later_and_never_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let (index, files) = many_files_index(tmp.path(), 2);
    let idx = clip::format::IndexFile::open(&index).unwrap();
    let objects = |cache: &Path| -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for d in fs::read_dir(cache).unwrap() {
            let d = d.unwrap().path();
            let name = d.file_name().unwrap().to_str().unwrap().to_string();
            if name.len() == 2 {
                for f in fs::read_dir(&d).unwrap() {
                    let f = f.unwrap().path();
                    let key = f.file_name().unwrap().to_str().unwrap().to_string();
                    out.push((key, fs::read(&f).unwrap()));
                }
            }
        }
        out
    };
    let (big, want) = &files[1];
    assert!(want.len() > 2 << 20);
    let entry = idx.resolve(format!("/{big}").as_bytes()).unwrap().unwrap();
    let pieces = idx.pieces(entry).unwrap();
    let keys: Vec<String> = pieces.iter().map(|p| p.key()).collect();
    // Pieces of 512 KiB and more are rebuilt; the file's short tail is held in memory.
    let rebuilt: Vec<String> = pieces
        .iter()
        .filter(|p| p.len >= 512 << 10)
        .map(|p| p.key())
        .collect();
    assert!(keys.len() == 3 && rebuilt.len() == 2, "{keys:?}");

    // An intact layout: the pieces are there once the daemon has stopped.
    let cache = tmp.path().join("cache");
    let mut served = Served::start(tmp.path(), "mnt", &index, &cache, &[]);
    assert!(fs::read(served.mnt.join(big)).unwrap() == *want);
    assert!(served.terminate().success());
    let stored = objects(&cache);
    for k in &keys {
        assert!(stored.iter().any(|(key, _)| key == k), "piece {k} cached");
    }

    // The layout's blob changes after the read and before the writer runs: nothing of it
    // is cached, and nothing cached is wrong.
    let layout = tmp.path().join("many-layout");
    let digest = idx.layer_digest(0).unwrap().to_string();
    let blob = clip::source::layout::LayoutSource::open(&layout)
        .unwrap()
        .blob_path(&digest)
        .unwrap();
    let original = fs::read(&blob).unwrap();
    let cache2 = tmp.path().join("cache2");
    let mut served = Served::start(tmp.path(), "mnt2", &index, &cache2, &[]);
    assert!(fs::read(served.mnt.join(big)).unwrap() == *want);
    let mut flipped = original.clone();
    for b in &mut flipped[64..] {
        *b ^= 0x5a;
    }
    // Written in place: the daemon keeps the blob open.
    fs::OpenOptions::new()
        .write(true)
        .open(&blob)
        .unwrap()
        .write_all_at(&flipped, 0)
        .unwrap();
    assert!(served.terminate().success());
    let stored = objects(&cache2);
    for (key, bytes) in &stored {
        assert_eq!(
            &sha256_hex(bytes),
            key,
            "cached object {key} holds other bytes"
        );
    }
    for k in &rebuilt {
        assert!(
            !stored.iter().any(|(key, _)| key == k),
            "piece {k} was cached from a changed layout"
        );
    }
    fs::write(&blob, &original).unwrap();
}

#[test]
fn a_layout_missing_a_layer_blob_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index) = edge_index(tmp.path());
    let idx = clip::format::IndexFile::open(&index).unwrap();
    let digest = idx.layer_digest(1).unwrap().to_string();
    let blob = clip::source::layout::LayoutSource::open(&layout)
        .unwrap()
        .blob_path(&digest)
        .unwrap();
    fs::remove_file(blob).unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let out = Command::new(bin("clip-serve"))
        .arg(&index)
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!is_mounted(&mnt));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&digest) && err.contains("missing from the layout"),
        "{err}"
    );
}

#[test]
fn stale_mount_is_reported_and_sigterm_unmounts_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, index) = edge_index(tmp.path());
    let cache = tmp.path().join("cache");
    let mut crashed = Served::start(tmp.path(), "mnt", &index, &cache, &[]);
    let mnt = crashed.mnt.clone();
    let mut child = crashed.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let stale = nix::sys::statvfs::statvfs(mnt.as_path()).unwrap_err();
    assert_eq!(stale, nix::Error::ENOTCONN, "mount is stale after SIGKILL");

    let out = Command::new(bin("clip-serve"))
        .arg(&index)
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stale") && err.contains(&format!("fusermount3 -u {}", mnt.display())),
        "{err}"
    );

    run(Command::new("fusermount3").arg("-u").arg(&mnt));
    assert!(!is_mounted(&mnt));
    drop(crashed);

    let mut served = Served::start(tmp.path(), "mnt", &index, &cache, &[]);
    assert_eq!(
        fs::read(served.mnt.join("etc/hostname")).unwrap(),
        b"edge\n"
    );
    let status = served.terminate();
    assert!(
        status.success(),
        "exit status after SIGTERM: {status}\n{}",
        served.log()
    );
    assert!(!is_mounted(&served.mnt), "SIGTERM unmounted");
    let log = served.log();
    assert!(
        log.contains("hits=") && log.contains("misses="),
        "counters printed at exit:\n{log}"
    );
    let stats: serde_json::Value =
        serde_json::from_slice(&fs::read(&served.stats).unwrap()).unwrap();
    assert!(stats["serve"]["opens"].as_u64().unwrap() >= 1, "{stats}");
}

/// The log of `served` (colours stripped) once it says the profile was prefetched.
fn prefetched_log(served: &Served) -> String {
    let t = std::time::Instant::now();
    while !served.log().contains("profile prefetched") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no prefetch within 20 s:\n{}",
            served.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    common::plain(&served.log())
}

/// Mount `index` over the disk cache `cache` (under `tmp`) replaying `profile`: every one
/// of its `intervals` is found cached, and the mount makes no origin request.
fn replay_fetches_nothing(
    tmp: &Path,
    name: &str,
    index: &Path,
    cache: &str,
    profile: &Path,
    intervals: usize,
) {
    let mut served = Served::start(
        tmp,
        name,
        index,
        &tmp.join(cache),
        &["--prefetch-profile", profile.to_str().unwrap()],
    );
    let log = prefetched_log(&served);
    assert_eq!(prefetched_field(&log, "cached"), intervals, "{log}");
    assert_eq!(prefetched_field(&log, "requests"), 0, "{log}");
    assert!(served.terminate().success());
    let stats: serde_json::Value =
        serde_json::from_slice(&fs::read(&served.stats).unwrap()).unwrap();
    assert_eq!(stats["serve"]["requests"], 0, "{stats}");
}

/// The number logged as `name=` on the "profile prefetched" line of `log`.
fn prefetched_field(log: &str, name: &str) -> usize {
    let line = log
        .lines()
        .find(|l| l.contains("profile prefetched"))
        .unwrap();
    let rest = line
        .split(&format!(" {name}="))
        .nth(1)
        .unwrap_or_else(|| panic!("no {name} in {line}"));
    rest.trim_start_matches(|c: char| !c.is_ascii_digit())
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Move `layout` aside and empty its blobs: a daemon keeps the layer blobs open, so
/// emptying them is what takes its origin away. Returns where the layout now is.
fn take_layer_blobs_away(layout: &Path) -> PathBuf {
    let gone = layout.with_file_name("layout-gone");
    fs::rename(layout, &gone).unwrap();
    for blob in fs::read_dir(gone.join("blobs/sha256")).unwrap() {
        fs::File::options()
            .write(true)
            .open(blob.unwrap().path())
            .unwrap()
            .set_len(0)
            .unwrap();
    }
    gone
}

/// Record an access profile of a cold mount of `index` reading [`PROFILED`] (under `tmp`,
/// mount `name`): the profile's path, its interval count and the files' bytes.
fn record_profile(tmp: &Path, name: &str, index: &Path) -> (PathBuf, usize, Vec<Vec<u8>>) {
    let profile = tmp.join(format!("{name}.profile"));
    let mut served = Served::start(
        tmp,
        name,
        index,
        &tmp.join(format!("{name}-cache")),
        &["--record-profile", profile.to_str().unwrap()],
    );
    let bytes = PROFILED
        .iter()
        .map(|p| fs::read(served.mnt.join(p)).unwrap())
        .collect();
    assert!(served.terminate().success());
    let intervals = fs::read_to_string(&profile)
        .unwrap()
        .lines()
        .skip(3)
        .count();
    assert!(intervals >= 2, "{intervals} intervals");
    (profile, intervals, bytes)
}

/// The standard output of a command that must have succeeded (its stderr otherwise).
fn succeeded(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A mount of `index` at `tmp/name` with an empty cache of its own and no flags: a node
/// that never ran the image.
fn fresh_mount(tmp: &Path, name: &str, index: &Path) -> Served {
    Served::start(tmp, name, index, &tmp.join(format!("cache-{name}")), &[])
}

/// The [`PROFILED`] files under `mnt` have the `expected` bytes.
fn assert_profiled_files(mnt: &Path, expected: &[Vec<u8>]) {
    for (p, want) in PROFILED.iter().zip(expected) {
        assert_eq!(&fs::read(mnt.join(p)).unwrap(), want, "{p}");
    }
}

/// Files of the edge image that the profile tests read.
const PROFILED: [&str; 3] = ["many/file059", "data/random.bin", "home/user/file"];

#[test]
fn a_recorded_access_profile_is_prefetched_by_the_next_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index) = edge_index(tmp.path());
    let profile = tmp.path().join("profile");
    let wanted = PROFILED;

    // Recording: a cold mount reads three files; the intervals they needed are written at
    // exit. Given the same file to replay, the first run finds none and records it.
    let p = profile.to_str().unwrap();
    let mut first = Served::start(
        tmp.path(),
        "rec",
        &index,
        &tmp.path().join("cache1"),
        &["--record-profile", p, "--prefetch-profile", p],
    );
    assert!(
        first.log().contains("no access profile yet"),
        "{}",
        first.log()
    );
    let expected: Vec<Vec<u8>> = wanted
        .iter()
        .map(|p| fs::read(first.mnt.join(p)).unwrap())
        .collect();
    assert!(first.terminate().success());
    let text = fs::read_to_string(&profile).unwrap();
    let intervals = text.lines().skip(3).count();
    assert!(
        text.starts_with("clip-profile 3\nmanifest sha256:") && intervals >= 2,
        "profile:\n{text}"
    );

    // A restart over the first mount's cache finds those intervals' pieces there and
    // fetches nothing.
    replay_fetches_nothing(tmp.path(), "warm", &index, "cache1", &profile, intervals);

    // Replay: a fresh mount with an empty cache fetches those intervals by itself ...
    let mut second = Served::start(
        tmp.path(),
        "replay",
        &index,
        &tmp.path().join("cache2"),
        &["--prefetch-profile", profile.to_str().unwrap()],
    );
    let log = prefetched_log(&second);
    let field = |name: &str| prefetched_field(&log, name);
    assert_eq!(field("intervals"), intervals, "{log}");
    assert_eq!(field("cached"), 0, "{log}");
    // Neighbouring intervals share one request (this image's profile has neighbours).
    assert!((1..intervals).contains(&field("requests")), "{log}");
    // ... so the files read after the origin is gone come from what it fetched, intact.
    let gone = take_layer_blobs_away(&layout);
    assert_profiled_files(&second.mnt, &expected);
    assert!(second.terminate().success());
    fs::rename(&gone, &layout).unwrap();

    // That replay cached only the pieces read, not whole intervals: a restart over its
    // cache finds the listed pieces and still fetches nothing.
    replay_fetches_nothing(tmp.path(), "again", &index, "cache2", &profile, intervals);

    // A profile of another image is refused at start with a clear message.
    fs::write(
        &profile,
        text.replacen("manifest sha256:", "manifest sha256:0", 1),
    )
    .unwrap();
    let out = Command::new(bin("clip-serve"))
        .arg(&index)
        .arg(tmp.path().join("rec"))
        .arg("--prefetch-profile")
        .arg(&profile)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("was recorded on image") && err.contains("record it again"),
        "{err}"
    );
}

#[test]
fn each_image_learns_its_access_profile_in_the_cache_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (_layout, index) = edge_index(tmp.path());
    let cache = tmp.path().join("cache");
    let wanted = PROFILED;

    // A first run with a disk cache and no profile flags writes what it read under
    // profiles/, named after the image's manifest digest and checkpoint layout.
    let mut first = Served::start(tmp.path(), "learn", &index, &cache, &[]);
    let expected: Vec<Vec<u8>> = wanted
        .iter()
        .map(|p| fs::read(first.mnt.join(p)).unwrap())
        .collect();
    assert!(first.terminate().success());
    let learnt: Vec<_> = fs::read_dir(cache.join("profiles"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(learnt.len(), 1, "{learnt:?}");
    let name = learnt[0].file_name().unwrap().to_str().unwrap().to_string();
    let text = fs::read_to_string(&learnt[0]).unwrap();
    let intervals = text.lines().skip(3).count();
    let layout = format!(
        "{:016x}",
        IndexFile::open(&index).unwrap().checkpoint_layout_id()
    );
    let digest = name
        .strip_suffix(&format!("-{layout}"))
        .unwrap_or_else(|| panic!("{name} ends with the checkpoint layout {layout}"));
    assert!(
        digest.starts_with("sha256-")
            && text.starts_with(&format!(
                "clip-profile 3\nmanifest {}\nlayout {layout}\n",
                digest.replacen('-', ":", 1)
            ))
            && intervals >= 2,
        "{name}:\n{text}"
    );

    // Once the cached pieces are gone (evicted), the next start fetches that profile at once.
    for e in fs::read_dir(&cache).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().len() == 2 {
            fs::remove_dir_all(p).unwrap();
        }
    }
    let mut second = Served::start(tmp.path(), "relearn", &index, &cache, &[]);
    let log = prefetched_log(&second);
    assert_eq!(prefetched_field(&log, "intervals"), intervals, "{log}");
    assert_eq!(prefetched_field(&log, "cached"), 0, "{log}");
    assert!(prefetched_field(&log, "requests") >= 1, "{log}");
    assert_profiled_files(&second.mnt, &expected);
    assert!(second.terminate().success());

    // Opting out: no replay, nothing learnt.
    let other = tmp.path().join("cache-other");
    let mut third = Served::start(
        tmp.path(),
        "nolearn",
        &index,
        &other,
        &["--no-learn-profile"],
    );
    assert_eq!(fs::read(third.mnt.join(wanted[0])).unwrap(), expected[0]);
    assert!(third.terminate().success());
    assert!(!other.join("profiles").exists());
    assert!(!third.log().contains("prefetching the access profile"));
}

/// An index carrying a startup profile (`clip-build embed-profile`) makes every fresh node
/// prefetch it at its first start, with an empty cache and no flags; the embedding is
/// checked against the image, removable, and a damaged area is an error for `verify` and
/// only a warning for `clip-serve`, whose bytes stay right.
#[test]
fn an_index_carrying_a_startup_profile_is_prefetched_on_a_fresh_node() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index) = edge_index(tmp.path());
    let plain_index = fs::read(&index).unwrap();
    let (profile, intervals, expected) = record_profile(tmp.path(), "rec", &index);
    let build = |args: &[&str]| Command::new(bin("clip-build")).args(args).output().unwrap();
    let ix = index.to_str().unwrap();

    // A profile of another image is refused and leaves the index as it was.
    let other = tmp.path().join("other.profile");
    let text = fs::read_to_string(&profile).unwrap();
    fs::write(
        &other,
        text.replacen("manifest sha256:", "manifest sha256:0", 1),
    )
    .unwrap();
    let out = build(&["embed-profile", ix, other.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("was recorded on image"),
        "{err}"
    );
    assert_eq!(fs::read(&index).unwrap(), plain_index);

    let out = build(&["embed-profile", ix, profile.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspect =
        String::from_utf8(run(Command::new(bin("clip-build")).args(["inspect", ix]))).unwrap();
    assert!(inspect.starts_with("format:      2.1\n"), "{inspect}");
    assert!(
        inspect.contains(&format!("startup profile: {intervals} intervals")),
        "{inspect}"
    );
    assert_eq!(
        run(Command::new(bin("clip-build")).args(["profile", ix])),
        text.as_bytes()
    );

    // --no-startup-profile opts out.
    let mut optout = Served::start(
        tmp.path(),
        "optout",
        &index,
        &tmp.path().join("cache-optout"),
        &["--no-startup-profile"],
    );
    assert_eq!(fs::read(optout.mnt.join(PROFILED[0])).unwrap(), expected[0]);
    assert!(optout.terminate().success());
    assert!(
        !optout.log().contains("profile prefetched"),
        "{}",
        optout.log()
    );

    // A damaged area: verify fails naming it; a mount warns, skips it and serves right bytes.
    let mut damaged = fs::read(&index).unwrap();
    *damaged.last_mut().unwrap() ^= 0x20;
    let bad = tmp.path().join("damaged.clip");
    fs::write(&bad, &damaged).unwrap();
    let out = build(&["verify", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("startup profile area is damaged"),
        "{err}"
    );
    let mut warned = fresh_mount(tmp.path(), "damaged", &bad);
    assert_profiled_files(&warned.mnt, &expected);
    assert!(warned.terminate().success());
    let log = plain(&warned.log());
    assert!(
        log.contains("ignoring the index's startup profile") && !log.contains("profile prefetched"),
        "{log}"
    );

    // A fresh node: empty cache, no flags. The profile is fetched at start, so the files
    // read after the origin is gone (it stays gone) come from what it fetched.
    let mut fresh = fresh_mount(tmp.path(), "fresh", &index);
    let log = prefetched_log(&fresh);
    assert!(log.contains("the index carries a startup profile"), "{log}");
    assert_eq!(prefetched_field(&log, "intervals"), intervals, "{log}");
    assert_eq!(prefetched_field(&log, "cached"), 0, "{log}");
    take_layer_blobs_away(&layout);
    assert_profiled_files(&fresh.mnt, &expected);
    assert!(fresh.terminate().success());

    // Removing it gives back the index as clip-build wrote it, byte for byte.
    let out = build(&["embed-profile", ix, "--remove"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(&index).unwrap(), plain_index);
}

/// `clip-build IMAGE -o INDEX -- CMD` trains the index: CMD runs in a chroot of an overlay
/// over a mount of it (writes land in the overlay), and what it read becomes the startup
/// profile. A failing command leaves the index without one; a command still running at
/// `--train-timeout` is stopped and its reads so far are the profile. No mount or scratch
/// directory is left behind.
#[test]
fn clip_build_trains_an_index_by_running_a_command_in_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, data) = busybox_index(tmp.path());
    let image = format!("{}:bb", tmp.path().join("bb-layout").display());
    let index = tmp.path().join("trained.clip");
    let ix = index.to_str().unwrap();
    let build = |cmd: &[&str]| {
        let out = Command::new(bin("clip-build"))
            .args([image.as_str(), "-o", ix, "--quiet"])
            .args(cmd)
            .env("HOST_ONLY", "1")
            .output()
            .unwrap();
        let leftovers: Vec<_> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains("clip-train"))
            .map(str::to_string)
            .collect();
        assert!(leftovers.is_empty(), "mounts left: {leftovers:?}");
        out
    };
    let profile_lines = || {
        let out = Command::new(bin("clip-build"))
            .args(["profile", ix])
            .output()
            .unwrap();
        out.status.success().then(|| {
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .skip(3)
                .count()
        })
    };

    // The command runs as a container of the image would: the config's Env (this image
    // sets none, so Docker's default PATH), its WorkingDir (`/`), --train-env on top, and
    // nothing of clip-build's own environment.
    let out = build(&[
        "--train-env",
        "GREETING=hi there",
        "--",
        "sh",
        "-c",
        "sha256sum /data/big; echo written > /tmp/t; cat /tmp/t; echo \"[$GREETING|$PWD|$PATH|${HOST_ONLY:-unset}]\"",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&sha256_hex(&data)) && stdout.contains("written"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("[hi there|/|{}|unset]", clip::train::DEFAULT_PATH)),
        "{stdout}"
    );
    assert!(stderr.contains("the command exited"), "{stderr}");
    // An image whose config sets Env and a WorkingDir it lacks: both are used (the
    // directory made in the overlay), --train-env replacing a variable of the image.
    let (tar, _) = common::busybox_tar(|_| {});
    let configured = tmp.path().join("configured.clip");
    common::one_layer_image_with_config(
        tar,
        "2025-05-20T00:00:00Z",
        &tmp.path().join("cfg-layout"),
        "cfg",
        &configured,
        serde_json::json!({"Env": ["PATH=/bin", "GREETING=from-image", "KEPT=yes"], "WorkingDir": "/srv/app"}),
    );
    let out = Command::new(bin("clip-build"))
        .arg(format!("{}:cfg", tmp.path().join("cfg-layout").display()))
        .args([
            "-o",
            configured.to_str().unwrap(),
            "--quiet",
            "--train-env",
            "KEPT=replaced",
            "--",
        ])
        .args(["sh", "-c", "echo \"[$GREETING|$KEPT|$PWD|$PATH]\""])
        .output()
        .unwrap();
    let stdout = succeeded(&out);
    assert!(
        stdout.contains("[from-image|replaced|/srv/app|/bin]"),
        "{stdout}"
    );
    // The 3 MiB file spans at least two checkpoint intervals.
    let intervals = profile_lines().expect("a startup profile");
    assert!(intervals >= 2, "{intervals} intervals");
    // The index's own files are untouched by what the command wrote.
    let served = Served::start(tmp.path(), "check", &index, &tmp.path().join("cache"), &[]);
    assert!(!served.mnt.join("tmp/t").exists());

    // /proc and /dev are there, and what the command leaves running (a daemon in a
    // session of its own) is stopped before the mount goes: the run neither hangs nor
    // leaves a mount or a process behind.
    let out = build(&[
        "--",
        "/bin/sh",
        "-c",
        "head -c 9 /proc/self/status; echo x > /dev/null && echo dev-ok; busybox setsid busybox sleep 77 & echo left",
    ]);
    let stdout = succeeded(&out);
    assert!(
        stdout.contains("Name:") && stdout.contains("dev-ok") && stdout.contains("left"),
        "{stdout}"
    );
    let sleepers = Command::new("pgrep")
        .args(["-f", "sleep 77"])
        .output()
        .unwrap();
    assert!(
        sleepers.stdout.is_empty(),
        "left running: {}",
        String::from_utf8_lossy(&sleepers.stdout)
    );
    // A program of the host that the image lacks is not run.
    let out = build(&["--", "python3", "-c", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("python3 is not an executable of the image"),
        "{stderr}"
    );
    let out = build(&["--", "/bin/sh", "-c", "cat /etc/motd; exit 3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("exit status: 3"),
        "{stderr}"
    );
    assert_eq!(profile_lines(), None, "a failed training embeds nothing");

    let t = std::time::Instant::now();
    let out = build(&[
        "--train-timeout",
        "0.5",
        "--",
        "/bin/sh",
        "-c",
        "cat /etc/motd; busybox sleep 30",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("was stopped"),
        "{stderr}"
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(profile_lines().is_some_and(|n| n >= 1));
    // A signal during the run stops the command and unmounts before clip-build exits.
    let child = Command::new(bin("clip-build"))
        .args([image.as_str(), "-o", ix, "--quiet", "--"])
        .args(["/bin/sh", "-c", "cat /etc/motd; busybox sleep 30"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains("clip-train")
    {
        assert!(t.elapsed() < Duration::from_secs(20), "no training mount");
        std::thread::sleep(Duration::from_millis(10));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("interrupted by SIGTERM"),
        "{stderr}"
    );
    assert!(!fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains("clip-train"));
    assert_eq!(
        profile_lines(),
        None,
        "an interrupted training embeds nothing"
    );
    let scratch: Vec<_> = fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("clip-train-"))
        .collect();
    assert!(scratch.is_empty(), "scratch directories left: {scratch:?}");
}
