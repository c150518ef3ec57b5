//! The load generator proper: per reactor, `queue_depth` long-lived tasks, each looping
//! submit → await → record with the buffer that came back with the completion.
//!
//! Hot-path rules: nothing is shared between cores while a job runs except one padded
//! progress counter per reactor (written by its reactor only, read once a second by the main
//! thread) and the read-only stop flag. Histograms, counters, offset cursors and budgets are
//! reactor-local (`Cell`/`RefCell` in an `Rc`), merged after the run. No allocation per I/O:
//! the `IoBuf` travels with the request and comes back with the completion; the channel
//! future is a plain enum.
//!
//! Timestamps: `Instant::now()` (vDSO `clock_gettime(CLOCK_MONOTONIC)`, ~20 ns on a TSC
//! clocksource). The completion timestamp of one I/O is the submit timestamp of the task's
//! next one (one clock read per I/O), except after a flush or a yield, where it is re-read.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::Write;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tiercache_engine::bdev::{Bdev, BdevDesc, IoChannel};
use tiercache_engine::reactor::{self, ReactorSet};
use tiercache_engine::{Errno, IoBuf};

use crate::config::{JobConfig, Limit, VerifyPass, Workload};
use crate::pattern::{self, Mismatch};
use crate::rng::{mix, Rng};
use crate::zipf::ZipfOffsets;

/// Mismatch details kept per reactor (all are counted; beyond this only counted).
pub const MAX_MISMATCH_DETAILS: usize = 4096;
/// I/O error details kept per reactor.
pub const MAX_ERROR_DETAILS: usize = 64;
/// Highest latency the histograms track (1 hour, in ns); larger values are clamped.
const HIST_MAX_NS: u64 = 3_600_000_000_000;

/// A latency histogram in nanoseconds, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("static histogram bounds are valid")
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Read,
    Write,
    Flush,
}

/// One failed I/O.
#[derive(Clone, Debug, Serialize)]
pub struct IoError {
    pub reactor: usize,
    pub op: OpKind,
    pub offset: u64,
    pub len: u64,
    pub errno: i32,
    pub error: String,
}

/// Plain counters of one reactor.
#[derive(Copy, Clone, Debug, Default)]
pub struct Counts {
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    pub errors: u64,
    pub flushes: u64,
    pub flush_ns_total: u64,
    pub flush_ns_max: u64,
    pub blocks_checked: u64,
    pub mismatches: u64,
}

/// What one reactor did.
pub struct ReactorResult {
    pub index: usize,
    pub core: Option<usize>,
    pub elapsed: Duration,
    pub counts: Counts,
    pub hist: Histogram<u64>,
    pub mismatches: Vec<Mismatch>,
    pub errors: Vec<IoError>,
    /// The reactor's io_uring counters over the job (evidence for batching questions).
    pub ring: RingDelta,
}

/// Change of a reactor's io_uring counters during the job.
#[derive(Copy, Clone, Debug, Default, Serialize)]
pub struct RingDelta {
    /// SQEs pushed.
    pub submitted: u64,
    /// CQEs reaped.
    pub completed: u64,
    /// `io_uring_enter` calls (submissions and waits).
    pub enter_calls: u64,
    /// Times an operation waited for a free ring slot.
    pub backpressure_waits: u64,
}

impl RingDelta {
    fn between(a: &reactor::UringStats, b: &reactor::UringStats) -> RingDelta {
        RingDelta {
            submitted: b.submitted - a.submitted,
            completed: b.completed - a.completed,
            enter_calls: b.enter_calls - a.enter_calls,
            backpressure_waits: b.backpressure_waits - a.backpressure_waits,
        }
    }
}

/// A cache line of its own for each reactor's progress counter.
#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

struct Shared {
    cfg: JobConfig,
    desc: BdevDesc,
    block_size: u64,
    /// I/O-sized slots on the device.
    num_slots: u64,
    reactors: usize,
    stop: Arc<AtomicBool>,
    progress: Vec<Padded>,
    zipf: Option<ZipfOffsets>,
    trace: Option<crate::trace::TraceCursor>,
}

struct ReactorCtx {
    shared: Arc<Shared>,
    index: usize,
    chan: Rc<IoChannel>,
    deadline: Option<Instant>,
    budget: Cell<u64>,
    seq_lo: u64,
    seq_len: u64,
    seq_next: Cell<u64>,
    hist: RefCell<Histogram<u64>>,
    counts: Cell<Counts>,
    writes_since_flush: Cell<u64>,
    mismatches: RefCell<Vec<Mismatch>>,
    errors: RefCell<Vec<IoError>>,
}

