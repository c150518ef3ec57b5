//! The foreground tail-latency guard of writeback.
//!
//! The rate controller (`rate.rs`) decides how many blocks per second writeback may move;
//! this guard decides how many writeback I/Os may be in flight at once (the *window*)
//! while foreground I/O is running. A QD1 reader does not see the mean of writeback's
//! interference but its tail: one read queued behind 64 writeback I/Os on the device is
//! a p99 sample (measured: p50 36 → 37 µs but p99 72 → 642 µs under a 64-deep
//! writeback). So the guard watches the foreground read p99 — from per-reactor
//! histograms the reactors fill on their I/O path ([`FgStat`]) — over short intervals,
//! and runs AIMD on the window:
//!
//! - an interval with writeback I/O and p99 above `SLACK` × the baseline halves the
//!   window (down to the caller's minimum); far above (`FAR` × the bar: writeback ran at
//!   a wide window when reads started) it drops to the minimum at once — halving from 128
//!   took six intervals of millisecond reads (measured: p99 2.6 ms → 0.33 ms over 120 ms);
//! - an interval with writeback I/O and p99 within it grows the window by one;
//! - an interval without writeback I/O, after another one without, updates the baseline
//!   (the first quiet interval still holds the tail of writeback I/O issued just before
//!   it; counting it set baselines 1.6x apart in runs of the same load). The baseline is
//!   the low end of the last `QUIET_KEPT` such p99s ([`baseline_of`]), because what
//!   pollutes a quiet interval (a round's device flushes, the device still writing out
//!   what writeback sent it, a cold start) only ever raises its p99: an averaged baseline
//!   of 108 µs, against 78–84 µs in other runs of the same load, let writeback run
//!   nearly unguarded (read p99 1.63× idle);
//! - without a baseline the window stays at the minimum, and [`TailGuard::wants_probe`]
//!   asks the migration thread to pause writeback briefly (`probe_pause`: long enough for
//!   two settled quiet intervals) so one can be measured; again every `REPROBE_AFTER`,
//!   as the foreground load changes.
//!
//! Once the window is 1 and p99 is still over the bar, the guard also *paces* writeback
//! (a pause between runs, doubled per interval up to 20 ms, halved back when within).
//!
//! No foreground reads in an interval: the window opens fully (nothing to protect).

use std::time::{Duration, Instant};

use super::rate::{FgStat, LAT_BUCKETS};

/// The largest window (writeback runs in flight).
pub const MAX_WINDOW: usize = 128;
/// Shortest interval the p99 is taken over.
const INTERVAL: Duration = Duration::from_millis(20);
/// An interval closes early only with this many reads; else it runs up to `MAX_INTERVAL`.
const MIN_SAMPLES: u64 = 200;
const MAX_INTERVAL: Duration = Duration::from_millis(500);
/// Allowed p99 growth over the baseline before the window shrinks.
const SLACK: f64 = 1.25;
/// p99 above `FAR` × `SLACK` × the baseline: the window drops to the minimum at once.
const FAR: f64 = 2.0;
/// Pacing between writeback runs: from this, doubling up to `MAX_PACE`.
const MIN_PACE: Duration = Duration::from_micros(200);
const MAX_PACE: Duration = Duration::from_millis(20);
/// Settled quiet intervals the baseline is taken from (about five probes' worth).
const QUIET_KEPT: usize = 16;
/// Re-measure the baseline this often.
const REPROBE_AFTER: Duration = Duration::from_secs(2);

/// State of the guard (owned by the cache set, behind a mutex: only the migration
/// thread and the migration reactor touch it).
#[derive(Debug)]
pub struct TailGuard {
    last: [u64; LAT_BUCKETS],
    last_at: Instant,
    last_wb_ios: u64,
    /// The last closed interval issued no writeback I/O.
    last_quiet: bool,
    /// p99s of the last [`QUIET_KEPT`] settled quiet intervals (ring; 0 = empty slot).
    quiet_p99s: [u64; QUIET_KEPT],
    quiet_next: usize,
    baseline_p99_ns: Option<f64>,
    baseline_at: Option<Instant>,
    window: usize,
    /// Pause between writeback runs once the window is 1 and p99 is still over the bar
    /// (AIMD too: doubled while over, halved while within; zero below `MIN_PACE`).
    pace: Duration,
    /// p99 of the last closed interval, ns (None: no reads in it).
    pub last_p99_ns: Option<u64>,
    /// What the closed intervals decided (counts since the set started).
    decisions: GuardDecisions,
}

