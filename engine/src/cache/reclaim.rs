//! Reclaim: written-back log segments leave the index and become free, oldest first, on
//! the migration thread (writeback, in `writeback.rs`, is what makes them reclaimable).
//!
//! **Second chance (copy-forward).** Eviction order is log order, which alone is a FIFO:
//! a block hit a thousand times is evicted as soon as one hit once. So a foreground read
//! hit sets the slot's *referenced* bit (`BlockIndex::mark_referenced`), and before a
//! segment is reclaimed its live, clean, referenced blocks are re-placed as CLEAN copies in
//! the migration reactor's open segment (fresh slots: the bit starts clear, so a block
//! has to be hit again to survive its next turn). That is CLOCK / second chance on top of
//! the log.
//!
//! Rules (docs/cache-engine.md, "Reclaim and second chance"):
//!
//! - **Data source.** A copy's data is read from the old slot on the cache device. The
//!   segment stays `Sealed` (its slots cannot be reused: reuse needs `begin_reclaim`, two
//!   grace periods and `release_segment`, all run by this thread afterwards) until every
//!   copy is installed or abandoned: `copy_forward` returns before `begin_reclaim`.
//! - **A concurrent foreground write always wins.** Each copy is installed under a
//!   promotion ticket that observed exactly the old slot's version, taken right before
//!   the install (`BlockIndex::copy_forward_ticket`): if any version of the block was
//!   installed since, the copy is dropped; a write that installs after it gets a higher
//!   version (a write finding a newer version re-seals into a higher-seq segment).
//! - **Crash safety.** Only segments with `seq <= writeback_seq` are reclaimed, so every
//!   live block in them is clean and the backing device holds its data, flushed. The copy
//!   is a CLEAN record in a newer segment: a cache of the backing device's data, replayed
//!   as clean, never written back. Losing it in a crash (it sits in a RAM buffer until
//!   its segment is written) loses a cached copy, never data; and `reclaim_seq` is
//!   persisted before the old segment is released, as without copy-forward.
//! - **Net progress.** At most three quarters of a segment's slots are copied forward
//!   (`COPY_FORWARD_MAX_PCT`), and copies
//!   never wait for log space (`ReactorLog::put_promoted`: with the open segment full and
//!   no free segment the copy is dropped), so reclaiming a segment frees at least a
//!   quarter of a segment and can never block on the space it is producing.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;

use super::index::{Reclaimer, Referenced, SegmentId, Seq};
use super::set::CacheSet;
use crate::dma::IoBuf;
use crate::errno::Errno;

/// Grace periods of the reclaimer never wait longer than this.
const GRACE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most of a segment's slots copied forward, in percent. Measured on the zipf θ=0.9 trace
/// of docs/benchmarks.md (cache 10% of the working set, seed 1): 50% → 60.1% hits (the cap
/// was hit: 14.4 copies per reclaimed segment), 75% → 61.7%, 90% → 63.1% (LRU 59.4%).
/// 75% keeps every reclaim freeing at least a quarter of a segment, so reclaim still
/// catches up quickly when writers wait for space.
const COPY_FORWARD_MAX_PCT: usize = 75;
/// Segments per reclaim round (one `reclaim_seq` superblock write).
const RECLAIM_BATCH_SEGMENTS: usize = 32;
/// Segments copied forward and then released together within a round.
const RELEASE_CHUNK_SEGMENTS: usize = 4;

/// Only when log space is needed: the oldest written-back segments leave the index and
/// become free, their referenced blocks copied forward first. `reclaim_seq` is persisted
/// first, so replay never reads a position that may have been reused. Until then their
/// clean data stays cached (and is replayed as clean after a restart). Ok(false): nothing
/// reclaimable.
pub(super) fn reclaim(set: &Arc<CacheSet>, reclaimer: &mut Reclaimer) -> Result<bool, Errno> {
    let wb = set.superblock().writeback_seq;
    let batch: Vec<(u64, SegmentId)> = {
        let sealed = set.sealed.lock().unwrap_or_else(|e| e.into_inner());
        sealed.range(..=wb).take(RECLAIM_BATCH_SEGMENTS).map(|(seq, s)| (*seq, s.seg)).collect()
    };
    let Some(&(last, _)) = batch.last() else { return Ok(false) };
    let s = set.clone();
    set.reactors
        .block_on(set.migration_reactor(), move || async move {
            s.update_superblock(|sb| sb.reclaim_seq = sb.reclaim_seq.max(last).min(sb.writeback_seq)).await
        })
        .map_err(|_| Errno::ESHUTDOWN)?
        .map_err(|e| e.errno())?;
    let persisted = Seq(wb);
    let max = set.index.slots_per_segment() as usize * COPY_FORWARD_MAX_PCT / 100;
    // Released in chunks: each chunk's copy-forwards can use the space the previous
    // chunks freed (copying a whole 32-segment batch forward before releasing any of it
    // dropped many more copies for want of space in a small log, docs/benchmarks.md's
    // hit-ratio runs), and a chunk costs two grace periods, not two per segment.
    let chunks = batch.chunks(RELEASE_CHUNK_SEGMENTS);
    let n = chunks.len();
    for (c, chunk) in chunks.enumerate() {
        reclaim_chunk(set, reclaimer, persisted, chunk, c + 1 == n, wb, max)?;
    }
    Ok(true)
}

