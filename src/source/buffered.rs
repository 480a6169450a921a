//! One blob range held in memory in front of another source: a single request for the
//! bytes several readers need (the neighbouring checkpoint intervals of an access profile),
//! which each reader then reads from memory. Registries charge per request (a round trip,
//! and milliseconds of server time each), so fewer, larger ranges start containers sooner.

use super::{Source, SourceError};
use std::io::Read;
use std::sync::Arc;

/// A source answering reads inside one fetched range of one blob from memory and
/// everything else from the source behind it.
pub struct Buffered {
    inner: Arc<dyn Source>,
    digest: String,
    start: u64,
    bytes: Arc<Vec<u8>>,
}

/// Largest range [`Buffered::fetch`] holds.
pub const MAX_BUFFERED: u64 = 64 << 20;

impl Buffered {
    /// Fetch bytes `[start, end)` of blob `digest` (of `size` bytes) from `inner` with one
    /// request (at most [`MAX_BUFFERED`] bytes).
    pub fn fetch(
        inner: Arc<dyn Source>,
        digest: &str,
        start: u64,
        end: u64,
        size: u64,
    ) -> Result<Buffered, SourceError> {
        let end = end.min(size);
        if start >= end || end - start > MAX_BUFFERED {
            return Err(SourceError::BadImage(format!(
                "range {start}..{end} of blob {digest} cannot be buffered (at most {MAX_BUFFERED} bytes)"
            )));
        }
        let mut bytes = Vec::with_capacity((end - start) as usize);
        inner
            .blob(digest, start, Some(end))?
            .take(end - start)
            .read_to_end(&mut bytes)
            .map_err(|source| SourceError::Io {
                context: format!("reading blob {digest} at {start}"),
                source,
            })?;
        if bytes.len() as u64 != end - start {
            return Err(SourceError::Io {
                context: format!("reading blob {digest} at {start}"),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("got {} of {} bytes", bytes.len(), end - start),
                ),
            });
        }
        Ok(Buffered {
            inner,
            digest: digest.to_string(),
            start,
            bytes: Arc::new(bytes),
        })
    }

    /// Bytes held.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Whether nothing is held (never, once fetched).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The held bytes from blob offset `at` on, if `at` lies in the range.
    fn from(&self, digest: &str, at: u64) -> Option<Held> {
        let end = self.start + self.len();
        (digest == self.digest && self.start <= at && at < end).then(|| Held {
            bytes: self.bytes.clone(),
            pos: (at - self.start) as usize,
        })
    }
}

/// A reader over the held bytes.
struct Held {
    bytes: Arc<Vec<u8>>,
    pos: usize,
}

impl Read for Held {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.bytes.len() - self.pos);
        buf[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Reads the held bytes, then goes on from the source behind (opened only if needed).
struct HeldThenInner {
    held: Held,
    inner: Arc<dyn Source>,
    digest: String,
    next: u64,
    expect_end: u64,
    size: u64,
    rest: Option<Box<dyn Read + Send>>,
}

impl Read for HeldThenInner {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.held.read(buf)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        if self.next >= self.size {
            return Ok(0);
        }
        if self.rest.is_none() {
            let end = self.expect_end.max(self.next + 1);
            let r = self
                .inner
                .blob_from(&self.digest, self.next, end, self.size)
                .map_err(std::io::Error::other)?;
            self.rest = Some(r);
        }
        self.rest.as_mut().map_or(Ok(0), |r| r.read(buf))
    }
}

impl Source for Buffered {
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
        match (self.from(digest, start), end) {
            (Some(held), Some(end)) if end <= self.start + self.len() => {
                Ok(Box::new(held.take(end - start)))
            }
            _ => self.inner.blob(digest, start, end),
        }
    }

    fn blob_from(
        &self,
        digest: &str,
        start: u64,
        expect_end: u64,
        size: u64,
    ) -> Result<Box<dyn Read + Send>, SourceError> {
        match self.from(digest, start) {
            Some(held) => Ok(Box::new(HeldThenInner {
                held,
                inner: self.inner.clone(),
                digest: digest.to_string(),
                next: self.start + self.len(),
                expect_end,
                size,
                rest: None,
            })),
            None => self.inner.blob_from(digest, start, expect_end, size),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A blob of `0, 1, 2, …` (mod 251) that counts requests.
    struct Numbers {
        requests: AtomicU64,
    }

    impl Source for Numbers {
        fn describe(&self) -> String {
            "numbers".into()
        }
        fn manifest(&self, _: &str) -> Result<(String, Vec<u8>, String), SourceError> {
            Err(SourceError::NotFound("none".into()))
        }
        fn blob(
            &self,
            _: &str,
            start: u64,
            end: Option<u64>,
        ) -> Result<Box<dyn Read + Send>, SourceError> {
            self.requests.fetch_add(1, Ordering::SeqCst);
            let end = end.unwrap_or(1000).min(1000);
            let v: Vec<u8> = (start..end).map(|i| (i % 251) as u8).collect();
            Ok(Box::new(std::io::Cursor::new(v)))
        }
    }

    fn all(mut r: Box<dyn Read + Send>) -> Vec<u8> {
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn reads_inside_the_range_cost_no_request_and_reads_past_it_go_on_from_the_source() {
        let inner = Arc::new(Numbers {
            requests: AtomicU64::new(0),
        });
        let b = Buffered::fetch(inner.clone(), "d", 100, 300, 1000).unwrap();
        assert_eq!((b.len(), inner.requests.load(Ordering::SeqCst)), (200, 1));
        let want = |a: u64, z: u64| (a..z).map(|i| (i % 251) as u8).collect::<Vec<u8>>();
        assert_eq!(all(b.blob("d", 150, Some(250)).unwrap()), want(150, 250));
        assert_eq!(all(b.blob_from("d", 120, 200, 1000).unwrap()).len(), 880);
        assert_eq!(
            inner.requests.load(Ordering::SeqCst),
            2,
            "only the part past the range was requested"
        );
        let mut r = b.blob_from("d", 290, 295, 1000).unwrap();
        let mut first = [0u8; 10];
        r.read_exact(&mut first).unwrap();
        assert_eq!(&first[..], &want(290, 300)[..]);
        assert_eq!(
            inner.requests.load(Ordering::SeqCst),
            2,
            "the rest is opened only when read"
        );
        // Other blobs and offsets outside the range go to the source.
        all(b.blob("other", 150, Some(250)).unwrap());
        all(b.blob("d", 50, Some(120)).unwrap());
        assert_eq!(inner.requests.load(Ordering::SeqCst), 4);
        assert!(Buffered::fetch(inner, "d", 0, MAX_BUFFERED + 1, u64::MAX).is_err());
    }
}
