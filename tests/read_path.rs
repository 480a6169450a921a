//! The read path without FUSE: pieces inflated on the way to a cold read, and the rest of
//! its checkpoint interval, are kept.

mod common;

use bytes::Bytes;
use clip::format::IndexFile;
use clip::read::{CursorPark, FileReader, Neighbours, ReadAhead, SpanReader, Tier};
use clip::source::layout::LayoutSource;
use clip::source::{Source, SourceError};
use common::*;
use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct MemTier(Mutex<HashMap<[u8; 32], Vec<u8>>>);

impl Tier for MemTier {
    fn name(&self) -> &str {
        "memory"
    }
    fn get(&self, key: &[u8; 32]) -> Option<Bytes> {
        self.0.lock().unwrap().get(key).cloned().map(Bytes::from)
    }
    fn put(&self, key: &[u8; 32], bytes: &Bytes) {
        self.0.lock().unwrap().insert(*key, bytes.to_vec());
    }
    fn remove(&self, key: &[u8; 32]) {
        self.0.lock().unwrap().remove(key);
    }
    fn is_local(&self) -> bool {
        true
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

fn read_all(
    idx: &IndexFile,
    src: &dyn Source,
    tiers: &[Arc<dyn Tier>],
    path: &str,
    n: Option<Arc<Neighbours>>,
) -> Vec<u8> {
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
    layout: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, index) = edge_index(tmp.path());
    fixture_at(tmp, &layout, &index)
}

/// Size of `/big.bin` in [`big_fixture`]: several checkpoint intervals and 1 MiB chunks.
const BIG: usize = 13 << 20 | 12345;

/// A one-layer image holding small files around `/big.bin` (noise, seed 7), indexed.
fn big_fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = clip::demo::TarBuilder::new();
    t.dir("./", 0o755).file("a.txt", 0o644, b"before\n").file(
        "big.bin",
        0o644,
        &clip::demo::noise(7, BIG),
    );
    t.file("z.txt", 0o644, b"after\n");
    let layout = tmp.path().join("layout");
    let index = tmp.path().join("big.clip");
    one_layer_image(t.finish(), "2025-05-20T00:00:00Z", &layout, "big", &index);
    fixture_at(tmp, &layout, &index)
}

fn fixture_at(
    tmp: tempfile::TempDir,
    layout: &std::path::Path,
    index: &std::path::Path,
) -> Fixture {
    let idx = IndexFile::open(index).unwrap();
    let src = LayoutSource::open(layout).unwrap();
    let mem = Arc::new(MemTier::default());
    let tiers: Vec<Arc<dyn Tier>> = vec![mem.clone()];
    let neighbours = Neighbours::new(idx.index().layers.len());
    Fixture {
        _tmp: tmp,
        idx,
        src,
        mem,
        tiers,
        neighbours,
        layout: layout.to_path_buf(),
    }
}

#[test]
fn a_cold_read_keeps_the_small_files_of_its_checkpoint_interval() {
    let Fixture {
        _tmp,
        idx,
        src,
        mem,
        tiers,
        neighbours,
        ..
    } = fixture();

    let i = idx.resolve(b"/many/file059").unwrap().unwrap();
    let mut r = FileReader::new(&idx, i)
        .unwrap()
        .with_neighbours(neighbours.clone());
    let mut out = vec![0u8; r.size() as usize];
    r.read_at(&idx, &src, &tiers, 0, &mut out).unwrap();
    assert_eq!(out, b"small file 59\n");
    let (kept, kept_bytes) = r.kept_stats();
    assert!(
        kept >= 10,
        "only {kept} pieces kept on the way to /many/file059"
    );
    assert!(kept_bytes > 0);
    // Everything kept is right, and files before it now come from the tier alone.
    for (k, v) in mem.0.lock().unwrap().iter() {
        assert!(clip::read::file::verify(v, k));
    }
    let from_tier = read_all(&idx, &NoOrigin, &tiers, "/many/file058", None);
    assert_eq!(from_tier, b"small file 58\n");
    // The rest of the checkpoint interval after the file was kept too.
    assert_eq!(
        read_all(&idx, &NoOrigin, &tiers, "/home/user/file", None),
        b"owned by 1000\n"
    );
    // Without neighbours nothing but the file itself is stored.
    let mem2 = Arc::new(MemTier::default());
    let tiers2: Vec<Arc<dyn Tier>> = vec![mem2.clone()];
    read_all(&idx, &src, &tiers2, "/many/file059", None);
    assert_eq!(mem2.0.lock().unwrap().len(), 1);
}

