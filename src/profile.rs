//! Access profiles: the checkpoint intervals a workload read from the origin, in the order
//! it first needed them. `clip-serve --record-profile FILE` writes one when it stops;
//! `clip-serve --prefetch-profile FILE` fetches those intervals on several threads as soon
//! as it starts, so a cold start waits for one round of parallel fetches instead of a
//! chain of dependent ones (the idea of eStargz's prioritized files and Nydus's prefetch
//! lists, at interval granularity and without changing the image).
//!
//! The file is text: a first line `clip-profile 3`, a line `manifest <digest>` naming the
//! image it was recorded on, a line `layout <16 hex digits>` naming the checkpoint layout of
//! the index it was recorded with (`IndexFile::checkpoint_layout_id`: intervals are
//! numbered by checkpoint, so an index built with other checkpoints refuses it), then one
//! `<layer> <checkpoint> <until> [<piece>...]` line per interval, where `until` is the
//! uncompressed offset in the layer up to which the workload needed bytes of that interval
//! (a replay inflates no further) and each `piece` is the offset in the layer where a piece
//! the workload read from that interval starts (a replay over a warm cache looks for
//! exactly those). Version 2 files (no `layout` line) and version 1 files (no pieces either)
//! are read too.

use crate::format::{FormatError, IndexFile};
use crate::read::ahead::Interval;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// First line of a profile file.
const MAGIC: &str = "clip-profile 3";
/// The largest profile file read: one line per checkpoint interval of a very large image.
/// The same bound as an index's startup profile area, so every profile read fits there.
const MAX_FILE_BYTES: u64 = crate::format::startup::STARTUP_MAX_LEN;
/// First line of a profile file of version 2 (no `layout` line).
const MAGIC_2: &str = "clip-profile 2";
/// First line of a profile file of version 1 (no `layout` line, no pieces).
const MAGIC_1: &str = "clip-profile 1";

/// Errors reading or writing a profile.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file cannot be read or written.
    #[error("profile {path}: {source}")]
    Io {
        /// Path of the profile.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not a profile of this version.
    #[error(
        "profile {path} line {line}: {what}; record it again with `clip-serve --record-profile`"
    )]
    Malformed {
        /// Path of the profile.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// The profile was recorded on another image.
    #[error("profile {path} was recorded on image {found}, this index is {expected}; record it again on this image")]
    OtherImage {
        /// Path of the profile.
        path: String,
        /// Manifest digest of the index.
        expected: String,
        /// Manifest digest in the profile.
        found: String,
    },
    /// The profile was recorded on an index of the image with other checkpoints, whose
    /// intervals are not this index's.
    #[error("profile {path} was recorded on an index with other checkpoints (layout {found:016x}, this index has {expected:016x}); record it again with this index")]
    OtherLayout {
        /// Path of the profile.
        path: String,
        /// Checkpoint layout of the index.
        expected: u64,
        /// Checkpoint layout in the profile.
        found: u64,
    },
    /// The index's startup profile area is damaged.
    #[error(transparent)]
    Index(#[from] FormatError),
    /// An index's startup profile must name the checkpoint layout it was recorded with.
    #[error("profile {path} does not name the checkpoint layout it was recorded with (a version 1 or 2 file); record it again with `clip-serve --record-profile` before embedding it")]
    NoLayout {
        /// Path of the profile.
        path: String,
    },
}

/// One interval of a profile and how far into it the workload read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Needed {
    /// The interval.
    pub interval: Interval,
    /// Uncompressed offset in the layer just past the last byte needed from it.
    pub until: u64,
    /// Where (uncompressed offsets in the layer) the pieces read from it start; empty when
    /// the profile does not say (version 1).
    pub pieces: Vec<u64>,
}

impl Needed {
    /// Add what another listing of the same interval needed: the further `until`, and its
    /// pieces (kept sorted, once each).
    fn absorb(&mut self, other: &Needed) {
        self.until = self.until.max(other.until);
        self.pieces.extend_from_slice(&other.pieces);
        self.pieces.sort_unstable();
        self.pieces.dedup();
    }
}

