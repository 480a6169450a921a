//! Buffered compressed input shared by the scanner and the resume cursor, including what
//! happens between gzip members.

use std::io::{self, Read};

/// Errors reading or decoding a gzip stream.
#[derive(Debug, thiserror::Error)]
pub enum GzipError {
    /// Reading the compressed input failed.
    #[error("reading compressed input: {0}")]
    Io(#[from] io::Error),
    /// The stream is not valid gzip/deflate.
    #[error("invalid gzip data near compressed offset {offset}: {msg}")]
    Corrupt {
        /// Compressed offset near the problem.
        offset: u64,
        /// What is wrong.
        msg: String,
    },
}

/// A corrupt-data error at `offset`.
pub fn corrupt(offset: u64, msg: impl std::fmt::Display) -> GzipError {
    GzipError::Corrupt {
        offset,
        msg: msg.to_string(),
    }
}

/// Compressed input with a buffer and an absolute position.
pub struct Input<R> {
    src: R,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    /// Absolute compressed offset of `buf[pos]`.
    pub offset: u64,
    eof: bool,
}

impl<R: Read> Input<R> {
    /// Wrap `src`, whose first byte is at absolute offset `offset`.
    pub fn new(src: R, offset: u64, buf_size: usize) -> Self {
        Input {
            src,
            buf: vec![0u8; buf_size].into_boxed_slice(),
            pos: 0,
            len: 0,
            offset,
            eof: false,
        }
    }

    /// The buffered, unconsumed bytes; reads more when empty. Empty only at end of input.
    pub fn available(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.len && !self.eof {
            let n = loop {
                match self.src.read(&mut self.buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            self.pos = 0;
            self.len = n;
            self.eof = n == 0;
        }
        Ok(&self.buf[self.pos..self.len])
    }

    /// Mark `n` available bytes as used.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(self.pos + n <= self.len);
        self.pos += n;
        self.offset += n as u64;
    }

    /// Skip exactly `n` bytes (e.g. a gzip trailer).
    pub fn skip(&mut self, mut n: usize) -> Result<(), GzipError> {
        while n > 0 {
            let a = self.available()?.len();
            if a == 0 {
                return Err(corrupt(
                    self.offset,
                    "unexpected end of input inside a gzip trailer",
                ));
            }
            let k = a.min(n);
            self.consume(k);
            n -= k;
        }
        Ok(())
    }

    /// After a gzip member ends: `true` if another member follows, `false` at the end of
    /// the stream (zero padding up to the end is accepted).
    pub fn another_member(&mut self) -> Result<bool, GzipError> {
        loop {
            let offset = self.offset;
            let rest = self.available()?;
            if rest.is_empty() {
                return Ok(false);
            }
            if rest[0] == 0x1f {
                return Ok(true);
            }
            if let Some(p) = rest.iter().position(|&b| b != 0) {
                return Err(corrupt(
                    offset + p as u64,
                    "data after the end of a gzip member is neither another member nor zero padding",
                ));
            }
            let n = rest.len();
            self.consume(n);
        }
    }

    /// Give back the reader.
    pub fn into_inner(self) -> R {
        self.src
    }
}
