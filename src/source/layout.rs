//! A local OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`).

use super::{Source, SourceError};
use crate::oci::{self, ImageIndex};
use crate::raw::mmap::willneed_chunks;
use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// An OCI image layout on disk.
pub struct LayoutSource {
    dir: PathBuf,
    /// Blobs opened so far, kept open: later reads skip the path lookup.
    open_blobs: Mutex<HashMap<String, Arc<File>>>,
}

impl LayoutSource {
    /// Open the layout at `dir`, checking its `oci-layout` marker.
    pub fn open(dir: &Path) -> Result<LayoutSource, SourceError> {
        let marker = dir.join("oci-layout");
        if !marker.is_file() {
            return Err(SourceError::NotFound(format!(
                "{} is not an OCI image layout (no oci-layout file); give a layout directory such as one written by `skopeo copy docker://IMAGE oci:DIR:TAG`",
                dir.display()
            )));
        }
        Ok(LayoutSource {
            dir: dir.to_path_buf(),
            open_blobs: Mutex::default(),
        })
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the blob with `digest` (validated so it cannot escape the layout).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, SourceError> {
        let (alg, hex) = digest
            .split_once(':')
            .ok_or_else(|| SourceError::BadImage(format!("malformed digest {digest:?}")))?;
        let ok = !alg.is_empty()
            && alg.bytes().all(|b| b.is_ascii_alphanumeric())
            && !hex.is_empty()
            && hex.bytes().all(|b| b.is_ascii_hexdigit());
        if !ok {
            return Err(SourceError::BadImage(format!(
                "malformed digest {digest:?}"
            )));
        }
        Ok(self.dir.join("blobs").join(alg).join(hex))
    }

    /// Blob `digest`, opened once and then shared.
    fn blob_file(&self, digest: &str) -> Result<Arc<File>, SourceError> {
        let mut open = self.open_blobs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = open.get(digest) {
            return Ok(f.clone());
        }
        let p = self.blob_path(digest)?;
        let f = File::open(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                SourceError::NotFound(format!(
                    "blob {digest} is missing from the layout {}",
                    self.dir.display()
                ))
            } else {
                SourceError::Io {
                    context: format!("reading blob {}", p.display()),
                    source: e,
                }
            }
        })?;
        // No kernel read-ahead on this shared file: a first read anywhere would read up to
        // the device's read-ahead size (8 MiB on some virtual disks) around it, and readers
        // at many offsets share one read-ahead state. `BlobReader` asks for what it needs.
        let _ = posix_fadvise(&f, 0, 0, PosixFadviseAdvice::POSIX_FADV_RANDOM);
        let f = Arc::new(f);
        open.insert(digest.to_string(), f.clone());
        Ok(f)
    }

    fn root_index(&self) -> Result<(Vec<u8>, ImageIndex), SourceError> {
        let p = self.dir.join("index.json");
        let bytes = std::fs::read(&p).map_err(|source| SourceError::Io {
            context: format!("reading {}", p.display()),
            source,
        })?;
        let idx = serde_json::from_slice(&bytes).map_err(|e| {
            SourceError::BadImage(format!("{} is not a valid image index: {e}", p.display()))
        })?;
        Ok((bytes, idx))
    }

    fn read_manifest_blob(
        &self,
        d: &oci::Descriptor,
    ) -> Result<(String, Vec<u8>, String), SourceError> {
        let bytes = self.read_small_blob(&d.digest, d.size)?;
        Ok((d.media_type.clone(), bytes, d.digest.clone()))
    }
}

impl Source for LayoutSource {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn is_local(&self) -> bool {
        true
    }

    /// `reference` is a tag (`org.opencontainers.image.ref.name`), a digest, or empty: the
    /// only manifest, or `index.json` itself as an image index when it lists several.
    fn manifest(&self, reference: &str) -> Result<(String, Vec<u8>, String), SourceError> {
        let (bytes, idx) = self.root_index()?;
        if reference.starts_with("sha256:") {
            if let Some(d) = idx.manifests.iter().find(|d| d.digest == reference) {
                return self.read_manifest_blob(d);
            }
            // A manifest nested in an index: read it by digest, verified.
            let b = self.read_small_blob(
                reference,
                std::fs::metadata(self.blob_path(reference)?)
                    .map(|m| m.len())
                    .unwrap_or(0),
            )?;
            return Ok((String::new(), b, reference.to_string()));
        }
        if !reference.is_empty() {
            let d = idx
                .manifests
                .iter()
                .find(|d| {
                    d.annotations
                        .get(oci::ANNOTATION_REF_NAME)
                        .map(String::as_str)
                        == Some(reference)
                })
                .ok_or_else(|| {
                    let tags: Vec<&str> = idx
                        .manifests
                        .iter()
                        .filter_map(|d| {
                            d.annotations
                                .get(oci::ANNOTATION_REF_NAME)
                                .map(String::as_str)
                        })
                        .collect();
                    SourceError::NotFound(format!(
                        "tag {reference:?} is not in the layout {} (tags: {})",
                        self.dir.display(),
                        tags.join(", ")
                    ))
                })?;
            return self.read_manifest_blob(d);
        }
        match idx.manifests.len() {
            0 => Err(SourceError::NotFound(format!(
                "the layout {} holds no images",
                self.dir.display()
            ))),
            1 => self.read_manifest_blob(&idx.manifests[0]),
            _ if idx.manifests.iter().all(|d| d.platform.is_some()) => Ok((
                oci::MT_OCI_INDEX.into(),
                bytes.clone(),
                oci::digest_of(&bytes),
            )),
            _ => Err(SourceError::NotFound(format!(
                "the layout {} holds several images; name one as DIR:TAG",
                self.dir.display()
            ))),
        }
    }

