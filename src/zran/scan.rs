//! One pass over a gzip blob: inflate everything, note each block boundary.

use super::input::{corrupt, GzipError, Input};
use super::Boundary;
use crate::raw::zlib::{Inflater, Wrapper};
use std::io::Read;

const IN_BUF: usize = 256 * 1024;

/// Inflates a (possibly multi-member) gzip stream chunk by chunk, reporting deflate block
/// boundaries. Trailing zero padding after the last member is accepted.
///
/// The members' CRC-32 is not computed: the blob's sha256 digest (compressed bytes) and
/// diff_id (uncompressed bytes) are checked over the same data and are stronger, and the
/// CRC pass cost about 6 % of the inflate thread.
pub struct GzipScanner<R> {
    input: Input<R>,
    out_total: u64,
    inflater: Inflater,
    finished: bool,
}

impl<R: Read> GzipScanner<R> {
    /// Start scanning `src` from its first byte.
    pub fn new(src: R) -> Result<Self, GzipError> {
        let mut inflater = Inflater::new(Wrapper::Gzip).map_err(|e| corrupt(0, e))?;
        inflater.skip_checksum().map_err(|e| corrupt(0, e))?;
        Ok(GzipScanner {
            input: Input::new(src, 0, IN_BUF),
            out_total: 0,
            inflater,
            finished: false,
        })
    }

    /// Compressed bytes consumed so far.
    pub fn compressed_pos(&self) -> u64 {
        self.input.offset
    }

    /// Fill `out` (up to its length) with the next uncompressed bytes, appending the block
    /// boundaries met on the way to `boundaries`. Returns 0 at the end of the stream.
    pub fn fill(
        &mut self,
        out: &mut [u8],
        boundaries: &mut Vec<Boundary>,
    ) -> Result<usize, GzipError> {
        let mut filled = 0;
        while filled < out.len() && !self.finished {
            let offset = self.input.offset;
            let input = self.input.available()?;
            let at_eof = input.is_empty();
            let step = self
                .inflater
                .inflate(input, &mut out[filled..], true)
                .map_err(|e| corrupt(offset, e))?;
            self.input.consume(step.consumed);
            filled += step.produced;
            self.out_total += step.produced as u64;
            if step.at_block_boundary {
                boundaries.push(Boundary {
                    in_offset: self.input.offset,
                    bits: step.unused_bits,
                    out_offset: self.out_total,
                });
            }
            if step.stream_end {
                if self.input.another_member()? {
                    let offset = self.input.offset;
                    self.inflater
                        .reset(Wrapper::Gzip)
                        .map_err(|e| corrupt(offset, e))?;
                    self.inflater
                        .skip_checksum()
                        .map_err(|e| corrupt(offset, e))?;
                } else {
                    self.finished = true;
                }
            } else if at_eof && step.consumed == 0 && step.produced == 0 {
                return Err(corrupt(
                    self.input.offset,
                    "unexpected end of compressed data",
                ));
            }
        }
        Ok(filled)
    }

    /// Give back the underlying reader (after the end of the stream).
    pub fn into_inner(self) -> R {
        self.input.into_inner()
    }
}
