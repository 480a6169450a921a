//! Shared test fixtures: an OCI layout with every edge case the indexer must handle, built
//! with the `tar` crate and flate2, a static busybox image, helpers to run the binaries and
//! external tools, and clip-serve mounts that clean up after themselves.
#![allow(dead_code)]

use clip::demo::{noise, TarBuilder};
use clip::format::{IndexFile, Kind};
use clip::oci::Platform;
use clip::read::{FileReader, Tier};
use clip::source::layout::LayoutSource;
use clip::source::layout::{LayerInput, LayoutWriter};
use clip::source::Source;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tag of the edge-case image.
pub const EDGE_TAG: &str = "edge";

/// Path of a binary built by cargo for this test run.
pub fn bin(name: &str) -> PathBuf {
    match name {
        "clip-build" => PathBuf::from(env!("CARGO_BIN_EXE_clip-build")),
        "clip-serve" => PathBuf::from(env!("CARGO_BIN_EXE_clip-serve")),
        other => panic!("unknown binary {other}"),
    }
}

/// Run a command, panic with its stderr if it fails; return stdout.
pub fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Fail loudly when an external tool the test needs is missing (never skip).
pub fn require_tool(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success());
    assert!(
        found.unwrap_or(false),
        "required tool `{tool}` is not installed; run .ci/run (it apt-get installs the test dependencies)"
    );
}

/// A gzip blob of `data` made of two members, the first with FNAME, FEXTRA and FCOMMENT.
pub fn two_member_gzip(data: &[u8]) -> Vec<u8> {
    let cut = data.len() / 3;
    let mut out = Vec::new();
    let mut a = flate2::GzBuilder::new()
        .filename("layer.tar")
        .comment("first member")
        .extra(b"xx".to_vec())
        .write(Vec::new(), flate2::Compression::new(6));
    a.write_all(&data[..cut]).unwrap();
    out.extend(a.finish().unwrap());
    let mut b = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(9));
    b.write_all(&data[cut..]).unwrap();
    out.extend(b.finish().unwrap());
    out
}

fn dev(t: &mut TarBuilder, path: &str, kind: tar::EntryType, major: u32, minor: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o660);
    h.set_size(0);
    h.set_mtime(t.mtime);
    h.set_uid(0);
    h.set_gid(0);
    h.set_device_major(major).unwrap();
    h.set_device_minor(minor).unwrap();
    t.raw(&mut h, path, b"");
}

fn owned_file(t: &mut TarBuilder, path: &str, uid: u64, gid: u64, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o640);
    h.set_size(data.len() as u64);
    h.set_mtime(t.mtime);
    h.set_uid(uid);
    h.set_gid(gid);
    t.raw(&mut h, path, data);
}