    fn blob(
        &self,
        digest: &str,
        start: u64,
        end: Option<u64>,
    ) -> Result<Box<dyn Read + Send>, SourceError> {
        Ok(Box::new(BlobReader::new(
            self.blob_file(digest)?,
            start,
            end,
            start,
        )))
    }

    fn blob_from(
        &self,
        digest: &str,
        start: u64,
        expect_end: u64,
        size: u64,
    ) -> Result<Box<dyn Read + Send>, SourceError> {
        Ok(Box::new(BlobReader::new(
            self.blob_file(digest)?,
            start,
            Some(size),
            expect_end,
        )))
    }

    fn prepare(&self, digests: &[&str]) -> Result<(), SourceError> {
        digests.iter().try_for_each(|d| self.blob_file(d).map(drop))
    }
}

/// Smallest read-ahead segment of a [`BlobReader`] past its expected end.
const MIN_AHEAD: u64 = 256 << 10;
/// Largest read-ahead segment, and the most asked for at once at the start.
const MAX_AHEAD: u64 = 8 << 20;

/// Reads a range of a shared blob file with positioned reads, asking the kernel for its
/// bytes ahead of time (`POSIX_FADV_WILLNEED`; the file itself is advised random): at the
/// start exactly the bytes it expects to need, and once it reads past them, segments that
/// double in size, one segment ahead of the reads.
struct BlobReader {
    file: Arc<File>,
    pos: u64,
    end: Option<u64>,
    /// Reads from this offset on go beyond what the reader expected: read ahead of them.
    ahead_from: u64,
    /// Everything before this offset has been asked for.
    advised: u64,
    /// Length of the next segment to ask for.
    next_len: u64,
}

impl BlobReader {
    fn new(file: Arc<File>, start: u64, end: Option<u64>, expect_end: u64) -> BlobReader {
        let mut r = BlobReader {
            file,
            pos: start,
            end,
            ahead_from: expect_end.min(start.saturating_add(MAX_AHEAD / 2)),
            advised: start,
            next_len: MIN_AHEAD,
        };
        r.advise_to(expect_end.min(start.saturating_add(MAX_AHEAD)));
        r
    }

