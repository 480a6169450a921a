//! The read path: from an index entry to verified bytes. `span` turns a range of a layer's
//! uncompressed stream into bytes by resuming inflation at the nearest checkpoint (or
//! continuing a cursor another reader left in a `CursorPark`);
//! `file` serves content-addressed pieces of files through cache tiers, falling back to
//! the origin and verifying every byte against its sha256; `neighbours` keeps the other
//! files' pieces that a resumed inflation passes on the way; `ahead` inflates the intervals
//! ahead of a cold sequential reader on other threads; `rebuild` reads pieces again from
//! the origin for a tier that stores them later.

pub mod ahead;
pub mod file;
pub mod neighbours;
pub mod rebuild;
pub mod span;

pub use ahead::ReadAhead;
pub use file::{AfterReply, FileReader, PieceAt, ReadError, Tier};
pub use neighbours::Neighbours;
pub use rebuild::{OriginRebuild, Rebuild};
pub use span::{CursorPark, SpanReader};
