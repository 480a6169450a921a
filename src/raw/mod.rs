//! The only module with `unsafe` code: the zlib FFI (for resumable inflation) and the
//! zero-copy view of a memory-mapped index. Everything here wraps an unsafe primitive in a safe
//! API whose preconditions are checked by the wrapper itself.

pub mod mmap;
pub mod zlib;