#[test]
fn a_deferred_interval_is_left_to_the_caller_and_counted() {
    let Fixture {
        _tmp,
        idx,
        src,
        mem,
        tiers,
        neighbours,
        ..
    } = fixture();
    let i = idx.resolve(b"/many/file059").unwrap().unwrap();
    let mut r = FileReader::new(&idx, i)
        .unwrap()
        .with_neighbours(neighbours.clone())
        .defer_interval_finish();
    let mut out = vec![0u8; r.size() as usize];
    r.read_at(&idx, &src, &tiers, 0, &mut out).unwrap();
    let (inflated, fetched) = r.origin_stats();
    assert!(
        inflated >= out.len() as u64 && fetched > 0,
        "the read itself is counted: {inflated} {fetched}"
    );
    assert!(
        mem.get(&idx.pieces(entry(&idx, "/home/user/file")).unwrap()[0].sha256)
            .is_none(),
        "not finished yet"
    );
    let passed_piece = idx.pieces(entry(&idx, "/many/file058")).unwrap()[0].sha256;
    assert!(
        mem.get(&passed_piece).is_none(),
        "the files passed on the way are left to the caller too"
    );
    let after = r.take_after_reply();
    assert!(after.claims.is_empty(), "no read-ahead, no claim");
    assert!(r.take_after_reply().is_empty());
    for (layer, off, bytes) in &after.passed {
        neighbours.keep(&idx, *layer, *off, bytes, &tiers);
    }
    assert_eq!(
        read_all(&idx, &NoOrigin, &tiers, "/many/file058", None),
        b"small file 58\n",
        "kept by the caller"
    );
    let mut span = after
        .unfinished
        .expect("the interval is left to the caller");
    let before = span.inflated;
    span.finish_interval(&idx, &neighbours, &mut |off, bytes| {
        neighbours.keep(
            &idx,
            span_layer(&idx, "/home/user/file"),
            off,
            bytes,
            &tiers,
        );
    })
    .unwrap();
    assert!(span.inflated > before);
    assert_eq!(
        read_all(&idx, &NoOrigin, &tiers, "/home/user/file", None),
        b"owned by 1000\n"
    );
}

/// Two cold readers of files in the same checkpoint interval: the second waits for the
/// first (which claimed the interval until it finished it) and then reads its file from the
/// tiers, instead of fetching and inflating the same compressed range again.
#[test]
fn a_reader_waits_for_the_reader_inflating_its_interval_instead_of_fetching_it_again() {
    let f = fixture();
    let ahead = ReadAhead::new(4 << 20, 64 << 20);
    let first = entry(&f.idx, "/many/file059");
    let mut a = FileReader::new(&f.idx, first)
        .unwrap()
        .with_neighbours(f.neighbours.clone())
        .with_read_ahead(ahead.clone())
        .defer_interval_finish();
    let mut out = vec![0u8; a.size() as usize];
    a.read_at(&f.idx, &f.src, &f.tiers, 0, &mut out).unwrap();
    let after = a.take_after_reply();
    let mut span = after
        .unfinished
        .expect("the interval is left to the caller");
    let [claim] = <[_; 1]>::try_from(after.claims)
        .ok()
        .expect("the reader claimed its interval");
    let later = entry(&f.idx, "/home/user/file");
    assert_eq!(
        clip::read::ahead::Interval::containing(
            &f.idx,
            span_layer(&f.idx, "/home/user/file"),
            f.idx.entry(later).unwrap().data_offset.to_native()
        ),
        Some(claim.interval()),
        "the fixture's files share an interval"
    );
    // The second reader starts while the interval is claimed; it has no origin at all.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut b = FileReader::new(&f.idx, later)
                .unwrap()
                .with_read_ahead(ahead.clone());
            let mut out = vec![0u8; b.size() as usize];
            b.read_at(&f.idx, &NoOrigin, &f.tiers, 0, &mut out)
                .expect("served from the tiers");
            done_tx.send(out).unwrap();
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            done_rx.try_recv().is_err(),
            "the second reader must wait for the claimed interval"
        );
        for (layer, off, bytes) in &after.passed {
            f.neighbours.keep(&f.idx, *layer, *off, bytes, &f.tiers);
        }
        span.finish_interval(&f.idx, &f.neighbours, &mut |off, bytes| {
            f.neighbours
                .keep(&f.idx, claim.interval().layer, off, bytes, &f.tiers);
        })
        .unwrap();
        drop(claim);
        let got = done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("released by the claim");
        assert_eq!(got, b"owned by 1000\n");
    });
}

fn entry(idx: &IndexFile, path: &str) -> u32 {
    idx.resolve(path.as_bytes()).unwrap().unwrap()
}

fn span_layer(idx: &IndexFile, path: &str) -> u32 {
    idx.entry(entry(idx, path)).unwrap().layer.to_native()
}

/// Read `path` sequentially in `step`-byte requests the way the FUSE layer does, running
/// every planned read-ahead job at once on another thread; returns the bytes and the reader.
fn read_with_ahead(
    f: &Fixture,
    ahead: &Arc<ReadAhead>,
    path: &str,
    step: usize,
) -> (Vec<u8>, FileReader) {
    let mut r = FileReader::new(&f.idx, entry(&f.idx, path))
        .unwrap()
        .with_neighbours(f.neighbours.clone())
        .with_read_ahead(ahead.clone());
    let mut out = vec![0u8; r.size() as usize];
    let mut jobs = 0;
    let mut at = 0;
    while at < out.len() {
        let end = (at + step).min(out.len());
        assert_eq!(
            r.read_at(&f.idx, &f.src, &f.tiers, at as u64, &mut out[at..end])
                .unwrap(),
            end - at
        );
        at = end;
        let planned = r.plan_ahead(&f.idx, &f.tiers, at as u64);
        std::thread::scope(|s| {
            for job in planned {
                jobs += 1;
                s.spawn(move || {
                    ahead
                        .run(&f.idx, &f.src, &f.tiers, &f.neighbours, job)
                        .unwrap()
                });
            }
        });
    }
    assert!(jobs > 0, "no read-ahead was planned for {path}");
    (out, r)
}