/// [lo, hi) of part `i` of `n` equal parts of `total`.
fn split(total: u64, n: u64, i: u64) -> (u64, u64) {
    let lo = (total as u128 * i as u128 / n as u128) as u64;
    let hi = (total as u128 * (i + 1) as u128 / n as u128) as u64;
    (lo, hi)
}

/// Await `fut`, also telling whether it ever returned Pending (a synchronous completion,
/// e.g. a null bdev, must be followed by a yield so every queue slot and the reactor's own
/// loop keep running).
async fn tracked<F: Future>(fut: F) -> (F::Output, bool) {
    let mut fut = std::pin::pin!(fut);
    let mut pended = false;
    let out = std::future::poll_fn(|cx| {
        let p = fut.as_mut().poll(cx);
        if p.is_pending() {
            pended = true;
        }
        p
    })
    .await;
    (out, pended)
}

impl ReactorCtx {
    #[inline]
    fn keep_going(&self, now: Instant) -> bool {
        !self.shared.stop.load(Ordering::Relaxed) && self.deadline.is_none_or(|d| now < d)
    }

    /// Take up to `want` I/Os from this reactor's budget.
    #[inline]
    fn claim(&self, want: u64) -> u64 {
        let b = self.budget.get();
        let got = b.min(want);
        self.budget.set(b - got);
        got
    }

    #[inline]
    fn next_seq_slot(&self) -> u64 {
        let n = self.seq_next.get();
        self.seq_next.set(if n + 1 >= self.seq_len { 0 } else { n + 1 });
        self.seq_lo + n
    }

    #[inline]
    fn random_slot(&self, rng: &mut Rng) -> u64 {
        if let Some(t) = &self.shared.trace {
            return t.next_slot();
        }
        match &self.shared.zipf {
            Some(z) => z.next_slot(rng),
            None => rng.below(self.shared.num_slots),
        }
    }

    #[inline]
    fn record(&self, kind: OpKind, offset: u64, len: u64, status: Result<(), Errno>, latency: Duration) {
        let ns = (latency.as_nanos() as u64).clamp(1, HIST_MAX_NS);
        self.hist.borrow_mut().record(ns).ok();
        let mut c = self.counts.get();
        match kind {
            OpKind::Read => c.reads += 1,
            OpKind::Write => c.writes += 1,
            OpKind::Flush => {}
        }
        match status {
            Ok(()) => c.bytes += len,
            Err(e) => {
                c.errors += 1;
                self.note_error(kind, offset, len, e);
            }
        }
        self.counts.set(c);
        self.shared.progress[self.index].0.store(c.reads + c.writes, Ordering::Relaxed);
    }

    #[cold]
    fn note_error(&self, op: OpKind, offset: u64, len: u64, e: Errno) {
        let mut errs = self.errors.borrow_mut();
        if errs.len() < MAX_ERROR_DETAILS {
            errs.push(IoError { reactor: self.index, op, offset, len, errno: e.0, error: e.to_string() });
        }
    }

    #[cold]
    fn note_mismatch(&self, m: Mismatch) {
        let mut c = self.counts.get();
        c.mismatches += 1;
        self.counts.set(c);
        let mut v = self.mismatches.borrow_mut();
        if v.len() < MAX_MISMATCH_DETAILS {
            v.push(m);
        }
    }

    /// Count a write; flush when `--flush-every` writes accumulated on this reactor.
    async fn after_write(&self) -> bool {
        let Some(every) = self.shared.cfg.flush_every else { return false };
        let n = self.writes_since_flush.get() + 1;
        if n < every {
            self.writes_since_flush.set(n);
            return false;
        }
        self.writes_since_flush.set(0);
        let t0 = Instant::now();
        let c = self.chan.flush().await;
        let ns = t0.elapsed().as_nanos() as u64;
        let mut k = self.counts.get();
        k.flushes += 1;
        k.flush_ns_total += ns;
        k.flush_ns_max = k.flush_ns_max.max(ns);
        if let Err(e) = c.status {
            k.errors += 1;
            self.note_error(OpKind::Flush, 0, 0, e);
        }
        self.counts.set(k);
        true
    }
}

/// Fill a buffer with seeded noise (write payload of the non-verify workloads).
fn fill_noise(buf: &mut [u8], rng: &mut Rng) {
    for w in buf.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
}

