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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A free loopback port (bound then released; the registry binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How the registry authenticates clients.
enum Auth {
    None,
    /// htpasswd file.
    Basic(PathBuf),
    /// Token auth: realm URL, issuer, service, PEM bundle of the signing certificate.
    Token {
        realm: String,
        issuer: String,
        service: String,
        bundle: PathBuf,
    },
}

/// A `docker-registry serve` process on 127.0.0.1, killed on drop.
struct Registry {
    child: Child,
    port: u16,
    dir: PathBuf,
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
            cfg += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
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
        let mut r = Registry {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = r.child.try_wait().unwrap() {
                panic!("docker-registry exited with {status}: {}", r.log());
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "docker-registry did not listen in 15 s: {}",
                r.log()
            );
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

    /// Push `oci:LAYOUT:TAG` to `HOST/repo`, with `--all` for image indexes; returns the
    /// digest of the pushed manifest (skopeo may rewrite it on the way).
    fn push(&self, layout: &Path, tag: &str, repo: &str, creds: Option<&str>) -> String {
        let digestfile = self.dir.join("pushed-digest");
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--all", "--dest-tls-verify=false"])
            .arg("--digestfile")
            .arg(&digestfile);
        if let Some(c) = creds {
            cmd.arg(format!("--dest-creds={c}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}", self.host()));
        let out = cmd.output().expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}\nregistry log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        std::fs::read_to_string(&digestfile)
            .unwrap()
            .trim()
            .to_string()
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
    let o = clip_build(env)
        .arg(image)
        .arg("-o")
        .arg(out)
        .arg("--quiet")
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "clip-build {image} failed: {stderr}");
    stderr
}

fn build_err(image: &str, out: &Path, env: &[(&str, &str)]) -> String {
    let o = clip_build(env)
        .arg(image)
        .arg("-o")
        .arg(out)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(!o.status.success(), "clip-build {image} should fail");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        e.trim().lines().count(),
        1,
        "the error should be one line: {e}"
    );
    e
}

fn ls(index: &Path) -> Vec<u8> {
    run(Command::new(bin("clip-build"))
        .arg("ls")
        .arg("-R")
        .arg(index))
}

fn source_of(index: &Path) -> String {
    let idx = IndexFile::open(index).unwrap();
    String::from_utf8(idx.index().image.source.as_slice().to_vec()).unwrap()
}

/// Every regular file of `index`, read with `clip-build cat` through the source recorded in
/// it, must equal the same file read from `local` (the layout-built index) and its layout.
/// skopeo compresses plain tar layers on push, so the two indexes may differ in layers but
/// not in content.
fn cat_all_matches_layout(
    index: &Path,
    local: &Path,
    layout: &Path,
    env: &[(&str, &str)],
) -> usize {
    let idx = IndexFile::open(index).unwrap();
    let mut files = 0;
    for line in String::from_utf8(ls(index)).unwrap().lines() {
        let path = line.rsplit(' ').next().unwrap();
        let Ok(Some(i)) = idx.resolve(path.as_bytes()) else {
            continue;
        };
        if idx.entry(i).unwrap().kind != Kind::File as u8 {
            continue;
        }
        let o = clip_build(env)
            .arg("cat")
            .arg(index)
            .arg(path)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "cat {path}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let want = run(Command::new(bin("clip-build"))
            .arg("cat")
            .arg(local)
            .arg(path)
            .arg("--layout")
            .arg(layout));
        assert!(
            o.stdout == want,
            "{path} differs between the registry and the layout"
        );
        files += 1;
    }
    files
}

fn verify_content(index: &Path, env: &[(&str, &str)]) -> String {
    let o = clip_build(env)
        .arg("verify")
        .arg("--content")
        .arg(index)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "verify --content {}: {e}",
        index.display()
    );
    e
}

/// An anonymous registry holding the edge image as `repo` (with tag): the registry, the
/// edge layout, its locally built index and the pushed manifest's digest.
fn edge_in_registry(tmp: &Path, repo: &str) -> (Registry, PathBuf, PathBuf, String) {
    let reg = Registry::anonymous(&tmp.join("reg"));
    let (layout, local) = edge_reference(tmp);
    let digest = reg.push(&layout, EDGE_TAG, repo, None);
    (reg, layout, local, digest)
}

/// The edge-case layout, indexed from disk; returns (layout, layout-built index).
fn edge_reference(tmp: &Path) -> (PathBuf, PathBuf) {
    edge_index(tmp)
}

/// The `edge` repository of the registry (or front) listening on loopback `port`.
fn edge_source(port: u16) -> clip::source::registry::RegistrySource {
    clip::source::registry::RegistrySource::open(
        &clip::source::reference::Reference::parse(&format!("127.0.0.1:{port}/edge")).unwrap(),
        &Default::default(),
    )
    .unwrap()
}

/// Read `/etc/hostname` of the edge image from `src` with a fresh reader that keeps its
/// interval's other files (finishing the interval) but has no cache tier, so every call
/// is a blob request.
fn read_hostname(idx: &IndexFile, src: &dyn Source, neighbours: &Arc<clip::read::Neighbours>) {
    let i = idx.resolve(b"/etc/hostname").unwrap().unwrap();
    let mut r = clip::read::FileReader::new(idx, i)
        .unwrap()
        .with_neighbours(neighbours.clone());
    let mut out = vec![0u8; r.size() as usize];
    assert_eq!(r.read_at(idx, src, &[], 0, &mut out).unwrap(), out.len());
    assert_eq!(out, b"edge\n");
}