/// How many closed intervals ended each way (monotonic counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardDecisions {
    /// Without writeback I/O: the baseline was updated.
    pub baseline: u64,
    /// With writeback I/O and p99 over the bar: window shrunk (or pace grown).
    pub over: u64,
    /// With writeback I/O and p99 within the bar: window grown (or pace shrunk).
    pub within: u64,
    /// Without foreground reads: window fully open.
    pub no_reads: u64,
}

/// A snapshot of the guard for statistics (`CacheSet::tail_guard_state`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuardState {
    pub window: usize,
    pub pace: Duration,
    pub baseline_p99_ns: Option<f64>,
    pub last_p99_ns: Option<u64>,
    pub decisions: GuardDecisions,
}

impl GuardDecisions {
    /// The decisions taken since `earlier` (a snapshot of the same guard).
    pub fn since(self, earlier: GuardDecisions) -> GuardDecisions {
        GuardDecisions {
            baseline: self.baseline.saturating_sub(earlier.baseline),
            over: self.over.saturating_sub(earlier.over),
            within: self.within.saturating_sub(earlier.within),
            no_reads: self.no_reads.saturating_sub(earlier.no_reads),
        }
    }
}

impl GuardState {
    /// The statistics form (`bdev_cache_get_stats` `writeback_guard`, tiercache-perf's
    /// `tail_guard`): latencies in whole µs.
    pub fn to_json(&self) -> serde_json::Value {
        let d = &self.decisions;
        serde_json::json!({
            "window": self.window,
            "pace_us": self.pace.as_micros() as u64,
            "baseline_read_p99_us": self.baseline_p99_ns.map(|b| (b / 1000.0).round() as u64),
            "last_read_p99_us": self.last_p99_ns.map(|p| (p + 500) / 1000),
            "intervals_baseline": d.baseline,
            "intervals_over": d.over,
            "intervals_within": d.within,
            "intervals_no_reads": d.no_reads,
        })
    }
}

impl Default for TailGuard {
    fn default() -> Self {
        TailGuard {
            last: [0; LAT_BUCKETS],
            last_at: Instant::now(),
            last_wb_ios: 0,
            last_quiet: false,
            quiet_p99s: [0; QUIET_KEPT],
            quiet_next: 0,
            baseline_p99_ns: None,
            baseline_at: None,
            window: MAX_WINDOW,
            pace: Duration::ZERO,
            last_p99_ns: None,
            decisions: GuardDecisions::default(),
        }
    }
}

/// p99 of a bucket histogram, ns, interpolated within the bucket that holds the 99th
/// percentile (the bucket's bound alone quantises it to 12.5% steps); None when empty.
pub fn p99_ns(hist: &[u64; LAT_BUCKETS]) -> Option<u64> {
    let n: u64 = hist.iter().sum();
    if n == 0 {
        return None;
    }
    let rank = n - n / 100; // the sample at the 99th percentile, 1-based
    let mut seen = 0;
    for (b, &c) in hist.iter().enumerate() {
        if seen + c >= rank {
            let (lo, hi) = (super::rate::bucket_lower_ns(b), super::rate::bucket_upper_ns(b));
            let p = lo + (hi - lo) * (rank - seen) / c;
            debug_assert!((lo..=hi).contains(&p));
            return Some(p);
        }
        seen += c;
    }
    Some(super::rate::bucket_upper_ns(LAT_BUCKETS - 1))
}

/// The baseline from the kept quiet-interval p99s: the second lowest (the lowest alone
/// once fewer than four are kept). What disturbs a quiet interval — the tail of a round's
/// flushes, the device still writing out what writeback sent it — only ever raises its
/// p99, so the low end is the foreground's own tail; the second lowest rather than the
/// lowest, so one lucky interval does not set the bar.
fn baseline_of(kept: &[u64; QUIET_KEPT]) -> Option<u64> {
    let mut sorted = *kept;
    sorted.sort_unstable();
    let v = &sorted[sorted.iter().take_while(|&&p| p == 0).count()..];
    match v.len() {
        0 => None,
        1..=3 => Some(v[0]),
        _ => Some(v[1]),
    }
}