/// A queue slot of the read/write/rand* workloads.
async fn io_task(ctx: Rc<ReactorCtx>, task: u64) {
    let cfg = &ctx.shared.cfg;
    let io_size = cfg.io_size;
    let mut rng = Rng::new(mix(&[cfg.seed, ctx.index as u64, task]));
    let mut buf = IoBuf::new(io_size as usize);
    fill_noise(&mut buf, &mut rng);
    let read_threshold = cfg.read_pct as u64;
    let mut t0 = Instant::now();
    while ctx.keep_going(t0) && ctx.claim(1) == 1 {
        let (kind, slot) = match cfg.workload {
            Workload::Read => (OpKind::Read, ctx.next_seq_slot()),
            Workload::Write => (OpKind::Write, ctx.next_seq_slot()),
            Workload::Randread => (OpKind::Read, ctx.random_slot(&mut rng)),
            Workload::Randwrite | Workload::Verify => (OpKind::Write, ctx.random_slot(&mut rng)),
            Workload::Randrw => {
                let kind = if rng.below(100) < read_threshold { OpKind::Read } else { OpKind::Write };
                (kind, ctx.random_slot(&mut rng))
            }
        };
        let offset = slot * io_size;
        let io = if kind == OpKind::Read { ctx.chan.read(offset, buf) } else { ctx.chan.write(offset, buf, false) };
        let (c, pended) = tracked(io).await;
        let t1 = Instant::now();
        buf = c.buf.unwrap_or_else(|| IoBuf::new(io_size as usize));
        ctx.record(kind, offset, io_size, c.status, t1 - t0);
        t0 = t1;
        if kind == OpKind::Write && ctx.after_write().await {
            t0 = Instant::now();
        }
        if !pended {
            reactor::yield_now().await;
            t0 = Instant::now();
        }
    }
}

/// A queue slot of the verify workload: walks its own region (disjoint from every other
/// slot's, so no two writers race on a block), writing self-describing blocks and reading
/// them back. `seq` counts wraps around the region (stale data shows as an older seq).
async fn verify_task(ctx: Rc<ReactorCtx>, task: u64, quota: Option<u64>) {
    let sh = &ctx.shared;
    let cfg = &sh.cfg;
    let io_size = cfg.io_size;
    let bs = sh.block_size as usize;
    let slots_total = sh.reactors as u64 * cfg.queue_depth as u64;
    let (lo, hi) = split(sh.num_slots, slots_total, ctx.index as u64 * cfg.queue_depth as u64 + task);
    let pass = cfg.verify_pass;
    let per_slot = if pass == VerifyPass::Both { 2 } else { 1 };
    let mut wbuf = IoBuf::new(io_size as usize);
    let mut rbuf = IoBuf::new(io_size as usize);
    let (mut slot, mut seq) = (lo, 0u64);
    let mut t0 = Instant::now();
    let mut quota = quota;
    while ctx.keep_going(t0) {
        if let Some(left) = quota.as_mut() {
            if *left == 0 {
                break;
            }
            *left -= 1;
        }
        let got = ctx.claim(per_slot);
        if got == 0 {
            break;
        }
        let offset = slot * io_size;
        let lba = offset / sh.block_size;
        pattern::fill(&mut wbuf, bs, lba, cfg.seed, seq);
        let mut any_pended = false;
        let mut write_ok = true;
        if pass != VerifyPass::Read {
            let (c, pended) = tracked(ctx.chan.write(offset, wbuf, false)).await;
            let t1 = Instant::now();
            any_pended |= pended;
            wbuf = match c.buf {
                Some(b) => b,
                None => {
                    let mut b = IoBuf::new(io_size as usize);
                    pattern::fill(&mut b, bs, lba, cfg.seed, seq);
                    b
                }
            };
            write_ok = c.status.is_ok();
            ctx.record(OpKind::Write, offset, io_size, c.status, t1 - t0);
            t0 = t1;
            if ctx.after_write().await {
                t0 = Instant::now();
            }
        }
        let do_read = match pass {
            VerifyPass::Both => got == 2 && write_ok,
            VerifyPass::Read => true,
            VerifyPass::Write => false,
        };
        if do_read {
            let (c, pended) = tracked(ctx.chan.read(offset, rbuf)).await;
            let t1 = Instant::now();
            any_pended |= pended;
            rbuf = c.buf.unwrap_or_else(|| IoBuf::new(io_size as usize));
            let ok = c.status.is_ok();
            ctx.record(OpKind::Read, offset, io_size, c.status, t1 - t0);
            if ok {
                let n = pattern::check(&wbuf, &rbuf, bs, lba, |m| ctx.note_mismatch(m));
                let mut k = ctx.counts.get();
                k.blocks_checked += n;
                ctx.counts.set(k);
            }
        }
        slot += 1;
        if slot >= hi {
            slot = lo;
            if pass == VerifyPass::Both {
                seq += 1;
            }
        }
        if !any_pended {
            reactor::yield_now().await;
        }
        // The pattern fill and the check are not part of any I/O's latency.
        t0 = Instant::now();
    }
}