#[test]
fn build_by_tag_and_digest_matches_the_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, layout, local, digest) = edge_in_registry(tmp.path(), "team/edge:v1");

    let by_tag = tmp.path().join("tag.clip");
    build_ok(&format!("{}/team/edge:v1", reg.host()), &by_tag, &[], &[]);
    assert_eq!(
        ls(&by_tag),
        ls(&local),
        "the registry-built tree differs from the layout-built one"
    );
    assert_eq!(
        source_of(&by_tag),
        format!("registry+http://{}/team/edge", reg.host())
    );
    let idx = IndexFile::open(&by_tag).unwrap();
    assert_eq!(
        idx.index().image.manifest_digest.as_slice(),
        digest.as_bytes()
    );
    assert_eq!(
        idx.index().image.reference.as_slice(),
        format!("{}/team/edge:v1", reg.host()).as_bytes()
    );
    drop(idx);

    let by_digest = tmp.path().join("digest.clip");
    build_ok(
        &format!("docker://{}/team/edge@{digest}", reg.host()),
        &by_digest,
        &[],
        &[],
    );
    assert_eq!(ls(&by_digest), ls(&local));
    let idx = IndexFile::open(&by_digest).unwrap();
    assert_eq!(
        idx.index().image.manifest_digest.as_slice(),
        digest.as_bytes()
    );

    // A tag and a digest that disagree: the digest wins and is verified.
    let both = tmp.path().join("both.clip");
    build_ok(
        &format!("{}/team/edge:nonexistent-tag@{digest}", reg.host()),
        &both,
        &[],
        &[],
    );
    assert_eq!(ls(&both), ls(&local));

    let files = cat_all_matches_layout(&by_tag, &local, &layout, &[]);
    assert!(files > 60, "only {files} files compared");
    verify_content(&by_digest, &[]);
}

#[test]
fn multi_platform_index_picks_the_platform() {
    use clip::demo::TarBuilder;
    use clip::oci::Platform;
    use clip::source::layout::{LayerInput, LayoutWriter};
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::anonymous(&tmp.path().join("reg"));
    let layout = tmp.path().join("multi");
    let mut w = LayoutWriter::create(&layout).unwrap();
    let mut manifests = Vec::new();
    for arch in ["amd64", "arm64"] {
        let mut t = TarBuilder::new();
        t.dir("etc/", 0o755)
            .file("etc/arch", 0o644, format!("{arch}\n").as_bytes());
        let p = Platform {
            architecture: arch.into(),
            os: "linux".into(),
            variant: None,
        };
        manifests.push(
            w.image(&[LayerInput::gzip(t.finish())], &p, "2025-05-20T00:00:00Z")
                .unwrap(),
        );
    }
    let index = w.image_index(manifests).unwrap();
    w.tag(index, "multi");
    w.finish().unwrap();
    let index_digest = reg.push(&layout, "multi", "multi:1", None);

    for arch in ["amd64", "arm64"] {
        let out = tmp.path().join(format!("{arch}.clip"));
        build_ok(
            &format!("{}/multi:1", reg.host()),
            &out,
            &[],
            &["--platform", &format!("linux/{arch}")],
        );
        let idx = IndexFile::open(&out).unwrap();
        assert_eq!(
            idx.index().image.platform.as_slice(),
            format!("linux/{arch}").as_bytes()
        );
        assert_ne!(
            idx.index().image.manifest_digest.as_slice(),
            index_digest.as_bytes(),
            "the platform manifest is pinned, not the index"
        );
        let got = run(clip_build(&[]).arg("cat").arg(&out).arg("/etc/arch"));
        assert_eq!(got, format!("{arch}\n").into_bytes());
    }
    // By the index digest, too.
    let out = tmp.path().join("pinned.clip");
    build_ok(
        &format!("{}/multi@{index_digest}", reg.host()),
        &out,
        &[],
        &["--platform", "linux/arm64"],
    );
    assert_eq!(
        run(clip_build(&[]).arg("cat").arg(&out).arg("/etc/arch")),
        b"arm64\n"
    );
    let o = clip_build(&[])
        .arg(format!("{}/multi:1", reg.host()))
        .arg("-o")
        .arg(tmp.path().join("y.clip"))
        .args(["--platform", "linux/s390x"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("linux/s390x") && e.contains("linux/arm64"),
        "{e}"
    );
}

#[test]
fn errors_name_the_reference_and_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, _, _, _) = edge_in_registry(tmp.path(), "present:v1");
    let out = tmp.path().join("x.clip");

    let e = build_err(&format!("{}/absent:v1", reg.host()), &out, &[]);
    assert!(
        e.contains("repository")
            && e.contains(&format!("{}/absent", reg.host()))
            && e.contains("does not exist"),
        "{e}"
    );
    let e = build_err(&format!("{}/present:v2", reg.host()), &out, &[]);
    assert!(
        e.contains("v2")
            && e.contains(&format!("{}/present", reg.host()))
            && e.contains("unknown tag"),
        "{e}"
    );
    let missing = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let e = build_err(&format!("{}/present@{missing}", reg.host()), &out, &[]);
    assert!(e.contains(missing), "{e}");

    let dead = free_port();
    let e = build_err(&format!("127.0.0.1:{dead}/app:v1"), &out, &[]);
    assert!(
        e.contains(&format!("127.0.0.1:{dead}"))
            && e.contains("connection refused")
            && e.contains("running"),
        "{e}"
    );
    let e = build_err(
        &format!(
            "127.0.0.1:{}/Bad:v1",
            reg.host().rsplit(':').next().unwrap()
        ),
        &out,
        &[],
    );
    assert!(e.contains("invalid image reference"), "{e}");
    assert!(!out.exists());
}