impl TailGuard {
    /// Close the current interval if it is due and adapt the window. `wb_ios`: writeback
    /// I/Os issued so far (a counter). Returns the window for foreground-active periods.
    pub fn tick(&mut self, fg: &[FgStat], wb_ios: u64, now: Instant, min_window: usize) -> usize {
        debug_assert!((1..=MAX_WINDOW).contains(&min_window));
        let age = now.saturating_duration_since(self.last_at);
        // The last closed interval had no reads, so writeback may be running at the full
        // window: the first reads close the interval at once rather than after a whole
        // interval of them (200 reads at QD1 behind a full window took 200 ms: measured
        // interval p99s of 393 and 983 µs at the start of a run, against 140 µs idle).
        let starting = self.last_p99_ns.is_none();
        if age < INTERVAL && !starting {
            return self.window.max(min_window);
        }
        let mut cur = [0u64; LAT_BUCKETS];
        for s in fg {
            for (b, c) in cur.iter_mut().enumerate() {
                *c += s.read_hist[b].load(std::sync::atomic::Ordering::Relaxed);
            }
        }
        let mut delta = [0u64; LAT_BUCKETS];
        for b in 0..LAT_BUCKETS {
            delta[b] = cur[b].saturating_sub(self.last[b]);
        }
        let n: u64 = delta.iter().sum();
        if (n == 0 && age < INTERVAL) || (n < MIN_SAMPLES && n > 0 && age < MAX_INTERVAL && !starting) {
            return self.window.max(min_window);
        }
        let wb_active = wb_ios != self.last_wb_ios;
        // The first quiet interval after writeback still holds the I/Os (and flushes)
        // issued at the end of the one before: it measures neither state.
        let settled = !wb_active && self.last_quiet;
        self.last_quiet = !wb_active;
        self.last = cur;
        self.last_at = now;
        self.last_wb_ios = wb_ios;
        let p99 = p99_ns(&delta);
        self.last_p99_ns = p99;
        let Some(p99) = p99 else {
            self.decisions.no_reads += 1;
            self.window = MAX_WINDOW;
            self.pace = Duration::ZERO;
            return self.window;
        };
        if starting && wb_active {
            // Reads resumed with writeback in flight: a few reads are no verdict; start
            // from the minimum window and let AIMD open it again.
            self.window = 1;
        } else if !wb_active && (!settled || n < MIN_SAMPLES / 2) {
            // Between the two, or too few reads to tell: neither a baseline nor a verdict.
        } else if !wb_active {
            self.decisions.baseline += 1;
            self.quiet_p99s[self.quiet_next] = p99.max(1);
            self.quiet_next = (self.quiet_next + 1) % QUIET_KEPT;
            self.baseline_p99_ns = baseline_of(&self.quiet_p99s).map(|b| b as f64);
            debug_assert!(self.baseline_p99_ns.is_some());
            self.baseline_at = Some(now);
        } else if let Some(b) = self.baseline_p99_ns {
            if p99 as f64 > SLACK * b {
                self.decisions.over += 1;
                if self.window == 1 {
                    self.pace = (self.pace * 2).clamp(MIN_PACE, MAX_PACE);
                }
                self.window = if p99 as f64 > FAR * SLACK * b { 1 } else { (self.window / 2).max(1) };
            } else if !self.pace.is_zero() {
                self.decisions.within += 1;
                self.pace /= 2;
                if self.pace < MIN_PACE {
                    self.pace = Duration::ZERO;
                }
            } else {
                self.decisions.within += 1;
                self.window = (self.window + 1).min(MAX_WINDOW);
            }
        } else {
            self.window = 1;
        }
        self.window.max(min_window)
    }

    /// Whether writeback should pause for one interval to (re-)measure the baseline: only
    /// while the foreground reads (the last interval had reads) — a write-only or idle
    /// foreground has no read tail to protect, and pausing for it would only slow
    /// writeback down.
    pub fn wants_probe(&self, now: Instant) -> bool {
        if !self.reads_active() {
            return false;
        }
        match self.baseline_at {
            None => true,
            Some(t) => now.saturating_duration_since(t) >= REPROBE_AFTER,
        }
    }

    /// Whether the last closed interval had foreground reads.
    pub fn reads_active(&self) -> bool {
        self.last_p99_ns.is_some()
    }

    /// How long a probe pause lasts (a couple of intervals).
    pub fn probe_pause() -> Duration {
        5 * INTERVAL
    }

