//! The per-reactor half of the log: each reactor fills its own open segment in RAM and
//! seals it into one large sequential write to the cache device.
//!
//! Ownership: a [`ReactorLog`] exists once per (cache set, reactor) and is touched only by
//! its reactor. Other reactors reach its RAM buffer only through messages
//! ([`ReactorLog::copy_slot`] runs on the owner). `CacheSet::ram_owner[seg]` says which
//! reactor holds a segment's data in RAM (open, or sealed and still being written); it is
//! cleared only after the segment's write completed, so a reader that sees 0 can read
//! the cache device.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::index::{BlockKey, EntryKind, InstallError, OpenSegment, Participant, PromotionTicket, SegmentId};
use super::ondisk::{encode_segment_header, record_flags, BlockRecordOnDisk};
use super::set::{CacheSet, SealedSeg, SpaceUse};
use crate::bdev::IoChannel;
use crate::dma::IoBuf;
use crate::errno::Errno;
use crate::reactor::sync::{Event, Watermark};
use crate::reactor::{self, PollStatus, Poller, PollerId};

/// Sealed segments of one reactor whose write may be in flight at once.
const MAX_SEGMENTS_IN_FLIGHT: usize = 16;

struct OpenBuf {
    seg: OpenSegment,
    /// Laid out exactly as the segment on disk: header blocks, then slots.
    buf: IoBuf,
    records: Vec<BlockRecordOnDisk>,
}

/// Announces this reactor's quiescent states to the index's QSBR domain.
struct QsbrPoller {
    part: Rc<RefCell<Participant>>,
    name: String,
}

impl Poller for QsbrPoller {
    fn name(&self) -> &str {
        &self.name
    }
    fn poll(&mut self) -> PollStatus {
        if let Ok(mut p) = self.part.try_borrow_mut() {
            p.quiescent();
        }
        PollStatus::Idle
    }
    fn on_sleep(&mut self) {
        if let Ok(mut p) = self.part.try_borrow_mut() {
            p.offline();
        }
    }
    fn on_wake(&mut self) {
        if let Ok(mut p) = self.part.try_borrow_mut() {
            p.online();
        }
    }
}

/// Outcome of placing one block in the log.
pub(crate) enum Placed {
    /// A new slot in the open segment.
    NewSlot,
    /// The block was already in the open segment: overwritten in place.
    InPlace,
}

/// One reactor's log state for one cache set.
pub struct ReactorLog {
    pub(crate) set: Arc<CacheSet>,
    me: usize,
    part: Rc<RefCell<Participant>>,
    poller: Cell<Option<PollerId>>,
    pub(crate) cache_ch: Rc<IoChannel>,
    open: RefCell<Option<OpenBuf>>,
    /// Segments sealed by this reactor whose write has not completed.
    writing: RefCell<HashMap<u32, Rc<Event>>>,
    /// Seal tickets issued (1, 2, ...).
    sealed: Cell<u64>,
    /// Every ticket up to this value has been written.
    written: Rc<Watermark>,
    done_out_of_order: RefCell<BTreeSet<u64>>,
    /// First segment write error (sticky: later FLUSHes report it).
    write_error: Cell<Option<Errno>>,
    last_write: Cell<Instant>,
    idle_sealer: Cell<bool>,
    /// Backing devices whose rescued data could not be written (after a cache failure).
    lost: RefCell<Vec<super::index::BackingIdx>>,
    /// Latency per I/O path on this reactor.
    pub(crate) latency: RefCell<PathLatency>,
    /// Promotions spawned on this reactor and not finished (bounded by the read path).
    pub(crate) promotions_in_flight: Cell<usize>,
}

/// Which way an I/O went (for per-path latency).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum IoPath {
    ReadHit,
    ReadMiss,
    Write,
    Bypass,
    Writeback,
    Other,
}

/// Latency histograms (µs) of one reactor, one per path.
pub struct PathLatency {
    pub read_hit: hdrhistogram::Histogram<u64>,
    pub read_miss: hdrhistogram::Histogram<u64>,
    pub write: hdrhistogram::Histogram<u64>,
    pub bypass: hdrhistogram::Histogram<u64>,
    pub writeback: hdrhistogram::Histogram<u64>,
}