/// What the test proxy does to the traffic it forwards.
#[derive(Clone, Copy, Default)]
struct ProxyMode {
    /// Remove `Range` from requests (the registry then answers 200 with the whole blob).
    strip_range: bool,
    /// Cut this many blob response bodies after `cut_after` body bytes.
    cuts: usize,
    cut_after: usize,
    /// Forward request number N (1-based) without its `Authorization` header, so the
    /// registry answers 401 to a client that holds a token.
    drop_auth_of: usize,
    /// Answer every request after the first N (when N > 0) with 403, as object storage
    /// does once a signed URL expired.
    deny_after: usize,
}

/// A loopback HTTP proxy in front of the registry, one request per connection.
struct Proxy {
    port: u16,
    /// `Range` headers of blob requests, as the client sent them.
    ranges: Arc<Mutex<Vec<String>>>,
    /// Blob bodies cut so far.
    cut: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// While set, every blob body is forwarded with every 4096th byte flipped.
    lying: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: u16, mode: ProxyMode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let cut = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let lying = Arc::new(AtomicBool::new(false));
        let (r, c, n, l) = (ranges.clone(), cut.clone(), requests.clone(), lying.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (r, c, n, l) = (r.clone(), c.clone(), n.clone(), l.clone());
                std::thread::spawn(move || {
                    let _ = Proxy::serve(conn, upstream, mode, &r, &c, &n, &l);
                });
            }
        });
        Proxy {
            port,
            ranges,
            cut,
            requests,
            lying,
        }
    }

    fn serve(
        client: TcpStream,
        upstream: u16,
        mode: ProxyMode,
        ranges: &Mutex<Vec<String>>,
        cut: &AtomicUsize,
        requests: &AtomicUsize,
        lying: &AtomicBool,
    ) -> std::io::Result<()> {
        let mut reader = BufReader::new(client.try_clone()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        let nth = requests.fetch_add(1, Ordering::SeqCst) + 1;
        if mode.deny_after > 0 && nth > mode.deny_after {
            let mut client = client;
            client.write_all(
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            return Ok(());
        }
        let blob = request_line.starts_with("GET ") && request_line.contains("/blobs/");
        let mut head = request_line.clone();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
            if name == "range" && blob {
                ranges
                    .lock()
                    .unwrap()
                    .push(line.split_once(':').unwrap().1.trim().to_string());
            }
            let drop = name == "connection"
                || (name == "range" && mode.strip_range)
                || (name == "authorization" && nth == mode.drop_auth_of);
            if !drop {
                head.push_str(&line);
            }
        }
        head.push_str("Connection: close\r\n\r\n");
        let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
        up.write_all(head.as_bytes())?;
        let mut client = client;
        let mut up_reader = BufReader::new(up);
        // Response head.
        let mut resp_head = Vec::new();
        loop {
            let mut line = Vec::new();
            up_reader.read_until(b'\n', &mut line)?;
            resp_head.extend_from_slice(&line);
            if line == b"\r\n" || line.is_empty() {
                break;
            }
        }
        client.write_all(&resp_head)?;
        let ok = resp_head.starts_with(b"HTTP/1.1 200") || resp_head.starts_with(b"HTTP/1.1 206");
        if blob && ok && cut.load(Ordering::SeqCst) < mode.cuts {
            cut.fetch_add(1, Ordering::SeqCst);
            std::io::copy(&mut up_reader.take(mode.cut_after as u64), &mut client)?;
            client.shutdown(std::net::Shutdown::Both)?;
            return Ok(());
        }
        if blob && ok && lying.load(Ordering::SeqCst) {
            let mut body = Vec::new();
            up_reader.read_to_end(&mut body)?;
            for b in body.iter_mut().step_by(4096) {
                *b ^= 0x55;
            }
            return client.write_all(&body);
        }
        std::io::copy(&mut up_reader, &mut client)?;
        Ok(())
    }
}