    /// Pause before the next writeback run (zero: none).
    pub fn pace(&self) -> Duration {
        self.pace
    }

    pub fn baseline_p99_ns(&self) -> Option<f64> {
        self.baseline_p99_ns
    }

    pub fn state(&self) -> GuardState {
        GuardState {
            window: self.window,
            pace: self.pace,
            baseline_p99_ns: self.baseline_p99_ns,
            last_p99_ns: self.last_p99_ns,
            decisions: self.decisions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(fg: &FgStat, ns: u64, n: u64) {
        for _ in 0..n {
            fg.record(1, Some(ns));
        }
    }

    #[test]
    fn p99_is_interpolated_within_its_bucket() {
        // 1,000 samples spread evenly over 100..110 µs: the p99 lies near 110, not at the
        // bound of whichever bucket holds it.
        let fg = FgStat::default();
        for i in 0..1000u64 {
            fg.record(1, Some(100_000 + i * 10));
        }
        let mut h = [0u64; LAT_BUCKETS];
        for (b, c) in h.iter_mut().enumerate() {
            *c = fg.read_hist[b].load(std::sync::atomic::Ordering::Relaxed);
        }
        let p = p99_ns(&h).unwrap();
        assert!((106_000..=114_688).contains(&p), "p99 {p}");
    }

    #[test]
    fn p99_of_a_histogram_is_the_bucket_holding_the_99th_percentile() {
        let fg = FgStat::default();
        feed(&fg, 50_000, 990);
        feed(&fg, 2_000_000, 10);
        let mut h = [0u64; LAT_BUCKETS];
        for (b, c) in h.iter_mut().enumerate() {
            *c = fg.read_hist[b].load(std::sync::atomic::Ordering::Relaxed);
        }
        let p = p99_ns(&h).unwrap();
        assert!((50_000..=64_000).contains(&p), "p99 {p}");
        feed(&fg, 2_000_000, 10); // now 2% slow
        for (b, c) in h.iter_mut().enumerate() {
            *c = fg.read_hist[b].load(std::sync::atomic::Ordering::Relaxed);
        }
        assert!(p99_ns(&h).unwrap() >= 2_000_000);
    }

    #[test]
    fn the_window_halves_when_p99_rises_with_writeback_and_grows_back_when_it_does_not() {
        let fg = [FgStat::default()];
        let mut g = TailGuard::default();
        let t0 = Instant::now();
        let mut k = 0u32;
        let mut step = |g: &mut TailGuard, ns: u64, wb: u64| {
            feed(&fg[0], ns, 500);
            k += 1;
            let t = t0 + INTERVAL * k;
            (g.tick(&fg, wb, t, 1), t)
        };
        // Writeback active without a baseline: the minimum window, and a probe is wanted.
        let (w, t) = step(&mut g, 50_000, 1);
        assert_eq!(w, 1);
        assert!(g.wants_probe(t));
        // The first quiet interval (no writeback I/O) still holds writeback's tail: it sets
        // nothing; the second one sets the baseline.
        let (_, t) = step(&mut g, 900_000, 1);
        assert!(g.baseline_p99_ns().is_none() && g.wants_probe(t));
        let (_, t) = step(&mut g, 50_000, 1);
        assert!(g.baseline_p99_ns().is_some() && !g.wants_probe(t));
        assert!(g.baseline_p99_ns().unwrap() < 60_000.0, "{:?}", g.baseline_p99_ns());
        // Writeback with p99 unchanged: the window grows by one per interval.
        let (w1, _) = step(&mut g, 50_000, 2);
        let (w2, _) = step(&mut g, 50_000, 3);
        assert_eq!(w2, w1 + 1);
        // p99 1.5x: halved.
        let (w3, _) = step(&mut g, 75_000, 4);
        assert_eq!(w3, (w2 / 2).max(1));
        // p99 10x: straight to the minimum.
        let (_, _) = step(&mut g, 50_000, 5);
        let (_, _) = step(&mut g, 50_000, 6);
        let (w3, _) = step(&mut g, 500_000, 7);
        assert_eq!(w3, 1);
        // Never below the caller's minimum; at window 1 and still over the bar, runs are paced.
        let (w4, t) = step(&mut g, 500_000, 8);
        assert!(w4 >= 1);
        let mut k = 0;
        while g.pace().is_zero() {
            k += 1;
            assert!(k < 10, "no pacing at window 1 with p99 10x the baseline");
            feed(&fg[0], 500_000, 500);
            g.tick(&fg, 100 + k, t + INTERVAL * k as u32, 1);
        }
        assert!(g.tick(&fg, 6, t + INTERVAL, 8) >= 8);
    }

    #[test]
    fn the_baseline_is_the_low_end_of_recent_quiet_intervals() {
        let fg = [FgStat::default()];
        let mut g = TailGuard::default();
        let t0 = Instant::now();
        let at = |g: &mut TailGuard, ns: u64, k: u32| {
            feed(&fg[0], ns, 500);
            g.tick(&fg, 0, t0 + INTERVAL * k, 1);
            g.baseline_p99_ns()
        };
        assert_eq!(at(&mut g, 200_000, 1), None, "the first quiet interval is not settled");
        let at = |g: &mut TailGuard, ns: u64, k: u32| at(g, ns, k).unwrap();
        let first = at(&mut g, 200_000, 2);
        assert!((196_000.0..=213_000.0).contains(&first), "{first}");
        // A quieter interval sets it at once; louder ones do not raise it.
        let low = at(&mut g, 100_000, 3);
        assert!(low < 110_000.0, "{first} -> {low}");
        assert_eq!(at(&mut g, 400_000, 4), low);
        // From four kept values on, the second lowest: one lucky interval is not the bar.
        let lucky = at(&mut g, 50_000, 5);
        assert!((95_000.0..=110_000.0).contains(&lucky), "{lucky}");
        // Old values age out: after QUIET_KEPT louder intervals, the baseline follows them.
        let mut b = 0.0;
        for k in 0..QUIET_KEPT as u32 {
            b = at(&mut g, 300_000, 6 + k);
        }
        assert!(b > 280_000.0, "{b}");
    }

    #[test]
    fn no_foreground_reads_opens_the_window() {
        let fg = [FgStat::default()];
        let mut g = TailGuard { window: 2, ..TailGuard::default() };
        let t = Instant::now() + MAX_INTERVAL;
        assert_eq!(g.tick(&fg, 10, t, 1), MAX_WINDOW);
        assert!(!g.wants_probe(t), "no reads: nothing to probe for");
    }

    #[test]
    fn the_first_reads_after_none_close_the_interval_and_shrink_the_window_at_once() {
        let fg = [FgStat::default()];
        let mut g = TailGuard::default();
        let t0 = Instant::now();
        // A baseline, then an interval without reads: the window opens fully.
        feed(&fg[0], 50_000, 500);
        g.tick(&fg, 0, t0 + INTERVAL, 1);
        feed(&fg[0], 50_000, 500);
        g.tick(&fg, 0, t0 + INTERVAL * 2, 1);
        assert!(g.baseline_p99_ns().is_some());
        assert_eq!(g.tick(&fg, 5, t0 + INTERVAL * 3, 1), MAX_WINDOW);
        // Writeback runs at the full window; a handful of reads arrive 1 ms later: the
        // window drops to the minimum without waiting for 200 reads or 20 ms.
        feed(&fg[0], 900_000, 3);
        let t = t0 + INTERVAL * 3 + Duration::from_millis(1);
        assert_eq!(g.tick(&fg, 50, t, 1), 1);
        assert_eq!(g.tick(&fg, 60, t + Duration::from_millis(1), 2), 2, "the caller's minimum still holds");
    }

    #[test]
    fn the_statistics_form_counts_decisions_since_a_snapshot() {
        let fg = [FgStat::default()];
        let mut g = TailGuard::default();
        let t0 = Instant::now();
        let before = g.state();
        for k in 1..=3u32 {
            feed(&fg[0], 80_400, 500);
            g.tick(&fg, 0, t0 + INTERVAL * k, 1);
        }
        let mut now = g.state();
        now.decisions = now.decisions.since(before.decisions);
        let j = now.to_json();
        // Three quiet intervals: the first unsettled, two baselines.
        assert_eq!(j["intervals_baseline"], serde_json::json!(2), "{j}");
        assert_eq!(j["intervals_over"], serde_json::json!(0), "{j}");
        let b = j["baseline_read_p99_us"].as_u64().unwrap();
        assert!((80..=82).contains(&b), "{j}");
        assert_eq!(now.decisions.since(now.decisions), GuardDecisions::default());
    }
}
