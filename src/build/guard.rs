//! A reader between a layer's tar stream and the `tar` crate that follows the archive's
//! headers as they go by. The crate reads PAX extension and GNU long-name entries whole
//! into memory, whatever size their header claims: a layer holding a PAX header of a few
//! gigabytes of zeros (a few megabytes gzipped) would exhaust the builder's memory. The
//! guard refuses such an entry as soon as its header passes, before its data is read.

use std::io::{self, Read};

/// The largest PAX extension or GNU long name/link entry accepted. Real ones hold paths
/// (at most 4 KiB), link targets and extended attributes.
pub const MAX_EXTENSION: u64 = 16 << 20;

const BLOCK: u64 = 512;

enum State {
    /// Collecting the next header block (`have` bytes so far).
    Header { have: usize },
    /// Passing the data of an entry (with its padding).
    Data { left: u64 },
    /// Reading a PAX extension entry, kept to learn the `size` it gives the next entry.
    Pax { left: u64, padding: u64 },
    /// Past the end of the archive, or at something the guard does not follow (a GNU sparse
    /// file, a header the `tar` crate will refuse itself): bytes pass unwatched.
    Off,
}

/// See the module documentation.
pub struct HeaderGuard<R> {
    inner: R,
    state: State,
    header: [u8; BLOCK as usize],
    pax: Vec<u8>,
    /// The data size a PAX `size` record gives the next entry.
    next_size: Option<u64>,
}

impl<R: Read> HeaderGuard<R> {
    /// Watch the tar archive read from `inner`.
    pub fn new(inner: R) -> HeaderGuard<R> {
        HeaderGuard {
            inner,
            state: State::Header { have: 0 },
            header: [0; BLOCK as usize],
            pax: Vec::new(),
            next_size: None,
        }
    }

    /// Follow `bytes`, the next bytes of the archive.
    fn watch(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Off => return Ok(()),
                State::Header { have } => {
                    let n = (BLOCK as usize - *have).min(bytes.len());
                    self.header[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    if *have == BLOCK as usize {
                        self.state = self.on_header()?;
                    }
                }
                State::Data { left } => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.state = State::Header { have: 0 };
                    }
                }
                State::Pax { left, padding } => {
                    let n = (*left).min(bytes.len() as u64) as usize;
                    self.pax.extend_from_slice(&bytes[..n]);
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.next_size = pax_size(&self.pax);
                        self.pax.clear();
                        self.state = match *padding {
                            0 => State::Header { have: 0 },
                            p => State::Data { left: p },
                        };
                    }
                }
            }
        }
        Ok(())
    }

    /// What follows the header block just collected.
    fn on_header(&mut self) -> io::Result<State> {
        use tar::EntryType as T;
        if self.header.iter().all(|&b| b == 0) {
            return Ok(State::Off); // the end of the archive, as the tar crate reads it
        }
        let h = tar::Header::from_byte_slice(&self.header);
        let Ok(size) = h.entry_size() else {
            return Ok(State::Off);
        };
        let kind = h.entry_type();
        let padded = |n: u64| n.div_ceil(BLOCK).saturating_mul(BLOCK);
        // As in the tar crate, a PAX `size` applies to every header after the extension up
        // to and including the entry it describes (GNU long names in between too).
        let size = match kind {
            T::XHeader => size,
            _ => self.next_size.unwrap_or(size),
        };
        let what = match kind {
            T::XHeader => "a PAX extended header",
            T::GNULongName => "a GNU long name",
            T::GNULongLink => "a GNU long link name",
            T::GNUSparse => return Ok(State::Off),
            _ => {
                self.next_size = None;
                return Ok(match padded(size) {
                    0 => State::Header { have: 0 },
                    left => State::Data { left },
                });
            }
        };
        if size > MAX_EXTENSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{what} of {size} bytes (more than {} MiB): not a valid layer, refused before reading it",
                    MAX_EXTENSION >> 20
                ),
            ));
        }
        Ok(match (kind, size) {
            (_, 0) => State::Header { have: 0 },
            (T::XHeader, _) => State::Pax {
                left: size,
                padding: padded(size) - size,
            },
            _ => State::Data { left: padded(size) },
        })
    }
}