#[test]
fn range_ignoring_server_and_cut_connections_still_read_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, layout, local, _) = edge_in_registry(tmp.path(), "edge:v1");

    // Ranges stripped: every read gets the whole blob and must skip and truncate.
    let strip = Proxy::start(
        reg.port,
        ProxyMode {
            strip_range: true,
            ..Default::default()
        },
    );
    let via_strip = tmp.path().join("strip.clip");
    build_ok(
        &format!("127.0.0.1:{}/edge:v1", strip.port),
        &via_strip,
        &[],
        &[],
    );
    assert_eq!(ls(&via_strip), ls(&local));
    assert!(cat_all_matches_layout(&via_strip, &local, &layout, &[]) > 60);
    let ranges = strip.ranges.lock().unwrap().clone();
    assert!(
        ranges.iter().any(|r| !r.starts_with("bytes=0-")),
        "reads should ask for ranges from checkpoints past the start: {ranges:?}"
    );

    // Bodies cut after 100 KB, five times: the build resumes with Range from where it was.
    let cutter = Proxy::start(
        reg.port,
        ProxyMode {
            cuts: 5,
            cut_after: 100_000,
            ..Default::default()
        },
    );
    let via_cut = tmp.path().join("cut.clip");
    build_ok(
        &format!("127.0.0.1:{}/edge:v1", cutter.port),
        &via_cut,
        &[],
        &[],
    );
    assert_eq!(
        cutter.cut.load(Ordering::SeqCst),
        5,
        "the proxy should have cut five bodies"
    );
    assert_eq!(ls(&via_cut), ls(&local));
    let resumed = cutter.ranges.lock().unwrap().clone();
    assert!(
        resumed.iter().any(|r| r.starts_with("bytes=100000-")),
        "no resume from byte 100000: {resumed:?}"
    );
    // Reads through a cutting proxy are exact too (verify hashes every file).
    let cutter2 = Proxy::start(
        reg.port,
        ProxyMode {
            cuts: 3,
            cut_after: 5_000,
            ..Default::default()
        },
    );
    let idx_bytes = std::fs::read(&via_cut).unwrap();
    let via_cut2 = tmp.path().join("cut2.clip");
    std::fs::write(&via_cut2, &idx_bytes).unwrap();
    let src = edge_source(cutter2.port);
    let idx = IndexFile::open(&via_cut2).unwrap();
    let mut files = 0;
    for i in 0..idx.entry_count() {
        if idx.entry(i).unwrap().kind != Kind::File as u8 {
            continue;
        }
        let mut r = clip::read::FileReader::new(&idx, i).unwrap();
        for k in 0..r.pieces().len() {
            r.piece(&idx, &src, &[], k)
                .unwrap_or_else(|e| panic!("entry {i} piece {k}: {e}"));
        }
        files += 1;
    }
    assert!(files > 60);
    assert_eq!(cutter2.cut.load(Ordering::SeqCst), 3);
    // A server that always cuts: bounded retries, then a clear error.
    let always = Proxy::start(
        reg.port,
        ProxyMode {
            cuts: usize::MAX,
            cut_after: 1000,
            ..Default::default()
        },
    );
    let src = clip::source::registry::RegistrySource::open(
        &clip::source::reference::Reference::parse(&format!("127.0.0.1:{}/edge", always.port))
            .unwrap(),
        &clip::source::registry::RegistryOptions {
            retries: 2,
            backoff: Duration::from_millis(10),
            ..Default::default()
        },
    )
    .unwrap();
    let layer = String::from_utf8(idx.layer(0).unwrap().digest.as_slice().to_vec()).unwrap();
    let mut sink = Vec::new();
    let err = src
        .blob(&layer, 0, None)
        .unwrap()
        .read_to_end(&mut sink)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&layer) && err.contains("resuming failed"),
        "{err}"
    );
    let n = always.requests.load(Ordering::SeqCst);
    assert!(
        (2..=18).contains(&n),
        "resumes must be bounded: {n} requests"
    );
}

#[test]
fn clip_serve_mounts_a_registry_built_index_and_reads_through_the_registry() {
    require_tool("fusermount3");
    let tmp = tempfile::tempdir().unwrap();
    let (reg, _, _, _) = edge_in_registry(tmp.path(), "edge:v1");
    let index = tmp.path().join("reg.clip");
    build_ok(&format!("{}/edge:v1", reg.host()), &index, &[], &[]);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let stats = tmp.path().join("stats.json");
    let mut daemon = Command::new(bin("clip-serve"))
        .arg(&index)
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .arg("--stats-file")
        .arg(&stats)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mounted = |m: &Path| {
        Command::new("mountpoint")
            .arg("-q")
            .arg(m)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let t = std::time::Instant::now();
    while !mounted(&mnt) {
        if t.elapsed() > Duration::from_secs(20) || daemon.try_wait().unwrap().is_some() {
            let _ = daemon.kill();
            panic!("clip-serve did not mount the registry-built index");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // No --layout: the bytes come from the registry recorded in the index.
    let random = std::fs::read(mnt.join("data/random.bin"));
    let hostname = std::fs::read(mnt.join("etc/hostname"));
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(daemon.id().to_string())
        .status();
    let status = daemon.wait().unwrap();
    if mounted(&mnt) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&mnt)
            .status();
    }
    assert_eq!(random.unwrap(), clip::demo::noise(1, 5 << 20));
    assert_eq!(hostname.unwrap(), b"edge\n");
    assert!(status.success(), "clip-serve exited with {status}");
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    assert!(
        s["serve"]["fetched"].as_u64().unwrap() > 0,
        "read from the registry: {s}"
    );
}

/// `clip-serve --source` reads the blobs from another registry (a mirror, here a proxy in
/// front of the same registry). While that mirror lies (flipped bytes in every blob body),
/// reads fail with EIO and nothing it sent is served or cached; once it tells the truth,
/// the same files read right.
#[test]
fn a_lying_mirror_gives_errors_never_wrong_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, _, _, _) = edge_in_registry(tmp.path(), "edge:v1");
    let index = tmp.path().join("reg.clip");
    build_ok(&format!("{}/edge:v1", reg.host()), &index, &[], &[]);
    let mirror = Proxy::start(reg.port, ProxyMode::default());
    mirror.lying.store(true, Ordering::SeqCst);
    let cache = tmp.path().join("cache");
    let source = format!("127.0.0.1:{}/edge", mirror.port);
    let mut served = Served::start(tmp.path(), "mnt", &index, &cache, &["--source", &source]);
    let files = [
        ("data/random.bin", clip::demo::noise(1, 5 << 20)),
        ("etc/hostname", b"edge\n".to_vec()),
        ("usr/bin/ping", b"ping with a capability\n".to_vec()),
    ];
    for (f, _) in &files {
        let err = std::fs::read(served.mnt.join(f)).expect_err(f);
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{f}: {err}");
    }
    assert!(
        mirror.requests.load(Ordering::SeqCst) > 0,
        "the reads went to the mirror"
    );
    // Every other file fails too; the log names the first ten failures a minute only.
    let mut failed = files.len();
    for (_, rel) in common::files(&IndexFile::open(&index).unwrap()) {
        let path = served.mnt.join(&rel);
        if std::fs::metadata(&path).unwrap().len() > 0 && !files.iter().any(|(f, _)| *f == rel) {
            let err = std::fs::read(&path).expect_err(&rel);
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{rel}: {err}");
            failed += 1;
        }
    }
    assert!(failed > 20, "{failed} files read");
    mirror.lying.store(false, Ordering::SeqCst);
    for (f, want) in &files {
        assert!(std::fs::read(served.mnt.join(f)).unwrap() == *want, "{f}");
    }
    let status = served.terminate();
    assert!(status.success(), "clip-serve exited with {status}");
    let log = plain(&served.log());
    assert!(log.contains("127.0.0.1:") && log.contains("/edge"), "{log}");
    let logged = log.matches("read failed").count();
    assert!(
        (1..=10).contains(&logged),
        "{logged} failures logged:\n{log}"
    );
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&served.stats).unwrap()).unwrap();
    assert!(
        stats["serve"]["read_errors"].as_u64().unwrap() >= failed as u64,
        "every failure is counted: {stats}"
    );
}

