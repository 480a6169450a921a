//! The Redis tier against a real Redis Cluster: three `redis-server --cluster-enabled yes`
//! primaries on loopback ports, joined with `redis-cli --cluster create`. clip-serve fills
//! the cluster from the origin across its nodes and a second mount reads everything from
//! it; a node that is killed or stopped mid-run only costs a fall-through to the origin.

mod common;

use clip::cache::redis::{RedisConfig, RedisTier};
use clip::format::IndexFile;
use clip::read::Tier;
use clip::source::layout::LayoutSource;
use common::{
    edge_index, files, free_port, mount_and_read_all, piece_keys, read_all, read_file,
    require_tool, run,
};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Primaries in the test cluster.
const NODES: usize = 3;

/// One cluster node: its client port and the running server.
struct Node {
    port: u16,
    child: Option<Child>,
}

/// A Redis Cluster of [`NODES`] primaries on 127.0.0.1 without persistence, each in its own
/// directory; every server is killed when this is dropped.
struct Cluster {
    nodes: Vec<Node>,
}

impl Cluster {
    /// Start the servers, join them into one cluster (no replicas) and wait until every
    /// node reports `cluster_state:ok`.
    fn start(dir: &Path) -> Cluster {
        require_tool("redis-server");
        require_tool("redis-cli");
        let mut taken = BTreeSet::new();
        let mut port = || {
            std::iter::repeat_with(free_port)
                .find(|p| taken.insert(*p))
                .unwrap()
        };
        let mut cluster = Cluster { nodes: Vec::new() };
        for i in 0..NODES {
            let (client, bus) = (port(), port());
            let node_dir = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &client.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                ])
                .args([
                    "--cluster-port",
                    &bus.to_string(),
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect(
                    "cannot start redis-server; run .ci/run (it apt-get installs redis-server)",
                );
            cluster.nodes.push(Node {
                port: client,
                child: Some(child),
            });
            cluster.wait(i, "answer PING", |c| {
                redis::cmd("PING").query::<String>(c).is_ok()
            });
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        run(Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"]));
        for i in 0..NODES {
            cluster.wait(i, "report cluster_state:ok", |c| {
                redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query::<String>(c)
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            });
        }
        cluster
    }

    /// Poll node `i` until `ready` holds, at most 20 s.
    fn wait(&self, i: usize, what: &str, ready: impl Fn(&mut redis::Connection) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let client = redis::Client::open(self.url(i)).unwrap();
            if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) {
                if ready(&mut c) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "cluster node {i} (port {}) did not {what} within 20 s",
                self.nodes[i].port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[i].port)
    }

    /// Seed URLs of two of the nodes: the third must be discovered.
    fn seeds(&self) -> Vec<String> {
        (0..2).map(|i| self.url(i)).collect()
    }

    /// A plain connection to node `i` alone (no cluster routing), for inspection.
    fn conn(&self, i: usize) -> redis::Connection {
        let c = redis::Client::open(self.url(i))
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c
    }

    /// The number of keys node `i` holds, pieces or not.
    fn dbsize(&self, i: usize) -> u64 {
        redis::cmd("DBSIZE").query(&mut self.conn(i)).unwrap()
    }

    /// Keys of pieces held by node `i` with their values (the access profiles daemons
    /// share, `profile:…`, left out).
    fn contents(&self, i: usize) -> BTreeMap<String, Vec<u8>> {
        let mut c = self.conn(i);
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
        keys.into_iter()
            .filter(|k| !k.contains("profile:"))
            .map(|k| (k.clone(), redis::cmd("GET").arg(&k).query(&mut c).unwrap()))
            .collect()
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, i: usize, sig: &str) {
        let pid = self.nodes[i].child.as_ref().expect("node is running").id();
        run(Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string()));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// A tier on the cluster with short retry delays so tests see retries quickly.
fn cluster_tier(cluster: &Cluster) -> Arc<RedisTier> {
    let mut cfg = RedisConfig::cluster(cluster.seeds());
    cfg.retry_min = Duration::from_millis(50);
    cfg.retry_max = Duration::from_millis(200);
    cfg.queue_bytes = 1 << 30;
    Arc::new(RedisTier::connect(cfg).unwrap())
}

/// Fill the cluster with the first half of the files, then break node `victim` with `break_node`
/// and read every file, each within `per_file`; returns the tier's counters.
fn read_through_a_broken_node(
    tmp: &Path,
    break_node: impl FnOnce(&mut Cluster, usize),
    per_file: Duration,
) -> clip::cache::redis::RedisStats {
    let (layout, index_path) = edge_index(tmp);
    let index = IndexFile::open(&index_path).unwrap();
    let origin = LayoutSource::open(&layout).unwrap();
    let want = read_all(&index, &origin, &[]);
    let mut cluster = Cluster::start(&tmp.join("cluster"));
    let tier = cluster_tier(&cluster);
    assert!(
        tier.is_up(),
        "the tier reaches the cluster: {}",
        tier.stats()
    );
    let tiers = vec![tier.clone() as Arc<dyn Tier>];
    let all = files(&index);
    for (i, p) in &all[..all.len() / 2] {
        assert_eq!(&read_file(&index, &origin, &tiers, *i), &want[p], "{p}");
    }
    assert!(
        tier.flush(Duration::from_secs(10)),
        "writes did not drain: {}",
        tier.stats()
    );
    let before = tier.stats();
    assert!(before.writes_done > 0 && before.errors == 0, "{before}");
    let victim = (0..NODES).max_by_key(|&i| cluster.dbsize(i)).unwrap();
    assert!(cluster.dbsize(victim) > 0);
    break_node(&mut cluster, victim);

    let started = Instant::now();
    for (i, p) in &all {
        let t = Instant::now();
        assert_eq!(
            &read_file(&index, &origin, &tiers, *i),
            &want[p],
            "{p} with node {victim} broken"
        );
        assert!(
            t.elapsed() < per_file,
            "reading {p} took {:?} with node {victim} broken",
            t.elapsed()
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a full pass with node {victim} broken took {:?}",
        started.elapsed()
    );
    let s = tier.stats();
    assert!(
        s.errors > before.errors,
        "the broken node's keys fail over to the origin: {s}"
    );
    assert_eq!(s.verify_failures, 0, "{s}");
    s
}

#[test]
fn clip_serve_fills_the_cluster_across_nodes_and_a_second_mount_reads_only_from_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index_path) = edge_index(tmp.path());
    let index = IndexFile::open(&index_path).unwrap();
    let want = read_all(&index, &LayoutSource::open(&layout).unwrap(), &[]);
    let cluster = Cluster::start(&tmp.path().join("cluster"));
    let seeds = cluster.seeds().join(",");
    let args = ["--redis-cluster", seeds.as_str()];

    let (first, s1, log1) = mount_and_read_all(tmp.path(), "first", &index_path, &args);
    assert!(
        s1["serve"]["fetched"].as_u64().unwrap() > 0,
        "the first mount reads the origin: {s1}"
    );
    for (p, bytes) in &want {
        assert!(
            first.get(p) == Some(bytes),
            "{p} read through the first mount differs from the image"
        );
    }
    let r1 = &s1["redis"];
    common::assert_filled_from_empty(&s1);
    assert_eq!(
        r1["writes_done"], r1["writes_queued"],
        "every fill is stored: {s1}\n{log1}"
    );
    assert_eq!(
        (r1["errors"].as_u64(), r1["writes_dropped"].as_u64()),
        (Some(0), Some(0)),
        "{s1}\n{log1}"
    );

    let mut stored = BTreeMap::new();
    let mut used_nodes = 0;
    for i in 0..NODES {
        let contents = cluster.contents(i);
        let shared_profiles = cluster.dbsize(i) - contents.len() as u64;
        assert!(
            shared_profiles <= 1,
            "node {i} holds {shared_profiles} keys that are not pieces"
        );
        used_nodes += usize::from(!contents.is_empty());
        for (key, value) in contents {
            assert_eq!(
                hex::encode(Sha256::digest(&value)),
                key,
                "node {i}: a key must be the hex sha256 of its value"
            );
            assert!(
                stored.insert(key, value).is_none(),
                "a key is held by two primaries"
            );
        }
    }
    assert!(
        used_nodes > 1,
        "the keys must be spread over the cluster, found them on {used_nodes} node(s)"
    );
    assert_eq!(
        stored.keys().cloned().collect::<BTreeSet<_>>(),
        piece_keys(&index),
        "the cluster holds exactly the pieces' keys"
    );

    let (second, s2, log2) = mount_and_read_all(tmp.path(), "second", &index_path, &args);
    assert_eq!(second, first, "the second mount serves the same bytes");
    assert_eq!(
        s2["serve"]["fetched"].as_u64(),
        Some(0),
        "the second mount must fetch nothing from the origin: {s2}\n{log2}"
    );
    assert_eq!(s2["serve"]["inflated"].as_u64(), Some(0), "{s2}");
    assert_eq!(s2["serve"]["read_errors"].as_u64(), Some(0), "{s2}");
    let r2 = &s2["redis"];
    assert!(
        r2["hits"].as_u64().unwrap() >= stored.len() as u64,
        "every piece comes from the cluster: {s2}"
    );
    for counter in [
        "misses",
        "errors",
        "verify_failures",
        "bypassed",
        "writes_queued",
    ] {
        assert_eq!(r2[counter].as_u64(), Some(0), "{counter}: {s2}\n{log2}");
    }
}

#[test]
fn a_killed_cluster_node_falls_through_to_the_origin_with_correct_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let s = read_through_a_broken_node(tmp.path(), |c, i| c.kill(i), Duration::from_secs(1));
    assert!(
        s.bypassed > 0,
        "reads after a failure skip the cluster without waiting: {s}"
    );
}

#[test]
fn a_stopped_cluster_node_costs_at_most_a_few_timeouts() {
    let tmp = tempfile::tempdir().unwrap();
    read_through_a_broken_node(
        tmp.path(),
        |c, i| c.signal(i, "STOP"),
        Duration::from_secs(2),
    );
}
