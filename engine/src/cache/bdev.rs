//! The cached bdev: one per backing device attached to a cache set. Its channel holds the
//! read and write paths (see docs/cache-engine.md).

use std::any::Any;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::failure::{BackingState, DRAIN_WAIT_LIMIT};
use super::index::{BlockKey, EntryKind, Hit, PromotionTicket};
use super::log::{IoPath, ReactorLog};
use super::ondisk::CacheMode;
use super::promote::StreamDetector;
use super::set::{Backing, CacheSet, IoRange};
use crate::bdev::{Bdev, BdevChannel, BdevInfo, IoChannel, IoCompletion, IoFuture, IoRequest, IoType};
use crate::dma::IoBuf;
use crate::errno::Errno;

/// A backing device seen through its cache set.
pub struct CachedBdev {
    info: BdevInfo,
    pub(crate) set: Arc<CacheSet>,
    pub(crate) backing: Arc<Backing>,
}

impl std::fmt::Debug for CachedBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedBdev").field("name", &self.info.name).field("cache_set", &self.set.name).finish()
    }
}

impl CachedBdev {
    pub fn new(name: &str, set: Arc<CacheSet>, backing: Arc<Backing>) -> Arc<CachedBdev> {
        let mut info = BdevInfo::new(name, "tiercache cached bdev", set.block_size(), backing.num_blocks);
        info.uuid = backing.uuid;
        info.volatile_cache = true;
        Arc::new(CachedBdev { info, set, backing })
    }

    pub fn cache_set(&self) -> &Arc<CacheSet> {
        &self.set
    }

    pub fn backing(&self) -> &Arc<Backing> {
        &self.backing
    }

    pub fn mode(&self) -> CacheMode {
        self.backing.mode()
    }

    /// Switch the cache mode online. Leaving writeback keeps serving dirty data from the
    /// cache (reads always consult the index) and starts draining it.
    pub fn set_mode(&self, m: CacheMode) {
        self.backing.mode.store(m as u8, Ordering::Release);
        if m != CacheMode::WriteBack {
            self.set.request_drain();
        }
    }
}

impl Bdev for CachedBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn create_channel(&self) -> Result<Box<dyn BdevChannel>, Errno> {
        let log = self.set.local()?;
        let backing_ch = self.backing.desc.channel()?;
        Ok(Box::new(CachedChannel(Rc::new(Inner {
            log,
            backing_ch,
            backing: self.backing.clone(),
            stream: StreamDetector::default(),
        }))))
    }

    fn driver(&self) -> &'static str {
        "cache"
    }

    fn driver_specific(&self) -> serde_json::Value {
        serde_json::json!({
            "cache": {
                "cache_set": self.set.name,
                "cache_set_uuid": self.set.uuid.to_string(),
                "cache_bdev_name": self.set.cache.name(),
                "core_bdev_name": self.backing.desc.name(),
                "mode": mode_name(self.mode()),
                "backing_idx": self.backing.idx.0,
                "data_offset": self.backing.data_offset,
            }
        })
    }

    fn base_bdevs(&self) -> Vec<String> {
        vec![self.set.cache.name().to_string(), self.backing.desc.name().to_string()]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// RPC name of a cache mode.
pub fn mode_name(m: CacheMode) -> &'static str {
    match m {
        CacheMode::WriteBack => "writeback",
        CacheMode::WriteThrough => "writethrough",
        CacheMode::WriteAround => "writearound",
        CacheMode::None => "passthrough",
    }
}

/// Parse an RPC cache mode name.
pub fn parse_mode(s: &str) -> Option<CacheMode> {
    Some(match s {
        "writeback" | "wb" => CacheMode::WriteBack,
        "writethrough" | "wt" => CacheMode::WriteThrough,
        "writearound" | "wa" => CacheMode::WriteAround,
        "passthrough" | "pt" | "none" => CacheMode::None,
        _ => return None,
    })
}

struct Inner {
    log: Rc<ReactorLog>,
    backing_ch: Rc<IoChannel>,
    backing: Arc<Backing>,
    stream: StreamDetector,
}

struct CachedChannel(Rc<Inner>);

/// Releases a claimed backing range when dropped (on every path out of a direct write).
struct RangeGuard {
    set: Arc<CacheSet>,
    range: IoRange,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.set.release_range(self.range);
    }
}

impl BdevChannel for CachedChannel {
    fn submit(&self, io: IoRequest) -> IoFuture {
        let inner = self.0.clone();
        IoFuture::boxed(async move { inner.run(io).await })
    }
}