fn histogram() -> hdrhistogram::Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits; the bounds are constants, so this cannot fail.
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds")
}

impl PathLatency {
    pub fn new() -> PathLatency {
        PathLatency {
            read_hit: histogram(),
            read_miss: histogram(),
            write: histogram(),
            bypass: histogram(),
            writeback: histogram(),
        }
    }

    pub(crate) fn record(&mut self, path: IoPath, us: u64) {
        let h = match path {
            IoPath::ReadHit => &mut self.read_hit,
            IoPath::ReadMiss => &mut self.read_miss,
            IoPath::Write => &mut self.write,
            IoPath::Bypass => &mut self.bypass,
            IoPath::Writeback => &mut self.writeback,
            IoPath::Other => return,
        };
        h.saturating_record(us.max(1));
    }

    pub fn add(&mut self, o: &PathLatency) {
        for (a, b) in [
            (&mut self.read_hit, &o.read_hit),
            (&mut self.read_miss, &o.read_miss),
            (&mut self.write, &o.write),
            (&mut self.bypass, &o.bypass),
            (&mut self.writeback, &o.writeback),
        ] {
            let _ = a.add(b);
        }
    }

    pub fn reset(&mut self) {
        *self = PathLatency::new();
    }

    /// p50/p90/p99/p99.9/max and count of each path, in µs.
    pub fn summary(&self) -> serde_json::Value {
        let one = |h: &hdrhistogram::Histogram<u64>| {
            serde_json::json!({
                "count": h.len(),
                "p50_us": h.value_at_quantile(0.5),
                "p90_us": h.value_at_quantile(0.9),
                "p99_us": h.value_at_quantile(0.99),
                "p999_us": h.value_at_quantile(0.999),
                "max_us": h.max(),
            })
        };
        serde_json::json!({
            "read_hit": one(&self.read_hit),
            "read_miss": one(&self.read_miss),
            "write": one(&self.write),
            "bypass": one(&self.bypass),
            "writeback": one(&self.writeback),
        })
    }
}

impl Default for PathLatency {
    fn default() -> Self {
        PathLatency::new()
    }
}

impl Clone for PathLatency {
    fn clone(&self) -> Self {
        PathLatency {
            read_hit: self.read_hit.clone(),
            read_miss: self.read_miss.clone(),
            write: self.write.clone(),
            bypass: self.bypass.clone(),
            writeback: self.writeback.clone(),
        }
    }
}

impl ReactorLog {
    pub(crate) fn new(set: Arc<CacheSet>) -> Result<ReactorLog, Errno> {
        let me = reactor::current().ok_or(Errno::ENXIO)?;
        let cache_ch = set.cache.channel()?;
        let part = Rc::new(RefCell::new(set.index.register()));
        let poller = reactor::register_poller(Box::new(QsbrPoller {
            part: part.clone(),
            name: format!("cache_qsbr[{}]", set.name),
        }));
        Ok(ReactorLog {
            set,
            me,
            part,
            poller: Cell::new(poller),
            cache_ch,
            open: RefCell::new(None),
            writing: RefCell::new(HashMap::new()),
            sealed: Cell::new(0),
            written: Watermark::new(),
            done_out_of_order: RefCell::new(BTreeSet::new()),
            write_error: Cell::new(None),
            last_write: Cell::new(Instant::now()),
            idle_sealer: Cell::new(false),
            lost: RefCell::new(Vec::new()),
            latency: RefCell::new(PathLatency::new()),
            promotions_in_flight: Cell::new(0),
        })
    }

    /// Run `f` with this reactor's QSBR participant (never across an await).
    pub(crate) fn with_participant<R>(&self, f: impl FnOnce(&Participant) -> R) -> R {
        f(&self.part.borrow())
    }

    pub(crate) fn lookup(&self, key: BlockKey) -> Option<super::index::Hit> {
        self.with_participant(|p| self.set.index.lookup(p, key))
    }