/// The three layers of the edge-case image, as tar bytes.
pub fn edge_layers() -> Vec<Vec<u8>> {
    let mut l1 = TarBuilder::new();
    l1.dir("./", 0o755)
        .dir("tmp/", 0o1777)
        .dir("srv/", 0o2775)
        .dir("etc/", 0o755)
        .file("etc/hostname", 0o644, b"edge\n")
        .file("etc/empty", 0o644, b"")
        .dir("usr/", 0o755)
        .dir("usr/bin/", 0o755)
        .file("usr/bin/su", 0o4755, b"setuid binary stand-in\n")
        .link(tar::EntryType::Symlink, "usr/bin/abs-link", "/etc/hostname")
        .link(
            tar::EntryType::Symlink,
            "usr/bin/rel-link",
            "../../etc/hostname",
        )
        .file("usr/bin/orig", 0o755, b"hardlinked content\n")
        .link(tar::EntryType::Link, "usr/bin/second-name", "usr/bin/orig")
        .file("usr/bin/tool", 0o755, b"tool v1\n")
        .link(tar::EntryType::Link, "usr/bin/tool-link", "usr/bin/tool")
        .file("usr/share-file", 0o644, b"layer one\n")
        .dir("var/", 0o755)
        .dir("var/lib/", 0o755)
        .dir("var/lib/gone/", 0o755)
        .file("var/lib/gone/a", 0o644, b"a\n")
        .file("var/lib/gone/b", 0o644, b"b\n")
        .file("var/lib/delete-me", 0o644, b"x\n")
        .dir("var/opaque/", 0o755)
        .file("var/opaque/lower", 0o644, b"lower\n")
        .dir("var/becomes-file/", 0o755)
        .file("var/becomes-file/child", 0o644, b"child\n")
        .file("var/becomes-dir", 0o644, b"file first\n")
        .link(tar::EntryType::Symlink, "var/link-becomes-file", "/nowhere")
        .file("var/chmod-me", 0o644, b"same bytes\n")
        .dir("data/", 0o755)
        .file("data/random.bin", 0o644, &noise(1, 5 << 20))
        .file(
            "data/text.txt",
            0o644,
            &"lorem ipsum dolor sit amet\n".repeat(120_000).into_bytes(),
        )
        .file("implicit/parent/dirs/file", 0o644, b"no parent entries\n")
        .file(
            "unicode/h\u{e9}llo-w\u{f6}rld-\u{65e5}\u{672c}",
            0o644,
            b"utf-8 name\n",
        );
    let long = format!("long/{}/{}", "d".repeat(90), "f".repeat(120));
    l1.file(&long, 0o644, b"long name\n");
    for i in 0..60 {
        l1.file(
            &format!("many/file{i:03}"),
            0o644,
            format!("small file {i}\n").as_bytes(),
        );
    }
    l1.pax_file(
        "usr/bin/ping",
        0o755,
        b"ping with a capability\n",
        &[
            (
                "SCHILY.xattr.security.capability",
                &[
                    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ],
            ),
            ("SCHILY.xattr.user.note", b"hello"),
        ],
    );
    l1.pax_file(
        "etc/precise",
        0o600,
        b"nanoseconds\n",
        &[
            ("mtime", b"1700000000.123456789"),
            ("uid", b"3000000"),
            ("gid", b"3000001"),
        ],
    );
    dev(&mut l1, "dev/null", tar::EntryType::Char, 1, 3);
    dev(&mut l1, "dev/sda", tar::EntryType::Block, 8, 0);
    dev(&mut l1, "dev/fifo", tar::EntryType::Fifo, 0, 0);
    owned_file(&mut l1, "home/user/file", 1000, 1000, b"owned by 1000\n");
    // Odd but valid: a symlink whose header says 0644 (Linux shows 0777 for every symlink),
    // a file from before 1970, one entry given twice (the second wins), and a directory
    // whose entry comes after its child's.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o644);
    h.set_size(0);
    h.set_mtime(l1.mtime);
    h.set_uid(0);
    h.set_gid(0);
    h.set_link_name("../etc/hostname").unwrap();
    l1.raw(&mut h, "odd/sym-0644", b"");
    l1.pax_file(
        "odd/before-1970",
        0o644,
        b"old\n",
        &[("mtime", b"-86400.5")],
    );
    // Symlinks that later layers write through (as containerd and umoci extract them). The
    // dangling one points under the root: umoci stamps a directory in which it had to create
    // one through a symlink with the extraction time, clip keeps the image's.
    l1.dir("sym/", 0o755)
        .dir("sym/real/", 0o755)
        .file("sym/real/orig", 0o644, b"whited out through a symlink\n")
        .file("sym/real/keep", 0o644, b"kept\n")
        .dir("sym/real2/", 0o755)
        .file("sym/real2/cleared", 0o644, b"cleared by an opaque marker\n")
        .link(tar::EntryType::Symlink, "sym/rel", "real")
        .link(tar::EntryType::Symlink, "sym/abs", "/sym/real")
        .link(tar::EntryType::Symlink, "sym/chain", "rel")
        .link(
            tar::EntryType::Symlink,
            "sym/escape",
            "../../../../sym/real",
        )
        .link(tar::EntryType::Symlink, "sym/dangling", "/made/by/dangling")
        .link(tar::EntryType::Symlink, "sym/replaced", "real")
        .link(tar::EntryType::Symlink, "sym/opq", "real2");
    l1.file("odd/twice", 0o644, b"first\n")
        .file("odd/twice", 0o600, b"second wins\n")
        .file("odd/late-dir/child", 0o644, b"child first\n")
        .dir("odd/late-dir/", 0o710);

    let mut l2 = TarBuilder::new();
    l2.mtime = 1_747_785_600;
    l2.file("var/lib/.wh.delete-me", 0o644, b"")
        .file("var/lib/.wh.gone", 0o644, b"")
        .file("var/opaque/.wh..wh..opq", 0o644, b"")
        .file("var/opaque/upper", 0o644, b"upper\n")
        .dir("var/new-opaque/", 0o755)
        .file("var/new-opaque/.wh..wh..opq", 0o644, b"")
        .file("var/new-opaque/item", 0o644, b"new\n")
        .file("var/becomes-file", 0o644, b"now a file\n")
        .dir("var/becomes-dir/", 0o750)
        .file("var/becomes-dir/inside", 0o644, b"inside\n")
        .file("var/link-becomes-file", 0o644, b"was a symlink\n")
        .file("var/chmod-me", 0o600, b"same bytes\n")
        .file("usr/share-file", 0o644, b"layer two rewrote this\n")
        .file("usr/bin/.wh.orig", 0o644, b"")
        .file("usr/bin/tool", 0o755, b"tool v2 copied up\n")
        .link(tar::EntryType::Link, "usr/bin/tool-link", "usr/bin/tool")
        .link(tar::EntryType::Link, "odd/hardlink-to-lower", "etc/empty")
        .file("sym/rel/.wh.orig", 0o644, b"")
        .file("sym/opq/.wh..wh..opq", 0o644, b"")
        .file("sym/opq/after-opaque", 0o644, b"after\n")
        .file("sym/rel/via-rel", 0o644, b"rel\n")
        .file("sym/abs/via-abs", 0o644, b"abs\n")
        .file("sym/chain/via-chain", 0o644, b"chain\n")
        .file("sym/escape/via-escape", 0o644, b"escape\n")
        .file("sym/dangling/via-dangling", 0o644, b"dangling\n")
        .link(
            tar::EntryType::Link,
            "sym/hardlink-via-symlink",
            "sym/rel/keep",
        )
        .dir("sym/replaced/", 0o700)
        .file(
            "sym/replaced/inside",
            0o644,
            b"a directory entry replaces a symlink\n",
        );
    let mut l3 = TarBuilder::new();
    l3.mtime = 1_747_872_000;
    l3.dir("etc/", 0o755)
        .file("etc/from-plain-tar", 0o644, b"uncompressed layer\n")
        .file("data/.wh.text.txt", 0o644, b"");
    vec![l1.finish(), l2.finish(), l3.finish()]
}