/// Requested (start, end exclusive) byte ranges of blob `digest` seen by `proxy`.
fn blob_ranges(proxy: &Proxy, from: usize) -> Vec<(u64, u64)> {
    proxy.ranges.lock().unwrap()[from..]
        .iter()
        .filter_map(|r| {
            let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
            Some((a.parse().ok()?, b.parse::<u64>().ok()? + 1))
        })
        .collect()
}

#[test]
fn cold_reads_fetch_growing_ranges_not_the_rest_of_the_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, _, local, _) = edge_in_registry(tmp.path(), "edge:v1");
    let proxy = Proxy::start(reg.port, ProxyMode::default());
    let src = edge_source(proxy.port);
    let idx = IndexFile::open(&local).unwrap();
    let blob_size = idx.layer(0).unwrap().compressed_size.to_native();
    let read = |path: &str| {
        let i = idx.resolve(path.as_bytes()).unwrap().unwrap();
        let mut r = clip::read::FileReader::new(&idx, i).unwrap();
        let mut out = vec![0u8; r.size() as usize];
        assert_eq!(r.read_at(&idx, &src, &[], 0, &mut out).unwrap(), out.len());
        (out, r.origin_stats().1)
    };
    // A small file: one request, for about one checkpoint interval, not the rest of the layer.
    let before = proxy.ranges.lock().unwrap().len();
    let (bytes, fetched) = read("/etc/hostname");
    assert_eq!(bytes, b"edge\n");
    let ranges = blob_ranges(&proxy, before);
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    assert!(
        ranges[0].1 - ranges[0].0 < blob_size / 2,
        "asked for {ranges:?} of a {blob_size}-byte blob"
    );
    assert!(fetched <= ranges[0].1 - ranges[0].0);
    // A 5 MiB file read through: growing ranges, together about the file's compressed size.
    let before = proxy.ranges.lock().unwrap().len();
    let (bytes, _) = read("/data/random.bin");
    assert_eq!(bytes, clip::demo::noise(1, 5 << 20));
    let ranges = blob_ranges(&proxy, before);
    assert!(ranges.len() >= 2, "{ranges:?}");
    assert!(
        ranges.windows(2).all(|w| w[1].0 == w[0].1),
        "ranges follow each other: {ranges:?}"
    );
    let lens: Vec<u64> = ranges.iter().map(|r| r.1 - r.0).collect();
    assert!(
        lens.windows(2)
            .take(lens.len().saturating_sub(2))
            .all(|w| w[1] >= w[0]),
        "ranges grow: {lens:?}"
    );
    let asked: u64 = lens.iter().sum();
    assert!(
        asked < (5 << 20) * 2,
        "asked for {asked} bytes to read a 5 MiB file"
    );
}

fn openssl(args: &[&str], dir: &Path) {
    require_tool("openssl");
    run(Command::new("openssl").args(args).current_dir(dir));
}

/// A test CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, cert, key).
fn test_tls(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=clip test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ];
    ca.extend(ec);
    ca.extend([
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca, dir);
    let mut csr = vec![
        "req",
        "-new",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
    ];
    csr.extend(ec);
    openssl(&csr, dir);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "srv.pem",
        ],
        dir,
    );
    (dir.join("ca.pem"), dir.join("srv.pem"), dir.join("srv.key"))
}

