//! Writeback, on a dedicated migration thread per cache set (which also runs reclaim:
//! `reclaim.rs`).
//!
//! The log is drained strictly in seq order (docs/cache-engine.md): the oldest sealed,
//! written segment has its live dirty blocks copied to their backing devices (sorted by
//! LBA, adjacent blocks merged), the backing devices are flushed, the blocks are marked
//! clean, `writeback_seq` is persisted in the superblock, and only then is the segment
//! reclaimed (two QSBR grace periods) and put back on the free queue.
//!
//! The thread only decides and waits; every I/O runs on the set's migration reactor
//! (`ReactorSet::block_on`), through the same channels as foreground I/O. Whatever way the
//! thread exits (stop, error), it drops everything it holds — its `Arc<CacheSet>` and the
//! index's reclaimer — so retiring a set always completes (seed 001).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures::future::join_all;
use futures::StreamExt;

use super::index::{DirtySlot, Reclaimer, SegmentId};
use super::rate::{self, Decision, Inputs, RateController, RateKnobs};
use super::set::{CacheSet, IoRange};
use crate::dma::IoBuf;
use crate::errno::Errno;

/// Wakes the migration thread.
#[derive(Default)]
pub(crate) struct Kick {
    pending: Mutex<bool>,
    cv: Condvar,
}

impl Kick {
    pub(crate) fn kick(&self) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *p = true;
        self.cv.notify_one();
    }

    fn wait(&self, timeout: Duration) {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (mut p, _) = self.cv.wait_timeout_while(p, timeout, |p| !*p).unwrap_or_else(|e| e.into_inner());
        *p = false;
    }
}

/// What the tail guard allows writeback right now.
#[derive(Copy, Clone, Debug)]
pub(crate) struct WritebackPacing {
    /// Runs in flight.
    pub window: usize,
    /// Pause before starting the next run.
    pub pace: Duration,
    /// The foreground is reading (writeback runs are kept small).
    pub fg_reads: bool,
}

/// Blocks per merged backing write.
const MAX_RUN_BLOCKS: usize = 256;
/// Blocks per merged backing write while foreground reads run (and no writer waits for
/// space): a 4 KiB read queued behind a 1 MiB writeback I/O waits ~8x longer than behind
/// a 128 KiB one.
const FG_RUN_BLOCKS: usize = 8;
/// Most bytes of cache-device segments read ahead per writeback pass (see `Prefetch`).
const PREFETCH_MAX_BYTES: usize = 16 << 20;
/// A segment is read ahead whole (from its first to its last dirty slot) when at least
/// one slot in this many of that stretch is to be written back.
const PREFETCH_MIN_DENSITY: usize = 4;

impl CacheSet {
    /// Free segments below which writeback starts.
    fn low_watermark(&self) -> usize {
        let pct = self.options().writeback_free_low_percent.clamp(1, 90) as usize;
        let n = self.nr_segments() as usize;
        (n * pct / 100).max(self.reactors.len() + 2).min(n.saturating_sub(1))
    }

    pub(crate) fn kick_migration(&self) {
        self.kick.kick();
    }

    pub(crate) fn kick_migration_if_low(&self) {
        if self.free.len() < self.low_watermark() {
            self.kick.kick();
        }
    }