/// Write the edge-case image to an OCI layout at `dir` (tag [`EDGE_TAG`]): layer 1 gzip
/// (level 6), layer 2 gzip in two members with optional header fields, layer 3 plain tar.
pub fn edge_layout(dir: &Path) -> PathBuf {
    let layers = edge_layers();
    let mut w = LayoutWriter::create(dir).unwrap();
    let l2blob = two_member_gzip(&layers[1]);
    let inputs = vec![
        LayerInput::gzip(layers[0].clone()),
        LayerInput {
            tar: layers[1].clone(),
            gzip: true,
            blob: Some(l2blob),
        },
        LayerInput::plain(layers[2].clone()),
    ];
    let m = w
        .image(&inputs, &Platform::host(), "2025-05-20T00:00:00Z")
        .unwrap();
    w.tag(m, EDGE_TAG);
    w.finish().unwrap();
    dir.to_path_buf()
}

/// Build the edge-case layout in `tmp` and index it; returns (layout dir, index path).
pub fn edge_index(tmp: &Path) -> (PathBuf, PathBuf) {
    let layout = edge_layout(&tmp.join("layout"));
    let index = tmp.join("edge.clip");
    run(Command::new(bin("clip-build"))
        .arg(format!("{}:{EDGE_TAG}", layout.display()))
        .arg("-o")
        .arg(&index)
        .arg("--quiet"));
    (layout, index)
}

/// Unpack the layout with umoci into `dest` (its rootfs is `dest/rootfs`).
pub fn umoci_unpack(layout: &Path, tag: &str, dest: &Path) -> PathBuf {
    require_tool("umoci");
    std::fs::create_dir_all(dest).unwrap();
    run(Command::new("umoci")
        .arg("raw")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(dest.join("rootfs")));
    dest.join("rootfs")
}