#[test]
fn read_ahead_inflates_the_next_intervals_and_stitches_pieces_across_their_boundaries() {
    let f = big_fixture();
    let ahead = ReadAhead::new(4 << 20, 64 << 20);
    let (out, r) = read_with_ahead(&f, &ahead, "/big.bin", 128 << 10);
    assert_eq!(out, clip::demo::noise(7, BIG));
    let pieces = r.pieces().len() as u64;
    assert!(
        r.ahead_hits() + 4 >= pieces,
        "only {} of {pieces} pieces came from read-ahead",
        r.ahead_hits()
    );
    let (inflated, _) = r.origin_stats();
    assert!(
        inflated < 5 << 20,
        "the reader inflated {inflated} bytes itself; read-ahead should have done most"
    );
    // A piece crossing an interval boundary was put together from two jobs' halves.
    let i = entry(&f.idx, "/big.bin");
    let e = f.idx.entry(i).unwrap();
    let layer = f.idx.layer(e.layer.to_native()).unwrap();
    let base = e.data_offset.to_native();
    let cps: Vec<u64> = layer
        .checkpoints
        .iter()
        .map(|c| c.out_offset.to_native())
        .collect();
    let crossing: Vec<_> = r
        .pieces()
        .iter()
        .filter(|p| {
            let (a, b) = (base + p.offset, base + p.offset + p.len);
            cps.iter().any(|&c| a < c && c < b)
                && cps.iter().filter(|&&c| a < c && c < b).count() == 1
        })
        .collect();
    assert!(
        !crossing.is_empty(),
        "the test image should have a piece crossing a checkpoint"
    );
    for p in &crossing {
        let got = f.mem.get(&p.sha256);
        assert!(
            got.is_some_and(|b| clip::read::file::verify(&b, &p.sha256)),
            "crossing piece at {} not kept",
            p.offset
        );
    }
    // A second reader finds everything in the tier: no origin at all.
    assert_eq!(read_all(&f.idx, &NoOrigin, &f.tiers, "/big.bin", None), out);
}

#[test]
fn read_ahead_of_a_lying_origin_never_serves_wrong_bytes() {
    let f = big_fixture();
    let ahead = ReadAhead::new(4 << 20, 64 << 20);
    // Jobs that cannot read leave their intervals to the reader, which then fails cleanly.
    let i = entry(&f.idx, "/big.bin");
    let mut r = FileReader::new(&f.idx, i)
        .unwrap()
        .with_read_ahead(ahead.clone());
    let mut head = vec![0u8; 2 << 20];
    r.read_at(&f.idx, &f.src, &f.tiers, 0, &mut head).unwrap();
    let jobs = r.plan_ahead(&f.idx, &f.tiers, head.len() as u64);
    assert!(!jobs.is_empty());
    for job in jobs {
        assert!(ahead
            .run(&f.idx, &NoOrigin, &f.tiers, &f.neighbours, job)
            .is_err());
    }
    // Nothing was held or claimed: the reader reads on by itself, bytes intact.
    let mut rest = vec![0u8; (r.size() - head.len() as u64) as usize];
    r.read_at(&f.idx, &f.src, &f.tiers, head.len() as u64, &mut rest)
        .unwrap();
    head.extend(rest);
    assert_eq!(head, clip::demo::noise(7, BIG));
    assert_eq!(r.ahead_hits(), 0);
}

#[test]
fn read_ahead_refuses_intervals_the_index_does_not_have() {
    let f = big_fixture();
    let ahead = ReadAhead::new(4 << 20, 64 << 20);
    let layer = f.idx.layer(0).unwrap();
    let n = layer.checkpoints.len() as u32;
    let iv = |layer, checkpoint| clip::read::ahead::Interval { layer, checkpoint };
    // A profile from a tampered file may name anything: nothing is claimed, nothing runs.
    assert!(ahead
        .claim(&f.idx, iv(0, n), (0, u64::MAX), u64::MAX)
        .is_none());
    assert!(ahead
        .claim(&f.idx, iv(7, 0), (0, u64::MAX), u64::MAX)
        .is_none());
    let start = layer.checkpoints[1].out_offset.to_native();
    assert!(
        ahead
            .claim(&f.idx, iv(0, 1), (0, u64::MAX), start)
            .is_none(),
        "stops before it starts"
    );
    // A real one is claimed once, runs, and is not claimed again.
    let job = ahead
        .claim(&f.idx, iv(0, 1), (0, u64::MAX), u64::MAX)
        .expect("claimable");
    assert!(
        ahead
            .claim(&f.idx, iv(0, 1), (0, u64::MAX), u64::MAX)
            .is_none(),
        "running"
    );
    ahead
        .run(&f.idx, &f.src, &f.tiers, &f.neighbours, job)
        .unwrap();
    assert!(
        ahead
            .claim(&f.idx, iv(0, 1), (0, u64::MAX), u64::MAX)
            .is_none(),
        "done"
    );
}

