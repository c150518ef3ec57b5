//! Writeback rate control: foreground latency first, but writeback always finishes.
//!
//! Each tick (100 ms) the migration thread asks [`RateController::decide`]:
//!
//! - **Urgent** (free log segments below the low watermark, a writer had to wait for log
//!   space, or a drain/detach was requested): write back unthrottled. With the cache 100%
//!   dirty this is what keeps writes moving at backing-device speed.
//! - **Idle foreground** (no I/O on the set for a second): unthrottled until nothing is dirty.
//! - **Dirty fraction above `writeback_percent`**: a proportional–derivative controller on
//!   the dirty fraction (bcache's writeback_percent with its PD controller) picks a rate
//!   between `writeback_rate_min` and `writeback_rate_max` blocks/s; the **latency guard**
//!   halves it while foreground read latency is above twice its baseline (the latency seen
//!   while writeback was idle).
//! - Otherwise: no writeback.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the migration thread should do this tick.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Decision {
    Idle,
    /// Write back at most this many blocks per second.
    Rate(f64),
    Unlimited,
}

/// Inputs of one decision.
#[derive(Copy, Clone, Debug, Default)]
pub struct Inputs {
    /// Live dirty blocks / total slots.
    pub dirty_fraction: f64,
    /// Free segments below the low watermark, writers waiting for space, or a drain.
    pub urgent: bool,
    /// No foreground I/O for a while.
    pub foreground_idle: bool,
    /// Current foreground read latency (EWMA, ns), if any reads happened.
    pub fg_latency_ns: Option<f64>,
}

/// Knobs (RPC `bdev_cache_set_options`).
#[derive(Copy, Clone, Debug)]
pub struct RateKnobs {
    /// Target dirty fraction, percent (bcache's writeback_percent).
    pub writeback_percent: u32,
    /// Blocks per second at the target.
    pub rate_min: f64,
    /// Blocks per second at 100% dirty (and the cap of the controller).
    pub rate_max: f64,
}

impl Default for RateKnobs {
    fn default() -> Self {
        RateKnobs { writeback_percent: 10, rate_min: 256.0, rate_max: 200_000.0 }
    }
}

/// The controller state.
#[derive(Debug, Default)]
pub struct RateController {
    last_error: Option<(f64, Instant)>,
    baseline_ns: Option<f64>,
}

/// Derivative gain (fraction of the rate span per unit of dirty-fraction change per second;
/// the time step is floored at one 100 ms tick).
const KD: f64 = 0.05;

impl RateController {
    pub fn decide(&mut self, k: &RateKnobs, i: Inputs) -> Decision {
        let target = (k.writeback_percent.min(100) as f64) / 100.0;
        let error = i.dirty_fraction - target;
        let now = Instant::now();
        let derivative = match self.last_error {
            Some((e, t)) => {
                let dt = now.saturating_duration_since(t).as_secs_f64().max(0.1);
                (error - e) / dt
            }
            None => 0.0,
        };
        self.last_error = Some((error, now));
        if i.urgent || (i.foreground_idle && i.dirty_fraction > 0.0) {
            return Decision::Unlimited;
        }
        if error <= 0.0 {
            // Writeback idle: this is the foreground latency to protect.
            if let Some(l) = i.fg_latency_ns {
                self.baseline_ns = Some(match self.baseline_ns {
                    Some(b) => b * 0.9 + l * 0.1,
                    None => l,
                });
            }
            return Decision::Idle;
        }
        let span = (k.rate_max - k.rate_min).max(0.0);
        let p = (error / (1.0 - target).max(1e-6)).clamp(0.0, 1.0);
        let mut rate = k.rate_min + span * (p + KD * derivative).clamp(0.0, 1.0);
        if let (Some(l), Some(b)) = (i.fg_latency_ns, self.baseline_ns) {
            if l > 2.0 * b {
                rate = (rate / 2.0).max(k.rate_min);
            }
        }
        Decision::Rate(rate.clamp(k.rate_min, k.rate_max.max(k.rate_min)))
    }
}

/// Buckets of the foreground read-latency histogram (see [`bucket`]).
pub const LAT_BUCKETS: usize = 128;
/// Sub-buckets per power of two (12.5% wide: the tail guard compares p99s 25% apart,
/// and 4 sub-buckets — 25% steps — made one interval's p99 jump a whole bar).
const SUB_SHIFT: usize = 3;
const SUBS: usize = 1 << SUB_SHIFT;

/// Histogram bucket of a latency in ns: bucket 0 holds everything below 1,024 ns, then
/// `SUBS` buckets per power of two up to ~67 ms; the last bucket holds the rest.
pub fn bucket(ns: u64) -> usize {
    if ns < 1024 {
        return 0;
    }
    let lz = 63 - ns.leading_zeros() as usize; // floor(log2), >= 10
    let sub = ((ns >> (lz - SUB_SHIFT)) & (SUBS as u64 - 1)) as usize;
    ((lz - 10) * SUBS + sub + 1).min(LAT_BUCKETS - 1)
}

/// Lower bound (ns) of a bucket's latencies.
pub fn bucket_lower_ns(b: usize) -> u64 {
    if b == 0 {
        return 0;
    }
    let (lz, sub) = ((b - 1) / SUBS + 10, (b - 1) % SUBS);
    (SUBS as u64 + sub as u64) << (lz - SUB_SHIFT)
}