#[test]
fn basic_auth_over_tls_with_env_docker_config_and_credential_helper() {
    use base64::Engine;
    require_tool("htpasswd");
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_tls(&tmp.path().join("tls"));
    let htpasswd = tmp.path().join("htpasswd");
    let out = run(Command::new("htpasswd").args(["-Bbn", "alice", "s3cret-pw"]));
    std::fs::write(&htpasswd, out).unwrap();
    let reg = Registry::start(
        &tmp.path().join("reg"),
        Auth::Basic(htpasswd),
        Some((&cert, &key)),
    );
    let (layout, local) = edge_reference(tmp.path());
    reg.push(
        &layout,
        EDGE_TAG,
        "private/edge:v1",
        Some("alice:s3cret-pw"),
    );
    let image = format!("{}/private/edge:v1", reg.host());
    let ca_s = ca.to_str().unwrap();
    let tls = [
        ("CLIP_REGISTRY_PLAIN_HTTP", "0"),
        ("CLIP_REGISTRY_CA_FILE", ca_s),
    ];
    let x = tmp.path().join("x.clip");

    // Without a login: denied, and the message says how to log in.
    let e = build_err(&image, &x, &tls);
    assert!(
        e.contains(&format!("{}/private/edge", reg.host()))
            && e.contains("docker login")
            && e.contains("CLIP_REGISTRY_USERNAME"),
        "{e}"
    );
    // Without the CA: a TLS error that names the fix.
    let e = build_err(
        &image,
        &x,
        &[
            ("CLIP_REGISTRY_PLAIN_HTTP", "0"),
            ("CLIP_REGISTRY_USERNAME", "alice"),
            ("CLIP_REGISTRY_PASSWORD", "s3cret-pw"),
        ],
    );
    assert!(
        e.contains("TLS") && e.contains("CLIP_REGISTRY_CA_FILE"),
        "{e}"
    );
    // A wrong password.
    let mut bad = tls.to_vec();
    bad.extend([
        ("CLIP_REGISTRY_USERNAME", "alice"),
        ("CLIP_REGISTRY_PASSWORD", "wrong"),
    ]);
    let e = build_err(&image, &x, &bad);
    assert!(e.contains("denied") && !e.contains("wrong"), "{e}");

    // Login from the environment, with debug logs that must not show the secret.
    let mut env = tls.to_vec();
    env.extend([
        ("CLIP_REGISTRY_USERNAME", "alice"),
        ("CLIP_REGISTRY_PASSWORD", "s3cret-pw"),
        ("RUST_LOG", "debug"),
    ]);
    let by_env = tmp.path().join("env.clip");
    let logs = build_ok(&image, &by_env, &env, &[]);
    assert_eq!(ls(&by_env), ls(&local));
    assert_eq!(
        source_of(&by_env),
        format!("registry://{}/private/edge", reg.host())
    );
    let basic = base64::engine::general_purpose::STANDARD.encode("alice:s3cret-pw");
    assert!(
        !logs.contains("s3cret-pw") && !logs.contains(&basic),
        "secret in the logs:\n{logs}"
    );
    let bytes = std::fs::read(&by_env).unwrap();
    for s in ["s3cret-pw", basic.as_str(), "alice"] {
        assert!(
            !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
            "{s} is in the index file"
        );
    }
    verify_content(&by_env, &env);

    // Login from a docker config `auths` entry.
    let cfg = tmp.path().join("docker");
    std::fs::create_dir_all(&cfg).unwrap();
    let auths = serde_json::json!({"auths": {reg.host(): {"auth": basic}}});
    std::fs::write(cfg.join("config.json"), auths.to_string()).unwrap();
    let mut env = tls.to_vec();
    env.push(("DOCKER_CONFIG", cfg.to_str().unwrap()));
    let by_cfg = tmp.path().join("cfg.clip");
    build_ok(&image, &by_cfg, &env, &[]);
    assert_eq!(ls(&by_cfg), ls(&local));

    // Login from a credential helper (`credHelpers`), a script on PATH.
    let helper_dir = tmp.path().join("helper");
    std::fs::create_dir_all(&helper_dir).unwrap();
    let asked = helper_dir.join("asked");
    let script = helper_dir.join("docker-credential-cliptest");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\ncat > {}\necho '{{\"ServerURL\":\"{}\",\"Username\":\"alice\",\"Secret\":\"s3cret-pw\"}}'\n",
            asked.display(),
            reg.host()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg2 = tmp.path().join("docker2");
    std::fs::create_dir_all(&cfg2).unwrap();
    std::fs::write(
        cfg2.join("config.json"),
        serde_json::json!({"credHelpers": {reg.host(): "cliptest"}}).to_string(),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        helper_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut env = tls.to_vec();
    env.extend([
        ("DOCKER_CONFIG", cfg2.to_str().unwrap()),
        ("PATH", path.as_str()),
    ]);
    let by_helper = tmp.path().join("helper.clip");
    build_ok(&image, &by_helper, &env, &[]);
    assert_eq!(ls(&by_helper), ls(&local));
    assert_eq!(
        std::fs::read_to_string(&asked).unwrap(),
        reg.host(),
        "the helper is asked for the registry host"
    );
}

/// A token issuer for distribution's `auth: token`: RS256 JWTs signed with `openssl dgst`,
/// key id in libtrust form, granting whatever scope a client asks for if it logs in as
/// `alice` with `tok-pw`.
struct TokenIssuer {
    port: u16,
    issued: Arc<AtomicUsize>,
    bundle: PathBuf,
}

const ISSUER: &str = "clip-test-issuer";
const SERVICE: &str = "clip-test-registry";

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

impl TokenIssuer {
    fn start(dir: &Path) -> TokenIssuer {
        use sha2::Digest;
        std::fs::create_dir_all(dir).unwrap();
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=clip token issuer",
                "-keyout",
                "tok.key",
                "-out",
                "tok.pem",
            ],
            dir,
        );
        openssl(
            &[
                "pkey",
                "-in",
                "tok.key",
                "-pubout",
                "-outform",
                "DER",
                "-out",
                "tok.pub.der",
            ],
            dir,
        );
        let spki = std::fs::read(dir.join("tok.pub.der")).unwrap();
        let hash = sha2::Sha256::digest(&spki);
        // libtrust key id: base32 of the first 240 bits, in groups of four.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        let mut bits = String::new();
        for b in &hash[..30] {
            bits.push_str(&format!("{b:08b}"));
        }
        let b32: String = bits
            .as_bytes()
            .chunks(5)
            .map(|c| {
                ALPHABET[usize::from_str_radix(std::str::from_utf8(c).unwrap(), 2).unwrap()] as char
            })
            .collect();
        let kid = b32
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let issued = Arc::new(AtomicUsize::new(0));
        let (key, n) = (dir.join("tok.key"), issued.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap();
                let mut authorized = false;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    use base64::Engine;
                    let want = format!(
                        "authorization: basic {}",
                        base64::engine::general_purpose::STANDARD.encode("alice:tok-pw")
                    );
                    authorized |= line.trim().eq_ignore_ascii_case(&want);
                }
                if !authorized {
                    let _ = conn.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    continue;
                }
                let query = request
                    .split(' ')
                    .nth(1)
                    .unwrap_or("")
                    .split_once('?')
                    .map(|(_, q)| q.to_string())
                    .unwrap_or_default();
                let mut access = Vec::new();
                for kv in query.split('&') {
                    if let Some(("scope", v)) = kv.split_once('=') {
                        let v = percent_decode(v);
                        let mut parts = v.splitn(3, ':');
                        let (kind, name, actions) = (
                            parts.next().unwrap(),
                            parts.next().unwrap_or(""),
                            parts.next().unwrap_or(""),
                        );
                        access.push(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}));
                    }
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let id = n.fetch_add(1, Ordering::SeqCst);
                let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "kid": kid});
                let claims = serde_json::json!({
                    "iss": ISSUER, "sub": "alice", "aud": SERVICE, "exp": now + 300, "nbf": now - 10,
                    "iat": now, "jti": format!("token-{id}"), "access": access,
                });
                let input = format!(
                    "{}.{}",
                    b64url(header.to_string().as_bytes()),
                    b64url(claims.to_string().as_bytes())
                );
                let mut sign = Command::new("openssl")
                    .args(["dgst", "-sha256", "-sign"])
                    .arg(&key)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                sign.stdin
                    .take()
                    .unwrap()
                    .write_all(input.as_bytes())
                    .unwrap();
                let sig = sign.wait_with_output().unwrap().stdout;
                let jwt = format!("{input}.{}", b64url(&sig));
                let body = serde_json::json!({"token": jwt, "expires_in": 300}).to_string();
                let _ = conn.write_all(
                    format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                        .as_bytes(),
                );
            }
        });
        TokenIssuer {
            port,
            issued,
            bundle: dir.join("tok.pem"),
        }
    }
}

