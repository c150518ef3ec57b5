//! Results: per-core and total IOPS, MiB/s, latency percentiles; text and JSON forms.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::config::{JobConfig, Limit, VerifyPass, Workload};
use crate::job::{core_label, new_histogram, IoError, JobOutcome, ReactorResult, RingDelta, MAX_MISMATCH_DETAILS};
use crate::pattern::Mismatch;

/// Latency summary in microseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LatencyUs {
    pub avg: f64,
    pub min: f64,
    pub max: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub p99_99: f64,
    pub p100: f64,
}

fn us(ns: f64) -> f64 {
    (ns / 1000.0 * 1000.0).round() / 1000.0
}

impl LatencyUs {
    pub fn from_histogram(h: &Histogram<u64>) -> LatencyUs {
        if h.is_empty() {
            return LatencyUs::default();
        }
        let q = |p: f64| us(h.value_at_quantile(p) as f64);
        LatencyUs {
            avg: us(h.mean()),
            min: us(h.min() as f64),
            max: us(h.max() as f64),
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p99_9: q(0.999),
            p99_99: q(0.9999),
            p100: us(h.max() as f64),
        }
    }
}

/// One core's (or the total's) numbers.
#[derive(Clone, Debug, Serialize)]
pub struct CoreStats {
    /// Reactor index (null in the total).
    pub reactor: Option<usize>,
    /// CPU the reactor is pinned to (null when unpinned, and in the total).
    pub core: Option<usize>,
    pub elapsed_s: f64,
    /// Reads + writes completed (flushes are counted separately).
    pub ios: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub errors: u64,
    /// Bytes moved by successful reads and writes.
    pub bytes: u64,
    pub iops: f64,
    pub mib_s: f64,
    pub latency_us: LatencyUs,
    /// The reactor's io_uring counters during the job (summed in the total).
    pub ring: RingDelta,
}

/// Flush statistics (flush latency is not part of the read/write histogram).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlushStats {
    pub count: u64,
    pub avg_us: f64,
    pub max_us: f64,
}

/// Outcome of a verify run.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyStats {
    pub pass: VerifyPass,
    pub blocks_checked: u64,
    pub mismatches: u64,
    /// The first mismatches (up to 4096 per core), in LBA order.
    pub details: Vec<Mismatch>,
    pub details_truncated: bool,
}

/// One bucket of the latency distribution.
#[derive(Clone, Debug, Serialize)]
pub struct Bucket {
    /// Upper bound of the bucket, µs.
    pub le_us: f64,
    pub count: u64,
    pub cumulative_pct: f64,
}

/// The target as it was opened.
#[derive(Clone, Debug, Serialize)]
pub struct TargetEcho {
    pub kind: String,
    pub name: String,
    pub path: Option<String>,
    pub block_size: u32,
    pub num_blocks: u64,
    pub size_bytes: u64,
}

/// The job as it ran.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigEcho {
    pub workload: Workload,
    pub read_pct: Option<u8>,
    pub io_size: u64,
    pub queue_depth: u32,
    pub cores: Vec<Option<usize>>,
    pub time_s: Option<f64>,
    pub io_count: Option<u64>,
    pub flush_every: Option<u64>,
    pub zipf_theta: Option<f64>,
    pub seed: u64,
    pub busy_poll: bool,
    pub verify_pass: Option<VerifyPass>,
}

impl ConfigEcho {
    pub fn new(cfg: &JobConfig, cores: &[Option<usize>], busy_poll: bool) -> ConfigEcho {
        ConfigEcho {
            workload: cfg.workload,
            read_pct: (cfg.workload == Workload::Randrw).then_some(cfg.read_pct),
            io_size: cfg.io_size,
            queue_depth: cfg.queue_depth,
            cores: cores.to_vec(),
            time_s: match cfg.limit {
                Limit::Time(d) => Some(d.as_secs_f64()),
                Limit::Count(_) => None,
            },
            io_count: match cfg.limit {
                Limit::Count(n) => Some(n),
                Limit::Time(_) => None,
            },
            flush_every: cfg.flush_every,
            zipf_theta: cfg.zipf_theta,
            seed: cfg.seed,
            busy_poll,
            verify_pass: (cfg.workload == Workload::Verify).then_some(cfg.verify_pass),
        }
    }
}