    /// A foreground read's lookup: a hit also sets the slot's referenced bit (second
    /// chance at reclaim), in the same read-side section as the lookup.
    pub(crate) fn lookup_read(&self, key: BlockKey) -> Option<super::index::Hit> {
        self.with_participant(|p| {
            let h = self.set.index.lookup(p, key)?;
            self.set.index.mark_referenced(p, &h);
            Some(h)
        })
    }

    /// Open a segment for this reactor only if one is free right now (promotions and
    /// copy-forwards never wait for log space). Ok(false): none free, or too many sealed
    /// segments of this reactor still being written.
    fn try_open_new(&self) -> Result<bool, Errno> {
        if self.set.is_failed() {
            return Err(Errno::EIO);
        }
        if self.open.borrow().is_some() {
            return Ok(true);
        }
        if self.writing.borrow().len() >= MAX_SEGMENTS_IN_FLIGHT {
            return Ok(false);
        }
        match self.set.take_free(SpaceUse::Opportunistic) {
            Some(f) => self.open_free(f).map(|()| true),
            None => {
                self.set.kick_migration();
                Ok(false)
            }
        }
    }

    /// Make `f` this reactor's open segment.
    fn open_free(&self, f: super::index::FreeSegment) -> Result<(), Errno> {
        let seg = self.set.index.open_segment(f).map_err(|e| {
            log::error!("cache set {}: open_segment: {e}", self.set.name);
            Errno::EIO
        })?;
        let id = seg.id();
        self.set.ram_owner[id.0 as usize].store(self.me as u32 + 1, Ordering::Release);
        let geom = &self.set.geom;
        let mut buf = IoBuf::new(geom.segment_size() as usize);
        buf[..geom.header_bytes()].fill(0);
        let records = Vec::with_capacity(geom.slots_per_segment() as usize);
        *self.open.borrow_mut() = Some(OpenBuf { seg, buf, records });
        self.set.kick_migration_if_low();
        Ok(())
    }

    /// Open a segment for this reactor, waiting (bounded) for a free one.
    async fn open_new(self: &Rc<Self>, use_: SpaceUse) -> Result<(), Errno> {
        // Bound the RAM held by sealed segments still being written: a writer faster than
        // the cache device waits here (backpressure) instead of piling up buffers.
        while self.writing.borrow().len() >= MAX_SEGMENTS_IN_FLIGHT {
            let next = self.written.get() + 1;
            self.written.wait_for(next).await;
        }
        let started = Instant::now();
        let limit = self.set.options().space_wait_limit;
        let mut backoff = std::time::Duration::from_micros(50);
        let mut counted = false;
        loop {
            if self.set.is_failed() {
                return Err(Errno::EIO);
            }
            if self.open.borrow().is_some() {
                return Ok(());
            }
            if let Some(f) = self.set.take_free(use_) {
                return self.open_free(f);
            }
            if !counted {
                counted = true;
                self.set.counters.space_waits.fetch_add(1, Ordering::Relaxed);
            }
            self.set.kick_migration();
            if started.elapsed() >= limit {
                log::error!("cache set {}: no free log segment for {:?}; failing the write", self.set.name, limit);
                return Err(Errno::EIO);
            }
            reactor::sleep(backoff).await;
            backoff = (backoff * 2).min(std::time::Duration::from_millis(5));
        }
    }

    /// Put one block version into this reactor's open segment and publish it in the
    /// index. `data` is the block for data-carrying kinds (Dirty, Clean).
    pub(crate) async fn put_block(
        self: &Rc<Self>,
        key: BlockKey,
        data: Option<&[u8]>,
        kind: EntryKind,
    ) -> Result<Placed, Errno> {
        self.place(key, data, kind, None).await
    }