    /// Start the migration thread (once).
    pub(crate) fn start_migration(self: &Arc<Self>) {
        let mut slot = self.migration_thread.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return;
        }
        let set = self.clone();
        let name = format!("migrate-{}", self.name);
        match std::thread::Builder::new().name(name).spawn(move || migration_main(set)) {
            Ok(h) => *slot = Some(h),
            Err(e) => log::error!("cache set {}: cannot start the migration thread: {e}", self.name),
        }
    }

    /// Stop the migration thread and wait for it; it releases everything it holds.
    pub fn stop_migration(&self) {
        self.stopping.store(true, Ordering::Release);
        self.kick.kick();
        let h = self.migration_thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = h {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }

    /// Ask for every dirty block to be written back (flush / detach).
    pub fn request_drain(&self) {
        self.drain_requested.store(true, Ordering::Release);
        self.kick.kick();
    }

    /// How writeback may run now (one tail-guard tick): with writers waiting for space,
    /// full window and no pacing whatever the foreground; else what the guard allows — while
    /// a drain was asked for, a window of at least 4 and no pause between runs, so a flush
    /// or detach under load finishes at a useful rate. Measured under a QD1 reader: with
    /// the guard's pauses (up to 20 ms per run) a drain moved 7-12 MiB/s at 1.13-1.22x the
    /// reader's idle p99; pauses capped at 1 ms, 28 MiB/s at 1.9-2.2x; none, 156-179 MiB/s
    /// at 2.3-2.6x.
    pub(crate) fn writeback_pacing(&self) -> WritebackPacing {
        let drain = self.drain_requested.load(Ordering::Acquire);
        let min = if drain { 4 } else { 1 };
        let wb_ios = self.wb_ios.load(Ordering::Relaxed);
        let mut g = self.tail_guard.lock().unwrap_or_else(|e| e.into_inner());
        let window = g.tick(&self.fg, wb_ios, std::time::Instant::now(), min);
        if self.wb_space_urgent.load(Ordering::Acquire) {
            return WritebackPacing { window: super::tail_guard::MAX_WINDOW, pace: Duration::ZERO, fg_reads: false };
        }
        let pace = if drain { Duration::ZERO } else { g.pace() };
        WritebackPacing { window, pace, fg_reads: g.reads_active() }
    }

    /// Live dirty blocks in the whole set.
    pub fn dirty_blocks(&self) -> u64 {
        (0..self.nr_segments())
            .filter_map(|s| self.index.segment_info(super::index::SegmentId(s)).ok())
            .map(|i| i.dirty as u64)
            .sum()
    }
}

