//! Local cache tiers for content-addressed pieces (see `read::Tier`). A piece's key is the
//! raw sha256 recorded in the index; its file name is the 64-character lowercase hex, so
//! identical content in two images or two layers is stored once. Tiers may hand back wrong
//! bytes: `read::FileReader` verifies every piece and calls `Tier::remove` on a bad one.

pub mod behind;
pub mod disk;
pub mod redis;

pub use behind::{RebuildLater, WriteBehind};
pub use disk::DiskCache;

/// Errors of the cache layer.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache directory cannot be created or read.
    #[error("cache directory {path}: {source}; pick a writable directory with --cache-dir or disable the cache with --cache-size 0")]
    Dir {
        /// Directory involved.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A size argument could not be parsed.
    #[error("invalid size {0:?}: use a number of bytes with an optional K, M, G or T suffix (powers of 1024), e.g. 10G")]
    BadSize(String),
}

/// Parse a size such as `10G`, `512M`, `1.5G`, `4096` (suffixes are powers of 1024; a
/// trailing `B` or `iB` is accepted).
pub fn parse_size(s: &str) -> Result<u64, CacheError> {
    let bad = || CacheError::BadSize(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let num = num.trim();
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(1u64 << shift).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let v = f * (1u64 << shift) as f64;
    if !v.is_finite() || v < 0.0 || v >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(v as u64)
}

/// Counters of one cache tier, as a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Lookups that found an object.
    pub hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Objects written.
    pub stores: u64,
    /// Objects removed to stay under the size limit.
    pub evictions: u64,
    /// Objects dropped because their bytes did not match their hash.
    pub verify_failures: u64,
    /// Objects that could not be written (a full or failing disk): each one is only a
    /// later miss.
    pub write_failures: u64,
    /// Objects currently held.
    pub objects: u64,
    /// Bytes currently held.
    pub bytes: u64,
    /// Size limit in bytes.
    pub limit: u64,
}

impl std::fmt::Display for CacheStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "hits={} misses={} stores={} evictions={} verify_failures={} write_failures={} objects={} bytes={} limit={}",
            self.hits, self.misses, self.stores, self.evictions, self.verify_failures, self.write_failures, self.objects, self.bytes, self.limit
        )
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert!(parse_size("G").is_err());
        assert!(parse_size("ten").is_err());
        assert!(parse_size("-1G").is_err());
    }
}