/// The whole result document (`--json` prints exactly this).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub config: ConfigEcho,
    pub target: TargetEcho,
    pub elapsed_s: f64,
    pub cores: Vec<CoreStats>,
    pub total: CoreStats,
    pub flush: FlushStats,
    pub verify: Option<VerifyStats>,
    pub io_errors: Vec<IoError>,
    pub histogram: Option<Vec<Bucket>>,
    /// Cache counters and index RAM of a `--cache` target (null for the other targets).
    pub cache: Option<crate::cached::CacheReport>,
    /// The replayed trace (`--trace`) and its LRU simulation (`--lru-sim`).
    pub trace: Option<TraceReport>,
    /// No I/O errors and no verify mismatches.
    pub ok: bool,
}

/// The `trace` section of the report.
#[derive(Clone, Debug, Serialize)]
pub struct TraceReport {
    pub entries: u64,
    pub lru: Option<crate::trace::LruResult>,
}

fn rate(x: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        x as f64 / secs
    } else {
        0.0
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn core_stats(r: &ReactorResult) -> CoreStats {
    let secs = r.elapsed.as_secs_f64();
    let ios = r.counts.reads + r.counts.writes;
    CoreStats {
        reactor: Some(r.index),
        core: r.core,
        elapsed_s: secs,
        ios,
        reads: r.counts.reads,
        writes: r.counts.writes,
        flushes: r.counts.flushes,
        errors: r.counts.errors,
        bytes: r.counts.bytes,
        iops: round2(rate(ios, secs)),
        mib_s: round2(rate(r.counts.bytes, secs) / (1024.0 * 1024.0)),
        latency_us: LatencyUs::from_histogram(&r.hist),
        ring: r.ring,
    }
}

/// Log-spaced buckets (4 per octave) from 0.25 µs, the empty ones left out.
pub fn buckets(h: &Histogram<u64>) -> Vec<Bucket> {
    if h.is_empty() {
        return Vec::new();
    }
    let total = h.len() as f64;
    let mut out = Vec::new();
    let mut cum = 0u64;
    for v in h.iter_log(250, 2f64.powf(0.25)) {
        let c = v.count_since_last_iteration();
        if c == 0 {
            continue;
        }
        cum += c;
        out.push(Bucket {
            le_us: (v.value_iterated_to() as f64 / 1000.0 * 1000.0).round() / 1000.0,
            count: c,
            cumulative_pct: (cum as f64 / total * 100.0 * 1000.0).round() / 1000.0,
        });
    }
    out
}

/// Merge per-reactor results into the report.
pub fn build(outcome: JobOutcome, config: ConfigEcho, target: TargetEcho, want_histogram: bool) -> Report {
    let cores: Vec<CoreStats> = outcome.reactors.iter().map(core_stats).collect();
    let mut hist = new_histogram();
    let mut mismatch_details = Vec::new();
    let mut truncated = false;
    let mut io_errors = Vec::new();
    let (mut blocks_checked, mut mismatches) = (0, 0);
    let (mut flushes, mut flush_ns, mut flush_max) = (0u64, 0u64, 0u64);
    for r in &outcome.reactors {
        hist.add(&r.hist).ok();
        blocks_checked += r.counts.blocks_checked;
        mismatches += r.counts.mismatches;
        truncated |= r.counts.mismatches > r.mismatches.len() as u64 || r.mismatches.len() >= MAX_MISMATCH_DETAILS;
        mismatch_details.extend(r.mismatches.iter().cloned());
        io_errors.extend(r.errors.iter().cloned());
        flushes += r.counts.flushes;
        flush_ns += r.counts.flush_ns_total;
        flush_max = flush_max.max(r.counts.flush_ns_max);
    }
    mismatch_details.sort_by_key(|m| m.lba);
    let elapsed = outcome.reactors.iter().map(|r| r.elapsed.as_secs_f64()).fold(0.0, f64::max);
    let total = CoreStats {
        reactor: None,
        core: None,
        elapsed_s: elapsed,
        ios: cores.iter().map(|c| c.ios).sum(),
        reads: cores.iter().map(|c| c.reads).sum(),
        writes: cores.iter().map(|c| c.writes).sum(),
        flushes: cores.iter().map(|c| c.flushes).sum(),
        errors: cores.iter().map(|c| c.errors).sum(),
        bytes: cores.iter().map(|c| c.bytes).sum(),
        // Like bdevperf: the total rate is the sum of the cores' rates.
        iops: round2(cores.iter().map(|c| c.iops).sum()),
        mib_s: round2(cores.iter().map(|c| c.mib_s).sum()),
        latency_us: LatencyUs::from_histogram(&hist),
        ring: cores.iter().fold(RingDelta::default(), |a, c| RingDelta {
            submitted: a.submitted + c.ring.submitted,
            completed: a.completed + c.ring.completed,
            enter_calls: a.enter_calls + c.ring.enter_calls,
            backpressure_waits: a.backpressure_waits + c.ring.backpressure_waits,
        }),
    };
    let verify = (config.workload == Workload::Verify).then(|| VerifyStats {
        pass: config.verify_pass.unwrap_or(VerifyPass::Both),
        blocks_checked,
        mismatches,
        details: mismatch_details,
        details_truncated: truncated,
    });
    let ok = total.errors == 0 && mismatches == 0;
    Report {
        tool: "tiercache-perf",
        version: env!("CARGO_PKG_VERSION"),
        config,
        target,
        elapsed_s: outcome.wall.as_secs_f64(),
        cores,
        total,
        flush: FlushStats {
            count: flushes,
            avg_us: if flushes > 0 { us(flush_ns as f64 / flushes as f64) } else { 0.0 },
            max_us: us(flush_max as f64),
        },
        verify,
        io_errors,
        histogram: want_histogram.then(|| buckets(&hist)),
        cache: None,
        trace: None,
        ok,
    }
}

/// The header printed before a run.
pub fn header(config: &ConfigEcho, target: &TargetEcho, seed_given: bool) -> String {
    let limit = match (config.time_s, config.io_count) {
        (Some(t), _) => format!("{t} s"),
        (None, Some(n)) => format!("{n} I/Os"),
        _ => String::new(),
    };
    let cores: Vec<String> = config.cores.iter().enumerate().map(|(i, c)| core_label(*c, i)).collect();
    let mut s = format!(
        "tiercache-perf: {}{} {} B, qd {} per core, {} reactor(s) [{}], {}\n",
        config.workload.name(),
        config.read_pct.map(|m| format!(" ({m}% reads)")).unwrap_or_default(),
        config.io_size,
        config.queue_depth,
        config.cores.len(),
        cores.join(", "),
        limit,
    );
    let _ = writeln!(
        s,
        "target: {} {}{} ({} blocks of {} B = {})",
        target.kind,
        target.name,
        target.path.as_ref().map(|p| format!(" on {p}")).unwrap_or_default(),
        target.num_blocks,
        target.block_size,
        crate::size::human(target.size_bytes)
    );
    let _ = writeln!(
        s,
        "seed {} ({}), busy-poll {}{}{}{}",
        config.seed,
        if seed_given { "given" } else { "drawn; rerun with --seed to repeat" },
        if config.busy_poll { "on" } else { "off" },
        config.zipf_theta.map(|t| format!(", zipf theta {t}")).unwrap_or_default(),
        config.flush_every.map(|n| format!(", flush every {n} writes")).unwrap_or_default(),
        config.verify_pass.map(|p| format!(", verify pass {}", p.name())).unwrap_or_default(),
    );
    s
}

/// The human-readable result table (and details).
pub fn render_text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{:<12} {:>12} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "", "IOPS", "MiB/s", "avg_us", "min_us", "max_us", "p50", "p90", "p99", "p99.9", "p99.99", "p100"
    );
    let mut row = |label: String, c: &CoreStats| {
        let l = &c.latency_us;
        let _ = writeln!(
            s,
            "{:<12} {:>12.2} {:>10.2} {:>9.2} {:>9.2} {:>10.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10.2}",
            label, c.iops, c.mib_s, l.avg, l.min, l.max, l.p50, l.p90, l.p99, l.p99_9, l.p99_99, l.p100
        );
    };
    for c in &r.cores {
        row(core_label(c.core, c.reactor.unwrap_or(0)), c);
    }
    row("total".into(), &r.total);
    let t = &r.total;
    let _ = writeln!(
        s,
        "\n{} I/Os ({} reads, {} writes) in {:.3} s, {} errors{}",
        t.ios,
        t.reads,
        t.writes,
        t.elapsed_s,
        t.errors,
        if r.flush.count > 0 {
            format!(", {} flushes (avg {:.2} us, max {:.2} us)", r.flush.count, r.flush.avg_us, r.flush.max_us)
        } else {
            String::new()
        }
    );
    if t.ring.submitted > 0 {
        let _ = writeln!(
            s,
            "io_uring: {} SQEs in {} io_uring_enter calls ({:.2} SQEs per call), {} backpressure waits",
            t.ring.submitted,
            t.ring.enter_calls,
            t.ring.submitted as f64 / t.ring.enter_calls.max(1) as f64,
            t.ring.backpressure_waits
        );
    }
    for e in &r.io_errors {
        let _ = writeln!(
            s,
            "I/O error: {} on reactor {}: {:?} offset {} len {}",
            e.error, e.reactor, e.op, e.offset, e.len
        );
    }
    if let Some(v) = &r.verify {
        let _ = writeln!(
            s,
            "verify ({} pass): {} blocks checked, {} mismatches",
            v.pass.name(),
            v.blocks_checked,
            v.mismatches
        );
        for m in &v.details {
            let _ = writeln!(s, "MISMATCH {m}");
        }
        if v.details_truncated {
            let _ = writeln!(s, "(only the first {} mismatches per core are listed)", MAX_MISMATCH_DETAILS);
        }
    }
    if let Some(c) = &r.cache {
        let k = &c.counters;
        let _ = writeln!(
            s,
            "cache ({}, {} by {} in {:.3} s, {} segments of {} KiB): read hits {} / misses {} blocks{}, {} segments written{}, {} writeback blocks, {} cache-device block reads",
            c.mode,
            c.cache_file,
            c.opened_by,
            c.setup_s,
            c.nr_segments,
            c.segment_size / 1024,
            k.read_hit_blocks,
            k.read_miss_blocks,
            k.hit_pct.map(|p| format!(" ({p:.2}% hits)")).unwrap_or_default(),
            k.segments_written,
            k.blocks_per_segment_write.map(|b| format!(" ({b:.1} blocks each)")).unwrap_or_default(),
            k.writeback_blocks,
            k.cache_dev_read_blocks,
        );
        let _ = writeln!(
            s,
            "cache after the final flush ({:.2} ms): {} free segments, {} dirty blocks, writeback_seq {}; index RAM {:.2} B per slot ({:.2} B per cached 4 KiB)",
            c.final_flush_ms,
            c.free_segments,
            c.dirty_blocks,
            c.writeback_seq,
            c.index_ram.bytes_per_slot,
            c.index_ram.bytes_per_cached_4k
        );
    }
    if let Some(b) = &r.histogram {
        let _ = writeln!(s, "\nlatency histogram (all cores): {:>12} {:>12} {:>10}", "<= us", "count", "cum %");
        for x in b {
            let _ = writeln!(s, "{:>43.3} {:>12} {:>10.3}", x.le_us, x.count, x.cumulative_pct);
        }
    }
    s
}
