//! clip: index an unmodified OCI image once, mount it anywhere, read only the bytes a
//! process touches. See `ARCHITECTURE.md` for the map of the code.
#![deny(unsafe_code)]

pub mod build;
pub mod cache;
pub mod demo;
pub mod format;
pub mod fuse;
pub mod logging;
pub mod oci;
pub mod profile;
#[allow(unsafe_code)]
mod raw;
pub mod read;
pub mod report;
pub mod source;
pub mod train;
pub mod zran;
