//! The cache engine: a log-structured write-back cache (dm-writeboost's design) for
//! pinned polling reactors. The I/O design is in `docs/cache-engine.md`.
//!
//! * [`ondisk`] — the on-disk format of a cache set: the alternating
//!   superblock copies, backing-device headers, log segments of 16-byte block
//!   records, layout math and validation (`docs/on-disk-format.md`).
//! * [`index`] — the lock-free block index shared by all reactors, with
//!   QSBR-based slot reclamation (`docs/index-concurrency.md`).
//! * [`set`] — a cache set: format, load (recovery), attach, superblock updates.
//! * [`log`] — per-reactor segment buffers: place, seal, write.
//! * [`bdev`] — the cached bdev and its read/write/flush paths.
//! * [`writeback`] — writeback of dirty data, on a migration thread; its speed is set
//!   by [`rate`] (blocks per second, bcache-style PD control on the dirty fraction) and
//!   its depth by [`tail_guard`] (writeback I/Os in flight, AIMD on foreground read p99).
//! * [`reclaim`] — reclaim of written-back segments (same thread), with second chance
//!   for blocks hit since they were cached (copy-forward).

pub mod bdev;
pub mod failure;
pub mod index;
pub mod log;
pub mod ondisk;
pub mod promote;
pub mod rate;
pub mod reclaim;
pub mod set;
pub mod tail_guard;
#[cfg(test)]
mod test_rig;
pub mod writeback;

pub use bdev::{mode_name, parse_mode, CachedBdev};
pub use failure::{BackingState, StopPolicy};
pub use ondisk::CacheMode;
pub use promote::SeqCutoffPolicy;
pub use set::{format, load, CacheError, CacheOptions, CacheSet};