fn migration_main(set: Arc<CacheSet>) {
    let reclaimer = set.reclaimer.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(mut reclaimer) = reclaimer else {
        log::error!("cache set {}: no reclaimer for the migration thread", set.name);
        return;
    };
    let mut ctl = RateController::default();
    let mut last_space_waits = set.counters.space_waits.load(Ordering::Relaxed);
    let mut decision = Decision::Idle;
    while !set.stopping.load(Ordering::Acquire) {
        if decision == Decision::Idle {
            set.kick.wait(Duration::from_millis(100));
        }
        set.check_offline_backings();
        if set.stopping.load(Ordering::Acquire) || set.is_failed() {
            break;
        }
        let drain = set.drain_requested.load(Ordering::Acquire);
        let waits = set.counters.space_waits.load(Ordering::Relaxed);
        let space_urgent = set.free.len() < set.low_watermark() || waits != last_space_waits;
        set.wb_space_urgent.store(space_urgent, Ordering::Release);
        let urgent = drain || space_urgent;
        last_space_waits = waits;
        let (fg_idle, fg_lat) =
            rate::summarize(&set.fg, set.created.elapsed().as_nanos() as u64, Duration::from_secs(1));
        let dirty_fraction = set.dirty_blocks() as f64 / set.index.nr_slots().max(1) as f64;
        let o = set.options();
        set.dirty_cutoff.store(
            o.dirty_write_cutoff_percent < 100 && dirty_fraction * 100.0 >= f64::from(o.dirty_write_cutoff_percent),
            Ordering::Release,
        );
        let knobs = RateKnobs {
            writeback_percent: o.writeback_percent,
            rate_min: o.writeback_rate_min as f64,
            rate_max: o.writeback_rate_max as f64,
        };
        decision =
            ctl.decide(&knobs, Inputs { dirty_fraction, urgent, foreground_idle: fg_idle, fg_latency_ns: fg_lat });
        *set.writeback_rate.lock().unwrap_or_else(|e| e.into_inner()) = decision;
        if decision == Decision::Idle {
            let _ = set.writeback_pacing(); // keeps the guard's baseline current
            continue;
        }
        // Foreground reads running and no baseline for their p99 (or an old one): pause
        // for a few guard intervals so the guard can measure it without writeback.
        if !fg_idle && !space_urgent {
            let probe = set.tail_guard.lock().unwrap_or_else(|e| e.into_inner()).wants_probe(std::time::Instant::now());
            if probe {
                let until = std::time::Instant::now() + super::tail_guard::TailGuard::probe_pause();
                while std::time::Instant::now() < until && !set.stopping.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(5));
                    let _ = set.writeback_pacing();
                }
                continue;
            }
        }
        let before = set.counters.writeback_blocks.load(Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        match step(&set, &mut reclaimer, drain) {
            Ok(true) => {}
            Ok(false) => {
                if drain && set.dirty_blocks() == 0 {
                    set.drain_requested.store(false, Ordering::Release);
                }
                decision = Decision::Idle;
                continue;
            }
            Err(e) => {
                log::warn!("cache set {}: writeback step failed: {e}; retrying", set.name);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        // Throttle to the decided rate (never below what urgency needs).
        if let Decision::Rate(r) = decision {
            let written = set.counters.writeback_blocks.load(Ordering::Relaxed) - before;
            let due = Duration::from_secs_f64(written as f64 / r.max(1.0));
            let spent = t0.elapsed();
            if due > spent {
                // Wake early if writers start waiting for space.
                set.kick.wait((due - spent).min(Duration::from_secs(1)));
            }
        }
    }
    // Give the reclaimer back so a restarted thread can use it; drop our Arc.
    *set.reclaimer.lock().unwrap_or_else(|e| e.into_inner()) = Some(reclaimer);
}

/// Segments written back per durability round. Each round costs the devices four flushes
/// (cache before, backing after, the durability round, the superblock), which a
/// foreground reader's tail pays for: with 4-segment rounds under the rate controller a
/// QD1 reader's p99 was 3.3x its idle value, with 16 it was (docs/benchmarks.md).
const BATCH_SEGMENTS: usize = 16;
/// Segments per round while draining (flush, detach, mode switch): fewer durability rounds
/// and superblock writes, more runs in flight.
const DRAIN_BATCH_SEGMENTS: usize = 32;

/// One unit of migration work: reclaim written-back segments when log space is needed,
/// otherwise write back a batch of the oldest segments. Ok(true): progress; Ok(false):
/// nothing to do now.
///
/// Order matters for crash safety:
/// 1. copy each segment's live dirty blocks to the backing devices, flush them, mark clean;
/// 2. make every version in the log durable (seal everywhere, wait, flush the cache
///    device): a dirty version that is *superseded* was not written back, so the version
///    that superseded it must be durable before the old one may be declared clean;
/// 3. persist `writeback_seq` (replay takes the batch as clean from now on);
/// 4. later, only under space pressure: persist `reclaim_seq`, then reclaim the segments
///    (two grace periods) and queue them as free. Until then their clean data stays cached,
///    across restarts too.
fn step(set: &Arc<CacheSet>, reclaimer: &mut Reclaimer, drain: bool) -> Result<bool, Errno> {
    // Space first: reclaiming written-back segments needs no data I/O.
    if set.free.len() < set.low_watermark() && super::reclaim::reclaim(set, reclaimer)? {
        return Ok(true);
    }
    // Under space pressure, big rounds too: small segments (FLUSH-heavy loads seal them
    // early) would otherwise cost a durability round and a superblock write per few blocks.
    let urgent = drain || set.free.len() < set.low_watermark();
    write_back_batch(set, urgent)
}

/// Write back the oldest segments not yet written back (steps 1–3). Ok(false): nothing to
/// do now.
fn write_back_batch(set: &Arc<CacheSet>, drain: bool) -> Result<bool, Errno> {
    let wb = set.superblock().writeback_seq;
    let batch: Vec<(u64, SegmentId)> = {
        let sealed = set.sealed.lock().unwrap_or_else(|e| e.into_inner());
        sealed
            .range(wb + 1..)
            .take_while(|(_, s)| s.written)
            .take(if drain { DRAIN_BATCH_SEGMENTS } else { BATCH_SEGMENTS })
            .map(|(seq, s)| (*seq, s.seg))
            .collect()
    };
    if batch.is_empty() {
        let pending = set.sealed.lock().unwrap_or_else(|e| e.into_inner()).range(wb + 1..).next().is_some();
        if pending {
            // The oldest segment is still being written.
            std::thread::sleep(Duration::from_millis(1));
            return Ok(true);
        }
        if drain {
            seal_everywhere(set);
        }
        return Ok(false);
    }
    // 0. The batch must be durable on the cache device before any of it is written to a
    //    backing device: a backing write torn by a power cut is only harmless if the cache
    //    still holds the block's version after the cut (found by the crash harness: a
    //    segment written but not yet flushed was lost while its writeback tore the block).
    let s = set.clone();
    set.reactors
        .block_on(set.migration_reactor(), move || async move { s.flush_cache(&s.cache.channel()?).await })
        .map_err(|_| Errno::ESHUTDOWN)??;
    // 1. The whole batch in one pass: one LBA-sorted stream of runs, one flush per
    //    backing device at the end (not one per segment).
    let mut part = set.index.register();
    let mut dirty = Vec::new();
    for &(_, seg) in &batch {
        dirty.extend(set.index.dirty_slots(&part, seg).map_err(|_| Errno::EIO)?);
    }
    part.offline();
    let skips_before = set.wb_claim_skips.load(Ordering::Acquire);
    if !dirty.is_empty() {
        let written = write_back(set, dirty)?;
        part.online();
        for d in &written {
            set.index.mark_clean(&part, d.slot, d.gen);
        }
        part.offline();
        set.counters.writeback_blocks.fetch_add(written.len() as u64, Ordering::Relaxed);
    }
    drop(part);
    if set.wb_claim_skips.load(Ordering::Acquire) != skips_before {
        // A dirty block of the batch was skipped because a direct write held it. Its
        // segment must not be declared written back yet: the direct write's tombstone may
        // not exist (let alone be durable), and replay would take the old version for
        // clean — and reclaim could then drop the only copy of a FLUSHed write (crash
        // harness, mode switches: a block read back as version 0 after its version 1 was
        // FLUSHed). Retry the round once the direct write is done.
        std::thread::sleep(Duration::from_millis(1));
        return Ok(true);
    }
    let last = batch.last().map(|b| b.0).unwrap_or(0);
    // Everything up to `last` must be clean: an older segment still open on some reactor
    // would otherwise be taken for written back at replay.
    if set.index.clean_watermark().0 < last {
        seal_everywhere(set);
        std::thread::sleep(Duration::from_millis(1));
        return Ok(true);
    }
    // 2. + 3.
    let s = set.clone();
    set.reactors
        .block_on(set.migration_reactor(), move || async move {
            s.make_durable()
                .await
                .map_err(|e| super::set::CacheError::Io(e, "log flush before writeback_seq".into()))?;
            s.update_superblock(|sb| sb.writeback_seq = sb.writeback_seq.max(last)).await
        })
        .map_err(|_| Errno::ESHUTDOWN)?
        .map_err(|e| e.errno())?;
    Ok(true)
}

/// Ask every reactor to seal its open segment (so the oldest seq can move on).
fn seal_everywhere(set: &Arc<CacheSet>) {
    for r in 0..set.reactors.len() {
        let s = set.clone();
        let _ = set.reactors.block_on(r, move || async move {
            if let Some(l) = s.existing_local() {
                l.seal(false);
            }
        });
    }
}

/// Copy `dirty` blocks to their backing devices and flush those devices.
fn write_back(set: &Arc<CacheSet>, dirty: Vec<DirtySlot>) -> Result<Vec<DirtySlot>, Errno> {
    let s = set.clone();
    set.reactors
        .block_on(set.migration_reactor(), move || async move { write_back_blocks(&s, &dirty, true).await })
        .map_err(|_| Errno::ESHUTDOWN)?
}

/// Copy `dirty` blocks from the cache device to their backing devices (sorted by LBA,
/// adjacent blocks merged), then flush the devices written (when `flush`). Runs on a
/// reactor. Backing-device errors are counted against the device.
///
/// Returns the blocks that were written. A run that a direct write (writethrough,
/// writearound, bypass) is writing is skipped for now; a block that stopped being the live
/// version once its range was claimed is not written: the direct write that superseded it
/// owns the backing device's copy (seed 003).
pub(crate) async fn write_back_blocks(
    set: &Arc<CacheSet>,
    dirty: &[DirtySlot],
    flush: bool,
) -> Result<Vec<DirtySlot>, Errno> {
    let mut dirty = dirty.to_vec();
    dirty.sort_unstable_by_key(|d| (d.key.backing().0, d.key.lba().0));
    let dirty = &dirty[..];
    let cache_ch = set.cache.channel()?;
    let fg_reads = set.writeback_pacing().fg_reads;
    let max_run = if fg_reads { FG_RUN_BLOCKS } else { MAX_RUN_BLOCKS };
    // Random writes leave each segment's blocks scattered over the backing device: one
    // cache read per block would double the device I/Os of writeback. Read dense segments
    // whole instead — not while the foreground reads, whose tail a long read would hold
    // up (the tail guard's concern).
    let prefetch = if fg_reads { Prefetch::default() } else { Prefetch::start(set, &cache_ch, dirty) };
    let prefetch = &prefetch;
    // Runs of consecutive LBAs on the same backing device.
    let mut runs: Vec<&[DirtySlot]> = Vec::new();
    let mut start = 0;
    for i in 1..=dirty.len() {
        let split = i == dirty.len()
            || dirty[i].key.backing() != dirty[i - 1].key.backing()
            || dirty[i].key.lba().0 != dirty[i - 1].key.lba().0 + 1
            || dirty[i].zero != dirty[start].zero
            || i - start >= max_run;
        if split {
            runs.push(&dirty[start..i]);
            start = i;
        }
    }
    let mut touched = Vec::new();
    let mut written = Vec::new();
    // A sliding window of runs in flight: a slow write (an HDD-like device) holds back one
    // slot of the window, not a whole batch.
    let futs = runs.iter().map(|run| {
        let cache_ch = cache_ch.clone();
        async move {
            let first = run[0];
            let backing = set.backing(first.key.backing()).ok_or(Errno::ENODEV)?;
            let range = IoRange {
                backing: backing.idx.0,
                start: first.key.lba().0,
                end: first.key.lba().0 + run.len() as u64,
                writeback: true,
            };
            if !set.claim_writeback(range) {
                // A direct write owns these blocks right now: the round must not count
                // them as handled (see write_back_batch).
                set.wb_claim_skips.fetch_add(1, Ordering::AcqRel);
                return Ok(None);
            }
            let res = write_run(set, &cache_ch, &backing, run, prefetch).await;
            set.release_range(range);
            res.map(|w| Some((backing.idx.0, w)))
        }
    });
    // The window and the pace are the tail guard's: they change while the batch runs.
    let mut futs = futs.peekable();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut pacing = set.writeback_pacing();
    loop {
        debug_assert!((1..=super::tail_guard::MAX_WINDOW).contains(&pacing.window));
        while in_flight.len() < pacing.window {
            match futs.next() {
                Some(f) => in_flight.push(f),
                None => break,
            }
        }
        let Some(r) = in_flight.next().await else { break };
        let mut moved = 0;
        if let Some((idx, w)) = r? {
            moved = w.len();
            written.extend(w);
            if !touched.contains(&idx) {
                touched.push(idx);
            }
        }
        pacing = set.writeback_pacing();
        let pause = pacing.pace.max(rate_pause(set, &pacing, moved));
        if !pause.is_zero() {
            crate::reactor::sleep(pause).await;
        }
    }
    debug_assert!(futs.peek().is_none() && in_flight.is_empty());
    if flush {
        for idx in touched {
            if let Some(b) = set.backing(super::index::BackingIdx(idx)) {
                if let Err(e) = b.desc.channel()?.flush().await.status {
                    b.note_error(set, e);
                    return Err(e);
                }
            }
        }
    }
    Ok(written)
}

/// While the foreground reads, the rate controller's rate is kept run by run (a pause of
/// `moved / rate` after each completed run) instead of per batch: a whole batch sent at
/// the full window and then a sleep to make up the rate put every read issued during the
/// burst behind dozens of writeback I/Os (QD1 read p99 3.5x its idle value in the
/// benchmark of docs/benchmarks.md, with the tail guard's intervals spanning burst and
/// sleep alike). Without foreground reads nothing waits behind a burst: no pause.
fn rate_pause(set: &CacheSet, pacing: &WritebackPacing, moved: usize) -> Duration {
    if !pacing.fg_reads || moved == 0 {
        return Duration::ZERO;
    }
    match set.writeback_rate() {
        Decision::Rate(r) => Duration::from_secs_f64(moved as f64 / r.max(1.0)).min(MAX_RATE_PAUSE),
        Decision::Idle | Decision::Unlimited => Duration::ZERO,
    }
}

/// Longest pause `rate_pause` takes at once (a rate change is seen within it).
const MAX_RATE_PAUSE: Duration = Duration::from_millis(100);

/// Write one claimed run: only blocks that are still the live version and still dirty (a
/// block superseded, or marked clean by a direct write, after the dirty list was taken is
/// left to whoever superseded it).
async fn write_run(
    set: &Arc<CacheSet>,
    cache_ch: &std::rc::Rc<crate::bdev::IoChannel>,
    backing: &Arc<super::set::Backing>,
    run: &[DirtySlot],
    prefetch: &Prefetch,
) -> Result<Vec<DirtySlot>, Errno> {
    let bs = set.block_size() as usize;
    let log = set.local()?;
    debug_assert!(set.holds_claim(IoRange {
        backing: backing.idx.0,
        start: run[0].key.lba().0,
        end: run[0].key.lba().0 + run.len() as u64,
        writeback: true,
    }));
    // Invariant: a version is copied to the backing device only if, under this run's
    // claim, it is still the newest version of its block AND still dirty. A direct write
    // marks the version it supersedes clean while it holds its own claim, and ends the
    // claim before it places the tombstone / clean copy that supersedes it in the index
    // (`Inner::release_direct` in bdev.rs). In that window the old version is still the
    // newest in the index; checking only that would copy it over the direct write's newer
    // data on the backing device, and the tombstone would then send reads (and replay) to
    // the older data (crash harness, mode switches: "version 1 after recovery, but version
    // 2 was covered by a FLUSH (backing holds 1)").
    let live: Vec<DirtySlot> =
        run.iter().copied().filter(|d| log.lookup(d.key).is_some_and(|h| h.slot == d.slot && h.dirty)).collect();
    if live.is_empty() {
        return Ok(live);
    }
    let bch = backing.desc.channel()?;
    // Consecutive live blocks go out as one write.
    let mut i = 0;
    while i < live.len() {
        let mut j = i + 1;
        while j < live.len() && live[j].key.lba().0 == live[j - 1].key.lba().0 + 1 {
            j += 1;
        }
        let part = &live[i..j];
        let t0 = std::time::Instant::now();
        let off = backing.data_offset + part[0].key.lba().0 * bs as u64;
        let len = part.len() * bs;
        let res = if part[0].zero {
            bch.write_zeroes(off, len as u64).await.status
        } else {
            // Blocks written in order sit in consecutive slots of a segment: read each such
            // stretch with one I/O (unless read ahead already).
            let mut data = IoBuf::new(len);
            let mut spans: Vec<(usize, usize)> = Vec::new(); // (first index in part, count)
            for k in 0..part.len() {
                if prefetch.copy(set, part[k].slot, &mut data[k * bs..(k + 1) * bs]).await? {
                    continue;
                }
                match spans.last_mut() {
                    Some((first, n))
                        if k == *first + *n
                            && part[k].slot.0 == part[*first].slot.0 + *n as u32
                            && set.geom.slot_location(part[k].slot).0
                                == set.geom.slot_location(part[*first].slot).0 =>
                    {
                        *n += 1
                    }
                    _ => spans.push((k, 1)),
                }
            }
            set.wb_ios.fetch_add(spans.len() as u64 + 1, Ordering::Relaxed);
            let reads = spans
                .iter()
                .map(|&(first, n)| cache_ch.read(set.geom.slot_id_offset(part[first].slot), IoBuf::new(n * bs)));
            for (&(first, n), c) in spans.iter().zip(join_all(reads).await) {
                if let Err(e) = c.status {
                    set.note_cache_error(e, "writeback read");
                    return Err(e);
                }
                let b = c.buf.ok_or(Errno::EIO)?;
                data[first * bs..(first + n) * bs].copy_from_slice(&b[..n * bs]);
            }
            bch.write(off, data, false).await.status
        };
        match res {
            Ok(()) => backing.note_success(),
            Err(e) => {
                backing.note_error(set, e);
                return Err(e);
            }
        }
        if let Ok(mut l) = log.latency.try_borrow_mut() {
            l.record(super::log::IoPath::Writeback, t0.elapsed().as_micros() as u64);
        }
        i = j;
    }
    Ok(live)
}

/// Cache-device segments read ahead whole for one writeback pass: segment → (byte offset
/// of its first read slot on the cache device, the read). The reads run as tasks, all
/// started at once, and each run waits only for the segment it needs, so backing writes
/// start while later segments are still being read. (Sending the runs in segment order
/// instead of LBA order, so that the first writes need only the first reads, measured
/// slower: 27-29k vs 42-44k IOPS on the sustained randwrite load of docs/benchmarks.md,
/// a sparse backing file.) Slots of a segment in the batch cannot change while it is
/// written back: the segment is sealed, written and above `writeback_seq`, so it cannot be
/// reclaimed (let alone reused) before the pass ends.
#[derive(Default)]
struct Prefetch {
    segs: std::collections::HashMap<u32, (u64, SegmentRead)>,
    /// A failed read is counted against the cache device once, not once per block.
    error_noted: std::cell::Cell<bool>,
}

type SegmentRead = futures::future::Shared<crate::reactor::JoinHandle<std::rc::Rc<crate::bdev::IoCompletion>>>;

impl Prefetch {
    /// Start reading the dense, scattered segments of `dirty` (sorted by backing device and
    /// LBA; at most `PREFETCH_MAX_BYTES` in all). A segment written sequentially is left
    /// out: its blocks are consecutive in LBA and slot alike, so each run reads them with
    /// one I/O anyway, interleaved with its backing write (read ahead, a 1 GiB drain with
    /// the cache on a RAM device measured ~10% slower).
    fn start(set: &Arc<CacheSet>, cache_ch: &std::rc::Rc<crate::bdev::IoChannel>, dirty: &[DirtySlot]) -> Prefetch {
        let bs = set.block_size() as usize;
        // segment → (first slot index, last slot index, blocks with data, blocks that
        // continue the previous one in LBA and slot)
        let mut spans: std::collections::BTreeMap<u32, (u32, u32, usize, usize)> = std::collections::BTreeMap::new();
        let mut prev: Option<&DirtySlot> = None;
        for d in dirty.iter().filter(|d| !d.zero) {
            let (seg, i) = set.geom.slot_location(d.slot);
            let e = spans.entry(seg.0).or_insert((i, i, 0, 0));
            e.0 = e.0.min(i);
            e.1 = e.1.max(i);
            e.2 += 1;
            let continues = prev.is_some_and(|p| {
                p.key.backing() == d.key.backing() && p.key.lba().0 + 1 == d.key.lba().0 && p.slot.0 + 1 == d.slot.0
            });
            if continues {
                e.3 += 1;
            }
            prev = Some(d);
        }
        let mut budget = PREFETCH_MAX_BYTES;
        let mut segs = std::collections::HashMap::new();
        for (seg, (lo, hi, n, sequential)) in spans {
            let len = (hi - lo + 1) as usize * bs;
            if n < 2 || n * bs * PREFETCH_MIN_DENSITY < len || len > budget || sequential * 2 >= n {
                continue;
            }
            budget -= len;
            let off = set.geom.slot_offset(SegmentId(seg), lo);
            let read = cache_ch.read(off, IoBuf::new(len));
            let task = crate::reactor::spawn(async move { std::rc::Rc::new(read.await) });
            segs.insert(seg, (off, futures::FutureExt::shared(task)));
        }
        set.wb_ios.fetch_add(segs.len() as u64, Ordering::Relaxed);
        Prefetch { segs, error_noted: std::cell::Cell::new(false) }
    }

    /// Copy the read-ahead data of `slot` into `out`. Ok(false): its segment was not read
    /// ahead.
    async fn copy(&self, set: &Arc<CacheSet>, slot: super::index::SlotId, out: &mut [u8]) -> Result<bool, Errno> {
        let (seg, _) = set.geom.slot_location(slot);
        let Some((base, read)) = self.segs.get(&seg.0) else { return Ok(false) };
        let c = read.clone().await;
        if let Err(e) = c.status {
            if !self.error_noted.replace(true) {
                set.note_cache_error(e, "writeback read");
            }
            return Err(e);
        }
        let buf = c.buf.as_ref().ok_or(Errno::EIO)?;
        let off = set.geom.slot_id_offset(slot).checked_sub(*base).ok_or(Errno::EIO)? as usize;
        out.copy_from_slice(buf.get(off..off + out.len()).ok_or(Errno::EIO)?);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use crate::bdev::BdevDesc;
    use crate::cache::index::{BlockKey, Lba};
    use crate::cache::test_rig::{block, cached_on_sim, write, BS};
    use crate::cache::{CacheMode, CacheOptions};
    use crate::reactor::{ReactorConfig, ReactorSet};
    use crate::sim::SimDisk;
    use crate::IoBuf;

    fn read(rs: &ReactorSet, d: &BdevDesc, r: usize, lba: u64) -> Vec<u8> {
        let d = d.clone();
        rs.block_on(r, move || async move {
            let c = d.channel().unwrap().read(lba * BS as u64, IoBuf::new(BS)).await;
            c.status.unwrap();
            c.buf.unwrap().to_vec()
        })
        .unwrap()
    }

    /// The crash harness's mode-switch violations (a block read back older than a
    /// completed — and FLUSHed — direct write, live or after recovery), made deterministic.
    ///
    /// A direct write ends its backing claim before it places the record that supersedes
    /// the cached version (it may wait for log space there), having marked that version
    /// clean. Writeback that listed the version as dirty before then could claim the block
    /// in that window, find the version still the newest in the index and copy it over the
    /// direct write's data on the backing device; the tombstone / clean copy placed next
    /// then sends reads to — or leaves replay with — the older data. Here the window is held
    /// open by a writethrough whose clean copy waits for log space (the log is full and
    /// writeback stopped), and writeback runs in it with the dirty list it took before.
    #[test]
    fn writeback_never_copies_a_version_a_direct_write_superseded() {
        let rs = ReactorSet::start(ReactorConfig::unpinned(2)).unwrap();
        let opts = CacheOptions {
            segment_size: 128 << 10,
            seq_cutoff_bytes: 0,
            promote_after: 0,
            space_wait_limit: Duration::from_millis(300),
            ..CacheOptions::default()
        };
        let backing = SimDisk::new("b", 512, 64 << 11);
        let cb = cached_on_sim(&rs, "wbr", opts, BdevDesc::new(backing.clone()));
        let set = cb.cache_set().clone();
        set.stop_migration();
        let desc = BdevDesc::new(cb.clone());
        const X: u64 = 0;
        let key = BlockKey::new(cb.backing().idx, Lba(X)).unwrap();

        // Version 1 of X, dirty in a sealed segment that is on the cache device.
        write(&rs, &desc, 0, X, 1);
        let d = desc.clone();
        rs.block_on(0, move || async move { d.channel().unwrap().flush().await.status }).unwrap().unwrap();
        // What a writeback round would list before the direct write comes.
        let dirty = {
            let p = set.index.register();
            let h = set.index.lookup(&p, key).expect("X cached");
            assert!(h.dirty);
            set.index.dirty_slots(&p, h.segment).unwrap()
        };
        assert!(dirty.iter().any(|d| d.key == key));

        // Fill the log with dirty data (writeback is stopped) until writes bypass it.
        let mut lba = 1;
        while set.counters.full_bypasses.load(Ordering::Relaxed) == 0 {
            write(&rs, &desc, 0, lba, 1);
            lba += 1;
            assert!(lba < 4096, "the log never filled");
        }

        // Version 2 of X in writethrough, on reactor 0: the backing device gets it, the
        // claim ends, and the clean copy waits for log space.
        cb.set_mode(CacheMode::WriteThrough);
        let waits = set.counters.space_waits.load(Ordering::Relaxed);
        let done: Arc<Mutex<Option<Result<(), crate::Errno>>>> = Arc::new(Mutex::new(None));
        let (d, dn) = (desc.clone(), done.clone());
        rs.block_on(0, move || async move {
            crate::reactor::spawn_detached(async move {
                let c = d.channel().unwrap().write(X * BS as u64, IoBuf::from_slice(&block(X, 2)), false).await;
                *dn.lock().unwrap() = Some(c.status);
            });
        })
        .unwrap();
        let t = Instant::now();
        while set.counters.space_waits.load(Ordering::Relaxed) == waits {
            assert!(done.lock().unwrap().is_none(), "the writethrough did not wait for log space");
            assert!(t.elapsed() < Duration::from_secs(5), "the writethrough never waited for log space");
            std::thread::yield_now();
        }
        assert_eq!(backing.current_image()[(1 << 20) + X as usize * BS..][..BS], block(X, 2)[..]);

        // Writeback runs now, with the list it took before version 2.
        let s = set.clone();
        let written =
            rs.block_on(1, move || async move { super::write_back_blocks(&s, &dirty, true).await }).unwrap().unwrap();
        assert!(
            !written.iter().any(|d| d.key == key),
            "writeback copied version 1 of X over the direct write's version 2"
        );
        assert_eq!(
            backing.current_image()[(1 << 20) + X as usize * BS..][..BS],
            block(X, 2)[..],
            "the backing device lost the direct write's data to writeback"
        );

        // The write completes (its clean copy gives up waiting and a tombstone takes its
        // place) and reads return version 2.
        let t = Instant::now();
        let status = loop {
            if let Some(s) = *done.lock().unwrap() {
                break s;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "the writethrough never completed");
            std::thread::sleep(Duration::from_millis(1));
        };
        status.unwrap();
        assert_eq!(read(&rs, &desc, 1, X), block(X, 2), "a read after the write completed returned older data");

        drop(cb);
        rs.stop();
    }
}
