//! The cache set: one cache device, its log, its index, and the backing devices attached
//! to it. Format, load (recovery), attach and superblock updates live here; the per-reactor
//! write buffers are in `log.rs`, the cached bdev's I/O paths in `bdev.rs`, writeback and
//! segment reclaim in `writeback.rs`.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use uuid::Uuid;

use super::index::{BackingIdx, BlockIndex, BlockKey, EntryKind, FreeSegment, Lba, SegmentId, Seq};
use super::ondisk::{
    self, format_superblock, load_superblock, BackingHeaderOnDisk, CacheMode, FormatError, FormatParams,
    LoadedSuperblock, SegmentGeometry, SuperblockCopy, SuperblockExpect, SuperblockOnDisk, DEFAULT_DATA_OFFSET,
    SUPERBLOCK_SLOT_SIZE,
};
use crate::bdev::{BdevDesc, IoChannel};
use crate::dma::IoBuf;
use crate::errno::Errno;
use crate::reactor::{self, ReactorSet};

/// Why a cache set could not be created or loaded. Keeps the errno for RPC replies.
#[derive(Debug)]
pub enum CacheError {
    /// The device's contents are not an acceptable cache (bad magic, version, geometry...).
    Format(FormatError),
    /// An I/O or resource error.
    Io(Errno, String),
    /// A request that makes no sense (bad option, wrong device).
    Invalid(String),
}

impl CacheError {
    pub fn errno(&self) -> Errno {
        match self {
            CacheError::Format(_) => Errno::EILSEQ,
            CacheError::Io(e, _) => *e,
            CacheError::Invalid(_) => Errno::EINVAL,
        }
    }
}

impl std::fmt::Display for CacheError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheError::Format(e) => write!(f, "{e}"),
            CacheError::Io(e, what) => write!(f, "{what}: {e}"),
            CacheError::Invalid(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for CacheError {}

impl From<FormatError> for CacheError {
    fn from(e: FormatError) -> Self {
        CacheError::Format(e)
    }
}

/// Cache set options (RPC `bdev_cache_create` / `bdev_cache_set_options`).
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// Segment size in bytes (power of two, 128 KiB – 4 MiB). Used when formatting.
    pub segment_size: u32,
    /// Cache block size (512 or 4096). Used when formatting.
    pub block_size: u32,
    /// Seal a partly filled segment after this long without writes.
    pub seal_idle: Duration,
    /// Reactor that runs writeback and reclaim (default: the last one).
    pub migration_reactor: Option<usize>,
    /// Start writeback when fewer than this fraction of segments are free (percent).
    pub writeback_free_low_percent: u32,
    /// Longest a write waits for log space before it fails (never forever).
    pub space_wait_limit: Duration,
    /// Decayed error count at which a backing device's cached bdev is stopped.
    pub backing_io_error_limit: u32,
    /// Decayed error count at which the cache device is declared failed.
    pub cache_io_error_limit: u32,
    /// Half-life of the error counts.
    pub io_error_halflife: Duration,
    /// What a cache-device failure stops.
    pub stop_when_cache_set_failed: super::failure::StopPolicy,
    /// How long a backing device may stay offline (ENODEV) before its cached bdev stops.
    pub backing_offline_grace: Duration,
    /// Promote a read miss on its Nth miss within the window (0: never promote).
    pub promote_after: u32,
    /// Contiguous streams longer than this bypass the cache (0: off).
    pub seq_cutoff_bytes: u64,
    /// Writeback rate control (docs/cache-engine.md): target dirty percent and the rate
    /// span in blocks per second.
    pub writeback_percent: u32,
    pub writeback_rate_min: u64,
    pub writeback_rate_max: u64,
    pub seq_cutoff_policy: super::promote::SeqCutoffPolicy,
    /// Dirty percent of the log's slots at or above which writes of uncached blocks go
    /// straight to the backing device (bcache's writeback cutoff); 100: only when the log
    /// has no room at all.
    pub dirty_write_cutoff_percent: u32,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            segment_size: ondisk::DEFAULT_SEGMENT_SIZE,
            block_size: 4096,
            seal_idle: Duration::from_millis(20),
            migration_reactor: None,
            writeback_free_low_percent: 25,
            space_wait_limit: Duration::from_secs(30),
            backing_io_error_limit: 64,
            cache_io_error_limit: 64,
            io_error_halflife: Duration::from_secs(60),
            stop_when_cache_set_failed: super::failure::StopPolicy::Auto,
            backing_offline_grace: Duration::from_secs(5),
            promote_after: 2,
            seq_cutoff_bytes: 4 << 20,
            writeback_percent: 10,
            writeback_rate_min: 256,
            writeback_rate_max: 200_000,
            seq_cutoff_policy: super::promote::SeqCutoffPolicy::Always,
            dirty_write_cutoff_percent: 70,
        }
    }
}

/// A backing-device block range being written, by writeback or directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IoRange {
    pub backing: u8,
    pub start: u64,
    pub end: u64,
    pub writeback: bool,
}