#[test]
fn read_ahead_plans_every_interval_with_bytes_the_reader_leaves_and_stops_at_the_file_end() {
    let f = big_fixture();
    let ahead = ReadAhead::new(64 << 20, 64 << 20);
    let i = entry(&f.idx, "/big.bin");
    let mut r = FileReader::new(&f.idx, i)
        .unwrap()
        .with_read_ahead(ahead.clone());
    let next = 3 << 20;
    let mut out = vec![0u8; r.size() as usize];
    r.read_at(&f.idx, &f.src, &f.tiers, 0, &mut out[..next])
        .unwrap();
    let jobs = r.plan_ahead(&f.idx, &f.tiers, next as u64);
    let e = f.idx.entry(i).unwrap();
    let (base, end) = (
        e.data_offset.to_native(),
        e.data_offset.to_native() + r.size(),
    );
    let layer = f.idx.layer(e.layer.to_native()).unwrap();
    let cps: Vec<u64> = layer
        .checkpoints
        .iter()
        .map(|c| c.out_offset.to_native())
        .collect();
    let bounds = |j: usize| {
        (
            cps[j],
            cps.get(j + 1)
                .copied()
                .unwrap_or(layer.uncompressed_size.to_native()),
        )
    };
    // The reader's cursor is at `next`; it inflates its own interval and the piece it is
    // in there to its end. Every other interval with bytes of a later piece is a job, the
    // ones holding only the half of a piece crossing their boundary included.
    let own = cps.partition_point(|&c| c <= base + next as u64) - 1;
    let own_end = bounds(own).1;
    let expected: BTreeSet<usize> = (0..cps.len())
        .filter(|&j| j != own)
        .filter(|&j| {
            let (a, b) = bounds(j);
            r.pieces().iter().any(|p| {
                let s = base + p.offset;
                s >= own_end && s < b && s + p.len > a
            })
        })
        .collect();
    let planned: BTreeSet<usize> = jobs
        .iter()
        .map(|j| j.interval.checkpoint as usize)
        .collect();
    assert_eq!(planned, expected);
    let last = *planned.iter().max().expect("jobs up to the file end");
    assert!(
        bounds(last).0 < end,
        "the interval holding the file's end is planned"
    );
    for job in jobs {
        let j = job.interval.checkpoint as usize;
        let stats = ahead
            .run(&f.idx, &f.src, &f.tiers, &f.neighbours, job)
            .unwrap();
        let (a, b) = bounds(j);
        assert!(
            stats.inflated <= b.min(end) - a,
            "interval {j} inflated {} bytes past the file's end",
            stats.inflated - (b.min(end) - a)
        );
    }
    r.read_at(&f.idx, &f.src, &f.tiers, next as u64, &mut out[next..])
        .unwrap();
    assert_eq!(out, clip::demo::noise(7, BIG));
    let later = r
        .pieces()
        .iter()
        .filter(|p| base + p.offset >= own_end)
        .count() as u64;
    assert!(
        r.ahead_hits() >= later,
        "{} of the {later} pieces after the reader's interval came from read-ahead",
        r.ahead_hits()
    );
}

#[test]
fn one_long_read_from_the_start_starts_read_ahead_before_inflating_and_a_short_one_does_not() {
    // Jobs the reader hands to its sink while reading (a fresh image each: cold reads).
    let first_read = |len: usize| {
        let f = big_fixture();
        let ahead = ReadAhead::new(8 << 20, 64 << 20);
        let sunk = Arc::new(Mutex::new(Vec::new()));
        let sink = sunk.clone();
        let mut r = FileReader::new(&f.idx, entry(&f.idx, "/big.bin"))
            .unwrap()
            .with_read_ahead(ahead.clone())
            .with_job_sink(Arc::new(move |job| sink.lock().unwrap().push(job)));
        let mut buf = vec![0u8; len];
        r.read_at(&f.idx, &f.src, &f.tiers, 0, &mut buf).unwrap();
        assert_eq!(buf, clip::demo::noise(7, len));
        let n = sunk.lock().unwrap().len();
        n
    };
    // What the kernel asks for when a program reads 128 KiB at a time (`cat`, `cp`) …
    assert!(first_read(256 << 10) > 0);
    // … and when a loader reads an ELF header.
    assert_eq!(first_read(16 << 10), 0);
}

#[test]
fn cached_pieces_are_read_and_verified_ahead_of_a_warm_sequential_reader() {
    let f = big_fixture();
    let want = read_all(&f.idx, &f.src, &f.tiers, "/big.bin", None);
    let i = entry(&f.idx, "/big.bin");
    let pieces = FileReader::new(&f.idx, i).unwrap().pieces().to_vec();
    // One cached piece is poisoned: no job may hand it over; the reader fetches it again.
    let bad_at = pieces.len() / 2;
    let bad = pieces[bad_at];
    f.mem
        .put(&bad.sha256, &Bytes::from(vec![b'x'; bad.len as usize]));

    let ahead = ReadAhead::new(4 << 20, 64 << 20);
    let mut r = FileReader::new(&f.idx, i)
        .unwrap()
        .with_read_ahead(ahead.clone());
    let mut out = vec![0u8; r.size() as usize];
    let (mut at, mut jobs) = (0, 0);
    while at < out.len() {
        let end = (at + (128 << 10)).min(out.len());
        r.read_at(&f.idx, &f.src, &f.tiers, at as u64, &mut out[at..end])
            .unwrap();
        at = end;
        // Past the poisoned piece the reader needed the origin; the pieces after it are in
        // the tier, so it reads them there itself and plans no inflation job for them.
        for job in r.plan_ahead(&f.idx, &f.tiers, at as u64) {
            ahead
                .run(&f.idx, &f.src, &f.tiers, &f.neighbours, job)
                .unwrap();
        }
        if let Some(job) = r.plan_cached_ahead(at as u64) {
            jobs += 1;
            ahead.run_cached(&f.tiers, job);
        }
    }
    assert_eq!(out, want);
    assert!(jobs > 0);
    assert!(
        r.ahead_hits() + 2 >= bad_at as u64,
        "{} of the {bad_at} pieces before the poisoned one came from jobs",
        r.ahead_hits(),
    );
    assert!(
        clip::read::file::verify(&f.mem.get(&bad.sha256).unwrap(), &bad.sha256),
        "the poisoned piece was replaced"
    );
}