    /// Ask for the bytes from `advised` to `to` (clamped to the end), in pieces the kernel
    /// takes whole. Advice only.
    fn advise_to(&mut self, to: u64) {
        let to = self.end.map_or(to, |e| to.min(e));
        if to <= self.advised {
            return;
        }
        for (at, n) in willneed_chunks(self.advised, to) {
            let _ = posix_fadvise(
                self.file.as_ref(),
                at as i64,
                n as i64,
                PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
        self.advised = to;
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self
            .end
            .map_or(buf.len() as u64, |e| e.saturating_sub(self.pos));
        let want = (buf.len() as u64).min(left) as usize;
        if want == 0 {
            return Ok(0);
        }
        // A read that starts inside the expected range needs no more advice: the read
        // itself fetches whatever of it was not asked for yet.
        let need = self.pos.saturating_add(want as u64);
        if self.pos >= self.ahead_from && need.saturating_add(self.next_len / 2) > self.advised {
            self.advise_to(need.max(self.advised).saturating_add(self.next_len));
            self.next_len = (self.next_len * 2).min(MAX_AHEAD);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Writes OCI image layouts: used for the demo image and by tests that build their own.
pub struct LayoutWriter {
    dir: PathBuf,
    index: Vec<oci::Descriptor>,
}

/// A layer to write: its tar bytes and whether to gzip them.
pub struct LayerInput {
    /// The uncompressed tar stream.
    pub tar: Vec<u8>,
    /// Store gzip-compressed (true) or as plain tar.
    pub gzip: bool,
    /// A ready gzip blob of `tar` to store instead of compressing it here (e.g. one with
    /// several members or optional header fields).
    pub blob: Option<Vec<u8>>,
}

impl LayerInput {
    /// A layer gzip-compressed at level 6.
    pub fn gzip(tar: Vec<u8>) -> LayerInput {
        LayerInput {
            tar,
            gzip: true,
            blob: None,
        }
    }

    /// An uncompressed layer.
    pub fn plain(tar: Vec<u8>) -> LayerInput {
        LayerInput {
            tar,
            gzip: false,
            blob: None,
        }
    }
}

impl LayoutWriter {
    /// Create (or reuse) a layout at `dir`.
    pub fn create(dir: &Path) -> std::io::Result<LayoutWriter> {
        std::fs::create_dir_all(dir.join("blobs/sha256"))?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(LayoutWriter {
            dir: dir.to_path_buf(),
            index: Vec::new(),
        })
    }

    /// Store a blob; returns its descriptor.
    pub fn blob(&self, media_type: &str, bytes: &[u8]) -> std::io::Result<oci::Descriptor> {
        let digest = oci::digest_of(bytes);
        let hex = digest.trim_start_matches("sha256:");
        std::fs::write(self.dir.join("blobs/sha256").join(hex), bytes)?;
        Ok(oci::Descriptor {
            media_type: media_type.into(),
            digest,
            size: bytes.len() as u64,
            ..Default::default()
        })
    }

    /// Write an image (layers, config, manifest) and return the manifest's descriptor.
    pub fn image(
        &self,
        layers: &[LayerInput],
        platform: &oci::Platform,
        created: &str,
    ) -> std::io::Result<oci::Descriptor> {
        self.image_with_config(layers, platform, created, serde_json::json!({}))
    }

    /// [`LayoutWriter::image`] with `runtime` as the config's `config` object (`Env`,
    /// `WorkingDir`, `Cmd`…: how the image's containers start).
    pub fn image_with_config(
        &self,
        layers: &[LayerInput],
        platform: &oci::Platform,
        created: &str,
        runtime: serde_json::Value,
    ) -> std::io::Result<oci::Descriptor> {
        use sha2::Digest;
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for l in layers {
            diff_ids.push(format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(&l.tar))
            ));
            if let Some(blob) = &l.blob {
                descs.push(self.blob(oci::MT_OCI_LAYER_GZIP, blob)?);
            } else if l.gzip {
                use std::io::Write;
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                enc.write_all(&l.tar)?;
                descs.push(self.blob(oci::MT_OCI_LAYER_GZIP, &enc.finish()?)?);
            } else {
                descs.push(self.blob(oci::MT_OCI_LAYER_TAR, &l.tar)?);
            }
        }
        let config = serde_json::json!({
            "created": created,
            "architecture": platform.architecture,
            "os": platform.os,
            "config": runtime,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = self.blob(
            oci::MT_OCI_CONFIG,
            &serde_json::to_vec(&config).map_err(std::io::Error::other)?,
        )?;
        let manifest = oci::Manifest {
            schema_version: 2,
            media_type: Some(oci::MT_OCI_MANIFEST.into()),
            config,
            layers: descs,
        };
        let mut d = self.blob(
            oci::MT_OCI_MANIFEST,
            &serde_json::to_vec(&manifest).map_err(std::io::Error::other)?,
        )?;
        d.platform = Some(platform.clone());
        Ok(d)
    }

    /// Write an image index over `manifests` and return its descriptor.
    pub fn image_index(&self, manifests: Vec<oci::Descriptor>) -> std::io::Result<oci::Descriptor> {
        let idx = oci::ImageIndex {
            schema_version: 2,
            media_type: Some(oci::MT_OCI_INDEX.into()),
            manifests,
        };
        self.blob(
            oci::MT_OCI_INDEX,
            &serde_json::to_vec(&idx).map_err(std::io::Error::other)?,
        )
    }

    /// List `desc` in `index.json` under tag `tag`.
    pub fn tag(&mut self, mut desc: oci::Descriptor, tag: &str) {
        desc.annotations
            .insert(oci::ANNOTATION_REF_NAME.into(), tag.into());
        self.index.retain(|d| {
            d.annotations
                .get(oci::ANNOTATION_REF_NAME)
                .map(String::as_str)
                != Some(tag)
        });
        self.index.push(desc);
    }

    /// Write `index.json`.
    pub fn finish(self) -> std::io::Result<()> {
        let idx = oci::ImageIndex {
            schema_version: 2,
            media_type: Some(oci::MT_OCI_INDEX.into()),
            manifests: self.index,
        };
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec_pretty(&idx).map_err(std::io::Error::other)?,
        )
    }
}