#[test]
fn token_auth_fetches_caches_and_refreshes_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let issuer = TokenIssuer::start(&tmp.path().join("issuer"));
    let reg = Registry::start(
        &tmp.path().join("reg"),
        Auth::Token {
            realm: format!("http://127.0.0.1:{}/token", issuer.port),
            issuer: ISSUER.into(),
            service: SERVICE.into(),
            bundle: issuer.bundle.clone(),
        },
        None,
    );
    let (layout, local) = edge_reference(tmp.path());
    reg.push(&layout, EDGE_TAG, "tok/edge:v1", Some("alice:tok-pw"));
    let image = format!("{}/tok/edge:v1", reg.host());

    let e = build_err(&image, &tmp.path().join("x.clip"), &[]);
    assert!(
        e.contains("token service") && e.contains("docker login"),
        "{e}"
    );
    let e = build_err(
        &image,
        &tmp.path().join("x.clip"),
        &[
            ("CLIP_REGISTRY_USERNAME", "alice"),
            ("CLIP_REGISTRY_PASSWORD", "nope"),
        ],
    );
    assert!(e.contains("rejected the login"), "{e}");

    let env = [
        ("CLIP_REGISTRY_USERNAME", "alice"),
        ("CLIP_REGISTRY_PASSWORD", "tok-pw"),
        ("RUST_LOG", "debug"),
    ];
    let before = issuer.issued.load(Ordering::SeqCst);
    let out = tmp.path().join("tok.clip");
    let logs = build_ok(&image, &out, &env, &[]);
    assert!(
        !logs.contains("tok-pw") && !logs.contains("eyJ"),
        "a secret or token is in the logs:\n{logs}"
    );
    assert_eq!(ls(&out), ls(&local));
    assert_eq!(
        issuer.issued.load(Ordering::SeqCst) - before,
        1,
        "one token is fetched and reused for every request"
    );
    verify_content(&out, &env);

    // A 401 while holding a token (the proxy drops the token of the third request): the
    // client fetches a new token and carries on.
    let proxy = Proxy::start(
        reg.port,
        ProxyMode {
            drop_auth_of: 3,
            ..Default::default()
        },
    );
    let opts = clip::source::registry::RegistryOptions {
        credentials: Some(clip::source::auth::Credentials::Basic {
            username: "alice".into(),
            password: clip::source::auth::Secret::new("tok-pw"),
        }),
        ..Default::default()
    };
    let src = clip::source::registry::RegistrySource::open(
        &clip::source::reference::Reference::parse(&format!("127.0.0.1:{}/tok/edge", proxy.port))
            .unwrap(),
        &opts,
    )
    .unwrap();
    let before = issuer.issued.load(Ordering::SeqCst);
    let image = clip::oci::resolve(&src, "v1", &clip::oci::Platform::host()).unwrap();
    assert_eq!(
        issuer.issued.load(Ordering::SeqCst) - before,
        2,
        "a new token after the 401"
    );
    let mut blob = Vec::new();
    src.blob(&image.layers[0].digest, 0, None)
        .unwrap()
        .read_to_end(&mut blob)
        .unwrap();
    assert_eq!(clip::oci::digest_of(&blob), image.layers[0].digest);
}

