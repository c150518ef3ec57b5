//! Promotion policy: which read misses are copied into the cache.
//!
//! - **Hit threshold** (OCF's nhit): a block is promoted on its `promote_after`-th miss
//!   within a window. Misses are counted in a fixed table of atomic counters indexed by a
//!   hash of the block key (collisions only make promotion slightly eager); each counter
//!   carries the window epoch it was counted in, so old counts expire without a sweep.
//! - **Sequential cutoff** (bcache's sequential_cutoff): a stream of contiguous I/O on one
//!   channel longer than `seq_cutoff_bytes` bypasses the cache (no promotion for reads;
//!   writes go around the cache). Each channel follows up to [`TRACKED_STREAMS`]
//!   interleaved streams.
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

/// Streams a [`StreamDetector`] follows at once (bcache keeps 64 per backing device).
pub const TRACKED_STREAMS: usize = 16;

#[derive(Clone, Copy, Default)]
struct Stream {
    /// Where the stream's next I/O would start.
    next_offset: u64,
    /// Contiguous bytes so far; 0 for a free slot.
    run_bytes: u64,
    /// `StreamDetector::clock` at the stream's last I/O (for replacing the oldest).
    last_used: u64,
}

/// Per-channel detector of contiguous streams for the sequential cutoff. It follows up to
/// [`TRACKED_STREAMS`] streams at once, so sequential streams that arrive interleaved on one
/// channel (several NBD connections on a reactor, several jobs of one client) are each seen
/// as sequential; an I/O that continues none of them starts a new stream in place of the
/// least recently extended one. Single-threaded (`Cell`s): a channel belongs to one reactor.
#[derive(Default)]
pub struct StreamDetector {
    streams: [std::cell::Cell<Stream>; TRACKED_STREAMS],
    clock: std::cell::Cell<u64>,
}

impl StreamDetector {
    /// Record an I/O at [offset, offset+len); returns the length of the contiguous run
    /// it extends (`len` if it starts a new stream).
    pub fn observe(&self, offset: u64, len: u64) -> u64 {
        let now = self.clock.get() + 1;
        self.clock.set(now);
        let continued = self.streams.iter().find(|s| {
            let s = s.get();
            s.run_bytes > 0 && s.next_offset == offset
        });
        let (slot, run) = match continued {
            Some(slot) => (slot, slot.get().run_bytes.saturating_add(len)),
            None => {
                let oldest = self.streams.iter().min_by_key(|s| s.get().last_used);
                (oldest.expect("TRACKED_STREAMS > 0"), len)
            }
        };
        slot.set(Stream { next_offset: offset.saturating_add(len), run_bytes: run, last_used: now });
        debug_assert!(run >= len);
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

    #[test]
    fn interleaved_streams_each_build_their_run() {
        // Four sequential readers on one channel, their requests interleaved: each stream's
        // run grows as if it were alone (with one tracked stream every I/O looked random).
        let s = StreamDetector::default();
        let bases = [0u64, 1 << 30, 2 << 30, 3 << 30];
        for i in 0..64u64 {
            for b in bases {
                assert_eq!(s.observe(b + i * 131072, 131072), (i + 1) * 131072);
            }
        }
    }

    #[test]
    fn readers_in_lockstep_over_the_same_range_are_each_sequential() {
        // fio numjobs=4 over one file: every job reads the same offsets in the same order.
        let s = StreamDetector::default();
        for i in 0..32u64 {
            for _job in 0..4 {
                assert_eq!(s.observe(i * 65536, 65536), (i + 1) * 65536);
            }
        }
    }

    #[test]
    fn a_new_stream_replaces_the_least_recently_extended() {
        let s = StreamDetector::default();
        let n = TRACKED_STREAMS as u64;
        for k in 0..n {
            s.observe(k << 30, 4096);
        }
        // Extend every stream but the first, then start one more: it takes stream 0's slot.
        for k in 1..n {
            assert_eq!(s.observe((k << 30) + 4096, 4096), 8192);
        }
        assert_eq!(s.observe(n << 30, 4096), 4096);
        assert_eq!(s.observe(4096, 4096), 4096, "stream 0 was forgotten");
        for k in 2..n {
            assert_eq!(s.observe((k << 30) + 8192, 4096), 12288, "stream {k} kept");
        }
    }
}