impl IoRange {
    fn overlaps(&self, o: &IoRange) -> bool {
        self.backing == o.backing && self.start < o.end && o.start < self.end
    }
}

impl CacheSet {
    /// Claim a range for writeback; false if a direct write to it is in flight.
    pub(crate) fn claim_writeback(&self, r: IoRange) -> bool {
        let mut v = self.io_ranges.lock().unwrap_or_else(|e| e.into_inner());
        if v.iter().any(|x| !x.writeback && x.overlaps(&r)) {
            return false;
        }
        v.push(r);
        true
    }

    /// Claim a range for a direct write, waiting (bounded) while writeback (or a
    /// promotion's install) holds it. Bumps the direct-write epochs of its blocks.
    pub(crate) async fn claim_direct(&self, r: IoRange) -> Result<(), Errno> {
        debug_assert!(!r.writeback && r.start < r.end);
        let started = Instant::now();
        loop {
            {
                let mut v = self.io_ranges.lock().unwrap_or_else(|e| e.into_inner());
                if !v.iter().any(|x| x.writeback && x.overlaps(&r)) {
                    v.push(r);
                    let n = (r.end - r.start).min(DIRECT_EPOCHS as u64);
                    for lba in r.start..r.start + n {
                        self.direct_epochs[direct_epoch_bucket(r.backing, lba)].fetch_add(1, Ordering::AcqRel);
                    }
                    return Ok(());
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(Errno::ETIMEDOUT);
            }
            crate::reactor::sleep(Duration::from_micros(100)).await;
        }
    }

    /// A promotion's view of direct writes to one block: None if one is in flight (the
    /// backing read may return either version: do not promote), else the block's epoch,
    /// to compare at install time (`claim_promotion`).
    pub(crate) fn direct_epoch(&self, backing: u8, lba: u64) -> Option<u64> {
        let r = IoRange { backing, start: lba, end: lba + 1, writeback: true };
        let v = self.io_ranges.lock().unwrap_or_else(|e| e.into_inner());
        if v.iter().any(|x| !x.writeback && x.overlaps(&r)) {
            return None;
        }
        Some(self.direct_epochs[direct_epoch_bucket(backing, lba)].load(Ordering::Acquire))
    }

    /// Claim one block to install a promoted copy of it: fails if a direct write holds it
    /// or started since `epoch` was read (the copy may then be older than the backing
    /// device). Held across the install, so a direct write that comes next waits and then
    /// finds the copy and invalidates it. Release with `release_range`.
    pub(crate) fn claim_promotion(&self, backing: u8, lba: u64, epoch: u64) -> Option<IoRange> {
        let r = IoRange { backing, start: lba, end: lba + 1, writeback: true };
        if !self.claim_writeback(r) {
            return None;
        }
        if self.direct_epochs[direct_epoch_bucket(backing, lba)].load(Ordering::Acquire) != epoch {
            self.release_range(r);
            return None;
        }
        Some(r)
    }

    /// Whether `r` is claimed (exactly this range, by its kind). For debug assertions.
    pub(crate) fn holds_claim(&self, r: IoRange) -> bool {
        self.io_ranges.lock().unwrap_or_else(|e| e.into_inner()).contains(&r)
    }

    pub(crate) fn release_range(&self, r: IoRange) {
        let mut v = self.io_ranges.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = v.iter().position(|x| *x == r) {
            v.swap_remove(i);
        }
    }
}

/// What a log placement is for, which decides whether it may use the reserve of free
/// segments. Tombstones complete direct writes (writearound, passthrough, bypasses over
/// cached blocks) and are small; keeping the last free segments for them means such a
/// write never waits behind a log full of new data. (Direct writes release their backing
/// claim before placing anything, `Inner::release_direct` in bdev.rs, so even a wait here
/// cannot stall writeback.)
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum SpaceUse {
    /// New data (writeback-mode writes, zeroes): waits for space above the reserve.
    Data,
    /// A tombstone placed by a direct write: may use the reserve.
    Invalidation,
    /// Promotions and copy-forwards: only above the reserve, never waiting.
    Opportunistic,
}

/// Buckets of direct-write epochs (blocks hash into them; a collision only costs a
/// promotion).
pub(crate) const DIRECT_EPOCHS: usize = 1024;

fn direct_epoch_bucket(backing: u8, lba: u64) -> usize {
    ((lba ^ ((backing as u64) << 40)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54) as usize % DIRECT_EPOCHS
}

/// Policy knobs read on the I/O path.
pub(crate) struct Knobs {
    pub promote_after: AtomicU32,
    pub seq_cutoff_bytes: AtomicU64,
    pub seq_policy: AtomicU8,
}

impl Knobs {
    fn from(o: &CacheOptions) -> Knobs {
        let k = Knobs {
            promote_after: AtomicU32::new(0),
            seq_cutoff_bytes: AtomicU64::new(0),
            seq_policy: AtomicU8::new(0),
        };
        k.update(o);
        k
    }

    fn update(&self, o: &CacheOptions) {
        self.promote_after.store(o.promote_after, Ordering::Relaxed);
        self.seq_cutoff_bytes.store(o.seq_cutoff_bytes, Ordering::Relaxed);
        let p = match o.seq_cutoff_policy {
            super::promote::SeqCutoffPolicy::Always => 0,
            super::promote::SeqCutoffPolicy::Full => 1,
            super::promote::SeqCutoffPolicy::Never => 2,
        };
        self.seq_policy.store(p, Ordering::Relaxed);
    }
}

/// A backing device attached to the set.
pub struct Backing {
    pub idx: BackingIdx,
    pub uuid: Uuid,
    pub desc: BdevDesc,
    /// Byte offset of block 0 of the cached volume on the backing device.
    pub data_offset: u64,
    /// Size of the cached volume in cache blocks.
    pub num_blocks: u64,
    pub mode: AtomicU8,
    pub(crate) state: super::failure::StateCell,
    pub(crate) errors: super::failure::ErrorCounter,
    pub(crate) offline_since: Mutex<Option<Instant>>,
    /// Writes that went straight to this device, for the FLUSHes that must cover them.
    /// Writes that went straight to this backing device (writethrough, writearound,
    /// sequential and full-log bypasses), for the FLUSHes that must cover them.
    pub(crate) direct: WriteGen,
}

/// Writes completed on a device and the flushes that cover them. Generation numbers, not a
/// flag: a flush that finds the last completed flush covering every write completed before
/// it may skip its own; a flag cleared by a concurrent flush still running would let a
/// second caller go on too early.
#[derive(Default)]
pub(crate) struct WriteGen {
    /// Writes completed so far.
    completed: AtomicU64,
    /// The `completed` count covered by the newest completed backing flush.
    flushed: AtomicU64,
}

impl WriteGen {
    pub(crate) fn note_completed(&self) {
        self.completed.fetch_add(1, Ordering::AcqRel);
    }

    /// The count a flush issued now must cover, if the device needs one.
    pub(crate) fn flush_needed(&self) -> Option<u64> {
        let done = self.completed.load(Ordering::Acquire);
        (self.flushed.load(Ordering::Acquire) < done).then_some(done)
    }

    /// A flush issued after `covered` writes had completed has completed.
    pub(crate) fn note_flushed(&self, covered: u64) {
        self.flushed.fetch_max(covered, Ordering::AcqRel);
        debug_assert!(self.flushed.load(Ordering::Acquire) <= self.completed.load(Ordering::Acquire));
    }
}

impl Backing {
    pub fn mode(&self) -> CacheMode {
        match self.mode.load(Ordering::Acquire) {
            1 => CacheMode::WriteThrough,
            2 => CacheMode::WriteAround,
            3 => CacheMode::None,
            _ => CacheMode::WriteBack,
        }
    }
}

/// Counters of a cache set.
#[derive(Default)]
pub struct SetCounters {
    pub read_hits: AtomicU64,
    pub read_partial_hits: AtomicU64,
    pub read_misses: AtomicU64,
    pub write_blocks: AtomicU64,
    pub write_overwrites_in_buffer: AtomicU64,
    pub segments_sealed: AtomicU64,
    pub segments_written: AtomicU64,
    pub segment_write_errors: AtomicU64,
    pub conflict_seals: AtomicU64,
    pub flushes: AtomicU64,
    pub writeback_blocks: AtomicU64,
    pub segments_reclaimed: AtomicU64,
    pub space_waits: AtomicU64,
    pub promotions: AtomicU64,
    pub promotions_stale: AtomicU64,
    /// Promotions not done because no log space was free right then (the open segment
    /// full, no free segment) or too many were in flight on the reactor: promotions never
    /// wait.
    pub promotions_skipped: AtomicU64,
    /// Promotions spawned and not finished yet (a gauge, not a count).
    pub promotions_in_flight: AtomicU64,
    /// Referenced clean blocks re-placed in a newer segment when theirs was reclaimed
    /// (second chance).
    pub copy_forwards: AtomicU64,
    /// Copy-forwards given up: the block changed meanwhile, no log space, or a cache read
    /// error.
    pub copy_forwards_dropped: AtomicU64,
    pub seq_bypasses: AtomicU64,
    /// Writes of uncached blocks sent straight to the backing device because the log had
    /// no free segment or the set was dirty above its cutoff (instead of waiting for
    /// writeback).
    pub full_bypasses: AtomicU64,
}

/// A sealed segment waiting for writeback/reclaim, by seq.
pub(crate) struct SealedSeg {
    pub seg: SegmentId,
    pub written: bool,
}

static NEXT_SET_ID: AtomicU64 = AtomicU64::new(1);
/// Per-reactor storage keys of cache sets (below the bdev channel key range).
pub(crate) const SET_KEY_BASE: u64 = 1 << 62;

/// A cache set. Shared by every reactor (`Arc`).
pub struct CacheSet {
    pub(crate) id: u64,
    pub name: String,
    pub uuid: Uuid,
    pub(crate) cache: BdevDesc,
    pub(crate) geom: SegmentGeometry,
    pub(crate) index: BlockIndex,
    pub(crate) reactors: ReactorSet,
    pub(crate) opts: RwLock<CacheOptions>,
    /// The superblock as last persisted. Updates are serialized by `sb_update`.
    pub(crate) sb: Mutex<LoadedSuperblock>,
    pub(crate) sb_update: futures::lock::Mutex<()>,
    /// Segments ready to open, oldest reclaimed first.
    pub(crate) free: ArrayQueue<FreeSegment>,
    /// Per segment: 1 + the reactor whose RAM buffer holds it (open or being written), or 0.
    pub(crate) ram_owner: Box<[AtomicU32]>,
    /// Sealed segments by seq (writeback and reclaim take them oldest first).
    pub(crate) sealed: Mutex<BTreeMap<u64, SealedSeg>>,
    pub(crate) backings: RwLock<Vec<Option<Arc<Backing>>>>,
    pub counters: SetCounters,
    /// Set when a fatal cache-device error happened: no new log writes.
    pub(crate) failed: AtomicBool,
    pub(crate) stopping: AtomicBool,
    /// The index's only reclaim capability; taken by the writeback task while it runs.
    pub(crate) reclaimer: Mutex<Option<super::index::Reclaimer>>,
    pub(crate) kick: super::writeback::Kick,
    pub(crate) cache_errors: super::failure::ErrorCounter,
    pub(crate) misses: super::promote::MissTracker,
    /// Backing-device ranges being written by writeback or directly (writethrough,
    /// writearound, bypass): the two never overlap (seed 003).
    pub(crate) io_ranges: Mutex<Vec<IoRange>>,
    /// Direct writes started per bucket of blocks: promotions compare them (seed 003 for
    /// direct writes, which leave no trace in the index when the block is uncached).
    pub(crate) direct_epochs: Box<[AtomicU64]>,
    /// Durability rounds (FLUSH group commit): one at a time, numbered.
    pub(crate) durable_round: futures::lock::Mutex<()>,
    /// Foreground activity per reactor (rate control input).
    pub(crate) fg: Box<[super::rate::FgStat]>,
    /// Writeback's in-flight window under foreground load (tail_guard.rs).
    pub(crate) tail_guard: Mutex<super::tail_guard::TailGuard>,
    /// Writeback I/Os issued (cache reads and backing writes), for the tail guard.
    pub(crate) wb_ios: AtomicU64,
    /// Writeback runs skipped because a direct write held their blocks.
    pub(crate) wb_claim_skips: AtomicU64,
    /// Writers are waiting for log space (or free segments are below the low watermark):
    /// writeback runs at its full window regardless of the foreground.
    pub(crate) wb_space_urgent: AtomicBool,
    /// The dirty fraction is at or above `dirty_write_cutoff_percent` (the migration
    /// thread's last look): writes of uncached blocks go around the cache.
    pub(crate) dirty_cutoff: AtomicBool,
    /// The rate controller's last decision (for stats).
    pub(crate) writeback_rate: Mutex<super::rate::Decision>,
    /// Writes completed on the cache device (segments, superblock) and the flushes that
    /// covered them (`flush_cache`).
    pub(crate) cache_writes: WriteGen,
    pub(crate) created: Instant,
    pub(crate) rounds_started: AtomicU64,
    pub(crate) rounds_done: AtomicU64,
    /// The per-I/O policy knobs as atomics (read on every I/O without a lock).
    pub(crate) knobs: Knobs,
    pub(crate) migration_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(crate) drain_requested: AtomicBool,
}

impl CacheSet {
    fn build(
        name: &str,
        cache: BdevDesc,
        reactors: ReactorSet,
        loaded: LoadedSuperblock,
        opts: CacheOptions,
    ) -> Result<CacheSet, CacheError> {
        let geom = loaded.sb.geometry()?;
        let nr_segments = loaded.sb.nr_segments;
        if nr_segments < 4 {
            return Err(CacheError::Invalid(format!(
                "cache device too small: {nr_segments} segments of {} KiB (need at least 4)",
                geom.segment_size() / 1024
            )));
        }
        let knobs = Knobs::from(&opts);
        let n_reactors = reactors.len();
        let index = BlockIndex::new(nr_segments, geom.slots_per_segment())
            .map_err(|e| CacheError::Invalid(format!("index: {e}")))?;
        Ok(CacheSet {
            id: NEXT_SET_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            uuid: loaded.sb.cache_set(),
            cache,
            geom,
            index,
            reactors,
            opts: RwLock::new(opts),
            sb: Mutex::new(loaded),
            sb_update: futures::lock::Mutex::new(()),
            free: ArrayQueue::new(nr_segments as usize),
            ram_owner: (0..nr_segments).map(|_| AtomicU32::new(0)).collect(),
            sealed: Mutex::new(BTreeMap::new()),
            backings: RwLock::new(vec![None; ondisk::MAX_BACKING]),
            counters: SetCounters::default(),
            failed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            reclaimer: Mutex::new(None),
            kick: Default::default(),
            cache_errors: Default::default(),
            misses: Default::default(),
            io_ranges: Mutex::new(Vec::new()),
            direct_epochs: (0..DIRECT_EPOCHS).map(|_| AtomicU64::new(0)).collect(),
            durable_round: futures::lock::Mutex::new(()),
            fg: (0..n_reactors).map(|_| Default::default()).collect(),
            tail_guard: Mutex::new(Default::default()),
            wb_ios: AtomicU64::new(0),
            wb_claim_skips: AtomicU64::new(0),
            wb_space_urgent: AtomicBool::new(false),
            dirty_cutoff: AtomicBool::new(false),
            writeback_rate: Mutex::new(super::rate::Decision::Idle),
            cache_writes: WriteGen::default(),
            created: Instant::now(),
            rounds_started: AtomicU64::new(0),
            rounds_done: AtomicU64::new(0),
            knobs,
            migration_thread: Mutex::new(None),
            drain_requested: AtomicBool::new(false),
        })
    }

    pub fn geometry(&self) -> &SegmentGeometry {
        &self.geom
    }

    pub fn block_size(&self) -> u32 {
        self.geom.block_size()
    }

    pub fn options(&self) -> CacheOptions {
        self.opts.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_options(&self, o: CacheOptions) {
        self.knobs.update(&o);
        *self.opts.write().unwrap_or_else(|e| e.into_inner()) = o;
    }

    pub fn cache_desc(&self) -> &BdevDesc {
        &self.cache
    }

    pub fn index(&self) -> &BlockIndex {
        &self.index
    }

    pub fn reactors(&self) -> &ReactorSet {
        &self.reactors
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub(crate) fn backing(&self, idx: BackingIdx) -> Option<Arc<Backing>> {
        self.backings.read().unwrap_or_else(|e| e.into_inner()).get(idx.0 as usize).cloned().flatten()
    }

    pub fn backings(&self) -> Vec<Arc<Backing>> {
        self.backings.read().unwrap_or_else(|e| e.into_inner()).iter().flatten().cloned().collect()
    }

    /// Number of free segments.
    pub fn free_segments(&self) -> usize {
        self.free.len()
    }

    /// Free segments held back for invalidations (`SpaceUse::Invalidation`): one per
    /// reactor plus one, at most a quarter of the log.
    pub(crate) fn space_reserve(&self) -> usize {
        (self.reactors.len() + 1).min(self.nr_segments() as usize / 4).max(1)
    }

    /// Take a free segment for `use_`, if one may be taken now. Data and opportunistic
    /// copies leave the reserve alone; the check and the pop are not atomic, so racing
    /// reactors can dig into the reserve by at most one segment each (it has one spare
    /// per reactor for that).
    pub(crate) fn take_free(&self, use_: SpaceUse) -> Option<super::index::FreeSegment> {
        if use_ != SpaceUse::Invalidation && self.free.len() <= self.space_reserve() {
            return None;
        }
        self.free.pop()
    }

    /// Whether a segment could be taken for `use_` right now (a hint).
    pub(crate) fn has_free(&self, use_: SpaceUse) -> bool {
        let floor = if use_ == SpaceUse::Invalidation { 0 } else { self.space_reserve() };
        self.free.len() > floor
    }

    pub fn nr_segments(&self) -> u32 {
        self.index.nr_segments()
    }

    /// Reactor that runs writeback/reclaim.
    pub(crate) fn migration_reactor(&self) -> usize {
        let n = self.reactors.len();
        self.options().migration_reactor.filter(|r| *r < n).unwrap_or(n - 1)
    }

    /// Snapshot of the superblock in force.
    pub fn superblock(&self) -> SuperblockOnDisk {
        self.sb.lock().unwrap_or_else(|e| e.into_inner()).sb.clone()
    }

    /// Persist a superblock edit: write the other copy, flush the cache device, then make
    /// it the one in force. Serialized; runs on a reactor.
    pub(crate) async fn update_superblock(&self, edit: impl FnOnce(&mut SuperblockOnDisk)) -> Result<(), CacheError> {
        let _g = self.sb_update.lock().await;
        let pending = {
            let sb = self.sb.lock().unwrap_or_else(|e| e.into_inner());
            sb.begin_update(edit)?
        };
        let ch = self.cache.channel().map_err(|e| CacheError::Io(e, "cache channel".into()))?;
        let bytes = pending.bytes();
        let mut buf = IoBuf::new(bytes.len());
        buf.copy_from_slice(&bytes);
        // A plain write and a flush (which covers it and everything written before it): a
        // FUA write and a flush cost two device flushes.
        let c = ch.write(pending.target.offset(), buf, false).await;
        c.status.map_err(|e| CacheError::Io(e, "superblock write".into()))?;
        self.cache_writes.note_completed();
        self.flush_cache(&ch).await.map_err(|e| CacheError::Io(e, "cache flush after superblock write".into()))?;
        self.sb.lock().unwrap_or_else(|e| e.into_inner()).complete_update(pending);
        Ok(())
    }

    /// The per-reactor log state of this set on the calling reactor.
    pub(crate) fn local(self: &Arc<Self>) -> Result<Rc<super::log::ReactorLog>, Errno> {
        let mut err = None;
        let v = reactor::local_storage(SET_KEY_BASE | self.id, || match super::log::ReactorLog::new(self.clone()) {
            Ok(l) => Some(Rc::new(l)),
            Err(e) => {
                err = Some(e);
                None
            }
        });
        match v {
            Some(l) => Ok((*l).clone()),
            None => Err(err.unwrap_or(Errno::ENXIO)),
        }
    }

    /// Make every block version that exists now durable on the cache device: each
    /// reactor seals its open segment and waits until all it sealed is written, then the
    /// cache device is flushed. This is FLUSH for the cached bdevs, and the step writeback
    /// takes before it declares superseded versions dead. Runs on a reactor.
    pub(crate) async fn make_durable(self: &Arc<Self>) -> Result<(), Errno> {
        // Group commit: rounds run one at a time; a caller that waited while a round ran
        // is covered by the next one to *start* after it arrived — if some other waiter
        // already ran it, there is nothing left to do.
        let arrival = self.rounds_started.load(Ordering::Acquire);
        let _turn = self.durable_round.lock().await;
        if self.rounds_done.load(Ordering::Acquire) > arrival {
            return Ok(());
        }
        let round = self.rounds_started.fetch_add(1, Ordering::AcqRel) + 1;
        let rounds = (0..self.reactors.len()).map(|r| {
            let s = self.clone();
            self.reactors.run_on(r, move || async move {
                match s.existing_local() {
                    Some(log) => log.seal_and_wait(false).await,
                    None => Ok(()),
                }
            })
        });
        for r in futures::future::join_all(rounds).await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Errno::ESHUTDOWN),
            }
        }
        if self.is_failed() {
            return Err(Errno::EIO);
        }
        self.flush_cache(&self.cache.channel()?).await?;
        self.rounds_done.fetch_max(round, Ordering::AcqRel);
        Ok(())
    }

    /// Flush the cache device unless a completed flush already covers every write to it
    /// that had completed (segments, superblock copies): a writeback round with no
    /// foreground writes would otherwise flush an idle device several times, and a
    /// reader behind a device flush waits milliseconds on this VM's disk.
    pub(crate) async fn flush_cache(&self, ch: &std::rc::Rc<crate::bdev::IoChannel>) -> Result<(), Errno> {
        if let Some(covered) = self.cache_writes.flush_needed() {
            ch.flush().await.status?;
            self.cache_writes.note_flushed(covered);
        }
        Ok(())
    }

    /// The writeback rate controller's current decision.
    pub fn writeback_rate(&self) -> super::rate::Decision {
        *self.writeback_rate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writeback tail guard's window, pacing, baseline and decision counts.
    pub fn tail_guard_state(&self) -> super::tail_guard::GuardState {
        self.tail_guard.lock().unwrap_or_else(|e| e.into_inner()).state()
    }

    /// Per-path latency histograms merged over every reactor (µs).
    pub async fn latency(self: &Arc<Self>) -> super::log::PathLatency {
        let mut total = super::log::PathLatency::new();
        for r in 0..self.reactors.len() {
            let s = self.clone();
            if let Ok(Some(l)) = self
                .reactors
                .run_on(r, move || async move { s.existing_local().map(|l| l.latency.borrow().clone()) })
                .await
            {
                total.add(&l);
            }
        }
        total
    }

    /// Clear the per-path latency histograms on every reactor.
    pub async fn reset_latency(self: &Arc<Self>) {
        for r in 0..self.reactors.len() {
            let s = self.clone();
            let _ = self
                .reactors
                .run_on(r, move || async move {
                    if let Some(l) = s.existing_local() {
                        l.latency.borrow_mut().reset();
                    }
                })
                .await;
        }
    }

    pub(crate) fn existing_local(&self) -> Option<Rc<super::log::ReactorLog>> {
        reactor::local_storage::<Rc<super::log::ReactorLog>>(SET_KEY_BASE | self.id, || None).map(|l| (*l).clone())
    }
}

async fn read_exact(ch: &Rc<IoChannel>, offset: u64, len: usize) -> Result<IoBuf, CacheError> {
    let c = ch.read(offset, IoBuf::new(len)).await;
    c.status.map_err(|e| CacheError::Io(e, format!("read of {len} bytes at {offset}")))?;
    c.buf.ok_or_else(|| CacheError::Io(Errno::EIO, "read returned no buffer".into()))
}

/// Format `cache` as a new, empty cache set. Explicit and destructive: only this function
/// writes a fresh superblock. Runs on a reactor.
pub async fn format(
    name: &str,
    cache: BdevDesc,
    reactors: ReactorSet,
    opts: CacheOptions,
) -> Result<Arc<CacheSet>, CacheError> {
    let info = cache.bdev().info().clone();
    if opts.block_size < info.block_size || !opts.block_size.is_multiple_of(info.block_size) {
        return Err(CacheError::Invalid(format!(
            "cache block size {} is not a multiple of the cache device's block size {}",
            opts.block_size, info.block_size
        )));
    }
    let sb = format_superblock(FormatParams {
        cache_set: Uuid::new_v4(),
        block_size: opts.block_size,
        segment_size: opts.segment_size,
        device_size: info.size_bytes(),
    })?;
    let ch = cache.channel().map_err(|e| CacheError::Io(e, "cache channel".into()))?;
    // Both copies, then a flush: a fresh set always has two valid superblocks.
    for copy in [SuperblockCopy::A, SuperblockCopy::B] {
        let bytes = sb.encode_slot();
        let c = ch.write(copy.offset(), IoBuf::from_slice(&bytes), false).await;
        c.status.map_err(|e| CacheError::Io(e, "superblock write".into()))?;
    }
    let c = ch.flush().await;
    c.status.map_err(|e| CacheError::Io(e, "cache flush".into()))?;
    let set = Arc::new(CacheSet::build(name, cache, reactors, LoadedSuperblock::formatted(sb), opts)?);
    set.init_free_segments()?;
    set.start_migration();
    log::info!(
        "cache set {name} ({}): formatted {} segments of {} KiB, {} slots",
        set.uuid,
        set.nr_segments(),
        set.geom.segment_size() / 1024,
        set.index.nr_slots()
    );
    Ok(set)
}

impl CacheSet {
    fn init_free_segments(&self) -> Result<(), CacheError> {
        let mut r = self.index.reclaimer().ok_or_else(|| CacheError::Invalid("reclaimer already taken".into()))?;
        for f in self.index.take_unused(&mut r).map_err(|e| CacheError::Invalid(format!("{e}")))? {
            if self.free.push(f).is_err() {
                return Err(CacheError::Invalid("free segment queue overflow".into()));
            }
        }
        // The reclaimer token goes to the writeback task.
        *self.reclaimer.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        Ok(())
    }
}

/// Open an existing cache set: validate the superblock, scan and verify the log, replay
/// it into a fresh index in seq order. Never formats. Runs on a reactor.
pub async fn load(
    name: &str,
    cache: BdevDesc,
    reactors: ReactorSet,
    opts: CacheOptions,
) -> Result<Arc<CacheSet>, CacheError> {
    let started = Instant::now();
    let info = cache.bdev().info().clone();
    let ch = cache.channel().map_err(|e| CacheError::Io(e, "cache channel".into()))?;
    let head = read_exact(&ch, 0, 2 * SUPERBLOCK_SLOT_SIZE).await?;
    let expect = SuperblockExpect { block_size: None, segment_size: None, device_size: info.size_bytes() };
    let loaded = load_superblock(&head[..SUPERBLOCK_SLOT_SIZE], &head[SUPERBLOCK_SLOT_SIZE..], &expect)?;
    if let Some(e) = &loaded.other_error {
        log::warn!("cache set {name}: one superblock copy is invalid ({e}); using the other");
    }
    // Segments at or below reclaim_seq are dead (their positions may hold newer data);
    // segments up to writeback_seq replay as clean (the backing device has their data),
    // newer ones as they were written.
    let horizon = loaded.sb.reclaim_seq;
    let written_back = loaded.sb.writeback_seq;
    let set = Arc::new(CacheSet::build(name, cache, reactors, loaded, opts)?);
    let geom = set.geom;
    let hdr = geom.header_bytes();
    let bs = geom.block_size() as usize;

    // 1. Every segment header (32 reads in flight); keep the plausible ones above the
    //    replay horizon.
    use futures::StreamExt;
    let mut candidates: Vec<(u64, SegmentId, u32)> = Vec::new();
    let header_reads = futures::stream::iter(0..set.nr_segments())
        .map(|k| {
            let ch = ch.clone();
            async move { (SegmentId(k), read_exact(&ch, geom.segment_offset(SegmentId(k)), hdr).await) }
        })
        .buffer_unordered(32);
    futures::pin_mut!(header_reads);
    while let Some((seg, h)) = header_reads.next().await {
        let h = h?;
        if let Ok(s) = ondisk::decode_segment_header(&geom, set.uuid, seg, &h) {
            if s.header.seq > horizon {
                candidates.push((s.header.seq, seg, s.header.nr_records));
            }
        }
    }
    candidates.sort_unstable();

    // 2. Verify each candidate whole, replay valid ones in seq order.
    let participant = set.index.register();
    let mut replayed = 0u64;
    let mut skipped = 0u64;
    let mut records = 0u64;
    // Whole segments are read 8 at a time ahead of the replay, which stays in seq order.
    let segment_reads = futures::stream::iter(candidates)
        .map(|(seq, seg, n)| {
            let ch = ch.clone();
            async move {
                let len = hdr + n as usize * bs;
                (seq, seg, read_exact(&ch, geom.segment_offset(seg), len).await)
            }
        })
        .buffered(8);
    futures::pin_mut!(segment_reads);
    while let Some((seq, seg, whole)) = segment_reads.next().await {
        let whole = whole?;
        let valid = match ondisk::verify_segment(&geom, set.uuid, seg, &whole[..hdr], &whole[hdr..]) {
            Ok(v) => v,
            Err(e) => {
                log::info!("cache set {name}: segment {} (seq {seq}) skipped: {e}", seg.0);
                skipped += 1;
                continue;
            }
        };
        let open = set
            .index
            .recover_segment(seg, Seq(seq))
            .map_err(|e| CacheError::Invalid(format!("replaying segment {}: {e}", seg.0)))?;
        for (i, r) in valid.records.iter().enumerate() {
            let Some(mut kind) = EntryKind::from_record_flags(r.flags) else { continue };
            if seq <= written_back {
                kind = match kind {
                    EntryKind::Dirty => EntryKind::Clean,
                    EntryKind::Zero { .. } => EntryKind::Zero { dirty: false },
                    k => k,
                };
            }
            let Some(key) = BlockKey::new(r.backing(), r.lba()) else { continue };
            // An older version than what is installed is simply not the newest: skip it.
            let _ = set.index.install(&participant, &open, i as u32, key, kind);
            records += 1;
        }
        set.index.seal(open).map_err(|e| CacheError::Invalid(format!("{e}")))?;
        set.sealed.lock().unwrap_or_else(|e| e.into_inner()).insert(seq, SealedSeg { seg, written: true });
        replayed += 1;
    }
    set.index.advance_seq_past(Seq(written_back));
    drop(participant);
    set.init_free_segments()?;
    set.start_migration();
    log::info!(
        "cache set {name} ({}): recovered {replayed} segments ({records} records, {skipped} torn/invalid skipped) in {:?}",
        set.uuid,
        started.elapsed()
    );
    Ok(set)
}

impl CacheSet {
    /// Attach a backing bdev: re-attach by the UUID in its header, or register it (writing
    /// its header) if it carries none. Refuses a device that belongs to another cache set.
    /// Runs on a reactor.
    pub async fn attach(self: &Arc<Self>, backing: BdevDesc, mode: CacheMode) -> Result<Arc<Backing>, CacheError> {
        let binfo = backing.bdev().info().clone();
        let bs = self.block_size();
        if !bs.is_multiple_of(binfo.block_size) {
            return Err(CacheError::Invalid(format!(
                "backing bdev {} has block size {}, which does not divide the cache block size {bs}",
                binfo.name, binfo.block_size
            )));
        }
        if binfo.size_bytes() <= DEFAULT_DATA_OFFSET + bs as u64 {
            return Err(CacheError::Invalid(format!("backing bdev {} is too small", binfo.name)));
        }
        let ch = backing.channel().map_err(|e| CacheError::Io(e, "backing channel".into()))?;
        let head = read_exact(&ch, 0, 4096.max(binfo.block_size as usize)).await?;
        let existing = match BackingHeaderOnDisk::decode(&head[..BackingHeaderOnDisk::SIZE]) {
            Ok(h) => Some(h),
            Err(FormatError::NotABackingDevice) => None,
            Err(e) => return Err(e.into()),
        };
        let (idx, uuid, data_offset, data_blocks) = match existing {
            Some(h) if h.cache_set() == self.uuid => {
                let idx = self.superblock().attach_backing(&h)?;
                (idx, h.backing(), h.data_offset, h.data_size / bs as u64)
            }
            Some(h) => {
                return Err(CacheError::Format(FormatError::ForeignCacheSet {
                    expected: self.uuid,
                    found: h.cache_set(),
                }))
            }
            None => {
                let uuid = Uuid::new_v4();
                let data_offset = DEFAULT_DATA_OFFSET;
                let data_blocks = (binfo.size_bytes() - data_offset) / bs as u64;
                let mut idx = None;
                let mut err = None;
                self.update_superblock(|sb| match sb.register_backing(uuid, data_blocks, mode) {
                    Ok(i) => idx = Some(i),
                    Err(e) => err = Some(e),
                })
                .await?;
                if let Some(e) = err {
                    return Err(e.into());
                }
                let idx = idx.ok_or_else(|| CacheError::Invalid("backing registration failed".into()))?;
                let h = BackingHeaderOnDisk::new(uuid, self.uuid, idx, data_offset, data_blocks * bs as u64)?;
                let mut buf = IoBuf::zeroed(4096.max(binfo.block_size as usize));
                buf[..BackingHeaderOnDisk::SIZE].copy_from_slice(&h.encode());
                let c = ch.write(0, buf, true).await;
                c.status.map_err(|e| CacheError::Io(e, "backing header write".into()))?;
                (idx, uuid, data_offset, data_blocks)
            }
        };
        let b = Arc::new(Backing {
            idx,
            uuid,
            desc: backing,
            data_offset,
            num_blocks: data_blocks,
            mode: AtomicU8::new(mode as u8),
            state: Default::default(),
            errors: Default::default(),
            offline_since: Mutex::new(None),
            direct: WriteGen::default(),
        });
        let mut slots = self.backings.write().unwrap_or_else(|e| e.into_inner());
        if slots[idx.0 as usize].is_some() {
            return Err(CacheError::Io(Errno::EBUSY, format!("backing index {} is already attached", idx.0)));
        }
        slots[idx.0 as usize] = Some(b.clone());
        Ok(b)
    }

    /// Key of a block of a backing device.
    pub(crate) fn key(idx: BackingIdx, lba: u64) -> Option<BlockKey> {
        BlockKey::new(idx, Lba(lba))
    }
}