/// Files of a throwaway PKI made by [`test_pki`].
pub struct TestPki {
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// Server certificate for IP 127.0.0.1, signed by the CA.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// Client certificate (clientAuth), signed by the CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

/// Make a CA, a server certificate for 127.0.0.1 and a client certificate in `dir` with
/// `openssl` (P-256 keys, valid two days).
pub fn test_pki(dir: &Path) -> TestPki {
    require_tool("openssl");
    std::fs::create_dir_all(dir).unwrap();
    let ssl = |args: &[&str]| {
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ];
        run(Command::new("openssl")
            .args(["req", "-x509"])
            .args(key)
            .args(args)
            .current_dir(dir))
    };
    ssl(&[
        "-subj",
        "/CN=clip test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    let leaves: [(&str, &[&str]); 2] = [
        (
            "server",
            &["subjectAltName=IP:127.0.0.1", "extendedKeyUsage=serverAuth"],
        ),
        ("client", &["extendedKeyUsage=clientAuth"]),
    ];
    for (name, exts) in leaves {
        let (subj, key, pem) = (
            format!("/CN=clip test {name}"),
            format!("{name}.key"),
            format!("{name}.pem"),
        );
        let mut args = vec![
            "-subj", &subj, "-CA", "ca.pem", "-CAkey", "ca.key", "-keyout", &key, "-out", &pem,
        ];
        args.extend([
            "-addext",
            "basicConstraints=CA:FALSE",
            "-addext",
            "keyUsage=digitalSignature",
        ]);
        args.extend(exts.iter().flat_map(|e| ["-addext", *e]));
        ssl(&args);
    }
    TestPki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}

/// Fail loudly (never skip) when this machine cannot mount FUSE file systems.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: load the fuse module (`modprobe fuse`) or give the container --device /dev/fuse"
    );
    require_tool("fusermount3");
    assert!(
        nix::unistd::geteuid().is_root(),
        "the FUSE tests mount file systems and must run as root"
    );
}

/// `log` without terminal colour sequences.
pub fn plain(log: &str) -> String {
    let mut out = String::new();
    let mut in_escape = false;
    for c in log.chars() {
        match c {
            '\x1b' => in_escape = true,
            'm' if in_escape => in_escape = false,
            _ if !in_escape => out.push(c),
            _ => {}
        }
    }
    out
}

/// Whether `dir` is a mount point (listed in /proc/self/mountinfo).
pub fn is_mounted(dir: &Path) -> bool {
    let dir = dir.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.as_str()))
}

/// A running clip-serve; dropping it stops the daemon and always leaves no mount behind.
pub struct Served {
    /// The mount point (canonical path).
    pub mnt: PathBuf,
    /// The daemon, until stopped.
    pub child: Option<Child>,
    /// The daemon's stderr.
    pub log: PathBuf,
    /// The `--stats-file` it writes every second.
    pub stats: PathBuf,
}