/// Upper bound (ns) of a bucket's latencies.
pub fn bucket_upper_ns(b: usize) -> u64 {
    if b == 0 {
        return 1024;
    }
    let (lz, sub) = ((b - 1) / SUBS + 10, (b - 1) % SUBS);
    ((SUBS as u64 + sub as u64 + 1) << (lz - SUB_SHIFT)).min(u64::MAX >> 1)
}

/// Foreground activity of one reactor, written only by that reactor, read by the
/// migration thread (no contention on the I/O path).
#[repr(align(64))]
pub struct FgStat {
    /// EWMA of read latency in ns (0: no reads yet).
    pub read_ewma_ns: AtomicU64,
    /// Time of the last foreground I/O, ns since the set was created.
    pub last_io_ns: AtomicU64,
    /// Read latencies, cumulative per bucket (the tail guard diffs snapshots).
    pub read_hist: [AtomicU64; LAT_BUCKETS],
}

impl Default for FgStat {
    fn default() -> Self {
        FgStat {
            read_ewma_ns: AtomicU64::new(0),
            last_io_ns: AtomicU64::new(0),
            read_hist: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl FgStat {
    /// Record one foreground I/O (`read_ns`: its latency if it was a read). Single writer
    /// (the owning reactor): plain load + store, no read-modify-write.
    pub fn record(&self, now_ns: u64, read_ns: Option<u64>) {
        self.last_io_ns.store(now_ns, Ordering::Relaxed);
        if let Some(l) = read_ns {
            let old = self.read_ewma_ns.load(Ordering::Relaxed);
            let new = if old == 0 { l } else { old - old / 16 + l / 16 };
            self.read_ewma_ns.store(new, Ordering::Relaxed);
            let h = &self.read_hist[bucket(l)];
            h.store(h.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
    }
}

/// Foreground summary over all reactors.
pub fn summarize(stats: &[FgStat], now_ns: u64, idle_after: Duration) -> (bool, Option<f64>) {
    let last = stats.iter().map(|s| s.last_io_ns.load(Ordering::Relaxed)).max().unwrap_or(0);
    let idle = now_ns.saturating_sub(last) >= idle_after.as_nanos() as u64;
    let lats: Vec<u64> = stats.iter().map(|s| s.read_ewma_ns.load(Ordering::Relaxed)).filter(|l| *l > 0).collect();
    let lat = (!lats.is_empty()).then(|| lats.iter().sum::<u64>() as f64 / lats.len() as f64);
    (idle, lat)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(dirty: f64) -> Inputs {
        Inputs { dirty_fraction: dirty, ..Inputs::default() }
    }

    #[test]
    fn latency_buckets_are_monotonic_and_bound_their_values() {
        let mut prev = 0;
        for ns in [0u64, 500, 1024, 1500, 2047, 2048, 50_000, 64_000, 100_000, 115_000, 1_000_000, 1 << 40] {
            let b = bucket(ns);
            assert!(b >= prev, "bucket({ns}) = {b} < {prev}");
            assert!(ns <= bucket_upper_ns(b) || b == LAT_BUCKETS - 1, "{ns} above bucket {b}'s bound");
            if b > 0 {
                assert!(ns >= bucket_upper_ns(b - 1), "{ns} below bucket {b}'s range");
                assert_eq!(bucket_lower_ns(b), bucket_upper_ns(b - 1));
            }
            prev = b;
        }
    }

    #[test]
    fn below_target_is_idle_above_it_ramps_up_and_urgency_lifts_the_limit() {
        let k = RateKnobs::default();
        let mut c = RateController::default();
        assert_eq!(c.decide(&k, inputs(0.05)), Decision::Idle);
        let Decision::Rate(low) = c.decide(&k, inputs(0.2)) else { panic!("expected a rate") };
        std::thread::sleep(Duration::from_millis(5));
        let mut c2 = RateController::default();
        let Decision::Rate(high) = c2.decide(&k, inputs(0.9)) else { panic!("expected a rate") };
        assert!(high > low, "more dirty data must write back faster ({low} vs {high})");
        assert_eq!(c.decide(&k, Inputs { urgent: true, ..inputs(0.05) }), Decision::Unlimited);
        assert_eq!(c.decide(&k, Inputs { foreground_idle: true, ..inputs(0.01) }), Decision::Unlimited);
    }

    #[test]
    fn foreground_latency_above_twice_the_baseline_halves_the_rate() {
        let k = RateKnobs::default();
        let mut c = RateController::default();
        // Baseline learnt while idle: 100 µs.
        assert_eq!(c.decide(&k, Inputs { fg_latency_ns: Some(100_000.0), ..inputs(0.0) }), Decision::Idle);
        let mut calm = RateController { baseline_ns: c.baseline_ns, last_error: None };
        let Decision::Rate(r1) = calm.decide(&k, Inputs { fg_latency_ns: Some(120_000.0), ..inputs(0.5) }) else {
            panic!()
        };
        let mut hurt = RateController { baseline_ns: c.baseline_ns, last_error: None };
        let Decision::Rate(r2) = hurt.decide(&k, Inputs { fg_latency_ns: Some(500_000.0), ..inputs(0.5) }) else {
            panic!()
        };
        assert!((r2 - r1 / 2.0).abs() < 1.0, "{r1} vs {r2}");
    }
}