/// Copy forward, then release, one chunk of a reclaim batch. `final_chunk`: nothing of the
/// batch comes after it (its last segment may drop copies for want of space).
fn reclaim_chunk(
    set: &Arc<CacheSet>,
    reclaimer: &mut Reclaimer,
    persisted: Seq,
    chunk: &[(u64, SegmentId)],
    final_chunk: bool,
    wb: u64,
    max: usize,
) -> Result<(), Errno> {
    // A segment whose copies found no log space at all (open segment full, no free
    // segment) is released after the rest of the chunk, which frees space for them. Every
    // segment of the batch is at or below the persisted reclaim_seq, so their order among
    // themselves does not matter to replay.
    let mut deferred = Vec::new();
    let mut ready = Vec::with_capacity(chunk.len());
    for (k, &(seq, seg)) in chunk.iter().enumerate() {
        // Copy-forward is only sound for written-back segments: their live blocks are
        // clean copies of what the backing device holds.
        debug_assert!(seq <= wb, "reclaiming segment {} (seq {seq}) above writeback_seq {wb}", seg.0);
        debug_assert!(set.index.segment_info(seg).is_ok_and(|i| i.seq.0 == seq && i.dirty == 0));
        // Second chance, while the segment is still sealed (its slots cannot be reused
        // until begin_reclaim): the copies are installed or dropped when this returns.
        // Only the batch's last segment, with nothing else left to free, drops copies
        // for want of space; the others wait for the rest of their chunk.
        let last = final_chunk && k + 1 == chunk.len() && deferred.is_empty() && ready.is_empty();
        let cf = copy_forward(set, seg, max, last);
        if cf.out_of_space && !last {
            deferred.push((seq, seg, max.saturating_sub(cf.copied)));
            continue;
        }
        ready.push((seq, seg));
    }
    release(set, reclaimer, persisted, &ready)?;
    if !deferred.is_empty() {
        let mut later = Vec::with_capacity(deferred.len());
        for (seq, seg, max) in deferred {
            copy_forward(set, seg, max, true);
            later.push((seq, seg));
        }
        release(set, reclaimer, persisted, &later)?;
    }
    Ok(())
}

/// Take written-back segments out of the index and queue them free. Each index step runs
/// batch-wide, so a batch costs two grace periods, not two per segment (with the
/// migration thread and a polling reactor sharing a core a grace period took ~2 ms: 32
/// segments released one by one spent ~150 ms, the writeback bottleneck with the log 100%
/// dirty).
fn release(
    set: &Arc<CacheSet>,
    reclaimer: &mut Reclaimer,
    persisted: Seq,
    segs: &[(u64, SegmentId)],
) -> Result<(), Errno> {
    let mut started = Vec::with_capacity(segs.len());
    for &(seq, seg) in segs {
        match set.index.begin_reclaim(reclaimer, seg, persisted) {
            Ok(t) => started.push((seq, seg, t)),
            Err(e) => {
                // The ones already begun are finished below; this one stays sealed.
                log::error!("cache set {}: begin_reclaim({}): {e}", set.name, seg.0);
                break;
            }
        }
    }
    let all_begun = started.len() == segs.len();
    // The first unlink waits for a grace period after the last begin_reclaim; the rest
    // find it elapsed.
    let mut unlinked = Vec::with_capacity(started.len());
    for (seq, seg, t) in started {
        match set.index.unlink_segment(reclaimer, t, GRACE_TIMEOUT) {
            Ok(u) => unlinked.push((seq, seg, u)),
            Err((_, e)) => {
                log::error!("cache set {}: unlink({}): {e}", set.name, seg.0);
                return Err(Errno::ETIMEDOUT);
            }
        }
    }
    // Likewise one grace period after the last unlink.
    for (seq, seg, u) in unlinked {
        let free = match set.index.release_segment(reclaimer, u, GRACE_TIMEOUT) {
            Ok(f) => f,
            Err((_, e)) => {
                log::error!("cache set {}: release({}): {e}", set.name, seg.0);
                return Err(Errno::ETIMEDOUT);
            }
        };
        set.sealed.lock().unwrap_or_else(|e| e.into_inner()).remove(&seq);
        if set.free.push(free).is_err() {
            log::error!("cache set {}: free queue overflow", set.name);
        }
        set.counters.segments_reclaimed.fetch_add(1, Ordering::Relaxed);
    }
    if all_begun {
        Ok(())
    } else {
        Err(Errno::EIO)
    }
}