async fn reactor_job(
    shared: Arc<Shared>,
    index: usize,
    core: Option<usize>,
    budget: u64,
) -> Result<ReactorResult, String> {
    let chan = shared
        .desc
        .channel()
        .map_err(|e| format!("reactor {index}: cannot open a channel to {}: {e}", shared.desc.name()))?;
    let (seq_lo, seq_hi) = split(shared.num_slots, shared.reactors as u64, index as u64);
    let q = shared.cfg.queue_depth as u64;
    let ring0 = reactor::uring_stats().unwrap_or_default();
    let start = Instant::now();
    let deadline = match shared.cfg.limit {
        Limit::Time(d) => Some(start + d),
        Limit::Count(_) => None,
    };
    let ctx = Rc::new(ReactorCtx {
        shared: shared.clone(),
        index,
        chan,
        deadline,
        budget: Cell::new(budget),
        seq_lo,
        seq_len: seq_hi - seq_lo,
        seq_next: Cell::new(0),
        hist: RefCell::new(new_histogram()),
        counts: Cell::new(Counts::default()),
        writes_since_flush: Cell::new(0),
        mismatches: RefCell::new(Vec::new()),
        errors: RefCell::new(Vec::new()),
    });
    let mut joins = Vec::with_capacity(q as usize);
    for t in 0..q {
        let c = ctx.clone();
        joins.push(if shared.cfg.workload == Workload::Verify {
            // A split pass (write now, read later, e.g. across a reload) must read exactly
            // the blocks the write pass wrote: each slot gets a fixed share of the budget
            // instead of claiming from the shared one, whose split between slots depends
            // on timing (a read pass could walk further than its write pass did and find
            // older data: the flaky `cached_verify_run_finds_no_mismatch_and_survives_a_
            // reload`, 11 in 40 runs under CPU load).
            let quota = (shared.cfg.verify_pass != VerifyPass::Both && budget != u64::MAX).then(|| {
                let (lo, hi) = split(budget, q, t);
                hi - lo
            });
            reactor::spawn(verify_task(c, t, quota))
        } else {
            reactor::spawn(io_task(c, t))
        });
    }
    for j in joins {
        j.await;
    }
    let elapsed = start.elapsed();
    let ring = RingDelta::between(&ring0, &reactor::uring_stats().unwrap_or_default());
    shared.desc.close_channel();
    let ctx = Rc::try_unwrap(ctx).map_err(|_| format!("reactor {index}: a queue slot outlived the job"))?;
    Ok(ReactorResult {
        index,
        core,
        elapsed,
        counts: ctx.counts.get(),
        hist: ctx.hist.into_inner(),
        mismatches: ctx.mismatches.into_inner(),
        errors: ctx.errors.into_inner(),
        ring,
    })
}

/// The raw outcome of a job: one result per reactor.
pub struct JobOutcome {
    pub reactors: Vec<ReactorResult>,
    pub wall: Duration,
}

/// Check the job against the target's geometry; returns the number of I/O slots.
pub fn check_geometry(cfg: &JobConfig, bdev: &dyn Bdev, reactors: usize) -> Result<u64, String> {
    let info = bdev.info();
    let bs = info.block_size as u64;
    if bs == 0 || !cfg.io_size.is_multiple_of(bs) {
        return Err(format!("io size {} is not a multiple of the target's block size {bs}", cfg.io_size));
    }
    if cfg.io_size > info.max_io_bytes {
        return Err(format!("io size {} exceeds the target's largest I/O ({} bytes)", cfg.io_size, info.max_io_bytes));
    }
    if (bs as usize) < pattern::HEADER_LEN {
        return Err(format!("block size {bs} too small"));
    }
    let num_slots = info.size_bytes() / cfg.io_size;
    let need = match cfg.workload {
        Workload::Verify => reactors as u64 * cfg.queue_depth as u64,
        Workload::Read | Workload::Write => reactors as u64,
        _ => 1,
    };
    if num_slots < need {
        return Err(format!(
            "target too small: {} bytes hold {num_slots} I/Os of {} bytes, the {} workload needs at least {need} ({})",
            info.size_bytes(),
            cfg.io_size,
            cfg.workload.name(),
            if cfg.workload == Workload::Verify { "one region per queue slot" } else { "one region per core" }
        ));
    }
    if let Some(max) = cfg.trace.as_ref().and_then(|t| t.iter().copied().max()) {
        if max >= num_slots {
            return Err(format!(
                "the trace names I/O slot {max}, but the target holds {num_slots} I/Os of {} bytes",
                cfg.io_size
            ));
        }
    }
    Ok(num_slots)
}