/// A deferring reader keeps its interval claims until the caller has done the work after
/// the reply; a read crossing two pieces of one interval must go on under its own claim
/// instead of waiting for it (which would never end).
#[test]
fn a_deferring_reader_reads_on_under_its_own_interval_claim() {
    let f = big_fixture();
    let ahead = ReadAhead::new(4 << 20, 64 << 20);
    let big = entry(&f.idx, "/big.bin");
    let (tx, rx) = std::sync::mpsc::channel();
    // Not a scoped thread: if the reader waited for itself, the test fails instead of
    // hanging in the join.
    let reader_ahead = ahead.clone();
    std::thread::spawn(move || {
        let mut r = FileReader::new(&f.idx, big)
            .unwrap()
            .with_neighbours(f.neighbours.clone())
            .with_read_ahead(reader_ahead)
            .defer_interval_finish();
        // Half of piece 0 and half of piece 1, both in the file's first interval.
        let mut out = vec![0u8; 1 << 20];
        r.read_at(&f.idx, &f.src, &f.tiers, 512 << 10, &mut out)
            .unwrap();
        let after = r.take_after_reply();
        tx.send((out, after, f)).unwrap();
    });
    let (out, after, f) = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the read finished under its own claim");
    assert!(out == clip::demo::noise(7, BIG)[512 << 10..(512 << 10) + (1 << 20)]);
    assert_eq!(after.claims.len(), 1, "one claim, held for after the reply");
    assert!(
        !after.passed.is_empty(),
        "the bytes before the file were passed"
    );
    let iv = after.claims[0].interval();
    let data = f.idx.entry(big).unwrap().data_offset.to_native();
    assert!(
        ahead
            .claim(&f.idx, iv, (data, data + 1), u64::MAX)
            .is_none(),
        "still claimed until the caller drops it"
    );
    drop(after);
    assert!(
        ahead
            .claim(&f.idx, iv, (data, data + 1), u64::MAX)
            .is_some(),
        "released with the work after the reply"
    );
}

/// Bytes of `path` in the page cache, from util-linux `fincore`.
fn resident(path: &std::path::Path) -> u64 {
    let out = run(std::process::Command::new("fincore")
        .args(["--bytes", "--raw", "--noheadings", "--output", "RES"])
        .arg(path));
    String::from_utf8_lossy(&out)
        .trim()
        .parse()
        .expect("fincore prints a byte count")
}

/// Drop `path` from the page cache (its pages are clean: it was synced).
fn evict(path: &std::path::Path) {
    let f = std::fs::File::open(path).unwrap();
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
}

#[test]
fn layout_blob_reads_ask_the_disk_for_the_expected_range_then_read_ahead_of_a_streaming_reader() {
    require_tool("fincore");
    // On a disk-backed file system (the target directory), not a tmpfs /tmp, so that the
    // page cache says what was read from disk.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = tmp.path().join("layout");
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        r#"{"schemaVersion":2,"manifests":[]}"#,
    )
    .unwrap();
    let digest = format!("sha256:{}", "ab".repeat(32));
    let blob = dir.join("blobs/sha256").join("ab".repeat(32));
    let size: u64 = 48 << 20;
    let bytes: Vec<u8> = (0..size).map(|i| ((i * 2654435761) >> 13) as u8).collect();
    std::fs::write(&blob, &bytes).unwrap();
    std::fs::File::open(&blob).unwrap().sync_all().unwrap();
    evict(&blob);
    let cached = resident(&blob);
    assert!(
        cached < 64 << 10,
        "{cached} bytes of the test blob stay in the page cache after POSIX_FADV_DONTNEED: \
         this file system cannot show what a read fetched"
    );

    let source = LayoutSource::open(&dir).unwrap();
    // Three readers of one blob, as the cold reads of three files would be, each expecting
    // 600 KiB and reading exactly that, their 128 KiB reads interleaved. Two of them read
    // neighbouring ranges, which made the kernel's read-ahead (history of cached pages
    // before a read) take them for one stream and read on.
    let expect = 600u64 << 10;
    let starts = [10u64 << 20, (10 << 20) + expect, 30 << 20];
    let mut readers: Vec<_> = starts
        .iter()
        .map(|&s| source.blob_from(&digest, s, s + expect, size).unwrap())
        .collect();
    let mut bufs = vec![vec![0u8; expect as usize]; starts.len()];
    for k in 0..expect.div_ceil(128 << 10) as usize {
        for (r, buf) in readers.iter_mut().zip(&mut bufs) {
            let chunk = buf.chunks_mut(128 << 10).nth(k).unwrap();
            r.read_exact(chunk).unwrap();
        }
    }
    for (s, buf) in starts.iter().zip(&bufs) {
        assert_eq!(buf, &bytes[*s as usize..(s + expect) as usize]);
    }
    drop(readers);
    let (got, want) = (resident(&blob), 3 * expect);
    assert!(
        (want..want + (128 << 10)).contains(&got),
        "reads of {want} bytes brought {got} bytes of the blob into the page cache"
    );
    let start = starts[0];

    // A reader that goes on past its expected end streams: what it reads next has been
    // asked for ahead of it, in growing segments.
    evict(&blob);
    let mut r = source
        .blob_from(&digest, start, start + expect, size)
        .unwrap();
    let mut buf = vec![0u8; 8 << 20];
    for chunk in buf.chunks_mut(128 << 10) {
        r.read_exact(chunk).unwrap();
    }
    assert_eq!(buf, &bytes[start as usize..start as usize + buf.len()]);
    let got = resident(&blob);
    assert!(
        got > buf.len() as u64 + (512 << 10),
        "a streaming reader of {} bytes had only {got} bytes in the page cache: no read-ahead",
        buf.len()
    );
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, &bytes[start as usize + buf.len()..]);
}

