//! `loop-immutable`: serve an image file (or block device) as a block device without ever
//! modifying it, for forensics. Writes go to an optional copy-on-write overlay (a sparse file
//! with an extent map, or memory) so a dirty journal can replay without touching the evidence;
//! a hash-chained audit log records the image's SHA-256 at attach and detach and every overlay
//! write.
//!
//! [`overlay::Engine`] is the read-only-or-overlay engine every backend serves; [`audit`] the
//! log; the backends are ublk (default) and a FUSE file attached to a loop device.

pub mod audit;
pub mod cli;
pub mod daemon;
pub mod extents;
pub mod fuse;
pub mod image;
pub mod overlay;
pub mod state;
pub mod ublk;