/// A byte relay to `upstream` on loopback that counts the TCP connections clients open.
struct Relay {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl Relay {
    fn start(upstream: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let n = connections.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                n.fetch_add(1, Ordering::SeqCst);
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let pipe = |mut from: TcpStream, mut to: TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                };
                pipe(client.try_clone().unwrap(), up.try_clone().unwrap());
                pipe(up, client);
            }
        });
        Relay { port, connections }
    }
}

/// Blob reads one after another share keep-alive connections: a reader that keeps its
/// interval's other files reads each range to its end (ureq pools a connection only then)
/// and drains the few bytes it may stop short of, instead of every request opening a
/// connection of its own (a TCP and a TLS handshake each on a real registry).
#[test]
fn blob_reads_reuse_their_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, _, local, _) = edge_in_registry(tmp.path(), "edge:v1");
    let relay = Relay::start(reg.port);
    let registry = edge_source(relay.port);
    let src = clip::source::counting::Counting::new(Arc::new(registry));
    let idx = IndexFile::open(&local).unwrap();
    let neighbours = clip::read::Neighbours::new(idx.index().layers.len());
    let opened = relay.connections.load(Ordering::SeqCst);
    for _ in 0..4 {
        read_hostname(&idx, &src, &neighbours);
    }
    let requests = src.requests();
    let connections = relay.connections.load(Ordering::SeqCst) - opened;
    assert_eq!(requests, 4, "one blob request per read");
    assert!(
        connections <= 1,
        "{connections} connections for {requests} blob requests made one after another"
    );
}

/// A registry front that redirects every request (307) to `127.0.0.1:target` with the same
/// path, as registries send blob requests to object storage; the target can be switched.
struct Redirector {
    port: u16,
    target: Arc<std::sync::atomic::AtomicU16>,
    blob_requests: Arc<AtomicUsize>,
}

impl Redirector {
    fn start(target: u16) -> Redirector {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Arc::new(std::sync::atomic::AtomicU16::new(target));
        let blob_requests = Arc::new(AtomicUsize::new(0));
        let (t, n) = (target.clone(), blob_requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                        break;
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                if path.contains("/blobs/") {
                    n.fetch_add(1, Ordering::SeqCst);
                }
                let to = t.load(Ordering::SeqCst);
                let _ = write!(
                    conn,
                    "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{to}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        Redirector {
            port,
            target,
            blob_requests,
        }
    }
}

/// Blob requests redirected to another host (object storage) go there directly while the
/// target answers, and back to the registry when it stops answering (an expired URL).
#[test]
fn redirected_blob_reads_go_straight_to_the_target_until_it_expires() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, _, local, _) = edge_in_registry(tmp.path(), "edge:v1");
    // Storage A expires after two requests; storage B does not.
    let a = Proxy::start(
        reg.port,
        ProxyMode {
            deny_after: 2,
            ..ProxyMode::default()
        },
    );
    let b = Proxy::start(reg.port, ProxyMode::default());
    let front = Redirector::start(a.port);
    let src = edge_source(front.port);
    let idx = IndexFile::open(&local).unwrap();
    let neighbours = clip::read::Neighbours::new(idx.index().layers.len());
    let read = || read_hostname(&idx, &src, &neighbours);
    let a_before = a.requests.load(Ordering::SeqCst);
    read();
    read();
    assert_eq!(
        front.blob_requests.load(Ordering::SeqCst),
        1,
        "the second read went to A directly"
    );
    assert_eq!(a.requests.load(Ordering::SeqCst) - a_before, 2);
    // A's URL expires; the registry now sends readers to B.
    front.target.store(b.port, Ordering::SeqCst);
    read();
    read();
    assert_eq!(
        front.blob_requests.load(Ordering::SeqCst),
        2,
        "asked the registry again once A refused, then went to B directly"
    );
    assert_eq!(
        a.requests.load(Ordering::SeqCst) - a_before,
        3,
        "A refused once"
    );
    assert_eq!(b.requests.load(Ordering::SeqCst), 2);
}