/// A source that records each ranged read's start and expected end and ends it there, as a
/// registry answering `Range: start-(expected end - 1)` would, so that a reader whose first
/// request asked for too little fails instead of reading on.
struct Exact {
    inner: LayoutSource,
    asked: Mutex<Vec<(u64, u64)>>,
}

impl Source for Exact {
    fn describe(&self) -> String {
        "exact ranges".into()
    }
    fn manifest(&self, r: &str) -> Result<(String, Vec<u8>, String), SourceError> {
        self.inner.manifest(r)
    }
    fn blob(&self, d: &str, s: u64, e: Option<u64>) -> Result<Box<dyn Read + Send>, SourceError> {
        self.inner.blob(d, s, e)
    }
    fn blob_from(
        &self,
        digest: &str,
        start: u64,
        expect_end: u64,
        _size: u64,
    ) -> Result<Box<dyn Read + Send>, SourceError> {
        self.asked.lock().unwrap().push((start, expect_end));
        self.inner.blob(digest, start, Some(expect_end))
    }
}

fn exact(f: &Fixture) -> Exact {
    Exact {
        inner: LayoutSource::open(&f.layout).unwrap(),
        asked: Mutex::default(),
    }
}

/// `/big.bin`'s layer, the file's offset in it, and the checkpoints' uncompressed offsets.
fn big_layout(f: &Fixture) -> (u32, u64, Vec<u64>) {
    let e = f.idx.entry(entry(&f.idx, "/big.bin")).unwrap();
    let layer = e.layer.to_native();
    let cps = f
        .idx
        .layer(layer)
        .unwrap()
        .checkpoints
        .iter()
        .map(|c| c.out_offset.to_native())
        .collect();
    (layer, e.data_offset.to_native(), cps)
}

/// A loader faulting in a library reads one 1 MiB piece, then elsewhere, then the next
/// piece through another handle: the second read continues the cursor the first one left
/// in the park, inside the range its request covered, instead of a request of its own.
#[test]
fn a_read_continues_a_parked_cursor_instead_of_asking_the_origin_again() {
    let f = big_fixture();
    let src = exact(&f);
    let park = CursorPark::new();
    let (_, base, cps) = big_layout(&f);
    // A piece that ends inside its checkpoint interval, so the next one starts there too.
    let r0 = FileReader::new(&f.idx, entry(&f.idx, "/big.bin")).unwrap();
    let k = (0..r0.pieces().len() - 1)
        .find(|&k| {
            let p = r0.pieces()[k];
            let (s, e) = (base + p.offset, base + p.offset + p.len);
            let iv = cps.partition_point(|&c| c <= s);
            cps.get(iv).is_some_and(|&next| e < next)
        })
        .expect("a piece ending inside its interval");
    let piece = |k: usize| r0.pieces()[k];
    let read = |r: &mut FileReader, k: usize, src: &dyn Source| {
        let p = piece(k);
        let mut out = vec![0u8; p.len as usize];
        r.read_at(&f.idx, src, &[], p.offset, &mut out).unwrap();
        assert_eq!(
            out,
            clip::demo::noise(7, BIG)[p.offset as usize..(p.offset + p.len) as usize]
        );
    };
    let mut first = FileReader::new(&f.idx, entry(&f.idx, "/big.bin"))
        .unwrap()
        .with_cursor_park(park.clone());
    read(&mut first, k, &src);
    assert_eq!(src.asked.lock().unwrap().len(), 1);
    drop(first);
    assert_eq!(
        park.len(),
        1,
        "the handle's cursor is parked when it closes"
    );
    let mut second = FileReader::new(&f.idx, entry(&f.idx, "/big.bin"))
        .unwrap()
        .with_cursor_park(park.clone());
    read(&mut second, k + 1, &src);
    assert_eq!(
        src.asked.lock().unwrap().len(),
        1,
        "the next piece came from the parked cursor"
    );
    assert!(
        park.is_empty(),
        "a parked cursor serves one reader at a time"
    );
    // Without the park the same read asks the origin again.
    read(
        &mut FileReader::new(&f.idx, entry(&f.idx, "/big.bin")).unwrap(),
        k + 1,
        &src,
    );
    assert_eq!(src.asked.lock().unwrap().len(), 2);
    // A cursor is not continued backwards, nor past the range its request covered.
    drop(second);
    let mut behind = FileReader::new(&f.idx, entry(&f.idx, "/big.bin"))
        .unwrap()
        .with_cursor_park(park.clone());
    read(&mut behind, k, &src);
    assert_eq!(src.asked.lock().unwrap().len(), 3);
}