/// What one copy-forward pass over a segment did.
#[derive(Default)]
struct CopyForward {
    copied: usize,
    /// Blocks left uncopied for want of log space.
    out_of_space: bool,
}

/// Copy the referenced live clean blocks of `seg` (at most `max`) into the migration
/// reactor's open segment. Returns when every copy is installed or given up; never fails
/// the reclaim (a copy given up is only a cached block less). Blocks left for want of
/// space are counted as dropped only when `last` (no later attempt).
fn copy_forward(set: &Arc<CacheSet>, seg: SegmentId, max: usize, last: bool) -> CopyForward {
    if max == 0 || set.is_failed() {
        return CopyForward::default();
    }
    let s = set.clone();
    let r = set
        .reactors
        .block_on(set.migration_reactor(), move || async move { copy_forward_on_reactor(&s, seg, max).await });
    match r {
        Ok(Ok((copied, stale, no_space))) => {
            set.counters.copy_forwards.fetch_add(copied as u64, Ordering::Relaxed);
            let dropped = stale + if last { no_space } else { 0 };
            set.counters.copy_forwards_dropped.fetch_add(dropped as u64, Ordering::Relaxed);
            CopyForward { copied, out_of_space: no_space > 0 }
        }
        Ok(Err(e)) => {
            log::debug!("cache set {}: copy-forward of segment {}: {e}", set.name, seg.0);
            CopyForward::default()
        }
        Err(_) => CopyForward::default(),
    }
}

/// Runs on the migration reactor. Ok((copied, given up as stale or unreadable, left for
/// want of log space)).
async fn copy_forward_on_reactor(
    set: &Arc<CacheSet>,
    seg: SegmentId,
    max: usize,
) -> Result<(usize, usize, usize), Errno> {
    let log = set.local()?;
    let cands: Vec<Referenced> =
        log.with_participant(|p| set.index.referenced_slots(p, seg, max)).map_err(|_| Errno::EIO)?;
    if cands.is_empty() {
        return Ok((0, 0, 0));
    }
    // A segment at or below writeback_seq was written long ago: no RAM buffer holds it.
    debug_assert_eq!(set.ram_owner[seg.0 as usize].load(Ordering::Acquire), 0);
    let bs = set.block_size() as usize;
    // One cache read per run of consecutive slots.
    let mut spans: Vec<(usize, usize)> = Vec::new(); // (first index in cands, count)
    for k in 0..cands.len() {
        match spans.last_mut() {
            Some((first, n)) if cands[k].slot.0 == cands[*first].slot.0 + *n as u32 => *n += 1,
            _ => spans.push((k, 1)),
        }
    }
    let reads = spans
        .iter()
        .map(|&(first, n)| log.cache_ch.read(set.geom.slot_id_offset(cands[first].slot), IoBuf::new(n * bs)));
    let mut data = vec![0u8; cands.len() * bs];
    for (&(first, n), c) in spans.iter().zip(join_all(reads).await) {
        if let Err(e) = c.status {
            set.note_cache_error(e, "copy-forward read");
            return Ok((0, cands.len(), 0));
        }
        let b = c.buf.ok_or(Errno::EIO)?;
        data[first * bs..(first + n) * bs].copy_from_slice(&b[..n * bs]);
    }
    let (mut copied, mut stale) = (0, 0);
    for (k, c) in cands.iter().enumerate() {
        // The ticket right before the install, in the same poll: nothing of this reactor
        // runs in between, and another reactor's write to the block either installed
        // first (no ticket, or the install sees it: ESTALE) or installs after, newer.
        let Some(ticket) = log.with_participant(|p| set.index.copy_forward_ticket(p, c)) else {
            stale += 1;
            continue;
        };
        match log.put_promoted(c.key, &data[k * bs..(k + 1) * bs], &ticket).await {
            Ok(_) => copied += 1,
            // No room and no free segment: copying on would eat the space being
            // reclaimed. Leave the rest.
            Err(Errno::ENOSPC) => return Ok((copied, stale, cands.len() - k)),
            Err(_) => stale += 1,
        }
    }
    Ok((copied, stale, 0))
}
