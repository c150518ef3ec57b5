//! tiercache engine: the runtime (pinned polling reactors), the bdev layer, and the cache.
//!
//! - [`reactor`]: one thread per core polling its io_uring, timers, pollers and inboxes.
//! - [`dma`]: aligned, pooled I/O buffers handed to bdevs by value.
//! - [`bdev`]: the block-device trait (device / descriptor / per-reactor channel).
//! - [`errno`]: errors that keep their errno.

pub mod bdev;
pub mod cache;
pub mod dma;
pub mod errno;
pub mod reactor;
pub mod sim;

pub use dma::IoBuf;
pub use errno::Errno;
