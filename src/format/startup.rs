//! The startup profile area (format 2.1): an optional access profile stored right after the
//! window area, so that an index carries the intervals its image's workload reads first
//! and every node mounting it prefetches them from its first start (what eStargz's
//! prioritized files and Nydus's prefetch table do, without changing the image).
//!
//! The area is 24 bytes of its own header (magic `CLIPPRF\0`, the text's length and its
//! XXH3-64) followed by the profile text. This layer stores and checks the bytes only;
//! `crate::profile` parses them. Readers of format 2.0 ignore bytes after the window area,
//! so the area is an addition of a minor version.

use super::error::FormatError;

/// First bytes of the startup profile area.
pub const STARTUP_MAGIC: [u8; 8] = *b"CLIPPRF\0";
/// Size of the area's header: magic, text length (u64), text XXH3-64 (u64).
pub const STARTUP_HEADER_SIZE: usize = 24;
/// Largest profile text an area may hold (as `crate::profile` reads from a file).
pub const STARTUP_MAX_LEN: u64 = 64 << 20;

/// The startup profile area holding `text`.
pub fn encode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(STARTUP_HEADER_SIZE + text.len());
    out.extend_from_slice(&STARTUP_MAGIC);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(text).to_le_bytes());
    out.extend_from_slice(text);
    out
}

/// The profile text held by `tail`, the file's bytes after its window area: `None` when
/// they do not start with the area's magic (no area; format 2.0 allows other trailing
/// bytes), an error when an area is there but cut short, too large or damaged.
pub fn decode(tail: &[u8]) -> Result<Option<&[u8]>, FormatError> {
    if tail.len() < STARTUP_MAGIC.len() || tail[..STARTUP_MAGIC.len()] != STARTUP_MAGIC {
        return Ok(None);
    }
    let bad = |problem: String| FormatError::Startup(problem);
    let Some(head) = tail.get(..STARTUP_HEADER_SIZE) else {
        return Err(bad(format!(
            "its header needs {STARTUP_HEADER_SIZE} bytes but the file has {} after the window area",
            tail.len()
        )));
    };
    let u64_at = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().expect("8 bytes"));
    let (len, expected) = (u64_at(8), u64_at(16));
    if len > STARTUP_MAX_LEN {
        return Err(bad(format!(
            "its length {len} is over the {} MiB limit",
            STARTUP_MAX_LEN >> 20
        )));
    }
    let rest = &tail[STARTUP_HEADER_SIZE..];
    let Some(text) = rest.get(..len as usize) else {
        return Err(bad(format!(
            "it says {len} bytes of text but the file has {}",
            rest.len()
        )));
    };
    let found = xxhash_rust::xxh3::xxh3_64(text);
    if found != expected {
        return Err(bad(format!(
            "its checksum {found:016x} does not match the area's {expected:016x}"
        )));
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_absence() {
        let text = b"clip-profile 3\nmanifest sha256:00\nlayout 0000000000000001\n0 0 10\n";
        let area = encode(text);
        assert_eq!(area.len(), STARTUP_HEADER_SIZE + text.len());
        assert_eq!(decode(&area).unwrap(), Some(&text[..]));
        // Trailing bytes past the area are not part of it.
        let mut longer = area.clone();
        longer.extend_from_slice(b"junk");
        assert_eq!(decode(&longer).unwrap(), Some(&text[..]));
        assert_eq!(decode(b"").unwrap(), None);
        assert_eq!(decode(b"something else entirely").unwrap(), None);
        assert_eq!(decode(&encode(b"")).unwrap(), Some(&b""[..]));
    }

    #[test]
    fn damaged_areas_are_errors_never_wrong_text() {
        let area = encode(b"clip-profile 3\n0 1 2\n");
        for cut in [8, 20, area.len() - 1] {
            let e = decode(&area[..cut]).unwrap_err().to_string();
            assert!(e.contains("startup profile"), "{e}");
        }
        let mut flipped = area.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let e = decode(&flipped).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        let mut huge = area.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = decode(&huge).unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
    }
}