    /// Place a CLEAN copy of a block under a promotion ticket: a read miss promoted (the
    /// ticket taken before the backing read) or a block copied forward at reclaim (the
    /// ticket observed the copied slot). If the block changed since the ticket, nothing is
    /// published (ESTALE). Never waits for log space: with the open segment full and no
    /// free segment, nothing is placed (ENOSPC) and the caller skips the block.
    pub(crate) async fn put_promoted(
        self: &Rc<Self>,
        key: BlockKey,
        data: &[u8],
        ticket: &PromotionTicket,
    ) -> Result<Placed, Errno> {
        self.place(key, Some(data), EntryKind::Clean, Some(ticket)).await
    }

    /// Whether `n` more blocks fit without waiting for a free segment (the open segment
    /// has room, or a free segment exists). A racy hint: another reactor may take the last
    /// free segment first, and then the write waits as usual.
    pub(crate) fn has_room(&self, n: usize) -> bool {
        let slots = self.set.geom.slots_per_segment() as usize;
        let open_room = self.open.borrow().as_ref().map_or(0, |ob| slots - ob.records.len());
        open_room >= n || self.set.has_free(SpaceUse::Data)
    }

    /// A promotion ticket for a block a read missed (`BlockIndex::miss_ticket`): None if
    /// the block has been cached since the read's lookup.
    pub(crate) fn miss_ticket(&self, key: BlockKey) -> Option<PromotionTicket> {
        self.with_participant(|p| self.set.index.miss_ticket(p, key))
    }

    async fn place(
        self: &Rc<Self>,
        key: BlockKey,
        data: Option<&[u8]>,
        kind: EntryKind,
        ticket: Option<&PromotionTicket>,
    ) -> Result<Placed, Errno> {
        let bs = self.set.geom.block_size() as usize;
        let hdr = self.set.geom.header_bytes();
        let slots = self.set.geom.slots_per_segment() as usize;
        debug_assert!(data.is_none_or(|d| d.len() == bs));
        loop {
            if self.open.borrow().is_none() {
                if ticket.is_some() {
                    if !self.try_open_new()? {
                        return Err(Errno::ENOSPC);
                    }
                } else {
                    let use_ = match kind {
                        EntryKind::Tombstone => SpaceUse::Invalidation,
                        _ => SpaceUse::Data,
                    };
                    self.open_new(use_).await?;
                }
                self.ensure_idle_sealer();
            }
            let mut guard = self.open.borrow_mut();
            let ob = guard.as_mut().expect("open segment present");
            // Newest version already in our open segment, dirty in the index as in its
            // record: overwrite it in place. (A direct write marks the version clean in the
            // index before its tombstone lands; a write racing it then appends instead of
            // reviving a slot the index no longer counts as dirty.)
            if matches!(kind, EntryKind::Dirty) && ticket.is_none() {
                if let Some(hit) = self.lookup(key) {
                    if hit.segment == ob.seg.id() && !hit.zero && hit.dirty {
                        let i = hit.version.index as usize;
                        if let (Some(d), Some(rec)) = (data, ob.records.get_mut(i)) {
                            if rec.flags & record_flags::DIRTY != 0 && rec.flags & record_flags::ZERO == 0 {
                                ob.buf[hdr + i * bs..hdr + (i + 1) * bs].copy_from_slice(d);
                                *rec = BlockRecordOnDisk::with_data(key.lba(), key.backing(), record_flags::DIRTY, d);
                                self.last_write.set(Instant::now());
                                self.set.counters.write_overwrites_in_buffer.fetch_add(1, Ordering::Relaxed);
                                return Ok(Placed::InPlace);
                            }
                        }
                    }
                }
            }
            if ob.records.len() >= slots {
                drop(guard);
                self.seal(false);
                continue;
            }
            let i = ob.records.len();
            if let Some(d) = data {
                ob.buf[hdr + i * bs..hdr + (i + 1) * bs].copy_from_slice(d);
            }
            let installed = self.with_participant(|p| match ticket {
                Some(t) => self.set.index.install_promotion(p, &ob.seg, i as u32, t, false),
                None => self.set.index.install(p, &ob.seg, i as u32, key, kind),
            });
            match installed {
                Ok(_) => {
                    let rec = match (kind, data) {
                        (EntryKind::Dirty, Some(d)) => {
                            BlockRecordOnDisk::with_data(key.lba(), key.backing(), record_flags::DIRTY, d)
                        }
                        (EntryKind::Clean, Some(d)) => {
                            BlockRecordOnDisk::with_data(key.lba(), key.backing(), record_flags::CLEAN, d)
                        }
                        (EntryKind::Zero { dirty: true }, _) => BlockRecordOnDisk::without_data(
                            key.lba(),
                            key.backing(),
                            record_flags::DIRTY | record_flags::ZERO,
                        ),
                        (EntryKind::Zero { dirty: false }, _) => BlockRecordOnDisk::without_data(
                            key.lba(),
                            key.backing(),
                            record_flags::CLEAN | record_flags::ZERO,
                        ),
                        (EntryKind::Tombstone, _) => {
                            BlockRecordOnDisk::without_data(key.lba(), key.backing(), record_flags::TOMBSTONE)
                        }
                        (EntryKind::Dirty | EntryKind::Clean, None) => {
                            debug_assert!(false, "data-carrying entry without data");
                            return Err(Errno::EINVAL);
                        }
                    };
                    ob.records.push(rec);
                    self.last_write.set(Instant::now());
                    return Ok(Placed::NewSlot);
                }
                Err(InstallError::Newer { .. } | InstallError::Changed) if ticket.is_some() => {
                    // The block changed since the backing read: the promotion is stale.
                    return Err(Errno::ESTALE);
                }
                Err(InstallError::Newer { .. }) => {
                    // A newer version lives in a segment with a higher seq than ours: move
                    // on to a fresh segment (higher seq) so this later write wins, in memory
                    // and at replay alike.
                    drop(guard);
                    self.set.counters.conflict_seals.fetch_add(1, Ordering::Relaxed);
                    self.seal(false);
                    continue;
                }
                Err(e) => {
                    log::error!("cache set {}: index install failed: {e}", self.set.name);
                    return Err(Errno::EIO);
                }
            }
        }
    }

