//! Resuming inflation at a checkpoint: raw inflate primed with the checkpoint's leftover
//! bits and 32 KiB window, continuing across gzip member boundaries.

use super::input::{corrupt, GzipError, Input};
use crate::raw::zlib::{Inflater, Wrapper};
use std::io::{self, Read};

const IN_BUF: usize = 128 * 1024;

/// Where to resume: the decoded fields of a checkpoint.
#[derive(Clone, Debug)]
pub struct ResumePoint {
    /// Compressed offset of the first byte not fully consumed.
    pub in_offset: u64,
    /// Unused bits in the byte at `in_offset - 1`.
    pub bits: u8,
    /// Uncompressed offset of the checkpoint.
    pub out_offset: u64,
    /// Up to 32 KiB of output before `out_offset`.
    pub window: Vec<u8>,
}

impl ResumePoint {
    /// Compressed offset from which a reader must supply bytes.
    pub fn read_from(&self) -> u64 {
        self.in_offset - (self.bits > 0) as u64
    }
}

/// An inflate cursor positioned in a layer's uncompressed stream. Sequential reads
/// continue where the previous one stopped.
pub struct ResumeCursor<R> {
    input: Input<R>,
    inflater: Inflater,
    raw: bool,
    out_pos: u64,
    finished: bool,
}

impl<R: Read> ResumeCursor<R> {
    /// Start at `point`; `src` yields the compressed bytes from `point.read_from()` on.
    pub fn new(src: R, point: &ResumePoint) -> Result<Self, GzipError> {
        let mut input = Input::new(src, point.read_from(), IN_BUF);
        let mut inflater = Inflater::new(Wrapper::Raw).map_err(|e| corrupt(point.in_offset, e))?;
        if point.bits > 0 {
            let b = *input
                .available()?
                .first()
                .ok_or_else(|| corrupt(point.in_offset, "no compressed data at the checkpoint"))?;
            input.consume(1);
            inflater
                .prime(point.bits, (b >> (8 - point.bits)) as u32)
                .map_err(|e| corrupt(point.in_offset, e))?;
        }
        inflater
            .set_dictionary(&point.window)
            .map_err(|e| corrupt(point.in_offset, e))?;
        Ok(ResumeCursor {
            input,
            inflater,
            raw: true,
            out_pos: point.out_offset,
            finished: false,
        })
    }

    /// Uncompressed offset of the next byte `read` returns.
    pub fn position(&self) -> u64 {
        self.out_pos
    }

    /// Compressed bytes consumed so far (absolute offset).
    pub fn compressed_position(&self) -> u64 {
        self.input.offset
    }

    /// Inflate and discard until `position() == target`.
    pub fn skip_to(&mut self, target: u64) -> Result<(), GzipError> {
        let mut scratch = vec![0u8; 64 * 1024];
        while self.out_pos < target {
            let want = ((target - self.out_pos) as usize).min(scratch.len());
            if self.fill(&mut scratch[..want])? == 0 {
                return Err(corrupt(
                    self.input.offset,
                    "stream ended before the wanted offset",
                ));
            }
        }
        Ok(())
    }

    /// Produce up to `out.len()` bytes; 0 at the end of the stream.
    pub fn fill(&mut self, out: &mut [u8]) -> Result<usize, GzipError> {
        let mut filled = 0;
        while filled < out.len() && !self.finished {
            let offset = self.input.offset;
            let input = self.input.available()?;
            let at_eof = input.is_empty();
            let step = self
                .inflater
                .inflate(input, &mut out[filled..], false)
                .map_err(|e| corrupt(offset, e))?;
            self.input.consume(step.consumed);
            filled += step.produced;
            self.out_pos += step.produced as u64;
            if step.stream_end {
                if self.raw {
                    // A raw stream stops before the member's trailer (CRC32 + ISIZE).
                    self.input.skip(8)?;
                }
                if self.input.another_member()? {
                    self.inflater
                        .reset(Wrapper::Gzip)
                        .map_err(|e| corrupt(self.input.offset, e))?;
                    self.raw = false;
                } else {
                    self.finished = true;
                }
            } else if at_eof && step.consumed == 0 && step.produced == 0 {
                return Err(corrupt(self.input.offset, "compressed data ends early"));
            }
        }
        Ok(filled)
    }
}

impl<R: Read> Read for ResumeCursor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.fill(buf).map_err(|e| match e {
            GzipError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        })
    }
}
