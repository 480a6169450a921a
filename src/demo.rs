//! The embedded demo image: a small two-layer OCI layout generated from code, so the
//! README's first command needs no network. It shows whiteouts, an opaque directory,
//! hardlinks, symlinks, xattrs and a file large enough to get its own checkpoint.

use crate::oci::Platform;
use crate::source::layout::{LayerInput, LayoutWriter};
use std::path::Path;

/// Tag of the demo image in its layout.
pub const DEMO_TAG: &str = "demo";

/// Deterministic pseudo-random bytes (xorshift), compressible only a little.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 61) as u8 + b'A'
        })
        .collect()
}

/// A tar builder with fixed metadata (mtime, owner) so the demo is reproducible.
pub struct TarBuilder {
    b: tar::Builder<Vec<u8>>,
    /// mtime for new entries.
    pub mtime: u64,
}

impl Default for TarBuilder {
    fn default() -> Self {
        TarBuilder::new()
    }
}

impl TarBuilder {
    /// An empty archive.
    pub fn new() -> TarBuilder {
        let mut b = tar::Builder::new(Vec::new());
        b.mode(tar::HeaderMode::Complete);
        TarBuilder {
            b,
            mtime: 1_747_699_200,
        }
    }

    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(self.mtime);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    /// Add a directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut h = self.header(tar::EntryType::Directory, mode, 0);
        self.b
            .append_data(&mut h, path, std::io::empty())
            .expect("writing to memory");
        self
    }

    /// Add a regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        let mut h = self.header(tar::EntryType::Regular, mode, data.len() as u64);
        self.b
            .append_data(&mut h, path, data)
            .expect("writing to memory");
        self
    }

    /// Add a symlink or hardlink.
    pub fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = self.header(kind, 0o777, 0);
        self.b
            .append_link(&mut h, path, target)
            .expect("writing to memory");
        self
    }

    /// Add a file with PAX extended attributes.
    pub fn file_with_xattrs(
        &mut self,
        path: &str,
        mode: u32,
        data: &[u8],
        xattrs: &[(&str, &[u8])],
    ) -> &mut Self {
        let pax: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        let pax: Vec<(&str, &[u8])> = pax.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        self.pax_file(path, mode, data, &pax)
    }

    /// Add a file preceded by a PAX header with the given records (`mtime`, `uid`, …).
    pub fn pax_file(
        &mut self,
        path: &str,
        mode: u32,
        data: &[u8],
        records: &[(&str, &[u8])],
    ) -> &mut Self {
        self.b
            .append_pax_extensions(records.iter().copied())
            .expect("writing to memory");
        self.file(path, mode, data)
    }

    /// Add any entry with a prepared header.
    pub fn raw(&mut self, header: &mut tar::Header, path: &str, data: &[u8]) -> &mut Self {
        self.b
            .append_data(header, path, data)
            .expect("writing to memory");
        self
    }

    /// The finished tar bytes.
    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().expect("writing to memory")
    }
}

/// Write the demo image into an OCI layout at `dir` (tag [`DEMO_TAG`]).
pub fn write_demo(dir: &Path) -> std::io::Result<()> {
    let mut l1 = TarBuilder::new();
    l1.dir("etc/", 0o755)
        .file("etc/hostname", 0o644, b"clip-demo\n")
        .file(
            "etc/motd",
            0o644,
            b"Welcome to an image that was never pulled.\n",
        )
        .dir("usr/", 0o755)
        .dir("usr/bin/", 0o755)
        .file("usr/bin/hello", 0o755, b"#!/bin/sh\necho hello from clip\n")
        .link(tar::EntryType::Symlink, "usr/bin/hi", "hello")
        .link(tar::EntryType::Link, "usr/bin/hello-again", "usr/bin/hello")
        .file_with_xattrs(
            "usr/bin/ping",
            0o755,
            b"not really ping\n",
            &[("user.demo", b"yes")],
        )
        .dir("usr/share/", 0o755)
        .dir("usr/share/data/", 0o755)
        .file("usr/share/data/big.txt", 0o644, &noise(7, 3 << 20))
        .dir("var/", 0o755)
        .dir("var/cache/", 0o755)
        .file("var/cache/old", 0o644, b"stale\n")
        .dir("opt/", 0o755)
        .file("opt/lower-only", 0o644, b"hidden by an opaque dir above\n");
    let mut l2 = TarBuilder::new();
    l2.file("var/cache/.wh.old", 0o644, b"")
        .dir("opt/", 0o755)
        .file("opt/.wh..wh..opq", 0o644, b"")
        .file("opt/fresh", 0o644, b"only this survives in /opt\n")
        .file("etc/motd", 0o644, b"The second layer changed this file.\n");
    let mut w = LayoutWriter::create(dir)?;
    let platform = Platform::host();
    let m = w.image(
        &[LayerInput::gzip(l1.finish()), LayerInput::gzip(l2.finish())],
        &platform,
        "2025-05-20T00:00:00Z",
    )?;
    w.tag(m, DEMO_TAG);
    w.finish()
}
