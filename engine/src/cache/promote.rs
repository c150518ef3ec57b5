//! Promotion policy: which read misses are copied into the cache.
//!
//! - **Hit threshold** (OCF's nhit): a block is promoted on its `promote_after`-th miss
//!   within a window. Misses are counted in a fixed table of atomic counters indexed by a
//!   hash of the block key (collisions only make promotion slightly eager); each counter
//!   carries the window epoch it was counted in, so old counts expire without a sweep.
//! - **Sequential cutoff** (bcache's sequential_cutoff): a stream of contiguous I/O on one
//!   channel longer than `seq_cutoff_bytes` bypasses the cache (no promotion for reads;
//!   writes go around the cache).
//! - **Scan resistance** follows from both: a one-time scan of the backing device misses
//!   each block once (below the threshold) and is sequential (cut off), so it does not
//!   evict the hot set.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use super::index::BlockKey;

/// Sequential cutoff policy (SPDK OCF's names).
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeqCutoffPolicy {
    /// Streams longer than the threshold always bypass the cache.
    Always,
    /// Only when the log has no free segment left.
    Full,
    /// Never bypass.
    Never,
}

const TABLE_BITS: u32 = 16;
/// Window length of the miss counters.
pub const WINDOW_SECS: u64 = 10;

/// Miss counters shared by every reactor.
pub struct MissTracker {
    slots: Box<[AtomicU32]>,
    started: Instant,
    window: AtomicU64,
}

impl Default for MissTracker {
    fn default() -> Self {
        MissTracker {
            slots: (0..1usize << TABLE_BITS).map(|_| AtomicU32::new(0)).collect(),
            started: Instant::now(),
            window: AtomicU64::new(0),
        }
    }
}

impl MissTracker {
    fn epoch(&self) -> u32 {
        let e = self.started.elapsed().as_secs() / WINDOW_SECS;
        self.window.store(e, Ordering::Relaxed);
        (e & 0xffff) as u32
    }

    /// Count a miss of `key`; returns the misses in the current window, this one included.
    pub fn miss(&self, key: BlockKey) -> u32 {
        let h = (key.raw().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - TABLE_BITS)) as usize;
        let epoch = self.epoch();
        let slot = &self.slots[h];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let (e, n) = (cur >> 16, cur & 0xffff);
            let next_n = if e == epoch { (n + 1).min(0xffff) } else { 1 };
            let next = (epoch << 16) | next_n;
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next_n,
                Err(c) => cur = c,
            }
        }
    }

    /// Forget a block (it was promoted).
    pub fn forget(&self, key: BlockKey) {
        let h = (key.raw().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - TABLE_BITS)) as usize;
        self.slots[h].store(0, Ordering::Relaxed);
    }
}

/// Per-channel stream detector for the sequential cutoff.
#[derive(Default)]
pub struct StreamDetector {
    next_offset: std::cell::Cell<u64>,
    run_bytes: std::cell::Cell<u64>,
}

impl StreamDetector {
    /// Record an I/O at [offset, offset+len); returns the length of the contiguous run
    /// it extends.
    pub fn observe(&self, offset: u64, len: u64) -> u64 {
        let run = if offset == self.next_offset.get() { self.run_bytes.get() + len } else { len };
        self.run_bytes.set(run);
        self.next_offset.set(offset + len);
        run
    }
}

#[cfg(test)]
mod tests {
    use super::super::index::{BackingIdx, Lba};
    use super::*;

    #[test]
    fn misses_count_per_block_and_reset_when_promoted() {
        let t = MissTracker::default();
        let k = BlockKey::new(BackingIdx(0), Lba(42)).unwrap();
        assert_eq!(t.miss(k), 1);
        assert_eq!(t.miss(k), 2);
        t.forget(k);
        assert_eq!(t.miss(k), 1);
    }

    #[test]
    fn contiguous_io_builds_a_run_and_a_jump_resets_it() {
        let s = StreamDetector::default();
        assert_eq!(s.observe(0, 4096), 4096);
        assert_eq!(s.observe(4096, 8192), 12288);
        assert_eq!(s.observe(1 << 20, 4096), 4096);
    }
}
