//! A safe wrapper around zlib-rs's C API (`libz-rs-sys`), limited to what resumable
//! inflation needs: `Z_BLOCK` stops, `inflatePrime`, `inflateSetDictionary` and
//! `inflateGetDictionary`. flate2 and zune-inflate expose none of these.

use libz_rs_sys as z;
use std::ffi::c_int;

/// Size of the deflate history window.
pub const WINDOW_SIZE: usize = 32 * 1024;

/// How the stream is wrapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wrapper {
    /// gzip header and trailer (parsed and checked by zlib).
    Gzip,
    /// Raw deflate, as used when resuming from a checkpoint.
    Raw,
}

impl Wrapper {
    fn window_bits(self) -> c_int {
        match self {
            Wrapper::Gzip => 15 + 16,
            Wrapper::Raw => -15,
        }
    }
}

/// The outcome of one [`Inflater::inflate`] call.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    /// Input bytes consumed.
    pub consumed: usize,
    /// Output bytes produced.
    pub produced: usize,
    /// The end of the current gzip member (or raw deflate stream) was reached.
    pub stream_end: bool,
    /// Inflation stopped at a deflate block boundary that is not after the last block
    /// (only reported when `stop_at_block` was requested).
    pub at_block_boundary: bool,
    /// Unused bits in the last consumed input byte (0..=7); meaningful at a block boundary.
    pub unused_bits: u8,
}

/// Error from zlib: the message it gave, or its return code.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ZlibError(pub String);

/// One inflate stream. The `z_stream` lives in a `Box` because zlib keeps a pointer back to it.
pub struct Inflater {
    strm: Box<z::z_stream>,
}

// SAFETY: the z_stream and its state are owned exclusively by this value and only touched
// through `&mut self`; zlib-rs keeps no thread-local or shared state.
unsafe impl Send for Inflater {}

impl Inflater {
    /// A new inflater for the given wrapper.
    pub fn new(wrapper: Wrapper) -> Result<Self, ZlibError> {
        let mut strm: Box<z::z_stream> = Box::default();
        // SAFETY: `strm` is a valid, default-initialised z_stream (zalloc/zfree/opaque set by
        // Default); the version string comes from the library itself.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *strm,
                wrapper.window_bits(),
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        check(rc, &strm)?;
        Ok(Inflater { strm })
    }

    /// Reset to the start of a new stream with the given wrapper, keeping allocations.
    pub fn reset(&mut self, wrapper: Wrapper) -> Result<(), ZlibError> {
        // SAFETY: the stream was initialised by inflateInit2_ in `new`.
        let rc = unsafe { z::inflateReset2(&mut *self.strm, wrapper.window_bits()) };
        check(rc, &self.strm)
    }

    /// Stop computing and checking the gzip trailer's CRC-32 (`inflateValidate(.., 0)`), for
    /// callers that verify the same bytes with a stronger digest. Lasts until the next reset.
    pub fn skip_checksum(&mut self) -> Result<(), ZlibError> {
        // SAFETY: the stream was initialised by inflateInit2_ in `new`.
        let rc = unsafe { z::inflateValidate(&mut *self.strm, 0) };
        check(rc, &self.strm)
    }

    /// Insert `bits` (0..=16) low bits of `value` into the input bit buffer
    /// (`inflatePrime`), for resuming at a position that is not byte aligned.
    pub fn prime(&mut self, bits: u8, value: u32) -> Result<(), ZlibError> {
        if bits == 0 {
            return Ok(());
        }
        // SAFETY: initialised stream; zlib validates `bits`.
        let rc = unsafe { z::inflatePrime(&mut *self.strm, bits as c_int, value as c_int) };
        check(rc, &self.strm)
    }

    /// Set the history window for a raw stream (`inflateSetDictionary`).
    pub fn set_dictionary(&mut self, window: &[u8]) -> Result<(), ZlibError> {
        if window.is_empty() {
            return Ok(());
        }
        let len = window.len().min(WINDOW_SIZE);
        let dict = &window[window.len() - len..];
        // SAFETY: `dict` is valid for `len` bytes; zlib copies it.
        let rc = unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), len as u32) };
        check(rc, &self.strm)
    }

    /// Inflate from `input` into `output`. With `stop_at_block`, returns at the next deflate
    /// block boundary (`Z_BLOCK`).
    pub fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        stop_at_block: bool,
    ) -> Result<Step, ZlibError> {
        let avail_in = input.len().min(u32::MAX as usize);
        let avail_out = output.len().min(u32::MAX as usize);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in as u32;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out as u32;
        let flush = if stop_at_block {
            z::Z_BLOCK
        } else {
            z::Z_NO_FLUSH
        };
        // SAFETY: next_in/next_out point into live slices for avail_in/avail_out bytes and
        // are not retained: they are cleared below before the borrows end.
        let rc = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = avail_in - self.strm.avail_in as usize;
        let produced = avail_out - self.strm.avail_out as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        match rc {
            z::Z_OK | z::Z_STREAM_END => {}
            // No progress possible: more input or output space needed. Not an error here.
            z::Z_BUF_ERROR => {}
            z::Z_NEED_DICT => return Err(ZlibError("stream needs a preset dictionary".into())),
            _ => check(rc, &self.strm)?,
        }
        let dt = self.strm.data_type;
        Ok(Step {
            consumed,
            produced,
            stream_end: rc == z::Z_STREAM_END,
            at_block_boundary: stop_at_block && (dt & 0xc0) == 0x80,
            unused_bits: (dt & 7) as u8,
        })
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, ended exactly once here.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}

fn check(rc: c_int, strm: &z::z_stream) -> Result<(), ZlibError> {
    if rc >= 0 {
        return Ok(());
    }
    let msg = if strm.msg.is_null() {
        format!("zlib error code {rc}")
    } else {
        // SAFETY: zlib sets `msg` to a static NUL-terminated string or leaves it null.
        unsafe { std::ffi::CStr::from_ptr(strm.msg) }
            .to_string_lossy()
            .into_owned()
    };
    Err(ZlibError(msg))
}