impl Served {
    /// Mount `index` at `tmp/<name>` with the cache in `cache` (created if needed).
    pub fn start(tmp: &Path, name: &str, index: &Path, cache: &Path, extra: &[&str]) -> Served {
        require_fuse();
        let mnt = tmp.join(name);
        fs::create_dir_all(&mnt).unwrap();
        let mnt = mnt.canonicalize().unwrap();
        let log = tmp.join(format!("{name}.log"));
        let stats = tmp.join(format!("{name}.stats.json"));
        let child = Command::new(bin("clip-serve"))
            .arg(index)
            .arg(&mnt)
            .arg("--cache-dir")
            .arg(cache)
            .arg("--stats-file")
            .arg(&stats)
            .arg("--stats-interval")
            .arg("1")
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start clip-serve");
        let mut s = Served {
            mnt,
            child: Some(child),
            log,
            stats,
        };
        s.wait_mounted();
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_mounted(&mut self) {
        let t = Instant::now();
        while !is_mounted(&self.mnt) {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "clip-serve exited with {st} before mounting:\n{}",
                    self.log()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "clip-serve did not mount within 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send SIGTERM and wait for the daemon to exit; returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if t.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!(
                    "clip-serve did not exit within 20 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The counters the daemon last wrote (waits for a fresh write).
    pub fn stats(&self) -> serde_json::Value {
        let before = fs::metadata(&self.stats).and_then(|m| m.modified()).ok();
        let t = Instant::now();
        loop {
            let now = fs::metadata(&self.stats).and_then(|m| m.modified()).ok();
            if now.is_some() && now != before {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no stats file written:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        serde_json::from_slice(&fs::read(&self.stats).unwrap()).unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let t = Instant::now();
            while child.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mnt)
                .status();
        }
    }
}

/// Lazily unmounts a non-FUSE mount (overlay) on drop.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Check the Redis counters in the stats of a mount that started over an empty Redis: it
/// missed, and what it found there it had stored itself a moment earlier (a read-ahead job
/// keeps the files of its interval in the disk tier and then in Redis while a reader of one
/// of them looks in both).
pub fn assert_filled_from_empty(stats: &serde_json::Value) {
    let r = &stats["redis"];
    let (hits, misses) = (r["hits"].as_u64().unwrap(), r["misses"].as_u64().unwrap());
    assert!(misses > 0, "an empty Redis misses: {stats}");
    assert!(
        hits <= r["writes_done"].as_u64().unwrap() && hits < misses,
        "a mount found more in an empty Redis than it stored there: {stats}"
    );
}

/// Mount an overlayfs at `dir/merged` over `lower` (upper and work dirs in `dir` too);
/// returns the merged view and the guard that unmounts it (keep it until done).
pub fn overlay(dir: &Path, lower: &Path) -> (PathBuf, Unmount) {
    let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged));
    (merged.clone(), Unmount(merged))
}

/// An OCI layout (tag `bb`) with Debian's static busybox, a few applet links, `/etc/motd`
/// (`hello from clip`), `/data/big` (3 MiB) and `/tmp`, and its index; returns the index and
/// the bytes of `/data/big`.
pub fn busybox_index(tmp: &Path) -> (PathBuf, Vec<u8>) {
    busybox_index_with(tmp, |_| {})
}

/// [`busybox_index`] with more entries, added by `extra` to the same layer.
pub fn busybox_index_with(tmp: &Path, extra: impl FnOnce(&mut TarBuilder)) -> (PathBuf, Vec<u8>) {
    let (tar, data) = busybox_tar(extra);
    let index = tmp.join("bb.clip");
    one_layer_image(
        tar,
        "2025-05-20T00:00:00Z",
        &tmp.join("bb-layout"),
        "bb",
        &index,
    );
    (index, data)
}

/// The layer of [`busybox_index_with`] and the 3 MiB content of its `data/big`.
pub fn busybox_tar(extra: impl FnOnce(&mut TarBuilder)) -> (Vec<u8>, Vec<u8>) {
    require_tool("busybox");
    let busybox = fs::read("/bin/busybox").expect("read /bin/busybox (package busybox-static)");
    let mut t = TarBuilder::new();
    t.dir("./", 0o755)
        .dir("bin/", 0o755)
        .file("bin/busybox", 0o755, &busybox);
    for applet in [
        "sh",
        "ls",
        "cat",
        "find",
        "sha256sum",
        "wc",
        "echo",
        "mv",
        "rm",
    ] {
        t.link(tar::EntryType::Symlink, &format!("bin/{applet}"), "busybox");
    }
    let data = noise(7, 3 << 20);
    t.dir("etc/", 0o755)
        .file("etc/motd", 0o644, b"hello from clip\n")
        .dir("data/", 0o755)
        .file("data/big", 0o644, &data)
        .dir("tmp/", 0o1777);
    extra(&mut t);
    (t.finish(), data)
}

/// Write `tar` as the only (gzip) layer of an image created at `created` to an OCI layout at
/// `layout`, tagged `tag`, and index it with `clip-build` into `index`.
pub fn one_layer_image(tar: Vec<u8>, created: &str, layout: &Path, tag: &str, index: &Path) {
    one_layer_image_with_config(tar, created, layout, tag, index, serde_json::json!({}));
}

/// [`one_layer_image`] whose config says how its containers start (`runtime`: the
/// config's `config` object, e.g. `Env` and `WorkingDir`).
pub fn one_layer_image_with_config(
    tar: Vec<u8>,
    created: &str,
    layout: &Path,
    tag: &str,
    index: &Path,
    runtime: serde_json::Value,
) {
    let mut w = LayoutWriter::create(layout).unwrap();
    let m = w
        .image_with_config(
            &[LayerInput::gzip(tar)],
            &Platform::host(),
            created,
            runtime,
        )
        .unwrap();
    w.tag(m, tag);
    w.finish().unwrap();
    run(Command::new(bin("clip-build"))
        .arg(format!("{}:{tag}", layout.display()))
        .arg("-o")
        .arg(index)
        .arg("--quiet"));
}

/// Lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A TCP port on 127.0.0.1 that was free when asked.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Entry numbers and paths (without the leading `/`) of the regular files of an index.
pub fn files(index: &IndexFile) -> Vec<(u32, String)> {
    (0..index.entry_count())
        .filter(|&i| index.entry(i).unwrap().kind == Kind::File as u8)
        .map(|i| {
            (
                i,
                String::from_utf8_lossy(&index.path_of(i).unwrap()[1..]).into_owned(),
            )
        })
        .collect()
}

/// Hex keys of every piece of every regular file.
pub fn piece_keys(index: &IndexFile) -> BTreeSet<String> {
    files(index)
        .iter()
        .flat_map(|(i, _)| index.pieces(*i).unwrap())
        .map(|p| p.key())
        .collect()
}

/// Read one whole file through `tiers` and `source`.
pub fn read_file(
    index: &IndexFile,
    source: &dyn Source,
    tiers: &[Arc<dyn Tier>],
    entry: u32,
) -> Vec<u8> {
    let mut r = FileReader::new(index, entry).unwrap();
    let mut out = vec![0u8; r.size() as usize];
    let n = r.read_at(index, source, tiers, 0, &mut out).unwrap();
    assert_eq!(n, out.len());
    out
}

/// Read every regular file; path → bytes.
pub fn read_all(
    index: &IndexFile,
    source: &dyn Source,
    tiers: &[Arc<dyn Tier>],
) -> BTreeMap<String, Vec<u8>> {
    files(index)
        .into_iter()
        .map(|(i, p)| (p, read_file(index, source, tiers, i)))
        .collect()
}

/// Regular files under `root` (symlinks and devices skipped): relative path → bytes.
pub fn tree_files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                dirs.push(p);
            } else if m.is_file() {
                out.insert(
                    p.strip_prefix(root).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}
/// Mount `index` with clip-serve on an empty disk cache and the given Redis options, read every
/// file, stop the daemon; returns (files, final stats JSON, daemon log).
pub fn mount_and_read_all(
    tmp: &Path,
    name: &str,
    index: &Path,
    redis_args: &[&str],
) -> (BTreeMap<String, Vec<u8>>, serde_json::Value, String) {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: load the fuse module or give the container --device /dev/fuse"
    );
    require_tool("fusermount3");
    let mnt = tmp.join(name);
    std::fs::create_dir_all(&mnt).unwrap();
    let (log, stats) = (
        tmp.join(format!("{name}.log")),
        tmp.join(format!("{name}.stats.json")),
    );
    let mut child = Command::new(bin("clip-serve"))
        .arg(index)
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(tmp.join(format!("{name}-cache")))
        .arg("--stats-file")
        .arg(&stats)
        .args(redis_args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start clip-serve");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let t = Instant::now();
    while !is_mounted(&mnt) {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "clip-serve exited with {st} before mounting:\n{}",
                read_log()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "clip-serve did not mount in 20 s:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let files = tree_files(&mnt);
    run(Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string()));
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!(
                "clip-serve did not exit in 20 s after SIGTERM:\n{}",
                read_log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "clip-serve failed:\n{}", read_log());
    assert!(!is_mounted(&mnt));
    let stats = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    (files, stats, read_log())
}

pub use clip::source::counting::Counting;

/// A [`Counting`] source over the OCI layout at `layout` (the origin calls a cache tier
/// should have saved).
pub fn counting_layout(layout: &Path) -> Counting {
    Counting::new(std::sync::Arc::new(LayoutSource::open(layout).unwrap()))
}
