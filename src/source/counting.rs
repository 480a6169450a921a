//! A source that counts the blob requests made of the source behind it: what a cache tier
//! or a coalesced fetch saved is seen in fewer requests, the unit registries charge by.

use super::{Source, SourceError};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counts `blob` and `blob_from` calls (each opens at least one request) and passes them on.
pub struct Counting {
    inner: Arc<dyn Source>,
    requests: Arc<AtomicU64>,
}

impl Counting {
    /// Count the blob requests made of `inner`.
    pub fn new(inner: Arc<dyn Source>) -> Counting {
        Counting {
            inner,
            requests: Arc::default(),
        }
    }

    /// Blob requests so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The counter itself, for statistics that outlive this value's owner.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.requests.clone()
    }
}

impl Source for Counting {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn is_local(&self) -> bool {
        self.inner.is_local()
    }

    fn manifest(&self, reference: &str) -> Result<(String, Vec<u8>, String), SourceError> {
        self.inner.manifest(reference)
    }

    fn blob(
        &self,
        digest: &str,
        start: u64,
        end: Option<u64>,
    ) -> Result<Box<dyn Read + Send>, SourceError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.blob(digest, start, end)
    }

    fn blob_from(
        &self,
        digest: &str,
        start: u64,
        expect_end: u64,
        size: u64,
    ) -> Result<Box<dyn Read + Send>, SourceError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.blob_from(digest, start, expect_end, size)
    }

    fn prepare(&self, digests: &[&str]) -> Result<(), SourceError> {
        self.inner.prepare(digests)
    }
}
