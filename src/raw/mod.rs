//! The only module with `unsafe` code: the zlib FFI (for resumable inflation), the
//! zero-copy view of a memory-mapped index, a thread priority call and the confinement of a child process. Everything here wraps an unsafe primitive in a safe
//! API whose preconditions are checked by the wrapper itself.

pub mod child;
pub mod mmap;
pub mod sched;
pub mod zlib;