    /// Seal the open segment (if any) and start writing it. Returns the seal ticket to wait
    /// for, or None if nothing was open.
    pub(crate) fn seal(self: &Rc<Self>, fua: bool) -> Option<u64> {
        let ob = self.open.borrow_mut().take()?;
        let set = &self.set;
        let geom = set.geom;
        let seg = ob.seg.id();
        let seq = ob.seg.seq();
        let n = ob.records.len();
        let mut buf = ob.buf;
        // n == 0 happens when a conflict struck at the first block: the empty segment
        // still goes through the normal sealed → written → reclaimed path.
        let hdr = geom.header_bytes();
        if let Err(e) = encode_segment_header(&geom, set.uuid, seg, seq, &ob.records, &mut buf[..hdr]) {
            log::error!("cache set {}: encoding segment {} header: {e}", set.name, seg.0);
            set.fail("segment header encoding", Errno::EIO);
        }
        buf.set_len(hdr + n * geom.block_size() as usize);
        if let Err(e) = set.index.seal(ob.seg) {
            log::error!("cache set {}: seal: {e}", set.name);
        }
        set.sealed.lock().unwrap_or_else(|e| e.into_inner()).insert(seq.0, SealedSeg { seg, written: false });
        set.counters.segments_sealed.fetch_add(1, Ordering::Relaxed);
        let ticket = self.sealed.get() + 1;
        self.sealed.set(ticket);
        let ev = Event::new();
        self.writing.borrow_mut().insert(seg.0, ev.clone());
        let me = self.clone();
        let offset = geom.segment_offset(seg);
        let records = ob.records;
        reactor::spawn_detached(async move {
            let c = me.cache_ch.write(offset, buf, fua).await;
            let set = &me.set;
            match c.status {
                Ok(()) => {
                    // Before the seal's waiters wake: a flush they issue must see it.
                    set.cache_writes.note_completed();
                    set.counters.segments_written.fetch_add(1, Ordering::Relaxed);
                    if let Some(s) = set.sealed.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&seq.0) {
                        s.written = true;
                    }
                }
                Err(e) => {
                    set.counters.segment_write_errors.fetch_add(1, Ordering::Relaxed);
                    if me.write_error.get().is_none() {
                        me.write_error.set(Some(e));
                    }
                    // The data is still in RAM: write it to the backing devices before the
                    // set degrades, so no acknowledged write is lost.
                    if let Some(b) = c.buf.as_ref() {
                        let lost = me.rescue_buffer(seg, &records, b).await;
                        if !lost.is_empty() {
                            me.lost.borrow_mut().extend(lost);
                        }
                    }
                    set.fail("segment write", e);
                }
            }
            set.ram_owner[seg.0 as usize].store(0, Ordering::Release);
            me.writing.borrow_mut().remove(&seg.0);
            ev.set();
            me.complete_ticket(ticket);
            set.kick_migration_if_low();
        });
        Some(ticket)
    }

    fn complete_ticket(&self, t: u64) {
        let mut done = self.done_out_of_order.borrow_mut();
        done.insert(t);
        let mut w = self.written.get();
        while done.remove(&(w + 1)) {
            w += 1;
        }
        drop(done);
        self.written.advance_to(w);
    }

    /// Seal what is open and wait until every segment this reactor sealed so far is
    /// written. With `fua`, the last segment is written with FUA.
    pub(crate) async fn seal_and_wait(self: &Rc<Self>, fua: bool) -> Result<(), Errno> {
        let ticket = self.seal(fua).unwrap_or(self.sealed.get());
        self.written.wait_for(ticket).await;
        match self.write_error.get() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Copy slot `idx` of segment `seg` if it is in this reactor's open buffer. If the
    /// segment is being written, wait for the write and return None (read the device).
    pub(crate) async fn copy_slot(&self, seg: SegmentId, idx: u32) -> Option<IoBuf> {
        let ev = {
            let open = self.open.borrow();
            if let Some(ob) = open.as_ref() {
                if ob.seg.id() == seg && (idx as usize) < ob.records.len() {
                    let bs = self.set.geom.block_size() as usize;
                    let off = self.set.geom.header_bytes() + idx as usize * bs;
                    return Some(IoBuf::from_slice(&ob.buf[off..off + bs]));
                }
            }
            self.writing.borrow().get(&seg.0).cloned()
        };
        if let Some(ev) = ev {
            ev.wait().await;
        }
        None
    }

    /// After a cache failure: write this reactor's open segment (acknowledged writes only
    /// in RAM) to the backing devices, and wait for segments whose write is still in
    /// flight. Returns the backing devices that lost data here.
    pub(crate) async fn rescue_open_segment(self: &Rc<Self>) -> Vec<super::index::BackingIdx> {
        let open = self.open.borrow_mut().take();
        if let Some(ob) = open {
            let seg = ob.seg.id();
            let lost = self.rescue_buffer(seg, &ob.records, &ob.buf).await;
            self.lost.borrow_mut().extend(lost);
            let _ = self.set.index.seal(ob.seg);
            self.set.ram_owner[seg.0 as usize].store(0, Ordering::Release);
        }
        // Segments being written: their task rescues them if the write fails.
        let target = self.sealed.get();
        self.written.wait_for(target).await;
        self.lost.borrow().clone()
    }

    fn ensure_idle_sealer(self: &Rc<Self>) {
        if self.idle_sealer.replace(true) {
            return;
        }
        let me = self.clone();
        reactor::spawn_detached(async move {
            loop {
                let idle = me.set.options().seal_idle;
                reactor::sleep(idle).await;
                if me.open.borrow().is_none() {
                    break;
                }
                if me.last_write.get().elapsed() >= idle {
                    me.seal(false);
                    break;
                }
            }
            me.idle_sealer.set(false);
        });
    }

    /// Index of this reactor.
    pub(crate) fn reactor(&self) -> usize {
        self.me
    }
}

impl Drop for ReactorLog {
    fn drop(&mut self) {
        if let Some(id) = self.poller.take() {
            reactor::unregister_poller(id);
        }
    }
}