/// The data size a PAX extension gives the next entry, read as the `tar` crate reads it:
/// the first `size` record, nothing once a record is malformed.
fn pax_size(data: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.ok()?;
        if ext.key() == Ok("size") {
            return ext.value().ok()?.parse().ok();
        }
    }
    None
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.watch(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: tar::EntryType, name: &str, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(size);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn pad(v: &mut Vec<u8>) {
        v.resize(v.len().div_ceil(512) * 512, 0);
    }

    /// Read `archive` through the guard in reads of `chunk` bytes.
    fn through(archive: &[u8], chunk: usize) -> io::Result<Vec<u8>> {
        let mut g = HeaderGuard::new(archive);
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = g.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// One PAX record, `<len> <key>=<value>\n`, its length counting its own digits.
    fn pax_record(key: &str, value: &str) -> String {
        let body = format!(" {key}={value}\n");
        let len = (1..6)
            .map(|d| body.len() + d)
            .find(|n| n.to_string().len() + body.len() == *n)
            .unwrap();
        format!("{len}{body}")
    }

    /// An entry as the tar crate yields it: path, size, data.
    type Yielded = (Vec<u8>, u64, Vec<u8>);

    /// Every entry of `archive` as the tar crate yields it, read straight or through the
    /// guard.
    fn entries(archive: &[u8], guarded: bool) -> io::Result<Vec<Yielded>> {
        let src: Box<dyn Read> = if guarded {
            Box::new(HeaderGuard::new(archive))
        } else {
            Box::new(archive)
        };
        let mut ar = tar::Archive::new(src);
        let mut out = Vec::new();
        for e in ar.entries()? {
            let mut e = e?;
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            out.push((e.path_bytes().into_owned(), e.size(), data));
        }
        Ok(out)
    }

    /// Random sequences of PAX extensions (with and without `size` records, sometimes two),
    /// GNU long names and links, and entries: whatever the tar crate reads, it reads the same
    /// through the guard.
    #[test]
    fn the_guard_follows_every_archive_the_tar_crate_reads() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % n
        };
        let mut read = 0;
        for _ in 0..1500 {
            let mut a = Vec::new();
            for _ in 0..1 + next(4) {
                let data_len = next(3000);
                if next(2) == 0 {
                    let mut pax = String::new();
                    for _ in 0..next(3) {
                        pax += &match next(3) {
                            0 => pax_record("size", &data_len.to_string()),
                            1 => pax_record("size", &next(2000).to_string()),
                            _ => pax_record("path", "p/q"),
                        };
                    }
                    a.extend(header(tar::EntryType::XHeader, "pax", pax.len() as u64));
                    a.extend_from_slice(pax.as_bytes());
                    pad(&mut a);
                }
                if next(3) == 0 {
                    let name = b"long/name/".repeat(1 + next(60) as usize);
                    let kind = [tar::EntryType::GNULongName, tar::EntryType::GNULongLink]
                        [next(2) as usize];
                    a.extend(header(kind, "././@LongLink", name.len() as u64));
                    a.extend_from_slice(&name);
                    pad(&mut a);
                }
                a.extend(header(tar::EntryType::Regular, "f", next(3000)));
                a.extend((0..data_len).map(|i| i as u8));
                pad(&mut a);
            }
            a.extend([0u8; 1024]);
            if let Ok(plain) = entries(&a, false) {
                read += 1;
                assert_eq!(
                    entries(&a, true).expect("the guard refused what the tar crate reads"),
                    plain
                );
            }
        }
        assert!(
            read > 200,
            "only {read} of 1500 random archives were readable"
        );
    }

    #[test]
    fn pax_size_is_read_as_the_tar_crate_reads_it() {
        assert_eq!(
            pax_size(b"12 size=512\n13 size=1024\n"),
            Some(512),
            "the first record"
        );
        assert_eq!(pax_size(b"16 path=a/b/cde\n12 size=512\n"), Some(512));
        assert_eq!(
            pax_size(b"99 size=512\n"),
            None,
            "a malformed record stops the search"
        );
        assert_eq!(pax_size(b"16 path=a/b/cde\n"), None);
    }

    #[test]
    fn an_oversized_extension_header_is_refused_and_real_archives_pass() {
        for (kind, what) in [
            (tar::EntryType::XHeader, "PAX extended header"),
            (tar::EntryType::GNULongName, "GNU long name"),
            (tar::EntryType::GNULongLink, "GNU long link name"),
        ] {
            let mut a = header(tar::EntryType::Regular, "before", 3);
            a.extend_from_slice(b"abc");
            pad(&mut a);
            a.extend(header(kind, "././@LongLink", MAX_EXTENSION + 1));
            let e = through(&a, 4096).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
        // A PAX `size` record moves the next header: a file whose data holds bytes that
        // look like a huge PAX header passes, as the tar crate reads it too.
        let fake = header(tar::EntryType::XHeader, "fake", 1 << 40);
        let mut a = Vec::new();
        let record = pax_record("size", &fake.len().to_string());
        let mut pax = header(tar::EntryType::XHeader, "pax", record.len() as u64);
        pax.extend_from_slice(record.as_bytes());
        pad(&mut pax);
        a.extend(pax);
        a.extend(header(tar::EntryType::Regular, "file", 0));
        a.extend(&fake);
        a.extend([0u8; 1024]);
        for chunk in [1, 7, 512, 100_000] {
            assert_eq!(through(&a, chunk).unwrap(), a, "chunk {chunk}");
        }
        let mut ar = tar::Archive::new(HeaderGuard::new(&a[..]));
        let names: Vec<(String, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().display().to_string(), e.size())
            })
            .collect();
        assert_eq!(names, [("file".to_string(), 512)]);
    }
}