/// The intervals a workload needed, in first-use order, for the image `manifest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// Manifest digest of the image the profile was recorded on.
    pub manifest: String,
    /// Checkpoint layout of the index it was recorded with (none in version 1 and 2 files).
    pub layout: Option<u64>,
    /// Intervals in the order they were first needed.
    pub intervals: Vec<Needed>,
}

impl Profile {
    /// An empty profile of the image `manifest` indexed with the checkpoint layout `layout`.
    pub fn new(manifest: &str, layout: u64) -> Profile {
        Profile {
            manifest: manifest.into(),
            layout: Some(layout),
            intervals: Vec::new(),
        }
    }

    /// The startup profile `idx` carries (format 2.1), checked against the index's image and
    /// checkpoint layout; `None` when it carries none.
    pub fn embedded(idx: &IndexFile) -> Result<Option<Profile>, ProfileError> {
        let Some(text) = idx.startup_profile()? else {
            return Ok(None);
        };
        let (manifest, layout) = image_of(idx);
        let text = String::from_utf8_lossy(text);
        Profile::parse(&text, "embedded in the index", &manifest, layout).map(Some)
    }

    /// The bytes of `idx` carrying `profile` as its startup profile, or none: the profile
    /// must have been recorded on this image with an index of the same checkpoints (as
    /// `path`, named in errors, says).
    pub fn embed_into(
        idx: &IndexFile,
        profile: Option<(&Profile, &str)>,
    ) -> Result<Vec<u8>, ProfileError> {
        let text = match profile {
            Some((p, path)) => {
                let (manifest, layout) = image_of(idx);
                if p.manifest != manifest {
                    return Err(ProfileError::OtherImage {
                        path: path.into(),
                        expected: manifest,
                        found: p.manifest.clone(),
                    });
                }
                match p.layout {
                    None => return Err(ProfileError::NoLayout { path: path.into() }),
                    Some(found) if found != layout => {
                        return Err(ProfileError::OtherLayout {
                            path: path.into(),
                            expected: layout,
                            found,
                        })
                    }
                    Some(_) => {}
                }
                let text = p.to_text();
                if text.len() as u64 > MAX_FILE_BYTES {
                    return Err(ProfileError::Malformed {
                        path: path.into(),
                        line: 0,
                        what: format!(
                            "{} bytes of text, over the {} MiB an index's startup profile holds",
                            text.len(),
                            MAX_FILE_BYTES >> 20
                        ),
                    });
                }
                Some(text)
            }
            None => None,
        };
        Ok(crate::format::write::with_startup_profile(
            idx.core_bytes().to_vec(),
            text.as_deref().map(str::as_bytes),
        ))
    }