/// Where one block of a read comes from.
#[derive(Clone, Copy)]
enum Src {
    Miss,
    Zero,
    /// In a RAM buffer (this reactor's or another's) or on the cache device.
    Cached(Hit),
}

const MAX_READ_ATTEMPTS: usize = 16;

/// A promotion candidate: block index in the request, key, index ticket, direct-write
/// epoch (all taken before the backing read).
type Candidate = (usize, BlockKey, PromotionTicket, u64);
/// Promotion tasks pending per reactor; past this a read miss skips its promotion.
const MAX_PROMOTIONS_IN_FLIGHT: usize = 64;

impl Inner {
    fn set(&self) -> &Arc<CacheSet> {
        &self.log.set
    }

    fn bs(&self) -> u64 {
        self.set().block_size() as u64
    }

    /// The state of this cached bdev once it is not draining (waits, bounded).
    async fn settled_state(&self) -> BackingState {
        let started = std::time::Instant::now();
        loop {
            let st = self.backing.state();
            // Running on a failed set: the transition to Draining is a moment away.
            let unsettled = st == BackingState::Draining || (st == BackingState::Running && self.set().is_failed());
            if !unsettled {
                return st;
            }
            if started.elapsed() >= DRAIN_WAIT_LIMIT {
                return BackingState::Stopped;
            }
            crate::reactor::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// One I/O to the backing device (offset in the cached volume), counted for error
    /// accounting.
    async fn backing_io(&self, mut req: IoRequest) -> IoCompletion {
        req.offset += self.backing.data_offset;
        let writes = matches!(req.io_type, IoType::Write | IoType::WriteZeroes | IoType::Unmap);
        let c = self.backing_ch.submit(req).await;
        match c.status {
            Ok(()) => {
                self.backing.note_success();
                if writes {
                    self.backing.direct.note_completed();
                }
            }
            Err(e) => self.backing.note_error(self.set(), e),
        }
        c
    }

    /// End a direct write's claim once its data is on the backing device (durably, where a
    /// cached version was dirty — see `any_dirty`), BEFORE the log records that supersede
    /// the cached versions are placed: placing may wait for log space, and writeback, which
    /// frees that space, cannot write back a claimed block (crash harness: 20 s stalls with
    /// the log full under mode switches). Each dirty cached version is first marked clean:
    /// the backing device now holds newer data, so writeback must not copy the old version
    /// over it once the claim is gone. Until the superseding record is placed a read may
    /// still see the old version — the write has not completed, so either is correct — and
    /// a power cut replays the old version, which no FLUSH covering this write has seen.
    ///
    /// The marking is what keeps writeback off the old version once the claim is gone: the
    /// version stays the newest in the index until the superseding record is placed, and
    /// writeback copies a version only if, under its own claim, it is the newest AND dirty
    /// (`write_run` in writeback.rs). So the marking must happen under this claim.
    ///
    /// Returns the blocks that were cached: the ones to invalidate (no allocation when
    /// none was). With `fua`, also the blocks whose newest record is a tombstone: a FUA
    /// write must not complete before every older record of its blocks on the cache device
    /// is durably superseded, and that tombstone (an earlier direct write's, no FLUSH since)
    /// may still be only in RAM, on any reactor; a power cut would then lose it and replay
    /// the older version over the FUA data. A fresh tombstone in this reactor's log, made
    /// durable with the write's own records (`log_records_durable`), covers it.
    fn release_direct(&self, range: RangeGuard, lba0: u64, n: u64, fua: bool) -> Vec<BlockKey> {
        let set = self.set();
        debug_assert!(set.holds_claim(range.range), "release_direct without its claim");
        let cached = self.log.with_participant(|p| {
            let mut cached = Vec::new();
            for lba in lba0..lba0 + n {
                let Some(key) = CacheSet::key(self.backing.idx, lba) else { continue };
                if let Some(h) = set.index.lookup(p, key) {
                    if h.dirty {
                        set.index.mark_clean(p, h.slot, h.gen);
                    }
                    cached.push(key);
                } else if fua && set.index.tombstoned(p, key) {
                    cached.push(key);
                }
            }
            cached
        });
        drop(range);
        cached
    }

    /// Whether none of the blocks of a write of `len` bytes at `offset` is cached and the
    /// write would wait for log space or the set is dirty above its cutoff (a cached block
    /// must get its new version through the log, so that no older version survives it).
    fn uncached_and_cache_full(&self, offset: u64, len: u64) -> bool {
        let bs = self.bs();
        let n = len / bs;
        if self.log.has_room(n as usize) && !self.set().dirty_cutoff.load(Ordering::Acquire) {
            return false;
        }
        let lba0 = offset / bs;
        (lba0..lba0 + n).all(|lba| CacheSet::key(self.backing.idx, lba).is_some_and(|k| self.log.lookup(k).is_none()))
    }

    /// Whether any of `n` blocks from `lba0` is cached dirty. A direct write over such a
    /// block must be durable on the backing device before the tombstone that invalidates
    /// the cached version can be: otherwise a power cut could leave the tombstone and the
    /// backing device's older data, i.e. lose a write that a completed FLUSH covered.
    fn any_dirty(&self, lba0: u64, n: u64) -> bool {
        (lba0..lba0 + n)
            .any(|lba| CacheSet::key(self.backing.idx, lba).and_then(|k| self.log.lookup(k)).is_some_and(|h| h.dirty))
    }

    /// Claim [offset, offset+len) of the backing device for a direct write: in-flight
    /// writeback of those blocks finishes first, and writeback does not start on them
    /// until the guard drops (after the cache entry for the new data is installed).
    async fn claim_direct(&self, offset: u64, len: u64) -> Result<RangeGuard, Errno> {
        let bs = self.bs();
        let r = IoRange {
            backing: self.backing.idx.0,
            start: offset / bs,
            end: (offset + len).div_ceil(bs),
            writeback: false,
        };
        self.set().claim_direct(r).await?;
        Ok(RangeGuard { set: self.set().clone(), range: r })
    }

    /// Whether this I/O continues a contiguous stream past the sequential cutoff.
    fn is_sequential(&self, offset: u64, len: u64) -> bool {
        let k = &self.set().knobs;
        let cutoff = k.seq_cutoff_bytes.load(Ordering::Relaxed);
        let run = self.stream.observe(offset, len);
        if cutoff == 0 || run <= cutoff {
            return false;
        }
        match k.seq_policy.load(Ordering::Relaxed) {
            0 => true,
            1 => self.set().free_segments() == 0,
            _ => false,
        }
    }

    /// Promotion candidates among `n` blocks from `lba0`: count their misses, and take a
    /// ticket (before the backing read) for those at the threshold.
    fn promotion_candidates(&self, lba0: u64, n: usize) -> Vec<Candidate> {
        let set = self.set();
        let after = set.knobs.promote_after.load(Ordering::Relaxed);
        if after == 0 || set.is_failed() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for i in 0..n {
            let Some(key) = CacheSet::key(self.backing.idx, lba0 + i as u64) else { continue };
            if set.misses.miss(key) >= after {
                // A direct write in flight: the backing read may return either version.
                let Some(epoch) = set.direct_epoch(self.backing.idx.0, lba0 + i as u64) else { continue };
                // Cached since this read's lookup missed it (a write on another reactor
                // installed it in between): the backing read may be older than that
                // version, so it must not be promoted over it (crash harness, mode
                // switches: a live read returned version 0 after version 1 completed).
                let Some(ticket) = self.log.miss_ticket(key) else { continue };
                out.push((i, key, ticket, epoch));
            }
        }
        out
    }

    /// Copy read-miss data into the cache for the candidates (a clean copy; a block that
    /// changed since its ticket is skipped), after the read completes: the blocks are
    /// copied out of `data` and placed by a task spawned on this reactor, so the read
    /// never waits for the promotion. Placement never waits for log space either: with no
    /// room in the open segment and no free segment, or with `MAX_PROMOTIONS_IN_FLIGHT`
    /// promotions already pending on this reactor, the blocks are skipped (counted in
    /// `promotions_skipped`); a later miss promotes them again.
    fn promote(&self, cands: Vec<Candidate>, data: &[u8]) {
        if cands.is_empty() {
            return;
        }
        let bs = self.bs() as usize;
        let set = self.set().clone();
        let log = self.log.clone();
        if log.promotions_in_flight.get() >= MAX_PROMOTIONS_IN_FLIGHT {
            set.counters.promotions_skipped.fetch_add(cands.len() as u64, Ordering::Relaxed);
            return;
        }
        let mut copy = Vec::with_capacity(cands.len() * bs);
        for (i, _, _, _) in &cands {
            copy.extend_from_slice(&data[i * bs..(i + 1) * bs]);
        }
        log.promotions_in_flight.set(log.promotions_in_flight.get() + 1);
        set.counters.promotions_in_flight.fetch_add(1, Ordering::Relaxed);
        crate::reactor::spawn_detached(async move {
            for (k, (_, key, ticket, epoch)) in cands.into_iter().enumerate() {
                // The index ticket sees writes that went through the log; the claim sees
                // direct writes (writearound, writethrough, bypasses), which the index of
                // an uncached block does not.
                let Some(claim) = set.claim_promotion(key.backing().0, key.lba().0, epoch) else {
                    set.counters.promotions_stale.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let placed = log.put_promoted(key, &copy[k * bs..(k + 1) * bs], &ticket).await;
                set.release_range(claim);
                match placed {
                    Ok(_) => {
                        set.misses.forget(key);
                        set.counters.promotions.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Errno::ENOSPC) => {
                        set.counters.promotions_skipped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        set.counters.promotions_stale.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            log.promotions_in_flight.set(log.promotions_in_flight.get() - 1);
            set.counters.promotions_in_flight.fetch_sub(1, Ordering::Release);
        });
    }

    /// One I/O: run it, then account its latency to its path and feed the writeback rate
    /// controller's view of the foreground.
    async fn run(&self, io: IoRequest) -> IoCompletion {
        let started = std::time::Instant::now();
        let (c, path) = self.dispatch(io).await;
        let set = self.set();
        let now = started.elapsed();
        let us = now.as_micros() as u64;
        if let Ok(mut l) = self.log.latency.try_borrow_mut() {
            l.record(path, us);
        }
        if let Some(fg) = set.fg.get(self.log.reactor()) {
            let is_read = matches!(path, IoPath::ReadHit | IoPath::ReadMiss);
            // Derived from the two clock reads already taken (no third one per I/O).
            let at = (started.saturating_duration_since(set.created) + now).as_nanos() as u64;
            fg.record(at, is_read.then_some(now.as_nanos() as u64));
        }
        c
    }

    async fn dispatch(&self, io: IoRequest) -> (IoCompletion, IoPath) {
        match self.settled_state().await {
            BackingState::Stopped => return (IoCompletion::err(Errno::EIO, io.buf), IoPath::Other),
            BackingState::Degraded | BackingState::Detached => return (self.backing_io(io).await, IoPath::Bypass),
            BackingState::Detaching if io.io_type == IoType::Write => {
                let buf = io.buf.expect("validated write has a buffer");
                let r = self.write_around(io.offset, buf, io.fua).await;
                return (IoCompletion { status: r.0, buf: r.1 }, IoPath::Bypass);
            }
            _ => {}
        }
        let sequential = match io.io_type {
            IoType::Read | IoType::Write => self.is_sequential(io.offset, io.len),
            _ => false,
        };
        match io.io_type {
            IoType::Read => {
                let buf = io.buf.expect("validated read has a buffer");
                let (c, hit) = self.read(io.offset, buf, !sequential).await;
                (c, if hit { IoPath::ReadHit } else { IoPath::ReadMiss })
            }
            IoType::Write if sequential && self.backing.mode() == CacheMode::WriteBack => {
                // A long sequential stream goes around the cache (bcache's sequential_cutoff).
                self.set().counters.seq_bypasses.fetch_add(1, Ordering::Relaxed);
                let buf = io.buf.expect("validated write has a buffer");
                let r = self.write_around(io.offset, buf, io.fua).await;
                (IoCompletion { status: r.0, buf: r.1 }, IoPath::Bypass)
            }
            IoType::Write => {
                let buf = io.buf.expect("validated write has a buffer");
                let path = if self.backing.mode() == CacheMode::WriteBack { IoPath::Write } else { IoPath::Bypass };
                (self.write(io.offset, buf, io.fua).await, path)
            }
            IoType::Flush => (IoCompletion { status: self.flush().await, buf: None }, IoPath::Other),
            IoType::Unmap | IoType::WriteZeroes => {
                (IoCompletion { status: self.zero(io.offset, io.len).await, buf: None }, IoPath::Other)
            }
        }
    }

    // ---- writes ---------------------------------------------------------------------

    async fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> IoCompletion {
        if self.backing.mode() == CacheMode::WriteBack && self.uncached_and_cache_full(offset, buf.len() as u64) {
            // The log is full, or dirty above the cutoff: a block the cache does not hold
            // goes straight to the backing device instead of waiting for writeback or
            // adding to it (what keeps writes at backing-device speed when the cache is
            // full of dirty data; docs/cache-engine.md "Full log, dirty cutoff").
            self.set().counters.full_bypasses.fetch_add(1, Ordering::Relaxed);
            let r = self.write_around(offset, buf, fua).await;
            return IoCompletion { status: r.0, buf: r.1 };
        }
        let status = match self.backing.mode() {
            CacheMode::WriteBack => match self.write_back(offset, &buf, fua).await {
                Err(_) if self.set().is_failed() => {
                    // The cache failed under this write: once the set has settled, a
                    // degraded device takes the write directly (no client-visible error).
                    if self.settled_state().await == BackingState::Degraded {
                        return self.backing_io(IoRequest::write(offset, buf, fua)).await;
                    }
                    Err(Errno::EIO)
                }
                r => r,
            },
            CacheMode::WriteThrough => self.write_through(offset, buf, fua).await.map(drop),
            CacheMode::WriteAround | CacheMode::None => {
                let r = self.write_around(offset, buf, fua).await;
                return IoCompletion { status: r.0, buf: r.1 };
            }
        };
        IoCompletion { status, buf: None }
    }

    async fn write_back(&self, offset: u64, buf: &IoBuf, fua: bool) -> Result<(), Errno> {
        let bs = self.bs() as usize;
        let lba0 = offset / bs as u64;
        let set = self.set();
        if set.is_failed() {
            return Err(Errno::EIO);
        }
        for (b, block) in buf.chunks_exact(bs).enumerate() {
            let key = CacheSet::key(self.backing.idx, lba0 + b as u64).ok_or(Errno::EINVAL)?;
            self.log.put_block(key, Some(block), EntryKind::Dirty).await?;
        }
        set.counters.write_blocks.fetch_add((buf.len() / bs) as u64, Ordering::Relaxed);
        if fua {
            // Everything this reactor sealed (which includes this write) is written, the
            // last segment with FUA; earlier segments need the device flushed as well.
            self.log.seal_and_wait(true).await?;
            self.log.cache_ch.flush().await.status?;
        }
        Ok(())
    }

    /// Backing device first, then the cache, in series (dm-cache's fix for the
    /// writethrough/promotion race): the cached copy is never newer than the origin.
    async fn write_through(&self, offset: u64, buf: IoBuf, fua: bool) -> Result<IoBuf, Errno> {
        let bs = self.bs() as usize;
        let range = self.claim_direct(offset, buf.len() as u64).await?;
        // A dirty cached version is about to be superseded by a clean one: the backing
        // device must hold the new data durably first (see `any_dirty`).
        let fua_asked = fua;
        let fua = fua || self.any_dirty(offset / bs as u64, (buf.len() / bs) as u64);
        let c = self.backing_io(IoRequest::write(offset, buf, fua)).await;
        c.status?;
        let buf = c.buf.ok_or(Errno::EIO)?;
        let set = self.set();
        // Every block gets a record below (a clean copy or a tombstone), FUA or not.
        self.release_direct(range, offset / bs as u64, (buf.len() / bs) as u64, false);
        if !set.is_failed() {
            let lba0 = offset / bs as u64;
            for (b, block) in buf.chunks_exact(bs).enumerate() {
                let key = CacheSet::key(self.backing.idx, lba0 + b as u64).ok_or(Errno::EINVAL)?;
                if self.log.put_block(key, Some(block), EntryKind::Clean).await.is_err() {
                    // The origin has the data; drop any cached copy instead.
                    let _ = self.log.put_block(key, None, EntryKind::Tombstone).await;
                }
            }
            if fua_asked {
                self.log_records_durable().await?;
            }
        }
        Ok(buf)
    }

    /// After a FUA write that went to the backing device: the records it put in the log
    /// (clean copies, tombstones) must be durable too before it completes, or a power cut
    /// would let replay serve the older cached version over the FUA data (crash harness,
    /// mode switches).
    async fn log_records_durable(&self) -> Result<(), Errno> {
        self.log.seal_and_wait(true).await?;
        self.log.cache_ch.flush().await.status
    }

    /// Backing device only; cached copies of the range are invalidated by tombstones.
    async fn write_around(&self, offset: u64, buf: IoBuf, fua: bool) -> (Result<(), Errno>, Option<IoBuf>) {
        let bs = self.bs();
        let n = buf.len() as u64 / bs;
        let range = match self.claim_direct(offset, buf.len() as u64).await {
            Ok(g) => g,
            Err(e) => return (Err(e), Some(buf)),
        };
        // The claim keeps writeback off the range, so no block turns clean under us.
        let fua_asked = fua;
        let fua = fua || self.any_dirty(offset / bs, n);
        let c = self.backing_io(IoRequest::write(offset, buf, fua)).await;
        if let Err(e) = c.status {
            return (Err(e), c.buf);
        }
        let cached = self.release_direct(range, offset / bs, n, fua_asked);
        let r = match self.invalidate(&cached).await {
            Ok(placed) if placed > 0 && fua_asked => self.log_records_durable().await,
            r => r.map(drop),
        };
        (r, c.buf)
    }

    /// Tombstones for `cached` (from `release_direct`); returns how many it placed.
    async fn invalidate(&self, cached: &[BlockKey]) -> Result<usize, Errno> {
        for &key in cached {
            self.log.put_block(key, None, EntryKind::Tombstone).await?;
        }
        Ok(cached.len())
    }

    /// Unmap and write-zeroes: the range reads as zeros afterwards.
    async fn zero(&self, offset: u64, len: u64) -> Result<(), Errno> {
        let bs = self.bs();
        let (lba0, n) = (offset / bs, len / bs);
        match self.backing.mode() {
            CacheMode::WriteBack => {
                for lba in lba0..lba0 + n {
                    let key = CacheSet::key(self.backing.idx, lba).ok_or(Errno::EINVAL)?;
                    self.log.put_block(key, None, EntryKind::Zero { dirty: true }).await?;
                }
                Ok(())
            }
            _ => {
                let range = self.claim_direct(offset, len).await?;
                let dirty = self.any_dirty(lba0, n);
                self.backing_io(IoRequest::write_zeroes(offset, len)).await.status?;
                if dirty {
                    // Zeroes durable before the tombstones (see `any_dirty`).
                    self.flush_backing().await?;
                }
                // Not FUA: a later FLUSH makes every reactor's records durable.
                let cached = self.release_direct(range, lba0, n, false);
                self.invalidate(&cached).await.map(drop)
            }
        }
    }

    async fn flush(&self) -> Result<(), Errno> {
        let set = self.set();
        set.counters.flushes.fetch_add(1, Ordering::Relaxed);
        set.make_durable().await?;
        // Writes that went around the log (any mode) are covered by flushing the backing
        // device; writeback flushes it itself before it marks blocks clean.
        self.flush_backing().await
    }

    /// Flush the backing device if a direct write completed since the last backing flush.
    async fn flush_backing(&self) -> Result<(), Errno> {
        if let Some(covered) = self.backing.direct.flush_needed() {
            self.backing_io(IoRequest::flush()).await.status?;
            self.backing.direct.note_flushed(covered);
        }
        Ok(())
    }

    // ---- reads ----------------------------------------------------------------------

    /// A read; also says whether it was a full hit (for per-path latency).
    async fn read(&self, offset: u64, buf: IoBuf, may_promote: bool) -> (IoCompletion, bool) {
        // Fast path: one block that is on the cache device (not in a RAM buffer, not
        // zero) is read straight into the caller's buffer — no temporary, no copy.
        let bs = self.bs() as usize;
        if buf.len() == bs {
            let set = self.set();
            if let Some(key) = CacheSet::key(self.backing.idx, offset / bs as u64) {
                if let Some(h) = self.log.lookup_read(key) {
                    if !h.zero && set.ram_owner[h.segment.0 as usize].load(Ordering::Acquire) == 0 {
                        let c = self.log.cache_ch.read(set.geom.slot_id_offset(h.slot), buf).await;
                        match c.status {
                            Ok(()) if set.index.still_valid(&h) => {
                                set.counters.read_hits.fetch_add(1, Ordering::Relaxed);
                                return (c, true);
                            }
                            // Reused under us, or a cache error: the general path sorts it
                            // out (it retries, or falls back / reports per the rules).
                            _ => match c.buf {
                                Some(b) => return self.read_general(offset, b, may_promote).await,
                                None => return (IoCompletion::err(Errno::EIO, None), false),
                            },
                        }
                    }
                }
            }
        }
        self.read_general(offset, buf, may_promote).await
    }

    async fn read_general(&self, offset: u64, mut buf: IoBuf, may_promote: bool) -> (IoCompletion, bool) {
        let bs = self.bs() as usize;
        let lba0 = offset / bs as u64;
        let n = buf.len() / bs;
        let set = self.set().clone();
        let mut todo: Vec<usize> = (0..n).collect();
        let mut hits = 0usize;
        for attempt in 0..MAX_READ_ATTEMPTS {
            let mut srcs = Vec::with_capacity(todo.len());
            for &b in &todo {
                let key = match CacheSet::key(self.backing.idx, lba0 + b as u64) {
                    Some(k) => k,
                    None => return (IoCompletion::err(Errno::EINVAL, Some(buf)), false),
                };
                srcs.push(match self.log.lookup_read(key) {
                    None => Src::Miss,
                    Some(h) if h.zero => Src::Zero,
                    Some(h) => Src::Cached(h),
                });
            }
            if attempt == 0 {
                hits = srcs.iter().filter(|s| !matches!(s, Src::Miss)).count();
                if srcs.iter().all(|s| matches!(s, Src::Miss)) {
                    // Whole request uncached: straight from the backing device.
                    set.counters.read_misses.fetch_add(1, Ordering::Relaxed);
                    let cands = if may_promote { self.promotion_candidates(lba0, n) } else { Vec::new() };
                    let c = self.backing_io(IoRequest::read(offset, buf)).await;
                    if c.status.is_ok() && !cands.is_empty() {
                        if let Some(b) = c.buf.as_ref() {
                            self.promote(cands, b);
                        }
                    }
                    return (c, false);
                }
            }
            let mut retry = Vec::new();
            // Misses: one backing read per contiguous run.
            let mut i = 0;
            while i < todo.len() {
                if !matches!(srcs[i], Src::Miss) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < todo.len() && matches!(srcs[i], Src::Miss) && todo[i] == todo[start] + (i - start) {
                    i += 1;
                }
                let (b0, cnt) = (todo[start], i - start);
                let off = (lba0 + b0 as u64) * bs as u64;
                let cands = if may_promote { self.promotion_candidates(lba0 + b0 as u64, cnt) } else { Vec::new() };
                let c = self.backing_io(IoRequest::read(off, IoBuf::new(cnt * bs))).await;
                if let Err(e) = c.status {
                    return (IoCompletion::err(e, Some(buf)), false);
                }
                if let Some(data) = c.buf {
                    buf[b0 * bs..(b0 + cnt) * bs].copy_from_slice(&data);
                    self.promote(cands, &data);
                }
            }
            // Cached blocks: RAM (here or on the owning reactor) or the cache device.
            for (k, &b) in todo.iter().enumerate() {
                match srcs[k] {
                    Src::Miss => {}
                    Src::Zero => buf[b * bs..(b + 1) * bs].fill(0),
                    Src::Cached(h) => match self.read_cached(&set, h, lba0 + b as u64).await {
                        Ok(Some(data)) => buf[b * bs..(b + 1) * bs].copy_from_slice(&data),
                        Ok(None) => retry.push(b),
                        Err(e) => return (IoCompletion::err(e, Some(buf)), false),
                    },
                }
            }
            if retry.is_empty() {
                let c = if hits == n { &set.counters.read_hits } else { &set.counters.read_partial_hits };
                c.fetch_add(1, Ordering::Relaxed);
                return (IoCompletion::ok(Some(buf)), hits == n);
            }
            todo = retry;
        }
        log::error!("cache set {}: read at {offset} kept racing segment reuse; giving up", set.name);
        (IoCompletion::err(Errno::EIO, Some(buf)), false)
    }

    /// One cached block. Ok(None): the segment was reused under us; look it up again.
    async fn read_cached(&self, set: &Arc<CacheSet>, h: Hit, lba: u64) -> Result<Option<IoBuf>, Errno> {
        let owner = set.ram_owner[h.segment.0 as usize].load(Ordering::Acquire);
        if owner != 0 {
            let owner = owner as usize - 1;
            let data = if owner == self.log.reactor() {
                self.log.copy_slot(h.segment, h.version.index).await
            } else {
                let s = set.clone();
                let (seg, idx) = (h.segment, h.version.index);
                set.reactors
                    .run_on(owner, move || async move {
                        match s.existing_local() {
                            Some(l) => l.copy_slot(seg, idx).await,
                            None => None,
                        }
                    })
                    .await
                    .ok()
                    .flatten()
            };
            if let Some(d) = data {
                return Ok(set.index.still_valid(&h).then_some(d));
            }
        }
        let off = set.geom.slot_id_offset(h.slot);
        let c = self.log.cache_ch.read(off, IoBuf::new(set.block_size() as usize)).await;
        if let Err(e) = c.status {
            set.note_cache_error(e, "cache read");
            if h.dirty {
                // The only current copy is on the cache device: an error, never older data.
                return Err(e);
            }
            // Clean: the backing device holds the same data.
            let lba_off = lba * set.block_size() as u64;
            let c = self.backing_io(IoRequest::read(lba_off, IoBuf::new(set.block_size() as usize))).await;
            c.status?;
            return Ok(c.buf);
        }
        Ok(if set.index.still_valid(&h) { c.buf } else { None })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::bdev::BdevDesc;
    use crate::cache::test_rig::{block, cached_on_sim, write, BS};
    use crate::cache::CacheOptions;
    use crate::reactor::{ReactorConfig, ReactorSet};
    use crate::sim::SimDisk;

    /// The crash harness's "live read returned version 0 after version 1 completed",
    /// made deterministic. A read misses block X (nothing cached); before it takes its
    /// promotion ticket, a writeback-mode write of version 1 on the other reactor installs
    /// X dirty and completes; the read's backing read returns version 0. A ticket that
    /// simply records the newest version (version 1) lets the promotion install version 0
    /// as a clean copy over version 1: reads return 0 and version 1 is never written back.
    /// The interleaving is driven step by step: the write first, then the read's
    /// candidates, backing read and promotion, as the read path runs them after its lookup.
    #[test]
    fn a_read_miss_never_promotes_over_a_write_installed_after_its_lookup() {
        let rs = ReactorSet::start(ReactorConfig::unpinned(2)).unwrap();
        let opts =
            CacheOptions { segment_size: 128 << 10, seq_cutoff_bytes: 0, promote_after: 1, ..Default::default() };
        let cb = cached_on_sim(&rs, "pr", opts, BdevDesc::new(SimDisk::new("b", 512, 16 << 11)));
        let set = cb.cache_set().clone();
        let desc = BdevDesc::new(cb.clone());
        const X: u64 = 7;

        // (The read's lookup of X missed here.) Version 1 is written on reactor 1.
        write(&rs, &desc, 1, X, 1);

        // The read on reactor 0 goes on: candidates, backing read, promotion.
        let cb2 = cb.clone();
        let promoted_from = rs
            .block_on(0, move || async move {
                let inner = Inner {
                    log: cb2.set.local().unwrap(),
                    backing_ch: cb2.backing.desc.channel().unwrap(),
                    backing: cb2.backing.clone(),
                    stream: StreamDetector::default(),
                };
                let cands = inner.promotion_candidates(X, 1);
                let c = inner.backing_io(IoRequest::read(X * BS as u64, IoBuf::new(BS))).await;
                c.status.unwrap();
                let data = c.buf.unwrap().to_vec();
                inner.promote(cands, &data);
                data
            })
            .unwrap();
        assert_eq!(promoted_from, vec![0u8; BS], "the backing device does not have version 1 yet");
        let t = Instant::now();
        while set.counters.promotions_in_flight.load(Ordering::Acquire) > 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "promotion never finished");
            std::thread::yield_now();
        }
        assert_eq!(set.counters.promotions.load(Ordering::Relaxed), 0, "version 0 was promoted over version 1");

        let d = desc.clone();
        let got = rs
            .block_on(1, move || async move {
                let c = d.channel().unwrap().read(X * BS as u64, IoBuf::new(BS)).await;
                c.status.unwrap();
                c.buf.unwrap().to_vec()
            })
            .unwrap();
        assert_eq!(got, block(X, 1), "a read after version 1 completed returned older data");

        set.stop_migration();
        drop(cb);
        rs.stop();
    }

    /// An in-place overwrite in the open segment must not revive a version the index no
    /// longer counts as dirty (a direct write marks it clean before its tombstone lands):
    /// the new write gets a slot of its own, dirty in the index.
    #[test]
    fn a_write_over_a_version_marked_clean_in_the_open_segment_appends() {
        let rs = ReactorSet::start(ReactorConfig::unpinned(1)).unwrap();
        let opts = CacheOptions { seal_idle: Duration::from_secs(60), seq_cutoff_bytes: 0, ..CacheOptions::default() };
        let cb = cached_on_sim(&rs, "inplace", opts, BdevDesc::new(SimDisk::new("b", 512, 16 << 11)));
        let set = cb.cache_set().clone();
        set.stop_migration();
        let desc = BdevDesc::new(cb.clone());
        let key = CacheSet::key(cb.backing().idx, 7).unwrap();
        let overwrites = || set.counters.write_overwrites_in_buffer.load(Ordering::Relaxed);
        write(&rs, &desc, 0, 7, 1);
        write(&rs, &desc, 0, 7, 2);
        assert_eq!(overwrites(), 1, "a dirty version in the open segment is overwritten in place");
        let p = set.index.register();
        let h = set.index.lookup(&p, key).unwrap();
        assert!(set.index.mark_clean(&p, h.slot, h.gen));
        drop(p);
        write(&rs, &desc, 0, 7, 3);
        assert_eq!(overwrites(), 1, "overwrote a version the index counts as clean");
        let p = set.index.register();
        let h2 = set.index.lookup(&p, key).unwrap();
        assert!(h2.dirty && h2.slot != h.slot, "the new version must be dirty in a slot of its own: {h2:?}");
        drop(p);
        let d = desc.clone();
        let got = rs
            .block_on(0, move || async move { d.channel().unwrap().read(7 * BS as u64, IoBuf::new(BS)).await.buf })
            .unwrap()
            .unwrap();
        assert_eq!(&got[..], &block(7, 3)[..]);
        drop(cb);
        rs.stop();
    }
}
