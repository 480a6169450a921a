//! The read path without FUSE: pieces inflated on the way to a cold read, and the rest of
//! its checkpoint interval, are kept.

mod common;

use clip::format::IndexFile;
use clip::read::{FileReader, Neighbours, Tier};
use clip::source::layout::LayoutSource;
use clip::source::{Source, SourceError};
use common::*;
use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct MemTier(Mutex<HashMap<[u8; 32], Vec<u8>>>);

impl Tier for MemTier {
    fn name(&self) -> &str {
        "memory"
    }
    fn get(&self, key: &[u8; 32]) -> Option<Vec<u8>> {
        self.0.lock().unwrap().get(key).cloned()
    }
    fn put(&self, key: &[u8; 32], bytes: &[u8]) {
        self.0.lock().unwrap().insert(*key, bytes.to_vec());
    }
    fn remove(&self, key: &[u8; 32]) {
        self.0.lock().unwrap().remove(key);
    }
}

/// An origin that refuses every read.
struct NoOrigin;

impl Source for NoOrigin {
    fn describe(&self) -> String {
        "nothing".into()
    }
    fn manifest(&self, _: &str) -> Result<(String, Vec<u8>, String), SourceError> {
        Err(SourceError::NotFound("no origin in this test".into()))
    }
    fn blob(&self, _: &str, _: u64, _: Option<u64>) -> Result<Box<dyn Read + Send>, SourceError> {
        Err(SourceError::NotFound("no origin in this test".into()))
    }
}

fn read_all(idx: &IndexFile, src: &dyn Source, tiers: &[Arc<dyn Tier>], path: &str, n: Option<Arc<Neighbours>>) -> Vec<u8> {
    let i = idx.resolve(path.as_bytes()).unwrap().unwrap();
    let mut r = FileReader::new(idx, i).unwrap();
    if let Some(n) = n {
        r = r.with_neighbours(n);
    }
    let mut out = vec![0u8; r.size() as usize];
    assert_eq!(r.read_at(idx, src, tiers, 0, &mut out).unwrap(), out.len());
    out
}

/// The edge-case image indexed, its layout as origin, one memory tier.
struct Fixture {
    _tmp: tempfile::TempDir,
    idx: IndexFile,
    src: LayoutSource,
    mem: Arc<MemTier>,
    tiers: Vec<Arc<dyn Tier>>,
    neighbours: Arc<Neighbours>,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index) = edge_index(tmp.path());
    let idx = IndexFile::open(&index).unwrap();
    let src = LayoutSource::open(&layout).unwrap();
    let mem = Arc::new(MemTier::default());
    let tiers: Vec<Arc<dyn Tier>> = vec![mem.clone()];
    let neighbours = Neighbours::new(idx.index().layers.len());
    Fixture { _tmp: tmp, idx, src, mem, tiers, neighbours }
}

#[test]
fn a_cold_read_keeps_the_small_files_of_its_checkpoint_interval() {
    let Fixture { _tmp, idx, src, mem, tiers, neighbours } = fixture();

    let i = idx.resolve(b"/many/file059").unwrap().unwrap();
    let mut r = FileReader::new(&idx, i).unwrap().with_neighbours(neighbours.clone());
    let mut out = vec![0u8; r.size() as usize];
    r.read_at(&idx, &src, &tiers, 0, &mut out).unwrap();
    assert_eq!(out, b"small file 59\n");
    let (kept, kept_bytes) = r.kept_stats();
    assert!(kept >= 10, "only {kept} pieces kept on the way to /many/file059");
    assert!(kept_bytes > 0);
    // Everything kept is right, and files before it now come from the tier alone.
    for (k, v) in mem.0.lock().unwrap().iter() {
        assert!(clip::read::file::verify(v, k));
    }
    let from_tier = read_all(&idx, &NoOrigin, &tiers, "/many/file058", None);
    assert_eq!(from_tier, b"small file 58\n");
    // The rest of the checkpoint interval after the file was kept too.
    assert_eq!(read_all(&idx, &NoOrigin, &tiers, "/home/user/file", None), b"owned by 1000\n");
    // Without neighbours nothing but the file itself is stored.
    let mem2 = Arc::new(MemTier::default());
    let tiers2: Vec<Arc<dyn Tier>> = vec![mem2.clone()];
    read_all(&idx, &src, &tiers2, "/many/file059", None);
    assert_eq!(mem2.0.lock().unwrap().len(), 1);
}

#[test]
fn a_deferred_interval_is_left_to_the_caller_and_counted() {
    let Fixture { _tmp, idx, src, mem, tiers, neighbours } = fixture();
    let i = idx.resolve(b"/many/file059").unwrap().unwrap();
    let mut r = FileReader::new(&idx, i).unwrap().with_neighbours(neighbours.clone()).defer_interval_finish();
    let mut out = vec![0u8; r.size() as usize];
    r.read_at(&idx, &src, &tiers, 0, &mut out).unwrap();
    let (inflated, fetched) = r.origin_stats();
    assert!(inflated >= out.len() as u64 && fetched > 0, "the read itself is counted: {inflated} {fetched}");
    assert!(mem.get(&idx.pieces(entry(&idx, "/home/user/file")).unwrap()[0].sha256).is_none(), "not finished yet");
    let mut span = r.take_unfinished().expect("the interval is left to the caller");
    assert!(r.take_unfinished().is_none());
    let before = span.inflated;
    span.finish_interval(&idx, &mut |off, bytes| {
        neighbours.keep(&idx, span_layer(&idx, "/home/user/file"), off, bytes, &tiers);
    })
    .unwrap();
    assert!(span.inflated > before);
    assert_eq!(read_all(&idx, &NoOrigin, &tiers, "/home/user/file", None), b"owned by 1000\n");
}

fn entry(idx: &IndexFile, path: &str) -> u32 {
    idx.resolve(path.as_bytes()).unwrap().unwrap()
}

fn span_layer(idx: &IndexFile, path: &str) -> u32 {
    idx.entry(entry(idx, path)).unwrap().layer.to_native()
}
