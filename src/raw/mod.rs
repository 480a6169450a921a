//! The only module with `unsafe` code: the zlib FFI (for resumable inflation), the
//! zero-copy view of a memory-mapped index and a thread priority call. Everything here wraps an unsafe primitive in a safe
//! API whose preconditions are checked by the wrapper itself.

pub mod mmap;
pub mod sched;
pub mod zlib;
