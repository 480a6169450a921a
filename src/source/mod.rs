//! Where image bytes come from. A [`Source`] serves manifests and (ranges of) blobs; the
//! builder streams whole layers through it and the read path fetches compressed spans
//! starting at checkpoints. The OCI layout directory is one implementation.

pub mod layout;

use std::io::Read;

/// Errors of the source layer.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The reference or tag is not in the source.
    #[error("{0}")]
    NotFound(String),
    /// No manifest for the wanted platform.
    #[error("the image has no manifest for platform {want} (it has: {have}); pick one with --platform")]
    NoPlatform {
        /// Wanted platform.
        want: String,
        /// Platforms present.
        have: String,
    },
    /// The image documents are malformed or unsupported.
    #[error("bad image: {0}")]
    BadImage(String),
    /// Content does not match its digest.
    #[error("{what} {digest} does not match its digest (got {actual}); the source is corrupt or lying")]
    DigestMismatch {
        /// What was checked.
        what: String,
        /// Expected digest.
        digest: String,
        /// Computed digest.
        actual: String,
    },
    /// The reference could not be understood.
    #[error("invalid image reference {0:?}")]
    BadReference(String),
    /// I/O failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// A source of manifests and blobs.
pub trait Source: Send + Sync {
    /// A short description for logs and the index (`/path/to/layout` or `registry/repo`).
    fn describe(&self) -> String;

    /// Fetch a manifest or image index by tag or digest: (media type if known, bytes,
    /// digest). A digest reference must be checked by the source.
    fn manifest(&self, reference: &str) -> Result<(String, Vec<u8>, String), SourceError>;

    /// Stream blob `digest` from byte `start` up to `end` (exclusive; `None` = to the end).
    /// The source does not verify the digest: callers that read whole blobs do.
    fn blob(&self, digest: &str, start: u64, end: Option<u64>) -> Result<Box<dyn Read + Send>, SourceError>;

    /// Read a whole small blob (config) and verify its digest and size.
    fn read_small_blob(&self, digest: &str, size: u64) -> Result<Vec<u8>, SourceError> {
        if size > 64 << 20 {
            return Err(SourceError::BadImage(format!("blob {digest} claims {size} bytes, too large for a config")));
        }
        let mut buf = Vec::with_capacity(size as usize);
        self.blob(digest, 0, None)?
            .take(size + 1)
            .read_to_end(&mut buf)
            .map_err(|source| SourceError::Io { context: format!("reading blob {digest}"), source })?;
        let actual = crate::oci::digest_of(&buf);
        if actual != digest || buf.len() as u64 != size {
            return Err(SourceError::DigestMismatch { what: "blob".into(), digest: digest.into(), actual });
        }
        Ok(buf)
    }
}

/// Split `DIR:TAG` into directory and tag, as skopeo's `oci:` transport does; a path that
/// exists as given wins over splitting at its last colon.
pub fn split_layout_ref(s: &str) -> (String, Option<String>) {
    let s = s.strip_prefix("oci:").unwrap_or(s);
    if std::path::Path::new(s).is_dir() {
        return (s.to_string(), None);
    }
    match s.rsplit_once(':') {
        Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => (dir.to_string(), Some(tag.to_string())),
        _ => (s.to_string(), None),
    }
}

/// Open the source named by a command-line image argument: an OCI layout directory
/// (`DIR`, `DIR:TAG`, `oci:DIR:TAG`). Returns the source and the reference within it.
pub fn open(spec: &str) -> Result<(Box<dyn Source>, String), SourceError> {
    let (dir, tag) = split_layout_ref(spec);
    let src = layout::LayoutSource::open(std::path::Path::new(&dir))?;
    Ok((Box::new(src), tag.unwrap_or_default()))
}
