//! The registry source against a real registry: Debian's `docker-registry` (the CNCF
//! distribution registry) started on 127.0.0.1 per test, images pushed with `skopeo copy`
//! from layouts the tests write. Covers tag and digest references, a multi-platform index,
//! basic auth over TLS with a test CA, docker config and credential helpers, token auth
//! through a token issuer in this file, a proxy that ignores `Range` and one that cuts blob
//! bodies, and the error messages users see.

mod common;

use clip::format::{IndexFile, Kind};
use clip::source::Source;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A free loopback port (bound then released; the registry binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// How the registry authenticates clients.
enum Auth {
    None,
    /// htpasswd file.
    Basic(PathBuf),
    /// Token auth: realm URL, issuer, service, PEM bundle of the signing certificate.
    Token { realm: String, issuer: String, service: String, bundle: PathBuf },
}

/// A `docker-registry serve` process on 127.0.0.1, killed on drop.
struct Registry {
    child: Child,
    port: u16,
    dir: PathBuf,
    tls: bool,
}

impl Registry {
    fn start(dir: &Path, auth: Auth, tls: Option<(&Path, &Path)>) -> Registry {
        require_tool("docker-registry");
        require_tool("skopeo");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let port = free_port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  redirect:\n    disable: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: clip-test-secret\n",
            dir.join("data").display()
        );
        if let Some((cert, key)) = tls {
            cfg += &format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display());
        }
        match auth {
            Auth::None => {}
            Auth::Basic(htpasswd) => cfg += &format!("auth:\n  htpasswd:\n    realm: clip-test\n    path: {}\n", htpasswd.display()),
            Auth::Token { realm, issuer, service, bundle } => {
                cfg += &format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                    bundle.display()
                )
            }
        }
        std::fs::write(dir.join("config.yml"), cfg).unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let mut r = Registry { child, port, dir: dir.to_path_buf(), tls: tls.is_some() };
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = r.child.try_wait().unwrap() {
                panic!("docker-registry exited with {status}: {}", r.log());
            }
            assert!(t.elapsed() < Duration::from_secs(15), "docker-registry did not listen in 15 s: {}", r.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn anonymous(dir: &Path) -> Registry {
        Registry::start(dir, Auth::None, None)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Push `oci:LAYOUT:TAG` to `HOST/repo`, with `--all` for image indexes.
    fn push(&self, layout: &Path, tag: &str, repo: &str, creds: Option<&str>) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--all", "--dest-tls-verify=false"]);
        if let Some(c) = creds {
            cmd.arg(format!("--dest-creds={c}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display())).arg(format!("docker://{}/{repo}", self.host()));
        let out = cmd.output().expect("run skopeo");
        assert!(out.status.success(), "skopeo copy failed: {}\nregistry log:\n{}", String::from_utf8_lossy(&out.stderr), self.log());
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `clip-build` with a clean registry environment plus `env`.
fn clip_build(env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(bin("clip-build"));
    for v in [
        "CLIP_REGISTRY_PLAIN_HTTP",
        "CLIP_REGISTRY_INSECURE",
        "CLIP_REGISTRY_CA_FILE",
        "CLIP_REGISTRY_USERNAME",
        "CLIP_REGISTRY_PASSWORD",
    ] {
        c.env_remove(v);
    }
    // No docker config of the machine's user leaks in.
    c.env("DOCKER_CONFIG", "/nonexistent-clip-test-docker-config");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn build_ok(image: &str, out: &Path, env: &[(&str, &str)], extra: &[&str]) -> String {
    let o = clip_build(env).arg(image).arg("-o").arg(out).arg("--quiet").args(extra).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "clip-build {image} failed: {stderr}");
    stderr
}

fn build_err(image: &str, out: &Path, env: &[(&str, &str)]) -> String {
    let o = clip_build(env).arg(image).arg("-o").arg(out).arg("--quiet").output().unwrap();
    assert!(!o.status.success(), "clip-build {image} should fail");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(e.trim().lines().count(), 1, "the error should be one line: {e}");
    e
}

fn ls(index: &Path) -> Vec<u8> {
    run(Command::new(bin("clip-build")).arg("ls").arg("-R").arg(index))
}

fn source_of(index: &Path) -> String {
    let idx = IndexFile::open(index).unwrap();
    String::from_utf8(idx.index().image.source.as_slice().to_vec()).unwrap()
}

/// Every regular file of the index, read with `clip-build cat` through the source recorded
/// in it, must equal the same file read from `layout`.
fn cat_all_matches_layout(index: &Path, layout: &Path, env: &[(&str, &str)]) -> usize {
    let idx = IndexFile::open(index).unwrap();
    let mut files = 0;
    for line in String::from_utf8(ls(index)).unwrap().lines() {
        let path = line.rsplit(' ').next().unwrap();
        let Ok(Some(i)) = idx.resolve(path.as_bytes()) else { continue };
        if idx.entry(i).unwrap().kind != Kind::File as u8 {
            continue;
        }
        let o = clip_build(env).arg("cat").arg(index).arg(path).output().unwrap();
        assert!(o.status.success(), "cat {path}: {}", String::from_utf8_lossy(&o.stderr));
        let want = run(Command::new(bin("clip-build")).arg("cat").arg(index).arg(path).arg("--layout").arg(layout));
        assert!(o.stdout == want, "{path} differs between the registry and the layout");
        files += 1;
    }
    files
}

fn verify_content(index: &Path, env: &[(&str, &str)]) -> String {
    let o = clip_build(env).arg("verify").arg("--content").arg(index).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "verify --content {}: {e}", index.display());
    e
}

/// The edge-case layout, indexed from disk; returns (layout, layout-built index).
fn edge_reference(tmp: &Path) -> (PathBuf, PathBuf) {
    let layout = tmp.join("layout");
    clip::demo::write_demo(&layout).unwrap();
    let index = tmp.join("local.clip");
    run(Command::new(bin("clip-build")).arg(format!("{}:demo", layout.display())).arg("-o").arg(&index).arg("--quiet"));
    (layout, index)
}
const EDGE_TAG: &str = "demo";

fn manifest_digest(layout: &Path) -> String {
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    idx["manifests"][0]["digest"].as_str().unwrap().to_string()
}

#[test]
fn build_by_tag_and_digest_matches_the_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::anonymous(&tmp.path().join("reg"));
    let (layout, local) = edge_reference(tmp.path());
    reg.push(&layout, EDGE_TAG, "team/edge:v1", None);

    let by_tag = tmp.path().join("tag.clip");
    build_ok(&format!("{}/team/edge:v1", reg.host()), &by_tag, &[], &[]);
    assert_eq!(ls(&by_tag), ls(&local), "the registry-built tree differs from the layout-built one");
    assert_eq!(source_of(&by_tag), format!("registry+http://{}/team/edge", reg.host()));
    let idx = IndexFile::open(&by_tag).unwrap();
    let digest = manifest_digest(&layout);
    assert_eq!(idx.index().image.manifest_digest.as_slice(), digest.as_bytes());
    assert_eq!(idx.index().image.reference.as_slice(), format!("{}/team/edge:v1", reg.host()).as_bytes());
    drop(idx);

    let by_digest = tmp.path().join("digest.clip");
    build_ok(&format!("docker://{}/team/edge@{digest}", reg.host()), &by_digest, &[], &[]);
    assert_eq!(ls(&by_digest), ls(&local));
    let idx = IndexFile::open(&by_digest).unwrap();
    assert_eq!(idx.index().image.manifest_digest.as_slice(), digest.as_bytes());

    // A tag and a digest that disagree: the digest wins and is verified.
    let both = tmp.path().join("both.clip");
    build_ok(&format!("{}/team/edge:nonexistent-tag@{digest}", reg.host()), &both, &[], &[]);
    assert_eq!(ls(&both), ls(&local));

    let files = cat_all_matches_layout(&by_tag, &layout, &[]);
    assert!(files > 3, "only {files} files compared");
    verify_content(&by_digest, &[]);
}