/// The rest of a cold read's interval is finished through the piece that crosses its end,
/// and the read's one request already asked for those bytes: a source ending each range
/// where it was asked to still serves it, and the crossing piece is then in the tier.
#[test]
fn finishing_an_interval_keeps_the_piece_crossing_its_end_from_the_same_request() {
    let f = big_fixture();
    let src = exact(&f);
    let (layer, base, cps) = big_layout(&f);
    let r0 = FileReader::new(&f.idx, entry(&f.idx, "/big.bin")).unwrap();
    let pieces = r0.pieces().to_vec();
    // A piece crossing a checkpoint, and the interval before that checkpoint.
    let (crossing, boundary) = pieces
        .iter()
        .find_map(|p| {
            let (s, e) = (base + p.offset, base + p.offset + p.len);
            cps.iter().find(|&&c| s < c && c < e).map(|&c| (*p, c))
        })
        .expect("a piece of /big.bin crosses a checkpoint");
    let start = base + crossing.offset - 4096;
    // A cold read does not build the layer's piece map itself (keeping what it passed
    // does, after its reply); here nothing was kept before.
    f.neighbours.build(&f.idx, layer);
    let mut span = SpanReader::new(layer);
    let mut out = vec![0u8; 4096];
    span.read_at(
        &f.idx,
        &src,
        start,
        &mut out,
        Some(&f.neighbours),
        &mut |_, _| {},
    )
    .unwrap();
    assert!(
        cps.iter().all(|&c| !(start < c && c < boundary)),
        "one interval"
    );
    span.finish_interval(&f.idx, &f.neighbours, &mut |off, bytes| {
        f.neighbours.keep(&f.idx, layer, off, bytes, &f.tiers);
    })
    .expect("the first request covered the crossing piece");
    assert_eq!(src.asked.lock().unwrap().len(), 1);
    let kept = f
        .mem
        .get(&crossing.sha256)
        .expect("the crossing piece is kept");
    assert_eq!(
        kept[..],
        clip::demo::noise(7, BIG)
            [crossing.offset as usize..(crossing.offset + crossing.len) as usize]
    );
    // Without neighbours the interval ends at the checkpoint, as before.
    let mut plain = SpanReader::new(layer);
    plain
        .read_at(&f.idx, &src, start, &mut out, None, &mut |_, _| {})
        .unwrap();
    assert_eq!(plain.position(), Some(base + crossing.offset));
}

/// Pieces that another read kept on its way are not inflated again by a read-ahead job.
#[test]
fn read_ahead_leaves_out_intervals_whose_pieces_a_local_tier_holds() {
    let f = big_fixture();
    let next = 3 << 20;
    // Each reader has read the first `next` bytes of /big.bin cold, with read-ahead of its
    // own (nothing claimed there yet); what it would plan next, as checkpoint numbers.
    let planned_after_cold_read = |tiers: &[Arc<dyn Tier>]| -> (FileReader, BTreeSet<u32>) {
        let mut r = FileReader::new(&f.idx, entry(&f.idx, "/big.bin"))
            .unwrap()
            .with_read_ahead(ReadAhead::new(64 << 20, 64 << 20));
        let mut out = vec![0u8; next];
        r.read_at(&f.idx, &f.src, &[], 0, &mut out).unwrap();
        let planned = r
            .plan_ahead(&f.idx, tiers, next as u64)
            .iter()
            .map(|j| j.interval.checkpoint)
            .collect();
        (r, planned)
    };
    let (r, all) = planned_after_cold_read(&f.tiers);
    assert!(all.len() >= 2, "several intervals ahead: {all:?}");
    // Every piece wholly inside the last planned interval is now in the tier.
    let (_, base, cps) = big_layout(&f);
    let last = *all.iter().max().unwrap();
    let (a, b) = (
        cps[last as usize],
        cps.get(last as usize + 1).copied().unwrap_or(u64::MAX),
    );
    let mut stored = 0;
    for p in r.pieces() {
        let (s, e) = (base + p.offset, base + p.offset + p.len);
        if s < b && e > a {
            let bytes = &clip::demo::noise(7, BIG)[p.offset as usize..(p.offset + p.len) as usize];
            f.mem.put(&p.sha256, &Bytes::copy_from_slice(bytes));
            stored += 1;
        }
    }
    assert!(stored > 0);
    let (_, planned) = planned_after_cold_read(&f.tiers);
    let mut expected = all.clone();
    expected.remove(&last);
    assert_eq!(planned, expected);
    // A tier across the network is not asked on the read path: its pieces do not count.
    let far: Vec<Arc<dyn Tier>> = vec![Arc::new(Far(f.mem.clone()))];
    assert_eq!(planned_after_cold_read(&far).1, all);
}

/// A remote tier in front of a memory one (`is_local` is false).
struct Far(Arc<MemTier>);

