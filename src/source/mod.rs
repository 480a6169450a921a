//! Where image bytes come from. A [`Source`] serves manifests and (ranges of) blobs; the
//! builder streams whole layers through it and the read path fetches compressed spans
//! starting at checkpoints. Implementations: an OCI layout directory ([`layout`]) and an OCI
//! distribution registry ([`registry`]).

pub mod auth;
pub mod buffered;
pub mod counting;
pub mod layout;
pub mod reference;
pub mod registry;

use std::io::Read;

/// Errors of the source layer.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The reference or tag is not in the source.
    #[error("{0}")]
    NotFound(String),
    /// No manifest for the wanted platform.
    #[error(
        "the image has no manifest for platform {want} (it has: {have}); pick one with --platform"
    )]
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
    #[error(
        "{what} {digest} does not match its digest (got {actual}); the source is corrupt or lying"
    )]
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
    /// A registry reference that does not parse.
    #[error("invalid image reference {reference:?}: {why}")]
    Reference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        why: String,
    },
    /// The registry refused access (missing or rejected login, or a repository it hides).
    #[error("{0}")]
    Denied(String),
    /// The registry kept answering 429 Too Many Requests.
    #[error("{0}")]
    RateLimited(String),
    /// The registry cannot be reached (connection refused, DNS, TLS, network down).
    #[error("{0}")]
    Unreachable(String),
    /// Another registry failure (unexpected status, bad token service, bad configuration).
    #[error("{0}")]
    Registry(String),
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
    fn blob(
        &self,
        digest: &str,
        start: u64,
        end: Option<u64>,
    ) -> Result<Box<dyn Read + Send>, SourceError>;

    /// Stream blob `digest` (of `size` bytes) from `start` on, for a reader that will
    /// probably stop near `expect_end` but may go on. The default opens the rest of the
    /// blob; sources that pay for every byte sent (a registry) fetch `start..expect_end`
    /// first and then ranges that double in size as the reader continues.
    fn blob_from(
        &self,
        digest: &str,
        start: u64,
        expect_end: u64,
        size: u64,
    ) -> Result<Box<dyn Read + Send>, SourceError> {
        let _ = (expect_end, size);
        self.blob(digest, start, None)
    }

    /// Whether blobs are read from this machine (a layout directory): reading a range again
    /// costs no network round trip and no transfer.
    fn is_local(&self) -> bool {
        false
    }

    /// Get ready to read the blobs `digests` (the layers a mount serves). A local layout
    /// opens each one now and keeps it open, so that a missing blob is an error at start
    /// rather than at the first read, and reads skip the path lookup. The default does
    /// nothing.
    fn prepare(&self, digests: &[&str]) -> Result<(), SourceError> {
        let _ = digests;
        Ok(())
    }

    /// Read a whole small blob (config) and verify its digest and size.
    fn read_small_blob(&self, digest: &str, size: u64) -> Result<Vec<u8>, SourceError> {
        if size > 64 << 20 {
            return Err(SourceError::BadImage(format!(
                "blob {digest} claims {size} bytes, too large for a config"
            )));
        }
        let mut buf = Vec::with_capacity(size as usize);
        self.blob(digest, 0, None)?
            .take(size + 1)
            .read_to_end(&mut buf)
            .map_err(|source| SourceError::Io {
                context: format!("reading blob {digest}"),
                source,
            })?;
        let actual = crate::oci::digest_of(&buf);
        if actual != digest || buf.len() as u64 != size {
            return Err(SourceError::DigestMismatch {
                what: "blob".into(),
                digest: digest.into(),
                actual,
            });
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
        Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => {
            (dir.to_string(), Some(tag.to_string()))
        }
        _ => (s.to_string(), None),
    }
}

/// Whether `spec` is written as a filesystem path (never a registry reference).
fn path_like(spec: &str) -> bool {
    spec.starts_with('/')
        || spec.starts_with("./")
        || spec.starts_with("../")
        || spec.starts_with('~')
        || spec == "."
}

/// Open the source named by a command-line image argument. Returns the source and the
/// reference within it.
///
/// * `oci:DIR[:TAG]`, an existing directory `DIR`, or `DIR:TAG` with `DIR` existing: an OCI
///   layout directory.
/// * `docker://REF`, or anything else that parses as a docker reference
///   (`python:3.11`, `localhost:5000/team/app@sha256:…`): a registry, with options from the
///   environment ([`registry::RegistryOptions::from_env`]).
pub fn open(spec: &str) -> Result<(Box<dyn Source>, String), SourceError> {
    if let Some(r) = spec.strip_prefix("docker://") {
        return open_registry(r);
    }
    if !spec.starts_with("oci:") {
        let (dir, _) = split_layout_ref(spec);
        if !std::path::Path::new(&dir).exists() && !path_like(spec) {
            return match reference::Reference::parse(spec) {
                Ok(_) => open_registry(spec),
                Err(SourceError::Reference { reference, why }) => Err(SourceError::Reference {
                    reference,
                    why: format!("{why}; no OCI layout directory has that name either"),
                }),
                Err(e) => Err(e),
            };
        }
    }
    let (dir, tag) = split_layout_ref(spec);
    let src = layout::LayoutSource::open(std::path::Path::new(&dir))?;
    Ok((Box::new(src), tag.unwrap_or_default()))
}

fn open_registry(spec: &str) -> Result<(Box<dyn Source>, String), SourceError> {
    let r = reference::Reference::parse(spec)?;
    let src = registry::RegistrySource::open(&r, &registry::RegistryOptions::from_env()?)?;
    let full = reference::Reference {
        tag: r
            .tag
            .clone()
            .or_else(|| r.digest.is_none().then(|| "latest".into())),
        ..r
    };
    Ok((Box::new(src), full.to_string()))
}

/// Reopen the source recorded in an index (`image.source`, from [`Source::describe`]): a
/// registry repository (`registry://HOST/REPO`, `registry+http://HOST/REPO`) or an OCI
/// layout directory path. Registry options other than the scheme come from the environment.
pub fn open_recorded(source: &str) -> Result<Box<dyn Source>, SourceError> {
    if source.starts_with(registry::RECORDED_HTTPS) || source.starts_with(registry::RECORDED_HTTP) {
        let opts = registry::RegistryOptions::from_env()?;
        return Ok(Box::new(registry::RegistrySource::open_recorded(
            source, &opts,
        )?));
    }
    Ok(Box::new(layout::LayoutSource::open(std::path::Path::new(
        source,
    ))?))
}
