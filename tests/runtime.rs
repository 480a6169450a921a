//! Real containers on a clip mount: Debian's runc runs the static busybox image with an
//! overlayfs over the mount as its root (writes land in the upper dir), and with the mount
//! itself as a read-only root. Needs root, /dev/fuse, fusermount3 and runc.

mod common;

use clip::demo::noise;
use common::{busybox_index_with, require_tool, run, sha256_hex, Served};
use std::fs::{self, File};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long one container may run before the test fails.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The busybox image plus `/data/large` (24 MiB: many 1 MiB pieces, several checkpoint
/// intervals) and the mount points runc needs on a read-only root; returns the index and the
/// bytes of `/data/big` and `/data/large`.
fn runtime_index(tmp: &Path) -> (PathBuf, Vec<u8>, Vec<u8>) {
    let large = noise(11, 24 << 20);
    let (index, big) = busybox_index_with(tmp, |t| {
        t.dir("proc/", 0o555)
            .dir("sys/", 0o555)
            .dir("dev/", 0o755)
            .file("data/large", 0o644, &large);
    });
    (index, big, large)
}

/// Write an OCI bundle to `dir` (`runc spec`, then edited): root file system `root`, process
/// `/bin/busybox sh -c script` without a terminal.
fn bundle(dir: &Path, root: &Path, readonly: bool, script: &str) -> PathBuf {
    require_tool("runc");
    fs::create_dir_all(dir).unwrap();
    run(Command::new("runc").arg("spec").arg("--bundle").arg(dir));
    let config = dir.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&fs::read(&config).unwrap()).unwrap();
    spec["root"]["path"] = root.to_str().unwrap().into();
    spec["root"]["readonly"] = readonly.into();
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["/bin/busybox", "sh", "-c", script]);
    fs::write(&config, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    dir.to_path_buf()
}

/// A `runc run` in progress; dropping it force-deletes the container and reaps runc.
struct Container {
    id: String,
    runc: Child,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["delete", "-f", &self.id])
            .stderr(Stdio::null())
            .status();
        let _ = self.runc.kill();
        let _ = self.runc.wait();
    }
}

/// What a finished container left: exit code, stdout bytes, stderr text.
struct Outcome {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

/// Run the bundle with `runc run` under a unique id, wait at most [`TIMEOUT`].
fn run_container(bundle: &Path, name: &str) -> Outcome {
    let id = format!("clip-test-{name}-{}", std::process::id());
    let (out, err) = (bundle.join("stdout"), bundle.join("stderr"));
    let runc = Command::new("runc")
        .arg("run")
        .arg("--bundle")
        .arg(bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .expect("start runc");
    let mut container = Container { id, runc };
    let t = Instant::now();
    let status = loop {
        if let Some(st) = container.runc.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > TIMEOUT {
            panic!(
                "container {} still running after {TIMEOUT:?}:\n{}",
                container.id,
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.code(),
        stdout: fs::read(&out).unwrap(),
        stderr: fs::read_to_string(&err).unwrap(),
    }
}

#[test]
fn runc_runs_busybox_on_an_overlay_over_the_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path().canonicalize().unwrap();
    let (index, big, large) = runtime_index(&tmp);
    let served = Served::start(&tmp, "lower", &index, &tmp.join("cache"), &[]);
    let (merged, _overlay) = common::overlay(&tmp, &served.mnt);
    let upper = tmp.join("upper");

    let script = "cat /etc/motd /data/big; sha256sum /data/large; \
                  echo written in the container > /etc/created; echo appended >> /etc/motd; rm /bin/rm; \
                  cat /etc/created; exit 7";
    let dir = bundle(&tmp.join("bundle"), &merged, false, script);
    let ran = run_container(&dir, "overlay");
    assert_eq!(
        ran.code,
        Some(7),
        "the container's exit code is runc's; stderr:\n{}",
        ran.stderr
    );

    let image_bytes = [&b"hello from clip\n"[..], &big].concat();
    assert!(
        ran.stdout.len() > image_bytes.len(),
        "short stdout ({} bytes); stderr:\n{}",
        ran.stdout.len(),
        ran.stderr
    );
    let (cat, rest) = ran.stdout.split_at(image_bytes.len());
    assert!(
        cat == image_bytes,
        "`cat /etc/motd /data/big` in the container differs from the image's bytes"
    );
    let rest = String::from_utf8(rest.to_vec()).unwrap();
    assert_eq!(
        rest,
        format!(
            "{}  /data/large\nwritten in the container\n",
            sha256_hex(&large)
        ),
        "stderr:\n{}",
        ran.stderr
    );

    assert_eq!(
        fs::read(upper.join("etc/created")).unwrap(),
        b"written in the container\n",
        "new file in the upper dir"
    );
    assert_eq!(
        fs::read(upper.join("etc/motd")).unwrap(),
        b"hello from clip\nappended\n",
        "modified file copied up"
    );
    let whiteout = fs::symlink_metadata(upper.join("bin/rm")).unwrap();
    assert!(
        whiteout.file_type().is_char_device() && whiteout.rdev() == 0,
        "deletion is a whiteout in the upper dir"
    );
    assert!(
        !served.mnt.join("etc/created").exists(),
        "the clip mount is not written"
    );
    assert_eq!(
        fs::read(served.mnt.join("etc/motd")).unwrap(),
        b"hello from clip\n"
    );
    assert!(served.mnt.join("bin/rm").symlink_metadata().is_ok());
}

#[test]
fn runc_runs_busybox_on_the_mount_as_a_read_only_root() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path().canonicalize().unwrap();
    let (index, _, _) = runtime_index(&tmp);
    let served = Served::start(&tmp, "mnt", &index, &tmp.join("cache"), &[]);
    let script = "busybox ls -l / /bin; busybox cat /etc/motd; busybox touch /etc/new 2>&1 || echo touch refused";
    let dir = bundle(&tmp.join("bundle"), &served.mnt, true, script);
    let ran = run_container(&dir, "readonly");
    let out = String::from_utf8(ran.stdout).unwrap();
    assert_eq!(ran.code, Some(0), "stdout:\n{out}\nstderr:\n{}", ran.stderr);

    let entry = |name: &str| {
        let named = |l: &&str| l.split_whitespace().skip(8).collect::<Vec<_>>().join(" ") == name;
        out.lines()
            .find(named)
            .unwrap_or_else(|| panic!("no `{name}` in ls -l:\n{out}"))
    };
    for dir in ["bin", "data", "etc"] {
        assert!(
            entry(dir).starts_with("drwxr-xr-x") && entry(dir).contains(" May 20  2025 "),
            "mode and mtime from the image: {out}"
        );
    }
    assert!(entry("tmp").starts_with("drwxrwxrwt"), "sticky /tmp: {out}");
    assert!(
        entry("sh -> busybox").starts_with("lrwxrwxrwx"),
        "applet symlink: {out}"
    );
    let busybox_size = fs::metadata("/bin/busybox").unwrap().len();
    let bb = entry("busybox");
    assert!(
        bb.starts_with("-rwxr-xr-x") && bb.contains(&format!(" {busybox_size} ")),
        "busybox: {bb}"
    );
    assert!(out.contains("\nhello from clip\n"), "cat /etc/motd: {out}");
    assert!(
        out.contains("Read-only file system") && out.trim_end().ends_with("touch refused"),
        "writes refused: {out}"
    );
    assert!(!served.mnt.join("etc/new").exists());
}
