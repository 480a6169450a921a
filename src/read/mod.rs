//! The read path: from an index entry to verified bytes. `span` turns a range of a layer's
//! uncompressed stream into bytes by resuming inflation at the nearest checkpoint;
//! `file` serves content-addressed pieces of files through cache tiers, falling back to
//! the origin and verifying every byte against its sha256.

pub mod file;
pub mod span;

pub use file::{FileReader, ReadError, Tier};
pub use span::SpanReader;