/// Run a job on every reactor of `set` against `bdev`. `cores[i]` labels reactor `i`.
/// With `progress`, one line per second is written to it while the job runs. Setting
/// `stop` ends the job early (Ctrl-C).
pub fn run_job(
    set: &ReactorSet,
    bdev: Arc<dyn Bdev>,
    cores: &[Option<usize>],
    cfg: &JobConfig,
    mut progress: Option<&mut dyn Write>,
    stop: Arc<AtomicBool>,
) -> Result<JobOutcome, String> {
    // One job per entry of `cores`; reactors past them (a migration reactor) run none.
    let n = cores.len().min(set.len());
    debug_assert!(n > 0, "a job needs at least one reactor");
    let num_slots = check_geometry(cfg, bdev.as_ref(), n)?;
    let zipf = match cfg.zipf_theta {
        Some(theta) if cfg.workload.is_random() => Some(ZipfOffsets::new(num_slots, theta)?),
        _ => None,
    };
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        desc: BdevDesc::new(bdev.clone()),
        block_size: bdev.info().block_size as u64,
        num_slots,
        reactors: n,
        stop,
        progress: (0..n).map(|_| Padded::default()).collect(),
        zipf,
        trace: cfg.trace.as_ref().map(|t| crate::trace::TraceCursor::new(t.as_ref().clone())),
    });
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<Result<ReactorResult, String>, reactor::Canceled>)>();
    let started = Instant::now();
    let mut drivers = Vec::with_capacity(n);
    for r in 0..n {
        let budget = match cfg.limit {
            Limit::Count(total) => total / n as u64 + u64::from((r as u64) < total % n as u64),
            Limit::Time(_) => u64::MAX,
        };
        let core = cores.get(r).copied().flatten();
        let sh = shared.clone();
        let fut = set.run_on(r, move || reactor_job(sh, r, core, budget));
        let tx = tx.clone();
        drivers.push(
            std::thread::Builder::new()
                .name(format!("perf-wait{r}"))
                .spawn(move || {
                    let _ = tx.send((r, futures::executor::block_on(fut)));
                })
                .map_err(|e| format!("cannot start a waiter thread: {e}"))?,
        );
    }
    drop(tx);
    let mut results: Vec<Option<ReactorResult>> = (0..n).map(|_| None).collect();
    let mut first_err = None;
    let mut received = 0;
    let tick = Duration::from_secs(1);
    let mut next_tick = started + tick;
    let mut last = (started, vec![0u64; n]);
    while received < n {
        let wait = next_tick.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok((r, res)) => {
                received += 1;
                match res {
                    Ok(Ok(rr)) => results[r] = Some(rr),
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                        shared.stop.store(true, Ordering::Relaxed);
                    }
                    Err(_) => {
                        first_err.get_or_insert(format!("reactor {r} stopped before the job finished"));
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                next_tick += tick;
                if let Some(out) = progress.as_deref_mut() {
                    let cur: Vec<u64> = shared.progress.iter().map(|p| p.0.load(Ordering::Relaxed)).collect();
                    let dt = now.duration_since(last.0).as_secs_f64().max(1e-9);
                    let rates: Vec<f64> = cur.iter().zip(&last.1).map(|(c, p)| (c - p) as f64 / dt).collect();
                    let total: f64 = rates.iter().sum();
                    let per: Vec<String> = rates
                        .iter()
                        .enumerate()
                        .map(|(i, r)| format!("{}: {:.0}", core_label(cores.get(i).copied().flatten(), i), r))
                        .collect();
                    let _ = writeln!(
                        out,
                        "[{:>6.1} s] {:>10.0} IOPS {:>9.2} MiB/s  ({})",
                        now.duration_since(started).as_secs_f64(),
                        total,
                        total * cfg.io_size as f64 / (1024.0 * 1024.0),
                        per.join(", ")
                    );
                    let _ = out.flush();
                    last = (now, cur);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let wall = started.elapsed();
    for d in drivers {
        let _ = d.join();
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let reactors: Vec<ReactorResult> = results.into_iter().flatten().collect();
    if reactors.len() != n {
        return Err("a reactor did not report its results".into());
    }
    Ok(JobOutcome { reactors, wall })
}

/// "core 3" for a pinned reactor, "reactor 0" for an unpinned one.
pub fn core_label(core: Option<usize>, index: usize) -> String {
    match core {
        Some(c) => format!("core {c}"),
        None => format!("reactor {index}"),
    }
}