impl Tier for Far {
    fn name(&self) -> &str {
        "far"
    }
    fn get(&self, key: &[u8; 32]) -> Option<Bytes> {
        self.0.get(key)
    }
    fn put(&self, key: &[u8; 32], bytes: &Bytes) {
        self.0.put(key, bytes)
    }
    fn remove(&self, key: &[u8; 32]) {
        self.0.remove(key)
    }
}

/// A tier whose `get` of one key waits until the test lets it go.
struct SlowTier {
    inner: MemTier,
    slow: [u8; 32],
    gate: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Tier for SlowTier {
    fn name(&self) -> &str {
        "slow"
    }
    fn get(&self, key: &[u8; 32]) -> Option<Bytes> {
        if *key == self.slow {
            let _ = self.gate.lock().unwrap().recv();
        }
        self.inner.get(key)
    }
    fn put(&self, key: &[u8; 32], bytes: &Bytes) {
        self.inner.put(key, bytes)
    }
    fn remove(&self, key: &[u8; 32]) {
        self.inner.remove(key)
    }
}

/// A reader waiting for a piece that a cached-piece job reads stops waiting as soon as the
/// job holds that piece, not when the job has read all of its pieces.
#[test]
fn a_cached_piece_job_hands_over_each_piece_as_soon_as_it_is_read() {
    let f = big_fixture();
    let pieces = FileReader::new(&f.idx, entry(&f.idx, "/big.bin"))
        .unwrap()
        .pieces()
        .to_vec();
    let data = clip::demo::noise(7, BIG);
    let (go, gate) = std::sync::mpsc::channel();
    let tier = Arc::new(SlowTier {
        inner: MemTier::default(),
        slow: pieces[1].sha256,
        gate: Mutex::new(gate),
    });
    for p in &pieces[..2] {
        let bytes = &data[p.offset as usize..(p.offset + p.len) as usize];
        tier.put(&p.sha256, &Bytes::copy_from_slice(bytes));
    }
    let tiers: Vec<Arc<dyn Tier>> = vec![tier.clone()];
    let ahead = ReadAhead::new(8 << 20, 64 << 20);
    let job = ahead
        .claim_cached(pieces[..2].iter().map(|p| (p.sha256, p.len)))
        .expect("two pieces to read");
    std::thread::scope(|s| {
        let runner = s.spawn(|| ahead.run_cached(&tiers, job));
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = ahead.clone();
        let first = pieces[0].sha256;
        s.spawn(move || {
            waiter.wait_key(&first);
            tx.send(waiter.take(&first)).unwrap();
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(10));
        // Let the job finish before judging, so that a failure does not hang the scope.
        go.send(()).unwrap();
        let held = got
            .expect("piece 0 handed over while the job still waits for piece 1")
            .expect("piece 0 is held");
        assert!(held.verified);
        assert_eq!(held.bytes.len() as u64, pieces[0].len);
        assert_eq!(runner.join().unwrap(), 2);
    });
}

/// A layer's piece map can be built on a thread of its own; until it exists, a cold read
/// does not know the piece crossing its interval's end (and never waits to learn it).
#[test]
fn a_layer_map_built_in_the_background_shows_the_piece_crossing_a_boundary() {
    let f = big_fixture();
    let (layer, base, cps) = big_layout(&f);
    let r = FileReader::new(&f.idx, entry(&f.idx, "/big.bin")).unwrap();
    let (end, boundary) = r
        .pieces()
        .iter()
        .find_map(|p| {
            let (s, e) = (base + p.offset, base + p.offset + p.len);
            cps.iter().find(|&&c| s < c && c < e).map(|&c| (e, c))
        })
        .expect("a piece of /big.bin crosses a checkpoint");
    let index = Arc::new(IndexFile::open(&f.layout.parent().unwrap().join("big.clip")).unwrap());
    let neighbours = Neighbours::new(index.index().layers.len());
    assert_eq!(
        neighbours.crossing_end(layer, boundary),
        None,
        "not built yet"
    );
    neighbours.build_in_background(&index, layer);
    let t = std::time::Instant::now();
    while neighbours.crossing_end(layer, boundary).is_none() {
        assert!(t.elapsed().as_secs() < 10, "the map was not built");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(neighbours.crossing_end(layer, boundary), Some(end));
    assert_eq!(
        neighbours.crossing_end(layer, end),
        None,
        "nothing crosses a piece's end here"
    );
}

/// A parked cursor nobody continues is dropped after its time even on an idle mount (it
/// may hold a registry connection), not only when the next cursor is parked or taken.
#[test]
fn an_idle_park_drops_its_cursors_after_their_time() {
    let f = big_fixture();
    let park = CursorPark::with_max_age(std::time::Duration::from_millis(50));
    park.expire_in_background().unwrap();
    let mut r = FileReader::new(&f.idx, entry(&f.idx, "/big.bin"))
        .unwrap()
        .with_cursor_park(park.clone());
    let mut out = vec![0u8; 4096];
    r.read_at(&f.idx, &f.src, &[], 0, &mut out).unwrap();
    drop(r);
    assert_eq!(park.len(), 1, "parked when its handle closed");
    let t = std::time::Instant::now();
    while !park.is_empty() {
        assert!(
            t.elapsed().as_secs() < 10,
            "the idle cursor was never dropped"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
