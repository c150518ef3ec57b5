//! tiercache-bdevs: the block-device backends (SPDK's `module/bdev/*`).
//!
//! Every backend is one module with the same shape:
//!
//! - the device struct (`XBdev`), shared by all reactors, implementing [`Bdev`];
//! - its per-reactor channel (`XChannel`) implementing [`BdevChannel`];
//! - `XBdev::create(...) -> Result<Arc<XBdev>, Errno>`;
//! - `driver_specific()` (module JSON for `bdev_get_bdevs`) and `config_call()` (the SPDK
//!   RPC that recreates it, for `save_config`).
//!
//! | module    | SPDK analogue      | what it is                                            |
//! |-----------|--------------------|-------------------------------------------------------|
//! | [`null`]  | `bdev_null`        | completes at once, no data: the engine-overhead floor |
//! | [`malloc`]| `bdev_malloc`      | RAM, shared by every reactor (striped locks)          |
//! | [`uring`] | `bdev_uring`       | a file or block device through the reactor's io_uring |
//! | [`error`] | `bdev_error` + dm-flakey | fault injection over a base bdev               |
//! | [`delay`] | `bdev_delay`       | latency injection over a base bdev (reactor timers)   |
//!
//! Requests reach a channel through the engine's `IoChannel`, which validates them; the
//! channels still re-check what they rely on ([`check_request`]) so that no request can
//! make a backend panic: a bad one completes with EINVAL.
//!
//! [`Bdev`]: tiercache_engine::bdev::Bdev
//! [`BdevChannel`]: tiercache_engine::bdev::BdevChannel

pub mod delay;
pub mod error;
pub mod malloc;
pub mod null;
pub mod uring;

use tiercache_engine::bdev::{BdevInfo, IoRequest};
use tiercache_engine::Errno;

/// Re-check the parts of a request a channel relies on (geometry and buffer). The engine's
/// `IoChannel` already validated it; this is the backends' defence against a request that
/// slipped through (a stacked bdev forwarding a wrong one, a direct caller): EINVAL, never
/// a panic.
pub fn check_request(info: &BdevInfo, req: &IoRequest) -> Result<(), Errno> {
    // The engine's own validation (the one every IoChannel applies), with every reason
    // other than an unsupported type reported as EINVAL at this level.
    tiercache_engine::bdev::validate(info, req).map_err(|e| if e == Errno::ENOTSUP { e } else { Errno::EINVAL })
}

/// Bytes of a bdev of `num_blocks` blocks of `block_size`, or EINVAL when the geometry is
/// not valid (block size other than 512/4096, zero blocks, overflow).
pub(crate) fn checked_size(num_blocks: u64, block_size: u32) -> Result<u64, Errno> {
    if !tiercache_engine::bdev::valid_block_size(block_size) || num_blocks == 0 {
        return Err(Errno::EINVAL);
    }
    num_blocks.checked_mul(block_size as u64).filter(|s| *s <= i64::MAX as u64).ok_or(Errno::EINVAL)
}

/// Bdev names: non-empty, printable, no whitespace or '/' (they become paths and RPC keys).
pub(crate) fn check_name(name: &str) -> Result<(), Errno> {
    if name.is_empty() || name.len() > 255 || name.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// The RNG seed of the channel on `reactor` for a user seed (error and delay bdevs): each
/// reactor draws its own deterministic sequence. The order of I/Os across reactors is not
/// deterministic, so only per-reactor sequences are reproducible.
pub fn channel_seed(seed: u64, reactor: usize) -> u64 {
    // splitmix64 of seed + reactor: distinct, well-mixed seeds for neighbouring inputs.
    let mut z = seed.wrapping_add((reactor as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