    /// Read a profile and check that it belongs to the image `manifest` and, when it says
    /// (version 3), to an index with the checkpoint layout `layout`.
    pub fn load(path: &Path, manifest: &str, layout: u64) -> Result<Profile, ProfileError> {
        use std::io::Read;
        let p = path.display().to_string();
        let io = |source| ProfileError::Io {
            path: p.clone(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(ProfileError::Malformed {
                path: p,
                line: 0,
                what: format!(
                    "larger than {} MiB, which no profile is",
                    MAX_FILE_BYTES >> 20
                ),
            });
        }
        Profile::parse(&text, &p, manifest, layout)
    }

    /// Parse the text of a profile (named `origin` in errors: a path, a Redis key) and check
    /// that it belongs to the image `manifest` and, when it says (version 3), to an index
    /// with the checkpoint layout `layout`.
    pub fn parse(
        text: &str,
        origin: &str,
        manifest: &str,
        layout: u64,
    ) -> Result<Profile, ProfileError> {
        let p = origin.to_string();
        let bad = |line: usize, what: &str| ProfileError::Malformed {
            path: p.clone(),
            line,
            what: what.into(),
        };
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
        let version = match lines.next() {
            Some((_, MAGIC)) => 3,
            Some((_, MAGIC_2)) => 2,
            Some((_, MAGIC_1)) => 1,
            _ => return Err(bad(1, &format!("expected `{MAGIC}`"))),
        };
        let with_pieces = version >= 2;
        let found = match lines.next() {
            Some((_, l)) if l.starts_with("manifest ") => l["manifest ".len()..].trim().to_string(),
            _ => return Err(bad(2, "expected `manifest <digest>`")),
        };
        if found != manifest {
            return Err(ProfileError::OtherImage {
                path: p,
                expected: manifest.into(),
                found,
            });
        }
        let recorded_layout = if version >= 3 {
            let hex = match lines.next() {
                Some((_, l)) if l.starts_with("layout ") => l["layout ".len()..].trim(),
                _ => return Err(bad(3, "expected `layout <16 hex digits>`")),
            };
            let found = u64::from_str_radix(hex, 16)
                .map_err(|_| bad(3, "expected `layout <16 hex digits>`"))?;
            if found != layout {
                return Err(ProfileError::OtherLayout {
                    path: p,
                    expected: layout,
                    found,
                });
            }
            Some(found)
        } else {
            None
        };
        let mut intervals = Vec::new();
        for (n, l) in lines.filter(|(_, l)| !l.is_empty()) {
            let numbers: Option<Vec<u64>> =
                l.split_ascii_whitespace().map(|w| w.parse().ok()).collect();
            match numbers.as_deref() {
                Some([layer, checkpoint, until, pieces @ ..])
                    if *layer <= u32::MAX as u64
                        && *checkpoint <= u32::MAX as u64
                        && (with_pieces || pieces.is_empty()) =>
                {
                    intervals.push(Needed {
                        interval: Interval {
                            layer: *layer as u32,
                            checkpoint: *checkpoint as u32,
                        },
                        until: *until,
                        pieces: pieces.to_vec(),
                    })
                }
                _ => {
                    return Err(bad(
                        n,
                        "expected `<layer> <checkpoint> <until> [<piece>...]`",
                    ))
                }
            }
        }
        Ok(Profile {
            manifest: found,
            layout: recorded_layout,
            intervals,
        })
    }

    /// Add what `other` (a profile of the same image) needed: intervals both list are
    /// widened to the further `until` and the pieces of both; intervals new to `self` come
    /// after its own, in `other`'s order, as long as the profile holds at most `max`.
    pub fn merge(&mut self, other: &Profile, max: usize) {
        self.layout = self.layout.or(other.layout);
        let mut at: HashMap<Interval, usize> = self
            .intervals
            .iter()
            .enumerate()
            .map(|(i, n)| (n.interval, i))
            .collect();
        for n in &other.intervals {
            match at.get(&n.interval) {
                Some(&i) => self.intervals[i].absorb(n),
                None if self.intervals.len() < max => {
                    at.insert(n.interval, self.intervals.len());
                    self.intervals.push(n.clone());
                }
                None => {}
            }
        }
    }

    /// The profile as text (what [`Profile::save`] writes and [`Profile::parse`] reads).
    pub fn to_text(&self) -> String {
        let mut text = match self.layout {
            Some(layout) => format!(
                "{MAGIC}\nmanifest {}\nlayout {layout:016x}\n",
                self.manifest
            ),
            None => format!("{MAGIC_2}\nmanifest {}\n", self.manifest),
        };
        for n in &self.intervals {
            text.push_str(&format!(
                "{} {} {}",
                n.interval.layer, n.interval.checkpoint, n.until
            ));
            for p in &n.pieces {
                text.push_str(&format!(" {p}"));
            }
            text.push('\n');
        }
        text
    }

    /// Write the profile (to a temporary file of this process renamed into place).
    pub fn save(&self, path: &Path) -> Result<(), ProfileError> {
        let io = |source| ProfileError::Io {
            path: path.display().to_string(),
            source,
        };
        // A temporary name of this process's own: several daemons may save one learnt profile.
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, self.to_text()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// The manifest digest and checkpoint layout that name the profiles of `idx`.
pub fn image_of(idx: &IndexFile) -> (String, u64) {
    let manifest = String::from_utf8_lossy(idx.index().image.manifest_digest.as_slice());
    (manifest.into_owned(), idx.checkpoint_layout_id())
}

/// `needed` grouped into runs of neighbouring intervals (same layer, at most `gap`
/// intervals missing between two of a run, at most `max` checkpoints from a run's first to
/// its last), so that each run's compressed bytes can be fetched with one request (the
/// missing intervals' bytes too: a request costs a registry more than a few hundred KB).
/// Runs are ordered by the first use of any of their intervals; an interval listed twice
/// appears once.
pub fn runs(needed: &[Needed], max: usize, gap: u32) -> Vec<Vec<Needed>> {
    // Each interval once: its first use, and everything its listings say it needed.
    let mut merged: HashMap<Interval, (usize, Needed)> = HashMap::new();
    for (i, n) in needed.iter().enumerate() {
        let (_, m) = merged.entry(n.interval).or_insert_with(|| {
            (
                i,
                Needed {
                    pieces: Vec::new(),
                    ..n.clone()
                },
            )
        });
        m.absorb(n);
    }
    let mut sorted: Vec<(usize, Needed)> = merged.into_values().collect();
    sorted.sort_by_key(|(_, n)| (n.interval.layer, n.interval.checkpoint));
    let mut runs: Vec<(usize, Vec<Needed>)> = Vec::new();
    for (first, n) in sorted {
        let interval = n.interval;
        match runs.last_mut() {
            Some((rank, run))
                if matches!((run.first(), run.last()), (Some(f), Some(p))
                    if p.interval.layer == interval.layer
                        && interval.checkpoint <= p.interval.checkpoint.saturating_add(1 + gap)
                        && (interval.checkpoint.saturating_sub(f.interval.checkpoint) as usize)
                            < max.max(1)) =>
            {
                *rank = (*rank).min(first);
                run.push(n);
            }
            _ => runs.push((first, vec![n])),
        }
    }
    runs.sort_by_key(|&(rank, _)| rank);
    runs.into_iter().map(|(_, run)| run).collect()
}

/// Collects the intervals whose bytes a running mount serves, first use first.
#[derive(Default)]
pub struct Recorder {
    seen: Mutex<(HashMap<Interval, usize>, Vec<Needed>)>,
    /// Intervals first needed after this instant are not recorded.
    deadline: Option<std::time::Instant>,
}

impl Recorder {
    /// A recorder that notes only intervals first needed within `window` from now (a
    /// start, not everything a long-running workload ever reads).
    pub fn for_window(window: std::time::Duration) -> Recorder {
        Recorder {
            deadline: std::time::Instant::now().checked_add(window),
            ..Recorder::default()
        }
    }

    /// Note that the piece at `piece` (a range of the layer's uncompressed stream), with
    /// bytes in `interval`, was needed.
    pub fn record(&self, interval: Interval, piece: (u64, u64)) {
        let mut guard = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (index, order) = &mut *guard;
        let late = self.deadline.is_some_and(|d| std::time::Instant::now() > d);
        if late && !index.contains_key(&interval) {
            return;
        }
        let k = *index.entry(interval).or_insert_with(|| {
            order.push(Needed {
                interval,
                until: 0,
                pieces: Vec::new(),
            });
            order.len() - 1
        });
        let n = &mut order[k];
        n.until = n.until.max(piece.1);
        if !n.pieces.contains(&piece.0) {
            n.pieces.push(piece.0);
        }
    }

    /// The profile recorded so far for the image `manifest`, indexed with the checkpoint
    /// layout `layout` ([`crate::format::IndexFile::checkpoint_layout_id`]).
    pub fn profile(&self, manifest: &str, layout: u64) -> Profile {
        let s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        Profile {
            intervals: s.1.clone(),
            ..Profile::new(manifest, layout)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile file is read up to a bound: a huge file (a profile directory is not
    /// trusted) is refused without being read whole.
    #[test]
    fn an_oversized_profile_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap();
        let e = Profile::load(&path, "sha256:x", 0).unwrap_err();
        assert!(e.to_string().contains("larger than 64 MiB"), "{e}");
        let good = Profile::new("sha256:x", 7);
        good.save(&path).unwrap();
        assert!(Profile::load(&path, "sha256:x", 7).is_ok());
    }

    #[test]
    fn runs_group_neighbouring_intervals_in_first_use_order() {
        let n = |layer, checkpoint, until| Needed {
            interval: Interval { layer, checkpoint },
            until,
            pieces: vec![until - 1],
        };
        let needed = [
            n(1, 7, 70),
            n(0, 3, 30),
            n(1, 5, 50),
            n(1, 6, 60),
            n(0, 9, 90),
            n(1, 8, 80),
            n(1, 5, 55),
            n(2, 0, 1),
        ];
        let got: Vec<Vec<(u32, u32, u64)>> = runs(&needed, 3, 0)
            .iter()
            .map(|r| {
                r.iter()
                    .map(|n| (n.interval.layer, n.interval.checkpoint, n.until))
                    .collect()
            })
            .collect();
        assert_eq!(
            got,
            [
                vec![(1, 5, 55), (1, 6, 60), (1, 7, 70)],
                vec![(0, 3, 30)],
                vec![(0, 9, 90)],
                vec![(1, 8, 80)],
                vec![(2, 0, 1)]
            ],
            "consecutive checkpoints of one layer, at most 3, ranked by their earliest use"
        );
        assert_eq!(
            runs(&needed, 3, 0)[0][0].pieces,
            [49, 54],
            "an interval listed twice keeps the pieces of both (sorted, once each)"
        );
    }

    #[test]
    fn runs_may_span_a_gap_of_unneeded_intervals_but_not_more_checkpoints_than_allowed() {
        let n = |layer, checkpoint| Needed {
            interval: Interval { layer, checkpoint },
            until: u64::MAX,
            pieces: Vec::new(),
        };
        let shape = |runs: Vec<Vec<Needed>>| -> Vec<Vec<u32>> {
            runs.iter()
                .map(|r| r.iter().map(|n| n.interval.checkpoint).collect())
                .collect()
        };
        let needed = [n(0, 1), n(0, 3), n(0, 6), n(0, 7), n(1, 8), n(0, 10)];
        assert_eq!(
            shape(runs(&needed, 8, 1)),
            [vec![1, 3], vec![6, 7], vec![8], vec![10]],
            "one missing interval bridged, two not; never across layers"
        );
        assert_eq!(
            shape(runs(&needed, 8, 2)),
            [vec![1, 3, 6, 7], vec![8], vec![10]]
        );
        assert_eq!(
            shape(runs(&needed, 6, 2)),
            [vec![1, 3, 6], vec![7, 10], vec![8]],
            "a run spans at most 6 checkpoints, first to last"
        );
        assert_eq!(
            shape(runs(&needed, 8, 0)),
            [vec![1], vec![3], vec![6, 7], vec![8], vec![10]]
        );
    }

    #[test]
    fn a_windowed_recorder_takes_no_new_intervals_after_its_window() {
        let r = Recorder::for_window(std::time::Duration::from_millis(50));
        let iv = |checkpoint| Interval {
            layer: 0,
            checkpoint,
        };
        r.record(iv(1), (0, 10));
        std::thread::sleep(std::time::Duration::from_millis(80));
        r.record(iv(2), (20, 30));
        r.record(iv(1), (10, 15));
        let p = r.profile("sha256:aa", 7);
        assert_eq!(p.intervals.len(), 1, "{p:?}");
        assert_eq!(
            (p.intervals[0].until, &p.intervals[0].pieces[..]),
            (15, &[0, 10][..])
        );
    }

    #[test]
    fn merging_widens_known_intervals_and_appends_new_ones_up_to_a_limit() {
        let n = |checkpoint, until, pieces: &[u64]| Needed {
            interval: Interval {
                layer: 0,
                checkpoint,
            },
            until,
            pieces: pieces.to_vec(),
        };
        let profile = |intervals| Profile {
            manifest: "sha256:aa".into(),
            layout: Some(7),
            intervals,
        };
        let mut p = profile(vec![n(3, 30, &[20]), n(1, 10, &[5])]);
        p.merge(
            &profile(vec![n(1, 12, &[11, 5]), n(7, 70, &[60]), n(8, 80, &[])]),
            3,
        );
        assert_eq!(
            p.intervals,
            [n(3, 30, &[20]), n(1, 12, &[5, 11]), n(7, 70, &[60])],
            "own order kept, the shared interval widened, new ones appended up to 3"
        );
    }

    #[test]
    fn a_profile_round_trips_and_refuses_other_images_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let r = Recorder::default();
        for (l, c, start, until) in [
            (1, 5, 90, 100),
            (0, 2, 0, 7),
            (1, 5, 250, 300),
            (1, 6, 40, 50),
            (1, 5, 90, 100),
            (1, 5, 150, 200),
        ] {
            r.record(
                Interval {
                    layer: l,
                    checkpoint: c,
                },
                (start, until),
            );
        }
        let p = r.profile("sha256:aa", 7);
        let got: Vec<_> = p
            .intervals
            .iter()
            .map(|n| {
                (
                    n.interval.layer,
                    n.interval.checkpoint,
                    n.until,
                    n.pieces.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (1, 5, 300, vec![90, 250, 150]),
                (0, 2, 7, vec![0]),
                (1, 6, 50, vec![40])
            ],
            "first use order, furthest offset, each piece once"
        );
        p.save(&path).unwrap();
        assert_eq!(Profile::load(&path, "sha256:aa", 7).unwrap(), p);
        assert!(matches!(
            Profile::load(&path, "sha256:bb", 7),
            Err(ProfileError::OtherImage { .. })
        ));
        // Recorded with other checkpoints: its intervals are not this index's.
        let e = Profile::load(&path, "sha256:aa", 8).unwrap_err();
        assert!(
            matches!(
                e,
                ProfileError::OtherLayout {
                    expected: 8,
                    found: 7,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("record it again"), "{e}");
        std::fs::write(
            &path,
            "clip-profile 3\nmanifest sha256:aa\nlayout zz\n1 5 300\n",
        )
        .unwrap();
        assert!(matches!(
            Profile::load(&path, "sha256:aa", 7),
            Err(ProfileError::Malformed { line: 3, .. })
        ));
        // Version 2: no layout line, read by any index of the image; merged with a run
        // recorded on this index, it is written as version 3.
        std::fs::write(&path, "clip-profile 2\nmanifest sha256:aa\n1 5 300 90\n").unwrap();
        let mut v2 = Profile::load(&path, "sha256:aa", 8).unwrap();
        assert_eq!(
            (v2.layout, v2.intervals[0].pieces.clone()),
            (None, vec![90])
        );
        v2.merge(&r.profile("sha256:aa", 8), 10);
        assert!(v2
            .to_text()
            .starts_with("clip-profile 3\nmanifest sha256:aa\nlayout 0000000000000008\n"));
        // Version 1: no pieces, and a line with more than three numbers is malformed.
        std::fs::write(&path, "clip-profile 1\nmanifest sha256:aa\n1 5 300\n").unwrap();
        let v1 = Profile::load(&path, "sha256:aa", 7).unwrap();
        assert_eq!(
            (v1.intervals[0].until, v1.intervals[0].pieces.len()),
            (300, 0)
        );
        std::fs::write(&path, "clip-profile 1\nmanifest sha256:aa\n1 5 300 90\n").unwrap();
        assert!(matches!(
            Profile::load(&path, "sha256:aa", 7),
            Err(ProfileError::Malformed { line: 3, .. })
        ));
        std::fs::write(&path, "clip-profile 2\nmanifest sha256:aa\n1 2\n").unwrap();
        let e = Profile::load(&path, "sha256:aa", 7)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("--record-profile"),
            "{e}"
        );
        std::fs::write(&path, "something else\n").unwrap();
        assert!(matches!(
            Profile::load(&path, "sha256:aa", 7),
            Err(ProfileError::Malformed { line: 1, .. })
        ));
    }
}
